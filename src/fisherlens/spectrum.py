"""Fisher spectra: dense, the exact Gram (dual) route, Lanczos top-k, stochastic Lanczos quadrature.

Duality (docs/conventions.md#gram-duality; the dual matrix of Karakida et al. 2019): stacking the factor rows
``Ĵ = [V_1ᵀ J_1; …; V_Nᵀ J_N]`` (NK × P), ``F = (1/N) Ĵᵀ Ĵ`` and the NK × NK Gram matrix ``(1/N) Ĵ Ĵᵀ`` share
their nonzero eigenvalues; an eigenvector ``w`` of the Gram with eigenvalue λ gives the Fisher eigenvector
``Ĵᵀ w / √(N λ)``. When P ≫ NK this is the *whole* nonzero spectrum, exactly (Luzzatto 2023, §4.3, could compute
8 of 19,885 eigenvalues of a per-input FIM).

"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import eigsh

from . import structure as mlp_structure
from ._core import (
    FactorRows,
    Request,
    check_choice,
    check_dense,
    iter_batches,
    output_dim,
    scipy_blas_one_thread,
    work_budget,
)
from .fisher import fisher_matrix
from .operator import FisherOperator
from .results import SpectralDensity

Tensor = torch.Tensor

__all__ = ["eigenvalues", "top_lanczos", "spectral_density", "SpectralDensity", "spectrum_stats",
           "critical_learning_rate"]

METHODS = ("auto", "dense", "gram", "lanczos")
#: ``engine=`` of :func:`eigenvalues`: the generic engines of :mod:`fisherlens._core` plus the structured route.
EIG_ENGINES = ("auto", "structure", "generic", "layerwise", "functional")


def _n_samples(data) -> int | None:
    if isinstance(data, Tensor):
        return len(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return len(data[0])
    try:
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None


def _descending(vals: Tensor, vecs: Tensor | None, k: int | None):
    order = torch.argsort(vals, descending=True)
    if k is not None:
        order = order[:k]
    vals = vals[order].clamp_min(0.0)  # F is PSD: negative values are round-off
    return vals, None if vecs is None else vecs[:, order]


def _gram_eigen(run: Request, k: int | None, vectors: bool, max_memory: int | None):
    R = FactorRows(run, "Use method='lanczos' with k= (matrix-free: one all-reduce per product)", max_memory)
    _check_gram(int(R.offs[-1]), max_memory)
    G = R.gram()
    return _gram_solve(G.mul_(run.scale(R.n)), k, vectors, R.rmv, run.fm.dtype)  # rows counted the predictions


def _check_gram(M: int, max_memory: int | None) -> None:
    """Refuse, before allocating, the float64 ``M × M`` Gram matrix (the same message on every route)."""
    check_dense(f"the Gram matrix of N·K = {M} rows (float64)", M * M, 8,
                "Use method='lanczos' with k=, or fewer inputs", max_memory)


def _gram_scale(run: Request, n: int) -> float:
    """The structured route's scale (plain outputs, one prediction per input: ``m = n``)."""
    return run.scale(n, n)


def _gram_solve(G: Tensor, k: int | None, vectors: bool, pullback, dtype) -> tuple[Tensor, Tensor | None]:
    """Eigenpairs of the (scaled) float64 Gram ``G``, descending (top ``k``), returned in ``dtype``, and the Fisher
    eigenvectors ``u = Ĵᵀ w / ‖Ĵᵀ w‖`` (columns ``(P, k)``) from ``pullback(W) = Ĵᵀ W`` (``W`` in ``dtype``).
    Without vectors only ``eigvalsh`` runs (for N·K = 10⁴ about ten times faster than ``eigh``)."""
    if not vectors:
        vals, _ = _descending(torch.linalg.eigvalsh(G), None, k)
        return vals.to(dtype), None
    vals, W = torch.linalg.eigh(G)
    vals, W = _descending(vals, W, k)
    U = pullback(W.to(dtype))
    return vals.to(dtype), U / U.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)


