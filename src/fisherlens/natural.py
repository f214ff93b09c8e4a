"""Natural gradient: the damped Fisher solve ``d = (F + λI)⁻¹ g`` without forming the ``P × P`` Fisher.

Normalisation (docs/conventions.md#reduction): F is the Fisher of :func:`fisherlens.fisher_matrix` with the same
arguments, ``F = s · Ĵᵀ Ĵ`` with the stacked factor rows ``Ĵ = [V_1ᵀ J_1; …; V_Nᵀ J_N]`` (N·K × P,
docs/conventions.md#gram-duality) and the scale ``s`` of the reduction (``1/N`` for ``"mean"``, one over the kept
predictions for ``"per_prediction"``, 1 for ``"sum"``); the default ``g`` is the gradient of the loss under the
*same* normalisation, ``g = s · Σ_n ∇_θ ℓ_n`` with ``ℓ_n`` each input's loss summed over its kept positions
(:meth:`fisherlens.Likelihood.input_loss`), so that ``d`` is the natural-gradient step of that loss.

Two solvers:

* ``"gram"`` (Woodbury): ``(s ĴᵀĴ + λI)⁻¹ g = (g − Ĵᵀ (λ I + s Ĵ Ĵᵀ)⁻¹ s Ĵ g) / λ``, the ``N·K × N·K`` system
  solved in float64 by Cholesky, then refined against the residual (``Ĵ`` is recomputed chunk by chunk when the
  rows do not fit in memory);
* ``"cg"``: conjugate gradients on ``F + λI`` with the matrix-free :class:`fisherlens.FisherOperator`
  (each product streams the data once).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._core import (
    FactorRows,
    Fields,
    Request,
    available_memory,
    check_choice,
    check_dense,
    forward_checked,
    iter_batches,
    output_dim,
    vjp_checked,
)
from .operator import FisherOperator

Tensor = torch.Tensor

__all__ = ["natural_gradient", "NaturalDirection", "data_loss", "SOLVERS", "GRAM_MAX"]

SOLVERS = ("auto", "gram", "cg")
#: ``solver="auto"`` takes the Gram route up to this many factor rows N·K (and when its Gram fits in memory).
#: Measured (benchmarks/bench_natural.py, MLP 784-128-128-10, P = 118k, λ = 1e-3, CPU): the two cost the same near
#: N·K ≈ 100 (Gram/CG time 1.05 at 80 rows, 1.2 at 128), CG is 3.6× faster at 320 and 18× at 1280 rows; below,
#: the Gram route is as fast and exact whatever the conditioning.
GRAM_MAX = 128


class NaturalDirection(dict):
    """The natural-gradient direction ``d = (F + λI)⁻¹ g`` as ``{name: tensor shaped like the parameter}`` (a
    ``dict``), with how it was obtained.

    Attributes:
        solver: ``"gram"`` or ``"cg"`` (what ``"auto"`` resolved to).
        damping: λ.
        residual: the achieved relative residual ``‖(F + λI) d − g‖ / ‖g‖``, evaluated in float64 at the
            returned ``d`` (with a fresh product, not the CG recurrence); 0 when ``g = 0``.
        iterations: CG iterations (Fisher–vector products of the recurrence), or refinement steps of the Gram route.
        converged: ``residual <= tol``.
        grad: the gradient ``g`` used, ``{name: tensor}``.
        loss: the mean loss on the data when ``g`` was computed from it (same normalisation), else ``None``.
    """

    def __init__(self, d: dict[str, Tensor], *, solver: str, damping: float, residual: float, iterations: int,
                 converged: bool, grad: dict[str, Tensor], loss: float | None):
        super().__init__(d)
        self.solver, self.damping, self.residual = solver, damping, residual
        self.iterations, self.converged, self.grad, self.loss = iterations, converged, grad, loss

    @property
    def flat(self) -> Tensor:
        """The direction as one vector ``(P,)`` in ``named_parameters()`` order."""
        return torch.cat([v.reshape(-1) for v in self.values()])

    def __repr__(self) -> str:
        return (f"NaturalDirection({len(self)} tensors, solver={self.solver!r}, damping={self.damping:.3g}, "
                f"residual={self.residual:.3g}, iterations={self.iterations}, converged={self.converged})")


def natural_gradient(
    model, data, likelihood, grad=None, damping: float = 1e-3, kind: str = "true", *, params=None,
    solver: str = "auto", reduction: str = "mean", samples: int = 1, generator=None, batch_size=None,
    output=None, max_memory: int | None = None, tol: float | None = None, max_iter: int | None = None,
    engine: str = "auto", group=None, distributed: bool | None = None,
) -> NaturalDirection:
    """The damped natural gradient ``d = (F + λI)⁻¹ g (P,)``, without forming the ``P × P`` matrix F.

    ``F = s Ĵᵀ Ĵ`` is the Fisher of :func:`fisherlens.fisher_matrix` with the same ``kind``, ``params``,
    ``reduction``, ``samples`` and ``generator`` (``Ĵ (N·K, P)`` the stacked factor rows, ``s`` the reduction's
    scale); ``λ = damping``.  The two solvers:

    * ``"gram"``: ``d = (g − Ĵᵀ w) / λ`` with ``(λ I + s Ĵ Ĵᵀ) w = s Ĵ g``, an ``N·K × N·K`` float64 Cholesky
      solve (Woodbury), then up to two steps of iterative refinement on the residual; the data is read once into
      chunks, and the rows are kept when they fit four working-memory budgets, else recomputed per product (with
      the same sandwiches: ``kind="mc"`` labels are drawn once).  Cost: the Gram, ``O((N·K)² P)``.
    * ``"cg"``: conjugate gradients on ``(F + λI) d = g`` with :class:`fisherlens.FisherOperator`, one data pass
      (a forward, a ``jvp`` and a ``vjp`` per batch) per iteration; float64 recurrences; restarted from the true
      residual when the recurrence's residual has drifted from it.

    Args:
        model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine, output, group,
            distributed: as in
            :func:`fisherlens.fisher_matrix`.  ``data`` is read several times (the gradient, F): pass a
            re-iterable (tensors, a list of batches, a ``DataLoader``), not a one-shot iterator.
        grad: ``g``, as ``{name: tensor}`` (exactly the selected parameters, each in its shape) or a flat
            ``(P,)`` tensor in ``named_parameters()`` order; default: the gradient of the loss on ``data``
            normalised like F (the mean over the inputs of ``likelihood.input_loss`` for ``reduction="mean"``,
            per kept prediction for ``"per_prediction"``, the sum for ``"sum"``), which needs labels.
        damping: λ > 0.
        solver: ``"gram"`` (Woodbury on the ``N·K × N·K`` Gram in float64; refused when that Gram does not fit
            ``max_memory``), ``"cg"`` (conjugate gradients on the matrix-free operator, ``kind="mc"`` redrawing the
            same labels on every product) or ``"auto"``: gram when ``N·K ≤ GRAM_MAX`` (128) and its Gram fits,
            else cg.  ``N·K`` is the number of factor rows (K = C, or T·C for T positions, for ``kind="true"``; 1
            for ``"empirical"``; ``samples`` for ``"mc"``); ``"auto"`` and ``"gram"`` count N first (one pass over
            the batches, without forwards).
        max_memory: largest size in bytes of the float64 Gram (default: half the available memory).
        tol: relative residual ``‖(F + λI) d − g‖ / ‖g‖`` at which CG stops (and below which the Gram route does
            not refine); default ``1e-10`` for float64 models, ``1e-5`` otherwise (a float32 product is only
            accurate to ~1e-7·cond).
        max_iter: most CG iterations; default ``min(2P + 10, 1000)``.

    Returns:
        :class:`NaturalDirection`: ``{name: tensor}`` in the model's dtype, with ``residual``, ``iterations``,
        ``converged``, ``solver``, ``grad`` and ``loss`` (a ``dict`` subclass: ``dict(d)`` is a plain dict,
        ``d.flat`` the ``(P,)`` vector).  CG that stops at ``max_iter`` does not raise or warn: check
        ``converged`` (or ``residual``).

    Raises:
        ValueError: ``damping <= 0``, an unknown ``solver``, a ``grad`` of the wrong names or shapes, missing
            labels when ``grad`` is not given, or a Gram too large for ``solver="gram"``.
        TypeError: one-shot iterator ``data``.
    """
    lam = _check_damping(damping)
    check_choice("solver", solver, SOLVERS)
    if isinstance(data, Iterator):
        raise TypeError("natural_gradient reads the data more than once (the gradient and F); pass a re-iterable "
                        "(tensors, a list of batches, a DataLoader), not a one-shot iterator.")
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine=engine, output=output,
                  group=group, distributed=distributed)
    fm = run.fm
    tol = _check_tol(tol, fm.dtype)
    max_iter = min(2 * fm.P + 10, 1000) if max_iter is None else _check_max_iter(max_iter)
    g = None if grad is None else _flat_grad(fm, grad)
    if solver != "cg":
        NK = _factor_rows(run)  # N·K before any forward: the Gram is refused (or avoided) before it is built
        fits = NK * NK * 8 <= (max_memory if max_memory is not None else available_memory() // 2)
        if run.shards is not None:  # the ranks' free memory differs: they must still take the same route
            fits = not run.shards.sum([int(not fits)], device=fm.device)[0]
        if solver == "auto":
            solver = "gram" if NK <= GRAM_MAX and fits else "cg"
        elif not fits:
            _check_gram(NK, max_memory)
    if solver == "gram":
        d, info = _gram_solve(run, g, lam, tol)
    else:
        d, info = _cg_solve(run, g, lam, tol, max_iter)
    return NaturalDirection(fm.unflatten(d.to(fm.dtype)), solver=solver, damping=lam, **info)


# ----------------------------------------------------------------------------- arguments
def _check_damping(damping) -> float:
    lam = float(damping) if isinstance(damping, (int, float)) and not isinstance(damping, bool) else math.nan
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"damping must be a positive finite number (λ in (F + λI)⁻¹ g), got {damping!r}; "
                         "λ = 0 would need F to be invertible, which it is not when P > N·K.")
    return lam


def _check_tol(tol, dtype: torch.dtype) -> float:
    if tol is None:
        return 1e-10 if dtype == torch.float64 else 1e-5
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number (a relative residual), got {tol!r}.")
    return float(tol)


def _check_max_iter(max_iter) -> int:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer (CG iterations), got {max_iter!r}.")
    return max_iter


def _flat_grad(fm, grad) -> Tensor:
    """A given gradient as a flat ``(P,)`` tensor of the model's dtype: ``grad`` is ``{name: tensor}`` with exactly
    the selected names (each shaped like its parameter) or a ``(P,)`` tensor."""
    if isinstance(grad, Tensor):
        if grad.shape != (fm.P,):
            raise ValueError(f"grad= as a tensor must be flat, of shape ({fm.P},) (the selected parameters in "
                             f"named_parameters() order), got {tuple(grad.shape)}.")
        return grad.detach().to(fm.device, fm.dtype)
    if not isinstance(grad, dict):
        raise TypeError(f"grad= must be a dict {{name: tensor}} or a flat tensor, got {type(grad).__name__}.")
    if set(grad) != set(fm.names):
        missing, extra = [n for n in fm.names if n not in grad], [n for n in grad if n not in fm.names]
        raise ValueError(f"grad= must have one entry per selected parameter; missing {missing}, unexpected {extra}.")
    for n in fm.names:
        if tuple(grad[n].shape) != tuple(fm.shapes[n]):
            raise ValueError(f"grad['{n}'] has shape {tuple(grad[n].shape)}, the parameter {tuple(fm.shapes[n])}.")
    return fm.flatten({n: grad[n].detach().to(fm.device, fm.dtype) for n in fm.names})


def _factor_rows(run: Request) -> int:
    """N·K, the number of factor rows of the data: one pass over the batches (no forward but one of one input);
    under a process group over all ranks (one all-reduce)."""
    n, K = 0, None
    for X, _ in iter_batches(run.data, run.fm, need_y=False, batch_size=run.batch_size, empty_ok=run.empty_ok):
        if K is None:
            K = run.columns(output_dim(run.fm, X))
        n += len(X)
    if run.shards is not None:
        ns, ks = run.shards.counts(n, K or 0, device=run.fm.device)
        n, K = sum(ns), max(ks)
    return n * K


# ----------------------------------------------------------------------------- the gradient
def data_loss(run: Request, batches, grad: bool = True) -> tuple[float, Tensor | None]:
    """``(loss, g (P,) or None)``: the loss ``s Σ_n ℓ_n`` over ``(X, Y)`` batches, with the scale ``s`` of ``run``'s
    reduction (:meth:`Request.scale`), and with ``grad`` its gradient; one forward (and one pull-back) per batch.
    Shared with :class:`fisherlens.optim.NaturalGradient`, which measures the loss before and after a step.  Under
    a process group (``run.shards``) ``batches`` are this rank's and the sums are those of all ranks (one
    all-reduce)."""
    fm, lik = run.fm, run.likelihood
    loss, n, m = 0.0, 0, 0
    g = torch.zeros(fm.P, dtype=fm.dtype, device=fm.device) if grad else None
    for X, Y in batches:
        if Y is None or (isinstance(Y, Fields) and "labels" not in Y):
            raise ValueError("The loss on the data (natural_gradient's default grad, NaturalGradient's damping) needs "
                             "labels: pass data as (X, Y) (or dict batches with 'labels'), or pass grad=.")
        if grad:
            f, pull = vjp_checked(fm, X)
            f = f.detach()
        else:
            with torch.no_grad():
                f = forward_checked(fm, fm.params, X)
        fs = fm.structured(f)
        loss += lik.input_loss(fs, Y).sum().item()
        m += lik.count(fs, Y)
        n += len(X)
        if grad:
            g += fm.flatten(pull(lik.residual(fs, Y).reshape(f.shape))[0])
    if run.shards is not None:
        loss, n, m, *g = run.shards.sum([loss, n, m, *([] if g is None else [g])], device=fm.device)
        g = g[0] if g else None
    s = run.scale(n, m)
    return loss * s, None if g is None else g * s


def _grad_info(run: Request, g: Tensor | None, batches) -> tuple[Tensor, float | None]:
    if g is not None:
        return g, None
    loss, g = data_loss(run, batches)
    return g, loss


def _info(run: Request, g: Tensor, loss, residual: float, iterations: int, tol: float) -> dict:
    return {"residual": residual, "iterations": iterations, "converged": residual <= tol,
            "grad": run.fm.unflatten(g), "loss": loss}


# ----------------------------------------------------------------------------- the Gram (Woodbury) route
def _check_gram(M: int, max_memory: int | None) -> None:
    check_dense(f"solver='gram' needs the Gram matrix of N·K = {M} factor rows (float64)", M * M, 8,
                "Use solver='cg' (matrix-free conjugate gradients), fewer inputs, or kind='empirical' (K = 1)",
                max_memory)


def _woodbury(G: Tensor, lam: float):
    """``A⁻¹`` as a function for ``A = λI + G`` (float64, ``G`` PSD): Cholesky, or ``eigh`` with the round-off
    negatives of G clamped when Cholesky fails (λ below the round-off of G)."""
    A = G.clone()
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return lambda b: torch.cholesky_solve(b[:, None], L)[:, 0]
    vals, W = torch.linalg.eigh(G)
    inv = 1.0 / (vals.clamp_min(0.0) + lam)
    return lambda b: W @ (inv * (W.T @ b))


def _gram_solve(run: Request, g: Tensor | None, lam: float, tol: float):
    """``d`` by Woodbury on the Gram (its size checked by the caller), with up to two steps of iterative
    refinement (each while the residual is above ``tol`` and still falls by half):
    ``d ← d + (F + λI)⁻¹ (g − (F + λI) d)``."""
    R = FactorRows(run, "Use solver='cg' (matrix-free conjugate gradients: one all-reduce per product)")
    g, loss = _grad_info(run, g, R.batches())
    G = R.gram()
    s = run.scale(R.n)  # after the rows: they count the kept predictions
    G.mul_(s)
    solve = _woodbury(G, lam)
    g64 = g.double()
    gn = float(g64.norm())
    if gn == 0.0:
        return torch.zeros_like(g64), _info(run, g, loss, 0.0, 0, tol)

    def apply(r):  # (F + λI)⁻¹ r by Woodbury
        return (r - R.rmv(solve(s * R.mv(r)))) / lam

    def residual(d):
        return g64 - s * R.normal(d) - lam * d

    d = apply(g64)
    r = residual(d)
    res, steps = float(r.norm()) / gn, 0
    while res > tol and steps < 2:
        d2 = d + apply(r)
        r2 = residual(d2)
        res2 = float(r2.norm()) / gn
        if not res2 < res / 2:
            if res2 < res:
                d, res = d2, res2
            break
        d, r, res, steps = d2, r2, res2, steps + 1
    return d, _info(run, g, loss, res, steps, tol)


# ----------------------------------------------------------------------------- conjugate gradients
def _cg_solve(run: Request, g: Tensor | None, lam: float, tol: float, max_iter: int):
    """``d`` by conjugate gradients on ``F + λI`` (float64 recurrences, products in the model's dtype), restarted
    from the true residual when the recurrence's has drifted below ``tol`` but the true one has not."""
    fm = run.fm
    g, loss = _grad_info(run, g, iter_batches(run.data, fm, need_y=False, batch_size=run.batch_size,
                                              empty_ok=run.empty_ok))
    op = FisherOperator(run)

    def A(v: Tensor) -> Tensor:
        return op.matvec(v.to(fm.dtype)).double() + lam * v

    b = g.double()
    gn = float(b.norm())
    x = torch.zeros_like(b)
    if gn == 0.0:
        return x, _info(run, g, loss, 0.0, 0, tol)
    it, r, res, best = 0, b.clone(), 1.0, math.inf
    while it < max_iter:
        x, it = _cg_run(A, x, r, tol * gn, max_iter - it, it)
        r = b - A(x)
        res = float(r.norm()) / gn
        if res <= tol or not res < best / 2:  # converged, or a restart no longer helps (round-off floor)
            break
        best = res
    return x, _info(run, g, loss, res, it, tol)


def _cg_run(A, x: Tensor, r: Tensor, stop: float, budget: int, it: int) -> tuple[Tensor, int]:
    """Plain CG from ``x`` with residual ``r = b − A x``, until ``‖r‖ <= stop`` (by the recurrence) or ``budget``
    iterations; returns ``(x, it + iterations)``."""
    p, rs = r.clone(), float(r @ r)
    for _ in range(budget):
        Ap = A(p)
        pAp = float(p @ Ap)
        if not pAp > 0:
            break
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        it += 1
        rs_new = float(r @ r)
        if math.sqrt(rs_new) <= stop:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, it
