"""Shared primitives: functional model, data streaming, the Fisher "sandwich", per-sample factor rows.

Every Fisher-type object in fisherlens is a reduction of the per-sample *factor rows*

    G_n = V_nᵀ J_n ∈ R^{K×P},   J_n = ∂f_θ(x_n)/∂θ ∈ R^{C×P},   V_n ∈ R^{C×K},

with the *sandwich* ``V_n`` chosen by the kind (SCIENCE §3):

* ``true``       V_n = S_n, a square root of Λ(f_n)       (K = C),
* ``empirical``  V_n = r_n = ∂ℓ/∂f at the observed label   (K = 1),
* ``mc``         V_n = [r_n(ŷ_1) … r_n(ŷ_k)]/√k, ŷ ~ p(y|f_n)  (K = k),
* NTK            V_n = I                                   (K = C),

so that ``F = (1/N) Σ_n G_nᵀ G_n``.  Index letters in einsums: ``k`` sandwich column, ``b`` sample,
``o`` layer output, ``i`` layer input, ``l`` spatial location.

Two engines produce the per-batch statistics (diag Σ G², per-sample Gram G Gᵀ, or the rows G):

* **layerwise** (fast): for parameters owned by ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` the rows are
  outer products of the layer input ``a_b`` and the back-propagated output gradient ``g_kb``.  One forward
  and one backward pass batched over the K columns (``autograd.grad(..., is_grads_batched=True)``, i.e.
  ``vmap`` over cotangents) give all ``g``; for a layer used once on a ``(B, I)`` input diag and Gram
  follow without materialising rows (``Σ g²a²``, ``(g_k·g_l)‖a‖²``).  The attribution is verified once per
  model/input signature against autograd (a parameter also used outside its layer falls back).
* **functional** (general): ``torch.func.vmap`` over samples of ``torch.func.vjp`` of the functional model,
  itself vmapped over the K columns — any module ``functional_call`` supports.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .likelihoods import Likelihood

Tensor = torch.Tensor

KINDS = ("true", "empirical", "mc")
REDUCTIONS = ("mean", "sum")
ENGINES = ("auto", "layerwise", "functional")

#: working-memory budget (bytes) for per-sample rows in one chunk; results are never chunked away.
WORK_BUDGET = 512 * 2**20


# ----------------------------------------------------------------------------- validation helpers
def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def check_kind(likelihood, kind: str) -> None:
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a fisherlens output model such as fl.Categorical(), fl.Gaussian(sigma), "
            f"fl.Bernoulli() or fl.LossInduced(loss); got {likelihood!r}."
        )
    check_choice("kind", kind, KINDS)
    if kind != "empirical" and not likelihood.has_fisher:
        raise ValueError(
            f"{likelihood!r} defines only the empirical Fisher (its normaliser is unknown, so neither the "
            f"true Fisher nor label sampling exists); use kind='empirical', or an output model such as "
            "fl.Gaussian()/fl.Categorical() for kind='true'/'mc'."
        )


def available_memory() -> int:
    """Bytes of memory currently available (Linux ``sysconf``; a generous guess elsewhere)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def check_dense(what: str, numel: int, itemsize: int, alternative: str, max_memory: int | None) -> None:
    """Refuse, before allocating, a dense result that would not fit in memory."""
    need = numel * itemsize
    limit = max_memory if max_memory is not None else available_memory() // 2
    if need > limit:
        raise ValueError(
            f"{what} would need {need / 2**30:.2f} GiB but only {limit / 2**30:.2f} GiB may be used. "
            f"{alternative} (or pass max_memory=bytes to raise the limit)."
        )


