"""Layer rules: how one call of a layer becomes per-sample factor rows.

A rule turns a recorded call — the layer's input ``a (B, ...)`` and the output gradients ``g (K, B, ...)``
for the K sandwich columns — into per-sample rows of its ``weight``/``bias``, and may offer a fast path
that reduces diag / sqnorm / Gram without materialising rows.

**To support a new layer type, subclass :class:`LayerRule`, implement** :meth:`LayerRule.rows` **(and
optionally** :meth:`LayerRule.fast` / :meth:`LayerRule.fast_stats` **), and add one line to**
:data:`RULES`.  The engine proves every rule's attribution at run time (see
:mod:`fisherlens._core.layerwise.plan`), so a wrong rule falls back to the general engine instead of
returning a wrong number.

Index letters in every einsum: ``k`` sandwich column, ``b`` sample, ``t`` position (extra input axes of a
Linear), ``o`` output feature/channel, ``i`` input feature/channel (times kernel taps for a conv), ``g`` conv
group, ``l`` output location.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = ["Call", "LayerRule", "LinearRule", "ConvRule", "RULES", "rule_for"]


@dataclass
class Call:
    """One recorded call of a layer: the module, its input ``a (B, ...)`` and the tensor whose gradient is
    the output gradient (a zero *tap* added to the output by the engine, or the output itself)."""

    module: nn.Module
    a: Tensor
    tap: Tensor


class LayerRule:
    """Per-sample rows of one layer type's ``weight`` and ``bias`` from its calls.

    Subclasses implement :meth:`rows`; :meth:`fast`/:meth:`fast_stats` are an optional shortcut,
    :meth:`patch_numel` feeds the working budget and :meth:`batch_axes` tells which input axes could be
    confused with the batch axis.
    """

    def rows(self, call: Call, g: Tensor, which: str) -> Tensor:
        """Rows ``(K, B, numel)`` of parameter ``which`` ∈ {"weight", "bias"} from one call, ``g (K, B, ...)``."""
        raise NotImplementedError

    def fast(self, calls: list[Call]) -> bool:
        """Whether :meth:`fast_stats` applies to a parameter used by exactly these calls."""
        return False

    def fast_stats(self, call: Call, g: Tensor, which: str, want: set[str]) -> dict[str, Tensor]:
        """``{stat: value}`` for ``want`` ⊆ {diag, diagk, sqnorm, gram} without rows (when :meth:`fast`)."""
        raise NotImplementedError

    def patch_numel(self, call: Call) -> int:
        """Per-sample numbers of the temporaries :meth:`rows` builds beyond the rows themselves."""
        return 0

    def batch_axes(self, call: Call) -> tuple[int, ...]:
        """Sizes of the input axes, other than axis 0, that are not fixed by the layer (could hold the batch)."""
        return tuple(call.a.shape[1:])


class LinearRule(LayerRule):
    """``nn.Linear`` on ``(B, *, I)``: ``G_kb,oi = Σ_t g_kbto a_bti``, bias ``Σ_t g_kbto``."""

    def rows(self, call, g, which):
        K, B = g.shape[:2]
        gr = g.reshape(K, B, -1, g.shape[-1])
        if which == "bias":
            return gr.sum(2)
        ar = call.a.reshape(B, -1, call.a.shape[-1])
        return torch.einsum("kbto,bti->kboi", gr, ar).reshape(K, B, -1)

    def fast(self, calls):
        return len(calls) == 1 and calls[0].a.dim() == 2

    def fast_stats(self, call, g, which, want):
        """``Σ g²a²`` (diag), ``‖g‖²‖a‖²`` (sqnorm, "ghost norms"), ``(g_k·g_l)‖a‖²`` (Gram); ``g (K, B, O)``."""
        bias = which == "bias"
        a2 = None if bias else call.a.square()  # (B, I)
        out = {}
        if "diag" in want:
            g2 = g.square().sum(0)  # (B, O)
            out["diag"] = g2.sum(0) if bias else g2.T @ a2
        if "diagk" in want:
            out["diagk"] = g.square().sum(1) if bias else torch.einsum("kbo,bi->koi", g.square(), a2)
        if "sqnorm" in want:
            s = g.square().sum(-1).T  # (B, K)
            out["sqnorm"] = s if bias else s * a2.sum(-1)[:, None]
        if "gram" in want:
            gg = torch.einsum("kbo,lbo->bkl", g, g)
            out["gram"] = gg if bias else gg * a2.sum(-1)[:, None, None]
        return out

    def batch_axes(self, call):
        return tuple(call.a.shape[1:-1])


class ConvRule(LayerRule):
    """``nn.Conv1d``/``nn.Conv2d``: ``G_kb,goi = Σ_l g_kbgol p_bgil`` with the unfolded input patches ``p``
    (padding mode honoured), bias ``Σ_l g_kbol``."""

    def rows(self, call, g, which):
        m = call.module
        K, B = g.shape[:2]
        gr = g.reshape(K, B, g.shape[2], -1)  # (K, B, O, L)
        if which == "bias":
            return gr.sum(-1)
        patches = self.patches(m, call.a)  # (B, I·k, L)
        gg = gr.reshape(K, B, m.groups, -1, gr.shape[-1])
        pp = patches.reshape(B, m.groups, -1, patches.shape[-1])
        return torch.einsum("kbgol,bgil->kbgoi", gg, pp).reshape(K, B, -1)

    @staticmethod
    def patches(m: nn.Module, a: Tensor) -> Tensor:
        """Unfolded input patches ``(B, I·k…, L)`` of a call, matching its padding mode."""
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        if isinstance(m, nn.Conv1d):
            a = a[:, :, None, :]
            ks, dil, st = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            ks, dil, st = m.kernel_size, m.dilation, m.stride
        return F.unfold(a, ks, dilation=dil, padding=0, stride=st)

    def patch_numel(self, call):
        return call.a.shape[1] * math.prod(call.module.kernel_size) * math.prod(call.tap.shape[2:])

    def batch_axes(self, call):
        return tuple(call.a.shape[2:])


#: layer type -> rule; subclasses of a listed type use its rule.
RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
}


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module`` (by type, then by its base classes), or ``None``."""
    for t in type(module).__mro__:
        if t in RULES:
            return RULES[t]
    return None
