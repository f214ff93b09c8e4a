"""Where the time goes: one Hutchinson draw and a monitored training step, against the training step.

Run with the project's environment (no peers needed)::

    .venv/bin/python benchmarks/profile_overhead.py [--workloads mlp mlp_wide cnn] [--blocks B] [--calls N]
        [--monitor | --no-monitor] [--malloc stable|default] [--out PATH]

In one process, for each workload of ``bench_scalable.py`` (batch 128, float32, ``torch.set_num_threads(2)``) it
profiles three subjects: the training step (forward, cross-entropy, ``backward()``), ours
(``fisher_diag(method="hutchinson", samples=1, batch_size=128)``) and the hand-written detach-and-mix draw of
``bench_scalable.py``; then, on the MLP, the Monitor's ``batch_fisher_trace`` (true, Hutchinson, every step)
against the unmonitored Adam step and ``bench_monitor.py``'s hand-written floor of the same design
(``alt_ghost``). Per subject:

* **time**: blocks of ``N`` calls, the subjects interleaved block by block; the ratio is the median over the
  blocks of each block's time over the same round's step block (paired, so the machine's drift cancels);
* **minor page faults** per call (``getrusage``): first touches of freshly mapped memory;
* **torch ops** per call (``aten::`` events of ``torch.profiler``): on small tensors each op costs its dispatch, a
  few microseconds, whatever its size, so the count is the fixed cost's measure (the profiler's own per-event cost
  makes its op times useless at this scale);
* for ours, the time spent in the library's own Python code (``cProfile``: the self time of every fisherlens
  function, summed) and the functions with the most of it. cProfile slows Python code about twofold, so read them
  as weights, not times.

The report is printed and written to ``benchmarks/results/overhead.md``. ``--malloc stable`` (default) re-runs
the script under ``bench_scalable.STABLE_MALLOC`` (glibc keeps freed memory mapped, as in the other benchmarks);
``--malloc default`` keeps glibc's defaults, where a repeated large allocation is page-faulted on every call.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bench_monitor as bm
import torch
import torch.nn.functional as F
from bench_exact import emit
from bench_scalable import STABLE_MALLOC, m_hand_hutch, make_workload
from torch.profiler import ProfilerActivity, profile

import fisherlens as fl

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "overhead.md"
THREADS = 2
#: a subject runs ``n`` calls (draws or training steps)
Subject = Callable[[int], None]


# --------------------------------------------------------------------------- subjects
def draw_subjects(workload: str) -> dict[str, Subject]:
    """The training step, ours and the hand-written draw on one model and batch."""
    model, X, Y = make_workload(workload)
    g = torch.Generator().manual_seed(0)
    hand = m_hand_hutch(model, X, Y, {})

    def step(n):
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(X), Y).backward()

    def ours(n):
        for _ in range(n):
            fl.fisher_diag(model, (X, Y), fl.Categorical(), method="hutchinson", samples=1, generator=g,
                           batch_size=len(X)).value.sum().item()

    def hand_written(n):
        for _ in range(n):
            hand()

    return {"training step": step, "ours": ours, "hand-written draw": hand_written}


def monitor_subjects(calls: int) -> dict[str, Subject]:
    """An Adam step unmonitored, with the Monitor's batch_fisher_trace, and the hand-written floor."""
    data, probe = bm.batches(calls), bm.batches(1)[0]
    runs = {}
    for name in ("none", "batch_hutch"):
        model = bm.make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        kw = bm.CONFIGS[name][0]
        mon = None if kw is None else fl.Monitor(model, fl.Categorical(), probe, every=1, **kw)
        runs[name] = lambda n, model=model, opt=opt, mon=mon: bm.time_block(model, opt, mon, data[:n])
    model = bm.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    runs["alt_ghost"] = lambda n: bm.alt_block(model, opt, data[:n], "alt_ghost", gen)
    return {"training step (Adam)": runs["none"], "Monitor batch_fisher_trace (true, Hutchinson)":
            runs["batch_hutch"], "hand-written floor of the design": runs["alt_ghost"]}


