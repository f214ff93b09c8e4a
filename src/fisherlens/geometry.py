r"""Riemannian geometry of a metric ``g(θ)``: Christoffel symbols, curvature, path length.

Conventions: docs/conventions.md#curvature; the Fisher metric as the Riemannian metric of a statistical manifold
follows Sauter (2023), *Investigating the Evolution of Fisher Information for Neural Network Dynamics*, §3.2.

A *metric* is any callable ``θ (d,) -> g (d, d)`` written with torch operations (``torch.stack``, not
``torch.tensor(...)`` on entries of θ), so that ``torch.func`` can differentiate it to second order and
``vmap`` it over many θ.  :func:`fisher_metric` builds one for a model with a handful of parameters.
Everything is evaluated in float64.

Conventions (docs/conventions.md#curvature, the standard ones; the unit 2-sphere has ``R = +2``), with
``∂_k g_{ij} = dg[i, j, k]``:

* ``Γ^i_{jk} = ½ g^{im} (∂_j g_{mk} + ∂_k g_{mj} − ∂_m g_{jk})``                → ``Gamma[i, j, k]``
* ``R^a_{bcd} = ∂_c Γ^a_{db} − ∂_d Γ^a_{cb} + Γ^a_{ce} Γ^e_{db} − Γ^a_{de} Γ^e_{cb}``  → ``Riem[a, b, c, d]``
* ``R_{bd} = R^a_{bad}`` (Ricci)                                           → ``Ric[b, d]``
* ``R = g^{bd} R_{bd}`` (scalar curvature; in 2-D ``R = 2K``, twice the Gaussian curvature).

How it is computed: one nested forward-mode Jacobian of the metric gives ``g``, ``∂g`` and ``∂∂g`` at once
(``torch.func.jacfwd`` twice, ``has_aux``); then ``∂_l Γ = g⁻¹(−∂_l g Γ + ½ ∂_l T)`` with
``T_{mjk} = ∂_j g_{mk} + ∂_k g_{mj} − ∂_m g_{jk}`` — no inverse is differentiated, every ``g⁻¹`` is a
``torch.linalg.solve``.  A network's Fisher metric already holds first derivatives of the model, so the
curvature of a Fisher metric uses third derivatives of the model.

Cost in the dimension ``d`` (``c_g`` = cost of one metric evaluation):

* ``christoffel``: time ``≈ d · c_g`` (forward mode, d tangents) + ``O(d⁴)``; memory ``O(d³)``.
* ``riemann``/``ricci``/``scalar_curvature``: time ``≈ d² · c_g`` + ``O(d⁵)``; memory ``O(d⁴)``
  (``∂∂g`` and ``∂Γ`` have ``d⁴`` entries each: 134 MB per point at d = 64).
* :func:`curvature` over M points: ``M`` times the above, vectorised with ``vmap`` in chunks that fit
  :data:`fisherlens._core.WORK_BUDGET`.
* For :func:`fisher_metric`, ``c_g ≈ min(d, 1 + 2C)`` batched passes of the model over its N samples, and the
  nested derivatives hold ``O(N·d³)`` intermediate values per point (:meth:`FisherMetric.bytes_per_point`).
  Measured with one torch thread (``benchmarks/results/geometry.md``): all observables on a 201×201 grid for
  d = 2, N = 100 in ≈ 10 s CPU; ``scalar_curvature`` of a 3-6-2 MLP metric (N = 64) ≈ 11, 14, 42, 140 ms per
  point for d = 2, 5, 10, 20.

Dimensions above :data:`MAX_DIM` are refused, and so is a point whose estimated working memory exceeds half
of the available memory.

Singular metrics: every function checks the condition number ``κ = max|λ| / min|λ|`` of ``g``
(``torch.linalg.eigvalsh``).  Where ``g`` has non-finite entries or ``κ > cond_max``, the single-point
functions raise ``ValueError``, or, with ``regularize=eps``, use ``g + eps·I`` (a *different*, documented
metric; ``∂g`` is unchanged), emit :class:`IllConditionedMetricWarning` and go on.  :func:`curvature`
never raises for a bad point: it returns per-point masks ``singular``/``regularized`` and a reason string,
with NaN values only at points flagged ``singular`` (and a warning saying how many).

Metrics that are not metrics: ``g`` must be symmetric (to a relative 1e-8) and positive definite.  A ``g``
with an eigenvalue below ``−max|λ| / cond_max`` is *indefinite* (smaller negative eigenvalues are rounding of a
singular metric and count as ill-conditioned): the single-point functions raise ``ValueError`` naming the
smallest eigenvalue (``regularize`` does not apply), :func:`curvature` marks the point singular with that reason.
A metric whose value changes with θ but not through autograd (written with ``.item()``, ``float()``,
``.detach()``, numpy or ``torch.tensor(...)`` of θ's entries) would have zero derivatives, hence a silent
``R = 0``: when all derivatives come out exactly zero the functions check, with one plain autograd evaluation
(and one more at a nearby point), that the metric really is constant, and raise ``ValueError`` otherwise; a metric
that fails under ``torch.func`` (``.item()`` under ``vmap``, numpy) raises ``ValueError`` too.  A graph cut in only
some of the entries, next to a connected part, is not detected.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import grad, jacfwd, jacrev, vmap
from tqdm.auto import tqdm

from ._core import FunctionalModel, available_memory, check_kind, iter_batches, work_budget
from .likelihoods import Likelihood
from .results import Curvature

Tensor = torch.Tensor
Metric = Callable[[Tensor], Tensor]

__all__ = [
    "MAX_DIM",
    "Curvature",
    "FisherMetric",
    "IllConditionedMetricWarning",
    "christoffel",
    "curvature",
    "fisher_metric",
    "kl_check",
    "metric_values",
    "path_length",
    "ricci",
    "riemann",
    "scalar_curvature",
]

#: largest dimension accepted (``∂Γ`` alone has ``d⁴`` entries per point).
MAX_DIM = 64
#: default threshold on the condition number of ``g``.
COND_MAX = 1e12
DTYPE = torch.float64


class IllConditionedMetricWarning(UserWarning):
    """A metric was singular or ill-conditioned; a regularised value (``g + eps·I``) was returned."""


# ----------------------------------------------------------------------------- input checks
def _check_dim(d: int) -> None:
    if d < 1:
        raise ValueError("The metric needs at least one coordinate (θ of shape (d,), d >= 1).")
    if d > MAX_DIM:
        raise ValueError(
            f"d={d} coordinates is too many for the curvature: ∂Γ alone has d⁴ = {d**4:.3g} entries per point "
            f"and the metric is differentiated d² = {d * d} times. fisherlens.geometry accepts d <= {MAX_DIM}; "
            "select a few parameters with params= (fisher_metric) or use a lower-dimensional metric."
        )


def _as_theta(theta, batched: bool) -> Tensor:
    t = torch.as_tensor(theta, dtype=DTYPE)
    if not batched and t.dim() != 1:
        raise ValueError(f"theta must be a point of shape (d,), got {tuple(t.shape)}; use curvature() for many.")
    if batched:
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"thetas must have shape (M, d) with M >= 1, got {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError("theta contains NaN or inf.")
    _check_dim(t.shape[-1])
    return t


def _check_g(g: Tensor, lead: tuple[int, ...], d: int) -> None:
    if not isinstance(g, Tensor):
        raise TypeError(f"The metric must return a tensor (d, d); it returned {type(g).__name__}.")
    if tuple(g.shape) != (*lead, d, d):
        raise ValueError(
            f"The metric must map θ ({d},) to g ({d}, {d}); it returned shape {tuple(g.shape[len(lead):])}."
        )
    if g.dtype != DTYPE:
        raise TypeError(
            f"The metric returned {g.dtype}; fisherlens.geometry needs float64 (third derivatives in single "
            "precision are mostly rounding error). Compute the metric in float64."
        )


@contextmanager
def _metric_errors(what: str):
    """A metric that fails under ``torch.func`` (``vmap``/``jacfwd``) -> ``ValueError`` saying what to change."""
    try:
        yield
    except RuntimeError as e:
        raise ValueError(
            f"{what}: evaluating the metric under torch.func (jacfwd/vmap) failed: {e} -- write the metric with "
            "torch operations on θ (torch.stack, torch.diag, ...): .item(), float(), .numpy() or "
            "torch.tensor(...) of θ's entries cut the autograd graph and cannot be vmapped."
        ) from e


def _spd_check(g: Tensor, cond_max: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per matrix of ``g (..., d, d)`` (the metric as returned): ``(asymmetric, indefinite, λ_min)``.

    Asymmetric: ``max|g − gᵀ| > 1e-8 max|g|``; indefinite: ``λ_min < −max|λ| / cond_max`` (eigenvalues of the
    symmetric part).  Non-finite matrices are neither (the condition check reports them)."""
    finite = torch.isfinite(g).flatten(-2).all(-1)
    safe = torch.where(finite[..., None, None], g, torch.eye(g.shape[-1], dtype=g.dtype))
    size = safe.abs().flatten(-2).amax(-1)
    asym = finite & ((safe - safe.transpose(-1, -2)).abs().flatten(-2).amax(-1) > 1e-8 * size)
    lam = torch.linalg.eigvalsh(_sym(safe))
    lo = lam[..., 0]
    indef = finite & (lo < -lam.abs().amax(-1) / cond_max)
    return asym, indef, lo