def _structure_reason(run: Request) -> str | None:
    """``None`` when :mod:`fisherlens.structure` computes exactly the Gram of ``run``; else why it does not.

    Decided before any data is read: the model passes the structure's own parser (:data:`structure.SUPPORTED`),
    every selected parameter is a trainable parameter of one of its Linear layers (any subset of them: the Gram
    then sums only their layers' kernels), all Linear parameters share the selected ones' dtype and device, and the
    kind is ``"true"`` or ``"empirical"`` (``"mc"`` is left to the generic route: it draws the labels chunk by
    chunk, and the structured route would draw them in one call, hence a different sample)."""
    if run.shards is not None:
        return "under a process group the generic route gathers the factor rows of every rank"
    if run.kind == "mc":
        return "kind='mc' draws its labels per chunk of the generic route; the structured route cannot repeat them"
    if run.reduction == "per_prediction" or run.fm.output is not None:
        return "the structured route takes plain (B, C) outputs normalised per input"
    try:
        _, layers, _ = mlp_structure.parse_mlp(run.fm.model)
    except (TypeError, ValueError) as e:
        return str(e)
    owned = {n for ly in layers for n in (ly.wname, ly.bname) if n is not None}
    missing = [n for n in run.fm.names if n not in owned]
    if missing:
        return f"the selected parameters {missing} are not trainable parameters of the MLP's Linear layers"
    if any(p.dtype != run.fm.dtype or p.device != run.fm.device for ly in layers for p in ly.linear.parameters()):
        return "the Linear layers do not all share one dtype and device"
    return None


def _gather(run: Request) -> tuple[list, Tensor | None, Tensor | None]:
    """Read the data once: ``(batches, X, Y)``, ``X (N, ...)`` floating inputs and labels ``Y`` (``kind="empirical"``
    only) concatenated, or ``X = None`` when the batches cannot be joined into one floating tensor."""
    batches = list(run.batches(check=False))
    try:
        X = torch.cat([b[0] for b in batches])
        Y = torch.cat([b[1] for b in batches]) if run.kind == "empirical" else None
    except (RuntimeError, TypeError):
        return batches, None, None
    return batches, (X if torch.is_floating_point(X) else None), Y


def _precheck_gram(run: Request, max_memory: int | None) -> None:
    """For tensor data (N known without reading it), refuse a Gram too large for ``max_memory`` before the
    structured route gathers the inputs; other data are checked by :func:`_structured_gram`."""
    data = run.data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = data[0]
    if not isinstance(data, Tensor):
        return
    try:
        N, K, _ = mlp_structure.factor_sizes(run.fm.model, data, run.likelihood, run.kind)
    except (TypeError, ValueError):
        return  # the route itself decides (and explains)
    _check_gram(N * K, max_memory)


def _structured_gram(run: Request, X: Tensor, Y: Tensor | None, k: int | None, vectors: bool,
                     max_memory: int | None, strict: bool):
    """The Gram route on :func:`fisherlens.structure.factors` (Khatri–Rao factors, no autograd, no P-wide rows):
    the same Gram ``scale · Ĵ Ĵᵀ`` (block ``(n, m) = Σ_l M_{l,n} M_{l,m}ᵀ κ_l(n, m)``, structure's module doc) and
    the same eigenvector normalisation as :func:`_gram_eigen`, restricted to the selected parameters.
    Returns ``None`` (``strict=False``) when the factors refuse these inputs, so that the generic route decides.
    The Gram's size comes from the shapes (:func:`fisherlens.structure.factor_sizes`): a Gram too large for
    ``max_memory`` is refused before any factor is built."""
    try:
        N, K, _ = mlp_structure.factor_sizes(run.fm.model, X, run.likelihood, run.kind)
    except (TypeError, ValueError):
        if strict:
            raise
        return None
    _check_gram(N * K, max_memory)
    try:
        fa = mlp_structure.factors(run.fm.model, X, run.likelihood, run.kind, y=Y)
    except (TypeError, ValueError):
        if strict:
            raise
        return None
    fm = run.fm
    fa = replace(fa, names=list(fm.names), shapes={n: fm.shapes[n] for n in fm.names})
    G = fa.gram(_gram_scale(run, fa.N))
    return _gram_solve(G, k, vectors, lambda W: fa.pullback(W.reshape(fa.N, fa.K, -1)), fm.dtype)


