"""Causal-LM benchmark: Fisher diagonals and traces of a GPT-2-shaped transformer on CPU (issue 13).

Run with the peers' virtual environment (see ``benchmarks/run.sh``)::

    benchmarks/.venv-peers/bin/python benchmarks/bench_lm.py [--quick] [--repeats R] [--json PATH]

The model is written here: token ``Embedding`` + learned positions (an ``Embedding`` over ``arange(T)`` expanded to
``(B, T)``) → ``n_layer`` pre-norm blocks (LayerNorm → causal self-attention with ``nn.Linear`` q/k/v/out
projections → LayerNorm → MLP ``d-4d-d`` with tanh-GELU, residual connections, no dropout) → LayerNorm → ``Linear``
head to ``V`` logits ``(B, T, V)``.  Default: 2 layers, d = 256, 4 heads, T = 128, V = 8192, batch 8, float32,
``torch.set_num_threads(2)``; random tokens from a fixed seed, labels = the inputs shifted by one.  Attention is an
explicit masked softmax by default (every autograd mode supports it; ``--attention sdpa`` uses
``F.scaled_dot_product_attention(is_causal=True)``, whose CPU kernel has no forward-mode AD, so curvlinops fails).

Every method runs in a fresh subprocess (``--worker``, the harness of ``bench_exact.py`` / ``bench_scalable.py``)
that measures the resident-set growth of the FIRST call, then the tensor-allocation peak of one WARM call
(``torch.profiler`` memory events), then times the method and one plain training step
(``F.cross_entropy`` mean over tokens, ``loss.backward()``) interleaved, after warm-up.  The parent prints a
markdown table (also written to ``--out``) and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
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
    tensor_peak,
    time_interleaved,
    versions,
    wait_quiet,
    warm_up,
    worker_main,
)
from bench_scalable import STABLE_MALLOC, m_hand_hutch, probe_vector
from torch import nn

THREADS = 2
SEED = 0
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lm.md"
RESULTS_JSON = HERE / "results" / "lm.json"
DEFAULT = {"n_layer": 2, "d": 256, "n_head": 4, "T": 128, "V": 8192, "batch": 8, "attention": "explicit"}
QUICK = {"d": 64, "n_head": 1, "T": 32, "V": 512, "batch": 4}
TARGET_HUTCH, TARGET_EXACT = 1.2, 3.0


# --------------------------------------------------------------------------- the model


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, attention: str):
        super().__init__()
        if d % n_head:
            raise ValueError(f"d = {d} is not a multiple of n_head = {n_head}")
        self.n_head, self.attention = n_head, attention
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.n_head)
            a = a.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            y = a.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, attention: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head, attention)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """GPT-2-shaped causal LM: ids ``(B, T)`` → logits ``(B, T, V)`` (untied head)."""

    def __init__(self, V: int, T: int, d: int, n_layer: int, n_head: int, attention: str = "explicit"):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, n_head, attention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).expand(B, T)  # per-sample ids: the batch stays on axis 0
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class ChannelsFirst(nn.Module):
    """The same model with logits ``(B, V, T)``, the layout ``nn.CrossEntropyLoss`` (and curvlinops) expect."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).transpose(1, 2)


def make_workload(cfg: dict):
    """Model (float32, eval mode) and a batch ``(X, Y)`` of ids ``(B, T)``, identical in every process."""
    torch.manual_seed(SEED)
    model = CausalLM(cfg["V"], cfg["T"], cfg["d"], cfg["n_layer"], cfg["n_head"], cfg["attention"])
    tokens = torch.randint(0, cfg["V"], (cfg["batch"], cfg["T"] + 1))
    return model.float().eval(), tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def n_params(cfg: dict) -> int:
    return sum(p.numel() for p in make_workload(cfg)[0].parameters())


# --------------------------------------------------------------------------- methods
#
# A factory gets (model, X, Y, opts) and returns a zero-argument callable returning a dict ("diag", "trace",
# "fvp", "covered", ...).  Imports and set-up happen in the factory, outside the measurements.


