"""Exact Fisher information: dense matrix, diagonal, trace, per-parameter blocks, Fisher–Rao norm.

Normalisation (docs/conventions.md#fisher-information): with per-sample Jacobians ``J_n (M×P)`` of the flat
outputs and the kind's sandwich ``V_n`` (:meth:`fisherlens.Likelihood.sandwich`),

    F = (1/N) Σ_n J_nᵀ V_n V_nᵀ J_n        (``reduction="sum"`` drops the 1/N; ``"per_prediction"`` divides
                                           by the number of kept predictions instead),

* ``kind="true"``:      ``V_n V_nᵀ = Λ(f_n)``, the output model's Fisher (type-2 / expected Fisher);
* ``kind="empirical"``: ``V_n = ∂ℓ/∂f`` at the observed label, so ``F = (1/N) Σ g_n g_nᵀ``, ``g_n = ∇_θ ℓ_n``;
* ``kind="mc"``:        as empirical but with ``samples`` labels per input drawn from ``p(y | f_n)``
  (``generator`` makes it reproducible) — an unbiased random estimate of the true Fisher.

``θ`` is the flattened selection of parameters in ``named_parameters()`` order (``params=`` subsets it).
Data are streamed batch by batch; only the result is held in memory.
"""

from __future__ import annotations

import math

import torch

from ._core import DiagSum, Request, check_choice, check_dense, deferred_outputs, finite_result, quadratic_sum
from .estimators import Estimate, estimate

Tensor = torch.Tensor

METHODS = ("exact", "hutchinson", "mc")

__all__ = ["fisher_matrix", "fisher_diag", "fisher_trace", "fisher_blocks", "fisher_rao_norm"]


def fisher_matrix(
    model, data, likelihood, kind="true", *, params=None, reduction="mean", samples=1, generator=None,
    batch_size=None, engine="auto", max_memory: int | None = None, output=None, group=None, distributed=None,
) -> Tensor:
    """Dense Fisher matrix ``F (P, P)`` = ``(1/N) Σ_n J_nᵀ V_n V_nᵀ J_n``.

    Refused before allocating when ``P²`` entries would not fit in memory (``max_memory`` bytes, default
    half the available memory); use :func:`fisher_diag`, :func:`fisher_trace`,
    :func:`fisher_blocks` or ``params=`` instead.

    Args:
        model: any ``torch.nn.Module`` mapping a batch ``x`` to outputs ``(B, C)`` (1-D output: C = 1) or
            structured outputs ``(B, *positions, C)`` (a language model's ``(B, T, V)``; the output model's
            ``channels`` says where C is); BatchNorm/Dropout must be in eval mode.
        data: ``(X, Y)`` tensors, a dict of tensors, a ``Dataset`` or an iterable of batches (streamed): each
            ``(X, Y)``, or a dict of keyword inputs of the model with ``labels`` (and ``mask``); ``Y`` may be
            ``None`` unless ``kind="empirical"``.  Labels equal to ``ignore_index`` are dropped positions.
        likelihood: ``fl.Gaussian(sigma)``, ``fl.Categorical()``, ``fl.Bernoulli()`` or ``fl.LossInduced(loss)``.
        kind: ``"true"``, ``"empirical"`` or ``"mc"``.
        params: subset of parameters (names, module prefixes or tensors); default all with ``requires_grad``.
        reduction: ``"mean"`` (default): mean over the N inputs of each input's sum over its kept positions;
            ``"per_prediction"``: divided by the number of kept predictions instead (what
            ``cross_entropy(reduction="mean")`` averages over); ``"sum"``: no normalisation.
        samples: labels drawn per input for ``kind="mc"``.
        generator: ``torch.Generator`` for ``kind="mc"``.
        batch_size: chunk size when ``data`` are tensors or a Dataset (default 256).
        engine: ``"auto"`` (layerwise fast path where it applies, verified; torch.func elsewhere),
            ``"layerwise"`` or ``"functional"`` (pure ``torch.func``; the general reference path).
        max_memory: largest size of the result in bytes.
        output: a callable picking the output tensor from what the model returns (a tuple, dict or
            ``ModelOutput``), e.g. ``output=lambda out: out.logits``.
        group: a ``torch.distributed`` process group (default: the default group, when one is initialised):
            ``data`` is this rank's shard, and the result is that of the union of the shards (the global N in the
            mean), the same on every rank, from one all-reduce per call; random draws are independent per rank
            and reproducible from the one ``generator`` (docs/distributed.md).
        distributed: ``None`` (default): distributed when a process group of more than one rank is
            initialised; ``True``: required; ``False``: this process's data alone.

    Returns:
        Tensor ``(P, P)`` in the model's dtype.
    """
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine=engine, output=output,
                  group=group, distributed=distributed)
    fm = run.fm
    item = fm.itemsize
    check_dense(
        f"fisher_matrix with P={fm.P} parameters", fm.P**2, item,
        "Use fl.fisher_diag / fl.fisher_trace, fl.fisher_blocks(what='dense') for per-layer blocks, "
        "or restrict params=", max_memory,
    )
    return dense(run)


