"""Overhead of ``fl.Monitor`` on a training step: each observable alone, recorded every step.

Run with the project's environment (no peers needed)::

    .venv/bin/python benchmarks/bench_monitor.py [--quick] [--repeats R] [--steps S] [--threads T]
        [--clock wall|cpu] [--stat median|min] [--configs NAME ...] [--hidden H] [--batch B]

Workload: MLP 784-128-128-10 (ReLU, P = 118,282; ``--hidden H`` for 784-H-H-10), float32, batch 128 (``--batch``) of
random MNIST-sized inputs, Adam, softmax cross-entropy, ``torch.set_num_threads(2)``. The unmonitored step is
``forward, loss, zero_grad, backward, optimizer.step()``; a monitored step adds ``mon.step(loss=..., outputs=...,
targets=...)`` with one observable, ``every=1``. Probe observables use a probe of 128 inputs (one batch). Each
configuration is timed in blocks of ``S`` steps, interleaved with blocks of unmonitored steps on its own model; the
ratio is the median (``--stat min``: the minimum) of the monitored blocks over that of the unmonitored blocks, ``R``
repeats. On a shared machine ``--threads 1 --clock cpu --stat min`` (process CPU time) is the least disturbed by
other jobs. Hand-written alternatives (``alt_*``, not library code) time the designs the monitor does not use and
(``alt_ghost``) a minimal version of the one it uses.
The table is printed and written to
``benchmarks/results/monitor.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fisherlens as fl

HERE = Path(__file__).resolve().parent
#: the clock of every timing: wall time (default) or this process's CPU time (``--clock cpu``, robust to other
#: jobs on a shared machine when used with one thread)
CLOCK = [time.perf_counter]
STAT = {"median": statistics.median, "min": min}
RESULTS = HERE / "results" / "monitor.md"
N_BATCH = 128
SEED = 0

#: name -> (Monitor keyword arguments or None for "no monitor", description)
CONFIGS: dict[str, tuple[dict | None, str]] = {
    "none": (None, "no monitor (plain training step)"),
    "batch_emp": (dict(observables=("batch_fisher_trace",), kind="empirical"),
                  "batch_fisher_trace, empirical, exact (per-sample norms from the training backward)"),
    "batch_hutch": (dict(observables=("batch_fisher_trace",), kind="true", method="hutchinson"),
                    "batch_fisher_trace, true, Hutchinson 1 draw (extra activation-only backward)"),
    "batch_exact": (dict(observables=("batch_fisher_trace",), kind="true", method="exact"),
                    "batch_fisher_trace, true, exact (C = 10 activation-only backward columns)"),
    "loss": (dict(observables=("loss", "accuracy")), "loss + accuracy on the probe"),
    "grad_norm": (dict(observables=("grad_norm",)), "grad_norm on the probe"),
    "fisher_hutch": (dict(observables=("fisher_trace",), method="hutchinson"),
                     "fisher_trace on the probe, true, Hutchinson 1 draw"),
    "fisher_emp": (dict(observables=("fisher_trace",), kind="empirical"), "fisher_trace on the probe, empirical"),
    "fisher_true": (dict(observables=("fisher_trace",)), "fisher_trace on the probe, true, exact"),
    "ntk_trace": (dict(observables=("ntk_trace",)), "ntk_trace on the probe"),
    "relation": (dict(observables=("relation",)), "relation (Fisher-NTK, true) on the probe"),
    "rao_norm": (dict(observables=("rao_norm",)), "rao_norm on the probe"),
    "path_length": (dict(observables=("path_length",)), "path_length on the probe"),
    "top_eigenvalue": (dict(observables=("top_eigenvalue",)), "top_eigenvalue (Lanczos) on the probe"),
}


#: hidden width of the MLP (``--hidden``; the cost model runs wider ones)
HIDDEN = [128]


def make_model() -> nn.Module:
    torch.manual_seed(SEED)
    h = HIDDEN[0]
    return nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)).float()


def batches(n: int, size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g, B = torch.Generator().manual_seed(SEED + 1), size or N_BATCH
    return [(torch.randn(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(n)]


#: hand-written designs (not part of the library): one Hutchinson draw of Σ_n ξ_n·f_n on the training forward,
#: ξ_n = S_n ε_n, reduced to ‖v‖²/B with v = Σ_n J_nᵀ ξ_n (the batch estimator; the two designs the monitor does
#: not use), or to Σ_n ‖J_nᵀ ξ_n‖²/B by ghost norms (``alt_ghost``: the monitor's own design, without its checks).
ALTERNATIVES = {
    "alt_extra_backward": "hand-written: extra full backward of Σ ξ·f through the training graph (retain_graph)",
    "alt_batched_backward": "hand-written: training gradient and ξ column in one backward (is_grads_batched)",
    "alt_ghost": "hand-written floor of the monitor's own design: activation-only backward of ξ to the Linear "
                 "outputs, ghost norms ‖δ_n‖²(‖a_n‖² + 1), one read",
}


def _xi(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    S = fl.Categorical().sqrt_fisher(out.detach())
    eps = torch.randint(0, 2, (out.shape[0], out.shape[1], 1), generator=gen).to(out.dtype) * 2 - 1
    return (S @ eps)[..., 0]


def alt_block(model, opt, data, how: str, gen: torch.Generator) -> float:
    params = list(model.parameters())
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of each Linear call (alt_ghost)
    keep = lambda m, i, o: calls.append((i[0].detach(), o)) if torch.is_grad_enabled() else None  # noqa: E731
    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Linear)] \
        if how == "alt_ghost" else []
    t0 = CLOCK[0]()
    for x, y in data:
        calls.clear()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        xi = _xi(out, gen)
        if how == "alt_ghost":  # Σ_n ‖J_nᵀ ξ_n‖² from the layers' output gradients and inputs (the monitor's design)
            d = torch.autograd.grad(out, [o for _, o in calls], xi, retain_graph=True)
            total = sum(torch.linalg.vecdot(g, g) * (torch.linalg.vecdot(a, a) + 1)
                        for (a, _), g in zip(calls, d, strict=True)).sum()
            loss.backward()
        elif how == "alt_extra_backward":
            v = torch.autograd.grad(out, params, xi, retain_graph=True)
            total = sum(t.square().sum() for t in v)
            loss.backward()
        else:  # one backward, two cotangents at the outputs: ∂loss/∂f and ξ
            u = torch.autograd.grad(loss, out, retain_graph=True)[0]
            g = torch.autograd.grad(out, params, torch.stack([u, xi]), is_grads_batched=True)
            for p, gp in zip(params, g, strict=True):
                p.grad = gp[0]
            total = sum(gp[1].square().sum() for gp in g)
        _ = total.item() / len(x)
        opt.step()
    elapsed = CLOCK[0]() - t0
    for h in hooks:
        h.remove()
    return elapsed / len(data)


def time_block(model, opt, mon, data) -> float:
    """Seconds per step over a block of steps."""
    t0 = CLOCK[0]()
    for x, y in data:
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(loss=loss, outputs=out, targets=y)
    return (CLOCK[0]() - t0) / len(data)


def bench(name: str, repeats: int, steps: int, data, probe, stat=statistics.median) -> tuple[float, float, float]:
    """(median monitored s/step, median unmonitored s/step, ratio) for one configuration."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if name in ALTERNATIVES:
        gen = torch.Generator().manual_seed(SEED)
        alt_block(model, opt, data[:3], name, gen)
        mine, base = [], []
        for _ in range(repeats):
            base.append(time_block(model, opt, None, data[:steps]))
            mine.append(alt_block(model, opt, data[:steps], name, gen))
        m, b = stat(mine), stat(base)
        return m, b, m / b
    kw, _ = CONFIGS[name]
    mon = None if kw is None else fl.Monitor(model, fl.Categorical(), probe, every=1, **kw)
    time_block(model, opt, mon, data[:3])  # warm up (the layerwise plan is verified once)
    time_block(model, opt, None, data[:3])
    mine, base = [], []
    for _ in range(repeats):
        base.append(time_block(model, opt, None, data[:steps]))
        mine.append(time_block(model, opt, mon, data[:steps]))
    if mon is not None:
        mon.close()
    m, b = stat(mine), stat(base)
    return m, b, m / b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats of 5 steps")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP (cost model)")
    ap.add_argument("--batch", type=int, default=N_BATCH, help="training batch size (cost model)")
    names = [*CONFIGS, *ALTERNATIVES]
    ap.add_argument("--configs", nargs="*", default=names, choices=names)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or process CPU time (with --threads 1: robust on a shared machine)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic over the repeats (min: less sensitive to other jobs on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (5 if args.quick else 20)
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.perf_counter if args.clock == "wall" else time.process_time
    HIDDEN[0] = args.hidden
    data = batches(max(steps, 3), args.batch)
    probe = batches(1)[0]
    rows = []
    for name in args.configs:
        m, b, r = bench(name, repeats, steps, data, probe, STAT[args.stat])
        rows.append((name, CONFIGS[name][1] if name in CONFIGS else ALTERNATIVES[name], m, b, r))
        print(f"{name:16s} {m * 1e3:8.2f} ms/step  (unmonitored {b * 1e3:6.2f})  ratio {r:6.2f}", flush=True)
    lines = [
        f"Monitor overhead: MLP 784-{args.hidden}-{args.hidden}-10, batch {args.batch}, Adam, float32, "
        f"{args.threads} threads, "
        f"probe 128 inputs, every step; {args.stat} of {repeats} blocks of {steps} steps, {args.clock} clock. "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}.",
        "",
        "| observable (every step) | ms / step | unmonitored ms / step | ratio |",
        "|---|---|---|---|",
        *(f"| {desc} | {m * 1e3:.2f} | {b * 1e3:.2f} | {r:.2f}x |" for _, desc, m, b, r in rows),
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
