"""The scalable-Fisher table on a GPU: one-draw Hutchinson, exact diagonal, Fisher–vector product and the top
eigenvalue, as ratios to one forward+backward pass of the same batch, in float32 and under bfloat16 autocast.

Run on a machine with CUDA (any environment with fisherlens and torch; the peers are benchmarked on the CPU by
``bench_scalable.py``)::

    python benchmarks/gpu.py                  # every workload on cuda, writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --device cpu --quick   # smoke test of this script where no GPU is present

Times are CUDA-event times of the median of ``--repeats`` calls after warm-up (``torch.cuda.synchronize`` around
each), method and baseline interleaved; memory is ``torch.cuda.max_memory_allocated`` during one call above the
allocation before it (the model, the batch), in P-vectors (P float32 numbers) and relative to the training step's
peak.  Without CUDA and without ``--device cpu`` the script says so and exits with status 0 (nothing measured).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_exact import make_workload

import fisherlens as fl

HERE = Path(__file__).resolve().parent
WORKLOADS = ("mlp", "cnn", "resnet18", "transformer")


def methods(model, X, Y, device: torch.device) -> dict:
    """name -> zero-argument callable, each one call of the measured method on ``(X, Y)``."""
    lik, data = fl.Categorical(), (X, Y)
    gen = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(sum(p.numel() for p in model.parameters()), device=device, generator=gen)
    op = fl.fisher_operator(model, data, lik)
    op @ v  # noqa: B018 - a warm operator: the products after the first

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), Y).backward()

    def autocast(fn):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn()
        return run

    hutch = lambda: fl.fisher_diag(model, data, lik, method="hutchinson", samples=1, generator=gen)  # noqa: E731
    return {
        "fwd+bwd (baseline)": step,
        "fwd+bwd, bf16 autocast": autocast(step),
        "Hutchinson, 1 draw (diag + trace)": hutch,
        "Hutchinson, 1 draw, bf16 autocast": autocast(hutch),
        "exact true-Fisher diagonal": lambda: fl.fisher_diag(model, data, lik),
        "Fisher–vector product (warm operator)": lambda: op @ v,
        "top eigenvalue (Lanczos, tol 1e-3)": lambda: fl.eigenvalues(model, data, lik, k=1, method="lanczos",
                                                                    tol=1e-3),
    }


def timed(fn, device: torch.device) -> float:
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def peak_bytes(fn, device: torch.device) -> float:
    """Peak allocation above the level before one call (CUDA only; NaN elsewhere)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def measure(name: str, device: torch.device, repeats: int) -> list[dict]:
    model, X, Y = make_workload(name)
    model, X, Y = model.to(device), X.to(device), Y.to(device)
    P = sum(p.numel() for p in model.parameters())
    runs = methods(model, X, Y, device)
    base = runs["fwd+bwd (baseline)"]
    rows = []
    base_peak = peak_bytes(base, device)
    for label, fn in runs.items():
        for _ in range(2):  # warm-up (kernels, the engine's per-model plan)
            fn()
            base()
        t_m, t_b = [], []
        for _ in range(repeats):
            t_m.append(timed(fn, device))
            t_b.append(timed(base, device))
        peak = peak_bytes(fn, device)
        rows.append({"workload": name, "P": P, "method": label, "seconds": statistics.median(t_m),
                     "ratio": statistics.median(t_m) / statistics.median(t_b),
                     "peak_pvec": peak / (4 * P), "peak_vs_step": peak / base_peak if base_peak else float("nan")})
    return rows


def table(rows: list[dict], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (smoke test)"
    lines = [f"# Scalable Fisher on {name}", "",
             f"torch {torch.__version__}, fisherlens {fl.__version__}; ratio = median time / median time of one "
             "float32 forward+backward of the same batch, interleaved; peak = allocation above the model and batch "
             "during one call.", "",
             "| workload | P | method | time | × fwd+bwd | peak (P-vectors) | peak / step's |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['P']:,} | {r['method']} | {r['seconds'] * 1e3:.2f} ms | "
                     f"{r['ratio']:.2f}× | {r['peak_pvec']:.1f} | {r['peak_vs_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="the MLP only, 2 repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device visible to torch; nothing measured (use --device cpu for a smoke test).")
        return 0
    workloads = ["mlp"] if args.quick else args.workloads
    repeats = args.repeats or (2 if args.quick else 10)
    rows = [r for w in workloads for r in measure(w, device, repeats)]
    text = table(rows, device)
    print(text)
    if device.type == "cuda":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