# ----------------------------------------------------------------------------- functional model
def _module_prefix_match(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


class FunctionalModel:
    """A module seen as a function ``f(p, x) -> (B, C)`` of the selected parameters ``p`` (a dict).

    ``params`` selects a subset by parameter name, module-name prefix or tensor identity;
    default: all parameters with ``requires_grad``.  Flat vectors follow ``named_parameters()`` order.
    """

    def __init__(self, model: nn.Module, params=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    f"Module '{name or type(m).__name__}' is a BatchNorm layer in training mode, which mixes "
                    "the samples of a batch, so per-sample Fisher quantities are undefined. Call model.eval() first."
                )
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(
                    f"Module '{name or type(m).__name__}' is Dropout in training mode, which makes the model "
                    "random. Call model.eval() first."
                )
        self.model = model
        named = dict(model.named_parameters())
        if not named:
            raise ValueError("The model has no parameters.")
        if params is None:
            chosen = [n for n, p in named.items() if p.requires_grad]
            if not chosen:
                raise ValueError("No parameter of the model requires grad; pass params= to choose some.")
        else:
            items = [params] if isinstance(params, (str, Tensor)) else list(params)
            if not items:
                raise ValueError("params= is empty; pass names or tensors of the model's parameters.")
            by_id = {id(p): n for n, p in named.items()}
            wanted = set()
            for it in items:
                if isinstance(it, Tensor):
                    if id(it) not in by_id:
                        raise ValueError("A tensor in params= is not a parameter of this model.")
                    wanted.add(by_id[id(it)])
                elif isinstance(it, str):
                    hits = [n for n in named if _module_prefix_match(n, it)]
                    if not hits:
                        raise ValueError(
                            f"params= names {it!r}, which is neither a parameter nor a module of the model. "
                            f"Parameters: {', '.join(named)}."
                        )
                    wanted.update(hits)
                else:
                    raise TypeError(f"params= entries must be names or parameter tensors, got {type(it).__name__}.")
            chosen = [n for n in named if n in wanted]
        self.names: list[str] = chosen
        self.tensors: dict[str, Tensor] = {n: named[n] for n in chosen}
        if not torch.isfinite(torch.stack([p.detach().sum() for p in self.tensors.values()])).all():
            for n, p in self.tensors.items():  # name the culprit (a finite overflow of the sum is fine)
                if not torch.isfinite(p).all():
                    raise ValueError(f"Parameter '{n}' contains NaN or inf; the Fisher is undefined there.")
        self.params: dict[str, Tensor] = {n: p.detach() for n, p in self.tensors.items()}
        #: the other parameters, detached, so that no result stays attached to the model's autograd graph
        self.frozen: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if n not in self.tensors}
        self.shapes = {n: p.shape for n, p in self.params.items()}
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.P = sum(self.sizes.values())
        first = next(iter(self.params.values()))
        self.dtype, self.device, self.itemsize = first.dtype, first.device, first.element_size()
        # torch.func.functional_call does not restore the parameters of a module that occurs twice in the module
        # tree (e.g. nn.Sequential(lin, act, lin)): they come back as plain tensors and drop out of
        # named_parameters().  Remember them, and put them back after every call.
        count: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            count[id(m)] = count.get(id(m), 0) + 1
        self._restore = [
            (store, k, t)
            for _, m in model.named_modules()
            if count[id(m)] > 1
            for store in (m._parameters, m._buffers)
            for k, t in store.items()
            if t is not None
        ]

    def __call__(self, p: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(B, C)`` for inputs ``x (B, ...)``; a 1-D output is taken as ``C = 1``."""
        try:
            out = functional_call(self.model, {**self.frozen, **p}, (x,))
        finally:
            for store, k, t in self._restore:
                store[k] = t
        if not isinstance(out, Tensor):
            raise TypeError(f"The model must return a tensor of outputs (batch, C); it returned {type(out).__name__}.")
        if out.dim() == 1:
            out = out[:, None]
        elif out.dim() != 2:
            raise ValueError(
                f"The model must map a batch to outputs of shape (batch, C); got {tuple(out.shape)}. "
                "Flatten extra output dimensions in a wrapper module."
            )
        return out

    def flatten(self, d: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors (with ``lead`` leading batch dims) into ``(..., P)``."""
        return torch.cat([d[n].reshape(*d[n].shape[:lead], -1) for n in self.names], dim=-1)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        if v.shape[-1] != self.P:
            raise ValueError(f"Expected a vector of length P={self.P}, got {tuple(v.shape)}.")
        out, i = {}, 0
        for n in self.names:
            out[n] = v[..., i : i + self.sizes[n]].reshape(*v.shape[:-1], *self.shapes[n])
            i += self.sizes[n]
        return out


# ----------------------------------------------------------------------------- data streaming
def _is_xy(data) -> bool:
    """Whether ``data`` is one ``(X, Y)`` pair of tensors (a tuple; a list of two tensors only when the second
    cannot be a batch of inputs like the first)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)):
        return False
    X, Y = data
    if Y is not None and not isinstance(Y, Tensor):
        return False
    if isinstance(data, list) and Y is not None and Y.shape[1:] == X.shape[1:] and Y.dtype == X.dtype:
        raise ValueError(
            "data=[A, B] is ambiguous: two tensors of the same shape and dtype may be two batches of inputs or one "
            "(X, Y) pair. Pass a tuple (X, Y) for inputs with targets, or [(A,), (B,)] for two unlabelled batches."
        )
    return True


def _split_batch(batch):
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) == 2 else None
        if y is not None and not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        return batch[0], y
    raise TypeError(
        f"Each batch must be a tensor X or a pair (X, Y) of tensors; got {type(batch).__name__}. "
        "Wrap dict-style datasets to return (X, Y)."
    )


def _slices(X: Tensor, Y: Tensor | None, bs: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    for i in range(0, len(X) if X.dim() else 0, bs):
        yield X[i : i + bs], None if Y is None else Y[i : i + bs]


def _source(data, batch_size: int | None):
    """The batch iterable behind ``data`` (see :func:`iter_batches`)."""
    if isinstance(data, Tensor):
        data = (data, None)
    if _is_xy(data):
        X, Y = data
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"X has {len(X)} samples but Y has {len(Y)}; they must match.")
        return _slices(X, Y, batch_size or 256)
    if isinstance(data, torch.utils.data.DataLoader) and data.batch_size is None and data.batch_sampler is None:
        raise ValueError(
            "The DataLoader has batch_size=None (automatic batching off), so it yields single samples without a "
            "batch dimension. Give it a batch_size, e.g. DataLoader(dataset, batch_size=64)."
        )
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(data, batch_size=batch_size or 256, shuffle=False)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        return data
    raise TypeError(
        f"data must be a tuple (X, Y) of tensors, a torch Dataset or an iterable of (X, Y) batches; "
        f"got {type(data).__name__}."
    )


def iter_batches(data, fm: FunctionalModel, *, need_y: bool, batch_size: int | None = None) -> Iterator:
    """Yield ``(X, Y)`` batches on the model's device; floating ``X`` cast to the model's dtype.

    ``data`` is a tuple ``(X, Y)`` of tensors (split into chunks of ``batch_size``), a ``Dataset`` (read
    through a ``DataLoader``) or any iterable of batches (streamed: nothing is accumulated).  ``Y`` may be
    ``None`` unless ``need_y``.  Raises
    ``ValueError`` for empty data, mismatched lengths and non-finite inputs.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    seen = 0
    for batch in _source(data, batch_size):
        X, Y = _split_batch(batch)
        if X.dim() == 0 or len(X) == 0:
            continue
        if need_y and Y is None:
            raise ValueError("This quantity needs labels (e.g. kind='empirical'): pass data as (X, Y).")
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"A batch has {len(X)} inputs but {len(Y)} labels; they must match.")
        X = X.to(fm.device, fm.dtype) if torch.is_floating_point(X) else X.to(fm.device)
        if Y is not None:
            Y = Y.to(fm.device)
        seen += len(X)
        yield X, Y
    if seen == 0:
        raise ValueError("The data is empty: no samples to average over.")