def _spd_reason(asym: bool, indef: bool, g: Tensor, lo: float) -> str:
    if asym:
        return (f"is not symmetric (max |g − gᵀ| = {(g - g.T).abs().max().item():.3g}, max |g| = "
                f"{g.abs().max().item():.3g})")
    return f"is not positive definite: its smallest eigenvalue is {lo:.6g}"


def _graph_cut(metric: Metric, th: Tensor, g: Tensor) -> bool:
    """True when the metric's value changes with θ but not through autograd (all its derivatives read 0).

    Called only when every derivative came out exactly zero: one evaluation with ``θ.requires_grad`` tells a
    connected graph (derivatives genuinely 0 here) from none; without a graph, a second evaluation near θ tells a
    constant metric (fine, R = 0) from a cut one."""
    with torch.enable_grad():
        t = th.detach().clone().requires_grad_(True)
        out = metric(t)
    if not isinstance(out, Tensor) or out.requires_grad:
        return False
    with torch.no_grad():
        other = metric(th + 1e-3 * (1 + th.abs()))
    return not (isinstance(other, Tensor) and other.shape == g.shape and torch.equal(other.to(g.dtype), g))


_CUT = ("the metric does not depend on θ through autograd, yet its value changes with θ: its derivatives read 0 "
        "and every curvature would silently be 0. .item(), float(), .detach(), .numpy() or torch.tensor(...) of "
        "θ's entries (or torch.no_grad) cut the autograd graph; write the metric with torch operations on θ "
        "(torch.stack, torch.diag, ...).")


def _check_cond(cond_max: float, regularize: float | None) -> None:
    if not (isinstance(cond_max, (int, float)) and cond_max > 1):
        raise ValueError(f"cond_max must be a number > 1, got {cond_max!r}.")
    if regularize is not None and not (isinstance(regularize, (int, float)) and regularize > 0):
        raise ValueError(f"regularize must be None or a positive number eps (g + eps·I is used), got {regularize!r}.")


