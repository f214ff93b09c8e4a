r"""The Fisher information of a small causal transformer language model (sequence outputs ``(B, T, V)``).

A character-level transformer LM is trained with Adam on a corpus that ships with every Python installation:
the **docstrings of Python's own standard library** (:func:`stdlib_corpus`: a fixed list of modules, each module's
``__doc__`` and the docstrings of its public functions, classes and their public methods, in sorted order, with
the indentation removed by :func:`inspect.cleandoc`).  The corpus therefore depends on the Python version (and
nothing else: no download, no platform-specific module); ``summary.md`` names the version and the corpus's sha256.

* **Vocabulary.** The ``vocab`` most frequent characters of the corpus (ties by code point) and one unknown token
  (``V = vocab + 1``).
* **Sequences.** Every document is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``; inputs are the
  first ``T = seq_len`` tokens, labels the next tokens (``labels[t] = input[t + 1]``).  The last window of a
  document is padded; padded label positions carry ``ignore_index = -100`` and are excluded from the loss and the
  Fisher, so sequences keep between 1 and T predictions.  Windows are split (seeded) into a test set and a training
  set; the probe set is the first ``n_probe`` training windows, the "few sequences" of the exact-diagonal comparison
  ``n_exact`` of those, half complete and half padded (:func:`select_few`).
* **Model** (:class:`CharTransformer`): token embedding + learned positions → ``layers`` ×
  ``nn.TransformerEncoderLayer(batch_first=True, dropout=0.0, norm_first=True)`` with a causal mask → LayerNorm →
  ``nn.Linear`` to V logits; outputs ``(B, T, V)``.
* **Training.** Adam on the usual language-model loss, ``F.cross_entropy`` averaged over the batch's kept tokens
  (nats per character).  :class:`fisherlens.Monitor` watches the loop (:func:`batch_monitors`): the Fisher trace
  of the training batch (``batch_fisher_trace``) — exact empirical at every step, true Fisher by one-draw
  Hutchinson every ``batch_true_every`` steps — over every parameter but the attention's (:func:`monitored_params`:
  the monitor's per-step trace needs layers it can hook); and every ``record_every`` steps, on the probe set and
  over all parameters, the loss and the true-Fisher trace (Hutchinson, ``monitor_draws`` draws).  Every Fisher is
  the library's per-sequence one (``reduction="mean"``, docs/conventions.md#structured-outputs) unless said
  otherwise.

After training (``summary.md``, :func:`analyse`):

* per-layer true-Fisher traces on the probe set (:func:`fisherlens.fisher_blocks`, ``what="trace"``), grouped per
  layer (:func:`layer_group`: embeddings, attention, MLP and norms of each block, final norm, head);
* the Hutchinson diagonal (``fisher_blocks(..., what="diag", method="hutchinson")``) against the exact one on the
  few sequences: Pearson correlation, relative error ``‖d̂ − d‖ / ‖d‖`` and the error its own standard errors
  predict, the rms z-score, per layer;
* the top ``eig_k`` eigenvalues (:func:`fisherlens.eigenvalues`, ``method="lanczos"``) at initialisation and after
  training, against ``tr F``;
* per-token vs per-sequence normalisation: ``reduction="mean"`` (per sequence, the library's convention) over
  ``reduction="per_prediction"`` (per kept token) must be the mean number of kept tokens per sequence — checked
  entry by entry for the exact diagonal of two sequences (one complete, one padded), for the Hutchinson diagonal
  of the few sequences (same draws) and for the empirical-Fisher trace of the probe set (:func:`checks`);
* a naive float64 autograd loop (:func:`naive_true_diag`: ``Σ_t Σ_c π_tc (∇ log π_tc)²``, one position at a time)
  against the library's exact diagonal on those two sequences.

The exact true Fisher of one sequence costs ``T·V`` backward passes (one per output), which is what sets the sizes
of the probe and of the few sequences; Hutchinson needs one per draw.  Not resumable: the default run takes a few
minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

import fisherlens as fl

from .. import plots
from ._common import as_tuple, check_device, check_int, check_number, check_synthetic_data, rel_dev
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = [
    "STDLIB_MODULES", "IGNORE", "CHECK_TOL", "Vocab", "stdlib_corpus", "corpus_digest", "build_vocab",
    "make_sequences", "kept_per_sequence", "CharTransformer", "layer_group", "monitored_params", "naive_true_diag",
    "token_loss", "unigram_entropy", "load_inputs", "batch_monitors", "select_few", "analyse", "hutchinson_table",
    "checks", "lm_fisher", "LmFisher", "LmFisherConfig",
]

#: the standard-library modules whose docstrings form the corpus: pure-Python or C modules whose public API is the
#: same on every platform (no ``os``, ``sys``, ...), imported by name.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gettext", "glob", "heapq",
    "html", "inspect", "itertools", "json", "logging", "math", "operator", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "shlex", "shutil", "statistics", "string", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "typing", "urllib.parse", "uuid", "zipfile",
)

#: label of a position that is not predicted (padding); ``F.cross_entropy``'s and ``fl.Categorical``'s default.
IGNORE = -100

#: columns of steps.csv (one row per training step; metrics.csv, one row per probe record, is the monitor's).
STEP_COLUMNS = ("step", "token_loss", "batch_fisher_emp", "batch_fisher_true_hutchinson")

FIGURES = {
    "lm_fisher_training.png": "Per-token loss (training batches, test set) and the Fisher trace through training "
                              "(every training batch; probe set by the monitor; exact at the end).",
    "lm_fisher_layers.png": "Per-layer true-Fisher traces on the probe set after training (fl.fisher_blocks).",
    "lm_fisher_hutchinson.png": "Hutchinson vs exact Fisher diagonal on the few sequences, one colour per layer.",
    "lm_fisher_spectrum.png": "Top Fisher eigenvalues (Lanczos) at initialisation and after training.",
}


# ----------------------------------------------------------------------------- corpus, vocabulary, sequences
def _doc(obj) -> str | None:
    """The object's own docstring (``__doc__`` is not inherited by classes), indentation removed; ``None`` if empty."""
    with warnings.catch_warnings():  # e.g. the deprecated namespaces typing.io and typing.re
        warnings.simplefilter("ignore", DeprecationWarning)
        d = getattr(obj, "__doc__", None)
    if not isinstance(d, str):
        return None
    d = inspect.cleandoc(d)
    return d or None