@contextmanager
def differentiable_kernels():
    """Inside: ``nn.MultiheadAttention``'s fused fast path is off and ``scaled_dot_product_attention`` uses its
    math kernel, which forward-mode AD (``jvp``) and per-sample hooks can see through; restored on exit."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextmanager
def _model_errors(X: Tensor):
    """Turn the model's failures on a batch into a ValueError that names the input shape (or the real cause)."""
    try:
        with differentiable_kernels():
            yield
    except (RuntimeError, IndexError) as e:
        if "forward AD" in str(e):
            raise ValueError(
                f"A kernel of the model has no forward-mode derivative ({e}). fisherlens already switches "
                "attention to its differentiable math kernels; replace the remaining fused op (or use a view that "
                "needs no jvp: fl.fisher_diag, fl.fisher_trace, fl.eigenvalues(method='gram'))."
            ) from e
        raise ValueError(
            f"The model failed on a batch of inputs of shape {tuple(X.shape)} (dtype {X.dtype}): {e}. "
            "Check that the data matches the model's input shape."
        ) from e


def all_finite(t: Tensor) -> bool:
    """Whether a floating tensor has no NaN/inf: one sum (NaN and inf propagate), the elementwise test only when
    the sum is not finite (it may just overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def finite_result(what: str, value):
    """Return ``value`` (a tensor, a float or a dict of them) after checking it is finite: an overflow in the
    model's dtype (e.g. 1/σ⁴ of a tiny σ in float32) is refused, never returned as inf/NaN."""
    items = value.values() if isinstance(value, dict) else [value]
    for v in items:
        if not (all_finite(v) if isinstance(v, Tensor) else math.isfinite(v)):
            raise ValueError(
                f"{what} overflowed to inf/NaN in the model's dtype; compute in float64 (model.double()) or rescale "
                "the outputs (e.g. a larger sigma)."
            )
    return value


def check_inputs(X: Tensor) -> None:
    """Refuse NaN/inf in floating inputs (their Fisher is undefined, and they poison every check)."""
    if torch.is_floating_point(X) and not all_finite(X):
        raise ValueError("The inputs contain NaN or inf; the Fisher is undefined there. Clean the data first.")


def _check_outputs(f: Tensor, X: Tensor, dtype: torch.dtype) -> None:
    if not torch.is_floating_point(f):
        raise TypeError(f"The model returned {f.dtype} outputs; outputs must be floating point (logits, means).")
    if f.dtype != dtype:
        raise TypeError(
            f"The model returned {f.dtype} outputs but its parameters are {dtype}; make them agree "
            f"(e.g. model.to({dtype}) or drop the cast inside forward)."
        )
    if f.shape[0] != X.shape[0]:
        raise ValueError(f"The model returned {f.shape[0]} outputs for a batch of {X.shape[0]} inputs.")
    if not all_finite(f.detach()):
        raise ValueError("The model produced NaN or inf outputs on this data; the Fisher is undefined there.")


def forward_checked(fm: FunctionalModel, p, X: Tensor) -> Tensor:
    """``fm(p, X)`` with a clear error for inputs the model cannot take and for non-finite outputs."""
    check_inputs(X)
    with _model_errors(X):
        f = fm(p, X)
    _check_outputs(f, X, fm.dtype)
    return f


def vjp_checked(fm: FunctionalModel, X: Tensor):
    """``(f (B, C), pull)``: one forward kept for pull-backs ``u (B, C) -> ({name: Jᵀu},)`` (torch.func.vjp)."""
    check_inputs(X)
    with _model_errors(X):
        f, pull = vjp(lambda q: fm(q, X), fm.params)
    _check_outputs(f, X, fm.dtype)
    return f, pull


def jvp_checked(fm: FunctionalModel, X: Tensor, tangent: dict[str, Tensor], at: dict[str, Tensor] | None = None):
    """``(f (B, C), J t (B, C))`` for a tangent ``{name: tensor}`` (torch.func.jvp; vmap it over tangents), at the
    model's parameters or at ``at`` (same names).  Attention runs on its differentiable kernels."""
    check_inputs(X)
    with _model_errors(X):
        f, jt = jvp(lambda q: fm(q, X), (fm.params if at is None else at,), (tangent,))
    _check_outputs(f, X, fm.dtype)
    return f, jt


def quadratic_sum(fm: FunctionalModel, batches, likelihood: Likelihood, kind: str, v: dict[str, Tensor], *,
                  at: dict[str, Tensor] | None = None, samples: int = 1, generator=None) -> tuple[float, int]:
    """``(Σ_n ‖V_nᵀ J_n v‖², N)`` over ``(X, Y)`` batches: ``N · vᵀ F v`` matrix-free, one jvp per batch (at the
    model's parameters or at ``at``); F is never formed."""
    total, n = 0.0, 0
    for X, Y in batches:
        check_batch(fm, X)
        f, jt = jvp_checked(fm, X, v, at)
        V = sandwich(likelihood, kind, f, Y, samples, generator)
        total += torch.einsum("bck,bc->bk", V, jt).square().sum().item()
        n += len(X)
    return total, n


