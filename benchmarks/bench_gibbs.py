"""Gibbs-model benchmark: the exact 2-D Ising metric vs the lattice size, and Monte Carlo at the critical point.

Run with the project's environment::

    .venv/bin/python benchmarks/bench_gibbs.py             # full (~2 min on 2 cores)
    .venv/bin/python benchmarks/bench_gibbs.py --quick     # smoke test (seconds)
    .venv/bin/python benchmarks/bench_gibbs.py --threads 1

1. *Exact metric per (β, h) point vs L*: ``fl.gibbs.Ising2D(L).metric((β_c, 0.1))`` (enumeration of the 2^(L²)
   states for L ≤ 4, the differentiable 2^L × 2^L row transfer matrix for 5 ≤ L ≤ 10: a ``torch.func`` Hessian
   through O(log L) matrix products) and ``fl.geometry.scalar_curvature`` on the same model (fourth derivatives of
   log Z) for L ≤ 8; and ``fl.gibbs.IsingTorus(L).metric(β_c)`` (h = 0, Kaufman's formula, O(L) per point) one point at
   a time (a ``torch.func`` Hessian) and batched over 256 couplings (``IsingTorus.metric_curve``).
2. *Monte Carlo at β_c* (h = 0; L = 32, 64): ``fl.gibbs.ising2d_monte_carlo`` with Wolff clusters vs checkerboard
   Metropolis — sweeps per second, the integrated autocorrelation time τ_int (Madras–Sokal window, in sweeps) of the
   energy, of |M| and of the centred product behind g_ββ, and the effective samples per second
   ``sweeps / (2 τ_int) / wall``.  Critical slowing down (τ ~ L^z, z ≈ 2.17 for local updates, z ≈ 0.25 for
   Wolff) is why the cluster algorithm is used.  Plus Wolff with a field through the ghost spin (β_c, h = 0.05).
   Metropolis τ values come from runs far shorter than 1000 τ: they are lower bounds (the sampler warns); the
   column "s to 1 % on g_ββ" (wall time for a 1 % block-jackknife error) does not depend on them.

Wall time and process CPU time are both reported; the load average at the start and the end is printed with the
table.  Prints a markdown table and writes it to ``benchmarks/results/gibbs.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gibbs.md"
D = torch.float64
BETA_C = 0.5 * math.log(1.0 + math.sqrt(2.0))


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _median_time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    runs = [_timed(fn) for _ in range(repeats)]
    return statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


def bench_exact(sizes: list[int], curvature_max: int, repeats: int) -> list[dict]:
    """Exact metric (and curvature) of the L × L lattice at one (β, h) point, per L."""
    import fisherlens as fl
    from fisherlens.gibbs import Ising2D

    th = torch.tensor([BETA_C, 0.1], dtype=D)
    rows = []
    for L in sizes:
        model = Ising2D(L)
        reps = repeats if L <= 8 else 1
        wall, cpu = _median_time(lambda m=model: m.metric(th), reps)
        row = {
            "L": L,
            "method": model.method,
            "metric_ms": 1e3 * wall,
            "metric_cpu_ms": 1e3 * cpu,
            "curv_ms": math.nan,
            "curv_cpu_ms": math.nan,
            "g_bb": float(model.metric(th)[0, 0]),
            "R": math.nan,
        }
        if L <= curvature_max:
            wall, cpu = _median_time(lambda m=model: fl.geometry.scalar_curvature(m, th), max(1, reps // 2))
            row.update(curv_ms=1e3 * wall, curv_cpu_ms=1e3 * cpu, R=fl.geometry.scalar_curvature(model, th))
        rows.append(row)
    return rows


def bench_torus(sizes: list[int], repeats: int, points: int = 256) -> list[dict]:
    """Kaufman's exact torus at h = 0: one coupling per call, and ``points`` couplings in one batched call."""
    from fisherlens.gibbs import IsingTorus

    rows = []
    betas = torch.linspace(0.3, 0.6, points, dtype=D)
    for L in sizes:
        model = IsingTorus(L)
        one, one_cpu = _median_time(lambda m=model: m.metric(torch.tensor([BETA_C], dtype=D)), repeats)
        batch, batch_cpu = _median_time(lambda m=model: m.metric_curve(betas), max(1, repeats // 2))
        rows.append(
            {
                "L": L,
                "one_ms": 1e3 * one,
                "one_cpu_ms": 1e3 * one_cpu,
                "batch_ms": 1e3 * batch / points,
                "batch_cpu_ms": 1e3 * batch_cpu / points,
                "g_bb": float(model.metric(torch.tensor([BETA_C], dtype=D))[0, 0]),
            }
        )
    return rows


def bench_monte_carlo(cases: list[tuple[int, str, float, int]]) -> list[dict]:
    """Each case ``(L, method, h, sweeps)`` at β_c: speed, τ_int and effective samples per second."""
    from fisherlens.gibbs import IsingTorus, ising2d_monte_carlo

    rows = []
    for L, method, h, sweeps in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            (r, wall, cpu) = _timed(
                lambda L=L, m=method, h=h, s=sweeps: ising2d_monte_carlo(
                    L,
                    (BETA_C, h),
                    sweeps=s,
                    burn_in=max(200, s // 10),
                    method=m,
                    generator=torch.Generator().manual_seed(0),
                )
            )
        exact = float(IsingTorus(L).metric(torch.tensor([BETA_C], dtype=D))[0, 0]) if h == 0 else math.nan
        eff = {k: r.effective_samples[k] / r.elapsed_s for k in ("E", "|M|", "g_bb")}
        rows.append(
            {
                "L": L,
                "method": method,
                "h": h,
                "sweeps": sweeps,
                "wall": wall,
                "cpu": cpu,
                "sweeps_per_s": r.sweeps_per_second,
                "tau_E": r.tau["E"],
                "tau_absM": r.tau["|M|"],
                "tau_gbb": r.tau["g_bb"],
                "eff_E": eff["E"],
                "eff_absM": eff["|M|"],
                "eff_gbb": eff["g_bb"],
                "g_bb": float(r.metric[0, 0]),
                "se": float(r.stderr[0, 0]),
                "exact": exact,
                "t_1pct": r.elapsed_s * (float(r.stderr[0, 0]) / (0.01 * float(r.metric[0, 0]))) ** 2,
                "clusters": r.clusters_per_sweep,
                "warned": bool(caught),
            }
        )
    return rows


def _fmt(v: float, spec: str = ".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(exact, torus, mc, threads: int, load0: float, load1: float) -> str:
    L = [
        "# Gibbs models: exact 2-D Ising metric and Monte Carlo at β_c — timings",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}, float64, {threads} torch thread(s); load average {load0:.2f} at the start, "
        f"{load1:.2f} at the end (the CPU columns are the load-independent numbers).",
        "",
        "## Exact metric per (β, h) point vs L (`Ising2D(L)`, β = β_c, h = 0.1)",
        "",
        "| L | method | metric: wall / CPU (ms) | scalar_curvature: wall / CPU (ms) | g_ββ | R |",
        "|---|---|---|---|---|---|",
    ]
    for r in exact:
        L.append(
            f"| {r['L']} | {r['method']} | {r['metric_ms']:.3g} / {r['metric_cpu_ms']:.3g} | "
            f"{_fmt(r['curv_ms'])} / {_fmt(r['curv_cpu_ms'])} | {r['g_bb']:.6g} | {_fmt(r['R'], '.5g')} |"
        )
    L += [
        "",
        "## Exact torus at h = 0 (`IsingTorus(L)`, Kaufman's formula, β = β_c)",
        "",
        "| L | one point: wall / CPU (ms) | per point, batch of 256 (`metric_curve`): wall / CPU (ms) | g_ββ(β_c) |",
        "|---|---|---|---|",
    ]
    for r in torus:
        L.append(
            f"| {r['L']} | {r['one_ms']:.3g} / {r['one_cpu_ms']:.3g} | {r['batch_ms']:.3g} / "
            f"{r['batch_cpu_ms']:.3g} | {r['g_bb']:.6g} |"
        )
    L += [
        "",
        "## Monte Carlo at β_c (`ising2d_monte_carlo`)",
        "",
        "| L | method | h | sweeps | sweeps/s | τ_int E / \\|M\\| / g_ββ (sweeps) | effective samples/s E / \\|M\\| / "
        "g_ββ | g_ββ ± s.e. | exact | s to 1 % on g_ββ | clusters/sweep |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in mc:
        flag = " (short run: lower bound)" if r["warned"] else ""
        L.append(
            f"| {r['L']} | {r['method']} | {r['h']:g} | {r['sweeps']} | {r['sweeps_per_s']:.0f} | "
            f"{r['tau_E']:.3g} / {r['tau_absM']:.3g} / {r['tau_gbb']:.3g}{flag} | {r['eff_E']:.3g} / "
            f"{r['eff_absM']:.3g} / {r['eff_gbb']:.3g} | {r['g_bb']:.4g} ± {r['se']:.2g} | {_fmt(r['exact'], '.4g')} | "
            f"{r['t_1pct']:.3g} | {_fmt(r['clusters'], '.0f') if r['clusters'] is not None else '—'} |"
        )
    L += [
        "",
        '"s to 1 % on g_ββ" is the wall time the run would need for a 1 % (block-jackknife) standard error of g_ββ, '
        "wall × (s.e. / 0.01 g_ββ)²: unlike the τ-based columns it needs no window estimate. "
        "Exact timings are medians after a warm-up (one call for L ≥ 9). A Wolff sweep flips a fixed number of "
        "clusters holding about N sites in all; a Metropolis sweep updates every site once.",
        "",
    ]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L ≤ 6 exact, L = 16 Monte Carlo, short runs")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if a.quick:
        exact = bench_exact([2, 3, 4, 5, 6], 5, 2)
        torus = bench_torus([4, 64], 3)
        mc = bench_monte_carlo([(16, "wolff", 0.0, 300), (16, "metropolis", 0.0, 600), (16, "wolff", 0.05, 300)])
    else:
        exact = bench_exact(list(range(2, 11)), 8, 5)
        torus = bench_torus([4, 16, 64, 256, 1024], 7)
        mc = bench_monte_carlo(
            [
                (32, "wolff", 0.0, 4000),
                (32, "metropolis", 0.0, 20000),
                (64, "wolff", 0.0, 4000),
                (64, "metropolis", 0.0, 20000),
                (32, "wolff", 0.05, 4000),
            ]
        )
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = report(exact, torus, mc, a.threads, load0, load1)
    print(text)
    if not a.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