def m_fwd_bwd(model, X, Y, opts):
    """The time and memory unit: one plain training step, cross-entropy mean over the B·T tokens."""

    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X).flatten(0, 1), Y.flatten()).backward()
        return {}

    return run


def _fl(fn_name: str, **kwargs):
    def factory(model, X, Y, opts):
        import fisherlens as fl

        fn = getattr(fl, fn_name)
        extra = {"generator": torch.Generator().manual_seed(0)} if "method" in kwargs else {}

        def run():
            out = fn(model, (X, Y), fl.Categorical(), **kwargs, **extra)
            out = getattr(out, "value", out)  # an Estimate behaves like its value
            return {"diag": out, "trace": float(out.sum())} if torch.is_tensor(out) else {"trace": float(out)}

        return run

    return factory


def m_fl_fvp(model, X, Y, opts):
    import fisherlens as fl

    v = probe_vector(sum(p.numel() for p in model.parameters()))

    def run():  # construction included, as for the curvlinops rows
        return {"fvp": fl.fisher_operator(model, (X, Y), fl.Categorical()) @ v}

    return run


def _per_param(net, attr: str, fn, diag: bool) -> dict:
    """``fn(field)`` per parameter tensor: a flat diagonal in ``named_parameters()`` order (NaN where BackPACK left
    no field) or, with ``diag=False``, the sum of the per-tensor traces; ``missing`` names the tensors left out."""
    parts, missing = [], []
    for n, p in net.named_parameters():
        field = getattr(p, attr, None)
        if field is None:
            missing.append(n)
            if diag:
                parts.append(torch.full((p.numel(),), math.nan))
        else:
            parts.append(fn(field.detach()).reshape(-1))
    if not diag:
        return {"trace": float(sum(float(t.sum()) for t in parts)), "missing": missing}
    d = torch.cat(parts)
    return {"diag": d, "trace": float(d.nansum()), "missing": missing}


def _backpack(ext_name: str, attr: str, fn, diag: bool = True, converter: bool = False, **ext_kwargs):
    """A BackPACK method: one backward of the mean token cross-entropy (flattened to ``(B·T, V)``) under the
    extension; ``fn(field, B, T)`` turns the per-parameter field into our normalisation (per-sequence mean)."""

    def factory(model, X, Y, opts):
        from backpack import backpack, extend, extensions

        net = extend(model, use_converter=converter)
        lossf = extend(nn.CrossEntropyLoss())
        B, T = Y.shape

        def run():
            net.zero_grad(set_to_none=True)
            loss = lossf(net(X).flatten(0, 1), Y.flatten())
            with backpack(getattr(extensions, ext_name)(**ext_kwargs)):
                loss.backward()
            return _per_param(net, attr, lambda f: fn(f, B, T), diag)

        return run

    return factory


# grad_batch[b] = g_b / (B·T) (g_b: gradient of sequence b's summed loss); ours: (1/B) Σ_b g_b²
m_backpack_batch_grad = _backpack("BatchGrad", "grad_batch", lambda f, B, T: f.square().sum(0) * B * T * T)
# batch_l2[b] = ‖g_b / (B·T)‖² per parameter tensor
m_backpack_batch_l2 = _backpack("BatchL2Grad", "batch_l2", lambda f, B, T: f.sum() * B * T * T, diag=False)
# mean over B·T rows of (Jᵀ s)²; ours (per-sequence mean of the sum over positions) is T times that
m_backpack_mc = _backpack("DiagGGNMC", "diag_ggn_mc", lambda f, B, T: f * T, mc_samples=1)
m_backpack_mc_fx = _backpack("DiagGGNMC", "diag_ggn_mc", lambda f, B, T: f * T, converter=True, mc_samples=1)