# ----------------------------------------------------------------------------- the sandwich V
def sandwich(likelihood: Likelihood, kind: str, f: Tensor, y, samples: int = 1, generator=None) -> Tensor:
    """The sandwich ``V (B, C, K)`` of the module doc, from detached outputs ``f (B, C)``."""
    f = f.detach()
    likelihood.check_outputs(f)
    if kind == "true":
        return likelihood.sqrt_fisher(f)
    if kind == "empirical":
        return likelihood.residual(f, likelihood.check_targets(f, y))[:, :, None]
    if kind == "mc":
        check_dense(f"kind='mc' with samples={samples} label draws for {len(f)} inputs", f.numel() * samples,
                    4 * f.element_size(), "Use fewer samples=, or method='hutchinson'", None)
        ys = likelihood.sample(f, samples, generator)  # (k, B, ...)
        fk = f.expand(samples, *f.shape).reshape(-1, f.shape[-1])
        r = likelihood.residual(fk, ys.reshape(-1, *ys.shape[2:]))
        return r.reshape(samples, *f.shape).permute(1, 2, 0) / math.sqrt(samples)
    raise ValueError(f"kind={kind!r}")


def identity_sandwich(f: Tensor) -> Tensor:
    """``V = I`` (the NTK): rows are the per-sample Jacobians."""
    return torch.eye(f.shape[-1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)


# ----------------------------------------------------------------------------- functional engine
def _owners(fm: FunctionalModel, names) -> str:
    """``'rnn' (RNN), 'head' (Linear)``: the modules that hold the parameters ``names``."""
    out: dict[str, str] = {}
    for n in names:
        path = n.rpartition(".")[0]
        out.setdefault(path or "<root>", type(fm.model.get_submodule(path)).__name__)
    return ", ".join(f"'{k}' ({v})" for k, v in out.items())


def functional_rows(fm: FunctionalModel, names: list[str], X: Tensor, V: Tensor) -> dict[str, Tensor]:
    """Per-sample factor rows ``G_bk = V_bkᵀ J_b`` for parameters ``names``: dict of ``(B, K, *shape)``.

    ``vmap`` over samples of a ``vjp`` that is itself ``vmap``-ed over the K sandwich columns.  Modules that
    ``vmap`` cannot batch over samples (``nn.RNN``/``LSTM``/``GRU``, ``.item()``, data-dependent control flow) get
    one ``vjp`` per sample instead — exact, with a one-time warning that names them and the cost.
    """
    fixed = {n: fm.params[n] for n in fm.names if n not in names}
    free = {n: fm.params[n] for n in names}

    def one(x: Tensor, v: Tensor) -> dict[str, Tensor]:
        _, pull = vjp(lambda q: fm({**fixed, **q}, x[None])[0], free)
        return vmap(lambda c: pull(c)[0], in_dims=1)(v)

    plan = _plan(fm)
    if not plan.loop:
        try:
            with differentiable_kernels():
                return vmap(one)(X, V)
        except RuntimeError as e:
            plan.loop = True
            warnings.warn(
                f"torch.func.vmap cannot batch this model over samples ({str(e).splitlines()[0][:160]}). "
                f"fisherlens computes the per-sample rows of {_owners(fm, names)} with one vjp per sample instead: "
                "exact, but about batch-size times slower than the batched engines.",
                stacklevel=4,
            )
    with _model_errors(X):
        per = [one(X[b], V[b]) for b in range(len(X))]
    return {n: torch.stack([r[n] for r in per]) for n in names}


# ----------------------------------------------------------------------------- layerwise engine
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class _Call:
    module: nn.Module
    a: Tensor  # layer input (B, ...)
    tap: Tensor  # zero tensor added to the output; its gradient is the output gradient


def _conv_patches(m: nn.Module, a: Tensor) -> Tensor:
    """Unfolded input patches ``(B, I·k…, L)`` of a Conv1d/Conv2d call, matching its padding mode."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
    if isinstance(m, nn.Conv1d):
        a = a[:, :, None, :]
        ks, dil, st = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
    else:
        ks, dil, st = m.kernel_size, m.dilation, m.stride
    return F.unfold(a, ks, dilation=dil, padding=0, stride=st)


def _patch_numel(c: _Call) -> int:
    """Per-sample numel of the unfolded patches of a conv call (0 for Linear)."""
    if isinstance(c.module, nn.Linear):
        return 0
    k = math.prod(c.module.kernel_size)
    return c.a.shape[1] * k * math.prod(c.tap.shape[2:])


def _call_rows(c: _Call, g: Tensor, which: str) -> Tensor:
    """Per-sample rows ``(K, B, numel)`` of ``which`` ∈ {weight, bias} from one call; ``g (K, B, ...)``."""
    m, a = c.module, c.a
    K, B = g.shape[:2]
    if isinstance(m, nn.Linear):
        if which == "bias":
            return g.reshape(K, B, -1, g.shape[-1]).sum(2)
        gr, ar = g.reshape(K, B, -1, g.shape[-1]), a.reshape(B, -1, a.shape[-1])
        return torch.einsum("kbto,bti->kboi", gr, ar).reshape(K, B, -1)
    gr = g.reshape(K, B, g.shape[2], -1)  # (K, B, O, L)
    if which == "bias":
        return gr.sum(-1)
    patches = _conv_patches(m, a)  # (B, I·k, L)
    G = m.groups
    gg = gr.reshape(K, B, G, -1, gr.shape[-1])
    pp = patches.reshape(B, G, -1, patches.shape[-1])
    return torch.einsum("kbgol,bgil->kbgoi", gg, pp).reshape(K, B, -1)


def _simple(calls: list[_Call], which: str) -> bool:
    """One call of a Linear layer on a ``(B, I)`` input: diag/Gram need no materialised rows."""
    return len(calls) == 1 and isinstance(calls[0].module, nn.Linear) and calls[0].a.dim() == 2


def _ambiguous(c: _Call, B: int) -> bool:
    """Whether shapes alone cannot show that a call's axis 0 is the batch: another axis than the layer's
    feature (Linear: last) or channel (conv: 1) axis also has size B, e.g. a sequence-first ``(T, B, I)``
    input with ``T = B``."""
    rest = c.a.shape[1:-1] if isinstance(c.module, nn.Linear) else c.a.shape[2:]
    return B in rest


@dataclass
class _Signature:
    """What the verification of one input signature ``(shape[1:], dtype)`` established."""

    calls: Counter  # id(owned module) -> calls per forward
    simple: frozenset  # owned parameters whose diag/sqnorm/Gram need no materialised rows
    act: int  # per-sample numel of all module outputs: the backward's working set per sandwich column
    patch: int  # largest per-sample numel of unfolded conv patches


@dataclass
class _Plan:
    """Which selected parameters the layerwise engine owns (name -> (attribute, [modules])), and what was
    verified per input signature."""

    owned: dict[str, tuple[str, list[nn.Module]]] = field(default_factory=dict)
    signatures: dict = field(default_factory=dict)  # (input shape[1:], dtype) -> _Signature
    independent: set = field(default_factory=set)  # signatures checked by check_batch
    out_dim: dict = field(default_factory=dict)  # (input shape[1:], dtype) -> C
    loop: bool = False  # vmap cannot batch the model over samples: the functional engine loops


#: model -> {(name, id(tensor)) selection: plan}; the verification result lives as long as the model.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(fm: FunctionalModel) -> _Plan:
    """The cached plan for this model and parameter selection (module structure walked once)."""
    key = tuple((n, id(t)) for n, t in fm.tensors.items())
    plans = _PLANS.setdefault(fm.model, {})
    if key not in plans:
        plans[key] = _make_plan(fm)
    return plans[key]


def _make_plan(fm: FunctionalModel) -> _Plan:
    ids = {id(t): n for n, t in fm.tensors.items()}
    owners: dict[str, tuple[str, list]] = {}
    foreign: set[str] = set()
    for m in fm.model.modules():
        for attr, t in m._parameters.items():
            if t is None or id(t) not in ids:
                continue
            n = ids[id(t)]
            if isinstance(m, _LAYERS) and attr in ("weight", "bias"):
                prev = owners.setdefault(n, (attr, []))
                if prev[0] != attr:
                    foreign.add(n)
                prev[1].append(m)
            else:
                foreign.add(n)
    return _Plan({n: v for n, v in owners.items() if n not in foreign})


class _Recorder:
    """Forward hooks on the owning layers (record inputs, add a zero tap to outputs); with ``measure``, also
    count the per-sample numel of every module's output."""

    def __init__(self, modules: Iterable[nn.Module], measure: nn.Module | None = None):
        self.calls: list[_Call] = []
        self.act = 0
        self.handles = [m.register_forward_hook(self._hook) for m in set(modules)]
        if measure is not None:
            self.handles += [m.register_forward_hook(self._measure) for m in measure.modules()]

    def _hook(self, m, inputs, out):
        tap = torch.zeros_like(out, requires_grad=True)
        self.calls.append(_Call(m, inputs[0].detach(), tap))
        return out + tap

    def _measure(self, m, inputs, out):
        if isinstance(out, Tensor) and out.dim():
            self.act += out[0].numel()

    def close(self):
        for h in self.handles:
            h.remove()


def _record(fm: FunctionalModel, plan: _Plan, X: Tensor, measure: bool = False):
    """One forward of ``X`` with the owned layers tapped and the owned parameters requiring grad (so that
    fused fast paths which bypass the layers' own forward stay off); returns ``(f, p, recorder)``."""
    p = {n: t.detach().requires_grad_(n in plan.owned) for n, t in fm.params.items()}
    rec = _Recorder((m for _, mods in plan.owned.values() for m in mods), fm.model if measure else None)
    try:
        with torch.enable_grad():
            f = forward_checked(fm, p, X)
    finally:
        rec.close()
    return f, p, rec


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


def _close(a: Tensor, b: Tensor) -> bool:
    tol = _tol(a.dtype)
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * (b.abs().max().item() + 1e-30)))