def eigenvalues(
    model, data, likelihood, k: int | None = None, method: str = "auto", kind: str = "true", *,
    params=None, reduction: str = "mean", samples: int = 1, generator=None, batch_size=None, engine="auto",
    return_vectors: bool = False, tol: float = 1e-8, max_memory: int | None = None, output=None,
    group=None, distributed: bool | None = None, progress: bool = False,
):
    """Eigenvalues of the Fisher, descending (and optionally its eigenvectors, columns of ``(P, k)``).

    **Accuracy per route** (relative error of an eigenvalue λ against the same model in float64; measured on
    small float32 CNNs/MLPs, tests/test_spectrum.py).  Results come back in the model's dtype.

    * ``"gram"``: the Gram is accumulated from float64 products of the (float32) rows, and its eigenvalues are
      computed in float64.  The error is that of the float32 forward/backward passes that produce the rows:
      ~1e-7, nearly uniform over the leading eigenvalues (up to ~1e-6 with a peaked softmax, whose float32
      sandwich is itself that inexact).  A float32 ``Ĵ Ĵᵀ`` and float32 ``eigvalsh`` were ~1e-6–1e-5 on
      these models at λ ≥ 1e-3·λ_max, and ~1e-4 on a float32 ResNet-18.
    * ``"dense"``: ``eigh`` of the P×P matrix in the model's dtype: an absolute error ~1e-6·λ_max in float32,
      so ~1e-6 at the top and ~1e-6·λ_max/λ below it (2e-5 at λ = 1e-3·λ_max).
    * ``"lanczos"``: float32 Fisher–vector products, the tridiagonal's entries summed in float64 (ARPACK's whole
      iteration in float64 for ``k > 1``): ~1e-7 on the top k (plus ``tol``).
    * SLQ (:func:`spectral_density`): the error is statistical (``probes``, ``steps``), not round-off.
    * float64 models: round-off only, ~1e-14 relative at λ ≥ 1e-3·λ_max on every route (Lanczos: ``tol``).

    Args:
        k: number of leading eigenvalues; ``None``: all ``min(P, N·K)`` eigenvalues the rank allows
            (via the Gram matrix, or the dense matrix when P ≤ N·K) — every nonzero one is among them.
            ``k > P``, and on the Gram route ``k > N·K``, raise ``ValueError`` (the message gives the largest
            allowed k) instead of returning fewer values.
        method: ``"dense"`` (eigh of the P×P matrix), ``"gram"`` (the exact NK×NK dual,
            docs/conventions.md#gram-duality),
            ``"lanczos"`` (top-k, matrix-free on :func:`fisherlens.fisher_operator`; needs ``k``: for ``k = 1``
            :func:`top_lanczos`, stopped at the first product that meets ``tol``, else ``scipy.sparse.linalg.eigsh``,
            implicitly restarted Lanczos with reorthogonalisation), or ``"auto"``: dense when
            P ≤ 2048 or P ≤ N·K, else Gram when N·K ≤ 8192, else Lanczos.
        engine: how the factor rows are computed.  ``"auto"`` (default): for the Gram route (``method="gram"``, or
            ``"auto"`` resolving to it) the structured route of :mod:`fisherlens.structure` whenever it applies —
            an MLP of :data:`fisherlens.structure.SUPPORTED`, the selected parameters among its trainable Linear
            parameters, ``kind="true"`` or ``"empirical"`` (not ``"mc"``: its labels are drawn per chunk of the
            generic route), inputs that join into one floating tensor — with the same Gram ``scale · Ĵ Ĵᵀ``
            assembled from the Khatri–Rao factors ``M_l ⊗ u_l`` (Luzzatto 2023, eq 4.9) without autograd or P-wide rows
            (tens of times faster for the Gram of a 784-25-10 network), and the same eigenvector normalisation;
            otherwise, and for the other methods, the generic engine (``"generic"``).  ``"structure"``: the
            structured Gram route or a ``ValueError`` saying why it does not apply.  ``"generic"``: the generic
            engine's own choice (layerwise where it can, else functional); ``"layerwise"``/``"functional"``: that
            generic engine (see :mod:`fisherlens._core`).
        tol: relative tolerance of Lanczos on the Ritz residual, ``‖F u − θ u‖ ≤ tol · |θ|`` (ARPACK's test).
        progress: a progress bar (tqdm) counting the Fisher–vector products of Lanczos (the other routes show none).
        group, distributed: as in :func:`fisherlens.fisher_matrix`.  Under a process group every route gives every
            rank the spectrum of the union of the shards: ``"dense"`` from the all-reduced F, ``"lanczos"`` on the
            distributed operator (each rank runs the same iteration on the same products, one all-reduce per
            product), ``"gram"`` by gathering every rank's factor rows (refused, naming Lanczos, when they do not fit
            in memory); ``"auto"`` decides on the global N·K; the structured route is single-process.
        Others: as in :func:`fisherlens.fisher_matrix`.

    Returns:
        ``vals (k,)`` or ``(vals, vecs (P, k))`` with ``return_vectors=True``.  Round-off negatives are set to 0.
    """
    check_choice("method", method, METHODS)
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}.")
    check_choice("engine", engine, EIG_ENGINES)
    generic = "auto" if engine in ("auto", "structure", "generic") else engine
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine=generic, output=output,
                  group=group, distributed=distributed, progress=progress)
    P = run.fm.P
    if k is not None and k > P:
        raise ValueError(f"k={k} is larger than the number of parameters P = {P}: the Fisher has only {P} "
                         f"eigenvalues. Pass k <= {P}, or k=None for all of them.")
    NK = None
    if method == "auto":
        NK = _factor_count(run, data)
        if P <= 2048 or (NK is not None and P <= NK):
            method = "dense"
        elif NK is None or NK <= 8192:
            method = "gram"
        else:
            method = "lanczos"
            if k is None:
                raise ValueError(f"The full spectrum needs an N·K = {NK} Gram matrix; pass k= for Lanczos top-k.")
    if engine == "structure" and method != "gram":
        raise ValueError(f"engine='structure' computes the Gram route only, not method={method!r}; "
                         "pass method='gram'.")
    if method == "gram" and k is not None and (
        isinstance(data, Tensor) or (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor))
    ):  # N·K known before reading the data (other data: checked on the result, below)
        if NK is None:
            NK = _factor_count(run, data)
        if k > NK:
            raise ValueError(f"k={k} is larger than N·K = {NK}, the size of the Gram matrix: method='gram' gives "
                             f"at most {NK} eigenvalues (the other P - {NK} are 0). Pass k <= {NK}, or "
                             "method='dense' for the zeros too.")
    if method == "dense":
        F = fisher_matrix(model, data, likelihood, kind, params=params, reduction=reduction, samples=samples,
                          generator=generator, batch_size=batch_size, engine=generic, max_memory=max_memory,
                          **run.sharding)
        vals, vecs = torch.linalg.eigh(F)
        vals, vecs = _descending(vals, vecs if return_vectors else None, k)
    elif method == "gram":
        out = None
        if engine in ("auto", "structure"):
            reason = _structure_reason(run)
            if reason is not None and engine == "structure":
                raise ValueError(f"engine='structure' does not apply here: {reason}")
            if reason is None:
                _precheck_gram(run, max_memory)  # tensors: refused before the data are gathered
                batches, X, Y = _gather(run)  # the data is read once, then served from memory
                if X is None and engine == "structure":
                    raise ValueError("engine='structure' needs the batches to join into one floating tensor of "
                                     "inputs (N, ...).")
                if X is not None:
                    out = _structured_gram(run, X, Y, k, return_vectors, max_memory, strict=engine == "structure")
                run.data = batches  # the generic route (if still needed) reads the gathered batches
        vals, vecs = out if out is not None else _gram_eigen(run, k, return_vectors, max_memory)
    else:
        if k is None:
            raise ValueError("method='lanczos' computes the top-k eigenvalues: pass k=.")
        if k >= P:
            raise ValueError(f"Lanczos needs k < P = {P}; use method='dense' for the whole spectrum.")
        vals, vecs = _lanczos_eigen(run, k, tol)
        vals, vecs = _descending(vals, vecs if return_vectors else None, k)
    if k is not None and len(vals) < k:  # a streamed Gram route whose N·K was unknown before reading the data
        raise ValueError(f"k={k} is larger than N·K = {len(vals)}, the size of the Gram matrix: method='gram' gives "
                         f"at most {len(vals)} eigenvalues (the other P - {len(vals)} are 0). Pass k <= "
                         f"{len(vals)}, or method='dense' for the zeros too.")
    return (vals, vecs) if return_vectors else vals