# The reductions below take an optional sandwich ``make_v(f, y) -> (B, C, K)`` with ``columns(C) ≥ K`` (it sizes
# the chunks) in place of the kind's own (the core-space envelopes of fisherlens.bounds use them); the diagonal and
# the trace, sums over the columns, default to the compact sandwich (C − 1 columns for a categorical true Fisher).
def dense(run: Request, make_v=None, columns=None) -> Tensor:
    """``(1/N) Σ_n G_nᵀ G_n`` from materialised rows, ``(P, P)`` (the caller checks the memory)."""
    fm = run.fm
    out = torch.zeros(fm.P, fm.P, dtype=fm.dtype, device=fm.device)
    for _, _, st in run.chunks({"rows"}, make_v, columns):
        R = torch.cat([st.rows[n] for n in fm.names], dim=-1).reshape(-1, fm.P)
        out.addmm_(R.T, R)
    (out,) = run.total([out])
    return finite_result("The Fisher matrix", out * run.scale(), run.explain_nonfinite)


def diag_flat(run: Request, make_v=None, columns=None) -> Tensor:
    """The diagonal ``(P,)``, summed layer by layer into one flat buffer (:class:`~._core.DiagSum`) and scaled
    in place: no per-parameter copy, no concatenation, no second P-vector."""
    acc = DiagSum(run.fm)
    for _ in run.chunks({"diag"}, make_v or run.compact_sandwich, columns, into=acc):
        pass
    (acc,) = run.total([acc.flat()])
    return finite_result("The Fisher diagonal", acc.mul_(run.scale()), run.explain_nonfinite)


def diag_dict(run: Request, make_v=None, columns=None) -> dict[str, Tensor]:
    """Per-parameter diagonals ``{name: (*shape)}`` (views of :func:`diag_flat`)."""
    return run.fm.unflatten(diag_flat(run, make_v, columns))


def trace_dict(run: Request, make_v=None, columns=None) -> dict[str, float]:
    """Per-parameter traces ``{name: float}``."""
    fm = run.fm
    acc = None  # (parameters,) on the device: read once, after the pass
    for _, _, st in run.chunks({"sqnorm"}, make_v or run.compact_sandwich, columns):
        x = torch.stack([st.sqnorm[n].sum() for n in fm.names]).to(torch.float64)
        acc = x if acc is None else acc.add_(x)
    if acc is None:  # an empty shard (under a process group)
        acc = torch.zeros(len(fm.names), dtype=torch.float64, device=fm.device)
    acc = dict(zip(fm.names, run.total([acc])[0].tolist(), strict=True))
    s = run.scale()
    return finite_result("The Fisher trace", {n: v * s for n, v in acc.items()}, run.explain_nonfinite)


def fisher_diag(
    model, data, likelihood, kind="true", method="exact", *, params=None, reduction="mean", samples=1,
    generator=None, batch_size=None, engine="auto", probe="rademacher", per_sample=False, output=None, group=None,
    distributed=None, progress: bool = False,
) -> Tensor | Estimate:
    """Diagonal of the Fisher, ``diag F (P,)`` = ``(1/N) Σ_n Σ_k (V_nᵀ J_n)_k²``, without forming F.

    Args:
        model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine, output, group,
            distributed: as in
            :func:`fisher_matrix`.
        method: ``"exact"``; or a random estimate of the true Fisher's diagonal (see
            :mod:`fisherlens.estimators`): ``"hutchinson"`` (one backward pass per batch and draw) or
            ``"mc"`` (sampled labels), with ``samples`` draws.
        probe: ``"rademacher"`` or ``"gaussian"`` (Hutchinson).
        per_sample: per-sample squares (lower variance, per-sample cost) instead of one backward per batch.
        progress: a progress bar over the draws of a random ``method`` (tqdm; the exact methods show none).

    Returns:
        Tensor ``(P,)`` in ``named_parameters()`` order of the selection, or an :class:`Estimate` of it.
    """
    check_choice("method", method, METHODS)
    if method != "exact":
        run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                      generator=generator, batch_size=batch_size, engine=engine, output=output, group=group,
                      distributed=distributed, progress=progress)
        return estimate(run, method, "diag", probe=probe, per_sample=per_sample, samples=samples, total=True)
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine=engine, output=output,
                  group=group, distributed=distributed)
    return diag_flat(run)