def _curvlinops_mv(op_name: str, **kwargs):
    """One product of a curvlinops operator (``nn.CrossEntropyLoss()`` mean over tokens), construction included."""

    def factory(model, X, Y, opts):
        import curvlinops

        net = ChannelsFirst(model)
        params = [p for p in model.parameters() if p.requires_grad]
        v = probe_vector(sum(p.numel() for p in params))

        def run():
            op = getattr(curvlinops, op_name)(net, nn.CrossEntropyLoss(), params, [(X, Y)],
                                              check_deterministic=False, **kwargs)
            return {"fvp": op @ v}

        return run

    return factory


# key -> (label, computes, factory)
METHODS = {
    "fwd_bwd": ("fwd+bwd (token cross-entropy mean, loss.backward())", "baseline", m_fwd_bwd),
    "fl_hutch": ("ours fisher_diag(method='hutchinson', samples=1)", "true diag (+ trace), 1 Rademacher draw",
                 _fl("fisher_diag", method="hutchinson", samples=1)),
    "hand_hutch": ("hand-written detach-and-mix (plain autograd)", "true diag (+ trace), 1 Rademacher draw",
                   m_hand_hutch),
    "fl_diag_emp": ("ours fisher_diag(kind='empirical')", "empirical diag, exact",
                    _fl("fisher_diag", kind="empirical")),
    "fl_trace_emp": ("ours fisher_trace(kind='empirical')", "empirical trace, exact",
                     _fl("fisher_trace", kind="empirical")),
    "fl_fvp": ("ours fisher_operator(...) @ v", "true F v (construction included)", m_fl_fvp),
    "backpack_mc": ("BackPACK DiagGGNMC(mc_samples=1), extend(model)", "true diag, 1 MC sample", m_backpack_mc),
    "backpack_mc_fx": ("BackPACK DiagGGNMC(mc_samples=1), extend(model, use_converter=True)",
                       "true diag, 1 MC sample", m_backpack_mc_fx),
    "backpack_batch_grad": ("BackPACK BatchGrad, N T² Σ grad_batch²", "empirical diag, exact",
                            m_backpack_batch_grad),
    "backpack_batch_l2": ("BackPACK BatchL2Grad, N T² Σ batch_l2", "empirical trace, exact", m_backpack_batch_l2),
    "curvlinops_ef_mv": ("curvlinops EFLinearOperator(...) @ v", "per-TOKEN EF v (one product)",
                         _curvlinops_mv("EFLinearOperator")),
    "curvlinops_mc_mv": ("curvlinops FisherMCLinearOperator(mc_samples=1)(...) @ v", "MC Fisher v (one product)",
                         _curvlinops_mv("FisherMCLinearOperator", mc_samples=1)),
    "curvlinops_ggn_mv": ("curvlinops GGNLinearOperator(...) @ v", "true F v / T (one product)",
                          _curvlinops_mv("GGNLinearOperator")),
}

# key -> (method whose result it is compared with, how); "fvp_T": theirs = ours / T (token mean vs sequence mean)
AGREEMENT = {
    "hand_hutch": ("fl_hutch", "diag"),  # the same Rademacher draw (generator seed 0)
    "fl_trace_emp": ("fl_diag_emp", "trace"),
    "backpack_batch_grad": ("fl_diag_emp", "diag"),
    "backpack_batch_l2": ("fl_diag_emp", "trace"),
    "curvlinops_ggn_mv": ("fl_fvp", "fvp_T"),
}


# --------------------------------------------------------------------------- worker side


def _measure(cfg: dict, method: str, opts: dict) -> tuple[dict, dict]:
    model, X, Y = make_workload(cfg)
    run = METHODS[method][2](model, X, Y, opts)
    result, mem_mib, mem_how = measure_peak(run)
    base = m_fwd_bwd(*make_workload(cfg), opts)
    warm_up(run, base, opts)
    _, warm_mib, _ = measure_peak(run)  # malloc_trim first, so the warm call's pages are faulted in again
    tensor_mib = tensor_peak(run)
    t_m, t_b = time_interleaved(run, base, opts)
    payload = {"time_s": statistics.median(t_m), "base_s": statistics.median(t_b), "time_min": min(t_m),
               "base_min": min(t_b), "time_all": t_m, "base_all": t_b, "mem_mib": mem_mib, "mem_how": mem_how,
               "warm_mib": warm_mib, "tensor_mib": tensor_mib}
    return payload, result