def _check_independent(fm: FunctionalModel, X: Tensor) -> None:
    """Refuse models whose outputs are random or depend on the other inputs of the batch (per-sample Fisher
    quantities are undefined for them): two forwards of ``X[:4]`` must agree, and so must ``X[:1]``, ``X[1:4]``
    forwarded apart."""
    X = X[: min(len(X), 4)]
    with torch.no_grad():
        f = forward_checked(fm, fm.params, X)
        if not _close(forward_checked(fm, fm.params, X), f):
            raise ValueError(
                "The model gives different outputs for the same inputs on two calls (a random forward, e.g. "
                "F.dropout(training=True) or noise); Fisher quantities need a deterministic model. Make the forward "
                "deterministic (model.eval() and training=self.training)."
            )
        if len(X) > 1:
            parts = torch.cat([forward_checked(fm, fm.params, X[:1]), forward_checked(fm, fm.params, X[1:])])
            if not _close(parts, f):
                raise ValueError(
                    "The model's output for one input depends on the other inputs of its batch (e.g. centring by "
                    "the batch mean, batch statistics); per-sample Fisher quantities are undefined for it. Compute "
                    "such statistics per sample or from fixed buffers."
                )


def check_batch(fm: FunctionalModel, X: Tensor) -> None:
    """Once per model, selection and input signature: the model is deterministic and sample-independent
    (:func:`_check_independent`).  Every view that forwards data calls it."""
    plan = _plan(fm)
    key = (tuple(X.shape[1:]), X.dtype)
    if key not in plan.independent:
        _check_independent(fm, X)
        plan.independent.add(key)


def signature(fm: FunctionalModel, X: Tensor) -> _Signature:
    """:func:`check_batch`, then the layerwise attribution (:func:`_verify`, which also measures the per-sample
    sizes of the working budget), once per input signature."""
    check_batch(fm, X)
    plan = _plan(fm)
    key = (tuple(X.shape[1:]), X.dtype)
    if key not in plan.signatures:
        plan.signatures[key] = _verify(fm, plan, X)
    return plan.signatures[key]


