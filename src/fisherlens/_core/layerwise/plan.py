"""The layerwise plan: which parameters the fast engine owns, and the proof that its attribution holds.

A parameter is *owned* when it is the ``weight``/``bias`` of a layer with a rule (:mod:`.rules`) and of no
other module.  Ownership is kept only while it is proven:

* once per input signature (:func:`signature`): with random cotangents ``w_b`` and random per-sample weights
  ``c_b``, ``Σ_b c_b · row_b(w_b)`` must equal autograd's ``∇_θ Σ_b c_b w_b·f_b`` — plain sums would be right
  whichever rows went to which sample — and the model must be deterministic and sample-independent;
* on every call (:func:`call_problems`, and the engine's check column): each owned layer's input keeps the
  batch on axis 0 and the layer runs as often as when verified.

A parameter that fails goes to the functional engine for good, with a warning naming it (:func:`demote`).
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import close_enough
from ..fields import Fields
from ..model import FunctionalModel, forward_checked
from .capture import Capture, tap_grads
from .rules import Call, rule_for

Tensor = torch.Tensor

__all__ = ["Signature", "Plan", "plan_for", "capture_forward", "check_batch", "signature", "signature_key",
           "route_memo", "ambiguous", "call_problems", "demote"]


@dataclass
class Signature:
    """What the verification of one input signature ``(shape[1:], dtype)`` established."""

    calls: Counter  # id(owned module) -> calls per forward
    fast: frozenset  # owned parameters whose rule reduces diag/sqnorm/Gram without rows
    act: int  # per-sample numel of all module outputs: the backward's working set per sandwich column
    patch: int  # largest per-sample numel of unfolded conv patches (shared by the sandwich columns)
    column: int = 0  # largest per-sample numel a fast path builds per sandwich column


@dataclass
class Plan:
    """Which selected parameters the layerwise engine owns (name -> (attribute, [modules])), and what was
    verified per input signature."""

    owned: dict[str, tuple[str, list[nn.Module]]] = field(default_factory=dict)
    signatures: dict = field(default_factory=dict)  # (input shape[1:], dtype) -> Signature
    independent: set = field(default_factory=set)  # signatures checked by check_batch
    measured: dict = field(default_factory=dict)  # sizes only, for the functional engine (signature(prove=False))
    out_dim: dict = field(default_factory=dict)  # (input shape[1:], dtype) -> C
    routes: dict = field(default_factory=dict)  # ((input shape[1:], dtype), B) -> memo of pullback_jvp's FLOPs
    loop: bool = False  # vmap cannot batch the model over samples: the functional engine loops


#: model -> {(name, id(tensor)) selection: plan}; the verification result lives as long as the model.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(fm: FunctionalModel) -> Plan:
    """The cached plan for this model and parameter selection (module structure walked once; remembered on
    ``fm.plan`` for the rest of the call)."""
    if fm.plan is None:
        key = tuple((n, id(t)) for n, t in fm.tensors.items())
        plans = _PLANS.setdefault(fm.model, {})
        if key not in plans:
            plans[key] = _make_plan(fm)
        fm.plan = plans[key]
    return fm.plan


def _make_plan(fm: FunctionalModel) -> Plan:
    ids = {id(t): n for n, t in fm.tensors.items()}
    owners: dict[str, tuple[str, list]] = {}
    foreign: set[str] = set()
    for m in fm.model.modules():
        for attr, t in m._parameters.items():
            if t is None or id(t) not in ids:
                continue
            n = ids[id(t)]
            if rule_for(m) is not None and attr in ("weight", "bias"):
                prev = owners.setdefault(n, (attr, []))
                if prev[0] != attr:
                    foreign.add(n)
                prev[1].append(m)
            else:
                foreign.add(n)
    return Plan({n: v for n, v in owners.items() if n not in foreign})


def ambiguous(call: Call, B: int) -> bool:
    """Whether shapes alone cannot show that a call's axis 0 is the batch: an input axis that the layer does not
    fix also has size B (e.g. a sequence-first ``(T, B, I)`` input with ``T = B``)."""
    return B in rule_for(call.module).batch_axes(call)


def capture_forward(fm: FunctionalModel, plan: Plan, X: Tensor, verify: bool = False):
    """One forward of ``X`` with the owned layers tapped; returns ``(f, p, capture)``.

    With ``verify`` (the proof of :func:`_verify`) the owned parameters require grad, for autograd's reference
    gradient, and every module's output size is measured.  Fused fast paths that would bypass the layers' own
    forward (``nn.MultiheadAttention``/``TransformerEncoderLayer``) are off in every checked forward
    (:func:`~fisherlens._core.model.differentiable_kernels`), and a layer that runs fewer times than when
    verified is demoted (:func:`call_problems`).
    """
    p = {n: t.detach().requires_grad_(n in plan.owned) for n, t in fm.params.items()} if verify else fm.params
    rec = Capture((m for _, mods in plan.owned.values() for m in mods), measure=fm.model if verify else None)
    try:
        with torch.enable_grad():
            f = forward_checked(fm, p, X)
    finally:
        rec.close()
    return f, p, rec


def _check_independent(fm: FunctionalModel, X: Tensor) -> None:
    """Refuse models whose outputs are random or depend on the other inputs of the batch (per-sample Fisher
    quantities are undefined for them): two forwards of ``X[:4]`` must agree, and so must ``X[:1]``, ``X[1:4]``
    forwarded apart."""
    X = X[: min(len(X), 4)]
    with torch.no_grad():
        f = forward_checked(fm, fm.params, X)
        if not close_enough(forward_checked(fm, fm.params, X), f):
            raise ValueError(
                "The model gives different outputs for the same inputs on two calls (a random forward, e.g. "
                "F.dropout(training=True) or noise); Fisher quantities need a deterministic model. Make the forward "
                "deterministic (model.eval() and training=self.training)."
            )
        if len(X) > 1:
            parts = torch.cat([forward_checked(fm, fm.params, X[:1]), forward_checked(fm, fm.params, X[1:])])
            if not close_enough(parts, f):
                raise ValueError(
                    "The model's output for one input depends on the other inputs of its batch (e.g. centring by "
                    "the batch mean, batch statistics); per-sample Fisher quantities are undefined for it. Compute "
                    "such statistics per sample or from fixed buffers."
                )


def signature_key(X) -> tuple:
    """What the per-signature caches are keyed by: the input's per-sample shape and dtype (of each keyword
    input for a :class:`~fisherlens._core.fields.Fields` batch)."""
    if isinstance(X, Fields):
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in X.items())
    return tuple(X.shape[1:]), X.dtype


def route_memo(fm: FunctionalModel, X) -> dict:
    """The memo of the two ``J t`` routes' counted FLOPs (:func:`~fisherlens._core.model.pullback_jvp`) for this
    model, parameter selection and batch shape ``X``."""
    return plan_for(fm).routes.setdefault((signature_key(X), len(X)), {})


def check_batch(fm: FunctionalModel, X: Tensor) -> None:
    """Once per model, selection and input signature: the model is deterministic and sample-independent
    (:func:`_check_independent`).  Every view that forwards data calls it."""
    plan, key = plan_for(fm), signature_key(X)
    if key not in plan.independent:
        _check_independent(fm, X)
        plan.independent.add(key)


def signature(fm: FunctionalModel, X: Tensor, prove: bool = True) -> Signature:
    """:func:`check_batch`, then the layerwise attribution (:func:`_verify`, which also measures the per-sample
    sizes of the working budget), once per input signature.  ``prove=False`` (the functional engine, which owns
    nothing) only measures the sizes, and leaves the layerwise plan untouched."""
    check_batch(fm, X)
    plan, key = plan_for(fm), signature_key(X)
    if key in plan.signatures:
        return plan.signatures[key]
    if prove:
        plan.signatures[key] = _verify(fm, plan, X)
        return plan.signatures[key]
    if key not in plan.measured:
        with torch.no_grad():
            rec = Capture((), measure=fm.model)
            try:
                forward_checked(fm, fm.params, X[:1])
            finally:
                rec.close()
        plan.measured[key] = Signature(Counter(), frozenset(), rec.act, 0)
    return plan.measured[key]


def call_problems(plan: Plan, calls: list[Call], B: int, counts: Counter | None) -> dict[str, str]:
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


def demote(plan: Plan, problems: dict[str, str], stacklevel: int = 4) -> None:
    """Hand parameters to the general engine for good, saying so once (``problems``: name -> reason)."""
    for n in problems:
        plan.owned.pop(n, None)
    if problems:
        why = "; ".join(f"'{n}': {r}" for n, r in problems.items())
        warnings.warn(
            f"Parameters {list(problems)}: the layerwise engine cannot prove their per-sample attribution ({why}); "
            "fisherlens computes them with the slower general (torch.func) engine instead (exact).",
            stacklevel=stacklevel,
        )


def _verify(fm: FunctionalModel, plan: Plan, X: Tensor) -> Signature:
    """Prove the layerwise attribution on ``X[:4]`` and measure the signature's per-sample sizes.

    With random cotangents ``w_b`` and random per-sample weights ``c_b``, ``Σ_b c_b · row_b(w_b)`` must equal
    autograd's ``∇_θ Σ_b c_b w_b·f_b``.  (Plain sums ``Σ_b row_b`` would not do: they are right whichever rows
    are given to which sample.)  A parameter that fails — used outside its layer, or reached through inputs
    whose first axis is not the batch — goes to the functional engine, with a warning.
    """
    X = X[: min(len(X), 4)]
    B = len(X)
    f, p, rec = capture_forward(fm, plan, X, verify=True)
    demote(plan, call_problems(plan, rec.calls, B, None), stacklevel=5)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
    c = (torch.rand(B, generator=gen, dtype=f.dtype) + 0.5).to(f.device)
    names = list(plan.owned)
    if not names:
        return _signature_of(fm, plan, rec)
    with torch.enable_grad():
        true = torch.autograd.grad((f * w * c[:, None]).sum(), [p[n] for n in names], retain_graph=True,
                                   allow_unused=True)
    if not all(bool(torch.isfinite(t).all()) for t in true if t is not None):
        fm.check_finite(X)  # a NaN parameter or input that does not reach the outputs poisons the backward
        raise ValueError("The model's gradients are not finite on this data (NaN or inf in its backward); the "
                         "Fisher is undefined there.")
    grads = tap_grads(rec.calls, f, w[:, :, None])
    scale = max((t.abs().max().item() for t in true if t is not None), default=0.0)  # the gradient's own scale
    bad = []
    for n, t in zip(names, true, strict=True):
        which, mods = plan.owned[n]
        ids = {id(m) for m in mods}
        est = torch.zeros(fm.sizes[n], dtype=f.dtype, device=f.device)
        for c_, g in zip(rec.calls, grads, strict=True):
            if id(c_.module) in ids:
                est = est + torch.einsum("b,kbp->p", c, rule_for(c_.module).rows(c_, g, which))
        ref = torch.zeros_like(est) if t is None else t.reshape(-1)
        if not close_enough(est, ref, scale):
            bad.append(n)
    demote(plan, dict.fromkeys(bad, "used outside the layer that owns it, or its layer's input does not keep the "
                                    "batch on axis 0"), stacklevel=5)
    return _signature_of(fm, plan, rec)


def _signature_of(fm: FunctionalModel, plan: Plan, rec: Capture) -> Signature:
    """The verified call counts, fast-path parameters and per-sample sizes of one forward."""
    ids = {id(m) for _, mods in plan.owned.values() for m in mods}
    calls = [c for c in rec.calls if id(c.module) in ids]
    fast = frozenset(
        n for n, (_, mods) in plan.owned.items()
        if rule_for(mods[0]).fast([c for c in calls if any(c.module is m for m in mods)])
    )
    patch = max((rule_for(c.module).patch_numel(c) for c in calls), default=0)
    column = max((rule_for(c.module).column_numel(c) for c in calls), default=0)
    return Signature(Counter(id(c.module) for c in calls), fast, rec.act, patch, column)
