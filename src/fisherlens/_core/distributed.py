"""Many processes, one result: the data as shards over a ``torch.distributed`` process group.

Every Fisher-type quantity is a sum over inputs, so it shards exactly: each rank streams its own shard, the
accumulated statistics (and the counts N of inputs and m of kept predictions) are summed over the ranks by one
all-reduce, and the normalisation uses the global counts (docs/distributed.md).  This module is the only place
that talks to ``torch.distributed``:

* :func:`shards_for` — the :class:`Shards` of ``group=`` / ``distributed=`` (``None`` when single-process);
* :meth:`Shards.sum` — one all-reduce of a list of tensors and numbers flattened into one float64 buffer;
* :meth:`Shards.gather_rows` — rows of every rank, concatenated in rank order (uneven and empty shards);
* :func:`rank_generator` — a per-rank ``torch.Generator`` derived from one seed (independent draws per rank);
* :func:`unwrap_model` — the module inside a ``DistributedDataParallel`` wrapper;
* :func:`collectives` — how many collectives this process has issued (the benchmark's count per call).
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["Shards", "shards_for", "rank_generator", "unwrap_model", "collectives"]

_COUNT = [0]
_MASK64 = (1 << 64) - 1


def collectives() -> int:
    """Collectives (all-reduce, broadcast) issued by fisherlens in this process so far."""
    return _COUNT[0]


def _dist():
    import torch.distributed as dist

    return dist


def unwrap_model(model):
    """``model.module`` for a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else ``model``: the
    wrapper's own forward synchronises gradients and buffers, the Fisher needs only the function it wraps."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _splitmix64(x: int) -> int:
    """The SplitMix64 finaliser (Steele, Lea & Flood 2014): nearby integers map to unrelated 64-bit seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rank_generator(generator: torch.Generator | None, rank: int, device=None) -> torch.Generator:
    """A generator for ``rank`` derived from ``generator`` (default: the global RNG), on ``device``.

    One 62-bit integer ``b`` is drawn from ``generator`` — the same on every rank when every rank seeded it
    alike, and advancing it, so that successive calls draw afresh — and rank ``r`` gets a new generator seeded
    with ``splitmix64(b + r·φ)`` (``φ`` the 64-bit golden ratio): independent streams per rank, reproducible
    from the one seed.
    """
    base = int(torch.randint(0, 2**62, (), generator=generator))
    dev = torch.device(device) if device is not None else (generator.device if generator is not None else "cpu")
    seed = _splitmix64((base + (rank + 1) * 0x9E3779B97F4A7C15) & _MASK64)
    return torch.Generator(device=dev).manual_seed(seed)


class Shards:
    """This process's place in a process group, and the collectives every distributed view uses.

    Attributes:
        group: the ``torch.distributed`` process group (``None`` = the default group).
        rank, size: this process's rank in ``group`` and the number of ranks.
    """

    def __init__(self, group=None):
        dist = _dist()
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError(
                "This process is not a member of group=; pass a group it belongs to, or distributed=False."
            )

    def __repr__(self) -> str:
        return f"Shards(rank={self.rank}, size={self.size})"

    def sum(self, values: list, device=None) -> list:
        """``values`` (tensors, floats, ints) summed over the ranks by **one** all-reduce.

        They are flattened into one float64 buffer on ``device`` (default that of the first tensor, else the
        CPU; NCCL needs CUDA tensors), reduced, and returned in their own shapes and types (ints as ints: counts
        up to 2⁵³ are exact).
        """
        tensors = [v for v in values if isinstance(v, Tensor)]
        if device is None:
            device = tensors[0].device if tensors else torch.device("cpu")
        parts = [
            v.detach().reshape(-1).to(device, torch.float64)
            if isinstance(v, Tensor)
            else torch.tensor([float(v)], dtype=torch.float64, device=device)
            for v in values
        ]
        buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        self._all_reduce(buf)
        out, i = [], 0
        for v in values:
            if isinstance(v, Tensor):
                out.append(buf[i : i + v.numel()].reshape(v.shape).to(v.device, v.dtype))
                i += v.numel()
            else:
                x = float(buf[i])
                out.append(int(round(x)) if isinstance(v, int) and not isinstance(v, bool) else x)
                i += 1
        return out

    def _all_reduce(self, buf: Tensor) -> None:
        _COUNT[0] += 1
        _dist().all_reduce(buf, group=self.group)

    def same(self, value: float, what: str) -> None:
        """Check, by one all-reduce of ``(x, x²)``, that every rank passed the same number ``value``
        (``Σx² = (Σx)²/size`` exactly when all are equal); ``ValueError`` naming ``what`` otherwise."""
        s, s2 = self.sum([float(value), float(value) ** 2])
        if not math.isclose(s2 * self.size, s * s, rel_tol=1e-12, abs_tol=1e-9):
            raise ValueError(
                f"The ranks disagree on {what} (this rank: {value!r}, mean over ranks: "
                f"{s / self.size!r}); every rank must make the same calls in the same order."
            )

    def broadcast(self, x: Tensor) -> Tensor:
        """``x`` of the group's first rank, on every rank (in place)."""
        dist = _dist()
        _COUNT[0] += 1
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(x, src=src, group=self.group)
        return x

    def counts(self, *values: int, device=None) -> list[list[int]]:
        """Every rank's integers ``values``, by one all-reduce: ``[[v_0 of rank 0, v_0 of rank 1, …], …]``."""
        buf = torch.zeros(len(values), self.size, dtype=torch.float64, device=device)
        buf[:, self.rank] = torch.tensor([float(v) for v in values], dtype=torch.float64)
        (buf,) = self.sum([buf])
        return [[int(round(x)) for x in row] for row in buf.tolist()]

    def gather_rows(self, rows: Tensor, counts: list[int]) -> Tensor:
        """The rows ``(counts[r], ...)`` of every rank ``r`` stacked in rank order, on every rank: each rank writes
        its own rows into its slice of a zero buffer and one all-reduce adds the slices (adding zeros is exact,
        so the rows arrive bit for bit; uneven and empty shards need no padding)."""
        offs = [0, *torch.tensor(counts).cumsum(0).tolist()]
        buf = rows.new_zeros(offs[-1], *rows.shape[1:])
        buf[offs[self.rank] : offs[self.rank + 1]] = rows
        self._all_reduce(buf)
        return buf


def shards_for(group=None, distributed: bool | None = None) -> Shards | None:
    """The :class:`Shards` for ``group=`` / ``distributed=``, or ``None`` (single-process).

    ``distributed=None`` (default): distributed when ``torch.distributed`` is initialised and the group (``group``,
    default the default group) has more than one rank; ``True``: required (``ValueError`` when no process group
    is initialised); ``False``: this process alone, whatever is initialised (``group=`` must then be ``None``).
    """
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}.")
    if distributed is False:
        if group is not None:
            raise ValueError("group= was given with distributed=False; pass one or the other.")
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        if distributed or group is not None:
            raise ValueError(
                "distributed=True (or group=) needs an initialised torch.distributed process group: "
                "launch with torchrun and call torch.distributed.init_process_group() first, or pass "
                "distributed=False."
            )
        return None
    shards = Shards(group)
    if shards.size == 1 and not distributed:
        return None
    return shards