def _call_problems(plan: _Plan, calls: list[_Call], B: int, counts: Counter | None) -> dict[str, str]:
    """Owned parameters whose calls in this forward do not show their per-sample attribution, with the reason:
    an input whose axis 0 is not the batch, or a call count unlike the verified one (``counts``)."""
    seen = Counter(id(c.module) for c in calls)
    wrong = {id(c.module): tuple(c.a.shape) for c in calls if c.a.shape[0] != B or c.tap.shape[0] != B}
    out = {}
    for n, (_, mods) in plan.owned.items():
        for m in mods:
            if id(m) in wrong:
                out[n] = f"its layer's input has shape {wrong[id(m)]}, whose first axis is not the batch of {B}"
            elif counts is not None and seen[id(m)] != counts[id(m)]:
                out[n] = f"its layer ran {seen[id(m)]} times in this forward, {counts[id(m)]} times when verified"
    return out


def _demote(plan: _Plan, problems: dict[str, str], stacklevel: int = 4) -> None:
    """Hand parameters to the general engine for good, saying so once."""
    for n in problems:
        plan.owned.pop(n, None)
    if problems:
        why = "; ".join(f"'{n}': {r}" for n, r in problems.items())
        warnings.warn(
            f"The layerwise engine cannot prove the per-sample attribution of {len(problems)} parameter(s) ({why}). "
            "fisherlens computes them with the general torch.func engine instead (exact, slower).",
            stacklevel=stacklevel,
        )


def _verify(fm: FunctionalModel, plan: _Plan, X: Tensor) -> _Signature:
    """Prove the layerwise attribution on ``X[:4]`` and measure the signature's per-sample sizes.

    With random cotangents ``w_b`` and random per-sample weights ``c_b``, ``Σ_b c_b · row_b(w_b)`` must equal
    autograd's ``∇_θ Σ_b c_b w_b·f_b``.  (Plain sums ``Σ_b row_b`` would not do: they are right whichever rows
    are given to which sample.)  A parameter that fails — used outside its layer, or reached through inputs
    whose first axis is not the batch — goes to the functional engine, with a warning.
    """
    X = X[: min(len(X), 4)]
    B = len(X)
    f, p, rec = _record(fm, plan, X, measure=True)
    _demote(plan, _call_problems(plan, rec.calls, B, None), stacklevel=5)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
    c = (torch.rand(B, generator=gen, dtype=f.dtype) + 0.5).to(f.device)
    names = list(plan.owned)
    if not names:
        return _signature_of(fm, plan, rec)
    with torch.enable_grad():
        true = torch.autograd.grad((f * w * c[:, None]).sum(), [p[n] for n in names], retain_graph=True,
                                   allow_unused=True)
    grads, _ = _tap_grads(rec.calls, f, w[:, :, None])
    bad = []
    for n, t in zip(names, true, strict=True):
        which, mods = plan.owned[n]
        ids = {id(m) for m in mods}
        est = torch.zeros(fm.sizes[n], dtype=f.dtype, device=f.device)
        for c_, g in zip(rec.calls, grads, strict=True):
            if id(c_.module) in ids:
                est = est + torch.einsum("b,kbp->p", c, _call_rows(c_, g, which))
        ref = torch.zeros_like(est) if t is None else t.reshape(-1)
        if not _close(est, ref):
            bad.append(n)
    if bad:
        for n in bad:
            del plan.owned[n]
        warnings.warn(
            f"Parameters {bad} are used outside the layer that owns them (or their layer's inputs do not keep the "
            "batch on axis 0); fisherlens uses the slower general (torch.func) engine for them.",
            stacklevel=4,
        )
    return _signature_of(fm, plan, rec)


def _signature_of(fm: FunctionalModel, plan: _Plan, rec: _Recorder) -> _Signature:
    ids = {id(m) for _, mods in plan.owned.values() for m in mods}
    calls = [c for c in rec.calls if id(c.module) in ids]
    counts = Counter(id(c.module) for c in calls)
    simple = frozenset(
        n for n, (which, mods) in plan.owned.items()
        if _simple([c for c in calls if any(c.module is m for m in mods)], which)
    )
    patch = max((_patch_numel(c) for c in calls), default=0)
    return _Signature(counts, simple, rec.act, patch)


class Stats:
    """Per-batch statistics of the factor rows, only those requested.

    * ``diag``:   ``dict[name, Σ_{b,k} G_bk² (shape of the parameter)]``
    * ``diagk``:  ``dict[name, (K, *shape)]``, the same per sandwich column ``Σ_b G_bk²``
    * ``sqnorm``: ``dict[name, (B, K)]`` per-sample, per-column ``‖G_bk‖²`` over that parameter
    * ``gram``:   ``(B, K, K)`` per-sample ``G_b G_bᵀ`` summed over the selected parameters
    * ``rows``:   ``dict[name, (B, K, numel)]``
    """

    def __init__(self):
        self.diag: dict[str, Tensor] = {}
        self.diagk: dict[str, Tensor] = {}
        self.sqnorm: dict[str, Tensor] = {}
        self.gram: Tensor | None = None
        self.rows: dict[str, Tensor] = {}

    def add_rows(self, n: str, r: Tensor, want: set[str], shape) -> None:
        """Record the statistics of materialised rows ``r (B, K, numel)`` of parameter ``n``."""
        if "diag" in want:
            self.diag[n] = (r**2).sum((0, 1)).reshape(shape)
        if "diagk" in want:
            self.diagk[n] = (r**2).sum(0).reshape(r.shape[1], *shape)
        if "sqnorm" in want:
            self.sqnorm[n] = (r**2).sum(-1)
        if "gram" in want:
            self.add_gram(torch.einsum("bkp,blp->bkl", r, r))
        if "rows" in want:
            self.rows[n] = r

    def add_gram(self, gm: Tensor):
        self.gram = gm if self.gram is None else self.gram + gm


