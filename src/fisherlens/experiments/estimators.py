"""Study: random estimators of the Fisher diagonal and trace against the exact values (arXiv:2505.13614).

A small ReLU MLP (784-32-10 by default) is trained with Adam and softmax cross-entropy on the embedded MNIST
subset and put in eval mode.  On a probe set of training images we compare, against the exact true-Fisher
diagonal and trace (:func:`fisherlens.fisher_diag`, :func:`fisherlens.fisher_trace`),

* five estimators of the true Fisher (docs/conventions.md#hutchinson-estimator): Hutchinson "detach-and-mix" with
  Rademacher or Gaussian
  probes (one backward pass per batch and draw), Hutchinson per-sample, and the Monte-Carlo Fisher (sampled
  labels) in batch and per-sample form;
* the empirical Fisher (observed labels): deterministic, but a different matrix.

Measured: (a) bias — the mean of many draws against the exact value (per-entry z-scores; trace bias ± s.e.);
(b) the single-draw coefficient of variation of every diagonal entry, next to its exact value computed from
the per-sample Jacobians (the ≤ √2 bound of Rademacher probes); (c) the error against the number of draws S
and (d) against wall time; (e) the core-space bounds of docs/conventions.md#core-space-bounds (traces, diagonals,
λ_max, per-sample
core spectrum); (f) empirical vs true Fisher diagonal.

Exact single-draw variances (per entry p, with the factor rows ``G_nk = (S_nᵀ J_n)_k`` of the true sandwich,
``A2 = Σ_nk G²``, ``A4 = Σ_nk G⁴``, ``B2 = Σ_n (Σ_k G_nk²)²``; MC residual rows ``R_nc = J_nᵀ(π_n − e_c)``,
``M2 = Σ_n Σ_c π_c R²``, ``M4 = Σ_n Σ_c π_c R⁴``, ``Q = Σ_n (Σ_c π_c R²)²``), all divided by N²:
Hutchinson batch Rademacher ``2A2² − 2A4``, Gaussian ``2A2²``, per-sample Rademacher ``2B2 − 2A4``,
MC batch ``2M2² + M4 − 3Q``, MC per-sample ``M4 − Q``.  The trace variances follow in the same way from the
NTK blocks ``Θ_nm`` (cross terms ``2 Σ_{n≠m} tr(Λ_n Θ_nm Λ_m Θ_mn)`` for the batch estimators).
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from scipy.sparse.linalg import eigsh
from scipy.stats import chi2

import fisherlens as fl

from .. import datasets, plots
from .._core import Request, identity_sandwich
from ..estimators import draws as estimator_draws
from ._common import (
    arch_name,
    check_int,
    check_ints,
    check_number,
    evaluate,
    make_mlp,
    rel_dev,
    split_with_probe,
    torch_threads,
    train_epoch,
)
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = ["estimators", "Estimators", "EstimatorsConfig", "ESTIMATORS"]

SQRT2 = math.sqrt(2.0)

#: key -> (label, keyword arguments of fl.fisher_diag / fl.fisher_trace)
ESTIMATORS: dict[str, tuple[str, dict]] = OrderedDict(
    hutch_rad=("Hutchinson Rademacher (batch)", {"method": "hutchinson", "probe": "rademacher", "per_sample": False}),
    hutch_gauss=("Hutchinson Gaussian (batch)", {"method": "hutchinson", "probe": "gaussian", "per_sample": False}),
    hutch_rad_ps=("Hutchinson Rademacher (per-sample)",
                  {"method": "hutchinson", "probe": "rademacher", "per_sample": True}),
    mc=("MC-Fisher (batch)", {"method": "mc", "probe": "rademacher", "per_sample": False}),
    mc_ps=("MC-Fisher (per-sample)", {"method": "mc", "probe": "rademacher", "per_sample": True}),
)
COLORS = dict(zip(ESTIMATORS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"], strict=True))
EMP_COLOR = "0.35"

FIGURES = {
    "bias.png": "Trace bias of each estimator (mean of many draws, ±2 s.e.) and per-entry z-scores of the diagonal.",
    "cv_per_parameter.png": "Single-draw coefficient of variation of every diagonal entry (measured and exact), "
    "with the √2 bound of Rademacher probes.",
    "error_vs_draws.png": "Relative error of the diagonal (L2) and of the trace vs number of draws S, with the exact "
    "1/√S prediction and the empirical Fisher's (fixed) error.",
    "error_vs_time.png": "The same errors vs wall time of one batch of S draws (one thread), with the time of the "
    "exact computation.",
    "bounds.png": "Core-space bounds: traces and λ_max of F and its envelopes, diag F / diag U, and the per-sample "
    "core spectrum bounds.",
    "diag_true_vs_empirical.png": "True vs empirical Fisher diagonal, one point per parameter.",
}


# ----------------------------------------------------------------------------- options
@dataclass
class EstimatorsConfig(StudyConfig):
    """Options of the estimators study (defaults: the full study; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds the split, the initialisation, the batch order and all random draws.
        data: ``"mnist-subset"`` (default), ``"digits"`` or a folder of MNIST IDX files.
        n_train, n_test, n_probe: sample counts (4000 / 1000 / 256; quick 300 / 200 / 64).
        hidden: hidden widths (``(32,)``; quick ``(16,)``; a single integer: one hidden layer).
        epochs: training epochs (2; quick 1).
        draws: single draws per estimator for bias, CV and error-vs-draws (4096; quick 128); a multiple of 256
            (or at most 256).
        trace_draws: draws of :func:`fisherlens.fisher_trace` per estimator for the trace bias (4096; quick 128).
        timing_repeats: least number of timed calls per (estimator, S) for S = 1, 4, 16, … (cheap calls are
            repeated up to 0.1 s, quick 0.01 s); the shortest is kept (3; quick 1).
        batch_size, lr: Adam mini-batch size and learning rate.
    """

    QUICK = {"n_train": 300, "n_test": 200, "n_probe": 64, "hidden": (16,), "epochs": 1, "draws": 128,
             "trace_draws": 128, "timing_repeats": 1}

    data: str = "mnist-subset"
    n_train: int = 4000
    n_test: int = 1000
    n_probe: int = 256
    hidden: tuple[int, ...] = (32,)
    epochs: int = 2
    draws: int = 4096
    trace_draws: int = 4096
    timing_repeats: int = 3
    batch_size: int = 32
    lr: float = 1e-3

    def validate(self) -> None:
        self.hidden = check_ints("hidden", self.hidden, allow_empty=True)  # --set hidden=16: one hidden layer
        for name in ("n_train", "n_test", "n_probe", "epochs", "draws", "trace_draws", "timing_repeats",
                     "batch_size"):
            check_int(name, getattr(self, name))
        if self.draws < 2:
            raise ValueError(f"draws must be at least 2 (a variance is estimated), got {self.draws}.")
        super().validate()
        check_number("lr", self.lr, lo=0)
        if self.draws % self.chunk:
            raise ValueError(f"draws must be a multiple of 256 (or at most 256), got {self.draws}.")

    @property
    def chunk(self) -> int:
        """Draws per call of the draw loop (they share the forward pass)."""
        return min(256, self.draws)

    @property
    def grid(self) -> list[int]:
        """Numbers of draws S of the error-vs-draws table: 1, 2, 4, …, chunk."""
        return [2**i for i in range(int(math.log2(self.chunk)) + 1)]

    @property
    def tgrid(self) -> list[int]:
        """Timed numbers of draws: 1, 4, 16, 64, 256 (and the chunk)."""
        return sorted({S for S in self.grid if math.log2(S) % 2 == 0} | {self.chunk})


# ----------------------------------------------------------------------------- model and training
def _train(model: nn.Module, X: Tensor, y: Tensor, cfg: EstimatorsConfig, run: StudyRun) -> float:
    """Adam on softmax cross-entropy with a seeded batch order; returns the last epoch's mean loss."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(X)
    model.train()
    last = math.nan
    tot = [0.0]  # summed batch losses of the current epoch
    with run.bar(cfg.epochs * math.ceil(n / cfg.batch_size), "training", unit="step") as bar:

        def count(loss: Tensor, _outputs: Tensor, idx: Tensor) -> None:
            tot[0] += loss.item() * len(idx)
            bar.update(1)

        for _ in range(cfg.epochs):
            tot[0] = 0.0
            train_epoch(model, opt, X, y, F.cross_entropy, batch_size=cfg.batch_size, generator=gen,
                        after_step=count)
            last = tot[0] / n
    model.eval()
    return last


# ----------------------------------------------------------------------------- exact single-draw variances
def _jacobians(model: nn.Module, X: Tensor, lik) -> tuple[Tensor, Tensor]:
    """Logits ``f (N, C)`` and per-sample Jacobians ``J (N, C, P)`` (flat parameters), via the library's rows."""
    run = Request(model=model, data=(X, None), likelihood=lik)
    fs, Js = [], []
    for f, _, st in run.chunks({"rows"}, lambda f, _: identity_sandwich(f), lambda C: C):
        fs.append(f)
        Js.append(torch.cat([st.rows[n] for n in run.fm.names], dim=-1))
    return torch.cat(fs), torch.cat(Js)


def _diag_variances(f: Tensor, J: Tensor, lik, chunk: int = 16) -> dict[str, Tensor]:
    """Exact single-draw variance of every diagonal entry for each estimator, plus ``"mean"`` (= diag F)."""
    N, _, P = J.shape
    acc = {k: torch.zeros(P, dtype=torch.float64) for k in ("A2", "A4", "B2", "M2", "M4", "Q")}
    for i in range(0, N, chunk):
        Jc = J[i : i + chunk].double()
        fc = f[i : i + chunk].double()
        pi = fc.softmax(-1)
        G = torch.einsum("nck,ncp->nkp", lik.sqrt_fisher(fc), Jc)  # true-sandwich rows
        G2 = G.square()
        acc["A2"] += G2.sum((0, 1))
        acc["A4"] += G2.square().sum((0, 1))
        acc["B2"] += G2.sum(1).square().sum(0)
        R2 = (torch.einsum("nc,ncp->np", pi, Jc)[:, None, :] - Jc).square()  # MC residual rows, per label
        s2 = torch.einsum("nc,ncp->np", pi, R2)
        acc["M2"] += s2.sum(0)
        acc["M4"] += torch.einsum("nc,ncp->p", pi, R2.square())
        acc["Q"] += s2.square().sum(0)
    a = acc
    var = {
        "hutch_rad": 2 * a["A2"].square() - 2 * a["A4"],
        "hutch_gauss": 2 * a["A2"].square(),
        "hutch_rad_ps": 2 * a["B2"] - 2 * a["A4"],
        "mc": 2 * a["M2"].square() + a["M4"] - 3 * a["Q"],
        "mc_ps": a["M4"] - a["Q"],
    }
    out = {k: (v / N**2).clamp_min(0) for k, v in var.items()}
    out["mean"], out["mean_mc"] = a["A2"] / N, a["M2"] / N
    return out


def _trace_variances(f: Tensor, theta: Tensor, lik) -> dict[str, float]:
    """Exact single-draw variance of the trace estimate for each estimator from the NTK ``theta (N, C, N, C)``."""
    f = f.double()
    N, C = f.shape
    pi = f.softmax(-1)
    S = lik.sqrt_fisher(f)
    GF = torch.einsum("nck,ncmd,mdl->nkml", S, theta, S)  # Gram of the true-sandwich rows (NK × NK)
    idx = torch.arange(N)
    B = GF[idx, :, idx, :]  # (N, K, K) per-sample blocks S_nᵀ Θ_nn S_n
    fro_all = GF.square().sum().item()
    fro_blocks = B.square().sum((1, 2))
    diag_sq = torch.diagonal(B, dim1=1, dim2=2).square().sum(-1)
    off = 2 * (fro_all - fro_blocks.sum().item())  # Var of 2 Σ_{n<m} ξ_nᵀ Θ_nm ξ_m
    th_nn = theta[idx, :, idx, :]  # (N, C, C)
    U = pi[:, None, :] - torch.eye(C, dtype=f.dtype)  # rows u_c = π − e_c
    q = torch.einsum("nca,nab,ncb->nc", U, th_nn, U)  # (π − e_c)ᵀ Θ_nn (π − e_c)
    var_mc_n = (pi * q.square()).sum(-1) - (pi * q).sum(-1).square()
    rad_n = 2 * fro_blocks - 2 * diag_sq
    var = {
        "hutch_rad": rad_n.sum().item() + off,
        "hutch_gauss": 2 * fro_all,
        "hutch_rad_ps": rad_n.sum().item(),
        "mc": var_mc_n.sum().item() + off,
        "mc_ps": var_mc_n.sum().item(),
    }
    out = {k: max(v, 0.0) / N**2 for k, v in var.items()}
    out["mean"] = torch.diagonal(B, dim1=1, dim2=2).sum().item() / N
    return out


def _lambda_max(gram: Tensor) -> float:
    """Largest eigenvalue of a symmetric matrix (dense eigh when tiny, else Lanczos).

    Kept by hand: the envelopes U_π and U_iso have no library eigenvalue routine, and λ_max(F) is computed the
    same way from the same float32 NTK so that the three ratios compare like with like; ``fl.eigenvalues`` (whose
    float64 Gram is assembled differently) is the independent check in the summary.
    """
    A = gram.double().numpy()
    A = (A + A.T) / 2
    if A.shape[0] <= 32:
        return float(np.linalg.eigvalsh(A)[-1])
    v0 = np.ones(A.shape[0]) / math.sqrt(A.shape[0])
    return float(eigsh(A, k=1, which="LA", v0=v0, tol=1e-10, return_eigenvectors=False)[0])


def _envelope_lambdas(f: Tensor, theta: Tensor, lik) -> dict[str, float]:
    """λ_max of F, U_π and U_iso from their NK × NK Gram matrices (docs/conventions.md#gram-duality and
    docs/conventions.md#core-space-bounds)."""
    f = f.double()
    N, C = f.shape
    pi = f.softmax(-1)
    S = lik.sqrt_fisher(f)
    GF = torch.einsum("nck,ncmd,mdl->nkml", S, theta, S).reshape(N * C, N * C) / N
    sp = pi.sqrt()
    GU = (sp[:, :, None, None] * theta * sp[None, None, :, :]).reshape(N * C, N * C) / N
    st = (1 - pi.square().sum(-1)).clamp_min(0).sqrt()
    GI = (st[:, None, None, None] * theta * st[None, None, :, None]).reshape(N * C, N * C) / N
    return {"F": _lambda_max(GF), "U_diag": _lambda_max(GU), "U_iso": _lambda_max(GI)}


# ----------------------------------------------------------------------------- draws
class _Accumulator:
    """Running per-entry sums over draws, and squared errors of S-draw means for each S of the grid."""

    def __init__(self, exact_diag: Tensor, exact_trace: float, grid: list[int]):
        self.d = exact_diag.double()
        self.dnorm = self.d.norm().item()
        self.t = exact_trace
        self.grid = grid
        self.n = 0
        self.sum = torch.zeros_like(self.d)
        self.sumsq = torch.zeros_like(self.d)
        self.traces: list[Tensor] = []
        self.err = {S: [0.0, 0.0, 0] for S in grid}  # S -> [Σ diag err², Σ trace err², groups]

    def add(self, D: Tensor) -> None:
        """Add per-draw diagonals ``D (s, P)``; s must be a multiple of every S in the grid used."""
        D = D.double()
        s = D.shape[0]
        self.n += s
        self.sum += D.sum(0)
        self.sumsq += D.square().sum(0)
        tr = D.sum(1)
        self.traces.append(tr)
        for S in self.grid:
            if S > s:
                continue
            M = D[: s // S * S].reshape(s // S, S, -1).mean(1)
            e = self.err[S]
            e[0] += ((M - self.d).norm(dim=1) / self.dnorm).square().sum().item()
            e[1] += ((tr[: s // S * S].reshape(-1, S).mean(1) - self.t) / self.t).square().sum().item()
            e[2] += s // S

    def mean(self) -> Tensor:
        return self.sum / self.n

    def std(self) -> Tensor:
        var = (self.sumsq - self.n * self.mean().square()).clamp_min(0) / (self.n - 1)
        return var.sqrt()

    def rms(self, S: int) -> tuple[float, float, int]:
        e = self.err[S]
        return math.sqrt(e[0] / e[2]), math.sqrt(e[1] / e[2]), e[2]


def _fresh_run(model: nn.Module, probe, lik, gen: torch.Generator) -> Request:
    # a Request counts the samples it streams: one per call
    return Request(model=model, data=probe, likelihood=lik, generator=gen)


def _diag_draws(model, probe, lik, key: str, samples: int, gen: torch.Generator, what: str = "diag") -> Tensor:
    """``(samples, P)`` single-draw diagonal estimates (``what="trace"``: ``(samples,)`` traces) from one call;
    the draws share the forward pass."""
    kw = ESTIMATORS[key][1]
    run = _fresh_run(model, probe, lik, gen)
    d = estimator_draws(run, kw["method"], what, probe=kw["probe"], per_sample=kw["per_sample"], samples=samples)
    return run.fm.flatten(d, lead=1) if what == "diag" else sum(d.values())


def _min_time(fn, repeats: int, budget: float, cap: int = 30) -> float:
    """Shortest of at least ``repeats`` timed calls, repeated while they take less than ``budget`` seconds in
    all (at most ``cap`` calls): the minimum is robust against other load on the machine."""
    ts: list[float] = []
    while len(ts) < repeats or (sum(ts) < budget and len(ts) < cap):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _rms_band(excess_kurtosis: float, reps: int) -> tuple[float, float]:
    """Central 95% range of RMS / expected RMS over ``reps`` iid zero-mean errors of kurtosis κ = 3 + excess.

    The mean square is approximated by a scaled χ²_ν / ν with the same mean and variance, ν = 2·reps / (κ − 1).
    """
    nu = 2 * reps / max(2 + excess_kurtosis, 1e-12)
    return math.sqrt(chi2.ppf(0.025, nu) / nu), math.sqrt(chi2.ppf(0.975, nu) / nu)


def _interp_time(S: list[int], secs: list[float], s: float) -> float:
    """Wall time of a call with ``s`` draws, interpolated linearly between measured ``S`` (extrapolated beyond)."""
    i = min(max(int(np.searchsorted(S, s)), 1), len(S) - 1)
    return secs[i - 1] + (secs[i] - secs[i - 1]) * (s - S[i - 1]) / (S[i] - S[i - 1])


def _slope(S: list[int], err: list[float]) -> float:
    """Least-squares slope of log(err) against log(S)."""
    x, y = np.log(np.asarray(S, float)), np.log(np.asarray(err, float))
    return float(np.polyfit(x, y, 1)[0])


# ----------------------------------------------------------------------------- the study's steps
def _trace_bias(model, probe, lik, cfg: EstimatorsConfig, gen: torch.Generator, run: StudyRun) -> dict:
    """Trace estimates through the public API (independent draws): ``{key: (mean, s.e., draws)}``."""
    tchunk = min(256, cfg.trace_draws)
    out: dict[str, tuple[float, float, int]] = {}
    for k, (_, kw) in run.bar(desc="trace bias", iterable=ESTIMATORS.items()):
        vals, ses, n = [], [], 0
        while n < cfg.trace_draws:
            s = min(tchunk, cfg.trace_draws - n)
            e = fl.fisher_trace(model, probe, lik, samples=s, generator=gen, **kw)
            vals.append((e.value, s))
            ses.append((e.stderr, s))
            n += s
        mean = sum(v * s for v, s in vals) / n
        # pooled s.e. of the weighted mean (chunks of one draw carry no variance information)
        se = math.sqrt(sum((s / n) ** 2 * se**2 for se, s in ses if s > 1)) if all(s > 1 for _, s in ses) else math.nan
        out[k] = (mean, se, n)
    return out


def _timings(model, probe, lik, cfg: EstimatorsConfig, gen: torch.Generator, run: StudyRun):
    """Wall time of one draw batch vs S: single-threaded (stable on a busy machine), shortest of the repeats.

    Returns ``(exact_times, times, load)``: the exact diagonal and trace (true, empirical), ``times[key][what][S]``
    and the load average before and after.
    """
    load = [_loadavg()]
    budget = 0.01 if cfg.quick else 0.1  # cheap calls are repeated until they took this long in all
    reps, tgrid = cfg.timing_repeats, cfg.tgrid
    times: dict[str, dict[str, dict[int, float]]] = {k: {"diag": {}, "trace": {}, "public": {}} for k in ESTIMATORS}
    with torch_threads(1), run.bar(len(ESTIMATORS) * len(tgrid), "timing") as bar:
        exact_times = {  # exact diagonal and trace, true and empirical
            f"{pre}{what}": _min_time(lambda fn=fn, kind=kind: fn(model, probe, lik, kind=kind), reps, budget)
            for pre, kind in (("", "true"), ("emp_", "empirical"))
            for what, fn in (("diag", fl.fisher_diag), ("trace", fl.fisher_trace))
        }
        for k, (_, kw) in ESTIMATORS.items():
            _diag_draws(model, probe, lik, k, 2, gen)  # warm-up
            for S in tgrid:
                for what in ("diag", "trace"):
                    times[k][what][S] = _min_time(
                        lambda S=S, k=k, what=what: _diag_draws(model, probe, lik, k, S, gen, what), reps, budget)
                times[k]["public"][S] = _min_time(
                    lambda S=S, kw=kw: fl.fisher_diag(model, probe, lik, samples=S, generator=gen, **kw),
                    reps, budget)
                bar.update(1)
    load.append(_loadavg())
    return exact_times, times, load


def _error_rows(k: str, a: _Accumulator, var_d: Tensor, var_t: float, tr_t: float, grid: list[int],
                times: dict) -> tuple[list[dict], dict, dict, dict]:
    """Rows of error_vs_draws.csv for estimator ``k``; also the measured errors and the exact predictions."""
    trd = torch.cat(a.traces)
    errs = {S: a.rms(S) for S in grid}
    th_d = {S: math.sqrt(var_d.sum().item() / S) / a.dnorm for S in grid}
    th_t = {S: math.sqrt(var_t / S) / tr_t for S in grid}
    exkurt = ((trd - trd.mean()) ** 4).mean().item() / trd.var(correction=0).item() ** 2 - 3
    rows = [{
        "estimator": k, "S": S, "repetitions": errs[S][2], "diag_rel_l2_rms": errs[S][0],
        "diag_rel_l2_theory": th_d[S], "trace_rel_rms": errs[S][1], "trace_rel_theory": th_t[S],
        **dict(zip(("trace_band_lo", "trace_band_hi"), _rms_band(exkurt / S, errs[S][2]), strict=True)),
        "seconds_diag": times["diag"].get(S), "seconds_trace": times["trace"].get(S),
        "seconds_fisher_diag_call": times["public"].get(S),
    } for S in grid]
    return rows, errs, th_d, th_t


def _estimator_row(k: str, label: str, a: _Accumulator, exact: dict, var_d: Tensor, var_t: float,
                   trace_est: tuple[float, float, int], errs: dict, th_d: dict, th_t: dict, grid: list[int],
                   tgrid: list[int], times: dict) -> tuple[dict, Tensor, Tensor, Tensor]:
    """The metrics.csv row of estimator ``k``; also its measured and exact CVs and its per-entry z-scores."""
    dt64, mask, tr_t = exact["dt64"], exact["mask"], exact["tr_t"]
    mean, std = a.mean(), a.std()
    R = a.n
    cm, ct = (std / dt64)[mask], (var_d.sqrt() / dt64)[mask]
    z = ((mean - dt64) / (std / math.sqrt(R)).clamp_min(1e-300))[mask & (std > 0)]
    trd = torch.cat(a.traces)
    tr_mean, tr_se = trd.mean().item(), trd.std().item() / math.sqrt(R)
    te, tse, tn = trace_est
    tsec = [times["diag"][S] for S in tgrid]
    s10 = math.ceil((th_d[1] / 0.1) ** 2)
    row = {
        "estimator": k, "label": label, "draws": R,
        "trace_exact": tr_t, "trace_mean": te, "trace_stderr": tse, "trace_draws": tn,
        "trace_rel_bias": (te - tr_t) / tr_t, "trace_rel_bias_se": tse / tr_t, "trace_z": (te - tr_t) / tse,
        "trace_from_diag_draws_rel_bias": (tr_mean - tr_t) / tr_t,
        "trace_from_diag_draws_z": (tr_mean - tr_t) / tr_se,
        "diag_median_rel_err_of_mean": ((mean - dt64).abs() / dt64)[mask].median().item(),
        "diag_median_rel_err_of_mean_expected": (0.6745 * ct / math.sqrt(R)).median().item(),
        "diag_mean_z": z.mean().item(), "diag_std_z": z.std().item(),
        "diag_frac_abs_z_gt3": (z.abs() > 3).double().mean().item(),
        "cv_median_measured": cm.median().item(), "cv_median_theory": ct.median().item(),
        "cv_max_theory": ct.max().item(), "cv_p99_measured": cm.quantile(0.99).item(),
        "frac_cv_le_sqrt2_measured": (cm <= SQRT2).double().mean().item(),
        "frac_cv_le_sqrt2_theory": (ct <= SQRT2 * (1 + 1e-6)).double().mean().item(),
        "cv_measured_over_theory_median": (cm / ct)[ct > 0].median().item(),
        "trace_cv_theory": math.sqrt(var_t) / tr_t,
        "trace_cv_measured": trd.std().item() / tr_t,
        "diag_rel_l2_S1": errs[1][0], "diag_rel_l2_S1_theory": th_d[1],
        "trace_rel_S1": errs[1][1], "trace_rel_S1_theory": th_t[1],
        "slope_diag": _slope(grid, [errs[S][0] for S in grid]),
        "slope_trace": _slope(grid, [errs[S][1] for S in grid]),
        "draws_for_10pct_diag": s10, "seconds_per_draw": (tsec[-1] - tsec[0]) / (tgrid[-1] - 1),
        "seconds_for_10pct_diag": _interp_time(tgrid, tsec, s10),
        "seconds_S1": times["diag"][1], f"seconds_S{tgrid[-1]}": times["diag"][tgrid[-1]],
        "seconds_fisher_diag_call_S1": times["public"][1],
        f"seconds_fisher_diag_call_S{tgrid[-1]}": times["public"][tgrid[-1]],
    }
    return row, cm, ct, z


def _empirical(exact: dict, exact_times: dict) -> tuple[dict, dict]:
    """Empirical vs true Fisher: the summary numbers and the metrics.csv row of the empirical Fisher."""
    dt64, de64, mask, tr_t, tr_e = exact["dt64"], exact["de64"], exact["mask"], exact["tr_t"], exact["tr_e"]
    emp_diag_err = (de64 - dt64).norm().item() / dt64.norm().item()
    emp_tr_err = abs(tr_e - tr_t) / tr_t
    both = mask & (de64 > 0)
    emp = {
        "trace_ratio": tr_e / tr_t, "diag_rel_l2": emp_diag_err, "trace_rel_err": emp_tr_err,
        "median_ratio": (de64 / dt64)[both].median().item(),
        "frac_emp_gt_true": (de64 > dt64)[mask].double().mean().item(),
        "log_corr": torch.corrcoef(torch.stack([dt64[both].log(), de64[both].log()]))[0, 1].item(),
        "seconds_diag": exact_times["emp_diag"], "seconds_trace": exact_times["emp_trace"],
    }
    row = {"estimator": "empirical", "label": "empirical Fisher (observed labels)", "draws": 0,
           "trace_exact": tr_t, "trace_mean": tr_e, "trace_rel_bias": (tr_e - tr_t) / tr_t,
           "diag_median_rel_err_of_mean": ((de64 - dt64).abs() / dt64)[mask].median().item(),
           "diag_rel_l2_S1": emp_diag_err, "trace_rel_S1": emp_tr_err,
           "seconds_S1": exact_times["emp_diag"]}
    return emp, row


def _core_bounds(model, probe, lik) -> dict:
    """The core-space envelopes U_π, U_iso (diagonals, traces), λ_max by Lanczos and the per-sample core spectrum."""
    env_diag = {w: fl.bounds.envelope(model, probe, w, "diag") for w in ("diag", "isotropic")}
    env_tr = {w: fl.bounds.envelope(model, probe, w, "trace") for w in ("diag", "isotropic")}
    lam_lib = fl.eigenvalues(model, probe, lik, k=1, method="lanczos")[0].item()
    with torch.no_grad():
        logits = model(probe[0]).double()
    core = fl.bounds.core_spectrum(logits)
    lam_core = torch.from_numpy(np.linalg.eigvalsh(lik.fisher_out(logits).numpy())[:, -1])
    return {"env_diag": env_diag, "env_tr": env_tr, "lam_lib": lam_lib, "logits": logits, "core": core,
            "lam_core": lam_core}


def _bounds_table(exact: dict, cb: dict, lam: dict, exact_times: dict, n_probe: int) -> tuple[dict, Tensor, Tensor]:
    """bounds.csv (quantity → value), and the diagonal ratios F / U_π, F / U_iso."""
    dt64, tr_t, core, lam_core, env_tr = exact["dt64"], exact["tr_t"], cb["core"], cb["lam_core"], cb["env_tr"]
    ud, ui = cb["env_diag"]["diag"].double(), cb["env_diag"]["isotropic"].double()
    ratio_d = (dt64 / ud)[ud > 0]
    ratio_i = (dt64 / ui)[ui > 0]
    ok = (lam_core >= core["lambda_max_lower"] * (1 - 1e-9) - 1e-15) & (
        lam_core <= core["lambda_max_upper"] * (1 + 1e-9) + 1e-15)
    pos = lam_core > 1e-12
    bounds = {
        "trace_F": tr_t, "trace_U_diag": env_tr["diag"], "trace_U_iso": env_tr["isotropic"],
        "trace_F_over_U_diag": tr_t / env_tr["diag"], "trace_F_over_U_iso": tr_t / env_tr["isotropic"],
        "diag_ratio_U_diag_max": ratio_d.max().item(), "diag_ratio_U_diag_median": ratio_d.median().item(),
        "diag_ratio_U_iso_max": ratio_i.max().item(), "diag_ratio_U_iso_median": ratio_i.median().item(),
        "lambda_max_F": lam["F"], "lambda_max_F_library_lanczos": cb["lam_lib"],
        "lambda_max_U_diag": lam["U_diag"], "lambda_max_U_iso": lam["U_iso"],
        "lambda_F_over_U_diag": lam["F"] / lam["U_diag"], "lambda_F_over_U_iso": lam["F"] / lam["U_iso"],
        "core_samples": n_probe, "core_within_bounds": int(ok.sum()),
        "core_lower_over_lambda_median": (core["lambda_max_lower"][pos] / lam_core[pos]).median().item(),
        "core_lambda_over_upper_median": (lam_core[pos] / core["lambda_max_upper"][pos]).median().item(),
        "core_lower_over_lambda_min": (core["lambda_max_lower"][pos] / lam_core[pos]).min().item(),
        "core_lambda_over_upper_min": (lam_core[pos] / core["lambda_max_upper"][pos]).min().item(),
        "core_lambda_max_median": lam_core.median().item(),
        "exact_diag_seconds": exact_times["diag"], "exact_trace_seconds": exact_times["trace"],
    }
    return bounds, ratio_d, ratio_i


def _core_rows(probe, cb: dict) -> list[dict]:
    """core_spectrum.csv: per probe input, λ_max(Λ_n) and its bounds."""
    logits, core, lam_core = cb["logits"], cb["core"], cb["lam_core"]
    return [{"n": i, "label": int(probe[1][i]), "pi_max": float(logits[i].softmax(-1).max()),
             "lambda_max": float(lam_core[i]), "lower": float(core["lambda_max_lower"][i]),
             "upper": float(core["lambda_max_upper"][i]), "trace": float(core["trace"][i])}
            for i in range(len(probe[0]))]


class Estimators(Study):
    """Random estimators of the Fisher diagonal and trace against the exact values (module docstring)."""

    name = "estimators"
    description = ("Hutchinson, MC-Fisher and empirical Fisher vs the exact diagonal and trace of an MNIST MLP: bias, "
                   "CV per parameter, error vs draws and wall time, core-space bounds.")
    Config = EstimatorsConfig

    def setup(self, cfg: EstimatorsConfig):
        return datasets.load(cfg.data)  # before the folder is created: a bad --data leaves no trace

    def config_json(self, cfg: EstimatorsConfig, inputs) -> dict:
        return {
            "experiment": "estimators", "quick": cfg.quick, "seed": cfg.seed, "data": str(cfg.data),
            "n_train": cfg.n_train, "n_test": cfg.n_test, "n_probe": cfg.n_probe, "hidden": list(cfg.hidden),
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "draws": cfg.draws,
            "trace_draws": cfg.trace_draws, "timing_repeats": cfg.timing_repeats, "draw_grid": cfg.grid,
            "optimizer": "Adam", "loss": "softmax cross-entropy", "likelihood": "Categorical", "dtype": "float32",
        }

    def _model(self, cfg: EstimatorsConfig, run: StudyRun) -> tuple[nn.Module, tuple, dict]:
        """Split the data, train the MLP; returns the model, the probe set and the training facts."""
        X, y = run.inputs
        Xtr, ytr, Xte, yte, probe, C = split_with_probe(X, y, cfg.n_train, cfg.n_test, cfg.n_probe, cfg.seed)
        torch.manual_seed(cfg.seed)  # nn.Linear's initialisation from the (seeded) global RNG
        model = make_mlp(X.shape[1], cfg.hidden, C, dtype=X.dtype)
        train_loss = _train(model, Xtr, ytr, cfg, run)
        used = {"arch": arch_name(X.shape[1], cfg.hidden, C), "n_train": len(Xtr), "n_test": len(Xte),
                "n_probe": len(probe[0]), "train_loss": train_loss, "test_acc": evaluate(model, Xte, yte)[1],
                "train_acc": evaluate(model, Xtr, ytr)[1], "C": C}
        return model, probe, used

    def _exact(self, model, probe, lik) -> tuple[dict, dict, dict, dict]:
        """Exact references, the exact single-draw variances (per-sample Jacobians) and the Gram λ_max."""
        diag_t = fl.fisher_diag(model, probe, lik, kind="true")
        diag_e = fl.fisher_diag(model, probe, lik, kind="empirical")
        tr_t = fl.fisher_trace(model, probe, lik, kind="true")
        tr_e = fl.fisher_trace(model, probe, lik, kind="empirical")
        f, J = _jacobians(model, probe[0], lik)
        var_d = _diag_variances(f, J, lik)
        N, C, P = J.shape
        Jf = J.reshape(N * C, P)
        # the NTK Θ (N, C, N, C) from the study's own Jacobians, as the variance formulas need it; fl.ntk would
        # give the same matrix summed in another order (float32 rounding differs at 1e-7, moving every number)
        theta = (Jf @ Jf.T).double().reshape(N, C, N, C)
        del J, Jf
        var_t = _trace_variances(f, theta, lik)
        lam = _envelope_lambdas(f, theta, lik)
        dt64, de64 = diag_t.double(), diag_e.double()
        exact = {"diag_t": diag_t, "diag_e": diag_e, "tr_t": tr_t, "tr_e": tr_e, "dt64": dt64, "de64": de64,
                 "mask": dt64 > 1e-10 * dt64.max(), "P": P}
        return exact, var_d, var_t, lam

    def compute(self, cfg: EstimatorsConfig, run: StudyRun) -> dict:
        model, probe, used = self._model(cfg, run)
        lik = fl.Categorical()
        exact, var_d, var_t, lam = self._exact(model, probe, lik)
        gen = torch.Generator().manual_seed(cfg.seed + 2)  # all draws, in this order: diagonals, traces, timing
        accs = {k: _Accumulator(exact["diag_t"], exact["tr_t"], cfg.grid) for k in ESTIMATORS}
        with run.bar(len(ESTIMATORS) * (cfg.draws // cfg.chunk), "draws", unit="chunk") as bar:
            for k in ESTIMATORS:
                for _ in range(cfg.draws // cfg.chunk):
                    accs[k].add(_diag_draws(model, probe, lik, k, cfg.chunk, gen))
                    bar.update(1)
        trace_est = _trace_bias(model, probe, lik, cfg, gen, run)
        exact_times, times, load = _timings(model, probe, lik, cfg, gen, run)
        cb = _core_bounds(model, probe, lik)
        res = {"rows": [], "err_rows": [], "cv_meas": {}, "cv_theo": {}, "zs": {}}
        for k, (label, _) in ESTIMATORS.items():
            er, errs, th_d, th_t = _error_rows(k, accs[k], var_d[k], var_t[k], exact["tr_t"], cfg.grid, times[k])
            row, res["cv_meas"][k], res["cv_theo"][k], res["zs"][k] = _estimator_row(
                k, label, accs[k], exact, var_d[k], var_t[k], trace_est[k], errs, th_d, th_t, cfg.grid, cfg.tgrid,
                times[k])
            res["rows"].append(row)
            res["err_rows"] += er
        emp, emp_row = _empirical(exact, exact_times)
        res["rows"].append(emp_row)
        bounds, ratio_d, ratio_i = _bounds_table(exact, cb, lam, exact_times, used["n_probe"])
        run.write_csv("metrics.csv", res["rows"])
        run.write_csv("error_vs_draws.csv", res["err_rows"])
        run.write_csv("bounds.csv", [{"quantity": q, "value": v} for q, v in bounds.items()])
        run.write_csv("core_spectrum.csv", _core_rows(probe, cb))
        used.update({"P": exact["P"], "zero_entries": int((~exact["mask"]).sum()), "grid": cfg.grid,
                     "tgrid": cfg.tgrid, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load": load})
        trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
        return {**res, "emp": emp, "bounds": bounds, "ratio_d": ratio_d, "ratio_i": ratio_i, "cb": cb,
                "exact": exact, "exact_times": exact_times, "used": used, "trainable": trainable,
                "checks": _checks(exact, var_d, var_t, lam, cb["lam_lib"])}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        cfg = run.cfg
        _fig_bias(run.file("bias.png"), r["rows"], r["zs"])
        _fig_cv(run.file("cv_per_parameter.png"), r["cv_meas"], r["cv_theo"], cfg.draws, cfg.seed)
        _fig_error(run.file("error_vs_draws.png"), r["err_rows"], r["emp"], x="S")
        _fig_error(run.file("error_vs_time.png"), r["err_rows"], r["emp"], x="seconds", exact=r["exact_times"])
        _fig_bounds(run.file("bounds.png"), r["bounds"], r["ratio_d"], r["ratio_i"], r["cb"]["lam_core"],
                    r["cb"]["core"])
        names, sizes = zip(*r["trainable"], strict=True)

        def split(v: Tensor) -> dict[str, Tensor]:
            return dict(zip(names, v.split(list(sizes)), strict=True))

        plots.diag_scatter(run.file("diag_true_vs_empirical.png"), split(r["exact"]["diag_t"]),
                           split(r["exact"]["diag_e"]), title="Fisher diagonal: true vs empirical (probe set)")
        return FIGURES

    def report(self, r: dict, run: StudyRun) -> str:
        used = {**r["used"], "seconds": run.elapsed()}
        return _summary(run.cfg, used, r["rows"], r["err_rows"], r["bounds"], r["emp"], r["checks"], run.figures)


def _checks(exact: dict, var_d: dict, var_t: dict, lam: dict, lam_lib: float) -> dict[str, float]:
    """Consistency checks (relative deviations) of the exact quantities against each other and the library."""
    dt64, tr_t = exact["dt64"], exact["tr_t"]
    return {
        "Σ diag F = tr F (exact)": rel_dev(exact["diag_t"].double().sum().item(), tr_t),
        "Σ_nk G² / N (Jacobian rows) = diag F": ((var_d["mean"] - dt64).norm() / dt64.norm()).item(),
        "MC second moment Σ π R² / N = diag F": ((var_d["mean_mc"] - dt64).norm() / dt64.norm()).item(),
        "tr F from the NTK Gram = tr F": rel_dev(var_t["mean"], tr_t),
        "λ_max(F): own Gram vs fl.eigenvalues(lanczos)": rel_dev(lam["F"], lam_lib),
    }


def estimators(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True,
               **options) -> Path:
    """Compare Hutchinson, MC-Fisher and empirical Fisher with the exact diagonal and trace; write a run folder.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (300 train images, 784-16-10, 64 probe images, 128 draws).
        seed: seeds the split, the initialisation, the batch order and all random draws.
        progress: show tqdm progress bars.
        **options: the fields of :class:`EstimatorsConfig` (``data``, ``hidden``, ``draws``, ...).

    Returns:
        Path of the run folder: ``config.json``, ``metrics.csv`` (one row per estimator), ``error_vs_draws.csv``,
        ``bounds.csv``, ``core_spectrum.csv``, six PNG figures and ``summary.md``.
    """
    return run_study(Estimators, out, quick, seed, progress=progress, **options)


def _loadavg() -> float:
    """1-minute load average of the machine (nan where unavailable)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - non-POSIX
        return math.nan


# ----------------------------------------------------------------------------- figures
def _plain_log_ticks(axis, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Ticks at ``subs`` × 10^k written as plain numbers on a log axis (no crowded minor labels)."""
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _short(k: str) -> str:
    return {"hutch_rad": "Hutch. Rad.", "hutch_gauss": "Hutch. Gauss", "hutch_rad_ps": "Hutch. Rad.\nper-sample",
            "mc": "MC", "mc_ps": "MC\nper-sample"}[k]


def _fig_bias(path: Path, rows: list[dict], zs: dict[str, Tensor]) -> Path:
    fig = Figure(figsize=(11.5, 4.3))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    keys = list(ESTIMATORS)
    by = {r["estimator"]: r for r in rows}
    for i, k in enumerate(keys):
        r = by[k]
        ax1.errorbar(i - 0.12, 100 * r["trace_rel_bias"], yerr=200 * r["trace_rel_bias_se"], fmt="o", capsize=4,
                     color=COLORS[k], label="fl.fisher_trace" if i == 0 else None)
        se2 = 200 * abs(r["trace_from_diag_draws_rel_bias"] / r["trace_from_diag_draws_z"]) \
            if r["trace_from_diag_draws_z"] else 0.0
        ax1.errorbar(i + 0.12, 100 * r["trace_from_diag_draws_rel_bias"], yerr=se2, fmt="s", mfc="none", capsize=4,
                     color=COLORS[k], label="Σ of diag draws" if i == 0 else None)
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_xticks(range(len(keys)), [_short(k) for k in keys], fontsize=8)
    ax1.set_ylabel("relative bias of tr F estimate  [%]")
    ax1.set_title("Trace: mean of all draws − exact (±2 s.e.)")
    ax1.grid(True, axis="y", alpha=0.3)
    ax1.legend(frameon=False, fontsize=8)
    bins = np.linspace(-6, 6, 61)
    for k in keys:
        z = zs[k].clamp(-6, 6).numpy()
        ax2.hist(z, bins=bins, density=True, histtype="step", linewidth=1.4, color=COLORS[k],
                 label=ESTIMATORS[k][0])
    xs = np.linspace(-6, 6, 300)
    ax2.plot(xs, np.exp(-xs**2 / 2) / math.sqrt(2 * math.pi), color="black", linestyle="--", linewidth=1,
             label="N(0, 1)")
    ax2.set_xlabel("z = (mean of draws − exact) / s.e., per diagonal entry")
    ax2.set_ylabel("density")
    ax2.set_title("Diagonal: per-entry z-scores (unbiased → N(0, 1))")
    ax2.legend(frameon=False, fontsize=7)
    ax2.grid(True, alpha=0.3)
    return plots.save_png(fig, path)


def _fig_cv(path: Path, meas: dict[str, Tensor], theo: dict[str, Tensor], draws: int, seed: int) -> Path:
    fig = Figure(figsize=(16, 4.7))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    keys = list(ESTIMATORS)
    data = [meas[k].numpy() for k in keys]
    bp = ax1.boxplot(data, whis=(1, 99), showfliers=False, patch_artist=True, widths=0.55,
                     medianprops={"color": "black"})
    for patch, k in zip(bp["boxes"], keys, strict=True):
        patch.set_facecolor(COLORS[k])
        patch.set_alpha(0.45)
    ax1.plot(range(1, len(keys) + 1), [theo[k].median().item() for k in keys], "D", color="black", markersize=5,
             label="exact CV, median")
    ax1.axhline(SQRT2, color="crimson", linestyle="--", linewidth=1.2, label="√2 (Rademacher bound)")
    ax1.set_yscale("log")
    ax1.set_xticks(range(1, len(keys) + 1), [_short(k) for k in keys], fontsize=8)
    ax1.set_ylabel("single-draw CV = std / diag F")
    ax1.set_title(f"Measured CV per diagonal entry ({draws} draws)\nbox 25–75%, whiskers 1–99%", fontsize=10)
    top = max(float(np.quantile(x, 0.99)) for x in data)
    ax1.set_ylim(top=top * 2.6)
    for i, k in enumerate(keys, 1):
        fm = (meas[k] <= SQRT2).double().mean().item()
        ft = (theo[k] <= SQRT2 * (1 + 1e-6)).double().mean().item()
        ax1.annotate(f"≤ √2:\n{fm:.0%} meas.\n{ft:.0%} exact", (i, top * 2.4), ha="center", va="top", fontsize=7)
    ax1.grid(True, axis="y", which="major", alpha=0.3)
    ax1.legend(frameon=False, fontsize=8, loc="lower left")
    lo = min(float(theo[k][theo[k] > 0].min()) for k in keys)
    hi = max(float(theo[k].max()) for k in keys)
    bins = np.geomspace(lo / 1.05, hi * 1.05, 80)
    for k in keys:
        t = theo[k].numpy()
        if np.ptp(t) < 1e-3 * t.mean():  # Gaussian probes: √2 everywhere (up to rounding)
            ax2.axvline(t.mean(), color=COLORS[k], linewidth=2, alpha=0.7, label=f"{ESTIMATORS[k][0]} (all = √2)")
        else:
            ax2.hist(t, bins=bins, histtype="step", linewidth=1.4, color=COLORS[k], label=ESTIMATORS[k][0])
    ax2.axvline(SQRT2, color="crimson", linestyle="--", linewidth=1.2)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("exact single-draw CV (from the per-sample Jacobians)")
    ax2.set_ylabel("parameters")
    ax2.set_title("Exact CV per diagonal entry (√2 dashed)", fontsize=10)
    ax2.legend(frameon=False, fontsize=7)
    ax2.grid(True, which="major", alpha=0.3)
    rng = np.random.default_rng(seed)
    for k in keys:
        t, m = theo[k].numpy(), meas[k].numpy()
        sel = rng.choice(len(t), size=min(1500, len(t)), replace=False)
        sel = sel[t[sel] > 0]
        ax3.scatter(t[sel], m[sel] / t[sel], s=3, alpha=0.4, linewidths=0, color=COLORS[k], rasterized=True,
                    label=ESTIMATORS[k][0])
    ax3.axhline(1, color="black", linestyle="--", linewidth=1)
    ax3.axvline(SQRT2, color="crimson", linestyle="--", linewidth=1)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    _plain_log_ticks(ax3.yaxis, (1.0, 1.5, 2.0, 3.0, 5.0, 7.0))
    ax3.set_xlabel("exact single-draw CV")
    ax3.set_ylabel("measured CV / exact CV")
    ax3.set_title(f"Measured vs exact ({draws} draws; 1500 random entries each)", fontsize=10)
    leg = ax3.legend(frameon=False, fontsize=7, markerscale=3, loc="lower left")
    for h in leg.legend_handles:
        if hasattr(h, "set_alpha"):
            h.set_alpha(1)
    ax3.grid(True, which="major", alpha=0.3)
    return plots.save_png(fig, path)


def _fig_error(path: Path, err_rows: list[dict], emp: dict, *, x: str, exact: dict | None = None) -> Path:
    """Errors vs S (measured RMS, exact prediction, 95% band for the trace) or vs wall time of one call."""
    fig = Figure(figsize=(12, 4.7))
    axes = fig.subplots(1, 2)
    panels = [("diag_rel_l2_rms", "diag_rel_l2_theory", "seconds_diag", "diag", "relative L2 error of diag F",
               emp["diag_rel_l2"]),
              ("trace_rel_rms", "trace_rel_theory", "seconds_trace", "trace", "relative error of tr F (RMS)",
               emp["trace_rel_err"])]
    for ax, (col, th, sec, what, ylabel, emp_err) in zip(axes, panels, strict=True):
        for k, (label, _) in ESTIMATORS.items():
            rs = [r for r in err_rows if r["estimator"] == k]
            if x == "S":
                S = np.array([r["S"] for r in rs], float)
                theory = np.array([r[th] for r in rs])
                ax.plot(S, [r[col] for r in rs], "o-", color=COLORS[k], markersize=4, linewidth=1.4, label=label)
                ax.plot(S, theory, "--", color=COLORS[k], linewidth=1, alpha=0.8)
                if what == "trace":  # where the RMS over the repetitions should fall (95%), if ≥ 8 of them
                    ok = np.array([r["repetitions"] >= 8 for r in rs])
                    ax.fill_between(S[ok], (theory * np.array([r["trace_band_lo"] for r in rs]))[ok],
                                    (theory * np.array([r["trace_band_hi"] for r in rs]))[ok], color=COLORS[k],
                                    alpha=0.1, linewidth=0)
            else:
                rs = [r for r in rs if r[sec] is not None]
                ax.plot([1e3 * r[sec] for r in rs], [r[col] for r in rs], "o-", color=COLORS[k], markersize=4,
                        linewidth=1.2, label=label)
        if x == "S":
            ax.axhline(emp_err, color=EMP_COLOR, linestyle="-.", linewidth=1.3,
                       label=f"empirical Fisher (fixed error {emp_err:.2g})")
            ax.plot([], [], "--", color="gray", label="exact prediction √(Var / S)"
                    + (", 95% band of the RMS" if what == "trace" else ""))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("number of draws S")
            ax.set_title(f"{what}: error vs number of draws (slope −1/2 = 1/√S)", fontsize=10)
        else:
            ms = 1e3 * exact[what]
            ax.axvline(ms, color="black", linestyle=":", linewidth=1.3, label=f"exact {what} ({ms:.3g} ms)")
            ax.plot([1e3 * exact[f"emp_{what}"]], [emp_err], "*", color=EMP_COLOR, markersize=11,
                    label=f"empirical Fisher (exact, error {emp_err:.2g})")
            Ss = sorted({r["S"] for r in err_rows if r[sec] is not None})
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel(f"wall time of one batch of S = {', '.join(map(str, Ss))} draws [ms]  (one thread)")
            ax.set_title(f"{what}: error vs wall time", fontsize=10)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(frameon=False, fontsize=7)
    return plots.save_png(fig, path)


def _fig_bounds(path: Path, b: dict, ratio_d: Tensor, ratio_i: Tensor, lam_core: Tensor, core: dict) -> Path:
    fig = Figure(figsize=(14, 4.4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    groups = ["trace", "λ_max"]
    vals = {"F": [b["trace_F"], b["lambda_max_F"]], "U_π (diag π)": [b["trace_U_diag"], b["lambda_max_U_diag"]],
            "U_iso ((1−‖π‖²) I)": [b["trace_U_iso"], b["lambda_max_U_iso"]]}
    w = 0.26
    for j, (name, v) in enumerate(vals.items()):
        bars = ax1.bar(np.arange(2) + (j - 1) * w, v, width=w, label=name, color=["tab:blue", "tab:green",
                                                                                 "tab:olive"][j])
        for bar_, val in zip(bars, v, strict=True):
            ax1.annotate(f"{val:.3g}", (bar_.get_x() + bar_.get_width() / 2, val), ha="center", va="bottom",
                         fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax1.set_xticks(range(2), groups)
    ax1.set_yscale("log")
    ax1.set_ylim(top=max(max(v) for v in vals.values()) * 4)
    ax1.set_title("F ≼ U: traces and top eigenvalues", fontsize=10)
    ax1.set_ylabel("value (probe-set mean)")
    ax1.legend(frameon=False, fontsize=8)
    ax1.grid(True, axis="y", alpha=0.3)
    bins = np.linspace(0, 1, 51)
    ax2.hist(ratio_d.clamp(0, 1).numpy(), bins=bins, histtype="stepfilled", alpha=0.5, color="tab:green",
             label=f"diag F / diag U_π (max {ratio_d.max().item():.4f})")
    ax2.hist(ratio_i.clamp(0, 1).numpy(), bins=bins, histtype="stepfilled", alpha=0.5, color="tab:olive",
             label=f"diag F / diag U_iso (max {ratio_i.max().item():.4f})")
    ax2.axvline(1, color="crimson", linestyle="--", linewidth=1)
    ax2.set_yscale("log")
    ax2.set_xlabel("ratio per parameter (bound: ≤ 1)")
    ax2.set_ylabel("parameters")
    ax2.set_title("Diagonal envelopes", fontsize=10)
    ax2.legend(frameon=False, fontsize=8, loc="upper right")
    order = torch.argsort(lam_core)
    xs = np.arange(len(order))
    ax3.plot(xs, core["lambda_max_upper"][order].numpy(), ".", color="tab:olive", markersize=4,
             label="upper 1 − ‖π‖²")
    ax3.plot(xs, lam_core[order].numpy(), "-", color="black", linewidth=1.5, label="λ_max(Λ_n)")
    ax3.plot(xs, core["lambda_max_lower"][order].numpy(), ".", color="tab:green", markersize=4,
             label="lower max π_i(1 − π_i)")
    ax3.set_yscale("log")
    ax3.set_xlabel("probe sample (sorted by λ_max)")
    ax3.set_ylabel("core-space eigenvalue")
    ax3.set_title("Per-sample core spectrum bounds", fontsize=10)
    ax3.legend(frameon=False, fontsize=8)
    ax3.grid(True, alpha=0.3)
    return plots.save_png(fig, path)


# ----------------------------------------------------------------------------- summary
def _g(v, p: int = 3) -> str:
    return f"{v:.{p}g}"


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


def _label(k: str) -> str:
    return _short(k).replace(chr(10), " ")


def _bias_and_cv(by: dict) -> list[str]:
    """The findings on bias and on the CV per parameter."""
    est = list(ESTIMATORS)
    worst_z = max(abs(by[k]["trace_z"]) for k in est)
    worst_z_diag = max(abs(by[k]["trace_from_diag_draws_z"]) for k in est)
    unbiased = worst_z < 4 and worst_z_diag < 4
    rad, gau, rps, mc, mcps = (by[k] for k in est)
    bias = (
        f"**Bias.** {'No estimator shows a bias' if unbiased else '**A bias beyond noise is visible**'}: the trace "
        f"estimate from {by['hutch_rad']['trace_draws']} draws of `fl.fisher_trace` deviates from the exact tr F by "
        + ", ".join(f"{_label(k)} {100 * by[k]['trace_rel_bias']:+.2f}% (z = {by[k]['trace_z']:+.1f})" for k in est)
        + f"; largest |z| {worst_z:.1f} (the same from the summed diagonal draws: {worst_z_diag:.1f}). Per diagonal "
        f"entry the mean of {rad['draws']} draws has z-scores with mean "
        + ", ".join(f"{by[k]['diag_mean_z']:+.2f}" for k in est)
        + " and std " + ", ".join(f"{by[k]['diag_std_z']:.2f}" for k in est) + " (N(0, 1) expected)."
    )
    cv = (
        "**CV per parameter.** Single-draw CV of the diagonal entries, median measured (exact): "
        + ", ".join(f"{_label(k)} {_g(by[k]['cv_median_measured'])} ({_g(by[k]['cv_median_theory'])})" for k in est)
        + f". Exact CV ≤ √2 for {_pct(rad['frac_cv_le_sqrt2_theory'])} of the entries with Rademacher probes "
        f"(max {_g(rad['cv_max_theory'], 5)}), {_pct(gau['frac_cv_le_sqrt2_theory'])} with Gaussian probes (exactly "
        f"√2) and {_pct(rps['frac_cv_le_sqrt2_theory'])} per-sample; the MC Fisher has no such bound: "
        f"{_pct(mc['frac_cv_le_sqrt2_theory'])} (batch, max {_g(mc['cv_max_theory'])}) and "
        f"{_pct(mcps['frac_cv_le_sqrt2_theory'])} (per-sample, max {_g(mcps['cv_max_theory'])}). Measured CVs follow "
        f"the exact ones (median ratio measured/exact "
        + ", ".join(f"{by[k]['cv_measured_over_theory_median']:.3f}" for k in est)
        + "); measured fractions ≤ √2: " + ", ".join(_pct(by[k]["frac_cv_le_sqrt2_measured"]) for k in est)
        + " (the sample std of a CV near √2 lands above it about half the time)."
    )
    return [bias, cv]


def _error_finding(by: dict, err_rows: list[dict]) -> str:
    """The finding on the error against the number of draws."""
    est = list(ESTIMATORS)
    fastest = min(est, key=lambda k: by[k]["diag_rel_l2_S1"])
    slopes_d = [by[k]["slope_diag"] for k in est]
    slopes_t = [by[k]["slope_trace"] for k in est]
    rd = [r["diag_rel_l2_rms"] / r["diag_rel_l2_theory"] for r in err_rows]
    rt = [r["trace_rel_rms"] / r["trace_rel_theory"] for r in err_rows]
    out_band = [r for r in err_rows
                if not r["trace_band_lo"] <= r["trace_rel_rms"] / r["trace_rel_theory"] <= r["trace_band_hi"]]
    outside = ", ".join(f"{r['estimator']} S={r['S']} ({r['repetitions']} reps, "
                        f"{r['trace_rel_rms'] / r['trace_rel_theory']:.2f}×)" for r in out_band)
    band = (f"{len(out_band)} of {len(err_rows)} (estimator, S) points lie outside the 95% band of an RMS over their "
            f"repetitions (kurtosis of the draws included; about 5% expected){': ' + outside if out_band else ''}")
    return (
        f"**Error vs draws.** All errors fall as 1/√S: fitted log-log slopes {min(slopes_d):.3f} to "
        f"{max(slopes_d):.3f} (diag) and {min(slopes_t):.3f} to {max(slopes_t):.3f} (trace). Measured RMS errors "
        f"over disjoint groups of S draws / exact prediction √(Var/S): {min(rd):.2f}–{max(rd):.2f} (diag) and "
        f"{min(rt):.2f}–{max(rt):.2f} (trace); for the trace {band}. One draw gives a relative L2 diagonal error of "
        + ", ".join(f"{_g(by[k]['diag_rel_l2_S1'])}" for k in est)
        + " and a trace error of " + ", ".join(f"{_g(by[k]['trace_rel_S1'])}" for k in est)
        + f" (order as in the table); lowest: {ESTIMATORS[fastest][0]}. A 10% diagonal error needs "
        + ", ".join(f"{by[k]['draws_for_10pct_diag']:.0f}" for k in est) + " draws."
    )


def _time_finding(cfg: EstimatorsConfig, used: dict, by: dict, b: dict) -> str:
    """The finding on wall time."""
    est = list(ESTIMATORS)
    t_ex = b["exact_diag_seconds"]
    tmax = used["tgrid"][-1]
    cheaper = [k for k in est if by[k]["seconds_for_10pct_diag"] < t_ex]
    return (
        f"**Wall time** (one draw batch through `fisherlens.estimators.draws`, one torch thread, fastest of ≥ "
        f"{cfg.timing_repeats} calls, S = {', '.join(map(str, used['tgrid']))}; load average "
        f"{used['load'][0]:.1f} → {used['load'][1]:.1f} on {used['cpus']} CPUs). Marginal cost per draw "
        + ", ".join(f"{1e3 * by[k]['seconds_per_draw']:.2f} ms" for k in est)
        + "; a batch of one draw " + ", ".join(f"{1e3 * by[k]['seconds_S1']:.1f} ms" for k in est)
        + f". The exact diagonal takes {1e3 * t_ex:.1f} ms and the exact trace {1e3 * b['exact_trace_seconds']:.1f} ms "
        f"(all C = {used['C']} output columns in one batched backward pass). Time to a 10% diagonal error: "
        + ", ".join(f"{1e3 * by[k]['seconds_for_10pct_diag']:.1f} ms" for k in est)
        + (f"; only {', '.join(ESTIMATORS[k][0] for k in cheaper)} beat{'s' if len(cheaper) == 1 else ''} the "
           "exact diagonal" if cheaper else "; none beats the exact diagonal")
        + ". A whole `fl.fisher_diag(method=...)` call (draws, then mean and standard error over them) takes "
        + ", ".join(f"{1e3 * by[k]['seconds_fisher_diag_call_S1']:.1f} / "
                    f"{1e3 * by[k][f'seconds_fisher_diag_call_S{tmax}']:.0f} ms" for k in est)
        + f" at S = 1 / {tmax}, against " + ", ".join(f"{1e3 * by[k]['seconds_S1']:.1f} / "
                                                      f"{1e3 * by[k][f'seconds_S{tmax}']:.0f} ms" for k in est)
        + " for the draws alone."
    )


def _bounds_ok(b: dict) -> bool:
    return b["diag_ratio_U_diag_max"] <= 1 + 1e-4 and b["diag_ratio_U_iso_max"] <= 1 + 1e-4 \
        and b["trace_F_over_U_diag"] <= 1 and b["lambda_F_over_U_diag"] <= 1 + 1e-6 \
        and b["lambda_F_over_U_iso"] <= 1 + 1e-6 and b["core_within_bounds"] == b["core_samples"]


def _emp_and_bounds(emp: dict, b: dict) -> list[str]:
    """The findings on the empirical Fisher and on the core-space bounds."""
    return [
        f"**Empirical Fisher.** Not an estimator of F: tr F_emp / tr F = {emp['trace_ratio']:.3f}, relative L2 "
        f"error of its diagonal {emp['diag_rel_l2']:.3f} (a fixed bias that no number of draws removes), median "
        f"per-entry ratio {emp['median_ratio']:.3f}, F_emp > F for {_pct(emp['frac_emp_gt_true'])} of the entries, "
        f"correlation of log-diagonals {emp['log_corr']:.3f}.",
        f"**Core-space bounds** ({'all hold' if _bounds_ok(b) else '**a bound is violated**'}). tr F = "
        f"{_g(b['trace_F'], 4)} ≤ tr U_π = {_g(b['trace_U_diag'], 4)} (ratio {b['trace_F_over_U_diag']:.3f}) ≤ "
        f"tr U_iso = {_g(b['trace_U_iso'], 4)} (ratio {b['trace_F_over_U_iso']:.3f}); diag F / diag U_π ≤ "
        f"{b['diag_ratio_U_diag_max']:.4f} (median {b['diag_ratio_U_diag_median']:.3f}), diag F / diag U_iso ≤ "
        f"{b['diag_ratio_U_iso_max']:.4f} (median {b['diag_ratio_U_iso_median']:.3f}); λ_max(F) = "
        f"{_g(b['lambda_max_F'], 4)} vs λ_max(U_π) = {_g(b['lambda_max_U_diag'], 4)} (ratio "
        f"{b['lambda_F_over_U_diag']:.3f}) and λ_max(U_iso) = {_g(b['lambda_max_U_iso'], 4)} (ratio "
        f"{b['lambda_F_over_U_iso']:.3f}). Per sample, max π_i(1−π_i) ≤ λ_max(Λ_n) ≤ 1 − ‖π_n‖² holds for "
        f"{b['core_within_bounds']}/{b['core_samples']} probe inputs; median lower/λ_max "
        f"{b['core_lower_over_lambda_median']:.3f} (min {b['core_lower_over_lambda_min']:.3f}), median "
        f"λ_max/upper {b['core_lambda_over_upper_median']:.3f} (min {b['core_lambda_over_upper_min']:.3f}).",
    ]


def _estimator_table(by: dict, tmax: int) -> list[str]:
    """The markdown table of the estimators (and the empirical Fisher)."""
    table = [
        "| estimator | tr bias (± s.e.) | z | median rel. err of diag mean (expected) | CV median meas. (exact) "
        "| CV ≤ √2 meas. / exact | diag err S=1 (exact) | trace err S=1 (exact) | slope diag / trace "
        f"| ms per call, S = 1 / {tmax} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ESTIMATORS:
        r = by[k]
        table.append(
            f"| {r['label']} | {100 * r['trace_rel_bias']:+.3f}% ± {100 * r['trace_rel_bias_se']:.3f}% "
            f"| {r['trace_z']:+.2f} | {_g(r['diag_median_rel_err_of_mean'])} "
            f"({_g(r['diag_median_rel_err_of_mean_expected'])}) "
            f"| {_g(r['cv_median_measured'])} ({_g(r['cv_median_theory'])}) "
            f"| {_pct(r['frac_cv_le_sqrt2_measured'])} / {_pct(r['frac_cv_le_sqrt2_theory'])} "
            f"| {_g(r['diag_rel_l2_S1'])} ({_g(r['diag_rel_l2_S1_theory'])}) "
            f"| {_g(r['trace_rel_S1'])} ({_g(r['trace_rel_S1_theory'])}) "
            f"| {r['slope_diag']:.3f} / {r['slope_trace']:.3f} "
            f"| {1e3 * r['seconds_S1']:.1f} / {1e3 * r[f'seconds_S{tmax}']:.0f} |"
        )
    e = by["empirical"]
    table.append(f"| {e['label']} | {100 * e['trace_rel_bias']:+.2f}% | — | {_g(e['diag_median_rel_err_of_mean'])} "
                 f"| 0 (deterministic) | — | {_g(e['diag_rel_l2_S1'])} | {_g(e['trace_rel_S1'])} | — "
                 f"| {1e3 * e['seconds_S1']:.1f} (exact) |")
    return table


def _summary(cfg: EstimatorsConfig, used: dict, rows: list[dict], err_rows: list[dict], b: dict, emp: dict,
             checks: dict, figures: dict) -> str:
    by = {r["estimator"]: r for r in rows}
    findings = [*_bias_and_cv(by), _error_finding(by, err_rows), _time_finding(cfg, used, by, b),
                *_emp_and_bounds(emp, b)]
    tol = 1e-4
    lines = [
        "# fisherlens study: random estimators of the Fisher diagonal and trace",
        "",
        f"Data `{cfg.data}`: {used['n_train']} train / {used['n_test']} test images; model {used['arch']} "
        f"ReLU MLP (P = {used['P']}, float32), Adam lr={cfg.lr}, batch {cfg.batch_size}, "
        f"{cfg.epochs} epoch(s): train loss {used['train_loss']:.3f}, train accuracy {used['train_acc']:.3f}, "
        f"test accuracy {used['test_acc']:.3f}. Measured in eval mode on a probe set of the first "
        f"{used['n_probe']} training images (means over the probe inputs, docs/conventions.md#fisher-information). "
        f"Seed {cfg.seed}"
        f"{' (quick mode)' if cfg.quick else ''}; wall time {used['seconds']:.1f} s.",
        "",
        f"Each estimator: {cfg.draws} single draws of the diagonal (in calls of {cfg.chunk} "
        f"draws sharing the forward pass) and {cfg.trace_draws} draws of `fl.fisher_trace`. CV, relative and "
        f"z statistics use the {used['P'] - used['zero_entries']} entries with diag F > 0 ({used['zero_entries']} "
        "entries are exactly zero: weights of always-blank pixels and dead units). \"Exact\" CVs and errors are "
        "computed from the per-sample Jacobians (module docstring), not from the draws.",
        "",
        "## Findings",
        "",
        *(f"- {x}" for x in findings),
        "",
        "## Estimators",
        "",
        *_estimator_table(by, used["tgrid"][-1]),
        "",
        f"Exact references: tr F = {_g(b['trace_F'], 6)}, tr F_emp = {_g(by['empirical']['trace_mean'], 6)}.",
        "",
        "## Core-space bounds",
        "",
        "| quantity | value |",
        "|---|---|",
        *(f"| {q} | {_g(v, 5) if isinstance(v, float) else v} |" for q, v in b.items()),
        "",
        "## Consistency checks (relative deviation)",
        "",
        "| identity | deviation | |",
        "|---|---|---|",
        *(f"| {q} | {v:.2e} | {'ok' if v < tol else '**CHECK**'} |" for q, v in checks.items()),
        "",
        *figures_section(figures),
        "Tables: [metrics.csv](metrics.csv) (one row per estimator), [error_vs_draws.csv](error_vs_draws.csv), "
        "[bounds.csv](bounds.csv), [core_spectrum.csv](core_spectrum.csv); settings: [config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
