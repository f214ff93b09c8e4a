"""Empirical neural tangent kernel and the Fisher–NTK trace relation of Sauter (2023) §5.1.

Convention (docs/conventions.md#neural-tangent-kernel): ``Θ_{nm,ab} = ∇_θ f_a(x_n) · ∇_θ f_b(x_m)``, shape ``(N, N',
M, M)`` with ``M`` the flat output size per input (``C``, or ``T·V`` for ``(B, T, V)`` outputs, in the outputs' own
memory order), **summed over parameters and not averaged over outputs** (neural-tangents averages over outputs by
default; we do not).

"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from ._core import (
    Fields,
    FunctionalModel,
    Request,
    batch_len,
    batch_stats,
    check_choice,
    check_dense,
    check_positive_int,
    chunk_size,
    identity_sandwich,
    output_dim,
    shards_for,
    split_fields,
    stream,
)
from .results import TraceRelation

Tensor = torch.Tensor

__all__ = ["ntk", "ntk_trace", "fisher_ntk_trace", "TraceRelation"]


def _inputs(x, fm: FunctionalModel):
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], (Tensor, Mapping)):
        x = x[0]
    if isinstance(x, Mapping):
        x = split_fields(x)[0]
    if not isinstance(x, (Tensor, Fields)):
        raise TypeError(f"ntk needs input tensors (N, ...) or a dict of keyword inputs; got {type(x).__name__}. "
                        "Use ntk_trace for data streams.")
    if batch_len(x) == 0:
        raise ValueError("ntk needs at least one input.")
    return x.to(fm.device, fm.dtype) if isinstance(x, Fields) or torch.is_floating_point(x) else x.to(fm.device)


def _jacobians(fm: FunctionalModel, x, step: int, engine: str):
    """Yield ``(start, J (b, M, P))`` for chunks of ``x``: per-sample Jacobians, rows of the NTK."""
    for i in range(0, len(x), step):
        _, _, st = batch_stats(fm, x[i : i + step], identity_sandwich, {"rows"}, engine)
        yield i, torch.cat([st.rows[n] for n in fm.names], dim=-1)


def ntk(
    model, x1, x2=None, *, params=None, batch_size: int | None = None, engine: str = "auto",
    max_memory: int | None = None, output=None,
) -> Tensor:
    """Empirical NTK ``Θ (N1, N2, M, M)``, ``Θ_{nm,ab} = ∇_θ f_a(x1_n) · ∇_θ f_b(x2_m)``.

    Args:
        model: module mapping ``(B, ...)`` inputs to outputs ``(B, *S)``; ``M = prod(S)`` (``C`` for ``(B, C)``
            outputs; a ``(B, T, V)`` language model's ``a`` runs over its ``T·V`` logits in memory order).
        x1: inputs ``(N1, ...)`` (or a dict of keyword inputs); x2: inputs ``(N2, ...)``, default ``x1``.
        params: parameter subset (names, module prefixes or tensors); default all trainable.
        batch_size: inputs per Jacobian chunk (default: as many as fit a 512 MiB working budget); a positive
            integer (anything else raises ``ValueError``).
        engine: ``"auto"``, ``"layerwise"`` or ``"functional"`` (see :func:`fisherlens.fisher_diag`).
        max_memory: largest size of the result in bytes (default half the available memory).
        output: picks the output tensor from the model's output, as in :func:`fisherlens.fisher_matrix`.

    Returns:
        Tensor ``(N1, N2, M, M)``; summed over parameters, not averaged over outputs.
    """
    check_positive_int("batch_size", batch_size, optional=True)
    fm = FunctionalModel(model, params, output)
    x1 = _inputs(x1, fm)
    x2 = x1 if x2 is None else _inputs(x2, fm)
    C = output_dim(fm, x1)
    item = fm.itemsize
    check_dense(
        f"ntk of {len(x1)}×{len(x2)} inputs with C={C}", len(x1) * len(x2) * C * C, item,
        "Use fl.ntk_trace, or fewer inputs", max_memory,
    )
    step = batch_size or chunk_size(fm, x1, C, {"rows"}, engine, share=2, M=C)  # two chunks held
    out = torch.empty(len(x1), len(x2), C, C, dtype=fm.dtype, device=fm.device)
    if x2 is x1 and len(x1) <= step:  # everything in one chunk: one Jacobian pass
        _, J = next(_jacobians(fm, x1, step, engine))
        return torch.einsum("nap,mbp->nmab", J, J)
    for i, Ji in _jacobians(fm, x1, step, engine):
        for j, Jj in _jacobians(fm, x2, step, engine):
            out[i : i + len(Ji), j : j + len(Jj)] = torch.einsum("nap,mbp->nmab", Ji, Jj)
    return out


def ntk_trace(model, x, *, params=None, reduction: str | None = None, batch_size=None, engine="auto",
              output=None, group=None, distributed: bool | None = None) -> float:
    """Trace of the NTK, ``tr Θ = Σ_n Σ_a ‖∇_θ f_a(x_n)‖²`` with ``reduction="sum"``, ``(1/N) tr Θ`` with
    ``"mean"``.

    The library's rule is "mean unless ``reduction="sum"``"; ``ntk_trace`` used to default to the sum, so for now
    an omitted ``reduction`` still gives the sum, with a ``FutureWarning`` (the default becomes ``"mean"``):
    pass ``reduction`` explicitly.

    ``x`` is an input tensor ``(N, ...)`` or any ``data`` accepted elsewhere (labels are ignored); streamed,
    and on the fast path no Jacobian is materialised.  ``batch_size``: ``None`` or a positive integer
    (else ``ValueError``).  ``group``, ``distributed``: as in :func:`fisherlens.fisher_matrix` (``x`` is this
    rank's shard; the trace and N are summed over the ranks).
    """
    if reduction is None:
        warnings.warn("fl.ntk_trace's default reduction will change from 'sum' to 'mean' (the library's rule); pass "
                      "reduction='sum' (today's default) or reduction='mean' explicitly.", FutureWarning, stacklevel=2)
        reduction = "sum"
    check_choice("reduction", reduction, ("mean", "sum"))
    check_positive_int("batch_size", batch_size, optional=True)
    fm = FunctionalModel(model, params, output)
    shards = shards_for(group, distributed)
    total, n = 0.0, 0
    chunks = stream(
        fm, x, lambda f, _: identity_sandwich(f), {"sqnorm"}, need_y=False, columns=lambda C: C,
        batch_size=batch_size, engine=engine, empty_ok=shards is not None,
    )
    for b, _, _, st in chunks:
        total += math.fsum(s.sum().item() for s in st.sqnorm.values())
        n += b
    if shards is not None:
        total, n = shards.sum([total, n], device=fm.device)
        if n == 0:
            raise ValueError("The data is empty on every rank: no samples to average over.")
    return total / n if reduction == "mean" else total


def fisher_ntk_trace(
    model, data, likelihood, kind: str = "empirical", *, params=None, samples: int = 1, generator=None,
    batch_size=None, engine: str = "auto", per_sample: bool = False, output=None,
    group=None, distributed: bool | None = None,
) -> TraceRelation:
    """Both sides of ``tr F = (1/N) Σ_n tr(V_nᵀ Θ_nn V_n)`` (docs/conventions.md#trace-relation), plus ``tr Θ`` alone.

    One backward pass per batch with the C identity columns and the K sandwich columns side by side
    gives the per-sample Gram ``[I V]ᵀ J_n J_nᵀ [I V]``: its ``I`` block is ``Θ_nn``, its ``V`` block's trace
    the direct ``tr F_n``.  Arguments as in :func:`fisherlens.fisher_trace`; ``per_sample=True`` also
    returns the per-input traces (memory O(N); under a process group those of this rank's inputs, the traces
    themselves over all ranks); ``batch_size`` is ``None`` or a positive integer (else
    ``ValueError``).
    """
    check_positive_int("batch_size", batch_size, optional=True)
    run = Request(model=model, data=data, likelihood=likelihood, kind=kind, params=params, samples=samples,
                  generator=generator, batch_size=batch_size, engine=engine, output=output,
                  group=group, distributed=distributed)
    fis = side = ntr = 0.0
    keep: list[tuple[Tensor, Tensor]] = []

    def make_v(f, _):
        return torch.cat([identity_sandwich(f), run.sandwich(f, _)], dim=-1)

    for f, W, st in run.chunks({"gram"}, make_v, columns=lambda C: C + run.columns(C)):
        C = f.shape[-1]
        V, theta = W[:, :, C:], st.gram[:, :C, :C]
        direct = st.gram[:, C:, C:].diagonal(dim1=-2, dim2=-1).sum(-1)  # (B,) tr F_n
        tr_theta = theta.diagonal(dim1=-2, dim2=-1).sum(-1)  # (B,) tr Θ_nn
        fis += direct.sum().item()
        side += torch.einsum("bck,bcd,bdk->", V, theta, V).item()
        ntr += tr_theta.sum().item()
        if per_sample:
            keep.append((direct, tr_theta))
    fis, side, ntr = run.total([fis, side, ntr])
    ps = _per_input(run, keep) if per_sample else None
    s = run.scale()  # 1/N; refuses data whose every position is ignored
    return TraceRelation(fis * s, side * s, ntr * s, ps)


def _per_input(run: Request, keep: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The per-input traces ``(tr F_n, tr Θ_nn)`` kept by :func:`fisher_ntk_trace` (empty for an empty shard)."""
    if not keep:
        return run.fm.params[run.fm.names[0]].new_zeros(0), run.fm.params[run.fm.names[0]].new_zeros(0)
    return torch.cat([a for a, _ in keep]), torch.cat([b for _, b in keep])
