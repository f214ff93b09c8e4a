"""Scaling of the exact Fisher diagonal and of Hutchinson over 1 → 2 processes (torch.distributed, gloo, CPU).

Workload: MLP 784-128-128-10 with ReLU (P = 118,282), float32, random inputs and an untrained model from a fixed
seed, the true categorical Fisher.  One process reads all N inputs (``distributed=False``); two processes each
read every second input (``X[rank::2]``) and meet in one all-reduce per call.  Every process runs one intra-op
thread, so two processes use the machine's two cores.  The two are timed alternately in one spawned group (the
single-process call on rank 0 while the other rank waits in a barrier, then the sharded call; a call's time is
the slowest rank's, between barriers); efficiency = T₁ / (2 · T₂).  The collectives per call are counted by
:func:`fisherlens._core.collectives`.

Run: .venv/bin/python benchmarks/bench_distributed.py [--quick] [--n N] [--repeats R] [--wait-idle S]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fisherlens as fl
from fisherlens._core import collectives

RESULTS = Path(__file__).parent / "results" / "distributed.md"
QUANTITIES = {
    "exact diag F (true, K = 10 columns)": lambda m, d, lik, g, **kw: fl.fisher_diag(m, d, lik, **kw),
    "Hutchinson tr F (16 draws)": lambda m, d, lik, g, **kw: fl.fisher_trace(
        m, d, lik, method="hutchinson", samples=16, generator=g, **kw
    ),
}


def workload(n: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(1)
    return model.eval(), torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(call) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def worker(rank: int, world: int, port: int, opts: dict, out: str) -> None:
    """Per repeat, alternately: rank 0 alone on all the data (``distributed=False``; the other rank waits in a
    barrier), then every rank on its shard (the slowest rank's time) — drifts in the machine's load hit both."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, X, Y = workload(opts["n"])
    shard, lik = (X[rank::world], Y[rank::world]), fl.Categorical()
    result = {}
    for name, fn in QUANTITIES.items():
        g = torch.Generator().manual_seed(2)

        def alone(fn=fn, g=g):
            if rank == 0:
                fn(model, (X, Y), lik, g, distributed=False)

        def sharded(fn=fn, g=g):
            fn(model, shard, lik, g)

        alone()  # warm-up
        sharded()
        before = collectives()
        alone()
        c1 = collectives() - before
        sharded()
        c2 = collectives() - before - c1
        t1, t2 = [], []
        for _ in range(opts["repeats"]):
            t1.append(_slowest(_timed(alone)))
            t2.append(_slowest(_timed(sharded)))
        result[name] = {
            "t1": statistics.median(t1),
            "t2": statistics.median(t2),
            "times1": t1,
            "times2": t2,
            "c1": c1,
            "c2": c2,
        }
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run(opts: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(worker, args=(2, port, opts, out), nprocs=2, start_method="spawn")
        return json.loads(Path(out).read_text())


def wait_idle(seconds: float, below: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while os.getloadavg()[0] > below and time.monotonic() < end:
        time.sleep(5)


def table(res: dict, opts: dict, loads: list) -> str:
    lines = [
        f"MLP 784-128-128-10 (P = 118,282), float32, N = {opts['n']} inputs, 1 thread per process, median of "
        f"{opts['repeats']} interleaved repeats; load average (1 min) before: {loads[0]:.2f} on "
        f"{os.cpu_count()} cores.",
        "",
        "| quantity | 1 process | 2 processes | speed-up | efficiency | collectives per call (1 → 2) |",
        "|---|---|---|---|---|---|",
    ]
    for name in QUANTITIES:
        r = res[name]
        t1, t2 = r["t1"], r["t2"]
        lines.append(
            f"| {name} | {t1:.3f} s | {t2:.3f} s | {t1 / t2:.2f}× | {t1 / (2 * t2):.0%} | {r['c1']} → {r['c2']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 256, 3 repeats (smoke test)")
    ap.add_argument("--n", type=int, default=None, help="inputs (default 8192; 256 with --quick)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this many seconds for load < 0.5")
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown table")
    args = ap.parse_args(argv)
    opts = {
        "n": args.n or (256 if args.quick else 8192),
        "repeats": args.repeats or (3 if args.quick else 7),
    }
    if args.wait_idle:
        wait_idle(args.wait_idle)
    loads = [os.getloadavg()[0]]
    res = run(opts)
    text = table(res, opts, loads)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
