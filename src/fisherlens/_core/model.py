"""The functional model and its checked forward, ``vjp`` and ``jvp``.

:class:`FunctionalModel` sees a module as a function ``f(p, x) -> (B, C)`` of a selection of its parameters;
:func:`forward_checked`, :func:`vjp_checked` and :func:`jvp_checked` wrap it with clear errors for inputs the
model cannot take and for bad outputs, with attention on its differentiable kernels
(:func:`differentiable_kernels`).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .checks import autocast_dtype, check_inputs, check_outputs, close_enough
from .distributed import unwrap_model
from .fields import Fields, describe

Tensor = torch.Tensor


#: library forwards in progress that run the model as itself (:meth:`FunctionalModel.live`)
_LIVE = [0]


def library_forward() -> bool:
    """Whether a library call is running the model as itself right now (:meth:`FunctionalModel.live`): hooks that
    watch the caller's training forward (the Monitor's) ignore it, as they ignore ``functional_call`` forwards."""
    return _LIVE[0] > 0


def _arguments(x) -> tuple[tuple, dict | None]:
    """``(args, kwargs)`` of a model call on inputs ``x``: keyword inputs for a :class:`Fields` or a dict."""
    if isinstance(x, (Fields, dict)):
        return (), (x.tree() if isinstance(x, Fields) else x)
    return (x,), None


def _module_prefix_match(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


def check_eval_mode(modules) -> None:
    """Refuse BatchNorm (mixes the samples of a batch) and Dropout (random) in training mode among ``modules``
    (``(name, module)`` pairs, e.g. ``model.named_modules()``)."""
    for name, m in modules:
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


def select_params(named: dict[str, Tensor], params) -> list[str]:
    """Names of the selected parameters in ``named_parameters()`` order: ``params`` gives names, module-name
    prefixes or the tensors themselves; ``None`` selects all with ``requires_grad``."""
    if not named:
        raise ValueError("The model has no parameters.")
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise ValueError("No parameter of the model requires grad; pass params= to choose some.")
        return chosen
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
                raise ValueError(f"params= names {it!r}, which is neither a parameter nor a module of the model. "
                                 f"Parameters: {', '.join(named)}.")
            wanted.update(hits)
        else:
            raise TypeError(f"params= entries must be names or parameter tensors, got {type(it).__name__}.")
    return [n for n in named if n in wanted]


def _shared_tensors(modules: list[tuple[str, nn.Module]]) -> list[tuple[dict, str, Tensor]]:
    """``(store, key, tensor)`` of the parameters and buffers of modules that occur twice in the module tree
    (``modules``: ``named_modules(remove_duplicate=False)``; e.g. ``nn.Sequential(lin, act, lin)``):
    ``torch.func.functional_call`` does not restore them (they come back as plain tensors and drop out of
    ``named_parameters()``), so :class:`FunctionalModel` puts them back after every call."""
    count: dict[int, int] = {}
    for _, m in modules:
        count[id(m)] = count.get(id(m), 0) + 1
    shared = {id(m): m for _, m in modules if count[id(m)] > 1}
    return [(store, k, t) for m in shared.values()
            for store in (m._parameters, m._buffers) for k, t in store.items() if t is not None]


class FunctionalModel:
    """A module seen as a function ``f(p, x) -> (B, M)`` of the selected parameters ``p`` (a dict).

    ``params`` selects a subset by parameter name, module-name prefix or tensor identity;
    default: all parameters with ``requires_grad``.  Flat vectors follow ``named_parameters()`` order.
    ``output`` picks the output tensor from what the model returns (a tuple, dict or ``ModelOutput``), e.g.
    ``output=lambda out: out.logits``.  A ``DistributedDataParallel`` (or ``DataParallel``) wrapper is replaced by
    the module it wraps (parameter names without its ``module.`` prefix).
    The output ``(B, *S)`` is flattened to ``(B, M)`` in its own memory
    order; :attr:`out_shape` is the per-input shape ``S`` of the last forward.  Keyword inputs (a
    :class:`~.fields.Fields` batch) are passed to the model as keyword arguments.
    """

    def __init__(self, model: nn.Module, params=None, output=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if output is not None and not callable(output):
            raise TypeError(f"output= must be a callable picking the output tensor (e.g. lambda out: out.logits), "
                            f"got {type(output).__name__}.")
        self.output = output
        #: per-input output shape ``S`` of the last forward (``(C,)`` for ``(B, C)`` outputs)
        self.out_shape: tuple[int, ...] = ()
        model = unwrap_model(model)  # a DistributedDataParallel wrapper: the module it wraps
        modules = list(model.named_modules(remove_duplicate=False))  # one walk for both checks
        check_eval_mode(modules)
        self.model = model
        named = dict(model.named_parameters())
        chosen = select_params(named, params)
        self.names: list[str] = chosen
        self.tensors: dict[str, Tensor] = {n: named[n] for n in chosen}
        #: whether a plain call of the model differentiates the selection (:meth:`live`): every selected tensor is
        #: a leaf that requires grad and carries no gradient hook (a hook could change the gradients we read)
        self.direct = all(t.requires_grad and t.is_leaf and not getattr(t, "_backward_hooks", None)
                          for t in self.tensors.values())
        self.params: dict[str, Tensor] = {n: p.detach() for n, p in self.tensors.items()}
        #: the other parameters, detached, so that no result stays attached to the model's autograd graph
        self.frozen: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if n not in self.tensors}
        self.shapes = {n: p.shape for n, p in self.params.items()}
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.P = sum(self.sizes.values())
        starts = [0, *itertools.accumulate(self.sizes.values())]
        #: ``{name: (start, numel)}``: each parameter's span in a flat ``(..., P)`` vector
        self.spans = {n: (i, self.sizes[n]) for n, i in zip(self.names, starts, strict=False)}
        first = next(iter(self.params.values()))
        self.dtype, self.device, self.itemsize = first.dtype, first.device, first.element_size()
        self._restore = _shared_tensors(modules)
        #: the layerwise plan of this model and selection, set by :func:`fisherlens._core.plan_for`
        self.plan = None

    def check_finite(self, X=None) -> None:
        """Raise ``ValueError`` naming the first selected parameter that holds NaN or inf, then (when given) the
        inputs ``X`` if they do (:func:`~.checks.check_inputs`).  Called when outputs or results are not finite, to
        name the cause; a finite model needs no sweep over its P parameters."""
        for n, p in self.params.items():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"Parameter '{n}' contains NaN or inf; the Fisher is undefined there.")
        if X is not None:
            check_inputs(X)

    def __call__(self, p: dict[str, Tensor], x) -> Tensor:
        """Flat outputs ``(B, M)`` of the parameters ``p`` for inputs ``x (B, ...)`` (a tensor, or keyword inputs
        as a :class:`Fields` or a dict); a 1-D output is taken as ``S = (1,)``."""
        args, kwargs = _arguments(x)
        try:
            out = functional_call(self.model, {**self.frozen, **p}, args, kwargs)
        finally:
            for store, k, t in self._restore:
                store[k] = t
        return self._flat(out)

    def live(self, x) -> Tensor:
        """Flat outputs ``(B, M)`` of the model's own parameters by a plain call (no reparametrisation), attached
        to their autograd graph: differentiating them by the selected tensors is :meth:`__call__`'s derivative
        when :attr:`direct`.  Flagged as a library forward (:func:`library_forward`) while it runs."""
        args, kwargs = _arguments(x)
        _LIVE[0] += 1
        try:
            return self._flat(self.model(*args, **(kwargs or {})))
        finally:
            _LIVE[0] -= 1

    def _flat(self, out) -> Tensor:
        """The output tensor picked from what the model returned, checked and flattened to ``(B, M)``."""
        if self.output is not None:
            out = self.output(out)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__}, not a tensor of outputs; pass output=, a callable that "
                "picks the output tensor from it (e.g. output=lambda out: out.logits, or lambda out: out[0])."
            )
        if out.dim() == 0:
            raise ValueError("The model returned a scalar; it must return one output (or more) per input (B, ...).")
        self.out_shape = tuple(out.shape[1:]) or (1,)
        if out.dtype != self.dtype and out.is_floating_point() and autocast_dtype() == out.dtype:
            out = out.to(self.dtype)  # torch.autocast: the likelihood's algebra in the parameters' dtype
        return out.reshape(out.shape[0], -1)

    def structured(self, f: Tensor) -> Tensor:
        """Flat outputs ``(B, M)`` back in the model's per-input shape, ``(B, *S)``."""
        return f.reshape(f.shape[0], *self.out_shape)

    def flatten(self, d: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors (with ``lead`` leading batch dims) into ``(..., P)``."""
        return torch.cat([d[n].reshape(*d[n].shape[:lead], -1) for n in self.names], dim=-1)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        if v.shape[-1] != self.P:
            raise ValueError(f"Expected a vector of length P={self.P}, got {tuple(v.shape)}.")
        return {n: v[..., i : i + k].reshape(v.shape[:-1] + self.shapes[n]) for n, (i, k) in self.spans.items()}


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
def model_errors(X: Tensor, kernels: bool = True):
    """Turn the model's failures on a batch into a ValueError that names the input shape (or the real cause);
    with ``kernels``, attention runs on its differentiable kernels (:func:`differentiable_kernels`; reverse mode
    alone does not need them)."""
    try:
        with differentiable_kernels() if kernels else nullcontext():
            yield
    except TypeError as e:
        if isinstance(X, Fields) and "argument" in str(e):
            raise TypeError(f"The model does not take the keyword inputs of this dict batch ({describe(X)}): {e}. "
                            "A dict batch's keys (other than 'labels' and 'mask') are passed as keyword "
                            "arguments to the model's forward.") from e
        raise
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


def forward_checked(fm: FunctionalModel, p, X: Tensor) -> Tensor:
    """``fm(p, X)`` with a clear error for inputs the model cannot take and for non-finite outputs (naming a
    non-finite parameter or input as the cause)."""
    with model_errors(X):
        f = fm(p, X)
    check_outputs(f, X, fm.dtype, fm.check_finite)
    return f


def vjp_checked(fm: FunctionalModel, X: Tensor):
    """``(f (B, M), pull)``: one forward kept for pull-backs ``u (B, M) -> ({name: Jᵀu},)`` (torch.func.vjp)."""
    with model_errors(X):
        f, pull = vjp(lambda q: fm(q, X), fm.params)
    check_outputs(f, X, fm.dtype, fm.check_finite)
    return f, pull


def pullback_checked(fm: FunctionalModel, X):
    """``(f (B, M), pull)`` like :func:`vjp_checked`, by plain autograd (cheaper per call than ``torch.func.vjp``):
    ``pull(u)`` for ``u (B, M)`` gives ``{name: Jᵀu}``, and for ``u (s, B, M)`` ``{name: (s, *shape)}`` in one
    batched backward (``is_grads_batched``).  One pull-back per forward: the graph is freed by it.  Attention
    keeps its fused kernels (reverse mode needs no other); a batched pull-back needs the math kernels, so run
    this inside :func:`differentiable_kernels` for one.

    When :attr:`FunctionalModel.direct`, the model runs as itself and the gradients are taken with respect to its
    own parameters (``torch.autograd.grad`` leaves their ``.grad`` alone); otherwise through detached copies."""
    with torch.enable_grad(), model_errors(X, kernels=False):
        if fm.direct:
            leaves, f = list(fm.tensors.values()), fm.live(X)
        else:
            leaves = [t.detach().requires_grad_(True) for t in fm.params.values()]
            f = fm(dict(zip(fm.names, leaves, strict=True)), X)
    check_outputs(f, X, fm.dtype, fm.check_finite)

    def pull(u: Tensor) -> dict[str, Tensor]:
        batched = u.dim() == f.dim() + 1
        with model_errors(X, kernels=False):
            gs = torch.autograd.grad(f, leaves, u, is_grads_batched=batched, allow_unused=True)
        lead = u.shape[:1] if batched else ()
        return {n: torch.zeros(*lead, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
                for (n, t), g in zip(fm.params.items(), gs, strict=True)}

    return f.detach(), pull


#: the kept backward-of-backward is used when its matrix-multiply and convolution FLOPs are at most this multiple of
#: the fresh ``jvp``'s (it runs no forward and fewer elementwise kernels, so it wins at equal FLOPs)
DOUBLE_BACKWARD_EDGE = 1.2


def pullback_jvp(fm: FunctionalModel, f: Tensor, pull, X, double: bool = True,
                 memo: dict | None = None) -> tuple[object, str]:
    """``(t -> J t, route)`` for a kept pull-back ``pull`` (:func:`vjp_checked`) of outputs ``f``: the cheaper of two
    exact routes, measured on one random tangent (``double=False``: the fresh ``jvp`` without trying the other,
    e.g. when the memory of a second graph is not there).

    * ``"double backward"``: ``u ↦ Jᵀu`` is linear, so its own pull-back at any ``u`` maps a tangent ``t`` to ``J t``
      (a backward through the backward graph), without running the model again;
    * ``"fresh jvp"``: ``torch.func.jvp`` (:func:`jvp_checked`), one forward-mode pass of the model.

    The double backward is proven here against the fresh ``jvp`` on the same tangent: a backward that is not itself
    differentiable (``once_differentiable``) would give a wrong ``J t`` silently, and two different linear maps agree
    on a random vector with probability 0.  It is kept only when proven and when its FLOPs (counted by
    ``torch.utils.flop_counter`` on that tangent: deterministic, so every run takes the same route and rounds the
    same way) are at most :data:`DOUBLE_BACKWARD_EDGE` times the fresh ``jvp``'s: through the convolutions of a
    ResNet the backward of a backward costs 1.4× the FLOPs (and 1.3–1.7× the time) of a forward-mode pass, on MLPs,
    small CNNs and attention it is the cheaper one.  Otherwise (also when an op has no double backward) the fresh
    ``jvp``, which is the reference, is used.

    ``memo``: where the two counts are kept for this model, selection and batch shape, which alone fix them
    (:func:`fisherlens._core.route_memo`); counting runs every op through a dispatch mode, a few milliseconds on
    a small model.  The proof still runs on every call.

    Raises:
        ValueError: the model has no forward-mode derivative either (:func:`jvp_checked`).
    """
    gen = torch.Generator(device="cpu").manual_seed(2)
    t = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for n, p in fm.params.items()}
    pp, memo = None, {} if memo is None else memo
    count = "flops" not in memo
    try:
        if double:
            with model_errors(X):
                _, pp = vjp(lambda u: pull(u)[0], torch.zeros_like(f))
                got, flops_double = _counted(lambda: pp(t)[0], count)
    except (ValueError, RuntimeError, NotImplementedError):  # an op without double backward
        pp = None
    ref, flops_fresh = _counted(lambda: jvp_checked(fm, X, t)[1], count and pp is not None)
    if pp is not None and count:
        memo["flops"] = (flops_double, flops_fresh)
    if pp is not None and close_enough(got, ref) and memo["flops"][0] <= DOUBLE_BACKWARD_EDGE * memo["flops"][1]:
        return (lambda tangent: pp(tangent)[0]), "double backward"
    return (lambda tangent: jvp_checked(fm, X, tangent)[1]), "fresh jvp"


def _counted(fn, count: bool = True) -> tuple[object, int | None]:
    """``(fn(), FLOPs)``: the matrix-multiply and convolution FLOPs of one call (``torch.utils.flop_counter``);
    ``(fn(), None)`` without counting."""
    if not count:
        return fn(), None
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def jvp_checked(fm: FunctionalModel, X: Tensor, tangent: dict[str, Tensor], at: dict[str, Tensor] | None = None):
    """``(f (B, M), J t (B, M))`` for a tangent ``{name: tensor}`` (torch.func.jvp; vmap it over tangents), at the
    model's parameters or at ``at`` (same names).  Attention runs on its differentiable kernels."""
    with model_errors(X):
        f, jt = jvp(lambda q: fm(q, X), (fm.params if at is None else at,), (tangent,))
    check_outputs(f, X, fm.dtype, fm.check_finite)
    return f, jt