# ----------------------------------------------------------------------------- jets and algebra
def _jets(metric: Metric, order: int) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``θ -> (g, ∂g[, ∂∂g])`` by nested forward-mode Jacobians; ``∂g[i,j,k] = ∂_k g_ij``,
    ``∂∂g[i,j,k,l] = ∂_l ∂_k g_ij``.  One pass: the lower orders come back as auxiliary outputs."""

    def g_aux(th):
        g = metric(th)
        return g, g

    def first(th):
        dg, g = jacfwd(g_aux, has_aux=True)(th)
        return dg, (g, dg)

    if order == 0:
        return lambda th: (metric(th),)
    if order == 1:
        return lambda th: first(th)[1]

    def second(th):
        ddg, (g, dg) = jacfwd(first, has_aux=True)(th)
        return g, dg, ddg

    return second


def _sym(g: Tensor) -> Tensor:
    return 0.5 * (g + g.transpose(-1, -2))


def _christoffel_from(g: Tensor, dg: Tensor) -> Tensor:
    """``Γ[..., i, j, k]`` from ``g (..., d, d)`` and ``∂g (..., d, d, d)`` (solve, no inverse)."""
    d = g.shape[-1]
    T = dg.transpose(-1, -2) + dg - torch.einsum("...jkm->...mjk", dg)  # T[m,j,k]
    return 0.5 * torch.linalg.solve(g, T.reshape(*T.shape[:-2], d * d)).reshape(T.shape)


def _curvature_from(g: Tensor, dg: Tensor, ddg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Γ, Riem, Ric, R)`` from the 2-jet of the metric; leading batch dims allowed."""
    d = g.shape[-1]
    lead = g.shape[:-2]
    Gam = _christoffel_from(g, dg)
    # ∂_l T[m,j,k] = ∂_l∂_j g_mk + ∂_l∂_k g_mj − ∂_l∂_m g_jk   (ddg[i,j,k,l] = ∂_l ∂_k g_ij)
    dT = (
        torch.einsum("...mkjl->...mjkl", ddg)
        + ddg
        - torch.einsum("...jkml->...mjkl", ddg)
    )
    rhs = -torch.einsum("...abl,...bjk->...ajkl", dg, Gam) + 0.5 * dT
    dGam = torch.linalg.solve(g, rhs.reshape(*lead, d, d**3)).reshape(*lead, d, d, d, d)  # ∂_l Γ^i_jk
    Riem = (
        torch.einsum("...adbc->...abcd", dGam)
        - torch.einsum("...acbd->...abcd", dGam)
        + torch.einsum("...ace,...edb->...abcd", Gam, Gam)
        - torch.einsum("...ade,...ecb->...abcd", Gam, Gam)
    )
    Ric = torch.einsum("...abad->...bd", Riem)
    R = torch.linalg.solve(g, Ric).diagonal(dim1=-2, dim2=-1).sum(-1)
    return Gam, Riem, Ric, R


def _condition(g: Tensor) -> Tensor:
    """``κ = max|λ| / min|λ|`` per matrix (inf for singular or non-finite ``g``)."""
    finite = torch.isfinite(g).flatten(-2).all(-1)
    safe = torch.where(finite[..., None, None], g, torch.eye(g.shape[-1], dtype=g.dtype))
    lam = torch.linalg.eigvalsh(_sym(safe)).abs()
    lo, hi = lam.min(-1).values, lam.max(-1).values
    cond = torch.where(lo > 0, hi / torch.where(lo > 0, lo, 1.0), torch.full_like(lo, math.inf))
    return torch.where(finite, cond, torch.full_like(cond, math.inf))


def _point(metric: Metric, theta, order: int, cond_max: float, regularize: float | None, what: str):
    """Jets at one point, with the condition check; returns ``(g_used, dg[, ddg])``."""
    _check_cond(cond_max, regularize)
    th = _as_theta(theta, batched=False)
    d = th.shape[0]
    _chunk_size(metric, d, order, None)  # refuses a point that cannot fit in memory
    with _metric_errors(what):
        jets = _jets(metric, order)(th)
    _check_g(jets[0], (), d)
    asym, indef, lo = _spd_check(jets[0], cond_max)
    if asym or indef:
        raise ValueError(
            f"{what}: the metric at θ={th.tolist()} {_spd_reason(bool(asym), bool(indef), jets[0], lo.item())}; a "
            "metric must be symmetric positive definite (regularize= does not apply). Check its formula and signs."
        )
    if order >= 1 and not any(bool(j.any()) for j in jets[1:]) and _graph_cut(metric, th, jets[0]):
        raise ValueError(f"{what}: {_CUT}")
    g = _sym(jets[0])
    cond = _condition(g).item()
    if not cond <= cond_max:
        finite = bool(torch.isfinite(g).all())
        why = "has non-finite entries" if not finite else f"has condition number {cond:.3g} > cond_max={cond_max:.3g}"
        if regularize is None or not finite:
            raise ValueError(
                f"{what}: the metric at θ={th.tolist()} {why}, so g⁻¹ (and the {what}) is not reliable. "
                "Pass regularize=eps to use g + eps·I instead (a warning is issued), raise cond_max, or use "
                "curvature() to get a per-point singular mask."
            )
        g = g + regularize * torch.eye(d, dtype=DTYPE)
        cond2 = _condition(g).item()
        if not cond2 <= cond_max:
            raise ValueError(
                f"{what}: the metric at θ={th.tolist()} {why}, and g + {regularize:g}·I still has condition "
                f"number {cond2:.3g}; use a larger regularize=eps."
            )
        warnings.warn(
            f"{what}: the metric at θ={th.tolist()} {why}; returning the value for g + {regularize:g}·I.",
            IllConditionedMetricWarning,
            stacklevel=3,
        )
    if not all(bool(torch.isfinite(j).all()) for j in jets[1:]):
        raise ValueError(f"{what}: the derivatives of the metric at θ={th.tolist()} are not finite (they overflowed "
                         "or the metric is not differentiable there).")
    return (g, *(0.5 * (j + j.transpose(0, 1)) for j in jets[1:]))  # symmetric in the metric's indices