def _lanczos_eigen(run: Request, k: int, tol: float) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs ``(vals (k,), vecs (P, k))`` of the Fisher operator of ``run`` by Lanczos.

    ``k = 1``: :func:`top_lanczos` in torch (no restart cycle, stopped at the first product that passes ARPACK's
    test); if its basis fills first, ARPACK goes on from its Ritz vector.  ``k > 1``: ARPACK's restarted iteration
    (``scipy.sparse.linalg.eigsh``) from the start ``1/√P``, whose restarts also find a repeated eigenvalue's
    second copy, which one Krylov sequence cannot see in exact arithmetic.  (The top eigenvalue's own multiplicity
    does not change its value.)"""
    op, P, dtype = FisherOperator(run), run.fm.P, run.fm.dtype
    v0 = torch.full((P,), 1 / math.sqrt(P), dtype=dtype, device=run.fm.device)
    ncv = min(P, max(2 * k + 1, k + 8))  # a short restart cycle: fewer products than scipy's default of 20
    with run.bar(None, f"Lanczos, top {k}", "product") as op.bar, scipy_blas_one_thread():
        if k == 1:
            basis = min(P, max(ncv, min(4 * ncv, work_budget() // (2 * P * run.fm.itemsize))))
            theta, u, converged = top_lanczos(op.matvec, v0, tol, basis)
            if converged:
                return torch.tensor([theta], dtype=dtype), u[:, None]
            v0 = u  # ARPACK restarts from the best vector found so far
        w, V = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0.double().cpu().numpy(), ncv=ncv,
                     return_eigenvectors=True)
    return torch.as_tensor(w.copy(), dtype=dtype), torch.as_tensor(V.copy(), dtype=dtype)


def top_lanczos(matvec, v0: Tensor, tol: float, basis: int) -> tuple[float, Tensor, bool]:
    """The top eigenpair of a symmetric operator by Lanczos with full reorthogonalisation, checked after every
    product.

    Builds the Krylov basis ``Q_m = [q_1 … q_m]`` of ``matvec`` from ``v0`` (``(P,)``, in the operator's dtype,
    which the basis keeps) and the tridiagonal ``T_m = Q_mᵀ A Q_m`` (its entries in float64).  The top Ritz pair
    ``(θ, Q_m s)`` of ``T_m`` has the residual norm ``β_m |s_m|``; it is returned as soon as
    ``β_m |s_m| ≤ tol · max(ε^{2/3}, |θ|)`` (ARPACK's convergence test, ``ε`` the float64 epsilon; the eigenvalue's
    error is then of order ``(tol θ)² / gap``).  Each step follows the three-term recurrence and then
    reorthogonalises the new vector against the whole basis (one classical Gram–Schmidt pass), so no spurious copies
    appear.

    Args:
        matvec: ``v (P,) -> A v``; v0: the start (need not be normalised); basis: the most vectors kept (≥ 1).

    Returns:
        ``(θ, u (P,), converged)``: with ``converged=False`` after ``basis`` products, the best pair so far
        (``u`` a unit vector: a start for a restarted method).
    """
    Q = v0.new_empty(basis, v0.numel())
    Q[0] = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    floor = torch.finfo(torch.float64).eps ** (2 / 3)
    for j in range(basis):
        w = matvec(Q[j])
        a = (w * Q[j]).sum(dtype=torch.float64)  # float64 sums: a float32 sum over P terms errs by ~√P·ε
        w = w - a.to(w.dtype) * Q[j] - (beta[-1] * Q[j - 1] if j else 0)  # the three-term recurrence
        B = Q[: j + 1]
        w = w - (B @ w) @ B  # then one pass against the whole basis ("twice is enough")
        a, b = torch.stack([a, w.square().sum(dtype=torch.float64).sqrt()]).tolist()  # one host read per product
        alpha.append(a)
        vals, S = eigh_tridiagonal(np.array(alpha), np.array(beta))
        theta, s = float(vals[-1]), S[:, -1]
        converged = b * abs(s[-1]) <= tol * max(floor, abs(theta))
        if converged or j + 1 == basis:
            break
        beta.append(b)
        Q[j + 1] = w / b
    u = torch.as_tensor(s, dtype=Q.dtype, device=Q.device) @ Q[: len(alpha)]
    return theta, u / u.norm(), converged


def _factor_count(run: Request, data) -> int | None:
    """N·K before reading the data (``None`` when N is unknown): under a process group summed over the ranks by
    one all-reduce, so that every rank takes the same route."""
    N = _n_samples(data)
    K = 0 if N is None or (N == 0 and run.shards is not None) else run.columns(_out_dim(run, data))
    if run.shards is None:
        return None if N is None else N * K
    unknown, n, k, has = run.shards.sum([int(N is None), N or 0, K, int(K > 0)], device=run.fm.device)
    return None if unknown else n * (k // has if has else 0)


def _out_dim(run: Request, data) -> int:
    X, _ = next(iter(iter_batches(data, run.fm, need_y=False, batch_size=1)))
    return output_dim(run.fm, X)


def lanczos(matmat, P: int, probes: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalisation, run for all probe columns at once.

    Args:
        matmat: ``M (P, p) -> F M``; probes: starting vectors ``(P, p)``; steps: Krylov dimension m.

    Returns:
        ``(alpha (p, m), beta (p, m-1))``: the tridiagonal matrices' diagonals (shorter if a column's
        Krylov space is exhausted: its remaining entries are zero and its beta stops).
    """
    Q = probes / probes.norm(dim=0, keepdim=True)
    basis = [Q]
    alpha, beta = [], []
    tiny = torch.finfo(Q.dtype).eps
    alive = torch.ones(Q.shape[1], dtype=torch.bool, device=Q.device)
    for j in range(steps):
        W = matmat(basis[-1])
        a = (W * basis[-1]).sum(0)
        alpha.append(a * alive)
        B = torch.stack(basis)  # (j+1, P, p)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            W = W - torch.einsum("jpc,jc->pc", B, torch.einsum("jpc,pc->jc", B, W))
        b = W.norm(dim=0)
        if j == steps - 1:
            break
        alive = alive & (b > tiny * max(1.0, float(a.abs().max())) * 10)
        beta.append(b * alive)
        basis.append(torch.where(alive, W / b.clamp_min(tiny), torch.zeros_like(W)))
        if not alive.any():
            break
    return torch.stack(alpha, 1), (torch.stack(beta, 1) if beta else Q.new_zeros(Q.shape[1], 0))