def batch_stats(
    fm: FunctionalModel,
    X: Tensor,
    make_v,
    want: set[str],
    engine: str = "auto",
) -> tuple[Tensor, Tensor, Stats]:
    """Forward ``X``, build ``V = make_v(f)``; return ``(f, V, stats)``.

    ``want`` ⊆ {diag, diagk, sqnorm, gram, rows} names the :class:`Stats` to compute.  The layerwise fast
    path proves its attribution on every call: each owned layer's input keeps the batch on axis 0 and runs as
    often as when verified, and where shapes alone cannot tell (:func:`_ambiguous`) one extra cotangent column
    ``c_b·(V_b w)`` checks that each sample's output gradient lives in that sample's slice.
    """
    check_choice("engine", engine, ENGINES)
    plan = _plan(fm)
    sig = signature(fm, X)
    if engine == "layerwise" and len(plan.owned) < len(fm.names):
        missing = [n for n in fm.names if n not in plan.owned]
        raise ValueError(
            f"engine='layerwise' handles only parameters of Linear/Conv1d/Conv2d layers used through them; "
            f"not {missing}. Use engine='auto'."
        )
    stats = Stats()
    if engine == "functional" or not plan.owned:
        with torch.no_grad():
            f = forward_checked(fm, fm.params, X)
        V = make_v(f)
        owned: dict = {}
    else:
        f, _, rec = _record(fm, plan, X)
        _demote(plan, _call_problems(plan, rec.calls, len(X), sig.calls))
        V = make_v(f.detach())
        _layerwise(fm, plan, rec.calls, f, V, want, stats)
        owned = plan.owned
    rest = [n for n in fm.names if n not in owned]
    if rest:
        rows = functional_rows(fm, rest, X, V)
        for n in rest:
            stats.add_rows(n, rows[n].reshape(*V.shape[::2], -1), want, fm.shapes[n])
    return f.detach(), V, stats


def output_dim(fm: FunctionalModel, X: Tensor) -> int:
    """C for inputs like ``X``: one forward of one sample, remembered per model and input shape."""
    cache = _plan(fm).out_dim
    key = (tuple(X.shape[1:]), X.dtype)
    if key not in cache:
        with torch.no_grad():
            cache[key] = forward_checked(fm, fm.params, X[:1]).shape[-1]
    return cache[key]


