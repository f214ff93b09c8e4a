"""Cost model of the scalable methods: how their ratio to one forward+backward grows with batch size and width.

Run with the peers' virtual environment (see ``benchmarks/run.sh``)::

    benchmarks/run.sh bench_scaling.py [--quick]

Workloads: the MLP 784-H-H-10 at H = 128 with batch B = 32, 128, 512, then at B = 128 with H = 512, 2048, and the
CNN of ``bench_exact.py`` at B = 32, 128, 512.  Each (workload, method) pair runs in a fresh worker of
``bench_scalable.py`` (same harness: method and a plain forward+backward interleaved, ratio of the medians; tensor
peak of one warm call).  Prints a markdown table and writes ``benchmarks/results/scaling.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import bench_scalable as sc
from bench_exact import emit, harness_args, spawn, versions, wait_quiet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling.md"
GRID = [f"mlp-h128-b{b}" for b in (32, 128, 512)] + [f"mlp-h{h}-b128" for h in (512, 2048)] + \
    [f"cnn-b{b}" for b in (32, 128, 512)]
METHODS = ["fwd_bwd", "fl_hutch", "hand_hutch", "fl_fvp", "curvlinops_fvp"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, MLP rows only (smoke test)")
    ap.add_argument("--workloads", nargs="*", default=GRID)
    harness_args(ap, out=RESULTS)
    args = ap.parse_args(argv)
    opts = {"repeats": args.repeats or (3 if args.quick else 9), "warmup": 1 if args.quick else 3,
            "malloc": args.malloc}
    workloads = [w for w in args.workloads if not args.quick or w.startswith("mlp")]
    env = sc.STABLE_MALLOC if opts["malloc"] == "stable" else None
    head = ["workload", "P", "fwd+bwd (ms)", "ours Hutchinson draw", "hand-written draw",
            "draw tensor peak / (step's + P-vector)",
            "ours F·v (warm)", "curvlinops GGN·v", "ours / curvlinops"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fisherlens-scaling-") as tmp:
        for wl in workloads:
            got, busy = {}, 0.0
            for m in METHODS:
                busy = max(busy, wait_quiet(args.wait_idle))
                payload, _, err = spawn(wl, m, opts, tmp, args.timeout, script=sc.__file__, threads=sc.THREADS,
                                        env=env)
                got[m] = payload
                print(f"  {wl:<14} {m:<16} " + (err or f"{payload['time_s'] / payload['base_s']:.2f}x"), flush=True)
            rows.append(_row(wl, got, busy))
    lines = ["# Cost model: ratio to one forward+backward against batch size and width", "",
             f"- float32, `torch.set_num_threads({sc.THREADS})`, {versions()}",
             f"- median of {opts['repeats']} interleaved repeats after {opts['warmup']} warm-up call(s); the harness "
             "of `bench_scalable.py` (ours with `batch_size=B`: one pass over the batch, as the step)",
             "- tensor peak: live tensor bytes of one warm call over those of the step plus the returned P-vector "
             "(the issue's memory target is ≤ 1.1)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return emit(lines, [], args.out)


def _row(wl: str, got: dict, busy: float) -> list[str]:
    """One table row; ``n/a`` where a worker failed, ``†`` when the CPUs were busy before a worker."""
    def ratio(m):
        p = got.get(m)
        return None if p is None else p["time_s"] / p["base_s"]

    def cell(x, fmt="{:.2f}×"):
        return "n/a" if x is None else fmt.format(x)

    base, hutch = got.get("fwd_bwd"), got.get("fl_hutch")
    P = sum(p.numel() for p in sc.make_workload(wl)[0].parameters())
    pvec = P * 4 / 2**20  # the returned diagonal (float32)
    peak = None if base is None or hutch is None else hutch["tensor_mib"] / (base["tensor_mib"] + pvec)
    ours, theirs = ratio("fl_fvp"), ratio("curvlinops_fvp")
    rel = None if ours is None or theirs is None else ours / theirs
    flag = " †" if busy > 0.15 else ""
    return [wl + flag, f"{P:,}", cell(None if base is None else base["base_s"] * 1e3, "{:.2f}"),
            cell(ratio("fl_hutch")), cell(ratio("hand_hutch")), cell(peak), cell(ours), cell(theirs),
            cell(rel, "{:.2f}")]


if __name__ == "__main__":
    sys.exit(main())
