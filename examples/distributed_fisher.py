"""The Fisher of a data set sharded over processes: every rank streams its shard, one all-reduce per call.

Each rank holds every second input (like ``DistributedSampler``); every call returns the Fisher of the whole data
set, the same on every rank, and rank 0 checks it against one process reading everything (docs/distributed.md).
Then a ``DistributedDataParallel`` model trains a few steps under an ``fl.Monitor`` that records on rank 0.

Run: torchrun --nproc-per-node 2 examples/distributed_fisher.py   (add --standalone for a free port)
 or: python examples/distributed_fisher.py      (spawns its own 2 gloo processes on this machine)
"""

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fisherlens as fl

WORLD = 2  # processes spawned when not launched by torchrun


def fisher_on_shards(rank: int, world: int) -> None:
    torch.manual_seed(0)  # the same model on every rank (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).double().eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (300,), generator=g)
    shard = (X[rank::world], y[rank::world])  # this rank's inputs
    lik = fl.Categorical()

    trace = fl.fisher_trace(model, shard, lik)  # tr F of all 300 inputs, on every rank
    diag = fl.fisher_diag(model, shard, lik, kind="empirical")
    est = fl.fisher_trace(
        model, shard, lik, method="hutchinson", samples=64, generator=torch.Generator().manual_seed(2)
    )
    top = fl.eigenvalues(model, shard, lik, k=3, method="lanczos")
    if rank == 0:
        one = {"distributed": False}
        ref_trace = fl.fisher_trace(model, (X, y), lik, **one)
        ref_diag = fl.fisher_diag(model, (X, y), lik, kind="empirical", **one)
        ref_top = fl.eigenvalues(model, (X, y), lik, k=3, method="lanczos", **one)
        print(f"{world} ranks, {len(shard[0])} of {len(X)} inputs on rank 0")
        print(f"tr F          = {trace:.12f}   (one process: {ref_trace:.12f})")
        rel = float(((diag - ref_diag) / ref_diag).abs().max())
        print(f"diag F_emp    : max rel. difference to one process {rel:.1e}")
        print(f"Hutchinson    = {est.value:.5f} ± {est.stderr:.5f}   z = {(est.value - ref_trace) / est.stderr:+.2f}")
        print(
            f"top-3 (Lanczos) {[round(float(v), 10) for v in top]}   (one process: "
            f"{[round(float(v), 10) for v in ref_top]})"
        )
        assert math.isclose(trace, ref_trace, rel_tol=1e-10)
        assert torch.allclose(diag, ref_diag, rtol=1e-10) and torch.allclose(top, ref_top, rtol=1e-8)
        assert abs(est.value - ref_trace) < 6 * est.stderr


def monitor_under_ddp(rank: int, world: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    ddp = nn.parallel.DistributedDataParallel(net)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(256, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
    probe = (X[:64][rank::world], y[:64][rank::world])
    mon = fl.Monitor(
        ddp, fl.Categorical(), probe, observables=("loss", "fisher_trace", "batch_fisher_trace"), every=5
    )  # records kept on rank 0; every rank calls step()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(1, 16):
        idx = torch.arange(16 * step, 16 * step + 16)[rank::world]
        loss = F.cross_entropy(ddp(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        opt.step()
        mon.step(loss=loss, targets=y[idx])
    mon.close()
    if rank == 0:
        for r in mon.records:
            print(
                f"step {r['step']:2d}: probe loss {r['loss']:.4f}, tr F {r['fisher_trace']:.4f}, "
                f"batch tr F {r['batch_fisher_trace']:.4f}"
            )


def run(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    fisher_on_shards(rank, world)
    monitor_under_ddp(rank, world)


def _spawned(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run(rank, world)
        dist.barrier()  # no rank tears the group down while another is still using it
    finally:
        dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:  # a free port for this machine's own group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(WORLD, port), nprocs=WORLD, start_method="spawn")


if __name__ == "__main__":
    main()