def worker(workload: str, method: str, opts: dict, out_path: str) -> dict:
    torch.set_num_threads(THREADS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        payload, result = _measure(opts["cfg"], method, opts)
    payload["warnings"] = sorted({str(w.message)[:300] for w in caught
                                  if not issubclass(w.category, (DeprecationWarning, FutureWarning))})
    torch.save(result, out_path)
    return payload


# --------------------------------------------------------------------------- parent side


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _covered(ref_diag: torch.Tensor, res: dict, sizes: list[tuple[str, int]]) -> torch.Tensor:
    """Mask of the entries whose parameter tensor the method covered (not in ``res["missing"]``)."""
    missing = set(res.get("missing", ()))
    return torch.cat([torch.full((k,), n not in missing) for n, k in sizes]).to(ref_diag.device)


def agreement(m: str, results: dict, T: int, sizes: list[tuple[str, int]]) -> str:
    if m not in AGREEMENT:
        return "—"
    ref_m, how = AGREEMENT[m]
    ref, res = results.get(ref_m), results.get(m)
    if ref is None or res is None:
        return f"n/a: no {ref_m} result"
    if how == "fvp_T":
        ours = ref["fvp"].double() / T
        return f"‖Fv − ours/T‖/‖ours/T‖ {float((res['fvp'].double() - ours).norm() / ours.norm()):.1e}"
    d = ref["diag"].double()
    mask = _covered(d, res, sizes)
    note = "" if bool(mask.all()) else " (covered params)"
    if how == "trace":
        return f"trace rel. err {_rel(res['trace'], float(d[mask].sum())):.1e}{note}"
    e = res["diag"].double()[mask] - d[mask]
    return f"diag rel. L2 err {float(e.norm() / d[mask].norm()):.1e}{note}"


def value_of(result: dict) -> str:
    if "trace" in result:
        s = f"tr {result['trace']:.6g}"
    elif "fvp" in result:
        s = f"‖Fv‖ {float(result['fvp'].norm()):.6g}"
    else:
        return "—"
    if result.get("missing"):
        s += f"; NO field for {len(result['missing'])} tensors ({', '.join(result['missing'][:2])}, …)"
    return s


def run_all(args, opts: dict, tmpdir: str) -> tuple[dict, dict]:
    """Spawn one worker per method; returns ``({method: payload or {"error": ...}}, {method: result})``."""
    payloads, results = {}, {}
    for m in args.methods:
        busy = wait_quiet(args.wait_idle)
        t0 = time.perf_counter()
        payload, result, err = spawn("lm", m, opts, tmpdir, args.timeout, script=__file__, threads=THREADS,
                                     env=STABLE_MALLOC if opts["malloc"] == "stable" else None)
        payloads[m] = {"error": err, "busy": busy} if err else {**payload, "busy": busy}
        if err is None:
            results[m] = result
        print(f"  {m:<22} {time.perf_counter() - t0:6.1f}s  "
              + (err or f"{payload['time_s'] / payload['base_s']:.2f}x"), flush=True)
    return payloads, results


def summarise(payloads: dict, results: dict, cfg: dict) -> dict:
    """Per-method numbers for the table and the JSON."""
    base = payloads.get("fwd_bwd", {})
    sizes = [(n, p.numel()) for n, p in make_workload(cfg)[0].named_parameters()]
    pvec = sum(k for _, k in sizes) * 4 / 2**20
    rows = {}
    for m, pl in payloads.items():
        label, computes, _ = METHODS[m]
        row = {"label": label, "computes": computes, "busy": pl["busy"]}
        if pl.get("error"):
            rows[m] = {**row, "error": pl["error"]}
            continue
        row.update(ratio=pl["time_s"] / pl["base_s"], ratio_min=pl["time_min"] / pl["base_min"],
                   time_ms=pl["time_s"] * 1e3, base_ms=pl["base_s"] * 1e3, rss_mib=pl["mem_mib"],
                   rss_how=pl["mem_how"], rss_warm_mib=pl["warm_mib"], tensor_mib=pl["tensor_mib"],
                   value=value_of(results[m]), warnings=pl["warnings"],
                   agreement=agreement(m, results, cfg["T"], sizes))
        if "error" not in base and "mem_mib" in base:
            for key, field in (("rss", "mem_mib"), ("rss_warm", "warm_mib"), ("tensor", "tensor_mib")):
                row[f"{key}_over_base_pvec"] = (pl[field] - base[field]) / pvec
        rows[m] = row
    return rows


def targets(rows: dict) -> list[dict]:
    out = []
    for m, limit in (("fl_hutch", TARGET_HUTCH), ("fl_diag_emp", TARGET_EXACT), ("fl_trace_emp", TARGET_EXACT)):
        r = rows.get(m, {})
        if "ratio" not in r:
            continue
        out.append({"method": m, "what": "time / fwd+bwd", "value": r["ratio"], "limit": limit,
                    "met": r["ratio"] <= limit})
        for key, what in (("rss_warm", "ΔRSS warm"), ("tensor", "tensor peak warm")):
            if f"{key}_over_base_pvec" in r:
                v = r[f"{key}_over_base_pvec"]
                out.append({"method": m, "what": f"{what} − fwd+bwd's, in P-vectors", "limit": 1.0, "value": v,
                            "met": v <= 1.0})
    return out


def _mem(r: dict, key: str) -> str:
    """``MiB (+excess over fwd+bwd's in P-vectors)``."""
    extra = f" ({r[key + '_over_base_pvec']:+.2f} P)" if key + "_over_base_pvec" in r else ""
    return f"{r[key + '_mib']:.1f}{extra}"


def table(rows: dict) -> list[str]:
    header = ["method", "computes", "time / fwd+bwd (min/min)", "ΔRSS 1st call (MiB)", "ΔRSS warm (MiB)",
              "tensor peak warm (MiB)", "value", "agreement"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows.values():
        if "error" in r:
            cells = [r["label"], r["computes"], r["error"]] + ["—"] * 5
        else:
            flag = " †" if r["busy"] > 0.15 else ""
            cells = [r["label"], r["computes"], f"{r['ratio']:.2f} ({r['ratio_min']:.2f}){flag}", _mem(r, "rss"),
                     _mem(r, "rss_warm"), _mem(r, "tensor"), r["value"], r["agreement"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def header_lines(cfg: dict, P: int, opts: dict) -> list[str]:
    return [
        "# Causal-LM Fisher benchmark (CPU)",
        "",
        f"- model: GPT-2-shaped causal LM, {cfg['n_layer']} layers, d = {cfg['d']}, {cfg['n_head']} heads, "
        f"T = {cfg['T']}, V = {cfg['V']}, batch {cfg['batch']}, attention {cfg['attention']}, float32; "
        f"P = {P:,} parameters, one P-vector (float32) = {P * 4 / 2**20:.2f} MiB",
        f"- `torch.set_num_threads({THREADS})`, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs; {versions()}",
        f"- time: median of {opts['repeats']} repeats after {opts['warmup']} warm-up call(s), divided by the median "
        "of one plain training step (`F.cross_entropy(logits.flatten(0, 1), Y.flatten()).backward()`) timed "
        "interleaved in the same process; in parentheses min / min",
        "- ΔRSS: resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) of one call minus "
        "the resident set before it, in a fresh process per method: the FIRST call (includes one-time "
        "initialisations) and a WARM one after warm-up (`malloc_trim` before it, so its pages are faulted in "
        "again); tensor peak: peak of live tensor bytes allocated by torch during one warm call above the level "
        "before it (`torch.profiler` memory events); in parentheses the excess over fwd+bwd's (which holds the "
        "P-float gradient) in P-vectors — the target is ≤ +1 P",
        "- normalisation: ours is the mean over the N sequences of each sequence's sum over its tokens; BackPACK "
        "rows are rescaled to it (their loss is the token mean); curvlinops' EF is per TOKEN "
        "((1/NT) Σ_tokens g_t g_tᵀ — a different matrix), its GGN is ours / T",
        "",
    ]


def report(rows: dict, cfg: dict, P: int, opts: dict) -> str:
    lines = header_lines(cfg, P, opts)
    base = rows.get("fwd_bwd", {})
    base_ms = [r["base_ms"] for r in rows.values() if "base_ms" in r]
    if "time_ms" in base:
        lines.append(f"- fwd+bwd = {base['time_ms']:.2f} ms (per-worker medians {min(base_ms):.2f}–{max(base_ms):.2f} "
                     f"ms), ΔRSS first / warm {base['rss_mib']:.1f} / {base['rss_warm_mib']:.1f} MiB, tensor peak "
                     f"{base['tensor_mib']:.1f} MiB\n")
    lines += table(rows)
    lines += ["", "**Targets**", ""]
    for t in targets(rows):
        lines.append(f"- {t['method']}: {t['what']} = {t['value']:.2f} (target ≤ {t['limit']:g}: "
                     f"{'met' if t['met'] else 'MISSED'})")
    warned = [(m, w) for m, r in rows.items() for w in r.get("warnings", []) if "backpack" not in m]
    if warned:
        lines += ["", "**Warnings raised**", ""] + [f"- {m}: {w}" for m, w in warned]
    busy = [r["busy"] for r in rows.values() if r["busy"] > 0.15]
    if busy:
        lines += ["", f"† {len(busy)} measurement(s) started while other processes kept the CPUs busy (> 15 %, max "
                  f"{max(busy):.0%}); their times are not reliable — re-run on an idle machine."]
    return "\n".join(lines) + "\n"


def config_from(args) -> dict:
    cfg = {**DEFAULT, **(QUICK if args.quick else {})}
    for key in ("n_layer", "d", "n_head", "T", "V", "batch", "attention"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: d=64, 1 head, T=32, V=512, batch 4, 3 repeats")
    ap.add_argument("--layers", dest="n_layer", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--heads", dest="n_head", type=int)
    ap.add_argument("--seq", dest="T", type=int, help="sequence length T")
    ap.add_argument("--vocab", dest="V", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--attention", choices=["explicit", "sdpa"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    harness_args(ap, out=RESULTS, json=RESULTS_JSON)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return worker_main(args, worker)
    if "fwd_bwd" not in args.methods:
        args.methods.insert(0, "fwd_bwd")  # the unit of every ratio
    cfg = config_from(args)
    opts = {"cfg": cfg, "repeats": args.repeats or (3 if args.quick else 9), "warmup": 1 if args.quick else 3,
            "malloc": args.malloc}
    torch.set_num_threads(THREADS)
    P = n_params(cfg)
    print(f"[lm] {cfg}, P = {P:,}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fisherlens-bench-lm-") as tmpdir:
        payloads, results = run_all(args, opts, tmpdir)
        rows = summarise(payloads, results, cfg)
    text = report(rows, cfg, P, opts)
    print("\n" + text)
    for path, content in ((args.out, text), (args.json, json.dumps(
            {"config": cfg, "P": P, "p_vector_mib": P * 4 / 2**20, "threads": THREADS, "versions": versions(),
             "repeats": opts["repeats"], "warmup": opts["warmup"], "methods": rows, "targets": targets(rows)},
            indent=2) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    print(f"written to {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