def fisher_trace(
    model, data, likelihood, kind="true", method="exact", *, params=None, reduction="mean", samples=1,
    generator=None, batch_size=None, engine="auto", probe="rademacher", per_sample=False, output=None, group=None,
    distributed=None, progress: bool = False,
) -> float | Estimate:
    """Trace of the Fisher, ``tr F = (1/N) Σ_n ‖V_nᵀ J_n‖²_F`` (empirical: ``(1/N) Σ_n ‖g_n‖²``).

    Computed from per-sample squared norms; per-sample gradients are not materialised on the fast path.

    Args:
        model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine, output, group,
            distributed: as in
            :func:`fisher_matrix`.
        method: ``"exact"``, ``"hutchinson"`` or ``"mc"`` (as in :func:`fisher_diag`).
        probe, per_sample, progress: as in :func:`fisher_diag`.

    Returns:
        float, or an :class:`Estimate` (a float-like value with ``stderr``).
    """
    check_choice("method", method, METHODS)
    if method != "exact":
        run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                      generator=generator, batch_size=batch_size, engine=engine, output=output, group=group,
                      distributed=distributed, progress=progress)
        return estimate(run, method, "trace", probe=probe, per_sample=per_sample, samples=samples, total=True)
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine=engine, output=output,
                  group=group, distributed=distributed)
    return float(math.fsum(trace_dict(run).values()))


def _check_blocks(fm, max_memory, extra: int = 1) -> None:
    check_dense(
        "fisher_blocks(what='dense')", extra * sum(v * v for v in fm.sizes.values()), fm.itemsize,
        "Use what='diag' or 'trace', or restrict params=", max_memory,
    )


def fisher_blocks(
    model, data, likelihood, kind="true", what="diag", method="exact", *, params=None, reduction="mean",
    samples=1, generator=None, batch_size=None, engine="auto", probe="rademacher", per_sample=False,
    max_memory: int | None = None, output=None, group=None, distributed=None, progress: bool = False,
) -> dict:
    """Per-parameter-tensor (per-layer) view of the Fisher: ``{name: value}``.

    ``what="diag"``: the diagonal shaped like the parameter; ``"trace"``: a float per tensor (they sum to
    ``fisher_trace``); ``"dense"``: the diagonal block ``F_[name, name]`` of shape ``(numel, numel)``.

    Args:
        model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine, output, group,
            distributed: as in
            :func:`fisher_matrix`.
        what: ``"diag"``, ``"trace"`` or ``"dense"``.
        method, probe, per_sample, progress: as in :func:`fisher_diag`; random methods give :class:`Estimate`
            values.
        max_memory: largest total size of the dense blocks in bytes.
    """
    check_choice("what", what, ("diag", "trace", "dense"))
    check_choice("method", method, METHODS)
    if method != "exact":
        run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                      generator=generator, batch_size=batch_size, engine=engine, output=output, group=group,
                      distributed=distributed, progress=progress)
        if what == "dense":  # the result (value and stderr); the estimator checks its own running sums
            _check_blocks(run.fm, max_memory, extra=2)
        return estimate(run, method, what, probe=probe, per_sample=per_sample, samples=samples,
                        max_memory=max_memory)
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine=engine, output=output,
                  group=group, distributed=distributed)
    fm = run.fm
    if what == "diag":
        return diag_dict(run)
    if what == "trace":
        return trace_dict(run)
    _check_blocks(fm, max_memory)
    acc = {n: torch.zeros(fm.sizes[n], fm.sizes[n], dtype=fm.dtype, device=fm.device) for n in fm.names}
    for _, _, st in run.chunks({"rows"}):
        for n in fm.names:
            r = st.rows[n].reshape(-1, fm.sizes[n])
            acc[n].addmm_(r.T, r)
    acc = dict(zip(fm.names, run.total(list(acc.values())), strict=True))
    s = run.scale()
    return finite_result("A Fisher block", {n: v * s for n, v in acc.items()}, run.explain_nonfinite)


def fisher_rao_norm(
    model, data, likelihood, kind="true", *, params=None, reduction="mean", samples=1, generator=None,
    batch_size=None, output=None, group=None, distributed=None,
) -> float:
    """Fisher–Rao norm ``θᵀ F θ = (1/N) Σ_n ‖V_nᵀ (J_n θ)‖²`` with θ the selected parameters.

    One ``torch.func.jvp`` per batch (``J_n θ`` for all n at once); F is never formed.

    Args:
        model, data, likelihood, kind, params, reduction, samples, generator, batch_size, engine, output, group,
            distributed: as in
            :func:`fisher_matrix`.
    """
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, reduction=reduction,
                  samples=samples, generator=generator, batch_size=batch_size, engine="functional", output=output,
                  group=group, distributed=distributed)
    with deferred_outputs(run.explain_nonfinite, enabled=kind != "mc"):
        total, _ = quadratic_sum(run.fm, run.batches(), run.v, run.fm.params)
    (total,) = run.total([total])
    return total * run.scale()