def chunk_size(fm: FunctionalModel, X: Tensor, K: int, want: set[str], engine: str = "auto", share: int = 1) -> int:
    """Inputs per chunk so that one chunk's working memory fits :data:`WORK_BUDGET` ``/ share``.

    Per input and sandwich column it counts the materialised rows (all P for ``rows``, the functional
    engine and every layer but single-use Linear ones) and the backward's activations; conv layers add
    their unfolded patches.  Refuses, before allocating, a single input that cannot fit in memory.
    """
    sig = signature(fm, X)
    owned = {} if engine == "functional" else _plan(fm).owned
    if "rows" in want:
        rows = fm.P
    else:
        rows = fm.P - sum(fm.sizes[n] for n in sig.simple if n in owned)
    per = fm.itemsize * ((K + 1) * (rows + sig.act) + sig.patch)
    check_dense(f"One input's working set ({K} sandwich columns × {rows + sig.act} numbers)", per, 1,
                "Use fewer samples=/columns, a parameter subset params=, or a scalable estimator", None)
    return max(1, WORK_BUDGET // (share * per))


def stream(
    fm: FunctionalModel, data, make_v, want: set[str], *, need_y: bool, columns,
    batch_size: int | None = None, engine: str = "auto",
) -> Iterator[tuple[int, Tensor, Tensor, Stats]]:
    """Stream ``data`` and yield ``(n, f, V, stats)`` per chunk, ``V = make_v(f, Y)`` with
    ``columns(C)`` columns per sample.  Batches are split so that a chunk's working memory fits
    :data:`WORK_BUDGET` (:func:`chunk_size`); nothing is accumulated across chunks."""
    for X, Y in iter_batches(data, fm, need_y=need_y, batch_size=batch_size):
        step = chunk_size(fm, X, columns(output_dim(fm, X)), want, engine)
        for i in range(0, len(X), step):
            Xc, Yc = X[i : i + step], None if Y is None else Y[i : i + step]
            f, V, st = batch_stats(fm, Xc, lambda f, Yc=Yc: make_v(f, Yc), want, engine)
            yield len(Xc), f, V, st


class Run:
    """Validated arguments shared by every Fisher reduction, and the chunk stream they drive."""

    def __init__(self, model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine):
        check_kind(likelihood, kind)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("engine", engine, ENGINES)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be a positive integer (label draws per input), got {samples!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        self.fm = FunctionalModel(model, params)
        self.data, self.lik, self.kind = data, likelihood, kind
        self.reduction, self.samples, self.generator = reduction, samples, generator
        self.batch_size, self.engine = batch_size, engine
        self.n = 0

    def batches(self, check: bool = True):
        """Yield ``(X, Y)`` batches of the data, counting this pass's samples in ``self.n``; with ``check``, each
        batch's signature is checked once (:func:`check_batch`) — callers that only gather the data pass False."""
        self.n = 0
        for X, Y in iter_batches(self.data, self.fm, need_y=self.kind == "empirical", batch_size=self.batch_size):
            if check:
                check_batch(self.fm, X)
            self.n += len(X)
            yield X, Y

    def v(self, f, y):
        """The kind's sandwich ``V (B, C, K)``; labels ``y`` are used only by ``kind="empirical"``."""
        return sandwich(self.lik, self.kind, f, y, self.samples, self.generator)

    def columns(self, C: int) -> int:
        """K, the sandwich's columns per sample, for a model with C outputs."""
        return {"mc": self.samples, "empirical": 1}.get(self.kind, C)

    def chunks(self, want: set[str], make_v=None, columns=None):
        """Yield ``(f, V, stats)`` per chunk of the data (see :func:`fisherlens._core.stream`);
        ``make_v``/``columns`` replace the kind's sandwich and its column count.  Counts this pass's samples
        in ``self.n``."""
        self.n = 0
        for n, f, V, st in stream(
            self.fm, self.data, make_v or self.v, want, need_y=self.kind == "empirical",
            columns=columns or self.columns, batch_size=self.batch_size, engine=self.engine,
        ):
            self.n += n
            yield f, V, st

    def scale(self) -> float:
        return 1.0 / self.n if self.reduction == "mean" else 1.0


def _tap_grads(calls: list[_Call], f: Tensor, V: Tensor, check: bool = False):
    """Output gradients of every recorded call for each sandwich column, ``(K, B, ...)`` each; with ``check``,
    also those of one extra column ``c_b · (V_b w)`` (random ``c``, ``w``) and the pair ``(c, w)``."""
    K = V.shape[-1]
    cot = V.permute(2, 0, 1)  # (K, B, C)
    cw = None
    if check:
        gen = torch.Generator(device="cpu").manual_seed(1)
        c = (torch.rand(V.shape[0], generator=gen, dtype=V.dtype) + 0.5).to(V.device)
        w = torch.randn(K, generator=gen, dtype=V.dtype).to(V.device)
        cot = torch.cat([cot, (c[:, None] * (V @ w))[None]])
        cw = (c, w)
    taps = [c.tap for c in calls]
    if not taps or not f.requires_grad:
        gs = [None] * len(taps)
    elif cot.shape[0] == 1:
        gs = torch.autograd.grad(f, taps, cot[0], allow_unused=True)
        gs = [None if g is None else g[None] for g in gs]
    else:
        gs = torch.autograd.grad(f, taps, cot, allow_unused=True, is_grads_batched=True)
    gs = [torch.zeros(cot.shape[0], *t.shape, dtype=t.dtype, device=t.device) if g is None else g
          for g, t in zip(gs, taps, strict=True)]
    if not check:
        return gs, None
    return [g[:K] for g in gs], ([g[K] for g in gs], cw)


def _tap_problems(plan: _Plan, calls: list[_Call], grads, extra) -> dict[str, str]:
    """Owned parameters with an ambiguous call whose output gradient for the check column ``c_b (V_b w)`` is not
    ``c_b Σ_k w_k g_kb`` sample by sample along axis 0: their rows would mix samples."""
    ext, (c, w) = extra
    wrong = set()
    for i, call in enumerate(calls):
        if _ambiguous(call, len(c)):
            want = c.reshape(-1, *[1] * (call.tap.dim() - 1)) * torch.einsum("k,kb...->b...", w, grads[i])
            if not _close(ext[i], want):
                wrong.add(id(call.module))
    return {n: "the output gradient of its layer mixes the samples along axis 0 (the batch is on another axis)"
            for n, (_, mods) in plan.owned.items() if any(id(m) in wrong for m in mods)}


def _layerwise(fm, plan: _Plan, calls, f, V, want, stats: Stats) -> None:
    check = any(_ambiguous(c, len(f)) for c in calls)
    grads, extra = _tap_grads(calls, f, V, check)
    if check:
        _demote(plan, _tap_problems(plan, calls, grads, extra), stacklevel=5)
    by_module: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault(id(c.module), []).append(i)
    for n, (which, mods) in plan.owned.items():
        idx = [i for m in mods for i in by_module.get(id(m), [])]
        if not idx:  # parameter unused in this forward (as when verified): its rows are zero
            z = torch.zeros(V.shape[0], V.shape[-1], fm.sizes[n], dtype=f.dtype, device=f.device)
            stats.add_rows(n, z, want, fm.shapes[n])
            continue
        sub = [calls[i] for i in idx]
        if _simple(sub, which) and "rows" not in want:
            _simple_stats(stats, n, which, grads[idx[0]], sub[0].a, want)
            continue
        r = sum(_call_rows(c, grads[i], which) for c, i in zip(sub, idx, strict=True)).transpose(0, 1)  # (B, K, numel)
        stats.add_rows(n, r, want, fm.shapes[n])


def _simple_stats(stats: Stats, n: str, which: str, g: Tensor, a: Tensor, want: set[str]) -> None:
    """Statistics of a Linear called once on ``a (B, I)`` with output gradients ``g (K, B, O)``, without rows:
    ``Σ g²a²`` (diag), ``‖g‖²‖a‖²`` (sqnorm), ``(g_k·g_l)‖a‖²`` (Gram)."""
    a2 = a.square()  # (B, I)
    if "diag" in want:
        g2 = g.square().sum(0)  # (B, O)
        stats.diag[n] = g2.sum(0) if which == "bias" else g2.T @ a2
    if "diagk" in want:
        stats.diagk[n] = g.square().sum(1) if which == "bias" else torch.einsum("kbo,bi->koi", g.square(), a2)
    if "sqnorm" in want:
        s = g.square().sum(-1).T  # (B, K)
        stats.sqnorm[n] = s if which == "bias" else s * a2.sum(-1)[:, None]
    if "gram" in want:
        gg = torch.einsum("kbo,lbo->bkl", g, g)
        stats.add_gram(gg if which == "bias" else gg * a2.sum(-1)[:, None, None])