def stdlib_corpus(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """The docstrings of the standard-library ``modules`` as a list of documents, in a fixed order.

    Per module (in the order given): its ``__doc__``, then for every public name in its namespace (sorted; names
    starting with ``_`` skipped; only functions, builtins and classes *defined* in that module, so re-exports are
    not counted twice) the object's own docstring, and for a class the docstrings of its public methods (sorted;
    only those defined in the module: other packages may attach functions to a standard class, as ``transformers``
    does to ``logging.Logger``).
    Docstrings are cleaned with :func:`inspect.cleandoc`; repeated texts are kept once (first occurrence).  The
    namespace is read with ``vars`` (no module ``__getattr__`` is triggered); the result depends only on the Python
    version.

    Raises:
        ValueError: a module that cannot be imported, or no docstrings at all (Python run with ``-OO``).
    """
    docs: list[str] = []
    seen: set[str] = set()

    def add(d: str | None) -> None:
        if d is not None and d not in seen:
            seen.add(d)
            docs.append(d)

    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                mod = importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"lm-fisher: corpus module {name!r} cannot be imported ({e}).") from e
        add(_doc(mod))
        ns = vars(mod)
        for attr in sorted(ns):
            obj = ns[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                add(_doc(obj))
                for m in sorted(vars(obj)):
                    f = vars(obj)[m]
                    if not m.startswith("_") and inspect.isfunction(f) and f.__module__ == mod.__name__:
                        add(_doc(f))
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                add(_doc(obj))
    if not docs:
        raise ValueError("lm-fisher: the standard library has no docstrings here (is Python running with -OO?).")
    return docs


def corpus_digest(docs: Sequence[str]) -> str:
    """sha256 (hex) of the documents, separated by NUL: identifies the corpus in ``summary.md``."""
    return hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Vocab:
    """A character vocabulary: ``chars[i]`` has id ``i``; every other character maps to :attr:`unk` (= ``len(chars)``).

    Example:
        >>> v = Vocab("ab")
        >>> v.size, v.encode("abc").tolist(), v.decode([1, 0, 2])
        (3, [0, 1, 2], 'ba?')
    """

    chars: str

    @property
    def unk(self) -> int:
        """Id of the unknown token (also the input at padded positions)."""
        return len(self.chars)

    @property
    def size(self) -> int:
        """``V``: the characters and the unknown token."""
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        """Token ids ``(len(text),)`` (int64)."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, self.unk) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """Text of token ids; the unknown token becomes ``?``."""
        return "".join(self.chars[i] if 0 <= i < len(self.chars) else "?" for i in (int(j) for j in ids))


def build_vocab(docs: Sequence[str], n_chars: int) -> Vocab:
    """The ``n_chars`` most frequent characters of ``docs`` (ties broken by code point) as a :class:`Vocab`."""
    check_int("lm-fisher: vocab", n_chars)
    counts = Counter()
    for d in docs:
        counts.update(d)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Vocab("".join(c for c, _ in ranked[:n_chars]))


def make_sequences(docs: Sequence[str], vocab: Vocab, T: int) -> tuple[Tensor, Tensor]:
    """Next-token windows of every document: inputs ``X (N, T)`` and labels ``Y (N, T)`` (int64).

    Document by document, windows of ``T + 1`` tokens start every ``T`` tokens (each next-token prediction occurs
    once); ``X`` holds a window's first ``T`` tokens, ``Y`` the following ones.  A short last window is padded:
    inputs with :attr:`Vocab.unk`, labels with :data:`IGNORE`.  A causal model never lets a padded position
    influence a kept one.  Documents of one character give no window.
    """
    check_int("lm-fisher: seq_len", T)
    xs, ys = [], []
    for d in docs:
        ids = vocab.encode(d)
        for s in range(0, len(ids) - 1, T):
            w = ids[s : s + T + 1]
            x = torch.full((T,), vocab.unk, dtype=torch.long)
            y = torch.full((T,), IGNORE, dtype=torch.long)
            x[: len(w) - 1], y[: len(w) - 1] = w[:-1], w[1:]
            xs.append(x)
            ys.append(y)
    if not xs:
        raise ValueError("lm-fisher: the corpus gives no sequence (every document shorter than two characters).")
    return torch.stack(xs), torch.stack(ys)


def kept_per_sequence(Y: Tensor) -> float:
    """Mean number of kept (not :data:`IGNORE`) predictions per sequence of labels ``Y (N, T)``."""
    return float((Y != IGNORE).sum()) / len(Y)


# ----------------------------------------------------------------------------- model
class CharTransformer(nn.Module):
    """A small causal transformer LM: ``(B, T)`` token ids → ``(B, T, V)`` next-token logits.

    ``tok`` (``nn.Embedding(V, d_model)``) + ``pos`` (learned positions, ``nn.Embedding(max_len, d_model)``) →
    ``blocks``: ``layers`` × ``nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True,
    norm_first=True)`` with a causal mask → ``norm`` (``nn.LayerNorm``) → ``head`` (``nn.Linear(d_model, V)``).
    PyTorch's default initialisation (drawn from the global RNG: seed it, or use ``torch.random.fork_rng``).
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 d_ff: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        ])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        causal = torch.triu(torch.full((max_len, max_len), float("-inf")), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T = x.shape
        h = self.tok(x) + self.pos(torch.arange(T, device=x.device).expand(B, T))  # batch on axis 0
        mask = self.causal[:T, :T].to(h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def layer_group(name: str) -> str:
    """The layer a parameter tensor belongs to, for the per-layer tables: ``"token embedding"``, ``"positions"``,
    ``"block 1 attention"``, ``"block 1 MLP"``, ``"block 1 norms"``, ..., ``"final norm"``, ``"head"``."""
    if name.startswith("tok."):
        return "token embedding"
    if name.startswith("pos."):
        return "positions"
    if name.startswith("blocks."):
        i, rest = name.split(".")[1:3]
        part = {"self_attn": "attention", "linear1": "MLP", "linear2": "MLP"}.get(rest, "norms")
        return f"block {int(i) + 1} {part}"
    return "final norm" if name.startswith("norm.") else "head"


def monitored_params(model: nn.Module) -> list[str]:
    """The parameters of the per-step ``batch_fisher_trace``: all but the attention's (``nn.MultiheadAttention``
    applies its projection weights without calling a layer the monitor could hook; docs/monitor.md)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and ".self_attn." not in n]


def _groups(names: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(layer_group(n), []).append(n)
    return out


def naive_true_diag(model: nn.Module, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    """Exact true-Fisher diagonal by a naive float64 autograd loop, independent of the library's engines.

    On a float64 copy in eval mode, per sequence and kept position t: ``Σ_c π_tc (∇_θ log π_tc)²`` (one backward
    per class; equal to ``diag(J_tᵀ (diag π_t − π_t π_tᵀ) J_t)`` because ``Σ_c π_tc ∇ log π_tc = 0``), summed over
    the kept positions and averaged over the sequences (``reduction="mean"``).  Returns ``{name: diag}`` (float64,
    shaped like the parameters).
    """
    md = copy.deepcopy(model).double().eval()
    names = [n for n, p in md.named_parameters() if p.requires_grad]
    ps = [p for p in md.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in ps]
    for n in range(len(X)):
        logp = md(X[n : n + 1])[0].log_softmax(-1)  # (T, V)
        for t in torch.nonzero(Y[n] != IGNORE).flatten().tolist():
            pi = logp[t].detach().exp()
            for c in range(logp.shape[1]):
                gs = torch.autograd.grad(logp[t, c], ps, retain_graph=True, allow_unused=True)
                for a, g in zip(acc, gs, strict=True):
                    if g is not None:
                        a.add_(g.square(), alpha=float(pi[c]))
    return {k: a / len(X) for k, a in zip(names, acc, strict=True)}


# ----------------------------------------------------------------------------- training
def _loss_sums(model: nn.Module, X: Tensor, Y: Tensor, batch: int = 256) -> tuple[float, int]:
    """Summed next-token cross-entropy over the kept positions, and their count (eval mode, no grad)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(X), batch):
            f = model(X[i : i + batch])
            y = Y[i : i + batch]
            total += F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((y != IGNORE).sum())
    model.train(was)
    return total, count


def token_loss(model: nn.Module, X: Tensor, Y: Tensor) -> float:
    """Mean next-token cross-entropy per kept position (nats per character)."""
    total, count = _loss_sums(model, X, Y)
    return total / count


def unigram_entropy(Y: Tensor, V: int) -> float:
    """Entropy (nats) of the label frequencies of ``Y``: the per-token loss of the best context-free predictor."""
    y = Y[Y != IGNORE]
    p = torch.bincount(y, minlength=V).double() / len(y)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


# ----------------------------------------------------------------------------- config
@dataclass
class LmFisherConfig(StudyConfig):
    """Options of the lm-fisher study (defaults: the full run; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds the split, the initialisation, the batch order and every random estimate.
        data: unused (the corpus is built in); only the command line's defaults are accepted.
        modules: standard-library modules whose docstrings form the corpus (default :data:`STDLIB_MODULES`).
        vocab: characters kept (the most frequent; plus the unknown token), 64.
        seq_len: tokens per sequence T (32; quick 16).
        d_model, heads, layers, d_ff: transformer size (64 / 4 / 2 / 128; quick 32 / 2 / 2 / 64).
        steps, batch_size, lr: Adam steps (400; quick 30), sequences per batch (32; quick 16), learning rate.
        record_every: probe records every this many steps (25; quick 10), plus the initialisation.
        n_test: held-out sequences for the test loss (512; quick 128).
        n_probe: probe sequences: monitor records, per-layer traces, eigenvalues (32; quick 16).
        n_exact: the few sequences of the exact vs Hutchinson diagonal (8; quick 4), the first of the probe.
        hutchinson_samples: Hutchinson draws of that diagonal (256; quick 64).
        monitor_draws: Hutchinson draws of the monitor's probe trace per record (16; quick 4).
        batch_true_every: the one-draw Hutchinson true-Fisher trace of the training batch every this many steps
            (5; the exact empirical one is recorded at every step).
        eig_k: top eigenvalues (Lanczos), 10.
        threads: torch intra-op threads (2; quick 1); part of the config because results depend on it bitwise.
        device: torch device of the model, the data and every random draw (``"cpu"``; ``"cuda"`` where one is
            present); results on another device agree to round-off, not bitwise.
    """

    QUICK = {"seq_len": 16, "d_model": 32, "heads": 2, "d_ff": 64, "steps": 30, "batch_size": 16,
             "record_every": 10, "n_test": 128, "n_probe": 16, "n_exact": 4, "hutchinson_samples": 64,
             "monitor_draws": 4, "threads": 1}

    data: str | None = None
    modules: tuple[str, ...] = STDLIB_MODULES
    vocab: int = 64
    seq_len: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    d_ff: int = 128
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    record_every: int = 25
    n_test: int = 512
    n_probe: int = 32
    n_exact: int = 8
    hutchinson_samples: int = 256
    monitor_draws: int = 16
    batch_true_every: int = 5
    eig_k: int = 10
    threads: int | None = 2
    device: str = "cpu"

    def validate(self) -> None:
        check_device("lm-fisher: device", self.device)
        check_synthetic_data(self.data, "builds its corpus from the docstrings of Python's standard library")
        self.modules = as_tuple(self.modules)
        if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
            raise ValueError(f"lm-fisher: modules must be a non-empty list of module names, got {self.modules!r}.")
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"lm-fisher: modules must be distinct, got {self.modules!r}.")
        for name in ("vocab", "seq_len", "d_model", "heads", "layers", "d_ff", "steps", "batch_size",
                     "record_every", "n_test", "n_probe", "n_exact", "hutchinson_samples", "monitor_draws",
                     "batch_true_every", "eig_k"):
            check_int(f"lm-fisher: {name}", getattr(self, name))
        if self.d_model % self.heads:
            raise ValueError(f"lm-fisher: d_model ({self.d_model}) must be divisible by heads ({self.heads}).")
        if self.n_exact > self.n_probe:
            raise ValueError(f"lm-fisher: n_exact ({self.n_exact}) must not exceed n_probe ({self.n_probe}).")
        check_int("lm-fisher: hutchinson_samples", self.hutchinson_samples, 2)
        check_number("lm-fisher: lr", self.lr, lo=0)
        super().validate()


