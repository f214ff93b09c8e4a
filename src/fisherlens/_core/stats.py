"""The per-batch statistics of the factor rows ``G_bk`` that every view reduces."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import FunctionalModel

Tensor = torch.Tensor

#: the statistics a caller may ask for
WANTS = frozenset({"diag", "diagk", "sqnorm", "gram", "rows"})


def square_sum(g: Tensor) -> Tensor:
    """``Σ_k g_k²`` over axis 0 of ``g (K, ...)`` without a ``(K, ...)`` temporary: one fused multiply-add per
    column (as fast as ``g.square().sum(0)``), or for many columns squares of slices of ``K/16`` of them."""
    K = g.shape[0]
    if K > 16:
        step = -(-K // 16)
        out = g[:step].square().sum(0)
        for j in range(step, K, step):
            out += g[j : j + step].square().sum(0)
        return out
    out = g[0].square()
    for k in range(1, K):
        out.addcmul_(g[k], g[k])
    return out


class DiagSum:
    """The diagonal summed in place into one flat ``(P,)`` buffer of a model's selection (views per
    parameter, in flat-vector order), allocated at the first addition: a batch's statistics are added layer by
    layer as they are computed, so the pass never holds a second P-vector, nor the buffer during its first
    backward."""

    def __init__(self, fm: FunctionalModel):
        self.fm = fm
        self._flat: Tensor | None = None
        self._views: dict[str, Tensor] = {}

    def flat(self) -> Tensor:
        """The ``(P,)`` sum so far (zeros before the first addition)."""
        if self._flat is None:
            fm = self.fm
            self._flat = torch.zeros(fm.P, dtype=fm.dtype, device=fm.device)
            self._views = fm.unflatten(self._flat)
        return self._flat

    def view(self, n: str) -> Tensor:
        """Parameter ``n``'s part of the sum (its shape), to add into in place."""
        self.flat()
        return self._views[n]


def row_stats(r: Tensor, want: set[str], shape) -> dict[str, Tensor]:
    """The statistics ``want`` ⊆ {diag, diagk, sqnorm, gram} of rows ``r (K, B, numel)`` of a parameter of
    ``shape``: ``Σ_{k,b} r²`` (shape), ``Σ_b r²`` ``(K, *shape)``, ``‖r_kb‖²`` ``(B, K)``, ``r_b r_bᵀ``
    ``(B, K, K)``."""
    out = {}
    if "diag" in want:
        out["diag"] = r.square().sum((0, 1)).reshape(shape)
    if "diagk" in want:
        out["diagk"] = r.square().sum(1).reshape(r.shape[0], *shape)
    if "sqnorm" in want:
        out["sqnorm"] = r.square().sum(-1).T
    if "gram" in want:
        out["gram"] = torch.einsum("kbp,lbp->bkl", r, r)
    return out


class Stats:
    """Per-batch statistics of the factor rows, only those requested.

    * ``diag``:   ``dict[name, Σ_{b,k} G_bk² (shape of the parameter)]``
    * ``diagk``:  ``dict[name, (K, *shape)]``, the same per sandwich column ``Σ_b G_bk²``
    * ``sqnorm``: ``dict[name, (B, K)]`` per-sample, per-column ``‖G_bk‖²`` over that parameter
    * ``gram``:   ``(B, K, K)`` per-sample ``G_b G_bᵀ`` summed over the selected parameters
    * ``rows``:   ``dict[name, (B, K, numel)]``
    """

    def __init__(self, into: DiagSum | None = None):
        #: where ``diag`` is added instead (then :attr:`diag` stays empty)
        self.into = into
        self.diag: dict[str, Tensor] = {}
        self.diagk: dict[str, Tensor] = {}
        self.sqnorm: dict[str, Tensor] = {}
        self.gram: Tensor | None = None
        self.rows: dict[str, Tensor] = {}

    def add_rows(self, n: str, r: Tensor, want: set[str], shape) -> None:
        """Record the statistics of materialised rows ``r (B, K, numel)`` of parameter ``n``."""
        self.add(n, row_stats(r.transpose(0, 1), want - {"rows"}, shape))
        if "rows" in want:
            self.rows[n] = r

    def add(self, n: str, fast: dict[str, Tensor]) -> None:
        """Record statistics a layer rule computed without rows (:meth:`LayerRule.fast_stats`)."""
        for k, v in fast.items():
            if k == "gram":
                self.add_gram(v)
            elif k == "diag" and self.into is not None:
                self.into.view(n).add_(v)
            else:
                getattr(self, k)[n] = v

    def add_gram(self, gm: Tensor):
        """Add one parameter's per-sample Gram ``(B, K, K)``."""
        self.gram = gm if self.gram is None else self.gram + gm