def spectral_density(
    model, data, likelihood, kind: str = "true", *, probes: int = 8, steps: int = 40, grid: int = 400,
    sigma: float | None = None, log: bool = True, floor: float | None = None, generator=None, params=None,
    reduction: str = "mean", batch_size=None, output=None, group=None, distributed: bool | None = None,
    progress: bool = False,
) -> SpectralDensity:
    """Spectral density of F by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Lin, Saad & Yang 2016).

    ``probes`` Rademacher vectors run ``steps`` Lanczos iterations together (one pass over the data per step for
    all probes); the Ritz values θ with weights τ = (first eigenvector component)² give
    ``φ(t) = (1/probes) Σ τ_j g_σ(t − θ_j)``.  With ``log=True`` (spectra span decades) the kernel acts on
    ``log10 λ``, nodes ≤ ``floor`` (default ``1e-12 · λ_max``) count as ``zero_mass``.  Cost: ``steps`` passes
    over the data, each ``probes`` Fisher–vector products batched.  ``generator`` seeds the probes (and the
    labels of ``kind="mc"``).  ``group``, ``distributed``: as in :func:`fisherlens.fisher_matrix` (the probes of the
    group's first rank are broadcast; each step's products are all-reduced).  ``progress``: a progress bar (tqdm)
    counting the products.
    """
    if not isinstance(probes, int) or probes < 1 or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"probes and steps must be positive integers, got {probes!r}, {steps!r}.")
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  generator=generator, batch_size=batch_size, engine="functional", output=output,
                  group=group, distributed=distributed, progress=progress)
    op = FisherOperator(run)  # copies the generator's state for kind="mc" labels; probes then use it
    P = run.fm.P
    steps = min(steps, P)
    v = torch.randint(0, 2, (P, probes), generator=generator).to(run.fm.dtype) * 2 - 1
    if run.shards is not None:  # the probes are Lanczos starts, not data draws: the same on every rank
        v = run.shards.broadcast(v.to(run.fm.device))
    with run.bar(steps * probes, f"SLQ, {probes} probes × {steps} steps", "product") as op.bar:
        alpha, beta = lanczos(op.matmat, P, v.to(run.fm.device), steps)
    nodes, weights = [], []
    for a, b in zip(alpha, beta, strict=True):
        m = int((b > 0).sum()) + 1 if b.numel() else 1
        T = torch.diag(a[:m]) + torch.diag(b[: m - 1], 1) + torch.diag(b[: m - 1], -1)
        th, Y = torch.linalg.eigh(T)
        pad = alpha.shape[1] - m
        nodes.append(torch.cat([th, th.new_zeros(pad)]))
        weights.append(torch.cat([Y[0] ** 2, th.new_zeros(pad)]))
    nodes_t, weights_t = torch.stack(nodes).cpu().double(), torch.stack(weights).cpu().double()
    top = float(nodes_t.max())
    if log:
        floor = floor if floor is not None else 1e-12 * max(top, 1e-300)
        keep = nodes_t > floor
        zero = float((weights_t * ~keep).sum(1).mean())
        x = torch.log10(nodes_t.clamp_min(floor))
        lo, hi = float(x[keep].min()) if keep.any() else 0.0, float(x.max())
        s = sigma if sigma is not None else max((hi - lo) / 100, 0.02)
        t = torch.linspace(lo - 5 * s, hi + 5 * s, grid, dtype=torch.float64)
        dens = (weights_t * keep)[..., None] * torch.exp(-0.5 * ((t - x[..., None]) / s) ** 2)
        dens = dens.sum((0, 1)) / (probes * s * math.sqrt(2 * math.pi))
        return SpectralDensity(10**t, dens, nodes_t, weights_t, zero, True, P)
    lo, hi = float(nodes_t.min()), top
    s = sigma if sigma is not None else max((hi - lo) / 100, 1e-12)
    t = torch.linspace(lo - 5 * s, hi + 5 * s, grid, dtype=torch.float64)
    dens = (weights_t[..., None] * torch.exp(-0.5 * ((t - nodes_t[..., None]) / s) ** 2)).sum((0, 1))
    return SpectralDensity(t, dens / (probes * s * math.sqrt(2 * math.pi)), nodes_t, weights_t, 0.0, False, P)


