"""The factor rows of a data set, ``Ĵ (N·K, P)``: held or recomputed chunk by chunk, with float64 products.

Shared by the Gram routes of the spectrum and of the natural gradient: the data is read once (its chunks
kept), each chunk's sandwich is built once and reused whenever its rows are recomputed (``kind="mc"`` draws
its labels once), and the rows are held when all of them fit four working budgets.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import batch_stats, output_dim, work_budget
from .request import Request

Tensor = torch.Tensor

__all__ = ["FactorRows", "gram64"]


def gram64(A: Tensor, B: Tensor | None = None) -> Tensor:
    """``A Bᵀ`` in float64 for rows ``A (m, P)``, ``B (n, P)`` (default ``B = A``) of any float dtype.

    Float32 rows are cast to float64 one block of columns at a time (each block's copies within the working
    budget), so the length-P sums lose nothing to float32 rounding: the Gram's entries are exact up to the
    rows' own rounding (~1e-7 relative), not up to ~√P·1e-7.  Returns ``(m, n)`` float64."""
    B = A if B is None else B
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    width = max(1, work_budget() // (8 * (A.shape[0] + B.shape[0])))
    for a in range(0, A.shape[1], width):
        a64 = A[:, a : a + width].double()
        b64 = a64 if B is A else B[:, a : a + width].double()
        out.addmm_(a64, b64.T)
    return out


class FactorRows:
    """The factor rows ``Ĵ (N·K, P)`` of ``run``'s data (unscaled: ``F = s·ĴᵀĴ`` with ``s = run.scale(n)``).

    Attributes:
        chunks: ``[(X, memo)]`` per chunk; K: sandwich columns per input; n: inputs; offs: row offsets.
    """

    def __init__(self, run: Request):
        self.run, fm = run, run.fm
        self.chunks: list[tuple] = []
        K = step = None
        for X, Y in run.batches():
            if K is None:
                K = run.columns(output_dim(fm, X))
                step = max(1, work_budget() // (K * fm.P * fm.itemsize))
            for i in range(0, len(X), step):
                self.chunks.append((X[i : i + step], {"y": None if Y is None else Y[i : i + step]}))
        self.K, self.n = K, sum(len(X) for X, _ in self.chunks)
        self.offs = np.cumsum([0] + [len(X) * K for X, _ in self.chunks])
        self.held = [] if self.n * K * fm.P * fm.itemsize <= 4 * work_budget() else None

    def __len__(self) -> int:
        return len(self.chunks)

    def batches(self) -> list[tuple]:
        """The kept ``(X, Y)`` chunks."""
        return [(X, memo["y"]) for X, memo in self.chunks]

    def rows(self, i: int) -> Tensor:
        """Rows of chunk ``i``, ``(b_i·K, P)`` in the model's dtype (the first call counts its predictions)."""
        if self.held is not None and i < len(self.held):
            return self.held[i]
        X, memo = self.chunks[i]

        def make_v(f):
            if "v" not in memo:  # drawn once, reused whenever the rows are recomputed
                memo["v"] = self.run.v(f, memo["y"])
            return memo["v"]

        _, _, st = batch_stats(self.run.fm, X, make_v, {"rows"}, self.run.engine)
        r = torch.cat([st.rows[n] for n in self.run.fm.names], dim=-1).reshape(-1, self.run.fm.P)
        if self.held is not None:
            self.held.append(r)
        return r

    def gram(self) -> Tensor:
        """``Ĵ Ĵᵀ (N·K, N·K)`` in float64 (:func:`gram64` block by block; memory O((N·K)² + chunk·P))."""
        M, o = int(self.offs[-1]), self.offs
        G = torch.empty(M, M, dtype=torch.float64, device=self.run.fm.device)
        for i in range(len(self)):
            Ri = self.rows(i)
            for j in range(i, len(self)):
                B = gram64(Ri, Ri if j == i else self.rows(j))
                G[o[i] : o[i + 1], o[j] : o[j + 1]] = B
                G[o[j] : o[j + 1], o[i] : o[i + 1]] = B.T
        return G

    def mv(self, x: Tensor) -> Tensor:
        """``Ĵ x`` for ``x (P,)``, float64 ``(N·K,)``."""
        return torch.cat([self.rows(i).double() @ x for i in range(len(self))])

    def rmv(self, W: Tensor) -> Tensor:
        """``Ĵᵀ W`` for ``W (N·K,)`` or ``(N·K, k)``, in ``W``'s dtype."""
        o = self.offs
        return sum(self.rows(i).to(W.dtype).T @ W[o[i] : o[i + 1]] for i in range(len(self)))

    def normal(self, x: Tensor) -> Tensor:
        """``Ĵᵀ Ĵ x`` for ``x (P,)``, float64, one pass over the rows."""
        out = torch.zeros_like(x)
        for i in range(len(self)):
            Ri = self.rows(i).double()
            out += Ri.T @ (Ri @ x)
        return out