# ----------------------------------------------------------------------------- the study
@dataclass
class Inputs:
    """What :meth:`LmFisher.setup` prepares: the corpus, its vocabulary and the split sequences."""

    docs: list[str]
    vocab: Vocab
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    probe: tuple[Tensor, Tensor]
    n_sequences: int


def load_inputs(cfg: LmFisherConfig) -> Inputs:
    """Corpus → vocabulary → sequences → seeded test / train split, probe = first ``n_probe`` training sequences."""
    docs = stdlib_corpus(cfg.modules)
    vocab = build_vocab(docs, cfg.vocab)
    X, Y = make_sequences(docs, vocab, cfg.seq_len)
    N = len(X)
    if N < cfg.n_test + max(cfg.n_probe, cfg.batch_size):
        raise ValueError(f"lm-fisher: the corpus gives {N} sequences, fewer than n_test + max(n_probe, batch_size) "
                         f"= {cfg.n_test + max(cfg.n_probe, cfg.batch_size)}; add modules or lower them.")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed))
    te, tr = perm[: cfg.n_test], perm[cfg.n_test :]
    train = (X[tr], Y[tr])
    return Inputs(docs, vocab, train, (X[te], Y[te]), (train[0][: cfg.n_probe], train[1][: cfg.n_probe]), N)


