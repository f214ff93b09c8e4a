"""Random estimators of the Fisher: Hutchinson "detach-and-mix" (arXiv:2505.13614) and Monte-Carlo labels.

Both draw, per input and per draw s, a random output-space vector ``ξ_n`` with ``E[ξ_n] = 0`` and
``E[ξ_n ξ_nᵀ] = Λ(f_n)`` from the **detached** outputs:

* ``method="hutchinson"``: ``ξ_n = S_n ε_n`` with ``ε_n`` Rademacher (default) or Gaussian (``probe=``);
* ``method="mc"``: ``ξ_n = ∂ℓ(f_n, ŷ_n)/∂f`` with a label ``ŷ_n ~ p(y | f_n)`` (the MC Fisher).

**Batch estimator** (``per_sample=False``, default): back-propagate the scalar ``Σ_n ξ_n · f_θ(x_n)`` once,
``v = Σ_n J_nᵀ ξ_n``.  The ξ_n are independent with mean zero, so ``E[v vᵀ] = Σ_n J_nᵀ Λ_n J_n`` and
``v ⊙ v``, ``‖v‖²``, ``v vᵀ`` summed over batches and divided by N are unbiased for diag F, tr F and F —
**one backward pass per batch and draw** (draws share the forward pass: ``vmap`` over the ``vjp``).
For one diagonal entry ``v_p = Σ a_i ε_i`` and Rademacher ε, ``Var v_p² = 2(Σa²)² − 2Σa⁴``: the
coefficient of variation of one draw is ≤ √2 (exactly √2 for Gaussian ε).  Sampled labels have no such
bound: their CV grows without limit on peaked classifiers.

**Per-sample estimator** (``per_sample=True``): ``(1/N) Σ_n (J_nᵀ ξ_n)²`` drops the cross-sample terms
``n ≠ m`` (lower variance) at the cost of per-sample squared norms (cheap on the layerwise engine).

Every estimate is an :class:`Estimate` ``(value, stderr, samples)``; ``stderr`` is the standard deviation
over the draws divided by √samples (``nan`` for one draw).

**Memory** is flat in the number of draws: :func:`estimate` processes them in chunks of
:func:`draws_per_chunk` draws (the float64 ``(s, numel)`` block of a chunk fits
:data:`fisherlens._core.WORK_BUDGET`), one pass over the data per chunk (the draws of a chunk share its
forward passes), and keeps only float64 running means and sums of squared deviations (:class:`Moments`).
With a single chunk (``samples · P · 8`` bytes within the budget) the random vectors are drawn in the same
order as in one pass with all draws; with several, chunk by chunk (same law, other values for a given seed).

**Under a process group** (docs/distributed.md) each rank draws the ξ_n of its own inputs from its own generator
(:func:`fisherlens._core.rank_generator`: independent per rank, reproducible from one seed), and each chunk's
per-draw sums are all-reduced before they are normalised by the global N: draw s is then one estimate over the
union of the shards (the batch estimator's batches are the ranks' batches), and ``stderr`` is the spread of
these global draws — the same :class:`Estimate` on every rank.  One all-reduce per chunk of draws (plus one
tiny one agreeing on the chunk's size when ``samples > 1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from ._core import (
    Request,
    check_choice,
    check_dense,
    check_positive_int,
    deferred_outputs,
    differentiable_kernels,
    finite_result,
    pullback_checked,
    work_budget,
)
from .results import Estimate

Tensor = torch.Tensor

__all__ = ["Estimate", "Moments", "estimate", "draw_chunks", "draws", "draws_per_chunk", "probe_vectors"]

METHODS = ("hutchinson", "mc")
PROBES = ("rademacher", "gaussian")


def probe_vectors(likelihood, f: Tensor, method: str, probe: str, draws: int, generator, y=None) -> Tensor:
    """Random output-space vectors ``ξ (B, M, draws)`` with ``E ξ = 0``, ``E ξ ξᵀ = Σ_t Λ(f_t)`` per input, from
    outputs ``f (B, *S)`` (``y`` drops positions): ``S ε`` per kept position (Hutchinson, ``probe`` ε; no C×C
    matrix) or sampled-label residuals (``method="mc"``)."""
    f = f.detach()
    if method == "mc":
        return likelihood.sandwich(f, "mc", y, draws, generator) * math.sqrt(draws)
    shape = (f.shape[0], f[0].numel(), draws)
    if probe == "rademacher":  # ±1: the same stream as integer draws
        eps = torch.randint(0, 2, shape, generator=generator, dtype=f.dtype, device=f.device).mul_(2).sub_(1)
    else:
        eps = torch.randn(shape, generator=generator, dtype=f.dtype, device=f.device)
    return likelihood.probe(f, eps, y)


# ----------------------------------------------------------------------------- streamed draws
class Moments:
    """Running mean and sum of squared deviations of per-draw values, in float64.

    Chunks of draws are merged with the pairwise update of Chan, Golub & LeVeque (1979): a chunk of ``s``
    draws with mean ``m_c`` and ``M2_c = Σ (x − m_c)²`` joins ``(n, m, M2)`` as
    ``m += δ·s/(n+s)``, ``M2 += M2_c + δ²·n·s/(n+s)`` with ``δ = m_c − m`` — no cancellation of
    ``Σx² − (Σx)²/n``, and memory independent of the number of draws.

    Attributes:
        n: draws seen; ``mean``, ``m2``: float64 tensors shaped like one draw (``None`` before the first chunk).
    """

    __slots__ = ("n", "mean", "m2")

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        """Merge per-draw values ``x (s, ...)`` (any float dtype; one float64 working copy)."""
        s = x.shape[0]
        x = x.detach().to(torch.float64, copy=True)
        mc = x.mean(0)
        m2c = x.sub_(mc).square_().sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = s, mc, m2c
            return
        n = self.n + s
        delta = mc - self.mean
        self.mean.add_(delta, alpha=s / n)
        self.m2.add_(m2c).add_(delta.square_(), alpha=self.n * s / n)
        self.n = n

    def estimate(self, scalar: bool = False, dtype: torch.dtype | None = None) -> Estimate:
        """The :class:`Estimate` ``(mean, √(M2/(n−1))/√n, n)``; floats if ``scalar``, else tensors in ``dtype``."""
        S = self.n
        err = (self.m2 / (S - 1)).sqrt_() / math.sqrt(S) if S > 1 else torch.full_like(self.mean, math.nan)
        if scalar:
            return Estimate(float(self.mean), float(err), S)
        dtype = dtype or self.mean.dtype
        return Estimate(self.mean.to(dtype), err.to(dtype), S)


def draw_numel(fm, what: str) -> int:
    """Numbers materialised per draw: the pulled-back vector ``v (P,)``, plus ``Σ numel²`` of the per-draw
    ``v vᵀ`` blocks for ``what="dense"``."""
    return fm.P + (sum(v * v for v in fm.sizes.values()) if what == "dense" else 0)


def draws_per_chunk(fm, what: str, samples: int) -> int:
    """Draws processed together, ``s = WORK_BUDGET // (8 · draw_numel)`` (at least 1, at most ``samples``).

    ``WORK_BUDGET`` (:data:`fisherlens._core.WORK_BUDGET`, read at call time) bounds the float64 ``(s, numel)``
    block of one chunk; the working memory is a few such blocks whatever the number of draws."""
    return int(max(1, min(samples, work_budget() // (8 * draw_numel(fm, what)))))


def _check(run: Request, method: str, what: str, probe: str, per_sample: bool, samples: int, max_memory) -> int:
    """Validate the request and refuse, before allocating, what cannot stream; returns the chunk size."""
    check_choice("method", method, METHODS)
    check_choice("probe", probe, PROBES)
    check_choice("what", what, ("diag", "trace", "dense"))
    check_positive_int("samples", samples, what="random draws")
    if run.kind != "true":
        raise ValueError(
            f"method={method!r} estimates the true Fisher; use kind='true' (kind={run.kind!r} is computed exactly "
            "with method='exact')."
        )
    if per_sample and what == "dense":
        raise ValueError("per_sample=True is available for diag and trace; dense blocks use the batch estimator.")
    numel = draw_numel(run.fm, what)
    check_dense(  # float64 running mean and M2, one float64 working draw, one draw in the model's dtype
        f"{method} draws of the Fisher's {what} ({numel} numbers per draw)", numel, 24 + run.fm.itemsize,
        "Use what='diag' or 'trace', or restrict params=" if what == "dense" else "Restrict params=", max_memory,
    )
    s = draws_per_chunk(run.fm, what, samples)
    if s < samples:
        _check_reiterable(run, samples, s)
    return s


def _check_reiterable(run: Request, samples: int, s: int) -> None:
    """Several chunks read the data several times: refuse a one-shot iterator (its second pass is empty)."""
    if isinstance(run.data, Iterator):
        raise TypeError(
            f"samples={samples} draws are streamed {s} at a time, one pass over the data per chunk, but the data "
            "is a one-shot iterator; pass tensors, a Dataset, a DataLoader or a list of batches (or fewer samples)."
        )


def _batch_chunk(run: Request, method: str, what: str, probe: str, s_max: int) -> tuple[object, int]:
    """One pass of the batch estimator: ``(per-draw sums over the data (unscaled, :func:`_packed` layout), s)``.

    ``s ≤ s_max`` is fixed at the first batch so that the probe vectors ``ξ (B, M, s)`` also fit the budget
    (``s · (draw_numel + B·C) · 8`` bytes).  The squares of the pulled-back ``v`` go straight into one flat
    ``(s, P)`` buffer (diag) or into ``(s, parameters)`` (trace)."""
    fm, lik, acc, s = run.fm, run.likelihood, None, None
    # no host read per batch: output finiteness and the kept count are read once, after the pass (sampled labels
    # need finite outputs first)
    with deferred_outputs(run.explain_nonfinite, enabled=method == "hutchinson"):
        for X, Y in run.batches():
            with differentiable_kernels() if s_max > 1 else nullcontext():  # a batched backward needs them
                f, pull = pullback_checked(fm, X)
            if s is None:
                s = _agreed(run, int(max(1, min(s_max, work_budget() // (8 * (draw_numel(fm, what) + f.numel()))))),
                            s_max)
            fs = fm.structured(f)
            run.m = run.m + lik.kept(fs, Y)
            xi = probe_vectors(lik, fs, method, probe, s, run.generator, Y)
            # {name: (s, numel)} = Σ_n J_nᵀ ξ_n per draw: one plain backward, or the draws in one batched backward
            v = pull(xi[..., 0]) if s == 1 else pull(xi.permute(2, 0, 1))
            del xi, pull
            acc = _fold(fm, what, acc, {n: g.reshape(s, -1) for n, g in v.items()})
            del v
    if s is None:  # an empty shard (under a process group)
        s = _agreed(run, s_max, s_max)
    return acc, s


def _fold(fm, what: str, acc, v: dict[str, Tensor]):
    """Add one batch's pulled-back draws ``v {name: (s, numel)}`` to the running sums ``acc`` (``None`` at the
    first batch): squares into ``(s, P)`` (diag), squared norms into ``(s, parameters)`` (trace), outer products
    ``{name: (s, numel, numel)}`` (dense)."""
    if what == "dense":
        x = {n: g[:, :, None] * g[:, None, :] for n, g in v.items()}
        return x if acc is None else {n: acc[n].add_(x[n]) for n in fm.names}
    if what == "trace":
        x = torch.stack([torch.einsum("sp,sp->s", v[n], v[n]) for n in fm.names], 1)
        return x if acc is None else acc.add_(x)
    first, s = acc is None, next(iter(v.values())).shape[0]
    if first:
        acc = torch.empty(s, fm.P, dtype=fm.dtype, device=fm.device)
    for n, g in v.items():
        view = acc.narrow(1, *fm.spans[n])
        if first:
            torch.mul(g, g, out=view)
        else:
            view.addcmul_(g, g)
    return acc


def _agreed(run: Request, s: int, s_max: int) -> int:
    """The draws of this chunk, the same on every rank: the smallest rank's ``s`` (one all-reduce when ``s_max > 1``
    under a process group; each rank lowers ``s`` for its own first batch, an empty shard keeps ``s_max``)."""
    if run.shards is None or s_max == 1:
        return s
    return min(run.shards.counts(s, device=run.fm.device)[0])


def _zeros(fm, what: str, s: int):
    """The per-draw sums of no data in :func:`_packed` layout (an empty shard's part of the all-reduce)."""
    if what == "dense":
        return {n: torch.zeros(s, fm.sizes[n], fm.sizes[n], dtype=fm.dtype, device=fm.device) for n in fm.names}
    return torch.zeros(s, fm.P if what == "diag" else len(fm.names), dtype=fm.dtype, device=fm.device)


def _per_sample_chunk(run: Request, method: str, what: str, probe: str, s: int) -> tuple[Tensor, int]:
    """One pass of the per-sample estimator for ``s`` draws: ``(sums over the data (:func:`_packed`), s)``;
    :func:`fisherlens._core.stream` sizes the data chunks for the ``s`` columns."""
    fm, acc = run.fm, None
    want = {"diagk"} if what == "diag" else {"sqnorm"}
    make_v = lambda f, y: probe_vectors(run.likelihood, f, method, probe, s, run.generator, y)  # noqa: E731
    for _, _, st in run.chunks(want, make_v, columns=lambda C: s, samples_labels=method == "mc"):
        x = fm.flatten(st.diagk, lead=1) if what == "diag" else \
            torch.stack([st.sqnorm[n].sum(0) for n in fm.names], 1)
        acc = x if acc is None else acc.add_(x)
    return acc, s


def _packed(run: Request, method: str, what: str, probe: str, per_sample: bool, samples: int, max_memory):
    """:func:`draw_chunks` in the packed layout: per chunk of ``s`` draws, the flat diagonal ``(s, P)``
    (``named_parameters`` order), the per-parameter traces ``(s, parameters)``, or the dense blocks
    ``{name: (s, numel, numel)}``; normalised, summed over the ranks under a process group."""
    s = _check(run, method, what, probe, per_sample, samples, max_memory)
    one = _per_sample_chunk if per_sample else _batch_chunk
    done = 0
    while done < samples:
        if done:
            _check_reiterable(run, samples, done)
        acc, k = one(run, method, what, probe, min(s, samples - done))
        if run.shards is not None:  # the per-draw sums over all shards: one all-reduce per chunk of draws
            acc = _all_ranks(run, what, acc, k)
        done += k
        scale = run.scale()
        acc = {n: x.mul_(scale) for n, x in acc.items()} if what == "dense" else acc.mul_(scale)
        yield finite_result(f"The {method} draws of the Fisher's {what}", acc, run.explain_nonfinite)


def _all_ranks(run: Request, what: str, acc, k: int):
    """The per-draw sums of every rank (:meth:`Request.total`); an empty shard contributes zeros."""
    if acc is None:
        acc = _zeros(run.fm, what, k)
    if what != "dense":
        return run.total([acc])[0]
    return dict(zip(run.fm.names, run.total([acc[n] for n in run.fm.names]), strict=True))


def _named(fm, what: str, x) -> dict[str, Tensor]:
    """A packed chunk as ``{name: (s, ...)}`` (views of the packed tensor)."""
    if what == "dense":
        return x
    if what == "trace":
        return dict(zip(fm.names, x.unbind(1), strict=True))
    return fm.unflatten(x)


def draw_chunks(run: Request, method: str, what: str, *, probe: str = "rademacher", per_sample: bool = False,
                samples: int = 1, max_memory: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Per-draw estimates in consecutive chunks: ``{name: (s, ...)}`` per chunk of ``s`` draws, ``Σ s = samples``.

    Each chunk is complete over the data (one pass per chunk; the vectors of chunk c are drawn for every batch
    before those of chunk c+1, so with a single chunk the random stream is that of one pass with all draws).
    ``s`` is :func:`draws_per_chunk`, lowered by the batch estimator so that its probe vectors fit too.
    Normalised like ``run`` (``1/N`` for ``reduction="mean"``).  ``run.kind`` must be ``"true"``.  Refuses,
    before reading data, a draw that cannot fit ``max_memory`` (default half the available memory) and
    several chunks over one-shot data.

    Returns:
        An iterator of dicts: ``diag`` ``(s, *shape)``, ``trace`` ``(s,)``, ``dense`` ``(s, numel, numel)``.
    """
    chunks = _packed(run, method, what, probe, per_sample, samples, max_memory)
    return (_named(run.fm, what, x) for x in chunks)


def draws(run: Request, method: str, what: str, *, probe: str = "rademacher", per_sample: bool = False,
          samples: int = 1, max_memory: int | None = None) -> dict[str, Tensor]:
    """All per-draw estimates ``{name: (samples, ...)}`` (for small cases: the stack is ``samples × numel``).

    Same draws as :func:`estimate` for the same generator state; refused before reading the data when the
    stack would not fit ``max_memory``.  Use :func:`estimate` for many draws (memory flat in ``samples``).
    """
    fm = run.fm
    per_draw = {"diag": fm.P, "trace": len(fm.names)}.get(what, draw_numel(fm, what) - fm.P)
    check_dense(f"a stack of samples={samples} draws", samples * per_draw, fm.itemsize,
                "Use estimate() (streamed) or fewer samples", max_memory)
    parts: dict[str, list[Tensor]] = {n: [] for n in fm.names}
    for d in draw_chunks(run, method, what, probe=probe, per_sample=per_sample, samples=samples,
                         max_memory=max_memory):
        for n, x in d.items():
            parts[n].append(x)
    return {n: torch.cat(p) for n, p in parts.items()}


def _one_draw(run: Request, method: str, what: str, probe: str, per_sample: bool, total: bool, max_memory):
    """``samples=1``: the draw itself is the value, its stderr ``nan`` — no float64 moments, no copy of the flat
    diagonal, and the ``nan`` stderr of a tensor is an expanded scalar (no memory)."""
    (x,) = _packed(run, method, what, probe, per_sample, 1, max_memory)
    fm = run.fm
    if what == "trace":
        vals = dict(zip(fm.names, x[0].tolist(), strict=True))
        return Estimate(math.fsum(vals.values()), math.nan, 1) if total else \
            {n: Estimate(v, math.nan, 1) for n, v in vals.items()}
    nan = lambda t: torch.full((), math.nan, dtype=t.dtype, device=t.device).expand_as(t)  # noqa: E731
    if total:
        return Estimate(x[0], nan(x[0]), 1)
    return {n: Estimate(t[0], nan(t[0]), 1) for n, t in _named(fm, what, x).items()}


def estimate(run: Request, method: str, what: str, *, probe: str = "rademacher", per_sample: bool = False,
             samples: int = 1, total: bool = False, max_memory: int | None = None):
    """Streamed estimates (:class:`Estimate`) of each parameter's diag, trace or dense block; memory flat in
    ``samples``.

    The draws of :func:`draw_chunks` are folded into float64 :class:`Moments` chunk by chunk; values and
    standard errors come back in the model's dtype (floats for traces).

    Args:
        total: ``what="diag"``: one Estimate of the flat diagonal ``(P,)`` (named_parameters order);
            ``what="trace"``: one float Estimate of ``tr F`` (the sum over parameters per draw, so its stderr
            includes their covariance).  Not for ``"dense"``.
        Others: as in :func:`draw_chunks`.

    Returns:
        ``{name: Estimate}``, or one :class:`Estimate` with ``total=True``.
    """
    if total and what == "dense":
        raise ValueError("total=True is for what='diag' or 'trace'.")
    if check_positive_int("samples", samples, what="random draws") == 1:
        return _one_draw(run, method, what, probe, per_sample, total, max_memory)
    fm, trace_total = run.fm, total and what == "trace"
    acc = {n: Moments() for n in fm.names} if what == "dense" else Moments()
    with run.bar(samples, f"{method} draws", "draw") as bar:
        for x in _packed(run, method, what, probe, per_sample, samples, max_memory):
            if what == "dense":
                bar.update(x[fm.names[0]].shape[0])
                for n in fm.names:
                    acc[n].add(x.pop(n))
                continue
            bar.update(x.shape[0])
            acc.add(x.sum(1) if trace_total else x)
    if what == "dense":
        return {n: m.estimate(dtype=fm.dtype) for n, m in acc.items()}
    if trace_total:
        return acc.estimate(scalar=True)
    e = acc.estimate(dtype=fm.dtype if what == "diag" else torch.float64)
    if what == "trace":
        return {n: Estimate(v, err, e.samples)
                for n, v, err in zip(fm.names, e.value.tolist(), e.stderr.tolist(), strict=True)}
    if total:
        return e
    return {n: Estimate(v, err, e.samples)
            for (n, v), err in zip(fm.unflatten(e.value).items(), fm.unflatten(e.stderr).values(), strict=True)}
