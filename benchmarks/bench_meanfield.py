"""Mean-field benchmark: the theory for a depth-100 network and the seed 003 studies at their default sizes.

Run with the project's environment::

    .venv/bin/python benchmarks/bench_meanfield.py            # theory + fig-1 study (+ lr study)
    .venv/bin/python benchmarks/bench_meanfield.py --quick    # theory + the studies' quick variants
    .venv/bin/python benchmarks/bench_meanfield.py --no-lr    # skip the learning-rate study

Targets (issue): ``fl.theory.meanfield`` for L = 100 in under 0.1 s; ``fisherlens run meanfield-spectrum``
at its default size in under 10 minutes on 2 cores.  Wall time and process CPU time are both reported:
on a shared machine the CPU time is the load-independent number.  Prints a markdown table and writes it
to ``benchmarks/results/meanfield.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "meanfield.md"
ACTS = {"tanh": (3.0, 0.64), "relu": (2.0, 0.1), "linear": (1.0, 0.1), "erf": (1.5, 0.05), "sigmoid": (3.0, 0.1)}


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def bench_theory(depth: int = 100, repeats: int = 20) -> list[dict]:
    """Cold (first call in the process, includes building the quadrature rules) and warm (median) timings."""
    import fisherlens as fl

    rows = []
    for i, (act, (sw, sb)) in enumerate(ACTS.items()):
        _, cold, cold_cpu = _timed(lambda a=act, w=sw, b=sb: fl.theory.meanfield(a, w, b, depth, samples=100))
        walls, cpus = [], []
        for _ in range(repeats):
            th, w, c = _timed(lambda a=act, w=sw, b=sb: fl.theory.meanfield(a, w, b, depth, samples=100))
            walls.append(w)
            cpus.append(c)
        rows.append({"what": f"theory L={depth}, {act} ({sw:g}, {sb:g})", "cold_s": cold if i == 0 else None,
                     "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                     "note": f"κ1={th.kappa1:.4g}, κ2={th.kappa2:.4g}", "target_s": 0.1})
    return rows


def bench_study(name: str, quick: bool) -> dict:
    from fisherlens.experiments import get

    fn = get(name)
    with tempfile.TemporaryDirectory() as tmp:
        path, wall, cpu = _timed(lambda: fn(Path(tmp) / "run", quick=quick, progress=False))
        summary = (path / "summary.md").read_text(encoding="utf-8")
    note = next((ln for ln in summary.splitlines() if ln.startswith("| all | theory |")), "")
    if note:
        note = "share of cells on the predicted side: " + note.split("|")[3].strip()
    return {"what": f"`fisherlens run {name}`{' --quick' if quick else ''}", "cold_s": None, "wall_s": wall,
            "cpu_s": cpu, "note": note, "target_s": (20.0 if quick else 600.0) if name == "meanfield-spectrum"
            else (20.0 if quick else None)}


def _fmt(v):
    return "" if v is None else f"{v:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="time the studies' quick variants instead of the defaults")
    ap.add_argument("--no-lr", action="store_true", help="skip the learning-rate study")
    args = ap.parse_args(argv)
    rows = bench_theory()
    rows.append(bench_study("meanfield-spectrum", args.quick))
    if not args.no_lr:
        rows.append(bench_study("meanfield-lr", args.quick))
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = float("nan")
    lines = [
        "# Mean-field theory and studies: timings",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
        f"load average at the end {load:.1f}. Studies run with one torch thread (their default).",
        "",
        "| what | cold wall (s) | wall (s) | CPU (s) | target (s) | ok | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "" if r["target_s"] is None else ("yes" if min(r["wall_s"], r["cpu_s"]) < r["target_s"] else "**no**")
        lines.append(f"| {r['what']} | {_fmt(r['cold_s'])} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | "
                     f"{_fmt(r['target_s'])} | {ok} | {r['note']} |")
    lines += ["", "Theory rows: median over 20 calls (cold: the first call of the process, building the "
              "half-range Gauss–Hermite rules). 'ok' compares the smaller of wall and CPU time with the target.", ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