def _moving_average(v: Sequence[float], w: int) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(a)])
    i = np.arange(1, len(a) + 1)
    lo = np.maximum(i - w, 0)
    return (c[i] - c[lo]) / (i - lo)


@contextmanager
def _engine_notes(notes: dict[str, int]) -> Iterator[None]:
    """Collect (count in ``notes``, not show) the library's notice that some parameters go to the general torch.func
    engine (the attention's ``out_proj``, which ``nn.MultiheadAttention`` uses functionally) and torch's notice of a
    missing vmap batching rule for the attention backward; every other warning is shown as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        msg = str(w.message)
        if msg.startswith("Parameters [") and "used outside" in msg:
            key = msg.split("]")[0] + "]"
        elif "batching rule" in msg:
            key = msg.split(".")[0]
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        notes[key] = notes.get(key, 0) + 1


def _generator(model: nn.Module, seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on the device of ``model``'s parameters."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def batch_monitors(model: nn.Module, probe: tuple[Tensor, Tensor], seed: int, true_every: int = 1,
                   ) -> tuple[fl.Monitor, fl.Monitor, list]:
    """The two monitors of the training batch's Fisher trace (``batch_fisher_trace``) on the parameters of
    :func:`monitored_params` (all but the attention's): the true Fisher by one-draw Hutchinson (generator seeded
    with ``seed``; every ``true_every``-th step) and the exact empirical Fisher (every step).  Returns
    ``(true_hutchinson, empirical, params)``; call ``step(loss=..., outputs=..., targets=y)`` on both after every
    optimiser step.
    """
    lik = fl.Categorical()
    params = monitored_params(model)
    # prove the per-sample attribution of this selection once, before training: otherwise the proof of the first
    # monitor (a nested forward inside the training forward) discards the layer calls the second monitor captured
    was = model.training
    model.eval()
    fl.fisher_trace(model, (probe[0][:1], probe[1][:1]), lik, kind="empirical", params=params)
    model.train(was)
    # the Hutchinson monitor first: its extra backward runs in its forward hook, before the empirical monitor
    # attaches its gradient hook to the same forward
    hutch = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="true", method="hutchinson",
                       generator=_generator(model, seed), params=params, every=true_every)
    emp = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="empirical", params=params)
    return hutch, emp, params


class _Training:
    """The training loop with the monitors attached."""

    def __init__(self, cfg: LmFisherConfig, run: StudyRun, model: nn.Module, inputs: Inputs):
        self.cfg, self.run, self.model, self.inputs = cfg, run, model, inputs
        self.lik = fl.Categorical()
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.order = torch.Generator().manual_seed(cfg.seed + 1)
        lik, probe = self.lik, inputs.probe
        every = lambda s: s % cfg.record_every == 0 or s == cfg.steps  # noqa: E731  (and always the last step)
        self.mon = fl.Monitor(model, lik, probe, observables=("loss", "fisher_trace"), every=every, kind="true",
                              method="hutchinson", draws=cfg.monitor_draws,
                              generator=_generator(model, cfg.seed + 2), run=run.folder)
        self.mon_hutch, self.mon_step, self.batch_params = batch_monitors(model, probe, cfg.seed + 3,
                                                                          cfg.batch_true_every)
        self.steps: list[dict] = []
        self.monitor_seconds = 0.0
        self._perm, self._at = torch.empty(0, dtype=torch.long), 0

    def _batch(self) -> Tensor:
        """Indices of the next batch: epochs of seeded permutations (a short tail is dropped)."""
        n, b = len(self.inputs.train[0]), self.cfg.batch_size
        if self._at + b > len(self._perm):
            self._perm, self._at = torch.randperm(n, generator=self.order), 0
        idx = self._perm[self._at : self._at + b]
        self._at += b
        return idx

    def record(self, step: int) -> dict:
        Xte, Yte = self.inputs.test
        return self.mon.record(step, test_token_loss=token_loss(self.model, Xte, Yte),
                               probe_token_loss=token_loss(self.model, *self.inputs.probe))

    def train(self) -> None:
        cfg, model = self.cfg, self.model
        Xtr, Ytr = self.inputs.train
        tm = time.perf_counter()
        self.record(0)
        self.monitor_seconds += time.perf_counter() - tm
        model.train()
        with self.run.bar(cfg.steps, "training", unit="step") as bar:
            for step in range(1, cfg.steps + 1):
                idx = self._batch()
                x, y = Xtr[idx], Ytr[idx]
                f = model(x)
                loss = F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1), ignore_index=IGNORE)  # per token
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                tm = time.perf_counter()
                r_emp = self.mon_step.step(loss=loss, outputs=f, targets=y)
                r_hut = self.mon_hutch.step(targets=y)
                self.steps.append({"step": step, "token_loss": float(loss.detach()),
                                   "batch_fisher_emp": r_emp["batch_fisher_trace"],
                                   "batch_fisher_true_hutchinson": math.nan if r_hut is None else
                                   r_hut["batch_fisher_trace"]})
                if self.mon.scheduled(step):
                    rec = self.record(step)
                    bar.set_postfix(loss=f"{rec['probe_token_loss']:.3f}")
                else:
                    self.mon.step()
                self.monitor_seconds += time.perf_counter() - tm
                bar.update(1)
        model.eval()
        for m in (self.mon, self.mon_step, self.mon_hutch):
            m.close()


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def _rel_err(est: Tensor, exact: Tensor) -> float:
    return float((est.double() - exact.double()).norm() / exact.double().norm())


def _compare_diag(est: Tensor, err: Tensor, exact: Tensor) -> dict[str, float]:
    """Hutchinson diagonal ``est`` (its standard errors ``err``) vs the exact ``exact``."""
    est, err, exact = est.double().flatten(), err.double().flatten(), exact.double().flatten()
    return {"n": exact.numel(), "pearson": _pearson(est, exact), "rel_err": _rel_err(est, exact),
            # what the relative error should be from the estimator's own standard errors
            "rel_err_expected": float(err.square().sum().sqrt() / exact.norm()),
            # root-mean-square z-score of the entries with a positive stderr (≈ 1 for unbiased draws)
            "rms_z": float(((est - exact)[err > 0] / err[err > 0]).square().mean().sqrt()),
            "sum_ratio": float(est.sum() / exact.sum())}


def select_few(Y: Tensor, n: int) -> Tensor:
    """Indices of the "few sequences" among labels ``Y (N, T)``: the first ``⌈n/2⌉`` complete sequences and the
    first ``⌊n/2⌋`` padded ones (the last windows of documents), so that the kept-token count varies; where one
    kind runs short, the other fills in.  Sorted."""
    full = (Y != IGNORE).all(1)
    a, b = torch.nonzero(full).flatten(), torch.nonzero(~full).flatten()
    n_pad = min(n // 2, len(b))
    n_full = min(n - n_pad, len(a))
    n_pad = min(n - n_full, len(b))
    return torch.cat([a[:n_full], b[:n_pad]]).sort().values


def analyse(cfg: LmFisherConfig, model: nn.Module, probe: tuple[Tensor, Tensor], lap=None) -> dict:
    """The post-training measurements of the study (module docstring) on the probe set ``(X, Y)``.

    Returns a dict: ``layers`` (exact true-Fisher trace per parameter tensor, ``reduction="mean"``), ``trace``,
    ``kept`` (mean kept tokens per probe sequence), the empirical trace in the three reductions ``emp_*``; on the
    few sequences (:func:`select_few`) ``few_kept``, the exact diagonal ``diag_exact``, the Hutchinson diagonal
    ``diag_hutchinson`` / ``diag_stderr`` and, from the same draws, ``hutchinson_per_token``
    (``reduction="per_prediction"``); on two of them (one complete, one padded) ``pair_kept``, the exact diagonal
    ``pair_diag`` and ``pair_diag_per_token``, and ``naive_dev`` against :func:`naive_true_diag`; the top
    eigenvalues ``eigenvalues`` (diagonals as ``{name: flat float64 tensor}``).  ``lap(name)`` (optional) is
    called after each phase.
    """
    lap = lap or (lambda name: None)
    lik = fl.Categorical()
    X, Y = probe
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out: dict = {"names": names, "kept": kept_per_sequence(Y), "n_probe": len(X)}

    layers = fl.fisher_blocks(model, probe, lik, what="trace")
    out["layers"] = {n: float(layers[n]) for n in names}
    out["trace"] = math.fsum(out["layers"].values())
    lap("per-layer traces")
    for r in ("mean", "per_prediction", "sum"):
        out[f"emp_{r}"] = float(fl.fisher_trace(model, probe, lik, kind="empirical", reduction=r))

    idx = select_few(Y, cfg.n_exact)
    few = (X[idx], Y[idx])
    out["few_kept"], out["few_index"] = kept_per_sequence(few[1]), idx.tolist()
    flat = lambda d, attr=None: {n: (getattr(d[n], attr) if attr else d[n]).detach().double().flatten()  # noqa: E731
                                 for n in names}
    out["diag_exact"] = flat(fl.fisher_blocks(model, few, lik, what="diag"))
    lap("exact diagonal")
    for r in ("mean", "per_prediction"):  # the same draws (same seed) in both normalisations
        hut = fl.fisher_blocks(model, few, lik, what="diag", method="hutchinson", samples=cfg.hutchinson_samples,
                               generator=_generator(model, cfg.seed + 4), reduction=r)
        if r == "mean":
            out["diag_hutchinson"], out["diag_stderr"] = flat(hut, "value"), flat(hut, "stderr")
        else:
            out["hutchinson_per_token"] = flat(hut, "value")
    lap("hutchinson diagonal")

    two = select_few(few[1], 2)  # one complete and one padded sequence of the few
    pair = (few[0][two], few[1][two])
    out["pair_kept"] = kept_per_sequence(pair[1])
    ref = naive_true_diag(model, *pair)
    out["pair_diag"] = flat(fl.fisher_blocks(model, pair, lik, what="diag"))
    out["pair_diag_per_token"] = flat(fl.fisher_blocks(model, pair, lik, what="diag", reduction="per_prediction"))
    out["naive_dev"] = max(_rel_err(out["pair_diag"][n], ref[n].flatten()) for n in names if ref[n].norm() > 0)
    lap("naive check and normalisation")

    out["eigenvalues"] = [float(v) for v in fl.eigenvalues(model, probe, lik, k=cfg.eig_k, method="lanczos")]
    lap("eigenvalues")
    return out


def hutchinson_table(r: dict) -> dict[str, dict[str, float]]:
    """Hutchinson vs exact diagonal per layer (:func:`layer_group`) and over all parameters (key ``"all"``)."""
    groups = {"all": r["names"], **_groups(r["names"])}
    cat = lambda key, ns: torch.cat([r[key][n] for n in ns])  # noqa: E731
    return {g: _compare_diag(cat("diag_hutchinson", ns), cat("diag_stderr", ns), cat("diag_exact", ns))
            for g, ns in groups.items()}


def checks(r: dict) -> dict[str, float]:
    """The study's consistency checks as relative deviations (the summary's table; the tests assert them).

    * ``ratio``: on the pair (one complete, one padded sequence), every entry of the exact diagonal per sequence
      (``reduction="mean"``) over the one per token (``"per_prediction"``) against their mean kept tokens per
      sequence (largest deviation); ``ratio_trace``: the same for the sums (tr F);
    * ``ratio_hutchinson``: the same, every entry, for the Hutchinson diagonal of the few sequences (same draws);
    * ``ratio_empirical``: empirical-Fisher trace on the probe, per sequence / per token, against the probe's
      mean kept tokens; ``sum_empirical``: its ``reduction="sum"`` against N × the per-sequence trace;
    * ``naive``: the library's exact diagonal against the naive float64 loop (:func:`naive_true_diag`, the pair);
    * ``lambda_max``: ``max(0, λ_max − tr F) / tr F`` on the probe (0 when λ_max ≤ tr F).
    """
    names = r["names"]

    def worst(a: dict, b: dict, kept: float) -> float:
        x, y = torch.cat([a[n] for n in names]), torch.cat([b[n] for n in names])
        nz = y != 0
        return float(((x[nz] / y[nz]) / kept - 1).abs().max())

    d, t = (math.fsum(float(v.sum()) for v in r[k].values()) for k in ("pair_diag", "pair_diag_per_token"))
    return {
        "ratio": worst(r["pair_diag"], r["pair_diag_per_token"], r["pair_kept"]),
        "ratio_trace": rel_dev(d / t, r["pair_kept"]),
        "ratio_hutchinson": worst(r["diag_hutchinson"], r["hutchinson_per_token"], r["few_kept"]),
        "ratio_empirical": rel_dev(r["emp_mean"] / r["emp_per_prediction"], r["kept"]),
        "sum_empirical": rel_dev(r["emp_sum"], r["emp_mean"] * r["n_probe"]),
        "naive": r["naive_dev"],
        "lambda_max": max(0.0, r["eigenvalues"][0] - r["trace"]) / r["trace"],
    }


#: tolerance of every check (float32 accumulation), except λ_max ≤ tr F (exact inequality).
CHECK_TOL = 1e-4


class LmFisher(Study):
    """The Fisher information of a small causal transformer LM on Python's docstrings (module docstring)."""

    name = "lm-fisher"
    description = ("Fisher information of a causal character-level transformer LM (outputs (B, T, V)) trained on "
                   "the standard library's docstrings with fl.Monitor on: per-layer traces, Hutchinson vs exact "
                   "diagonal, top eigenvalues, per-token vs per-sequence normalisation.")
    Config = LmFisherConfig

    def setup(self, cfg: LmFisherConfig) -> Inputs:
        return load_inputs(cfg)  # before the folder exists: a module that does not import leaves no trace

    def config_json(self, cfg: LmFisherConfig, inputs: Inputs) -> dict:
        d = dataclasses.asdict(cfg)
        d.pop("data")
        return {"experiment": self.name, **d, "modules": list(cfg.modules),
                "python": platform.python_version_tuple()[0] + "." + platform.python_version_tuple()[1],
                "corpus": "docstrings of the Python standard library", "optimizer": "Adam",
                "likelihood": "Categorical (ignore_index=-100)"}

    def compute(self, cfg: LmFisherConfig, run: StudyRun) -> dict:
        for stale in ("metrics.csv", "steps.csv"):  # a rerun of the same config starts its tables afresh
            run.file(stale).unlink(missing_ok=True)
        inputs: Inputs = run.inputs
        V = inputs.vocab.size
        notes: dict[str, int] = {}
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
            torch.manual_seed(cfg.seed)
            model = CharTransformer(V, cfg.seq_len, cfg.d_model, cfg.heads, cfg.layers, cfg.d_ff)
        model.to(cfg.device).eval()
        inputs = dataclasses.replace(inputs, **{k: tuple(t.to(cfg.device) for t in getattr(inputs, k))
                                                for k in ("train", "test", "probe")})
        with _engine_notes(notes):
            eig0 = [float(v) for v in fl.eigenvalues(model, inputs.probe, fl.Categorical(), k=cfg.eig_k,
                                                    method="lanczos")]
            run.lap("eigenvalues at initialisation")
            tr = _Training(cfg, run, model, inputs)
            tr.train()
            run.lap("training")
            run.write_csv("steps.csv", tr.steps, STEP_COLUMNS)
            r = analyse(cfg, model, inputs.probe, run.lap)
        P = sum(p.numel() for p in model.parameters())
        r.update(eig0=eig0, rows=tr.mon.records, steps=tr.steps, monitor_seconds=tr.monitor_seconds, P=P, V=V,
                 unigram=unigram_entropy(inputs.train[1], V), notes=notes, batch_params=tr.batch_params)
        r["hutchinson"], r["checks"] = hutchinson_table(r), checks(r)
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        run.write_csv("layers.csv", [{"parameter": n, "layer": layer_group(n), "numel": sizes[n],
                                      "trace": v, "share": v / r["trace"]} for n, v in r["layers"].items()])
        run.write_csv("hutchinson.csv", [{"layer": g, **s} for g, s in r["hutchinson"].items()])
        run.write_csv("eigenvalues.csv", [{"i": i + 1, "initialisation": a, "trained": b}
                                          for i, (a, b) in enumerate(zip(eig0, r["eigenvalues"], strict=True))])
        scalars = {k: r[k] for k in ("P", "V", "trace", "kept", "few_kept", "few_index", "pair_kept", "n_probe",
                                     "emp_mean", "emp_per_prediction", "emp_sum", "naive_dev", "eigenvalues", "eig0",
                                     "unigram", "checks")}
        for k in ("pair_diag", "pair_diag_per_token", "diag_exact", "diag_hutchinson", "hutchinson_per_token"):
            scalars[f"{k}_sum"] = math.fsum(float(v.sum()) for v in r[k].values())
        scalars["final"] = {k: v for k, v in r["rows"][-1].items()}
        run.write_text("results.json", json.dumps(scalars, indent=1) + "\n")
        return r

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        cfg = run.cfg
        _fig_training(run.file("lm_fisher_training.png"), r)
        plots.bar_plot(run.file("lm_fisher_layers.png"), _group_traces(r["layers"]), log=True,
                       ylabel="true-Fisher trace (per sequence)",
                       title=f"Per-layer Fisher trace after {cfg.steps} steps ({r['n_probe']} probe sequences)")
        g = _groups(r["names"])
        plots.diag_scatter(run.file("lm_fisher_hutchinson.png"),
                           {k: torch.cat([r["diag_exact"][n] for n in ns]) for k, ns in g.items()},
                           {k: torch.cat([r["diag_hutchinson"][n] for n in ns]) for k, ns in g.items()},
                           title=f"Fisher diagonal on {len(r['few_index'])} sequences:\nHutchinson "
                                 f"({cfg.hutchinson_samples} draws) vs exact",
                           xlabel="exact", ylabel="Hutchinson", seed=cfg.seed)
        _fig_spectrum(run.file("lm_fisher_spectrum.png"), r)
        return FIGURES

    def report(self, r: dict, run: StudyRun) -> str:
        return _summary(run.cfg, run.inputs, r, run)