# ----------------------------------------------------------------------------- single-point API
def christoffel(metric: Metric, theta, *, cond_max: float = COND_MAX, regularize: float | None = None) -> Tensor:
    """Christoffel symbols of the second kind ``Γ[i, j, k] = Γ^i_{jk}``, shape ``(d, d, d)``.

    ``Γ^i_{jk} = ½ g^{im} (∂_j g_{mk} + ∂_k g_{mj} − ∂_m g_{jk})``, symmetric in ``j, k``.
    Cost: ``d`` forward-mode metric evaluations; memory ``O(d³)``.

    Args:
        metric: callable ``θ (d,) -> g (d, d)`` (float64, torch ops; e.g. :func:`fisher_metric`).
        theta: the point, shape ``(d,)``.
        cond_max: largest accepted condition number of ``g``.
        regularize: ``None`` (raise for an ill-conditioned ``g``) or ``eps``: use ``g + eps·I`` there and
            emit :class:`IllConditionedMetricWarning` (the warning is the flag; :func:`curvature` has masks).

    Raises:
        ValueError: ``g`` non-finite or ``κ(g) > cond_max`` (without ``regularize``); ``g`` not symmetric, or
            indefinite (an eigenvalue below ``−max|λ|/cond_max``; the message names the smallest); a metric that
            changes with θ but not through autograd (``.item()``, ``.detach()``, numpy: the graph is cut) or that
            fails under ``torch.func``; ``d > MAX_DIM``.
        TypeError: the metric does not return a float64 tensor.
    """
    g, dg = _point(metric, theta, 1, cond_max, regularize, "christoffel")
    return _christoffel_from(g, dg)


def riemann(metric: Metric, theta, *, cond_max: float = COND_MAX, regularize: float | None = None) -> Tensor:
    """Riemann tensor ``Riem[a, b, c, d] = R^a_{bcd}``, shape ``(d, d, d, d)``.

    ``R^a_{bcd} = ∂_c Γ^a_{db} − ∂_d Γ^a_{cb} + Γ^a_{ce} Γ^e_{db} − Γ^a_{de} Γ^e_{cb}`` (antisymmetric in ``c, d``).
    Cost: ``d²`` forward-mode metric evaluations (third derivatives of a model for a Fisher metric);
    memory ``O(d⁴)``.

    Args:
        metric, theta, cond_max, regularize: as in :func:`christoffel`.

    Raises:
        ValueError, TypeError: as in :func:`christoffel`.
    """
    g, dg, ddg = _point(metric, theta, 2, cond_max, regularize, "riemann")
    return _curvature_from(g, dg, ddg)[1]


def ricci(metric: Metric, theta, *, cond_max: float = COND_MAX, regularize: float | None = None) -> Tensor:
    """Ricci tensor ``Ric[b, d] = R_{bd} = R^a_{bad}``, shape ``(d, d)`` (symmetric). Cost as :func:`riemann`.

    Args:
        metric, theta, cond_max, regularize: as in :func:`christoffel`.

    Raises:
        ValueError, TypeError: as in :func:`christoffel`.
    """
    g, dg, ddg = _point(metric, theta, 2, cond_max, regularize, "ricci")
    return _curvature_from(g, dg, ddg)[2]


def scalar_curvature(
    metric: Metric, theta, *, cond_max: float = COND_MAX, regularize: float | None = None
) -> float:
    """Scalar curvature ``R = g^{bd} R_{bd}`` at one point (unit 2-sphere: +2). Cost as :func:`riemann`.

    For many points use :func:`curvature` (vectorised, with per-point singular masks).

    Args:
        metric, theta, cond_max, regularize: as in :func:`christoffel`.

    Raises:
        ValueError, TypeError: as in :func:`christoffel`.

    Example:
        The unit 2-sphere in polar coordinates has ``R = +2`` (docs/conventions.md#curvature):

        >>> import torch, fisherlens as fl
        >>> sphere = lambda th: torch.diag(torch.stack([torch.ones_like(th[0]), torch.sin(th[0]) ** 2]))
        >>> round(fl.geometry.scalar_curvature(sphere, torch.tensor([1.0, 0.3])), 10)
        2.0
    """
    g, dg, ddg = _point(metric, theta, 2, cond_max, regularize, "scalar_curvature")
    R = _curvature_from(g, dg, ddg)[3].item()
    if not math.isfinite(R):
        raise ValueError(
            f"scalar_curvature: the result at θ={torch.as_tensor(theta).tolist()} is not finite although g is "
            "well conditioned: the derivatives of the metric overflowed there."
        )
    return R


# ----------------------------------------------------------------------------- many points
KEEP = ("ricci", "christoffel", "riemann")


