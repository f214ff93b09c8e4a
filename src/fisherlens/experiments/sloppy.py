"""Are neural networks sloppy models?  Luzzatto 2023 §4.3–4.4 with every nonzero eigenvalue (``fisherlens run sloppy``).

Luzzatto 2023 §4.3 trained 784-10, 784-16-10 and 784-25-10 MNIST classifiers (ReLU hidden layer, softmax outputs,
quadratic loss, Adam, batch 128; 10 networks each) and looked at the FIM of one input, eq 4.6 (Gaussian output
model eq 4.5 on the softmax probabilities, σ = 1): ``F_x = J_pᵀ J_p`` with ``J_p = ∂p(x)/∂θ``.  It could compute
only 8 of 19,885 eigenvalues.  Here, for every network and for an easy and a hard input:

* **Gaussian** (Luzzatto 2023, eq 4.6): ``F_x = J_pᵀ J_p``, p = softmax(z);
* **categorical** beside it: ``F_x = J_zᵀ (diag π − ππᵀ) J_z`` on the logits z.

Both have rank ≤ C − 1 = 9, not 10: the probabilities sum to one, so ``1ᵀ J_p = 0`` and ``(diag π − ππᵀ) 1 = 0``.

**All nonzero eigenvalues, accurately.**  The dual (Gram) matrix gives the 9 nonzero eigenvalues exactly in exact
arithmetic (docs/conventions.md#gram-duality), but a float64 eigensolver resolves only eigenvalues above
≈ C·ε·λ_max (ε = 2.2e-16), and
a confidently classified input has softmax probabilities down to 1e-20, so its ladder falls far below that.
The ladder is still determined to high *relative* accuracy by float64 data, because the small scales enter
only through the probabilities.  With t = argmax π and the reduced logits ``u_k = z_k − z_t`` (k ≠ t; p depends
on z only through u):

    F_cat   = J_uᵀ A_r J_u,        A_r = diag(π_r) − π_r π_rᵀ                   (9 × 9, positive definite)
    F_gauss = J_uᵀ Q J_u,          Q  = A_r² + π_t² π_r π_rᵀ = (∂p/∂u)ᵀ(∂p/∂u)

with ``J_u = J_{z,r} − 1 J_{z,t}`` (9 × P rows of O(1) size; the output bias makes ``K_u = J_u J_uᵀ ≽ I + 11ᵀ``).
With ``K_u = L Lᵀ`` (float64 Cholesky) the nonzero eigenvalues of F are those of the 9 × 9 matrix ``Lᵀ A_r L``
(resp. ``Lᵀ Q L``), which is evaluated and diagonalised in 50-digit arithmetic (mpmath) from float64 π_r and L;
eigenvectors are ``(L⁻¹ J_u)ᵀ v``.  Because ``A_r = D^{1/2}(I − qqᵀ)D^{1/2}`` (D = diag π_r, q = √π_r, ‖q‖² =
1 − π_t ≤ 0.9) is a graded matrix with a well-conditioned core, normwise-relative float64 errors in L and
componentwise-relative errors in π_r move every eigenvalue only *relatively* (by ≈ κ·ε), however small it is.
The library's float64 Gram route (:func:`fisherlens.eigenvalues`, ``method="gram"``) is computed beside it for
every input; both agree wherever float64 can resolve an eigenvalue, and the summary counts how many of the 9 it
resolves (the analogue of Luzzatto's "8 of 19,885").  Checks: the pseudo-determinant identity
``Π_i λ_i(F_cat) = (Π_k π_k) det K_u`` and, in the tests, the closed form of the no-hidden net
(``J_z J_zᵀ = (‖x‖²+1) I``, so λ(F_cat) = (‖x‖²+1) eig(diag π − ππᵀ), λ(F_gauss) = (‖x‖²+1) eig(·)²).

**Data-averaged FIM** (Luzzatto 2023, §4.4: does sloppiness survive averaging over inputs?), network 0 of each
architecture, both output models: the exact Gram dual of a random subset of ``n_gram`` training inputs (all
n·C eigenvalues of the subset-averaged FIM, float64) and Lanczos top-k (:func:`fisherlens.eigenvalues`,
``method="lanczos"``) of the FIM averaged over the whole training set, whose top eigenvectors are shown as
input-space images (first-layer weight rows reshaped to 28 × 28).

Scaled down from Luzzatto 2023: 4000 training images of the 5000-digit MNIST subset shipped with fisherlens instead of
60,000 (``--data DIR`` reads the full IDX set); 50 epochs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.func import functional_call, jacrev, vmap

import fisherlens as fl

from .. import datasets
from ..plots import save_png
from ..runs import save_checkpoint
from ._common import arch_name, as_tuple, check_int, check_number, make_mlp, torch_threads
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = ["sloppy", "Sloppy", "SloppyConfig", "per_input_spectrum", "select_inputs", "train_ensemble", "member",
           "LIKELIHOODS"]

LIKELIHOODS = ("gaussian", "categorical")
LIK_LABEL = {"gaussian": "Gaussian on softmax p (Luzzatto 2023, eq 4.6)", "categorical": "categorical on logits"}
EPS = float(torch.finfo(torch.float64).eps)
STIFF = 1e-3  # "within 10⁻³ of the largest"
DPS = 50  # mpmath digits for the 9 × 9 reduced eigenproblem
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
FIGURES = {
    "sloppy_inputs.png": "The easy and the hard input, with the ensemble's predictions per architecture.",
    "sloppy_ladders.png": "All 9 nonzero per-input FIM eigenvalues (log scale) of every network: architecture × "
    "{easy, hard} × {Gaussian, categorical}; thin lines single networks, thick the ensemble median.",
    "sloppy_ladders_normalised.png": "The same ladders normalised by λ_max, with the float64 resolution limit "
    "C·ε and the 10⁻³ stiffness line.",
    "sloppy_stats.png": "Decades spanned log10(λ_max/λ_min) and the number of eigenvalues within 10⁻³ of λ_max, "
    "per architecture (boxes over the ensemble).",
    "sloppy_eigenvectors.png": "Top eigenvectors of the data-averaged FIM (and of one per-input FIM) as "
    "input-space images: the first-layer weight row of largest norm, reshaped to 28 × 28.",
    "sloppy_averaged.png": "Data-averaged FIM vs per-input: eigenvalue ladders of the exact Gram dual over a "
    "training subset, Lanczos top-k over the whole training set, and the per-input ladders.",
}


# ----------------------------------------------------------------------------- training
def _init(K: int, sizes: list[int], gen: torch.Generator) -> list[Tensor]:
    """Stacked parameters ``[W1 (K, h1, d), b1 (K, h1), …]``, nn.Linear's default U(±1/√fan_in)."""
    ps = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1.0 / math.sqrt(a)
        ps.append(((torch.rand(K, b, a, generator=gen) * 2 - 1) * bound).requires_grad_())
        ps.append(((torch.rand(K, b, generator=gen) * 2 - 1) * bound).requires_grad_())
    return ps