def lm_fisher(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True,
              **options) -> Path:
    """Train a small causal transformer LM on Python's docstrings and measure its Fisher information.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (T = 16, a 32-wide model, 30 steps).
        seed: seeds the split, the initialisation, the batch order and every random estimate.
        progress: show a tqdm bar over training steps.
        **options: the fields of :class:`LmFisherConfig` (``steps``, ``seq_len``, ``d_model``, ...).

    Returns:
        The run folder: ``config.json``, ``metrics.csv`` (probe records of the monitor), ``steps.csv`` (one row per
        training step), ``layers.csv``, ``hutchinson.csv``, four PNGs and ``summary.md``.
    """
    return run_study(LmFisher, out, quick, seed, progress=progress, **options)


# ----------------------------------------------------------------------------- figures
def _group_traces(layers: dict[str, float]) -> dict[str, float]:
    return {g: math.fsum(layers[n] for n in ns) for g, ns in _groups(list(layers)).items()}


def _fig_training(path: Path, r: dict) -> None:
    rows, steps = r["rows"], r["steps"]
    x = [row["step"] for row in rows]
    xs = [s["step"] for s in steps]
    w = max(1, len(steps) // 40)
    fig = Figure(figsize=(6.8, 7.0))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(xs, [s["token_loss"] for s in steps], color="0.75", lw=0.6, label="training batch (every step)")
    ax1.plot(x, [row["probe_token_loss"] for row in rows], "s-", ms=3, label="probe")
    ax1.plot(x, [row["test_token_loss"] for row in rows], "^-", ms=3, label="test")
    ax1.axhline(r["unigram"], color="k", ls=":", lw=1, label="unigram entropy")
    ax1.set_ylabel("cross-entropy per token (nats)")
    ax1.set_title("Training a causal character transformer on Python's docstrings")
    ax1.legend(fontsize=8)
    emp = [s["batch_fisher_emp"] for s in steps]
    hs = [(s["step"], v) for s in steps if math.isfinite(v := s["batch_fisher_true_hutchinson"])]
    xh, hut = [a for a, _ in hs], [b for _, b in hs]
    wh = max(1, len(hut) // 40)
    ax2.plot(xs, emp, color="C1", alpha=0.25, lw=0.5)
    ax2.plot(xh, hut, color="C0", alpha=0.25, lw=0.5)
    ax2.plot(xs, _moving_average(emp, w), color="C1", lw=1.5,
             label=f"batch (all but attention), empirical, exact (mean of {w})")
    ax2.plot(xh, _moving_average(hut, wh), color="C0", lw=1.5,
             label=f"batch (all but attention), true, 1-draw Hutchinson (mean of {wh})")
    ax2.plot(x, [row["fisher_trace"] for row in rows], "s", color="C2", ms=4, mfc="none",
             label="probe, true, Hutchinson (monitor)")
    ax2.plot([x[-1]], [r["trace"]], "*", color="C3", ms=10, label="probe, true, exact (end)")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tr F (per sequence)")
    ax2.legend(fontsize=7)
    plots.save_png(fig, path)


def _fig_spectrum(path: Path, r: dict) -> None:
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot()
    k0, k1 = np.arange(1, len(r["eig0"]) + 1), np.arange(1, len(r["eigenvalues"]) + 1)
    ax.semilogy(k0, r["eig0"], "o-", ms=4, label="initialisation")
    ax.semilogy(k1, r["eigenvalues"], "s-", ms=4, label="after training")
    ax.axhline(r["rows"][0]["fisher_trace"] / r["P"], color="C0", ls=":", lw=1,
               label="mean eigenvalue tr F / P (initialisation, Hutchinson)")
    ax.axhline(r["trace"] / r["P"], color="C1", ls=":", lw=1, label="mean eigenvalue tr F / P (end, exact)")
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i (Lanczos)")
    ax.set_title("Top Fisher eigenvalues on the probe set")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    plots.save_png(fig, path)


# ----------------------------------------------------------------------------- summary
def _ok(ok: bool) -> str:
    return "ok" if ok else "**CHECK**"


def _summary(cfg: LmFisherConfig, inputs: Inputs, r: dict, run: StudyRun) -> str:
    rows, steps = r["rows"], r["steps"]
    first, last = rows[0], rows[-1]
    docs, vocab = inputs.docs, inputs.vocab
    text = "".join(docs)
    chars = set(vocab.chars)
    covered = sum(c in chars for c in text) / len(text)
    chk, h, kept = r["checks"], r["hutchinson"], r["kept"]
    groups = _group_traces(r["layers"])
    top = max(groups, key=groups.get)
    fisher = [row["fisher_trace"] for row in rows]
    peak = int(np.argmax(fisher))
    lam, lam0 = r["eigenvalues"], r["eig0"]
    emp_steps = [s["batch_fisher_emp"] for s in steps]
    hut_steps = [s["batch_fisher_true_hutchinson"] for s in steps if math.isfinite(s["batch_fisher_true_hutchinson"])]
    hut_ratio = [s["batch_fisher_true_hutchinson"] / s["batch_fisher_emp"] for s in steps
                 if math.isfinite(s["batch_fisher_true_hutchinson"])]
    n_few = len(r["few_index"])
    pair_tr, pair_tok, hut_tr, hut_tok = (math.fsum(float(v.sum()) for v in r[k].values()) for k in (
        "pair_diag", "pair_diag_per_token", "diag_hutchinson", "hutchinson_per_token"))
    P_batch = sum(int(r["diag_exact"][n].numel()) for n in r["batch_params"])
    lin_share = math.fsum(r["layers"][n] for n in r["batch_params"]) / r["trace"]
    L = [
        "# lm-fisher: the Fisher information of a causal transformer language model",
        "",
        f"Corpus: the docstrings of {len(cfg.modules)} modules of the standard library of Python "
        f"{platform.python_version()} ({len(docs)} documents, {len(text):,} characters, sha256 "
        f"`{corpus_digest(docs)[:16]}…`; the corpus changes with the Python version). Vocabulary: the "
        f"{len(vocab.chars)} most frequent characters ({covered:.2%} of the text) and an unknown token, "
        f"V = {vocab.size}. Sequences: T = {cfg.seq_len} next-token predictions per window of a document, the last "
        f"window of each document padded (label -100): {inputs.n_sequences:,} sequences, "
        f"{len(inputs.test[0])} held out, {len(inputs.train[0]):,} for training.",
        "",
        f"Model: causal transformer, d_model {cfg.d_model}, {cfg.heads} heads, {cfg.layers} pre-norm encoder layers "
        f"(feed-forward {cfg.d_ff}, no dropout), learned positions, P = {r['P']:,} parameters; logits (B, T, V). "
        f"Adam lr {cfg.lr:g}, {cfg.steps} steps of {cfg.batch_size} sequences, seed {cfg.seed}"
        f"{' (quick mode)' if cfg.quick else ''}; training loss = next-token cross-entropy averaged over the "
        "batch's kept tokens.",
        "",
        f"Fisher: the true Fisher of `fl.Categorical()` on the logits; a sequence's Fisher is the sum over its kept "
        f"positions, averaged over sequences. Probe set: {r['n_probe']} training sequences ({kept:.2f} kept tokens "
        f"per sequence on average).",
        "",
        "## Training",
        "",
        f"Per-token loss: test {first['test_token_loss']:.3f} → {last['test_token_loss']:.3f} nats/char "
        f"({last['test_token_loss'] / math.log(2):.2f} bits/char; a context-free predictor needs the unigram entropy "
        f"{r['unigram']:.3f}, a uniform guess log V = {math.log(vocab.size):.3f}); probe "
        f"{first['probe_token_loss']:.3f} → {last['probe_token_loss']:.3f}.",
        "",
        f"Fisher trace on the probe set (`fl.Monitor`, Hutchinson with {cfg.monitor_draws} draws per record, "
        f"{len(rows)} records): {fisher[0]:.4g} at initialisation, {fisher[-1]:.4g} at the end (exact: "
        f"{r['trace']:.4g}; ×{r['trace'] / fisher[0]:.3g} over training), "
        + ("largest at the end." if peak == len(fisher) - 1 else
           f"largest {fisher[peak]:.4g} at step {rows[peak]['step']}."),
        f"Training-batch traces at every step (`batch_fisher_trace` over every parameter but the attention's: "
        f"{P_batch:,} of the {r['P']:,} parameters, {lin_share:.1%} of the final probe trace): exact empirical "
        f"{emp_steps[0]:.4g} at step 1, "
        f"{emp_steps[-1]:.4g} at step {steps[-1]['step']}, median {float(np.median(emp_steps)):.4g}; true Fisher "
        f"by one-draw Hutchinson every {cfg.batch_true_every} steps, median {float(np.median(hut_steps)):.4g} "
        f"(true / empirical over those steps: median {float(np.median(hut_ratio)):.3g}).",
        "",
        "## Per-layer Fisher traces (after training, probe set)",
        "",
        "| layer | tr F block | share | per token |",
        "|---|---|---|---|",
        *(f"| {g} | {v:.4g} | {v / r['trace']:.1%} | {v / kept:.4g} |" for g, v in groups.items()),
        f"| **total** | {r['trace']:.4g} | 100% | {r['trace'] / kept:.4g} |",
        "",
        f"The largest share is the {top}'s ({groups[top] / r['trace']:.1%}). Per parameter tensor: "
        "[layers.csv](layers.csv).",
        "",
        f"## Hutchinson vs exact diagonal ({n_few} sequences, {cfg.hutchinson_samples} Rademacher draws)",
        "",
        "| layer | entries | Pearson r | ‖d̂ − d‖/‖d‖ | expected from the stderr | rms z | Σ d̂ / Σ d |",
        "|---|---|---|---|---|---|---|",
        *(f"| {'**all**' if g == 'all' else g} | {s['n']:,} | {s['pearson']:.4f} | {s['rel_err']:.3g} | "
          f"{s['rel_err_expected']:.3g} | {s['rms_z']:.3f} | {s['sum_ratio']:.4f} |"
          for g, s in [*list(h.items())[1:], ("all", h["all"])]),
        "",
        "\"Expected\" is √(Σ stderr²)/‖d‖, the error the estimator's own standard errors predict, and rms z the "
        "root-mean-square of (d̂ − d)/stderr over the entries: unbiased draws with honest standard errors give "
        "errors near the expected ones and rms z ≈ 1. Table: [hutchinson.csv](hutchinson.csv).",
        "",
        f"## Top {len(lam)} eigenvalues (Lanczos, probe set)",
        "",
        f"| | λ_1 | λ_2 | λ_{len(lam)} | λ_1 / λ_{len(lam)} | λ_1 / tr F | Σ top-{len(lam)} / tr F |",
        "|---|---|---|---|---|---|---|",
        f"| initialisation | {lam0[0]:.4g} | {lam0[1]:.4g} | {lam0[-1]:.4g} | {lam0[0] / lam0[-1]:.3g} | "
        f"{lam0[0] / fisher[0]:.3g} | {sum(lam0) / fisher[0]:.3g} |",
        f"| after training | {lam[0]:.4g} | {lam[1]:.4g} | {lam[-1]:.4g} | {lam[0] / lam[-1]:.3g} | "
        f"{lam[0] / r['trace']:.3g} | {sum(lam) / r['trace']:.3g} |",
        "",
        f"At initialisation tr F is the monitor's Hutchinson estimate, at the end the exact value. The mean eigenvalue "
        f"at the end is tr F / P = {r['trace'] / r['P']:.3g}; λ_1 is {lam[0] / (r['trace'] / r['P']):,.0f} times "
        "that. Table: [eigenvalues.csv](eigenvalues.csv).",
        "",
        "## Per-token vs per-sequence normalisation",
        "",
        f"`reduction=\"mean\"` (per sequence, the library's convention) against `reduction=\"per_prediction\"` (per "
        "kept token, what `F.cross_entropy` averages over): their ratio must be the mean number of kept tokens per "
        f"sequence. Exact true Fisher on two sequences (one complete, one padded; {r['pair_kept']:.4g} kept tokens "
        f"per sequence): tr F = {pair_tr:.6g} vs {pair_tok:.6g}, ratio {pair_tr / pair_tok:.6g} (relative deviation "
        f"{chk['ratio_trace']:.1e}; entry by entry at most {chk['ratio']:.1e}). Hutchinson diagonal on the {n_few} "
        f"sequences ({r['few_kept']:.4g} kept tokens per sequence; same draws): ratio {hut_tr / hut_tok:.6g}. "
        f"Empirical Fisher on the probe set: {r['emp_mean']:.6g} / {r['emp_per_prediction']:.6g} = "
        f"{r['emp_mean'] / r['emp_per_prediction']:.6g} against {kept:.6g} kept tokens per sequence. Per token, the "
        f"final probe trace is {r['trace'] / kept:.4g}.",
        "",
        "## Consistency checks",
        "",
        "| check | rel. deviation | |",
        "|---|---|---|",
        f"| exact diag F per sequence / per token = mean kept tokens, every entry (2 sequences, one padded) | "
        f"{chk['ratio']:.1e} | {_ok(chk['ratio'] < CHECK_TOL)} |",
        f"| the same for tr F | {chk['ratio_trace']:.1e} | {_ok(chk['ratio_trace'] < CHECK_TOL)} |",
        f"| the same, Hutchinson diagonal, every entry ({n_few} sequences) | {chk['ratio_hutchinson']:.1e} | "
        f"{_ok(chk['ratio_hutchinson'] < CHECK_TOL)} |",
        f"| the same, empirical Fisher trace, probe set | {chk['ratio_empirical']:.1e} | "
        f"{_ok(chk['ratio_empirical'] < CHECK_TOL)} |",
        f"| `reduction=\"sum\"` = N × per-sequence trace (empirical, probe) | {chk['sum_empirical']:.1e} | "
        f"{_ok(chk['sum_empirical'] < CHECK_TOL)} |",
        f"| exact diagonal vs a naive float64 autograd loop (the same 2 sequences) | {chk['naive']:.1e} | "
        f"{_ok(chk['naive'] < CHECK_TOL)} |",
        f"| λ_max ≤ tr F (probe) | {chk['lambda_max']:.1e} | {_ok(chk['lambda_max'] == 0)} |",
        "",
        *figures_section(run.figures),
        "Probe records: [metrics.csv](metrics.csv); per training step: [steps.csv](steps.csv); numbers: "
        "[results.json](results.json); settings: [config.json](config.json).",
        "",
        "## Run",
        "",
        f"{run.elapsed():.1f} s wall time (torch threads: {cfg.threads}): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in run.laps.items())
        + f". Of the training, {r['monitor_seconds']:.1f} s went to the monitors' step/record calls (the batch "
        "monitors' hooks run inside the training forward and backward and count as training).",
    ]
    if r["notes"]:
        L += ["", "Engine notes (warnings collected, not shown): "
              + "; ".join(f"{k} ({n}×)" for k, n in r["notes"].items()) + "."]
    return "\n".join(L) + "\n"
