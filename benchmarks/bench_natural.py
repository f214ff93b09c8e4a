"""Natural-gradient benchmark: the cost of one natural-gradient step against one SGD step, on CPU (issue 15).

Run with the peers' virtual environment (see ``benchmarks/run.sh``)::

    benchmarks/.venv-peers/bin/python benchmarks/bench_natural.py [--quick] [--repeats R] [--json PATH]

Workload: MLP 784-128-128-10 (ReLU, P = 118,282), float32, ``torch.set_num_threads(2)``, ``fl.Categorical()``,
random inputs and labels (10 classes) and an untrained model from a fixed seed; batch 32 and 128 for the main
table.  The time unit is one plain SGD step, ``zero_grad``, ``F.cross_entropy(model(X), Y).backward()``,
``torch.optim.SGD.step()``.  Measured against it:

* ``fl.optim.NaturalGradient`` steps (``opt.step((X, Y))``, the optimizer computing the gradient from the batch),
  ``solver="gram"`` and ``"cg"``, ``kind="true"`` and ``"empirical"``;
* ``fl.natural_gradient`` alone (the direction ``(F + λI)⁻¹ g``, gradient included, no update);
* curvlinops' K-FAC as the comparable approximate step: ``KFACLinearOperator`` built on the batch + one product
  with ``KFACInverseLinearOperator`` (the gradient by one extra forward+backward), whose direction is compared with
  the exact one (cosine, norm ratio, relative error, residual in the exact damped system);
* the Gram/CG crossover: ``fl.natural_gradient`` with both solvers over batch sizes 1 … 512.

Every (batch, method) pair runs in a fresh subprocess (``--worker``, the harness of ``bench_exact.py``) that
measures the resident-set growth of the FIRST call, warms up, then times the method and the SGD step interleaved.
The parent computes the exact directions (float64 copy of the model, ``solver="gram"``, residual ~1e-13), prints a
markdown table (also written to ``--out``) and writes every number to ``--json``.  Importing this module runs
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_exact import (
    harness_args,
    measure_peak,
    spawn,
    time_interleaved,
    versions,
    wait_quiet,
    worker_main,
)
from bench_scalable import STABLE_MALLOC
from torch import nn

THREADS = 2
SEED = 0
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "natural.md"
RESULTS_JSON = HERE / "results" / "natural.json"
DEFAULT = {"hidden": 128, "batches": [32, 128], "cross": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]}
QUICK = {"hidden": 32, "batches": [8, 16], "cross": [8, 16, 32]}
DAMPING, LR = 1e-3, 0.1
#: a worker whose first call takes longer than this many seconds is timed with 1 warm-up call and ≤ 3 repeats
SLOW_S = 10.0


# --------------------------------------------------------------------------- the workload


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def make_workload(batch: int, hidden: int):
    """Model (float32, eval mode) and a batch ``(X, Y)``, identical in every process."""
    torch.manual_seed(SEED)
    model = make_model(hidden)
    X = torch.randn(batch, 784)
    Y = torch.randint(0, 10, (batch,))
    return model.float().eval(), X, Y


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# --------------------------------------------------------------------------- methods
#
# A factory gets (model, X, Y, opts) and returns a zero-argument callable returning a dict: "direction" (the flat
# (F + λI)⁻¹ g, named_parameters() order), "grad" (flat g) and, for fisherlens, "solver", "residual",
# "iterations", "converged".  Imports and set-up (optimizer construction) happen in the factory, untimed.


def m_sgd_step(model, X, Y, opts):
    """The time unit: one plain SGD training step."""
    opt = torch.optim.SGD(model.parameters(), lr=opts["lr"])

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), Y).backward()
        opt.step()
        return {}

    return run


def _direction(d) -> dict:
    return {"direction": d.flat.detach().clone(), "grad": flat(d.grad.values()), "solver": d.solver,
            "residual": float(d.residual), "iterations": int(d.iterations), "converged": bool(d.converged)}


def _ngd_step(solver: str, kind: str):
    """``fl.optim.NaturalGradient(...).step((X, Y))``; the parameters are put back to θ₀ before each step (one
    P-float copy, timed), so that every step solves the same system."""

    def factory(model, X, Y, opts):
        import fisherlens as fl

        opt = fl.optim.NaturalGradient(model.parameters(), model, fl.Categorical(), lr=opts["lr"],
                                       damping=opts["damping"], kind=kind, solver=solver)
        theta0 = [p.detach().clone() for p in model.parameters()]

        def run():
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), theta0, strict=True):
                    p.copy_(p0)
            opt.zero_grad(set_to_none=True)  # no .grad: the optimizer computes g from the batch
            opt.step((X, Y))
            return _direction(opt.last["direction"])

        return run

    return factory


def _natural(solver: str, kind: str):
    """``fl.natural_gradient(model, (X, Y), fl.Categorical(), damping=λ, kind=..., solver=...)``."""

    def factory(model, X, Y, opts):
        import fisherlens as fl

        def run():
            return _direction(fl.natural_gradient(model, (X, Y), fl.Categorical(), damping=opts["damping"],
                                                  kind=kind, solver=solver))

        return run

    return factory


def _kfac(fisher_type: str, damping_mode: str):
    """curvlinops: the mean cross-entropy gradient (one forward+backward), ``KFACLinearOperator`` built on the batch
    (``fisher_type``; its Kronecker factors computed by the first product) and one product with
    ``KFACInverseLinearOperator``: ``damping_mode="exact"`` inverts ``A ⊗ B + λI`` (eigendecompositions of the
    factors, the same damping as ours), ``"heuristic"`` ``(A + π√λ I) ⊗ (B + √λ/π I)`` (Martens & Grosse 2015,
    §6.3, Cholesky)."""

    def factory(model, X, Y, opts):
        import curvlinops

        params = [p for p in model.parameters() if p.requires_grad]
        lam = opts["damping"]
        inv_kwargs = ({"use_exact_damping": True} if damping_mode == "exact" else {"use_heuristic_damping": True})

        def run():
            g = flat(torch.autograd.grad(F.cross_entropy(model(X), Y), params))
            kfac = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, Y)],
                                                 check_deterministic=False, fisher_type=fisher_type,
                                                 num_per_example_loss_terms=1)
            inv = curvlinops.KFACInverseLinearOperator(kfac, damping=lam, **inv_kwargs)
            return {"direction": (inv @ g).detach(), "grad": g}

        return run

    return factory


# key -> (label, computes, factory, Fisher kind of the direction or None)
METHODS = {
    "sgd_step": ("SGD step (zero_grad, cross-entropy backward, torch.optim.SGD.step)", "baseline", m_sgd_step, None),
    "ngd_gram_true": ("ours NaturalGradient(solver='gram', kind='true').step", "exact NGD step, true F",
                      _ngd_step("gram", "true"), "true"),
    "ngd_cg_true": ("ours NaturalGradient(solver='cg', kind='true').step", "exact NGD step (CG), true F",
                    _ngd_step("cg", "true"), "true"),
    "ngd_gram_emp": ("ours NaturalGradient(solver='gram', kind='empirical').step", "exact NGD step, empirical F",
                     _ngd_step("gram", "empirical"), "empirical"),
    "ngd_cg_emp": ("ours NaturalGradient(solver='cg', kind='empirical').step", "exact NGD step (CG), empirical F",
                   _ngd_step("cg", "empirical"), "empirical"),
    "nat_gram_true": ("ours natural_gradient(solver='gram', kind='true')", "direction (+ g), true F",
                      _natural("gram", "true"), "true"),
    "nat_cg_true": ("ours natural_gradient(solver='cg', kind='true')", "direction (+ g), true F",
                    _natural("cg", "true"), "true"),
    "nat_gram_emp": ("ours natural_gradient(solver='gram', kind='empirical')", "direction (+ g), empirical F",
                     _natural("gram", "empirical"), "empirical"),
    "nat_cg_emp": ("ours natural_gradient(solver='cg', kind='empirical')", "direction (+ g), empirical F",
                   _natural("cg", "empirical"), "empirical"),
    "kfac_type2": ("curvlinops KFAC(fisher_type='type-2') + KFACInverse(exact damping) @ g",
                   "K-FAC direction (+ g), true F", _kfac("type-2", "exact"), "true"),
    "kfac_mc": ("curvlinops KFAC(fisher_type='mc', 1 sample) + KFACInverse(exact damping) @ g",
                "K-FAC direction (+ g), MC F", _kfac("mc", "exact"), "true"),
    "kfac_emp": ("curvlinops KFAC(fisher_type='empirical') + KFACInverse(exact damping) @ g",
                 "K-FAC direction (+ g), empirical F", _kfac("empirical", "exact"), "empirical"),
    "kfac_type2_heur": ("curvlinops KFAC(fisher_type='type-2') + KFACInverse(heuristic damping) @ g",
                        "K-FAC direction (+ g), true F, factor damping", _kfac("type-2", "heuristic"), "true"),
}
CROSS_METHODS = ["nat_gram_true", "nat_cg_true", "nat_gram_emp", "nat_cg_emp"]


# --------------------------------------------------------------------------- worker side


def worker(workload: str, method: str, opts: dict, out_path: str) -> dict:
    torch.set_num_threads(THREADS)
    batch = int(workload.removeprefix("b"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        model, X, Y = make_workload(batch, opts["hidden"])
        run = METHODS[method][2](model, X, Y, opts)
        t0 = time.perf_counter()
        result, mem_mib, mem_how = measure_peak(run)
        first_s = time.perf_counter() - t0
        base = m_sgd_step(*make_workload(batch, opts["hidden"]), opts)
        slow = first_s > SLOW_S
        warmup, repeats = (1, min(opts["repeats"], 3)) if slow else (opts["warmup"], opts["repeats"])
        for _ in range(warmup):
            run()
            base()
        t_m, t_b = time_interleaved(run, base, {"repeats": repeats})
    torch.save(result, out_path)
    return {"time_s": statistics.median(t_m), "base_s": statistics.median(t_b), "time_min": min(t_m),
            "base_min": min(t_b), "time_all": t_m, "base_all": t_b, "first_s": first_s, "mem_mib": mem_mib,
            "mem_how": mem_how, "warmup": warmup, "repeats": repeats,
            "warnings": sorted({str(w.message)[:300] for w in caught
                                if not issubclass(w.category, (DeprecationWarning, FutureWarning))})}


# --------------------------------------------------------------------------- references (parent)


def reference(batch: int, hidden: int, damping: float, kinds) -> dict:
    """Per kind: the exact direction ``d* = (F + λI)⁻¹ g`` of a float64 copy of the model (``solver="gram"``,
    float64 tolerance), its ``g`` and a float64 ``F + λI`` product for the residual of any direction."""
    import fisherlens as fl

    torch.set_num_threads(THREADS)
    model, X, Y = make_workload(batch, hidden)
    model = model.double()
    X = X.double()
    out = {}
    for kind in kinds:
        t0 = time.perf_counter()
        d = fl.natural_gradient(model, (X, Y), fl.Categorical(), damping=damping, kind=kind, solver="gram")
        op = fl.fisher_operator(model, (X, Y), fl.Categorical(), kind=kind)
        out[kind] = {"direction": d.flat, "grad": flat(d.grad.values()), "residual": float(d.residual),
                     "op": op, "seconds": time.perf_counter() - t0}
    return out


def agreement(result: dict, ref: dict, damping: float) -> dict:
    """Cosine with ``d*``, ``‖d‖ / ‖d*‖``, ``‖d − d*‖ / ‖d*‖`` and the residual ``‖(F + λI) d − g‖ / ‖g‖`` in the
    exact float64 system."""
    d, r = result["direction"].double(), ref["direction"]
    g = ref["grad"]
    Ad = ref["op"].matvec(d) + damping * d
    return {"cos": float(d @ r / (d.norm() * r.norm())), "norm_ratio": float(d.norm() / r.norm()),
            "rel_err": float((d - r).norm() / r.norm()), "residual_exact": float((Ad - g).norm() / g.norm()),
            "grad_rel_err": float((result["grad"].double() - g).norm() / g.norm())}


# --------------------------------------------------------------------------- parent side


def jobs(cfg: dict, methods: list[str]) -> list[tuple[int, str]]:
    """``(batch, method)`` pairs: every method at the main batch sizes, the crossover methods at the others."""
    out = [(b, m) for b in cfg["batches"] for m in methods]
    out += [(b, m) for b in cfg["cross"] if b not in cfg["batches"] for m in CROSS_METHODS if m in methods]
    return out


def run_all(todo, opts: dict, args, tmpdir: str) -> tuple[dict, dict]:
    payloads, results = {}, {}
    for b, m in todo:
        busy = wait_quiet(args.wait_idle)
        t0 = time.perf_counter()
        payload, result, err = spawn(f"b{b}", m, opts, tmpdir, args.timeout, script=__file__, threads=THREADS,
                                     env=STABLE_MALLOC if opts["malloc"] == "stable" else None)
        payloads[(b, m)] = {"error": err, "busy": busy} if err else {**payload, "busy": busy}
        if err is None:
            results[(b, m)] = result
        print(f"  b{b:<4} {m:<16} {time.perf_counter() - t0:6.1f}s  "
              + (err or f"{payload['time_s'] / payload['base_s']:.1f}x"), flush=True)
    return payloads, results


def summarise(payloads: dict, results: dict, refs: dict, damping: float) -> dict:
    """``{batch: {method: row}}`` with the numbers of the tables and the JSON."""
    rows: dict = {}
    for (b, m), pl in payloads.items():
        label, computes, _, kind = METHODS[m]
        row = {"label": label, "computes": computes, "kind": kind, "busy": pl["busy"]}
        if pl.get("error"):
            rows.setdefault(b, {})[m] = {**row, "error": pl["error"]}
            continue
        res = results[(b, m)]
        row.update(ratio=pl["time_s"] / pl["base_s"], ratio_min=pl["time_min"] / pl["base_min"],
                   time_ms=pl["time_s"] * 1e3, base_ms=pl["base_s"] * 1e3, first_ms=pl["first_s"] * 1e3,
                   rss_mib=pl["mem_mib"], rss_how=pl["mem_how"], repeats=pl["repeats"], warmup=pl["warmup"],
                   warnings=pl["warnings"])
        for key in ("solver", "residual", "iterations", "converged"):
            if key in res:
                row[key] = res[key]
        if kind is not None and kind in refs.get(b, {}):
            row["agreement"] = agreement(res, refs[b][kind], damping)
        rows.setdefault(b, {})[m] = row
    return rows


def crossover(rows: dict, results: dict, batches: list[int]) -> dict:
    """Per kind: gram vs CG time of ``fl.natural_gradient`` per batch size and where CG becomes faster."""
    out = {}
    for kind, (gm, cm) in {"true": ("nat_gram_true", "nat_cg_true"),
                           "empirical": ("nat_gram_emp", "nat_cg_emp")}.items():
        points = []
        for b in batches:
            g, c = rows.get(b, {}).get(gm), rows.get(b, {}).get(cm)
            if not g or not c or "error" in g or "error" in c:
                continue
            dg, dc = results[(b, gm)]["direction"].double(), results[(b, cm)]["direction"].double()
            points.append({"batch": b, "NK": b * (10 if kind == "true" else 1), "gram_ms": g["time_ms"],
                           "cg_ms": c["time_ms"], "gram_ratio": g["ratio"], "cg_ratio": c["ratio"],
                           # each time is divided by its own worker's interleaved SGD step: robust to load drift
                           "cg_over_gram": c["ratio"] / g["ratio"], "cg_iterations": c["iterations"],
                           "cg_residual": c["residual"], "cg_converged": c["converged"],
                           "gram_residual": g["residual"],
                           "cos_cg_gram": float(dg @ dc / (dg.norm() * dc.norm())),
                           "busy": max(g["busy"], c["busy"])})
        faster = [p["batch"] for p in points if p["cg_over_gram"] < 1]
        # the crossover: the smallest batch from which on CG is faster at every larger batch measured
        from_b = None
        for p in reversed(points):
            if p["cg_over_gram"] < 1:
                from_b = p["batch"]
            else:
                break
        if not points:
            verdict = "no data"
        elif from_b is None:
            verdict = "Gram faster at every batch size measured"
        elif from_b == points[0]["batch"]:
            verdict = f"CG faster at every batch size measured (from {from_b}; the crossover lies below)"
        else:
            verdict = f"CG faster from batch {from_b} on (N·K = {from_b * (10 if kind == 'true' else 1)})"
        out[kind] = {"points": points, "cg_faster_at": faster, "cg_faster_from": from_b, "verdict": verdict}
    return out


def _fmt_agree(a: dict | None) -> str:
    if not a:
        return "—"
    return (f"cos {a['cos']:.6f}; ‖d‖/‖d*‖ {a['norm_ratio']:.4f}; rel. err {a['rel_err']:.1e}; "
            f"exact-system residual {a['residual_exact']:.1e}")


def _fmt_solver(r: dict) -> str:
    if "solver" not in r:
        return "—"
    what = "CG iterations" if r["solver"] == "cg" else "refinement steps"
    ok = "" if r["converged"] else ", NOT converged"
    return f"{r['solver']}: {r['iterations']} {what}, residual {r['residual']:.1e}{ok}"


def main_table(rows: dict, batches: list[int]) -> list[str]:
    header = ["batch", "method", "computes", "time / SGD step (min/min)", "time (ms)", "ΔRSS 1st call (MiB)",
              "solver", "agreement with the exact direction d*"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in batches:
        for r in rows.get(b, {}).values():
            if "error" in r:
                cells = [str(b), r["label"], r["computes"], r["error"]] + ["—"] * 4
            else:
                flag = " †" if r["busy"] > 0.15 else ""
                cells = [str(b), r["label"], r["computes"], f"{r['ratio']:.1f} ({r['ratio_min']:.1f}){flag}",
                         f"{r['time_ms']:.2f}", f"{r['rss_mib']:.1f}", _fmt_solver(r), _fmt_agree(r.get("agreement"))]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def cross_table(cross: dict) -> list[str]:
    lines = []
    for kind, c in cross.items():
        lines += ["", f"**Gram vs CG, `fl.natural_gradient(kind='{kind}')`**: {c['verdict']}"]
        if not c["points"]:
            continue
        lines += ["",
                  "| batch | N·K | gram (ms, / SGD) | CG (ms, / SGD) | CG / gram (of the / SGD ratios) | "
                  "CG iterations | CG residual | gram residual | cos(CG, gram) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in c["points"]:
            flag = " †" if p["busy"] > 0.15 else ""
            lines.append(f"| {p['batch']} | {p['NK']} | {p['gram_ms']:.1f} ({p['gram_ratio']:.0f}×) | {p['cg_ms']:.1f} "
                         f"({p['cg_ratio']:.0f}×) | {p['cg_over_gram']:.2f}{flag} | {p['cg_iterations']} | "
                         f"{p['cg_residual']:.1e}{'' if p['cg_converged'] else ' (not converged)'} | "
                         f"{p['gram_residual']:.1e} | {p['cos_cg_gram']:.6f} |")
    return lines


def report(rows: dict, cross: dict, refs: dict, cfg: dict, opts: dict, P: int) -> str:
    lines = [
        "# Natural-gradient step benchmark (CPU)",
        "",
        f"- model: MLP 784-{cfg['hidden']}-{cfg['hidden']}-10 (ReLU), P = {P:,}, float32, `fl.Categorical()`, random "
        f"inputs / labels from seed {SEED}; damping λ = {opts['damping']:g}, lr {opts['lr']:g}",
        f"- `torch.set_num_threads({THREADS})`, {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"logical CPUs; {versions()}",
        f"- time: median of {opts['repeats']} repeats after {opts['warmup']} warm-up call(s) (workers whose first "
        f"call took > {SLOW_S:g} s: ≤ 3 repeats after 1), divided by the median of one SGD step (`zero_grad`, "
        "`F.cross_entropy(model(X), Y).backward()`, `torch.optim.SGD.step()`) timed interleaved in the same "
        "process; in parentheses min / min",
        "- NaturalGradient rows: `opt.step((X, Y))` with no `.grad` set (the optimizer computes g from the batch), "
        "the parameters reset to θ₀ before each step; natural_gradient rows: the direction only (g included); K-FAC "
        "rows: g by one forward+backward, `KFACLinearOperator(model, CrossEntropyLoss(), params, [(X, Y)], "
        "fisher_type=...)` built on the batch and one `KFACInverseLinearOperator(kfac, damping=λ, ...) @ g`",
        "- d*: the exact `(F + λI)⁻¹ g` of a float64 copy of the model (`solver='gram'`); exact-system residual: "
        "`‖(F + λI) d − g‖ / ‖g‖` in float64 with the Fisher of the row's kind (true for `type-2`/`mc` K-FAC)",
    ]
    for b, per_kind in refs.items():
        lines.append(f"- batch {b}: " + "; ".join(f"d* ({k}) residual {v['residual']:.1e}, ‖d*‖ "
                                                   f"{float(v['direction'].norm()):.4g}, {v['seconds']:.1f} s"
                                                   for k, v in per_kind.items()))
    base = [r["base_ms"] for per in rows.values() for r in per.values() if "base_ms" in r]
    if base:
        lines.append(f"- SGD step: per-worker medians {min(base):.2f}–{max(base):.2f} ms")
    lines += [""] + main_table(rows, cfg["batches"]) + cross_table(cross)
    warned = sorted({(m, w) for per in rows.values() for m, r in per.items() for w in r.get("warnings", [])})
    if warned:
        lines += ["", "**Warnings raised**", ""] + [f"- {m}: {w}" for m, w in warned]
    busy = [r["busy"] for per in rows.values() for r in per.values() if r["busy"] > 0.15]
    if busy:
        lines += ["", f"† {len(busy)} measurement(s) started while other processes kept the CPUs busy (> 15 %, max "
                  f"{max(busy):.0%}); their times are not reliable — re-run on an idle machine."]
    return "\n".join(lines) + "\n"


def _jsonable(rows: dict, cross: dict, refs: dict, cfg: dict, opts: dict, P: int) -> dict:
    return {"config": cfg, "P": P, "threads": THREADS, "versions": versions(), "damping": opts["damping"],
            "lr": opts["lr"], "repeats": opts["repeats"], "warmup": opts["warmup"],
            "references": {str(b): {k: {"residual": v["residual"], "norm": float(v["direction"].norm()),
                                        "seconds": v["seconds"]} for k, v in per.items()} for b, per in refs.items()},
            "methods": {str(b): per for b, per in rows.items()}, "crossover": cross}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: hidden 32, batches 8 16, crossover 8 16 32, 3 repeats, no idle wait")
    ap.add_argument("--hidden", type=int, help="hidden width (128)")
    ap.add_argument("--batches", type=int, nargs="*", help="batch sizes of the main table (32 128)")
    ap.add_argument("--cross", type=int, nargs="*", help="batch sizes of the Gram/CG crossover (1 2 4 … 512)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--damping", type=float, default=DAMPING, help="λ (1e-3, fisherlens' default)")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 exact directions (no agreement)")
    harness_args(ap, out=RESULTS, json=RESULTS_JSON, timeout=1800.0, wait_idle=None,
                 wait_note=" (default 300; 0 with --quick)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return worker_main(args, worker)
    if "sgd_step" not in args.methods:
        args.methods.insert(0, "sgd_step")  # the unit is timed in every worker; this row shows the noise level
    cfg = {**DEFAULT, **(QUICK if args.quick else {})}
    for key in ("hidden", "batches", "cross"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 300.0
    opts = {"hidden": cfg["hidden"], "damping": args.damping, "lr": args.lr,
            "repeats": args.repeats or (3 if args.quick else 7), "warmup": 1 if args.quick else 2,
            "malloc": args.malloc}
    torch.set_num_threads(THREADS)
    P = sum(p.numel() for p in make_model(cfg["hidden"]).parameters())
    print(f"[natural] {cfg}, P = {P:,}, λ = {args.damping:g}", flush=True)
    refs: dict = {}
    if not args.no_reference:
        kinds = sorted({METHODS[m][3] for m in args.methods if METHODS[m][3]})
        for b in cfg["batches"]:
            refs[b] = reference(b, cfg["hidden"], args.damping, kinds)
            print(f"  reference b{b}: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in refs[b].items()),
                  flush=True)
    with tempfile.TemporaryDirectory(prefix="fisherlens-bench-natural-") as tmpdir:
        payloads, results = run_all(jobs(cfg, args.methods), opts, args, tmpdir)
    rows = summarise(payloads, results, refs, args.damping)
    cross = crossover(rows, results, sorted(set(cfg["cross"])))
    text = report(rows, cross, refs, cfg, opts, P)
    print("\n" + text)
    for path, content in ((args.out, text),
                          (args.json, json.dumps(_jsonable(rows, cross, refs, cfg, opts, P), indent=2) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    print(f"written to {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