def spectrum_stats(eigs, dim: int | None = None) -> dict[str, float]:
    """Mean, second moment and maximum of a spectrum (Karakida et al. 2019: m_λ, s_λ, λ_max).

    ``dim`` is the matrix size P when ``eigs`` holds only the nonzero eigenvalues (the zeros still count in
    the mean ``Σλ/P`` and second moment ``Σλ²/P``); default ``len(eigs)``.  Refused (``ValueError``): no
    eigenvalues, NaN or inf among them, a ``dim`` that is not an integer ≥ ``len(eigs)``.
    """
    e = torch.as_tensor(eigs, dtype=torch.float64).reshape(-1)
    if e.numel() == 0:
        raise ValueError("spectrum_stats needs at least one eigenvalue.")
    if not torch.isfinite(e).all():
        raise ValueError(f"spectrum_stats: {int((~torch.isfinite(e)).sum())} of the {e.numel()} eigenvalues are NaN "
                         "or inf; the statistics would be too. Check the computation that produced them.")
    if dim is not None:
        try:
            integral = not isinstance(dim, bool) and float(dim).is_integer()
        except (TypeError, ValueError):
            integral = False
        if not integral:
            raise ValueError(f"dim must be an integer (the matrix size P), got {dim!r}.")
    d = e.numel() if dim is None else int(dim)
    if d < e.numel():
        raise ValueError(f"dim={dim} is smaller than the number of eigenvalues given ({e.numel()}).")
    return {"mean": float(e.sum() / d), "second_moment": float((e**2).sum() / d), "max": float(e.max())}


def critical_learning_rate(lambda_max: float, momentum: float = 0.0) -> float:
    """``η_c = 2(1 + μ)/λ_max`` (Karakida et al. 2019, Lemma 6 / eq 20): gradient descent with momentum μ
    diverges above it."""
    lam, mu = float(lambda_max), float(momentum)
    if not lam > 0 or not math.isfinite(lam):
        raise ValueError(f"lambda_max must be a positive finite number, got {lambda_max!r}.")
    if not 0 <= mu < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}.")
    return 2.0 * (1.0 + mu) / lam
