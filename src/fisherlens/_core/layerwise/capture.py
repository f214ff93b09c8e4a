"""Capture of layer calls and their output gradients — shared by the engine and the Monitor.

:class:`Capture` hooks the forward of the owned layers and records one :class:`~.rules.Call` per call;
with ``tap=True`` (the engine) it adds a zero *tap* to each output, whose gradient is the output gradient,
and with ``tap=False`` (the Monitor, inside the caller's own training forward) it records the output tensor
itself.  :func:`tap_grads` back-propagates the K sandwich columns to the recorded tensors in one batched
backward (``is_grads_batched``, i.e. ``vmap`` over cotangents).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .rules import Call

Tensor = torch.Tensor

__all__ = ["Capture", "WeakHook", "tap_grads"]


def _disabled_hook(*_):
    return None


def _make_disabled():
    return _disabled_hook


class WeakHook:
    """A hook that calls a bound method through a weak reference.

    A deep copy (or pickle) of the hooked model gets a disabled hook: the copy is not captured, and the
    owner of the method is neither copied nor kept alive by the model."""

    def __init__(self, method):
        self.ref = weakref.WeakMethod(method)

    def __call__(self, *args):
        fn = self.ref()
        return None if fn is None else fn(*args)

    def __deepcopy__(self, memo):
        return _disabled_hook

    def __reduce__(self):
        return (_make_disabled, ())


class Capture:
    """Forward hooks on ``modules`` recording their calls in :attr:`calls`.

    Args:
        modules: the layers to record.
        tap: add a zero tap to each output (its gradient is the output gradient) instead of recording the
            output itself.
        measure: a module whose every submodule's per-sample output size is summed into :attr:`act`.
        when: record only while ``when()`` is true (default: always).
        weak: hook through :class:`WeakHook` (for hooks that live on a user's model).
    """

    def __init__(self, modules: Iterable[nn.Module], *, tap: bool = True, measure: nn.Module | None = None,
                 when: Callable[[], bool] | None = None, weak: bool = False):
        self.calls: list[Call] = []
        self.act = 0
        self.tap, self.when = tap, when
        hook = WeakHook(self._hook) if weak else self._hook
        self.handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
        if measure is not None:
            self.handles += [m.register_forward_hook(self._measure) for m in measure.modules()]

    def _hook(self, m, inputs, out):
        if self.when is not None and not self.when():
            return None
        if not self.tap:
            self.calls.append(Call(m, inputs[0].detach(), out))
            return None
        tap = torch.zeros_like(out, requires_grad=True)
        self.calls.append(Call(m, inputs[0].detach(), tap))
        return out + tap

    def _measure(self, m, inputs, out):
        if isinstance(out, Tensor) and out.dim():
            self.act += out[0].numel()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def tap_grads(calls: list[Call], f: Tensor, V: Tensor, *, extra: Tensor | None = None,
              retain_graph: bool = False) -> list[Tensor]:
    """Output gradients of every call for each sandwich column: ``(K, B, ...)`` each (zeros where unused).

    ``V (B, C, K)`` are the cotangents of the outputs ``f (B, C)``; ``extra (B, C)`` adds one more column
    (``K + 1`` in the result).
    """
    cot = V.permute(2, 0, 1).contiguous()  # (K, B, C): batched matrix products fold K into B
    if extra is not None:
        cot = torch.cat([cot, extra[None]])
    taps = [c.tap for c in calls]
    if not taps or not f.requires_grad:
        gs = [None] * len(taps)
    elif cot.shape[0] == 1:
        gs = torch.autograd.grad(f, taps, cot[0], allow_unused=True, retain_graph=retain_graph)
        gs = [None if g is None else g[None] for g in gs]
    else:
        gs = torch.autograd.grad(f, taps, cot, allow_unused=True, is_grads_batched=True, retain_graph=retain_graph)
    return [torch.zeros(cot.shape[0], *t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(gs, taps, strict=True)]
