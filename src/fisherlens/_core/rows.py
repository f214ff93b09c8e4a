"""The factor rows of a data set, ``Ĵ (N·K, P)``: held or recomputed chunk by chunk, with float64 products.

Shared by the Gram routes of the spectrum and of the natural gradient: the data is read once (its chunks
kept), each chunk's sandwich is built once and reused whenever its rows are recomputed (``kind="mc"`` draws
its labels once), and the rows are held when all of them fit four working budgets.  Under a process group the
rows of every rank are gathered (they must fit in memory, else a ``ValueError`` names the matrix-free route), so
each rank holds the whole ``Ĵ`` of the union of the shards, in rank order.
"""

from __future__ import annotations

import numpy as np
import torch

from .checks import available_memory
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
        chunks: ``[(X, memo)]`` per chunk (this rank's); K: sandwich columns per input; n: inputs (of all ranks);
        offs: row offsets of the row blocks (the chunks; one block of all ranks' rows under a process group).

    Args:
        run: the request; under a process group (``run.shards``) the rows of all ranks are gathered.
        hint: what to do instead when the gathered rows do not fit ``max_memory`` (default half the memory).
    """

    def __init__(self, run: Request, hint: str = "Use method='lanczos' with k= (matrix-free)",
                 max_memory: int | None = None):
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
        self.offs = np.cumsum([0] + [len(X) * K for X, _ in self.chunks])  # an empty shard has K = None
        self.held = [] if self.n * (K or 0) * fm.P * fm.itemsize <= 4 * work_budget() else None
        self.parts = len(self.chunks)
        if run.shards is not None:
            self._gather(hint, max_memory)

    def _gather(self, hint: str, max_memory: int | None) -> None:
        """Hold the rows of every rank, ``(N·K, P)`` in rank order, as one block (three collectives: the counts,
        the agreement that they fit — each rank's free memory differs — and the rows themselves)."""
        run, fm = self.run, self.run.fm
        ns, ks = run.shards.counts(self.n, self.K or 0, device=fm.device)
        self.K, self.n = max(ks), sum(ns)
        need = self.n * self.K * fm.P * fm.itemsize
        limit = max_memory if max_memory is not None else available_memory() // 2
        mine = torch.cat([self.rows(i) for i in range(self.parts)]) if need <= limit and self.chunks else None
        bad, run.m = run.shards.sum([int(need > limit), int(run.m)], device=fm.device)
        if bad:
            raise ValueError(f"The Gram route under a process group gathers the factor rows of all "
                             f"{run.shards.size} ranks on each, {self.n * self.K} × {fm.P} numbers ({need / 2**30:.2f} "
                             f"GiB), more than a rank may use ({limit / 2**30:.2f} GiB here: max_memory=, default half "
                             f"the available memory). {hint}.")
        if mine is None:
            mine = torch.zeros(0, fm.P, dtype=fm.dtype, device=fm.device)
        self.held = [run.shards.gather_rows(mine, [n * self.K for n in ns])]
        self.parts, self.offs, run.n = 1, np.array([0, self.n * self.K]), self.n

    def __len__(self) -> int:
        return self.parts

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
