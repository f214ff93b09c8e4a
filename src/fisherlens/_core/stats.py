"""The per-batch statistics of the factor rows ``G_bk`` that every view reduces."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: the statistics a caller may ask for
WANTS = frozenset({"diag", "diagk", "sqnorm", "gram", "rows"})


class Stats:
    """Per-batch statistics of the factor rows, only those requested.

    * ``diag``:   ``dict[name, Σ_{b,k} G_bk² (shape of the parameter)]``
    * ``diagk``:  ``dict[name, (K, *shape)]``, the same per sandwich column ``Σ_b G_bk²``
    * ``sqnorm``: ``dict[name, (B, K)]`` per-sample, per-column ``‖G_bk‖²`` over that parameter
    * ``gram``:   ``(B, K, K)`` per-sample ``G_b G_bᵀ`` summed over the selected parameters
    * ``rows``:   ``dict[name, (B, K, numel)]``
    """

    def __init__(self):
        self.diag: dict[str, Tensor] = {}
        self.diagk: dict[str, Tensor] = {}
        self.sqnorm: dict[str, Tensor] = {}
        self.gram: Tensor | None = None
        self.rows: dict[str, Tensor] = {}

    def add_rows(self, n: str, r: Tensor, want: set[str], shape) -> None:
        """Record the statistics of materialised rows ``r (B, K, numel)`` of parameter ``n``."""
        if "diag" in want:
            self.diag[n] = (r**2).sum((0, 1)).reshape(shape)
        if "diagk" in want:
            self.diagk[n] = (r**2).sum(0).reshape(r.shape[1], *shape)
        if "sqnorm" in want:
            self.sqnorm[n] = (r**2).sum(-1)
        if "gram" in want:
            self.add_gram(torch.einsum("bkp,blp->bkl", r, r))
        if "rows" in want:
            self.rows[n] = r

    def add(self, n: str, fast: dict[str, Tensor]) -> None:
        """Record statistics a layer rule computed without rows (:meth:`LayerRule.fast_stats`)."""
        for k, v in fast.items():
            if k == "gram":
                self.add_gram(v)
            else:
                getattr(self, k)[n] = v

    def add_gram(self, gm: Tensor):
        """Add one parameter's per-sample Gram ``(B, K, K)``."""
        self.gram = gm if self.gram is None else self.gram + gm