# --------------------------------------------------------------------------- measurements
def timed(subjects: dict[str, Subject], blocks: int, calls: int) -> dict[str, tuple[float, float]]:
    """``{name: (seconds per call, paired ratio to the first subject)}`` (medians over the blocks)."""
    for run in subjects.values():
        run(max(3, calls // 4))  # warm up: plans, caches, the allocator
    per = {name: [] for name in subjects}
    for _ in range(blocks):
        for name, run in subjects.items():
            t0 = time.perf_counter()
            run(calls)
            per[name].append((time.perf_counter() - t0) / calls)
    base = per[next(iter(subjects))]
    return {name: (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base, strict=True)))
            for name, ts in per.items()}


def faults(run: Subject, calls: int) -> float:
    """Minor page faults per call."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(calls)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def torch_ops(run: Subject, calls: int) -> float:
    """``aten::`` ops per call (top-level and nested)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(calls)
    return sum(e.name.startswith("aten::") for e in prof.events()) / calls


def library_python(run: Subject, calls: int, top: int) -> tuple[float, list[tuple[str, float]]]:
    """``(µs per call of the fisherlens functions' own Python code, the top functions by it)`` under cProfile
    (self time: the torch calls they make are not counted)."""
    prof = cProfile.Profile()
    prof.enable()
    run(calls)
    prof.disable()
    rows = []
    for (file, line, func), (_, _, own, _, _) in pstats.Stats(prof).stats.items():
        if f"{os.sep}fisherlens{os.sep}" in file:
            where = file.split(f"{os.sep}fisherlens{os.sep}", 1)[1]
            rows.append((f"`{func}` ({where}:{line})", own * 1e6 / calls))
    rows.sort(key=lambda r: -r[1])
    return sum(us for _, us in rows), rows[:top]


def report(title: str, subjects: dict[str, Subject], blocks: int, calls: int, top: int, ours: str) -> list[str]:
    """One workload's section: the table of the subjects, then the library functions of ``ours``."""
    times = timed(subjects, blocks, calls)
    lines = [f"### {title}", "", "| subject | ms / call | ratio to the step | minor page faults / call "
             "| torch ops / call |", "|---|---|---|---|---|"]
    # faults first: memory a profiler run frees is page-faulted again by the calls after it
    flt = {name: faults(run, calls) for name, run in subjects.items()}
    ops = {name: torch_ops(run, calls) for name, run in subjects.items()}
    for name, (t, r) in times.items():
        lines.append(f"| {name} | {t * 1e3:.3f} | {r:.2f}× | {flt[name]:.1f} | {ops[name]:.0f} |")
        print(lines[-1], flush=True)
    total, rows = library_python(subjects[ours], calls, top)
    lines += ["", f"{ours}: the library's own Python code, {total:.0f} µs per call under cProfile; the functions "
              "with the most of it:", "", "| function | µs / call (self) |", "|---|---|",
              *(f"| {f} | {us:.0f} |" for f, us in rows), ""]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=["mlp", "mlp_wide", "cnn"],
                    choices=["mlp", "mlp_wide", "cnn", "resnet18", "transformer"])
    ap.add_argument("--blocks", type=int, default=15, help="interleaved timing blocks per subject")
    ap.add_argument("--calls", type=int, default=20, help="calls per block (and per profile)")
    ap.add_argument("--top", type=int, default=12, help="library functions listed per workload")
    ap.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=True,
                    help="also profile the Monitor's batch_fisher_trace on the MLP")
    ap.add_argument("--malloc", choices=["stable", "default"], default="stable")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    # glibc reads its settings at start-up: re-run this script with them set (stable) or removed (default)
    env = {k: v for k, v in os.environ.items() if k not in STABLE_MALLOC}
    if args.malloc == "stable":
        env.update(STABLE_MALLOC)
    if any(os.environ.get(k) != env.get(k) for k in STABLE_MALLOC):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(THREADS)
    lines = [f"Overhead profile: batch 128 (32 for resnet18 and transformer), float32, {THREADS} threads, "
             f"{args.blocks} blocks of {args.calls} calls, "
             f"glibc malloc {args.malloc}; torch {torch.__version__}, {platform.processor() or platform.machine()}.",
             ""]
    for w in args.workloads:
        lines += report(f"One Hutchinson draw: {w}", draw_subjects(w), args.blocks, args.calls, args.top, "ours")
    if args.monitor:
        lines += report("The Monitor's per-step batch trace: mlp (ReLU), Adam", monitor_subjects(args.calls),
                        args.blocks, args.calls, args.top, "Monitor batch_fisher_trace (true, Hutchinson)")
    return emit(lines, [], args.out)


if __name__ == "__main__":
    raise SystemExit(main())
