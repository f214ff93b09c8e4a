"""Layer rules: how one call of a layer becomes per-sample factor rows.

A rule turns a recorded call — the layer's input ``a (B, ...)`` and the output gradients ``g (K, B, ...)``
for the K sandwich columns — into per-sample rows of its ``weight``/``bias``, and may offer a fast path
that reduces diag / sqnorm / Gram without materialising rows.

Rules ship for ``nn.Linear`` (any number of middle axes: sequences), ``nn.Conv1d``/``nn.Conv2d``,
``nn.Embedding``, ``nn.LayerNorm``, ``nn.BatchNorm*`` in eval mode and, by class name (no import), Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers).

**To support a new layer type, subclass :class:`LayerRule`, implement** :meth:`LayerRule.rows` **(and
optionally** :meth:`LayerRule.fast` / :meth:`LayerRule.fast_stats` / :meth:`LayerRule.applies` **), and add
one line to** :data:`RULES` **(or** :data:`RULES_BY_NAME` **for a class fisherlens should not import).**  The
engine asks for a layer's weight and bias at once (:meth:`LayerRule.fast_layer`, by default one
:meth:`LayerRule.fast_stats` each; override it to share work between them).  The
engine proves every rule's attribution at run time (see :mod:`fisherlens._core.layerwise.plan`), so a wrong
rule falls back to the general engine instead of returning a wrong number.

Index letters in every einsum: ``k`` sandwich column, ``b`` sample, ``t`` position (extra input axes of a
Linear), ``o`` output feature/channel, ``i`` input feature/channel (times kernel taps for a conv), ``g`` conv
group, ``l`` output location (conv) or second sandwich column (Gram), ``u`` second position (ghost norms) or
distinct (sample, id) pair (embedding), ``d`` embedding feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..stats import row_stats, square_sum

Tensor = torch.Tensor

__all__ = [
    "Call",
    "LayerRule",
    "LinearRule",
    "ConvRule",
    "EmbeddingRule",
    "LayerNormRule",
    "Conv1DRule",
    "RULES",
    "RULES_BY_NAME",
    "rule_for",
]


@dataclass
class Call:
    """One recorded call of a layer: the module, its input ``a (B, ...)`` and the tensor whose gradient is
    the output gradient (a zero *tap* added to the output by the engine, or the output itself).  ``memo``: where
    a rule may keep what depends on the input alone (a convolution's patches) while the engine takes the same
    call's statistics several times (groups of sandwich columns); ``None``: keep nothing."""

    module: nn.Module
    a: Tensor
    tap: Tensor
    memo: dict | None = field(default=None, repr=False, compare=False)


class LayerRule:
    """Per-sample rows of one layer type's ``weight`` and ``bias`` from its calls.

    Subclasses implement :meth:`rows`; :meth:`fast`/:meth:`fast_stats` are an optional shortcut,
    :meth:`applies` refuses configurations the rule cannot attribute, :meth:`patch_numel` feeds the working
    budget and :meth:`batch_axes` tells which input axes could be confused with the batch axis.
    """

    def applies(self, module: nn.Module) -> bool:
        """Whether the rule holds for this module's configuration (if not, the general engine takes it)."""
        return True

    def rows(self, call: Call, g: Tensor, which: str) -> Tensor:
        """Rows ``(K, B, numel)`` of parameter ``which`` ∈ {"weight", "bias"} from one call, ``g (K, B, ...)``."""
        raise NotImplementedError

    def fast(self, calls: list[Call]) -> bool:
        """Whether :meth:`fast_stats` applies to a parameter used by exactly these calls."""
        return False

    def fast_stats(self, call: Call, g: Tensor, which: str, want: set[str]) -> dict[str, Tensor]:
        """``{stat: value}`` for ``want`` ⊆ {diag, diagk, sqnorm, gram} without rows (when :meth:`fast`)."""
        raise NotImplementedError

    def add_diag(self, call: Call, g: Tensor, which: str, into: Tensor) -> bool:
        """Add the diagonal ``Σ_{k,b} G_kb²`` of parameter ``which`` from one call into ``into`` (its shape) in
        place, when the rule can without a temporary of the parameter's size; return whether it did (default:
        no, and the engine adds :meth:`fast_stats`' diag)."""
        return False

    def fast_layer(self, call: Call, g: Tensor, whiches: tuple[str, ...], want: set[str],
                   into: dict[str, Tensor] | None = None) -> dict[str, dict[str, Tensor]]:
        """:meth:`fast_stats` of several parameters of one call (``whiches``, e.g. weight and bias), ``{which:
        {stat: value}}``; with ``into`` (``{which: buffer}``, ``want == {"diag"}``) each diagonal is added there
        by :meth:`add_diag` where the rule can (its entry then holds no diag).  The default is one call per
        parameter; a rule overrides it to share what the parameters have in common (the output gradients'
        squares and norms)."""
        out = {}
        for w in whiches:
            done = into is not None and self.add_diag(call, g, w, into[w])
            out[w] = {} if done else self.fast_stats(call, g, w, want)
        return out

    def patch_numel(self, call: Call) -> int:
        """Per-sample numbers of the temporaries :meth:`rows` builds beyond the rows themselves, shared by the
        sandwich columns."""
        return 0

    def column_numel(self, call: Call) -> int:
        """Per-sample numbers the fast path builds for each sandwich column."""
        return 0

    def batch_axes(self, call: Call) -> tuple[int, ...]:
        """Sizes of the input axes, other than axis 0, that are not fixed by the layer (could hold the batch)."""
        return tuple(call.a.shape[1:])


class LinearRule(LayerRule):
    """``nn.Linear`` on ``(B, *T, I)``: ``G_kb,oi = Σ_t g_kbto a_bti``, bias ``Σ_t g_kbto``."""

    def rows(self, call, g, which):
        K, B = g.shape[:2]
        gr = g.reshape(K, B, -1, g.shape[-1])
        if which == "bias":
            return gr.sum(2)
        ar = call.a.reshape(B, -1, call.a.shape[-1])
        return torch.einsum("kbto,bti->kboi", gr, ar).reshape(K, B, -1)

    def fast(self, calls):
        return len(calls) == 1 and calls[0].a.dim() >= 2

    def fast_stats(self, call, g, which, want):
        return self.fast_layer(call, g, (which,), want)[which]

    def fast_layer(self, call, g, whiches, want, into=None):
        """Flat ``(B, I)`` inputs: :meth:`flat_stats` (weight and bias share ``g``'s squares and norms), the
        diagonals added in place into ``into`` by :meth:`add_flat_diag`; sequences ``(B, *T, I)``:
        :meth:`seq_stats`, by ghost norms or by this layer's per-sample gradients, whichever is cheaper
        (:meth:`ghost_cheaper`)."""
        if call.a.dim() == 2 and into is not None:
            g2 = square_sum(g)  # (B, O), shared
            for w in whiches:
                self.add_flat_diag(call.a, g2, w, into[w])
            return {w: {} for w in whiches}
        if call.a.dim() == 2:
            return self.flat_stats(call.a, g, whiches, want)
        K, B = g.shape[:2]
        gs = g.reshape(K, B, -1, g.shape[-1])  # (K, B, T, O)
        a = call.a.reshape(B, -1, call.a.shape[-1])  # (B, T, I)
        return {w: row_stats(gs.sum(2), want, gs.shape[-1:]) if w == "bias" else
                self.seq_stats(a, gs, want, self.ghost_cheaper(a, gs, want), self.ghost_diag_cheaper(a, gs))
                for w in whiches}

    def add_diag(self, call, g, which, into):
        """Flat inputs ``a (B, I)``: :meth:`add_flat_diag` (no ``(K, B, O)`` temporary)."""
        if call.a.dim() != 2:
            return False
        self.add_flat_diag(call.a, square_sum(g), which, into)
        return True

    @staticmethod
    def add_flat_diag(a: Tensor, g2: Tensor, which: str, into: Tensor) -> None:
        """Add the diagonal from ``a (B, I)`` and ``g2 = Σ_k g_k² (B, O)`` in place: the weight's ``g2ᵀ a²`` as one
        matrix product, the bias's ``Σ_b g2``."""
        if which == "bias":
            into.add_(g2.sum(0))
        else:
            into.addmm_(g2.T, a.square())

    @staticmethod
    def flat_stats(a: Tensor, g: Tensor, whiches: tuple[str, ...], want: set[str]) -> dict[str, dict[str, Tensor]]:
        """``Σ g²a²`` (diag), ``‖g‖²‖a‖²`` (sqnorm, "ghost norms"), ``(g_k·g_l)‖a‖²`` (Gram) of the parameters
        ``whiches`` (the bias: without ``a``), ``{which: {stat: value}}``; ``a (B, I)``, ``g (K, B, O)``.  The
        parts of ``g`` are computed once for weight and bias."""
        weight = "weight" in whiches
        a2 = a.square() if weight and want & {"diag", "diagk"} else None  # (B, I)
        an = torch.linalg.vecdot(a, a) if weight and want & {"sqnorm", "gram"} else None  # ‖a_b‖² (B,), one pass
        out: dict[str, dict[str, Tensor]] = {w: {} for w in whiches}
        if "diag" in want:
            g2 = g.square().sum(0)  # (B, O)
            for w in whiches:
                out[w]["diag"] = g2.sum(0) if w == "bias" else g2.T @ a2
        if "diagk" in want:
            gk = g.square()
            for w in whiches:
                out[w]["diagk"] = gk.sum(1) if w == "bias" else torch.einsum("kbo,bi->koi", gk, a2)
        if "sqnorm" in want:
            s = torch.linalg.vecdot(g, g).T  # (B, K)
            for w in whiches:
                out[w]["sqnorm"] = s if w == "bias" else s * an[:, None]
        if "gram" in want:
            gg = torch.einsum("kbo,lbo->bkl", g, g)
            for w in whiches:
                out[w]["gram"] = gg if w == "bias" else gg * an[:, None, None]
        return out

    @staticmethod
    def ghost_cheaper(a: Tensor, g: Tensor, want: set[str]) -> bool:
        """Whether ghost norms beat materialising ``G (K, O, I)`` per sample, for ``a (B, T, I)``, ``g (K, B, T, O)``.

        Per sample, ghost costs ``T²I + KT²O + K'TO`` and materialising ``KTOI + K'OI`` (``K' = K²`` for the Gram,
        else ``K``); diag/diagk need ``G`` anyway.
        """
        if want & {"diag", "diagk"}:
            return False
        K, _, T, O = g.shape
        I, K2 = a.shape[-1], K * K if "gram" in want else K
        return T * T * I + K * T * T * O + K2 * T * O < K * T * O * I + K2 * O * I

    @staticmethod
    def ghost_diag_cheaper(a: Tensor, g: Tensor) -> bool:
        """Whether the diagonal by position pairs beats materialising ``G (K, O, I)`` per sample.

        Materialising writes and reads ``K·O·I`` numbers per sample (memory-bound: weighted ×60 against the
        ``K·T·O·I`` multiply-adds); position pairs cost ``T²·O·I`` in one matrix product plus ``T²(O + I)``
        numbers, and are used only when they hold no more than ``G`` (``T² ≤ K·O``), which the budget counts.
        """
        K, _, T, O = g.shape
        I = a.shape[-1]
        mat = K * T * O * I + 60 * K * O * I
        pairs = T * T * O * I + K * T * T * O + T * T * I + 20 * T * T * (O + I)
        return T * T <= K * O and pairs < mat

    @staticmethod
    def seq_stats(a: Tensor, g: Tensor, want: set[str], ghost: bool, ghost_diag: bool = False) -> dict[str, Tensor]:
        """Weight statistics for ``a (B, T, I)``, ``g (K, B, T, O)``.

        Materialised: ``G_kb = Σ_t g_kbt a_btᵀ`` of this layer (always for diagk), one column at a time
        (:meth:`by_column`; all ``(K, B, O, I)`` at once for the Gram).  Ghost (sqnorm, Gram):
        ``G_k·G_l = Σ_{t,u} (a_t·a_u)(g_kt·g_lu) = Σ_{t,o} g_kto h_lto`` with ``h_l = (a aᵀ) g_l`` — no ``(O, I)``
        tensor.  Ghost diagonal: ``Σ_kb G²_oi = Σ_b Σ_{t,u} (Σ_k g_kto g_kuo)(a_ti a_ui)``, one
        ``(O, B·T²) × (B·T², I)`` matrix product — no ``(O, I)`` tensor per sample and column.
        """
        dense = want - {"sqnorm", "gram"} if ghost else set(want)
        out = {}
        if ghost_diag and "diag" in dense:
            dense.discard("diag")
            B, T = a.shape[:2]
            gg = torch.einsum("kbto,kbuo->otbu", g, g).reshape(g.shape[-1], -1)  # (O, T·B·T)
            aa = torch.einsum("bti,bui->tbui", a, a).reshape(-1, a.shape[-1])  # (T·B·T, I)
            out["diag"] = gg @ aa
        if dense and "gram" not in dense:
            out.update(LinearRule.by_column(a, g, dense))
        elif dense:
            G = torch.einsum("kbto,bti->kboi", g, a)
            out.update(row_stats(G.flatten(2), dense, G.shape[2:]))
        if ghost:
            h = torch.einsum("btu,kbuo->kbto", a @ a.transpose(1, 2), g)
            if "sqnorm" in want:
                out["sqnorm"] = torch.einsum("kbto,kbto->bk", g, h)
            if "gram" in want:
                out["gram"] = torch.einsum("kbto,lbto->bkl", g, h)
        return out

    @staticmethod
    def by_column(a: Tensor, g: Tensor, want: set[str]) -> dict[str, Tensor]:
        """diag / diagk / sqnorm (:func:`row_stats`' layout) of ``G_kb = g_kbᵀ a_b`` for ``a (B, T, I)``,
        ``g (K, B, T, O)``, one column ``k`` at a time: one batched matrix product ``(B, O, T) × (B, T, I)`` on
        g's and a's own strides (a convolution's transposed gradients and patches are not copied), then its
        squares; the peak holds one column's ``(B, O, I)``, not K of them."""
        diag = None
        diagk, norms = [], []
        for k in range(g.shape[0]):
            s = torch.bmm(g[k].transpose(1, 2), a).square_()  # (B, O, I)
            if "sqnorm" in want:
                norms.append(s.sum((1, 2)))
            if want & {"diag", "diagk"}:
                sq = s.sum(0)  # (O, I)
                diag = sq if diag is None else diag + sq
                diagk.append(sq)
        out = {}
        if "diag" in want:
            out["diag"] = diag
        if "diagk" in want:
            out["diagk"] = torch.stack(diagk)
        if "sqnorm" in want:
            out["sqnorm"] = torch.stack(norms, 1)
        return out

    def patch_numel(self, call):
        """Sequence inputs: the fast path's ``T×T`` input Gram."""
        if call.a.dim() <= 2:
            return 0
        T = call.a[0].numel() // call.a.shape[-1]
        return T * T

    def column_numel(self, call):
        """Sequence inputs: one column's per-sample ``(O, I)`` gradient."""
        return 0 if call.a.dim() <= 2 else call.tap.shape[-1] * call.a.shape[-1]

    def batch_axes(self, call):
        return tuple(call.a.shape[1:-1])


class Conv1DRule(LinearRule):
    """Hugging Face ``Conv1D`` (``y = x W + b``, ``W (I, O)``): the Linear rule with the weight laid out
    ``(I, O)``, ``G_kb,io = Σ_t a_bti g_kbto``."""

    def rows(self, call, g, which):
        if which == "bias":
            return super().rows(call, g, which)
        K, B = g.shape[:2]
        gr, ar = g.reshape(K, B, -1, g.shape[-1]), call.a.reshape(B, -1, call.a.shape[-1])
        return torch.einsum("kbto,bti->kbio", gr, ar).reshape(K, B, -1)

    @staticmethod
    def add_flat_diag(a, g2, which, into):
        """The weight stored ``(I, O)``: ``a²ᵀ g2``."""
        if which == "bias":
            LinearRule.add_flat_diag(a, g2, which, into)
        else:
            into.addmm_(a.square().T, g2)

    def fast_layer(self, call, g, whiches, want, into=None):
        out = super().fast_layer(call, g, whiches, want, into)
        if "weight" in out:
            out["weight"] = {s: v.mT.contiguous() if s in ("diag", "diagk") else v for s, v in out["weight"].items()}
        return out


class ConvRule(LayerRule):
    """``nn.Conv1d``/``nn.Conv2d``: ``G_kb,goi = Σ_l g_kbgol p_bgil`` with the unfolded input patches ``p``
    (padding mode honoured), bias ``Σ_l g_kbol``."""

    def rows(self, call, g, which):
        m = call.module
        K, B = g.shape[:2]
        gr = g.reshape(K, B, g.shape[2], -1)  # (K, B, O, L)
        if which == "bias":
            return gr.sum(-1)
        patches = self.call_patches(call)  # (B, I·k, L)
        gg = gr.reshape(K, B, m.groups, -1, gr.shape[-1])
        pp = patches.reshape(B, m.groups, -1, patches.shape[-1])
        return torch.einsum("kbgol,bgil->kbgoi", gg, pp).reshape(K, B, -1)

    def call_patches(self, call: Call) -> Tensor:
        """:meth:`patches` of a call, kept in its :attr:`Call.memo` when the engine gives it one."""
        if call.memo is None:
            return self.patches(call.module, call.a)
        if "patches" not in call.memo:
            call.memo["patches"] = self.patches(call.module, call.a)
        return call.memo["patches"]

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

    def fast(self, calls):
        return len(calls) == 1 and calls[0].module.groups == 1

    def fast_stats(self, call, g, which, want):
        """The Linear rule on the patches: ``a (B, L, I·k)`` (``L`` output positions), ``g (K, B, L, O)``.  Ghost
        norms (sqnorm, Gram) through the ``L × L`` patch Gram when cheaper and ``L ≤ I·k`` (so that the Gram is no
        larger than the patches the budget counts), else this layer's per-sample ``(O, I·k)`` gradients."""
        K, B = g.shape[:2]
        gs = g.reshape(K, B, g.shape[2], -1).transpose(2, 3)  # (K, B, L, O)
        if which == "bias":
            return row_stats(gs.sum(2), want, gs.shape[-1:])
        a = self.call_patches(call).transpose(1, 2)  # (B, L, I·k)
        ghost = a.shape[1] <= a.shape[2] and LinearRule.ghost_cheaper(a, gs, want)
        out = LinearRule.seq_stats(a, gs, want, ghost, LinearRule.ghost_diag_cheaper(a, gs))
        shape = call.module.weight.shape
        if "diag" in out:
            out["diag"] = out["diag"].reshape(shape)
        if "diagk" in out:
            out["diagk"] = out["diagk"].reshape(K, *shape)
        return out

    def patch_numel(self, call):
        return call.a.shape[1] * math.prod(call.module.kernel_size) * math.prod(call.tap.shape[2:])

    def column_numel(self, call):
        """One column's per-sample ``(O, I·k)`` weight gradient."""
        return call.module.weight.numel()

    def batch_axes(self, call):
        return tuple(call.a.shape[2:])


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` ``(V, D)`` on ids ``(B, *T)``: ``G_kb,vd = Σ_t [id_bt = v] g_kbtd``, zero at
    ``padding_idx`` (as torch's gradient).  Refused with ``max_norm`` (the forward renormalises the weight),
    ``scale_grad_by_freq`` (a batch-dependent gradient) or ``sparse``."""

    def applies(self, module):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse

    @staticmethod
    def keyed(call: Call, g: Tensor) -> tuple[Tensor, Tensor]:
        """Keys ``b·V + id`` ``(B·T,)`` and gradients ``(K, B·T, D)``, zeroed at ``padding_idx``."""
        m, (K, B) = call.module, g.shape[:2]
        ids = call.a.reshape(B, -1)
        key = torch.arange(B, device=ids.device)[:, None] * m.num_embeddings + ids
        gf = g.reshape(K, B, -1, g.shape[-1])
        if m.padding_idx is not None:
            gf = gf * (ids != m.padding_idx)[..., None]
        return key.reshape(-1), gf.reshape(K, -1, g.shape[-1])

    def rows(self, call, g, which):
        K, B = g.shape[:2]
        key, gf = self.keyed(call, g)
        out = gf.new_zeros(K, B * call.module.num_embeddings, gf.shape[-1]).index_add_(1, key, gf)
        return out.reshape(K, B, -1)

    def fast(self, calls):
        return len(calls) == 1

    def fast_stats(self, call, g, which, want):
        """Segment sums ``S_ku = Σ_{t: (b, id_bt) = u} g_kbt`` over the distinct (sample, id) pairs ``u``
        ``(K, U, D)``; then diag ``Σ_k S²`` and diagk ``S²`` index-added by id, sqnorm ``‖S_ku‖²`` and Gram
        ``S_ku·S_lu`` by sample — no ``(B, V, D)`` tensor."""
        K, B = g.shape[:2]
        V, D = call.module.weight.shape
        key, gf = self.keyed(call, g)
        u, inv = torch.unique(key, return_inverse=True)
        S = gf.new_zeros(K, len(u), D).index_add_(1, inv, gf)
        b, v = u // V, u % V
        out = {}
        if "diag" in want:
            out["diag"] = S.new_zeros(V, D).index_add_(0, v, S.square().sum(0))
        if "diagk" in want:
            out["diagk"] = S.new_zeros(K, V, D).index_add_(1, v, S.square())
        if "sqnorm" in want:
            out["sqnorm"] = S.new_zeros(B, K).index_add_(0, b, S.square().sum(-1).T)
        if "gram" in want:
            out["gram"] = S.new_zeros(B, K, K).index_add_(0, b, torch.einsum("kud,lud->ukl", S, S))
        return out

    def column_numel(self, call):
        """One column's segment sums (at most one ``D``-vector per position)."""
        return call.a[0].numel() * call.module.embedding_dim

    def batch_axes(self, call):
        return tuple(call.a.shape[1:])


class CompactRowsRule(LayerRule):
    """A layer whose per-sample rows are as small as its parameter (a normalisation's affine map): the fast path
    is :func:`row_stats` of the rows themselves; the normalised input ``x̂`` is the temporary."""

    def param_shape(self, call: Call) -> tuple:
        """The shape of the layer's weight and bias."""
        raise NotImplementedError

    def fast(self, calls):
        return len(calls) == 1

    def fast_stats(self, call, g, which, want):
        return row_stats(self.rows(call, g, which), want, self.param_shape(call))

    def patch_numel(self, call):
        """The normalised input ``x̂``."""
        return call.a[0].numel()


class LayerNormRule(CompactRowsRule):
    """``nn.LayerNorm`` over the last ``n`` axes (``normalized_shape``), input ``(B, *T, *N)``: weight
    ``Σ_t g_kbt ⊙ x̂_bt`` with ``x̂ = (a − mean)/√(var + eps)`` (biased variance over ``N``), bias
    ``Σ_t g_kbt``.  Needs ``elementwise_affine``."""

    def applies(self, module):
        return module.elementwise_affine

    def rows(self, call, g, which):
        m, (K, B) = call.module, g.shape[:2]
        if which == "weight":
            dims = tuple(range(-len(m.normalized_shape), 0))
            var, mean = torch.var_mean(call.a, dims, correction=0, keepdim=True)
            g = g * ((call.a - mean) * torch.rsqrt(var + m.eps))
        return g.reshape(K, B, -1, math.prod(m.normalized_shape)).sum(2)

    def param_shape(self, call):
        return tuple(call.module.normalized_shape)

    def batch_axes(self, call):
        return tuple(call.a.shape[1 : call.a.dim() - len(call.module.normalized_shape)])


class BatchNormRule(CompactRowsRule):
    """``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics, input ``(B, C, *L)``: a fixed per-channel
    affine map, weight ``Σ_l g_kbcl x̂_bcl`` with ``x̂ = (a − running_mean)/√(running_var + eps)``, bias
    ``Σ_l g_kbcl``.  In training mode (or without running statistics) BatchNorm mixes the samples of a batch and
    is not owned (the core refuses a BatchNorm in training mode anyway)."""

    def applies(self, module):
        return module.affine and module.track_running_stats and module.running_mean is not None

    def rows(self, call, g, which):
        m, (K, B) = call.module, g.shape[:2]
        if m.training:
            raise ValueError(f"{type(m).__name__} in training mode mixes the samples of a batch; call model.eval().")
        if which == "weight":
            shape = (1, -1, *[1] * (call.a.dim() - 2))
            mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
            g = g * ((call.a - mean) * torch.rsqrt(var + m.eps))
        return g.reshape(K, B, g.shape[2], -1).sum(-1)

    def param_shape(self, call):
        return (call.module.num_features,)

    def batch_axes(self, call):
        return tuple(call.a.shape[2:])


#: layer type -> rule; subclasses of a listed type use its rule.
RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.modules.batchnorm._BatchNorm: BatchNormRule(),
}

#: ``"module.QualName"`` of a layer type -> rule, for types fisherlens does not import; subclasses too.
RULES_BY_NAME: dict[str, LayerRule] = {
    "transformers.pytorch_utils.Conv1D": Conv1DRule(),
}


def ruled_layers() -> str:
    """The layer types with a rule, for messages: ``"nn.Linear, nn.Conv1d, ..., transformers' Conv1D"``."""
    names = [f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__ for t in RULES]
    names = [n.replace("nn._BatchNorm", "nn.BatchNorm* (eval mode)") for n in names]
    return ", ".join(names + [f"{q.split('.')[0]}' {q.rsplit('.', 1)[1]}" for q in RULES_BY_NAME])


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module`` (by type or qualified name, then by its base classes), or ``None`` — also when
    the rule found does not apply to the module's configuration (:meth:`LayerRule.applies`)."""
    for t in type(module).__mro__:
        rule = RULES.get(t)
        if rule is None:
            rule = RULES_BY_NAME.get(f"{t.__module__}.{t.__qualname__}")
        if rule is not None:
            return rule if rule.applies(module) else None
    return None
