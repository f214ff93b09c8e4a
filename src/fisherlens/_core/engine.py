"""The engines: per-batch statistics of the factor rows, and the stream of chunks every view reduces.

:func:`batch_stats` forwards one chunk once, builds the sandwich ``V = make_v(f)`` and yields the requested
:class:`~.stats.Stats`: owned parameters (:mod:`.layerwise.plan`) from their layers' inputs and output
gradients by their :mod:`rules <.layerwise.rules>`, every other parameter by the functional engine
(:func:`~.functional.functional_rows`).  :func:`stream` splits the data into chunks by the one chunking
policy, :func:`chunk_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from .checks import ENGINES, check_choice, check_dense, close_enough
from .data import iter_batches
from .functional import functional_rows
from .layerwise.capture import tap_grads
from .layerwise.plan import (
    Plan,
    ambiguous,
    call_problems,
    capture_forward,
    check_batch,
    demote,
    plan_for,
    signature,
    signature_key,
)
from .layerwise.rules import Call, rule_for, ruled_layers
from .model import FunctionalModel, forward_checked, jvp_checked
from .stats import DiagSum, Stats

Tensor = torch.Tensor


def work_budget() -> int:
    """The working-memory budget in bytes, :data:`fisherlens._core.WORK_BUDGET` (read at call time)."""
    from . import WORK_BUDGET

    return WORK_BUDGET


def identity_sandwich(f: Tensor) -> Tensor:
    """``V = I`` (the NTK) for outputs ``f (B, *S)``: rows are the per-sample Jacobians, ``(B, M, M)``."""
    M = f[0].numel()
    return torch.eye(M, dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)


def batch_stats(fm: FunctionalModel, X, make_v, want: set[str], engine: str = "auto", into: DiagSum | None = None):
    """Forward ``X``, build ``V = make_v(f) (B, M, K)`` from the outputs in the model's shape ``f (B, *S)``;
    return ``(f, V, stats)`` with the flat outputs ``f (B, M)``.

    ``want`` ⊆ {diag, diagk, sqnorm, gram, rows} names the :class:`~.stats.Stats` to compute.  The layerwise
    fast path proves its attribution on every call: each owned layer's input keeps the batch on axis 0 and
    runs as often as when verified, and where shapes alone cannot tell (:func:`~.layerwise.plan.ambiguous`)
    one extra cotangent column ``c_b·(V_b w)`` checks that each sample's output gradient lives in that
    sample's slice.  ``into``: the diagonal is added there (:attr:`Stats.into`) instead of returned.
    """
    check_choice("engine", engine, ENGINES)
    plan = plan_for(fm)
    sig = signature(fm, X, prove=engine != "functional")
    if engine == "layerwise" and len(plan.owned) < len(fm.names):
        missing = [n for n in fm.names if n not in plan.owned]
        raise ValueError(f"engine='layerwise' handles only parameters of layers with a rule ({ruled_layers()}) "
                         f"used through them; not {missing}. Use engine='auto'.")
    stats = Stats(into)
    owned: dict = {}
    if engine == "functional" or not plan.owned:
        with torch.no_grad():
            f = forward_checked(fm, fm.params, X)
        V = make_v(fm.structured(f))
    else:
        f, _, rec = capture_forward(fm, plan, X)
        demote(plan, call_problems(plan, rec.calls, len(X), sig.calls))
        V = make_v(fm.structured(f.detach()))
        k = column_chunk(fm, sig, want, rec.calls, V)
        if k >= V.shape[-1]:
            layer_stats(fm, plan, rec.calls, checked_grads(plan, rec.calls, f, V), want, stats, V.shape[0],
                        V.shape[-1])
        else:
            column_stats(fm, plan, rec.calls, f, V, k, want, stats)
        owned = plan.owned
    rest = [n for n in fm.names if n not in owned]
    if rest:
        rows = functional_rows(fm, rest, X, V)
        for n in rest:
            stats.add_rows(n, rows[n].reshape(*V.shape[::2], -1), want, fm.shapes[n])
    return f.detach(), V, stats


#: statistics that are sums over the sandwich columns (diag) or kept per column (diagk, sqnorm): they can be
#: computed a few columns at a time
COLUMNWISE = frozenset({"diag", "diagk", "sqnorm"})
#: share of :func:`work_budget` that one backward's output gradients may take before the columns are split
COLUMN_SHARE = 8


def column_chunk(fm: FunctionalModel, sig, want: set[str], calls: list[Call], V: Tensor) -> int:
    """Sandwich columns per backward: all K, unless the output gradients of K columns (``K · B`` times the
    per-sample activations) exceed ``work_budget() / COLUMN_SHARE`` and the statistics allow splitting them
    (:data:`COLUMNWISE`, no call whose attribution needs the check column).  Splitting reuses the forward: the
    columns are back-propagated in groups through the retained graph, so the peak holds one group's gradients
    (as BackPACK frees each layer's) at nearly the same cost (a batched backward is linear in its columns)."""
    B, K = V.shape[0], V.shape[-1]
    if K == 1 or not want <= COLUMNWISE or any(ambiguous(c, B) for c in calls):
        return K
    per_column = fm.itemsize * B * max(sig.act, 1)
    return int(max(1, min(K, work_budget() // (COLUMN_SHARE * per_column))))


def column_stats(fm: FunctionalModel, plan: Plan, calls: list[Call], f: Tensor, V: Tensor, k: int,
                 want: set[str], stats: Stats) -> None:
    """:func:`layer_stats` of ``V (B, M, K)`` ``k`` columns at a time through the retained graph: ``diag`` summed,
    ``diagk`` / ``sqnorm`` joined along their column axis.  What the rules compute from the inputs alone (the
    convolutions' patches) is kept across the groups when all of it fits ``work_budget() / COLUMN_SHARE``."""
    B, K = V.shape[0], V.shape[-1]
    keep = fm.itemsize * B * sum(rule_for(c.module).patch_numel(c) for c in calls) <= work_budget() // COLUMN_SHARE
    calls = [dataclasses.replace(c, memo={}) for c in calls] if keep else calls
    parts = []
    for j in range(0, K, k):
        part, Vj = Stats(stats.into), V[..., j : j + k]
        grads = tap_grads(calls, f, Vj, retain_graph=j + k < K)
        layer_stats(fm, plan, calls, grads, want, part, B, Vj.shape[-1])
        del grads
        parts.append(part)
    for n in parts[0].diag:
        stats.diag[n] = sum(p.diag[n] for p in parts)
    for n in parts[0].diagk:
        stats.diagk[n] = torch.cat([p.diagk[n] for p in parts])
    for n in parts[0].sqnorm:
        stats.sqnorm[n] = torch.cat([p.sqnorm[n] for p in parts], 1)


def checked_grads(plan: Plan, calls: list[Call], f: Tensor, V: Tensor) -> list[Tensor]:
    """:func:`~.layerwise.capture.tap_grads` of the K columns; when a call is ambiguous, with one extra
    column ``c_b (V_b w)`` (random ``c``, ``w``) whose gradient must be ``c_b Σ_k w_k g_kb`` sample by
    sample along axis 0 — parameters of a call that fails are demoted."""
    B, K = V.shape[0], V.shape[-1]
    if not any(ambiguous(c, B) for c in calls):
        return tap_grads(calls, f, V)
    gen = torch.Generator(device="cpu").manual_seed(1)
    c = (torch.rand(B, generator=gen, dtype=V.dtype) + 0.5).to(V.device)
    w = torch.randn(K, generator=gen, dtype=V.dtype).to(V.device)
    grads = tap_grads(calls, f, V, extra=c[:, None] * (V @ w))
    wrong = set()
    for call, g in zip(calls, grads, strict=True):
        if ambiguous(call, B):
            expect = c.reshape(-1, *[1] * (call.tap.dim() - 1)) * torch.einsum("k,kb...->b...", w, g[:K])
            if not close_enough(g[K], expect):
                wrong.add(id(call.module))
    demote(plan, {n: "the output gradient of its layer mixes the samples along axis 0 (the batch is on another "
                     "axis)" for n, (_, mods) in plan.owned.items() if any(id(m) in wrong for m in mods)})
    return [g[:K] for g in grads]


def in_dtype(call: Call, dtype: torch.dtype) -> Call:
    """The call with its floating layer input in ``dtype`` (under ``torch.autocast`` layers see lower-precision
    inputs; their squares and Grams are accumulated in the parameters' dtype)."""
    a = call.a
    if not a.is_floating_point() or a.dtype == dtype:
        return call
    return dataclasses.replace(call, a=a.to(dtype))


def layer_stats(fm: FunctionalModel, plan: Plan, calls: list[Call], grads: list[Tensor], want: set[str],
                stats: Stats, B: int, K: int) -> None:
    """Statistics of every owned parameter from its layers' calls and output gradients ``(K, B, ...)`` (shared
    with the Monitor's per-step batch trace), layer by layer: the rule's fast path where it applies (one
    :meth:`LayerRule.fast_layer` for a layer's weight and bias), else its rows.  Each call's entry of ``grads`` is
    released (set to None) after its last layer; a diagonal summed into :attr:`Stats.into` is added there layer
    by layer, in place where the rule can."""
    by_module: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault(id(c.module), []).append(i)
    # the parameters of each set of modules ({which: name}), output side first: a chain frees its layers'
    # gradients before the (often widest) input layer's squares
    layers: dict[tuple, tuple[list, dict[str, str]]] = {}
    for n, (which, mods) in reversed(plan.owned.items()):
        layers.setdefault(tuple(map(id, mods)), (mods, {}))[1][which] = n
    uses = {key: [i for k in key for i in by_module.get(k, [])] for key in layers}
    last = {i: key for key, idx in uses.items() for i in idx}  # the last layer to read each call's gradients
    in_place = want == {"diag"} and stats.into is not None
    for key, (mods, names) in layers.items():
        idx = uses[key]
        if not idx:  # layer unused in this forward (as when verified): its rows are zero
            for n in names.values():
                stats.add_rows(n, fm.params[n].new_zeros(B, K, fm.sizes[n]), want, fm.shapes[n])
            continue
        rule, sub = rule_for(mods[0]), [in_dtype(calls[i], fm.dtype) for i in idx]
        if "rows" in want or not rule.fast(sub):
            for which, n in names.items():
                r = sum(rule_for(c.module).rows(c, grads[i].to(fm.dtype), which) for c, i in zip(sub, idx, strict=True))
                stats.add_rows(n, r.transpose(0, 1), want, fm.shapes[n])  # (B, K, numel)
        else:
            into = {w: stats.into.view(n) for w, n in names.items()} if in_place else None
            for which, st in rule.fast_layer(sub[0], grads[idx[0]].to(fm.dtype), tuple(names), want, into).items():
                stats.add(names[which], st)
        for i in idx:
            if last[i] == key:
                grads[i] = None


def output_dim(fm: FunctionalModel, X) -> int:
    """M, the flat output size per input for inputs like ``X``: one forward of one sample, remembered per model and
    input signature."""
    cache = plan_for(fm).out_dim
    key = signature_key(X)
    if key not in cache:
        with torch.no_grad():
            cache[key] = forward_checked(fm, fm.params, X[:1]).shape[-1]
    return cache[key]


def chunk_size(fm: FunctionalModel, X, K: int, want: set[str], engine: str = "auto", share: int = 1,
               M: int = 0) -> int:
    """Inputs per chunk so that one chunk's working memory fits :func:`work_budget` ``/ share``.

    Per input and sandwich column it counts the materialised rows (all P for ``rows`` and the functional
    engine; the largest layer without a fast path otherwise, as rows are reduced layer by layer), the
    backward's activations, the fast paths' per-column temporaries and the sandwich's ``M`` outputs; conv
    layers add their unfolded patches.  Refuses, before allocating, a single input that cannot fit in memory,
    naming the scalable estimators (an exact true Fisher of ``T`` positions × ``C`` classes has ``K = T·C``).
    """
    sig = signature(fm, X, prove=engine != "functional")
    owned = {} if engine == "functional" else plan_for(fm).owned
    if "rows" in want:
        rows = fm.P
    else:
        rows = sum(fm.sizes[n] for n in fm.names if n not in owned)
        rows += max((fm.sizes[n] for n in owned if n not in sig.fast), default=0)
    per = fm.itemsize * ((K + 1) * (rows + sig.act + sig.column + M) + sig.patch)
    check_dense(f"One input's working set ({K} sandwich columns × {rows + sig.act + sig.column + M} numbers)", per, 1,
                "The exact true Fisher has one column per output (K = M, e.g. T·V for a language model): use "
                "method='hutchinson' or kind='mc' (one backward per batch and draw), kind='empirical' (one "
                "column), fewer samples=, or a parameter subset params=", None)
    return max(1, work_budget() // (share * per))


def stream(fm: FunctionalModel, data, make_v, want: set[str], *, need_y: bool, columns,
           batch_size: int | None = None, engine: str = "auto", empty_ok: bool = False,
           into: DiagSum | None = None) -> Iterator[tuple[int, Tensor, Tensor, Stats]]:
    """Stream ``data`` and yield ``(n, f, V, stats)`` per chunk, ``V = make_v(f, Y)`` (``f (B, *S)`` in the
    model's output shape) with ``columns(M)`` columns per sample; batches are split by :func:`chunk_size`;
    nothing is accumulated across chunks except the diagonal summed into ``into`` (``empty_ok``: as in
    :func:`~.data.iter_batches`)."""
    for X, Y in iter_batches(data, fm, need_y=need_y, batch_size=batch_size, empty_ok=empty_ok):
        M = output_dim(fm, X)
        step = chunk_size(fm, X, columns(M), want, engine, M=M)
        for i in range(0, len(X), step):
            Xc, Yc = X[i : i + step], None if Y is None else Y[i : i + step]
            f, V, st = batch_stats(fm, Xc, lambda f, Yc=Yc: make_v(f, Yc), want, engine, into)
            yield len(Xc), f, V, st


def quadratic_sum(fm: FunctionalModel, batches, sandwich, v: dict[str, Tensor], *,
                  at: dict[str, Tensor] | None = None) -> tuple[float, int]:
    """``(Σ_n ‖V_nᵀ J_n v‖², N)`` over ``(X, Y)`` batches with ``V = sandwich(f (B, *S), Y) (B, M, K)``:
    ``N · vᵀ F v`` matrix-free, one jvp per batch (at the model's parameters or at ``at``); F is never formed."""
    total, n = 0.0, 0  # the total stays on the device until the pass ends
    for X, Y in batches:
        check_batch(fm, X)
        f, jt = jvp_checked(fm, X, v, at)
        V = sandwich(fm.structured(f), Y)
        total = total + torch.einsum("bck,bc->bk", V, jt).square().sum().to(torch.float64)
        n += len(X)
    return float(total), n