def _chunk_size(metric, d: int, order: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        return chunk_size
    hint = getattr(metric, "bytes_per_point", None)
    per = hint(order) if callable(hint) else 8 * 64 * (d + 1) ** (order + 2)
    per += 8 * 8 * d**4  # the algebra: ∂∂g, ∂T, ∂Γ, Riemann and temporaries
    limit = available_memory() // 2
    if per > limit:
        raise ValueError(
            f"One point needs about {per / 2**30:.2f} GiB of working memory (d={d}"
            + (f", N={metric.n} samples" if isinstance(metric, FisherMetric) else "")
            + f") but only {limit / 2**30:.2f} GiB may be used: use fewer parameters (params=) or fewer samples."
        )
    return int(max(1, min(8192, work_budget() // max(per, 1))))


def metric_values(metric: Metric, thetas, *, chunk_size: int | None = None) -> Tensor:
    """``g`` at many points, ``(M, d, d)``, by ``vmap`` over chunks of ``thetas (M, d)``.

    Cost: ``M`` metric evaluations; no derivatives.
    """
    th = _as_theta(thetas, batched=True)
    M, d = th.shape
    step = _chunk_size(metric, d, 0, chunk_size)
    out = []
    for i in range(0, M, step):
        with _metric_errors("metric_values"):
            g = vmap(metric)(th[i : i + step])
        _check_g(g, (len(th[i : i + step]),), d)
        out.append(g)
    return torch.cat(out)


def _flag(g_raw: Tensor, g: Tensor, dg: Tensor, ddg: Tensor, cond: Tensor, cond_max: float,
          regularize: float | None):
    """Which points of a chunk are singular or regularised, why, and the metric to use: ``(g_use, sing, reg, why)``."""
    m, d = g.shape[0], g.shape[-1]
    asym, indef, lo = _spd_check(g_raw, cond_max)
    finite = torch.isfinite(g).flatten(1).all(1) & torch.isfinite(dg).flatten(1).all(1) \
        & torch.isfinite(ddg).flatten(1).all(1)
    not_spd = asym | indef
    bad = ~(cond <= cond_max) | ~finite | not_spd
    reg = torch.zeros(m, dtype=torch.bool)
    why = [""] * m
    for j in torch.nonzero(bad).flatten().tolist():
        if not finite[j]:
            why[j] = "metric or its derivatives non-finite"
        elif not_spd[j]:
            why[j] = "metric " + _spd_reason(bool(asym[j]), bool(indef[j]), g_raw[j], lo[j].item())
        else:
            why[j] = f"condition number {cond[j].item():.3g} > cond_max={cond_max:.3g}"
    g_use = g
    if regularize is not None:
        fixable = bad & finite & ~not_spd
        g_try = torch.where(fixable[:, None, None], g + regularize * torch.eye(d, dtype=DTYPE), g)
        ok2 = _condition(g_try) <= cond_max
        reg = fixable & ok2
        for j in torch.nonzero(reg).flatten().tolist():
            why[j] += f"; regularised: g + {regularize:g}·I"
        for j in torch.nonzero(fixable & ~ok2).flatten().tolist():
            why[j] += f"; g + {regularize:g}·I still ill-conditioned"
        g_use = g_try
    return g_use, bad & ~reg, reg, why


def _curvature_chunk(g_raw: Tensor, dg: Tensor, ddg: Tensor, cond_max: float, regularize: float | None,
                     keep: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]]:
    """Curvature of one chunk of points from the metric jets ``g (m, d, d)``, ``∂g``, ``∂∂g``: the columns of
    :class:`Curvature` (singular points NaN) and the per-point reasons."""
    g = _sym(g_raw)
    dg = 0.5 * (dg + dg.transpose(1, 2))
    ddg = 0.5 * (ddg + ddg.transpose(1, 2))
    cond = _condition(g)
    g_use, sing, reg, why = _flag(g_raw, g, dg, ddg, cond, cond_max, regularize)
    # singular points get harmless stand-ins so that the batched solves succeed; their outputs are NaN
    g_use = torch.where(sing[:, None, None], torch.eye(g.shape[-1], dtype=DTYPE), g_use)
    dg0 = torch.where(sing[:, None, None, None], 0.0, dg)
    ddg0 = torch.where(sing[:, None, None, None, None], 0.0, ddg)
    Gam, Riem, Ric, R = _curvature_from(g_use, dg0, ddg0)
    blown = ~torch.isfinite(R) & ~sing
    for j in torch.nonzero(blown).flatten().tolist():
        why[j] = (why[j] + "; " if why[j] else "") + "curvature non-finite (derivatives overflowed)"
    sing = sing | blown
    nan = torch.tensor(math.nan, dtype=DTYPE)
    out = {"metric": g_raw, "scalar": torch.where(sing, nan, R), "cond": cond, "singular": sing, "reg": reg}
    for k, v in (("ricci", Ric), ("christoffel", Gam), ("riemann", Riem)):
        if k in keep:
            out[k] = torch.where(sing.reshape(-1, *[1] * (v.dim() - 1)), nan, v)
    return out, why


def curvature(
    metric: Metric,
    thetas,
    *,
    keep: Sequence[str] = (),
    cond_max: float = COND_MAX,
    regularize: float | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    desc: str = "curvature",
) -> Curvature:
    """Metric and scalar curvature at many points ``thetas (M, d)``: ``vmap`` over chunks, no loop over points.

    Points whose metric is non-finite or has condition number above ``cond_max`` are *not* an error:
    with ``regularize=None`` they are marked ``singular`` (values NaN, reason given); with
    ``regularize=eps`` their values are those of ``g + eps·I`` and they are marked ``regularized``.
    Points where ``g`` is not symmetric or is indefinite (module doc) are marked ``singular`` whatever
    ``regularize``, the reason naming the smallest eigenvalue.  A metric whose graph is cut (module doc) or that
    fails under ``torch.func`` raises ``ValueError``.
    A point whose curvature comes out non-finite is marked singular too.  One
    :class:`IllConditionedMetricWarning` summarises how many points were flagged.

    Args:
        metric: callable ``θ (d,) -> g (d, d)``.
        thetas: points ``(M, d)`` (a single ``(d,)`` point is taken as ``M = 1``).
        keep: any of ``"ricci"``, ``"christoffel"``, ``"riemann"`` to return as well
            (memory ``M·d²``, ``M·d³``, ``M·d⁴``).
        cond_max, regularize: as in :func:`scalar_curvature`.
        chunk_size: points per ``vmap`` chunk (default: fit a 512 MiB working budget; a
            :class:`FisherMetric` reports its own memory per point).
        progress: show a tqdm bar over chunks; ``desc`` labels it.

    Returns:
        :class:`Curvature`.  Cost: ``M·d²`` forward-mode metric evaluations (vectorised) + ``O(M·d⁵)``.
    """
    _check_cond(cond_max, regularize)
    keep = tuple(keep)
    for k in keep:
        if k not in KEEP:
            raise ValueError(f"keep={k!r} is not available; choose from {KEEP}.")
    th = _as_theta(thetas, batched=True)
    M, d = th.shape
    step = _chunk_size(metric, d, 2, chunk_size)
    jet = vmap(_jets(metric, 2))
    parts: dict[str, list[Tensor]] = {k: [] for k in ("metric", "scalar", "cond", "singular", "reg", *keep)}
    reasons: list[str] = []
    starts = range(0, M, step)
    graph_checked = False
    for i in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2, leave=False):
        with _metric_errors("curvature"):
            g_raw, dg, ddg = jet(th[i : i + step])
        _check_g(g_raw, (g_raw.shape[0],), d)
        flat = ~(dg.flatten(1).any(1) | ddg.flatten(1).any(1))  # every derivative exactly 0
        if not graph_checked and flat.any():
            j = int(flat.nonzero()[0])
            if _graph_cut(metric, th[i + j], g_raw[j]):
                raise ValueError(f"curvature: {_CUT}")
            graph_checked = True
        chunk, why = _curvature_chunk(g_raw, dg, ddg, cond_max, regularize, keep)
        for k, v in chunk.items():
            parts[k].append(v)
        reasons.extend(why)
    out = Curvature(
        theta=th,
        metric=torch.cat(parts["metric"]),
        scalar=torch.cat(parts["scalar"]),
        cond=torch.cat(parts["cond"]),
        singular=torch.cat(parts["singular"]),
        regularized=torch.cat(parts["reg"]),
        reason=reasons,
        **{k: torch.cat(parts[k]) for k in keep},
    )
    n_sing, n_reg = int(out.singular.sum()), int(out.regularized.sum())
    if n_sing or n_reg:
        first = next(r for r in reasons if r)
        warnings.warn(
            f"curvature: {n_sing} of {M} points are singular (values NaN, see .singular/.reason) and {n_reg} "
            f"were regularised (see .regularized); e.g. {first}.",
            IllConditionedMetricWarning,
            stacklevel=2,
        )
    return out


# ----------------------------------------------------------------------------- path length
def path_length(metric: Metric, thetas, *, rule: str = "left", chunk_size: int | None = None) -> float:
    """Riemannian length of a discretised path ``θ_0, …, θ_T`` (Sauter 2023, eq 3.2.13).

    Conventions: docs/conventions.md#path-length.  ``rule="left"`` (default, as there):
    ``s = Σ_k sqrt(Δθ_kᵀ g(θ_k) Δθ_k)``, ``Δθ_k = θ_{k+1} − θ_k`` — first order in the step;
    ``rule="midpoint"``: ``g`` at ``(θ_k + θ_{k+1})/2`` — second order.
    Exact for any rule when ``g`` is constant along each step.

    Args:
        metric: callable ``θ (d,) -> g (d, d)``.
        thetas: ``(T+1, d)`` points along the path, ``T >= 1``.
        rule: ``"left"`` or ``"midpoint"``.
        chunk_size: points per ``vmap`` chunk.

    Returns:
        The length (float).  Cost: ``T`` metric evaluations, no derivatives.

    Raises:
        ValueError: fewer than two points; ``g`` non-finite, or not positive semi-definite at a point where it
            is evaluated (an eigenvalue below ``−1e-10 max|λ|``, the message names the smallest) or along a step
            (``Δθᵀ g Δθ < 0`` beyond rounding); a metric that fails under ``vmap``.  A metric whose autograd
            graph is cut is fine here (no derivatives are taken).
    """
    if rule not in ("left", "midpoint"):
        raise ValueError(f"rule={rule!r} is not supported; choose 'left' or 'midpoint'.")
    th = _as_theta(thetas, batched=True)
    if th.shape[0] < 2:
        raise ValueError(f"A path needs at least two points, got {th.shape[0]}.")
    delta = th[1:] - th[:-1]
    at = th[:-1] if rule == "left" else 0.5 * (th[1:] + th[:-1])
    g = _sym(metric_values(metric, at, chunk_size=chunk_size))
    q = torch.einsum("ti,tij,tj->t", delta, g, delta)
    scale = torch.einsum("tii->t", g).abs() * delta.square().sum(-1)
    if not torch.isfinite(q).all():
        raise ValueError(f"path_length: the metric is not finite at step {int((~torch.isfinite(q)).nonzero()[0])}.")
    lam = torch.linalg.eigvalsh(g)
    indef = lam[:, 0] < -1e-10 * lam.abs().amax(-1)
    if indef.any():
        k = int(indef.nonzero()[0])
        raise ValueError(f"path_length: the metric at step {k} is not positive semi-definite: its smallest "
                         f"eigenvalue is {lam[k, 0].item():.6g}; a metric must be symmetric positive (semi-)definite.")
    neg = q < -1e-10 * scale
    if neg.any():
        k = int(neg.nonzero()[0])
        raise ValueError(f"path_length: Δθᵀ g Δθ = {q[k].item():.3g} < 0 at step {k}: the metric is not "
                         "positive semi-definite there.")
    return math.fsum(q.clamp_min(0).sqrt().tolist())


# ----------------------------------------------------------------------------- the Fisher metric of a model
def _materialise(data, fm: FunctionalModel, need_y: bool, limit: int) -> tuple[Tensor, Tensor | None]:
    """Gather ``data`` into ``(X, Y)`` tensors (float64 inputs), refusing more than ``limit`` bytes."""
    xs, ys, size = [], [], 0
    for X, Y in iter_batches(data, fm, need_y=need_y):
        if not isinstance(X, Tensor) or (Y is not None and not isinstance(Y, Tensor)):
            raise TypeError("fisher_metric holds the data as (X, Y) tensors; dict batches are not supported here. "
                            "Use fl.fisher_matrix(..., params=) for models with keyword inputs.")
        size += X.numel() * X.element_size() + (0 if Y is None else Y.numel() * Y.element_size())
        if size > limit:
            raise ValueError(
                f"fisher_metric holds the data in memory and differentiates the model three times on all of "
                f"it at once; more than {limit / 2**20:.0f} MiB of data is too much. Pass a subset (a few "
                "hundred to a few thousand samples is plenty for a metric on a handful of parameters)."
            )
        xs.append(X)
        ys.append(Y)
    if not xs:
        raise ValueError("data is empty: the Fisher metric needs at least one sample.")
    Y = None if any(y is None for y in ys) else torch.cat(ys)
    return torch.cat(xs), Y


class FisherMetric:
    r"""The Fisher matrix of a model as a pure function of its flat parameters, ``θ (d,) -> F(θ) (d, d)``.

    Built by :func:`fisher_metric`.  The model is a float64 deep copy (later changes to the original do not
    affect the metric); the data are held as tensors.  ``θ`` is the selection of parameters (``params=``,
    default all trainable) flattened in ``named_parameters()`` order; the others stay fixed.

    * ``kind="true"``:      ``F = (1/N) Σ_n J_nᵀ Λ(f_n) J_n`` (Gaussian, Categorical, Bernoulli);
    * ``kind="empirical"``: ``F = (1/N) Σ_n g_n g_nᵀ``, ``g_n = ∇_θ ℓ(f_θ(x_n), y_n)`` (any likelihood,
      including ``fl.LossInduced(loss)``, the loss-induced Fisher of Sauter (2023, §3.2.5));

    ``reduction="sum"`` drops the ``1/N``.  Per-sample Jacobians come from ``torch.func.jacfwd`` of the
    whole batch (``mode="forward"``: ``d`` forward-mode passes) or from ``vmap`` over samples of
    ``torch.func.jacrev`` (``mode="reverse"``: ``C`` reverse passes per sample; the default for d > 2C + 1),
    so the metric can be nested in ``jacfwd`` twice more (the curvature) and ``vmap``-ed over θ.  Cost of one
    evaluation ``≈ min(d, 1 + 2C)`` batched passes over the ``N`` samples; memory ``O(N·(C + width)·d)``;
    the curvature multiplies both by ``≈ d²``.

    Attributes:
        dim: ``d``; theta0: ``(d,)`` the model's current parameters (float64); names: parameter names;
        n: ``N``; kind, likelihood, reduction.
    """

    def __init__(self, model: nn.Module, data, likelihood: Likelihood, kind: str = "true", *, params=None,
                 reduction: str = "mean", max_data_bytes: int | None = None, mode: str = "auto", output=None):
        check_kind(likelihood, kind)
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"mode={mode!r} is not supported; choose 'auto', 'forward' or 'reverse'.")
        if kind == "mc":
            raise ValueError(
                "kind='mc' draws random labels, so the Monte-Carlo Fisher is not a smooth function of θ and has "
                "no curvature; use kind='true' (its expectation) or kind='empirical'."
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is not supported; choose 'mean' or 'sum'.")
        fm0 = FunctionalModel(model, params)
        _check_dim(fm0.P)
        twin = copy.deepcopy(model).to(DTYPE)
        self._fm = FunctionalModel(twin, fm0.names, output)
        self.names = list(fm0.names)
        self.dim = fm0.P
        self.theta0 = self._fm.flatten(self._fm.params).detach().clone()
        self.kind, self.likelihood, self.reduction = kind, likelihood, reduction
        limit = max_data_bytes if max_data_bytes is not None else min(work_budget(), available_memory() // 8)
        X, Y = _materialise(data, self._fm, kind == "empirical", limit)
        self.X = X
        with torch.no_grad():
            f0 = self._fm(self._fm.params, X)
        if not torch.isfinite(f0).all():
            raise ValueError("The model's outputs at its current parameters are not finite; check model and data.")
        positions, _ = likelihood.layout(self._fm.out_shape)
        if math.prod(positions) != 1:
            raise ValueError(
                f"fisher_metric takes one prediction per input (outputs (N, C)); this model's outputs have shape "
                f"(N, {', '.join(map(str, self._fm.out_shape))}), {math.prod(positions)} predictions per input under "
                f"{likelihood!r}. Use fl.fisher_matrix(..., params=) for the Fisher of structured outputs."
            )
        self.n, self.C = f0.shape
        # working values per sample and tangent (heuristic, calibrated on small MLPs; see bytes_per_point)
        self._act = 24 + 2 * self.C + sum(p.numel() for p in twin.parameters()) // 8
        self.Y = None if Y is None else likelihood.check_targets(f0, Y)
        self._scale = 1.0 / self.n if reduction == "mean" else 1.0
        # per-sample Jacobians: d forward passes over the batch, or ~(1 + 2C) per-sample reverse passes
        self.mode = mode if mode != "auto" else ("reverse" if self.dim > 2 * self.C + 1 else "forward")

    # pure functions of θ (vmap-able, differentiable)
    def outputs(self, theta: Tensor) -> Tensor:
        """Model outputs ``f_θ(X)``, ``(N, C)``."""
        return self._fm(self._fm.unflatten(theta), self.X)

    def losses(self, theta: Tensor) -> Tensor:
        """Per-sample losses ``ℓ(f_θ(x_n), y_n)`` = ``likelihood.loss``, ``(N,)`` (needs labels)."""
        if self.Y is None:
            raise ValueError("This metric was built without labels; losses need data (X, Y).")
        return self.likelihood.loss(self.outputs(theta), self.Y)

    def loss(self, theta: Tensor) -> Tensor:
        """The data loss: mean (or sum, per ``reduction``) of :meth:`losses`; a 0-d tensor."""
        return self.losses(theta).sum() * self._scale

    def _jac_out(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(J (N, C, d), f (N, C))``: forward mode over the batch (d passes), or per-sample reverse mode
        (``vmap`` over samples of ``jacrev``, C backward passes) when that is cheaper (``mode``)."""
        if self.mode == "forward":

            def out_aux(th):
                f = self.outputs(th)
                return f, f

            return jacfwd(out_aux, has_aux=True)(theta)

        def one(th, x):
            def out_aux(t):
                f = self._fm(self._fm.unflatten(t), x[None])[0]
                return f, f

            return jacrev(out_aux, has_aux=True)(th)

        return vmap(one, in_dims=(None, 0))(theta, self.X)

    def jacobian(self, theta: Tensor) -> Tensor:
        """Per-sample Jacobians ``J_n = ∂f_θ(x_n)/∂θ``, ``(N, C, d)``."""
        return self._jac_out(theta)[0]

    def ntk_trace(self, theta: Tensor) -> Tensor:
        """``tr Θ = Σ_n Σ_a ‖∇_θ f_a(x_n)‖²`` over the selected parameters (summed over samples, like
        ``fl.ntk_trace(..., reduction="sum")``); a 0-d tensor."""
        return self.jacobian(theta).square().sum()

    def __call__(self, theta: Tensor) -> Tensor:
        """``F(θ)``, ``(d, d)``."""
        if self.kind == "empirical" and self.mode == "forward":
            G = jacfwd(self.losses)(theta)  # (N, d) per-sample gradients
            return torch.einsum("nd,ne->de", G, G) * self._scale
        J, f = self._jac_out(theta)  # (N, C, d), (N, C)
        if self.kind == "empirical":  # g_n = J_nᵀ r_n, r_n = ∂ℓ_n/∂f_n (the loss alone, batched)
            r = grad(lambda ff: self.likelihood.loss(ff, self.Y).sum())(f)
            G = torch.einsum("nc,ncd->nd", r, J)
            return torch.einsum("nd,ne->de", G, G) * self._scale
        Lam = self.likelihood.fisher_out(f)  # (N, C, C)
        return torch.einsum("nad,nab,nbe->de", J, Lam, J) * self._scale

    def bytes_per_point(self, order: int) -> int:
        """Working memory of one evaluation under ``order`` nested derivatives (for chunking; a heuristic:
        ``8 · N · (d+1)^(order+1) · (24 + 2C + P/8)`` bytes, within a factor ~1.5 of the measured peak for the
        small MLPs of the benchmark — pass ``chunk_size`` to :func:`curvature` to override)."""
        return 8 * self.n * self._act * (self.dim + 1) ** (order + 1)

    def __repr__(self) -> str:
        return (f"FisherMetric(d={self.dim}, N={self.n}, C={self.C}, likelihood={self.likelihood!r}, "
                f"kind={self.kind!r}, reduction={self.reduction!r})")


def fisher_metric(model: nn.Module, data, likelihood: Likelihood, kind: str = "true", *, params=None,
                  reduction: str = "mean", max_data_bytes: int | None = None, mode: str = "auto",
                  output=None) -> FisherMetric:
    """The Fisher matrix of ``model`` as a metric ``θ (d,) -> F(θ) (d, d)`` for the geometry functions.

    For a model with a handful of parameters (``d <= MAX_DIM``; select some with ``params=``).  The value at
    ``θ = metric.theta0`` equals ``fl.fisher_matrix(model, data, likelihood, kind, params=params)``.

    Args:
        model: ``torch.nn.Module`` mapping a batch to ``(B, C)`` outputs (eval mode for BatchNorm/Dropout).
        data: ``(X, Y)`` tensors, a Dataset or an iterable of batches; gathered into memory (refused above
            ``max_data_bytes``, default min(512 MiB, available/8)).  ``Y`` is needed for ``kind="empirical"``.
        likelihood: ``fl.Gaussian``, ``fl.Categorical``, ``fl.Bernoulli`` or ``fl.LossInduced(loss)``.
        kind: ``"true"`` or ``"empirical"`` (``"mc"`` is random, hence refused; LossInduced needs
            ``"empirical"``).
        params: parameter subset (names, module prefixes or tensors of ``model``); default all trainable.
        reduction: ``"mean"`` (1/N) or ``"sum"``.
        mode: how per-sample Jacobians are taken: ``"forward"`` (``jacfwd`` over the batch, d passes),
            ``"reverse"`` (``vmap`` over samples of ``jacrev``, C passes; the model must treat samples
            independently, as every fisherlens Fisher assumes) or ``"auto"`` (reverse when d > 2C + 1).
        output: picks the output tensor from the model's output (as in :func:`fisherlens.fisher_matrix`);
            the outputs must be one prediction per input, ``(N, C)``.

    Returns:
        :class:`FisherMetric` — callable, vmappable, differentiable three times in the model.

    Example:
        >>> import torch, fisherlens as fl
        >>> net = torch.nn.Linear(2, 1, bias=False).double()
        >>> X = torch.rand(20, 2, dtype=torch.float64); Y = (X[:, 1] > X[:, 0]).double()
        >>> g = fl.geometry.fisher_metric(net, (X, Y), fl.Bernoulli(), "true")
        >>> R = fl.geometry.scalar_curvature(g, g.theta0)
    """
    return FisherMetric(model, data, likelihood, kind, params=params, reduction=reduction,
                        max_data_bytes=max_data_bytes, mode=mode, output=output)


# ----------------------------------------------------------------------------- KL self-test
def kl_check(model: nn.Module, data, likelihood: Likelihood, dtheta=None, *, params=None, scale: float = 1e-4,
             generator: torch.Generator | None = None, output=None) -> float:
    """KL self-test (Luzzatto 2023, eqs 4.1–4.2): ``sqrt(2 KL(p_θ ‖ p_{θ+dθ}) / dθᵀ F dθ)`` → 1 as ``dθ → 0``.

    See docs/conventions.md#kl-self-test.

    ``KL = (1/N) Σ_n KL(p(·|f_θ(x_n)) ‖ p(·|f_{θ+dθ}(x_n)))`` (``likelihood.kl``) and ``F`` the true Fisher at
    the model's current θ (both means over the data).  Deviations are ``O(‖dθ‖)``.

    Args:
        model, data, likelihood, params, output: as in :func:`fisher_metric` (a likelihood with a KL: Gaussian,
            Categorical, Bernoulli).
        dtheta: the step ``(d,)``; default a random direction of length ``scale·(1 + ‖θ‖)``.
        scale: relative step length for the default direction.
        generator: for the default direction.

    Returns:
        The ratio (float); 1 up to ``O(‖dθ‖)`` for a correct Fisher.

    Raises:
        ValueError: a likelihood without KL (``LossInduced``), or ``dθᵀ F dθ = 0``.
    """
    if not likelihood.has_fisher:
        raise ValueError(f"{likelihood!r} has no normalised distribution, hence no KL divergence; use "
                         "fl.Gaussian, fl.Categorical or fl.Bernoulli.")
    g = fisher_metric(model, data, likelihood, "true", params=params, output=output)
    th = g.theta0
    if dtheta is None:
        v = torch.randn(g.dim, generator=generator, dtype=DTYPE)
        dtheta = v / v.norm() * scale * (1 + th.norm())
    dtheta = torch.as_tensor(dtheta, dtype=DTYPE)
    if dtheta.shape != th.shape:
        raise ValueError(f"dtheta must have shape ({g.dim},), got {tuple(dtheta.shape)}.")
    with torch.no_grad():
        kl = likelihood.kl(g.outputs(th), g.outputs(th + dtheta)).mean()
        quad = dtheta @ g(th) @ dtheta
    if not quad > 0:
        raise ValueError("dθᵀ F dθ is zero: the model does not change its output distribution along dθ.")
    return math.sqrt(max(2 * kl.item(), 0.0) / quad.item())