def _forward(ps: list[Tensor], x: Tensor) -> Tensor:
    """Logits of K stacked ReLU MLPs: ``x (K, B, d) -> (K, B, C)``."""
    h, n = x, len(ps) // 2
    for i in range(n):
        h = torch.baddbmm(ps[2 * i + 1][:, None, :], h, ps[2 * i].transpose(1, 2))
        if i < n - 1:
            h = h.relu()
    return h


def train_ensemble(
    Xtr: Tensor, ytr: Tensor, hidden: tuple[int, ...], networks: int, epochs: int, *, batch_size: int = 128,
    lr: float = 1e-3, n_classes: int = 10, generator: torch.Generator, bar=None,
) -> list[Tensor]:
    """Train ``networks`` independent ReLU MLPs ``d -> hidden -> C`` with softmax outputs and the quadratic loss.

    Loss per network (Luzzatto 2023, eq 4.4, halved: the Gaussian negative log-likelihood, σ = 1):
    ``(1/B) Σ_n ½ ‖softmax(z(x_n)) − onehot(y_n)‖²`` over a mini-batch of B = ``batch_size``; Adam (``lr``).
    The networks are stacked (batched matrix products) and their losses summed: Adam acts elementwise, so this
    *is* ``networks`` independent Adam runs, each with its own initialisation and its own batch order.

    Returns:
        Stacked float32 parameters ``[W1 (K, h1, d), b1 (K, h1), …, W_out (K, C, h), b_out (K, C)]`` (detached).
    """
    d = Xtr.shape[1]
    ps = _init(networks, [d, *hidden, n_classes], generator)
    opt = torch.optim.Adam(ps, lr=lr)
    Y = torch.nn.functional.one_hot(ytr, n_classes).to(Xtr.dtype)
    N = len(Xtr)
    for _ in range(epochs):
        perm = torch.argsort(torch.rand(networks, N, generator=generator), dim=1)
        for i in range(0, N, batch_size):
            idx = perm[:, i : i + batch_size]
            p = _forward(ps, Xtr[idx]).softmax(-1)
            loss = 0.5 * (p - Y[idx]).square().sum(-1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(networks)
    return [p.detach() for p in ps]


def member(stacked: list[Tensor], k: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Network ``k`` of a stacked ensemble as a logits ``nn.Sequential`` (layers ``fc1, relu1, …, out``), eval.

    Built by :func:`~fisherlens.experiments._common.make_mlp` with the weights copied in (the global RNG is never
    drawn from)."""
    pairs = [(stacked[2 * i][k], stacked[2 * i + 1][k]) for i in range(len(stacked) // 2)]
    d_in, hidden, n_out = pairs[0][0].shape[1], [W.shape[0] for W, _ in pairs[:-1]], pairs[-1][0].shape[0]
    return make_mlp(d_in, hidden, n_out, dtype=dtype, weights=pairs).eval()


class Probabilities(nn.Module):
    """``softmax(logits_net(x))``: the output of Luzzatto's networks, for the Gaussian FIM of eq 4.6."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).softmax(-1)


# ----------------------------------------------------------------------------- per-input spectrum
def jacobians(model: nn.Module, X: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``z (n, C)`` and Jacobians ``J_z (n, C, P)`` (``named_parameters()`` order) by vmap(jacrev)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[k].reshape(len(X), jac[k].shape[1], -1) for k in params], dim=-1)
    with torch.no_grad():
        z = model(X)
    return z, J


def reduced_spectrum(z: Tensor, J: Tensor, likelihood: str, vectors: bool):
    """Eigen-decomposition of one input's FIM from its logits ``z (C,)`` and Jacobian ``J (C, P)`` (float64).

    See the module docstring: reduced logits u = z_r − z_t, ``K_u = L Lᵀ``, the ``(C−1) × (C−1)`` matrix
    ``Lᵀ A_r L`` (categorical) or ``Lᵀ Q L`` (Gaussian on p) diagonalised in ``DPS``-digit arithmetic.
    Returns ``(vals (C−1,) descending, vecs (P, C−1) or None, extras)``.
    """
    C = z.shape[0]
    logp = torch.log_softmax(z, -1)
    t = int(torch.argmax(z))
    r = torch.tensor([k for k in range(C) if k != t])
    Ju = J[r] - J[t]
    L = torch.linalg.cholesky(Ju @ Ju.T)
    with mpmath.workdps(DPS):
        pr = [mpmath.exp(mpmath.mpf(float(v))) for v in logp[r]]
        pt = 1 - mpmath.fsum(pr)  # the reduced parametrisation depends on π_r only; π_t = 1 − Σ π_r
        m = C - 1
        A = mpmath.matrix(m, m)
        for i in range(m):
            for j in range(m):
                A[i, j] = (pr[i] if i == j else 0) - pr[i] * pr[j]
        if likelihood == "gaussian":
            A = A * A + (pt**2) * mpmath.matrix([[pr[i] * pr[j] for j in range(m)] for i in range(m)])
        Lm = mpmath.matrix(L.tolist())
        H = Lm.T * A * Lm
        H = (H + H.T) / 2
        E, Q = mpmath.eigsy(H)
        order = sorted(range(m), key=lambda i: -E[i])
        vals = torch.tensor([float(E[i]) for i in order], dtype=torch.float64)
        V = torch.tensor([[float(Q[a, i]) for i in order] for a in range(m)], dtype=torch.float64) if vectors else None
        logdet_core = float(mpmath.log(mpmath.det(A)))
    vecs = None
    if vectors:
        Qu = torch.linalg.solve_triangular(L, Ju, upper=False)  # (m, P), orthonormal rows
        vecs = Qu.T @ V
        vecs = vecs / vecs.norm(dim=0, keepdim=True)
    extras = {"top_class": t, "logdet_KuA": 2 * float(torch.log(torch.diagonal(L)).sum()) + logdet_core,
              "log_prod_pi": float(logp.sum()), "logdet_Ku": 2 * float(torch.log(torch.diagonal(L)).sum())}
    return vals, vecs, extras


def per_input_spectrum(model: nn.Module, x: Tensor, likelihood: str = "categorical", *, vectors: bool = False):
    """All nonzero eigenvalues of one input's FIM, to high relative accuracy (module docstring).

    Args:
        model: a logits network ``(B, d) -> (B, C)`` (any module; use float64).
        x: one input ``(d,)``.
        likelihood: ``"categorical"`` — ``F = J_zᵀ(diag π − ππᵀ)J_z`` (``fl.Categorical()`` on ``model``);
            ``"gaussian"`` — ``F = J_pᵀ J_p`` with p = softmax(z) (Luzzatto 2023, eq 4.6; ``fl.Gaussian(1.0)`` on
            ``softmax ∘ model``).
        vectors: also return the unit eigenvectors ``(P, C−1)`` (``named_parameters()`` order).

    Returns:
        ``vals (C−1,)`` float64 descending (all positive), or ``(vals, vecs)``.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
    if x.dim() != 1:
        raise ValueError(f"x must be one input (d,), got shape {tuple(x.shape)}.")
    z, J = jacobians(model, x[None])
    vals, vecs, _ = reduced_spectrum(z[0].double(), J[0].double(), likelihood, vectors)
    return (vals, vecs) if vectors else vals


# ----------------------------------------------------------------------------- inputs
def select_inputs(
    p_true: Tensor, p_max: Tensor, easy: int | None = None, hard: int | None = None
) -> tuple[int, int]:
    """Positions of the easy and the hard input among candidates.

    The FIM of one input does not depend on its label, only on how confident the prediction is, so:

    * easy — the most confidently and correctly classified candidate: largest ensemble-mean probability of the
      true class;
    * hard — the least confidently classified candidate: smallest ensemble-mean largest probability
      ``max_k p_k`` (the most ambiguous prediction).

    Args:
        p_true: ``(networks, n)`` probability each network gives the true class of each candidate.
        p_max: ``(networks, n)`` each network's largest class probability for each candidate.
        easy, hard: positions to use instead of the automatic choice.

    Returns:
        ``(easy, hard)``; ties go to the lowest position.
    """
    if p_true.dim() != 2 or p_true.shape[1] < 1 or p_max.shape != p_true.shape:
        raise ValueError(f"p_true and p_max must both be (networks, n) with n ≥ 1, got shapes "
                         f"{tuple(p_true.shape)} and {tuple(p_max.shape)}.")
    e = int(torch.argmax(p_true.double().mean(0))) if easy is None else easy
    h = int(torch.argmin(p_max.double().mean(0))) if hard is None else hard
    return e, h


def _hidden_list(hidden) -> list[tuple[int, ...]]:
    """Architectures as hidden-width tuples; a single width (``--set hidden=16``) is one architecture."""
    out = [as_tuple(h) for h in as_tuple(hidden)]
    if not all(isinstance(w, int) and not isinstance(w, bool) for h in out for w in h):
        raise ValueError(f"hidden must be a list of hidden-width tuples of integers, e.g. [(), (16,), (25,)], "
                         f"got {hidden!r}.")
    if not out or any(w < 1 for h in out for w in h) or any(len(h) > 1 for h in out):
        raise ValueError(f"hidden must list architectures with 0 or 1 hidden layer of width ≥ 1, got {hidden!r}.")
    if len(set(out)) != len(out):
        raise ValueError(f"hidden lists an architecture twice: {hidden!r}.")
    return out


# ----------------------------------------------------------------------------- the study
@dataclass
class SloppyConfig(StudyConfig):
    """Options of the sloppy study (defaults: the full study; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds the split, the initialisations, the batch orders and the subsets (runs are deterministic).
        data: ``"mnist-subset"`` (default: the 5000 MNIST digits shipped with fisherlens), or a folder of MNIST
            IDX files.
        networks: networks per architecture (10, as Luzzatto 2023; quick 2).
        epochs: Adam epochs (50, quick 2).
        n_train, n_test: training / held-out images (4000 / 1000; quick 300 / 200); with a larger ``--data`` set
            more can be asked for (``--set n_train=60000``).
        hidden: architectures as hidden widths (``[(), (16,), (25,)]``: 784-10, 784-16-10, 784-25-10; quick
            ``[(), (2,), (4,)]``; a single integer ``16``: the one architecture 784-16-10).
        batch_size, lr: Adam mini-batch (128, Luzzatto 2023) and learning rate.
        easy, hard: dataset indices of the two inputs (default: automatic, over all networks — easy: the
            held-out image with the largest ensemble-mean probability of its true class; hard: the one with the
            smallest ensemble-mean largest probability max_k p_k, the least confident prediction).
        n_gram: training inputs in the exact Gram dual of the data-averaged FIM (200, quick 20).
        top_k: Lanczos top eigenvalues of the categorical FIM averaged over the whole training set (6, quick 2;
            0 skips it: each costs tens of Fisher–vector products over all training images).
        eigenvectors: data-averaged eigenvectors drawn as images per architecture.
        threads: torch intra-op threads for the spectra (1: measured on 2 busy cores, one thread made the subset
            Gram 6× and Lanczos 18× faster than two; ``None`` keeps torch's setting).  Training always uses one
            thread (many small batched products).
    """

    QUICK = {"networks": 2, "epochs": 2, "n_train": 300, "n_test": 200, "n_gram": 20, "top_k": 2,
             "hidden": ((), (2,), (4,))}

    data: str = "mnist-subset"
    networks: int = 10
    epochs: int = 50
    n_train: int = 4000
    n_test: int = 1000
    hidden: Any = ((), (16,), (25,))
    batch_size: int = 128
    lr: float = 1e-3
    easy: int | None = None
    hard: int | None = None
    n_gram: int = 200
    top_k: int = 6
    eigenvectors: int = 4
    threads: int | None = 1

    def validate(self) -> None:
        self.hidden = _hidden_list(self.hidden)
        for name, lo in (("networks", 1), ("epochs", 1), ("n_train", 2), ("n_test", 1), ("batch_size", 1),
                         ("n_gram", 1), ("top_k", 0), ("eigenvectors", 1)):
            check_int(name, getattr(self, name), lo)
        check_number("lr", self.lr, lo=0)
        if self.n_gram > self.n_train:
            raise ValueError(f"n_gram = {self.n_gram} exceeds n_train = {self.n_train}.")
        super().validate()


@dataclass
class _Data:
    """The split of the data set and the two chosen inputs."""

    X: Tensor
    y: Tensor
    te_idx: Tensor
    tr_idx: Tensor
    C: int
    d: int
    archs: list[str]

    @property
    def Xtr(self) -> Tensor:
        return self.X[self.tr_idx]

    @property
    def ytr(self) -> Tensor:
        return self.y[self.tr_idx]


def _train_all(cfg: SloppyConfig, data: _Data, run: StudyRun) -> dict[str, list[Tensor]]:
    """Train the ensembles of every architecture (one thread) and save them to ``networks.pt``."""
    K = cfg.networks
    Xtr, ytr = data.Xtr, data.ytr
    steps = cfg.epochs * math.ceil(len(Xtr) / cfg.batch_size) * K * len(cfg.hidden)
    nets: dict[str, list[Tensor]] = {}
    with run.bar(steps, "training", unit="net-step") as bar:
        for a, (arch, h) in enumerate(zip(data.archs, cfg.hidden, strict=True)):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 101 * (a + 1))
            with torch_threads(1):  # small batched products: one thread is as fast, and robust to busy cores
                nets[arch] = train_ensemble(Xtr, ytr, h, K, cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                            n_classes=data.C, generator=g, bar=bar)
    run.lap("train")
    save_checkpoint(run.file("networks.pt"), {a: {str(i): p for i, p in enumerate(ps)} for a, ps in nets.items()})
    return nets


def _pick_inputs(cfg: SloppyConfig, data: _Data, nets: dict) -> tuple[dict, dict]:
    """Test accuracies per network, and the easy and the hard input (automatic or given by index)."""
    K, X, y, te_idx, tr_idx = cfg.networks, data.X, data.y, data.te_idx, data.tr_idx
    Xte, yte = X[te_idx], y[te_idx]
    with torch.no_grad():
        probs = {a: _forward(ps, Xte.expand(K, -1, -1)).softmax(-1) for a, ps in nets.items()}  # (K, n, C)
    acc = {a: (p.argmax(-1) == yte).double().mean(1) for a, p in probs.items()}
    p_true = torch.cat([p[:, torch.arange(len(yte)), yte] for p in probs.values()])
    p_max = torch.cat([p.max(-1).values for p in probs.values()])
    pos_e, pos_h = select_inputs(p_true, p_max)
    picks = {}
    for name, given, pos in (("easy", cfg.easy, pos_e), ("hard", cfg.hard, pos_h)):
        idx = int(te_idx[pos]) if given is None else given
        picks[name] = {"index": idx, "label": int(y[idx]), "auto": given is None,
                       "split": "test" if bool((te_idx == idx).any()) else
                       ("train" if bool((tr_idx == idx).any()) else "unused")}
    return acc, picks


def _library_model(model: nn.Module, lik: str):
    """The model and the library output model whose Fisher is the study's: softmax + Gaussian, or categorical."""
    return (Probabilities(model), fl.Gaussian(1.0)) if lik == "gaussian" else (model, fl.Categorical())


def _input_spectra(model, z, J, x, i: int, inp: str, key: dict, first_rows: int, checks: dict) -> list[dict]:
    """spectra.csv rows of one network and one input, both output models; updates ``checks``.

    ``first_rows`` is the number of rows of the first weight matrix (classes or hidden units).
    """
    rows = []
    d = x.shape[0]
    C = z.shape[-1]
    for lik in LIKELIHOODS:
        vals, vecs, ex = reduced_spectrum(z[i], J[i], lik, vectors=True)
        lib_model, lib_lik = _library_model(model, lik)
        lib = fl.eigenvalues(lib_model, (x[None], None), lib_lik, method="gram")
        tau = C * EPS * float(lib[0])
        checks["lib_resolved"].append((key["arch"], inp, lik, int((lib > tau).sum())))
        ok = vals >= 1e-8 * vals[0]
        checks["lib_dev"] = max(checks["lib_dev"], float(((lib[: len(vals)][ok] - vals[ok]).abs() / vals[ok]).max()))
        if lik == "categorical":
            pdet = float(vals.log().sum()) - (ex["log_prod_pi"] + ex["logdet_Ku"])
            checks["pdet_dev"] = max(checks["pdet_dev"], abs(pdet))
        # first-layer block of the top eigenvector: every row is a multiple of the input
        W = vecs[: first_rows * d, 0].reshape(-1, d)
        wr = W[W.norm(dim=1).argmax()]
        checks["x_cos"] = min(checks["x_cos"], float((wr @ x).abs() / (wr.norm() * x.norm())))
        if key["network"] == 0 and lik == "categorical":
            checks["vectors"][f"{key['arch']}|{inp}"] = wr
        for j, v in enumerate(vals.tolist()):
            rows.append({**key, "input": inp, "likelihood": lik, "i": j + 1, "eigenvalue": v,
                         "eigenvalue_gram_f64": float(lib[j]), "resolved_f64": bool(lib[j] > tau)})
    return rows


def _per_input(cfg: SloppyConfig, data: _Data, nets: dict, acc: dict, picks: dict, run: StudyRun):
    """Per-input spectra of every network for the two inputs: ``(spec_rows, net_rows, checks)``."""
    X = data.X
    Xin = torch.stack([X[picks["easy"]["index"]], X[picks["hard"]["index"]]]).double()
    labels = [picks["easy"]["label"], picks["hard"]["label"]]
    spec_rows, net_rows = [], []
    checks = {"lib_dev": 0.0, "pdet_dev": 0.0, "x_cos": 1.0, "lib_resolved": [], "vectors": {}}
    with run.bar(len(data.archs) * cfg.networks, "per-input spectra", unit="net") as bar:
        for arch in data.archs:
            first_rows = data.C if len(nets[arch]) == 2 else nets[arch][0].shape[1]
            for k in range(cfg.networks):
                model = member(nets[arch], k)
                z, J = jacobians(model, Xin)
                pr = z.softmax(-1)
                row = {"arch": arch, "network": k, "P": J.shape[-1], "test_acc": float(acc[arch][k])}
                for i, inp in enumerate(("easy", "hard")):
                    row[f"{inp}_pred"] = int(pr[i].argmax())
                    row[f"{inp}_p_true"] = float(pr[i, labels[i]])
                    row[f"{inp}_p_min"] = float(pr[i].min())
                    spec_rows += _input_spectra(model, z, J, Xin[i], i, inp, {"arch": arch, "network": k},
                                                first_rows, checks)
                net_rows.append(row)
                bar.update(1)
    run.lap("per_input")
    return spec_rows, net_rows, checks


def _averaged(cfg: SloppyConfig, data: _Data, nets: dict, run: StudyRun) -> tuple[list[dict], dict]:
    """Data-averaged FIM of network 0 per architecture: exact Gram dual of a training subset (both output models),
    Lanczos top-k over the whole training set (categorical).  Returns ``(avg_rows, avg_vecs)``."""
    avg_rows, avg_vecs = [], {}
    Xtr = data.Xtr
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7)
    sub = torch.randperm(len(Xtr), generator=g)[: cfg.n_gram]
    Xsub = Xtr[sub].double()
    with run.bar(3 * len(data.archs), "data-averaged FIM", unit="fim") as bar:
        for arch in data.archs:
            model = member(nets[arch], 0)
            for lik in LIKELIHOODS:
                lib_model, lib_lik = _library_model(model, lik)
                ev, vecs = fl.eigenvalues(lib_model, (Xsub, None), lib_lik, method="gram", return_vectors=True)
                tau = len(ev) * EPS * float(ev[0])
                for j, v in enumerate(ev.tolist()):
                    avg_rows.append({"arch": arch, "likelihood": lik, "source": "gram_subset", "n": cfg.n_gram,
                                     "i": j + 1, "eigenvalue": v, "resolved_f64": v > tau})
                if lik == "categorical":
                    avg_vecs[arch] = (ev[: cfg.eigenvectors].clone(), vecs[:, : cfg.eigenvectors].clone())
                del vecs
                bar.update(1)
            if cfg.top_k:
                avg_rows += _lanczos_full(cfg, nets[arch], Xtr, arch, avg_vecs[arch][1])
            bar.update(1)
    run.lap("averaged")
    return avg_rows, avg_vecs


def _lanczos_full(cfg: SloppyConfig, stacked: list[Tensor], Xtr: Tensor, arch: str, sv: Tensor) -> list[dict]:
    """Top-k of the categorical FIM over the whole training set (matrix-free Lanczos on a float32 copy), with the
    overlap of its top eigenspace with the subset's (``sv``)."""
    m32 = member(stacked, 0, torch.float32)
    P = sum(p.numel() for p in m32.parameters())
    vals, vl = fl.eigenvalues(m32, (Xtr, None), fl.Categorical(), k=min(cfg.top_k, P - 1), method="lanczos",
                              tol=1e-5, return_vectors=True)
    nv = min(sv.shape[1], vl.shape[1])
    # fraction of the full-data top-nv eigenspace inside the subset's top-nv eigenspace (1: identical)
    overlap = float((sv[:, :nv].T @ vl[:, :nv].double()).square().sum()) / nv
    return [{"arch": arch, "likelihood": "categorical", "source": "lanczos_full", "n": len(Xtr), "i": j + 1,
             "eigenvalue": v, "resolved_f64": True, "subspace_overlap": overlap if j == 0 else None}
            for j, v in enumerate(vals.tolist())]


class Sloppy(Study):
    """Sloppy spectra of trained MNIST classifiers (Luzzatto 2023, §4.3–4.4; module docstring)."""

    name = "sloppy"
    description = ("Luzzatto 2023 §4.3-4.4: are MNIST classifiers (784-10, 784-16-10, 784-25-10; 10 each) sloppy? All "
                   "nonzero per-input FIM eigenvalues (Gaussian and categorical) for an easy and a hard input, the "
                   "data-averaged FIM, stiff eigenvectors as images.")
    Config = SloppyConfig

    def setup(self, cfg: SloppyConfig):
        X, y = datasets.load(cfg.data)  # before the folder is created: a bad --data leaves no trace
        N = len(X)
        if cfg.n_train + cfg.n_test > N:
            raise ValueError(f"n_train + n_test = {cfg.n_train + cfg.n_test} exceeds the {N} images of {cfg.data!r}.")
        for name, v in (("easy", cfg.easy), ("hard", cfg.hard)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < N):
                raise ValueError(f"{name} must be a dataset index in [0, {N}), got {v!r}.")
        return X, y

    def config_json(self, cfg: SloppyConfig, inputs) -> dict:
        return {
            "experiment": "sloppy", "quick": cfg.quick, "seed": cfg.seed, "data": str(cfg.data),
            "networks": cfg.networks, "epochs": cfg.epochs, "n_train": cfg.n_train, "n_test": cfg.n_test,
            "hidden": [list(h) for h in cfg.hidden], "batch_size": cfg.batch_size, "lr": cfg.lr, "easy": cfg.easy,
            "hard": cfg.hard, "n_gram": cfg.n_gram, "top_k": cfg.top_k, "eigenvectors": cfg.eigenvectors,
            "optimizer": "Adam", "loss": "0.5 |softmax(z) - onehot|^2 (Luzzatto 2023, eq 4.4)",
            "fisher": "per input: Gaussian sigma=1 on softmax p (Luzzatto 2023, eq 4.6) and categorical on logits; "
                      "float64",
        }

    def compute(self, cfg: SloppyConfig, run: StudyRun) -> dict:
        X, y = run.inputs
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(cfg.seed))
        te_idx, tr_idx = perm[: cfg.n_test], perm[cfg.n_test : cfg.n_test + cfg.n_train]
        C, d = int(y.max()) + 1, X.shape[1]
        data = _Data(X, y, te_idx, tr_idx, C, d, [arch_name(d, h, C) for h in cfg.hidden])
        nets = _train_all(cfg, data, run)
        acc, picks = _pick_inputs(cfg, data, nets)
        spec_rows, net_rows, checks = _per_input(cfg, data, nets, acc, picks, run)
        avg_rows, avg_vecs = _averaged(cfg, data, nets, run)
        metrics = _metrics(data.archs, spec_rows, net_rows, avg_rows, cfg.networks)
        run.write_csv("metrics.csv", metrics)
        run.write_csv("networks.csv", net_rows)
        run.write_csv("spectra.csv", spec_rows)
        run.write_csv("averaged.csv", avg_rows)
        return {"data": data, "picks": picks, "metrics": metrics, "net_rows": net_rows, "spec_rows": spec_rows,
                "avg_rows": avg_rows, "avg_vecs": avg_vecs, "checks": checks}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        data, cfg = r["data"], run.cfg
        _fig_inputs(run.file("sloppy_inputs.png"), data, r["picks"], r["net_rows"])
        for name, norm in (("sloppy_ladders.png", False), ("sloppy_ladders_normalised.png", True)):
            _fig_ladders(run.file(name), data, r["spec_rows"], norm)
        _fig_stats(run.file("sloppy_stats.png"), data, r["spec_rows"])
        _fig_eigenvectors(run.file("sloppy_eigenvectors.png"), cfg, data, r["avg_vecs"], r["checks"]["vectors"])
        _fig_averaged(run.file("sloppy_averaged.png"), cfg, data, r["avg_rows"], r["spec_rows"])
        return FIGURES

    def report(self, r: dict, run: StudyRun) -> str:
        times = {**run.laps, "total": run.elapsed()}
        return _summary(run.cfg, r["data"].archs, r["picks"], r["metrics"], r["net_rows"], r["avg_rows"],
                        r["checks"], times, r["data"].C, run.figures)


def sloppy(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True, **options) -> Path:
    """Sloppy spectra of trained MNIST classifiers (Luzzatto 2023, §4.3–4.4); write a run folder.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (2 networks of 784-10, 784-2-10, 784-4-10; 2 epochs on 300 images).
        seed: seeds the split, the initialisations, the batch orders and the subsets (runs are deterministic).
        progress: tqdm progress bar.
        **options: the fields of :class:`SloppyConfig` (``networks``, ``hidden``, ``easy``, ``top_k``, ...).

    Returns:
        Path of the run folder: ``config.json``, ``metrics.csv`` (one row per architecture × input × output
        model), ``networks.csv``, ``spectra.csv`` (every eigenvalue), ``averaged.csv``, ``networks.pt`` (the
        trained weights, stacked per architecture), six PNGs and ``summary.md``.
    """
    return run_study(Sloppy, out, quick, seed, progress=progress, **options)


# ----------------------------------------------------------------------------- aggregation
def _ladders(spec_rows, arch, inp, lik) -> np.ndarray:
    sel = [r for r in spec_rows if (r["arch"], r["input"], r["likelihood"]) == (arch, inp, lik)]
    K = max(r["network"] for r in sel) + 1
    out = np.zeros((K, max(r["i"] for r in sel)))
    for r in sel:
        out[r["network"], r["i"] - 1] = r["eigenvalue"]
    return out


def _resolved(spec_rows, arch, inp, lik) -> np.ndarray:
    sel = [r for r in spec_rows if (r["arch"], r["input"], r["likelihood"]) == (arch, inp, lik)]
    K = max(r["network"] for r in sel) + 1
    out = np.zeros(K, dtype=int)
    for r in sel:
        out[r["network"]] += int(r["resolved_f64"])
    return out


def _metrics(archs, spec_rows, net_rows, avg_rows, K) -> list[dict]:
    rows = []
    for arch in archs:
        for inp in ("easy", "hard"):
            for lik in LIKELIHOODS:
                L = _ladders(spec_rows, arch, inp, lik)
                dec = np.log10(L[:, 0] / L[:, -1])
                stiff = (L >= STIFF * L[:, :1]).sum(1)
                gaps = np.log10(L[:, :-1] / L[:, 1:])
                res = _resolved(spec_rows, arch, inp, lik)
                rows.append({
                    "arch": arch, "input": inp, "likelihood": lik, "networks": K, "rank": L.shape[1],
                    "lambda_max_median": float(np.median(L[:, 0])), "lambda_min_median": float(np.median(L[:, -1])),
                    "decades_mean": float(dec.mean()), "decades_sd": float(dec.std(ddof=1)) if K > 1 else 0.0,
                    "decades_min": float(dec.min()), "decades_max": float(dec.max()),
                    "n_within_1e-3_mean": float(stiff.mean()), "n_within_1e-3_min": int(stiff.min()),
                    "n_within_1e-3_max": int(stiff.max()), "mean_gap_decades": float(gaps.mean()),
                    "max_gap_decades": float(gaps.max()), "resolved_f64_mean": float(res.mean()),
                    "resolved_f64_min": int(res.min()),
                })
    for arch in archs:
        for lik in LIKELIHOODS:
            for src in ("gram_subset", "lanczos_full"):
                ev = np.array([r["eigenvalue"] for r in avg_rows
                               if (r["arch"], r["likelihood"], r["source"]) == (arch, lik, src)])
                res = np.array([r["resolved_f64"] for r in avg_rows
                                if (r["arch"], r["likelihood"], r["source"]) == (arch, lik, src)])
                if not len(ev):
                    continue
                evr = ev[res]
                at_floor = src == "gram_subset" and evr[-1] < 100 * len(ev) * EPS * ev[0]
                rows.append({
                    "arch": arch, "input": f"averaged:{src}", "likelihood": lik, "networks": 1, "rank": len(evr),
                    "at_float64_floor": bool(at_floor),
                    "lambda_max_median": float(ev[0]), "lambda_min_median": float(evr[-1]),
                    "decades_mean": float(np.log10(ev[0] / evr[-1])),
                    "n_within_1e-3_mean": float((ev >= STIFF * ev[0]).sum()),
                    "resolved_f64_mean": float(res.sum()),
                })
    return rows


# ----------------------------------------------------------------------------- figures
def _side(d: int) -> int | None:
    """The side of a square image of ``d`` pixels, or ``None`` when ``d`` is not a square."""
    side = int(round(math.sqrt(d)))
    return side if side * side == d else None


def _fig_inputs(path: Path, data: _Data, picks: dict, net_rows: list[dict]) -> None:
    side = _side(data.d)
    fig = Figure(figsize=(7.5, 3.8))
    axes = fig.subplots(1, 2)
    for ax, inp in zip(axes, ("easy", "hard"), strict=True):
        p = picks[inp]
        if side:
            ax.imshow(data.X[p["index"]].reshape(side, side).numpy(), cmap="gray_r")
        preds = []
        for arch in data.archs:
            nr = [r for r in net_rows if r["arch"] == arch]
            ok = sum(r[f"{inp}_pred"] == p["label"] for r in nr)
            preds.append(f"{arch}: {ok}/{len(nr)} correct")
        ax.set_title(f"{inp}: index {p['index']} ({p['split']}), label {p['label']}\n" + "\n".join(preds),
                     fontsize=8)
        ax.axis("off")
    save_png(fig, path)


def _fig_ladders(path: Path, data: _Data, spec_rows: list[dict], norm: bool) -> None:
    """The per-input ladders, absolute or normalised by λ_max."""
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2, sharey=norm)
    for r, lik in enumerate(LIKELIHOODS):
        for c, inp in enumerate(("easy", "hard")):
            ax = axes[r, c]
            for a, arch in enumerate(data.archs):
                L = _ladders(spec_rows, arch, inp, lik)
                if norm:
                    L = L / L[:, :1]
                idx = np.arange(1, L.shape[1] + 1) + 0.08 * (a - 1)
                for row in L:
                    ax.plot(idx, row, "-", color=COLORS[a % 6], alpha=0.25, lw=0.8)
                ax.plot(idx, np.median(L, 0), "o-", color=COLORS[a % 6], lw=2, ms=4, label=arch)
            if norm:
                ax.axhline(data.C * EPS, color="black", ls=":", lw=1, label="float64 limit C·ε")
                ax.axhline(STIFF, color="gray", ls="--", lw=1, label="10⁻³")
            ax.set_yscale("log")
            ax.set_xlabel("eigenvalue rank i")
            ax.set_ylabel("λ_i / λ_1" if norm else "λ_i")
            ax.set_title(f"{inp} input — {LIK_LABEL[lik]}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=8, frameon=False)
    fig.suptitle("All nonzero per-input FIM eigenvalues (rank C−1 = 9); thin: single networks, thick: median")
    save_png(fig, path)


def _patch(color):
    """A legend handle for a filled box of ``color``."""
    from matplotlib.patches import Patch

    return Patch(facecolor=color, alpha=0.6)


def _fig_stats(path: Path, data: _Data, spec_rows: list[dict]) -> None:
    """Decades and stiff counts per architecture (boxes over the ensemble)."""
    archs = data.archs
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    groups = [(inp, lik) for inp in ("easy", "hard") for lik in LIKELIHOODS]
    for ax, what in zip(axes, ("decades", "stiff"), strict=True):
        for gi, (inp, lik) in enumerate(groups):
            values, pos = [], []
            for a, arch in enumerate(archs):
                L = _ladders(spec_rows, arch, inp, lik)
                v = np.log10(L[:, 0] / L[:, -1]) if what == "decades" else (L >= STIFF * L[:, :1]).sum(1)
                values.append(v)
                pos.append(gi * (len(archs) + 1) + a)
            bp = ax.boxplot(values, positions=pos, widths=0.7, patch_artist=True, showfliers=True)
            for a, patch in enumerate(bp["boxes"]):
                patch.set_facecolor(COLORS[a % 6])
                patch.set_alpha(0.6)
        ax.set_xticks([gi * (len(archs) + 1) + (len(archs) - 1) / 2 for gi in range(len(groups))],
                      [f"{inp}\n{lik}" for inp, lik in groups])
        ax.set_ylabel("decades log10(λ_max/λ_min)" if what == "decades" else "# eigenvalues ≥ 10⁻³ λ_max")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend([_patch(COLORS[a % 6]) for a in range(len(archs))], archs, fontsize=8, frameon=False)
    fig.suptitle("Per-input sloppiness over the ensemble")
    save_png(fig, path)


def _fig_eigenvectors(path: Path, cfg: SloppyConfig, data: _Data, avg_vecs: dict, per_input_vec: dict) -> None:
    """Top eigenvectors of the data-averaged FIM as input-space images (first-layer row of largest norm)."""
    side, d = _side(data.d), data.d
    nv = min(cfg.eigenvectors, min(len(v[0]) for v in avg_vecs.values()))
    fig = Figure(figsize=(2.1 * (nv + 2), 2.4 * len(data.archs)))
    axes = fig.subplots(len(data.archs), nv + 2, squeeze=False)
    for a, (arch, h) in enumerate(zip(data.archs, cfg.hidden, strict=True)):
        rows_out = h[0] if h else data.C
        vals, vecs = avg_vecs[arch]
        for j in range(nv + 2):
            ax = axes[a, j]
            ax.axis("off")
            if j < nv:
                W = vecs[: rows_out * d, j].reshape(rows_out, d)
                r = int(W.norm(dim=1).argmax())
                img, title = W[r], f"v{j + 1} ({'class' if not h else 'unit'} {r})\nλ={float(vals[j]):.3g}"
            else:
                inp = ("easy", "hard")[j - nv]
                img, title = per_input_vec[f"{arch}|{inp}"], f"per-input v1, {inp}"
            if side:
                m = float(img.abs().max()) or 1.0
                ax.imshow(img.reshape(side, side).numpy(), cmap="RdBu_r", vmin=-m, vmax=m)
            ax.set_title(title, fontsize=7)
        axes[a, 0].text(-0.15, 0.5, arch, transform=axes[a, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=9)
    fig.suptitle("Top eigenvectors of the data-averaged FIM (training subset, categorical, network 0): first-layer "
                 "row of largest norm; last two columns: per-input top eigenvector (a multiple of the input)",
                 fontsize=9)
    save_png(fig, path)


def _fig_averaged(path: Path, cfg: SloppyConfig, data: _Data, avg_rows: list[dict], spec_rows: list[dict]) -> None:
    """Data-averaged vs per-input ladders."""
    archs = data.archs
    fig = Figure(figsize=(5 * len(archs), 8))
    axes = fig.subplots(2, len(archs), squeeze=False)
    for r, lik in enumerate(LIKELIHOODS):
        for a, arch in enumerate(archs):
            ax = axes[r, a]
            for src, style, lab in (("gram_subset", "-", f"training subset (n={cfg.n_gram}), exact Gram"),
                                    ("lanczos_full", "o", f"whole training set (n={cfg.n_train}), Lanczos")):
                sel = [x for x in avg_rows if (x["arch"], x["likelihood"], x["source"]) == (arch, lik, src)]
                if not sel:
                    continue
                ev = np.array([x["eigenvalue"] for x in sel])
                ok = np.array([x["resolved_f64"] for x in sel])
                ev = np.where(ok, ev, np.nan)
                ax.plot(np.arange(1, len(ev) + 1), ev, style, ms=3, lw=1.5, label=lab)
            for inp, col in (("easy", "tab:green"), ("hard", "tab:red")):
                L = _ladders(spec_rows, arch, inp, lik)[0]
                ax.plot(np.arange(1, len(L) + 1), L, "s--", ms=3, color=col, lw=1, label=f"single {inp} input")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("eigenvalue rank i")
            ax.set_ylabel("λ_i")
            ax.set_title(f"{arch}, network 0 — {LIK_LABEL[lik]}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
    axes[1, 0].legend(fontsize=7, frameon=False)
    save_png(fig, path)


def _verdict(dec: float, stiff: float, rank: int) -> str:
    if dec >= 6 and stiff <= rank / 2:
        return "**yes**"
    if dec >= 3:
        return "partly"
    return "no"


# ----------------------------------------------------------------------------- summary
def _accuracy_and_inputs(archs: list[str], picks: dict, net_rows: list[dict]) -> list[str]:
    """The test-accuracy table and the description of the two inputs."""
    lines = ["## Test accuracy", "", "| architecture | P | test accuracy (mean ± s.d.) | min | max |",
             "|---|---|---|---|---|"]
    for arch in archs:
        nr = [r for r in net_rows if r["arch"] == arch]
        a = np.array([r["test_acc"] for r in nr])
        sd = a.std(ddof=1) if len(a) > 1 else 0.0
        lines.append(f"| {arch} | {nr[0]['P']} | {a.mean():.4f} ± {sd:.4f} | {a.min():.4f} | {a.max():.4f} |")
    lines += ["", "(Luzzatto 2023: 0.96 for 784-25-10 trained on all 60,000 images.)", "", "## The two inputs", ""]
    for inp in ("easy", "hard"):
        p = picks[inp]
        how = ("automatic: largest ensemble-mean probability of the true class among the held-out images"
               if inp == "easy" else
               "automatic: smallest ensemble-mean largest class probability max_k p_k among the held-out images, "
               "i.e. the least confident prediction")
        cells = []
        for arch in archs:
            nr = [r for r in net_rows if r["arch"] == arch]
            ok = sum(r[f"{inp}_pred"] == p["label"] for r in nr)
            pt = np.median([r[f"{inp}_p_true"] for r in nr])
            pmin = np.median([r[f"{inp}_p_min"] for r in nr])
            cells.append(f"{arch}: {ok}/{len(nr)} correct, median p(true) {pt:.3g}, median min_k p_k {pmin:.2g}")
        lines.append(f"- **{inp}**: dataset index {p['index']} ({p['split']} image), label {p['label']} "
                     f"({how if p['auto'] else 'given by index'}). " + "; ".join(cells) + ".")
    return lines


def _per_input_table(archs: list[str], m: dict, C: int) -> list[str]:
    lines = [
        "## Per-input spectra (ensemble over networks)",
        "",
        "Decades = log10(λ_max/λ_min) over the 9 nonzero eigenvalues; stiff = number of eigenvalues ≥ 10⁻³ λ_max; "
        "gap = mean log10(λ_i/λ_{i+1}); f64 = how many of the 9 the plain float64 Gram route "
        "(`fl.eigenvalues(..., method=\"gram\")`) resolves above its numerical-rank threshold "
        f"τ = C·ε·λ_max = {C}·{EPS:.2g}·λ_max (mean, min over networks).",
        "",
        "| architecture | input | output model | median λ_max | decades mean ± s.d. [min, max] | stiff mean "
        "[min, max] | gap | f64 resolves |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch in archs:
        for inp in ("easy", "hard"):
            for lik in LIKELIHOODS:
                r = m[(arch, inp, lik)]
                lines.append(
                    f"| {arch} | {inp} | {lik} | {r['lambda_max_median']:.3g} | {r['decades_mean']:.1f} ± "
                    f"{r['decades_sd']:.1f} [{r['decades_min']:.1f}, {r['decades_max']:.1f}] | "
                    f"{r['n_within_1e-3_mean']:.1f} [{r['n_within_1e-3_min']}, {r['n_within_1e-3_max']}] | "
                    f"{r['mean_gap_decades']:.2f} | {r['resolved_f64_mean']:.1f} ({r['resolved_f64_min']}) |")
    return lines


def _averaged_table(cfg: SloppyConfig, archs: list[str], m: dict, avg_rows: list[dict], C: int) -> list[str]:
    lines = [
        "## Data-averaged FIM (network 0 of each architecture)",
        "",
        f"`gram_subset`: all n·C = {cfg.n_gram * C} eigenvalues of the FIM averaged over a random subset of "
        f"n = {cfg.n_gram} training images (exact Gram dual, float64; rank ≤ n·(C−1); counted above its "
        f"threshold n·C·ε·λ_max). `lanczos_full`: the top {cfg.top_k} eigenvalues of the categorical FIM "
        f"averaged over all {cfg.n_train} training images (matrix-free Lanczos on a float32 copy, relative "
        "tolerance 1e-5; the full P × P spectrum is not computed — a dense float64 eigh of the 784-25-10 FIM "
        "would need 3.2 GB and minutes). Subspace overlap ‖V_subsetᵀ V_full‖_F² / k of the top-k eigenvectors "
        "(k = min(top_k, eigenvectors); 1 = same eigenspace; the top eigenvalues are close, so single "
        "eigenvectors are not comparable): "
        + (", ".join(f"{r['arch']}: {r['subspace_overlap']:.2f}" for r in avg_rows
                     if r["source"] == "lanczos_full" and r.get("subspace_overlap") is not None)
           or "not computed (top_k = 0)") + ". "
        "A decade count marked ≥ reaches the float64 floor of the Gram route (smaller eigenvalues exist but "
        "are not resolved).",
        "",
        "| architecture | output model | source | λ_max | resolved eigenvalues | decades spanned by them | "
        "# ≥ 10⁻³ λ_max |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in archs:
        for lik in LIKELIHOODS:
            for src in ("gram_subset", "lanczos_full"):
                if (arch, f"averaged:{src}", lik) not in m:
                    continue
                r = m[(arch, f"averaged:{src}", lik)]
                n_st = int(r["n_within_1e-3_mean"])
                st = f"≥ {n_st} (all computed)" if src == "lanczos_full" and n_st >= r["rank"] else str(n_st)
                ge = "≥ " if r.get("at_float64_floor") else ""
                lines.append(f"| {arch} | {lik} | {src} | {r['lambda_max_median']:.3g} | {int(r['resolved_f64_mean'])}"
                             f" | {ge}{r['decades_mean']:.1f} | {st} |")
    return lines


def _sloppy_verdicts(archs: list[str], m: dict) -> list[str]:
    lines = ["## Are these networks sloppy?", ""]
    for arch in archs:
        parts = []
        for lik in LIKELIHOODS:
            for inp in ("easy", "hard"):
                r = m[(arch, inp, lik)]
                parts.append(f"{inp}/{lik}: {r['decades_mean']:.1f} decades, {r['n_within_1e-3_mean']:.1f} of "
                             f"{r['rank']} stiff ({_verdict(r['decades_mean'], r['n_within_1e-3_mean'], r['rank'])})")
        g = m[(arch, "averaged:gram_subset", "categorical")]
        lz = m.get((arch, "averaged:lanczos_full", "categorical"))
        full = ""
        if lz is not None:
            n_lz = int(lz["n_within_1e-3_mean"])
            full = (f"; over the whole training set {'all ' if n_lz >= lz['rank'] else ''}{n_lz} of the top "
                    f"{lz['rank']} (Lanczos) are within 10⁻³, λ_max {lz['lambda_max_median']:.3g}")
        lines.append(
            f"- **{arch}** — per input: " + "; ".join(parts) + ". Averaged over inputs (categorical): the subset "
            f"FIM has {int(g['resolved_f64_mean'])} resolved eigenvalues over "
            f"{'≥ ' if g.get('at_float64_floor') else ''}{g['decades_mean']:.1f} decades, "
            f"{int(g['n_within_1e-3_mean'])} of them within 10⁻³ of λ_max{full}.")
    lines += [
        "",
        "Rule used for the verdict per input: **yes** when the 9 nonzero eigenvalues span ≥ 6 decades and at most "
        "half of them lie within 10⁻³ of λ_max; *partly* for 3–6 decades; *no* below. All P − 9 other directions "
        "are exactly flat for a single input (rank 9), which is sloppiness of a trivial kind; the ladder of the 9 "
        "is the nontrivial part.",
    ]
    return lines


def _directions_and_checks(checks: dict) -> list[str]:
    return [
        "## What the stiff directions look like",
        "",
        "For one input, the first-layer block of every FIM eigenvector is an outer product (vector over hidden "
        "units or classes) ⊗ x, since ∂z/∂W₁ = (∂z/∂a₁) xᵀ: each row is a multiple of the input image itself. "
        f"Measured: the largest-norm first-layer row of every per-input top eigenvector has |cos| ≥ "
        f"{checks['x_cos']:.12f} with x. The data-averaged FIM's top eigenvectors mix many inputs; their "
        "first-layer rows are drawn in `sloppy_eigenvectors.png`.",
        "",
        "## Checks",
        "",
        f"- Float64 Gram route vs the accurate reduced route, on every eigenvalue ≥ 10⁻⁸ λ_max: max relative "
        f"deviation {checks['lib_dev']:.1e} ({'ok' if checks['lib_dev'] < 1e-6 else '**CHECK**'}).",
        f"- Pseudo-determinant identity Π_i λ_i(F_cat) = (Π_k π_k)·det(J_u J_uᵀ): max |log difference| "
        f"{checks['pdet_dev']:.1e} ({'ok' if checks['pdet_dev'] < 1e-8 else '**CHECK**'}) — it ties the smallest "
        "eigenvalues to the softmax probabilities independently of any eigensolver.",
    ]


def _summary(cfg: SloppyConfig, archs, picks, metrics, net_rows, avg_rows, checks, times, C, figures) -> str:
    m = {(r["arch"], r["input"], r["likelihood"]): r for r in metrics}
    lines = [
        "# Are these networks sloppy?  Per-input and data-averaged FIM spectra (Luzzatto 2023, §4.3–4.4)",
        "",
        f"Data `{cfg.data}`: {cfg.n_train} training / {cfg.n_test} held-out images (Luzzatto 2023: 60,000 / "
        f"10,000 of full MNIST). {cfg.networks} networks per architecture ({', '.join(archs)}; ReLU hidden layer, "
        f"softmax outputs), loss ½‖softmax(z) − onehot‖² (Luzzatto 2023, eq 4.4), Adam lr {cfg.lr}, batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}{' (quick mode)' if cfg.quick else ''}. "
        f"Wall time {times['total']:.1f} s (training {times['train']:.1f} s, per-input spectra "
        f"{times['per_input']:.1f} s, data-averaged FIM {times['averaged']:.1f} s).",
        "",
        "Per-input FIM (float64): **Gaussian** F = J_pᵀJ_p on the softmax probabilities (Luzzatto 2023, eq 4.6, σ = 1) "
        "and **categorical** F = J_zᵀ(diag π − ππᵀ)J_z on the logits. Both have rank C − 1 = "
        f"{C - 1} (Σ_k p_k = 1), so every input has exactly {C - 1} nonzero eigenvalues; all of them are reported, "
        "computed from the reduced (C−1)×(C−1) dual matrix in 50-digit arithmetic from float64 Jacobians "
        "(see the module docstring of `fisherlens.experiments.sloppy`).",
        "",
        *_accuracy_and_inputs(archs, picks, net_rows),
        "",
        *_per_input_table(archs, m, C),
        "",
        *_averaged_table(cfg, archs, m, avg_rows, C),
        "",
        *_sloppy_verdicts(archs, m),
        "",
        *_directions_and_checks(checks),
        "",
        *figures_section(figures),
        "Tables: [metrics.csv](metrics.csv), [networks.csv](networks.csv), [spectra.csv](spectra.csv) (every "
        "eigenvalue, accurate and float64-Gram), [averaged.csv](averaged.csv); weights: `networks.pt` "
        "(`torch.load(..., weights_only=True)`); settings: [config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
