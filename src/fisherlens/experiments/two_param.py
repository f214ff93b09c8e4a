r"""Sauter 2023 §5.2: the Fisher geometry of a 2-parameter network, on a grid and along gradient descent.

The network is one sigmoid neuron without bias (Sauter 2023, eq 5.2.1)

    f_θ(x, y) = 1 / (1 + exp(−5(θ₁x + θ₂y))),

trained on the *decision-boundary* data set: ``N`` points uniform in the unit square, target 1 where
``y > x`` and 0 otherwise (Sauter 2023, §5.2.2).  For each loss — mean power of order 2 ``(f − t)²``, the
L2 norm ``|f − t|`` (``fl.losses.mean_power(2)``, ``fl.losses.lp_norm(2)`` on the one output) and the
binary cross-entropy ``−[t log f + (1 − t) log(1 − f)]`` — the metric is the loss-induced empirical Fisher
of Sauter 2023 §3.2.5 (``fl.LossInduced(loss)``, ``kind="empirical"``, a mean over the N points)

    I(θ) = (1/N) Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ,

and we record, on a θ grid and along a gradient-descent path from θ = (0.5, 0.5):
the loss, ``I₁₁, I₁₂, I₂₂``, ``tr I``, the NTK trace ``tr Θ = Σ_n ‖∇_θ f(x_n)‖²`` (summed over the N
points, the ``fl.ntk_trace`` convention; it does not depend on the loss) and the scalar curvature ``R``
of ``I`` (:func:`fisherlens.geometry.curvature`, docs/conventions.md#curvature conventions, ``R = 2K`` in 2-D).

Numerics: the cross-entropy is evaluated from the logit ``z = 5 θ·x`` as ``BCE-with-logits(z, t)`` — the
same function of θ as the formula on the probability, but finite where ``σ(z)`` rounds to 1 in float64
(``z > 37``), where the probability form gives ``log 0``.  The two agree where both are finite (tested).
Points whose metric is ill-conditioned (condition number above ``cond_max``) are marked singular with the
reason, never silently NaN.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from matplotlib import colors
from matplotlib.figure import Figure
from torch import nn

import fisherlens as fl

from .. import geometry
from ..plots import save_png
from ._common import as_tuple, check_int, check_number
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor
DTYPE = torch.float64

__all__ = [
    "LOSSES",
    "DATASETS",
    "SigmoidNeuron",
    "binary_cross_entropy",
    "binary_cross_entropy_logits",
    "decision_boundary",
    "gradient_descent",
    "two_param",
    "TwoParam",
    "TwoParamConfig",
]


# ----------------------------------------------------------------------------- model, losses, data
class SigmoidNeuron(nn.Module):
    """``f_θ(x) = σ(s θ·x)`` for inputs ``x (B, 2)``, no bias (Sauter 2023, eq 5.2.1, steepness ``s = 5``).

    Args:
        theta: initial ``(θ₁, θ₂)``, stored as the float64 parameter ``weight``.
        steepness: the factor ``s``.
        output: ``"probability"`` returns ``σ(z)`` ``(B, 1)``; ``"logit"`` returns ``z = s θ·x`` ``(B, 1)``.
    """

    def __init__(self, theta: Sequence[float] = (0.5, 0.5), steepness: float = 5.0, output: str = "probability"):
        super().__init__()
        if output not in ("probability", "logit"):
            raise ValueError(f"output={output!r}: choose 'probability' or 'logit'.")
        self.weight = nn.Parameter(torch.as_tensor(theta, dtype=DTYPE).clone())
        self.steepness = float(steepness)
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        z = self.steepness * (x * self.weight).sum(-1)  # not x @ w: vmap over θ batches mv slowly
        return (z if self.output == "logit" else torch.sigmoid(z))[:, None]


def binary_cross_entropy(f: Tensor, y: Tensor) -> Tensor:
    """``ℓ = −[t log f + (1 − t) log(1 − f)]`` on the probability ``f (B, 1)``; per sample ``(B,)``.

    The thesis's cross-entropy for one sigmoid output (``fl.losses.softmax_cross_entropy`` needs C ≥ 2 logits).
    Infinite where ``f`` rounds to 0 or 1; :func:`binary_cross_entropy_logits` is the stable equivalent.
    """
    t = y.reshape(f.shape).to(f.dtype)
    return -(t * torch.log(f) + (1 - t) * torch.log1p(-f)).sum(-1)


def binary_cross_entropy_logits(z: Tensor, y: Tensor) -> Tensor:
    """:func:`binary_cross_entropy` of ``f = σ(z)`` from the logit ``z (B, 1)``, stable for all ``z``:
    ``ℓ = log(1 + e^z) − t z`` (``torch.logaddexp``; as exact as ``F.binary_cross_entropy_with_logits`` and
    1.6× faster under the nested forward-mode derivatives of the curvature)."""
    return (torch.logaddexp(torch.zeros_like(z), z) - y.reshape(z.shape).to(z.dtype) * z).sum(-1)


@dataclass(frozen=True)
class LossCase:
    """One loss of the study: the model output it acts on, the loss, and its gradient-descent settings."""

    label: str
    output: str  # "probability" or "logit" (the network output the loss function receives)
    loss: Callable[[Tensor, Tensor], Tensor]
    lr: float
    steps: int


#: the three losses of Sauter 2023 §5.2 (figs 5.3, 5.5–5.10); learning rates per loss (as in the thesis), the
#: largest of 0.5, 1, 1.5, ... for which the default path does not zig-zag across the valley.
LOSSES: dict[str, LossCase] = {
    "mean_power": LossCase("mean power loss, n = 2", "probability", fl.losses.mean_power(2), lr=1.0, steps=400),
    "l2_norm": LossCase("L2-norm loss", "probability", fl.losses.lp_norm(2), lr=1.0, steps=400),
    "cross_entropy": LossCase("cross-entropy loss", "logit", binary_cross_entropy_logits, lr=0.5, steps=400),
}


def decision_boundary(n: int, seed: int = 0, noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """``n`` points uniform in the unit square with target 1 where ``y > x`` (Sauter 2023, §5.2.2).

    Args:
        n: number of points.
        seed: seed of the points (and of the label flips).
        noise: fraction of labels flipped at random (0 for the thesis's data set).

    Returns:
        ``X (n, 2)`` float64 and targets ``t (n,)`` float64 in {0, 1}.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n_data must be an integer >= 2, got {n!r}.")
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=gen, dtype=DTYPE)
    t = (X[:, 1] > X[:, 0]).to(DTYPE)
    if noise:
        flip = torch.rand(n, generator=gen, dtype=DTYPE) < noise
        t = torch.where(flip, 1 - t, t)
    return X, t


#: named data sets (``data=``): name -> (description, noise)
DATASETS = {
    "decision-boundary": ("uniform in the unit square, target 1 where y > x (Sauter 2023, §5.2.2)", 0.0),
    "noisy-boundary": ("as decision-boundary with 10% of the labels flipped (not separable)", 0.1),
}

def _load_data(data, n: int, seed: int) -> tuple[str, Tensor, Tensor]:
    if data is None:
        data = "decision-boundary"
    if isinstance(data, str):
        if data not in DATASETS:
            raise ValueError(f"two-param: unknown data set {data!r}; choose one of {', '.join(DATASETS)} or pass "
                             "(X (N, 2), t (N,)) tensors.")
        X, t = decision_boundary(n, seed, DATASETS[data][1])
        return data, X, t
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, Tensor) for v in data)):
        raise TypeError(f"two-param: data must be a data set name or (X, t) tensors, got {type(data).__name__}.")
    X, t = data[0].to(DTYPE), data[1].to(DTYPE).reshape(-1)
    if X.dim() != 2 or X.shape[1] != 2 or len(t) != len(X) or len(X) < 2:
        raise ValueError(f"two-param: data must be X (N, 2) and t (N,), N >= 2; got {tuple(X.shape)} and "
                         f"{tuple(data[1].shape)}.")
    if ((t < 0) | (t > 1)).any():
        raise ValueError("two-param: targets must lie in [0, 1].")
    return "custom", X, t


# ----------------------------------------------------------------------------- training
def gradient_descent(metric: geometry.FisherMetric, theta0: Tensor, lr: float, steps: int) -> Tensor:
    """Full-batch gradient descent ``θ ← θ − lr ∇L(θ)`` on ``L = metric.loss``; returns the path ``(steps+1, d)``."""
    path = [torch.as_tensor(theta0, dtype=DTYPE)]
    for _ in range(steps):
        th = path[-1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(metric.loss(th), th)
        path.append((th - lr * grad).detach())
    return torch.stack(path)


# ----------------------------------------------------------------------------- observables
def _chunked(fn: Callable[[Tensor], Tensor], thetas: Tensor, step: int = 8192) -> Tensor:
    v = torch.func.vmap(fn)
    return torch.cat([v(thetas[i : i + step]) for i in range(0, len(thetas), step)])


def grid_observables(metric: geometry.FisherMetric, prob: geometry.FisherMetric, thetas: Tensor, *, cond_max: float,
                 regularize: float | None, chunk_size: int | None, progress: bool, desc: str) -> dict:
    """Loss, metric entries, traces and R at ``thetas (M, 2)``; singular points flagged, never silent NaN."""
    with warnings.catch_warnings():  # the flags are returned and reported in the summary
        warnings.simplefilter("ignore", geometry.IllConditionedMetricWarning)
        c = geometry.curvature(metric, thetas, cond_max=cond_max, regularize=regularize, chunk_size=chunk_size,
                               progress=progress, desc=desc)
    g = c.metric
    out = {
        "loss_value": _chunked(metric.loss, thetas),
        "I11": g[:, 0, 0], "I12": g[:, 0, 1], "I22": g[:, 1, 1], "trace_I": g[:, 0, 0] + g[:, 1, 1],
        "ntk_trace": _chunked(prob.ntk_trace, thetas),
        "R": c.scalar, "cond": c.cond, "singular": c.singular, "regularized": c.regularized, "reason": c.reason,
    }
    with torch.no_grad():
        f = _chunked(prob.outputs, thetas)[..., 0]  # (M, N) probabilities
    out["accuracy"] = ((f > 0.5).to(DTYPE) == (prob.Y > 0.5).to(DTYPE)).to(DTYPE).mean(-1)
    return out


def _rows(loss: str, thetas: Tensor, obs: dict, extra: dict | None = None) -> list[dict]:
    cols = ["loss_value", "I11", "I12", "I22", "trace_I", "ntk_trace", "R", "cond", "accuracy"]
    arr = {k: obs[k].tolist() for k in cols}
    sing, reg, why = obs["singular"].tolist(), obs["regularized"].tolist(), obs["reason"]
    th = thetas.tolist()
    rows = []
    for m in range(len(th)):
        r = {"loss": loss}
        if extra:
            r.update({k: v[m] for k, v in extra.items()})
        r.update({"theta1": th[m][0], "theta2": th[m][1]})
        r.update({k: _fmt(arr[k][m]) for k in cols})
        r.update({"singular": int(sing[m]), "regularized": int(reg[m]), "reason": why[m]})
        rows.append(r)
    return rows


def _fmt(v: float) -> str:
    """Compact float text for the (large) grid table: 10 significant digits."""
    return f"{v:.10g}"


# ----------------------------------------------------------------------------- options
def _lr_plan(lr, keys: list[str]) -> dict[str, float]:
    """``lr`` as ``{loss: learning rate}``: a mapping naming known losses, or one number for every loss in ``keys``."""
    if lr is None:
        return {}
    if not isinstance(lr, dict):  # --set lr=0.1: the same learning rate for every loss
        lr = dict.fromkeys(keys, lr)
    for k, v in lr.items():
        if k not in LOSSES:
            raise ValueError(f"two-param: lr= names unknown loss {k!r}.")
        check_number(f"two-param: lr[{k!r}] (a number, or a mapping {{loss: number}})", v, lo=0)
    return lr


def _check_numbers(name: str, value, n: int, what: str) -> None:
    """Refuse anything but a list of ``n`` finite numbers for the option ``name``."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"two-param: {name} must be {n} numbers {what}, got {value!r}.")
    for i, v in enumerate(value):
        check_number(f"two-param: {name}[{i}]", v)


@dataclass
class TwoParamConfig(StudyConfig):
    """Options of the two-parameter study (defaults: the full study; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seed of the data set.
        data: ``None``/``"decision-boundary"`` (default), ``"noisy-boundary"``, or tensors ``(X (N, 2), t (N,))``.
        n_data: points in a named data set (100; quick 40).
        grid: ``(θ₁ min, θ₁ max, θ₂ min, θ₂ max)`` of the θ grid.
        resolution: grid points per axis (201; quick 21).
        losses: subset of :data:`LOSSES` (default all three; one name: that loss only).
        steps: gradient-descent steps for every loss (default ``None``: per loss, 400; quick 60).
        lr: ``{loss: learning rate}`` overriding :data:`LOSSES`, or one number for every loss.
        theta0: start of gradient descent (seed: (0.5, 0.5)).
        steepness: the factor 5 of eq 5.2.1 (a positive number).
        cond_max: points whose metric has a larger condition number are singular (or regularised).
        regularize: ``None`` (flag singular points) or ``eps`` (use ``I + eps·Id`` there, flagged).
        chunk_size: grid points per vectorised chunk (default: automatic).
        threads: torch intra-op threads during the run (1: the tensors are small and one thread is as fast as two
            on 2 cores and much faster on a loaded machine; ``None`` leaves torch's setting).
    """

    QUICK = {"n_data": 40, "resolution": 21, "steps": 60}

    data: Any = None
    n_data: int = 100
    grid: Sequence[float] = (-6.0, 2.0, -2.0, 6.0)
    resolution: int = 201
    losses: Any = tuple(LOSSES)
    steps: int | None = None
    lr: Any = None
    theta0: Sequence[float] = (0.5, 0.5)
    steepness: float = 5.0
    cond_max: float = geometry.COND_MAX
    regularize: float | None = None
    chunk_size: int | None = None
    threads: int | None = 1

    def validate(self) -> None:
        self.losses = list(as_tuple(self.losses))  # losses=l2_norm: that one
        for k in self.losses:
            if k not in LOSSES:
                raise ValueError(f"two-param: unknown loss {k!r}; choose from {', '.join(LOSSES)}.")
        if not self.losses:
            raise ValueError("two-param: losses= is empty.")
        self.lr = _lr_plan(self.lr, self.losses)
        if not isinstance(self.resolution, int) or self.resolution < 2:
            raise ValueError(f"two-param: resolution must be an integer >= 2, got {self.resolution!r}.")
        g = self.grid
        _check_numbers("grid", g, 4, "(θ1 min, θ1 max, θ2 min, θ2 max)")
        if not (g[0] < g[1] and g[2] < g[3]):
            raise ValueError(f"two-param: grid must be (θ1 min, θ1 max, θ2 min, θ2 max) with min < max, got {g!r}.")
        _check_numbers("theta0", self.theta0, 2, "(θ1, θ2)")
        super().validate()
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"two-param: steps must be a positive integer, got {self.steps!r}.")
        if self.data is None or isinstance(self.data, str):  # a named data set is drawn with n_data points
            check_int("two-param: n_data", self.n_data, 2)
        check_number("two-param: steepness", self.steepness, lo=0)
        check_number("two-param: cond_max", self.cond_max, lo=1)
        if self.regularize is not None:
            check_number("two-param: regularize (None or eps > 0)", self.regularize, lo=0)
        if self.chunk_size is not None:
            check_int("two-param: chunk_size", self.chunk_size, 1)

    def plan(self) -> dict[str, dict]:
        """Gradient-descent settings per loss: ``{loss: {"lr": ..., "steps": ...}}``."""
        return {k: {"lr": float(self.lr.get(k, LOSSES[k].lr)),
                    "steps": self.steps if self.steps is not None else LOSSES[k].steps} for k in self.losses}


def _one_loss(cfg: TwoParamConfig, k: str, X: Tensor, t: Tensor, thetas: Tensor, prob, run: StudyRun) -> dict:
    """Gradient descent, the observables on the grid and along the path, and the library check for loss ``k``."""
    case, plan = LOSSES[k], cfg.plan()[k]
    model = SigmoidNeuron(cfg.theta0, cfg.steepness, case.output)
    metric = geometry.fisher_metric(model, (X, t), fl.LossInduced(case.loss), "empirical")
    path = gradient_descent(metric, torch.as_tensor(cfg.theta0, dtype=DTYPE), plan["lr"], plan["steps"])
    opts = {"cond_max": cfg.cond_max, "regularize": cfg.regularize, "chunk_size": cfg.chunk_size}
    tg = time.perf_counter()
    gobs = grid_observables(metric, prob, thetas, progress=run.progress, desc=f"two-param: {k} grid", **opts)
    grid_seconds = time.perf_counter() - tg
    pobs = grid_observables(metric, prob, path, progress=False, desc=f"two-param: {k} path", **opts)
    # cumulative Riemannian length along the path (left rule, docs/conventions.md#path-length), from the metric
    # values above
    d = path[1:] - path[:-1]
    G = torch.stack([torch.stack([pobs["I11"], pobs["I12"]], -1), torch.stack([pobs["I12"], pobs["I22"]], -1)], -2)
    seg = torch.einsum("ti,tij,tj->t", d, G[:-1], d).clamp_min(0).sqrt()
    arc = torch.cat([torch.zeros(1, dtype=DTYPE), seg.cumsum(0)])
    length = geometry.path_length(metric, path)
    # library cross-check at the end of the path: fl.fisher_matrix on the model at θ_T
    with torch.no_grad():
        model.weight.copy_(path[-1])
    lib = fl.fisher_matrix(model, (X, t), fl.LossInduced(case.loss), "empirical")
    lib_dev = ((lib - metric(path[-1])).abs().max() / lib.abs().max()).item()
    return {"grid": gobs, "path": pobs, "theta": path, "arc": arc, "length": length, "lib_dev": lib_dev,
            "grid_seconds": grid_seconds}


class TwoParam(Study):
    """The Fisher geometry of a 2-parameter network on a grid and along gradient descent (module docstring)."""

    name = "two-param"
    description = ("Sauter 2023 §5.2: one sigmoid neuron with 2 weights; loss surfaces, Fisher entries, traces, NTK "
                   "trace and scalar curvature R on a θ grid and along gradient descent, for three losses.")
    Config = TwoParamConfig

    def setup(self, cfg: TwoParamConfig) -> tuple[str, Tensor, Tensor]:
        return _load_data(cfg.data, cfg.n_data, cfg.seed)

    def config_json(self, cfg: TwoParamConfig, inputs) -> dict:
        name, X, _ = inputs
        return {
            "experiment": "two-param", "quick": cfg.quick, "seed": cfg.seed, "data": name, "n_data": len(X),
            "grid": [float(v) for v in cfg.grid], "resolution": cfg.resolution, "losses": cfg.losses,
            "gd": cfg.plan(), "theta0": [float(v) for v in cfg.theta0], "steepness": cfg.steepness,
            "cond_max": cfg.cond_max, "regularize": cfg.regularize,
            "fisher": "loss-induced empirical Fisher, mean over N (docs/conventions.md#fisher-information)",
            "ntk_trace": "sum over the N points of |grad_theta f|^2 (fl.ntk_trace convention)",
        }

    def compute(self, cfg: TwoParamConfig, run: StudyRun) -> dict:
        _, X, t = run.inputs
        res, g = cfg.resolution, cfg.grid
        t1 = torch.linspace(g[0], g[1], res, dtype=DTYPE)
        t2 = torch.linspace(g[2], g[3], res, dtype=DTYPE)
        thetas = torch.cartesian_prod(t1, t2)  # row m = (θ1_i, θ2_j), m = i·res + j
        prob = geometry.fisher_metric(SigmoidNeuron(cfg.theta0, cfg.steepness), (X, t),
                                      fl.LossInduced(fl.losses.mean_power(2)), "empirical")
        grid_rows: list[dict] = []
        path_rows: list[dict] = []
        results: dict[str, dict] = {}
        for k in run.bar(desc="losses", iterable=cfg.losses, hide=len(cfg.losses) < 2):
            r = results[k] = _one_loss(cfg, k, X, t, thetas, prob, run)
            grid_rows += _rows(k, thetas, r["grid"], {"i": [m // res for m in range(len(thetas))],
                                                      "j": [m % res for m in range(len(thetas))]})
            path_rows += _rows(k, r["theta"], r["path"], {"step": list(range(len(r["theta"]))),
                                                          "arc_length": r["arc"].tolist()})
        run.write_csv("metrics.csv", path_rows)
        run.write_csv("grid.csv", grid_rows)
        return {"results": results, "t1": t1, "t2": t2, "X": X, "t": t}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        cfg = run.cfg
        return _figures(run, cfg.losses, r["results"], r["t1"], r["t2"], r["X"], r["t"], cfg.steepness,
                        dpi=60 if cfg.quick else 100)

    def report(self, r: dict, run: StudyRun) -> str:
        timings = {k: v["grid_seconds"] for k, v in r["results"].items()}
        return _summary(self.config_json(run.cfg, run.inputs), run.cfg.losses, r["results"], len(r["X"]),
                        run.elapsed(), timings, run.figures)


def two_param(out: str | os.PathLike, quick: bool = False, seed: int = 0, data=None, *, progress: bool = True,
              **options) -> Path:
    """Sauter 2023 §5.2 study; writes a run folder and returns its path.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: small settings for tests (21×21 grid, 40 points, 60 steps; seconds).
        seed: seed of the data set.
        data: ``None``/``"decision-boundary"`` (default), ``"noisy-boundary"``, or tensors ``(X (N, 2), t (N,))``.
        progress: tqdm bars over grid chunks.
        **options: the fields of :class:`TwoParamConfig` (``losses``, ``resolution``, ``steps``, ``lr``, ...).

    Returns:
        Path of the run folder: ``config.json``, ``metrics.csv`` (path values), ``grid.csv`` (grid values),
        PNG figures and ``summary.md``.
    """
    return run_study(TwoParam, out, quick, seed, progress=progress, data=data, **options)


# ----------------------------------------------------------------------------- checks for the summary
def _intervals(idx: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1–3, 7"``."""
    if not idx:
        return "none"
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts[:12]) + (f", … ({len(parts)} runs)" if len(parts) > 12 else "")


def _ratio_stats(trace: Tensor, ntk: Tensor, ok: Tensor) -> tuple[float, float, float, float]:
    """Mean, min, max and relative spread (max − min)/mean of ``tr I / tr Θ`` over ``ok`` points."""
    r = (trace / ntk)[ok & (ntk > 0)]
    if r.numel() == 0:
        return (math.nan,) * 4
    mean = r.mean().item()
    return mean, r.min().item(), r.max().item(), (r.max() - r.min()).item() / abs(mean)


def _curvature_checks(R: Tensor, sing: Tensor) -> dict:
    ok = ~sing & torch.isfinite(R)
    Rv = R.tolist()
    neg = [i for i, v in enumerate(Rv) if ok[i] and v < 0]
    nonneg = [i for i in range(len(Rv)) if ok[i] and not Rv[i] < 0]
    steps = [i for i in range(len(Rv) - 1) if ok[i] and ok[i + 1]]
    up = [i for i in steps if Rv[i + 1] > Rv[i]]
    rise = max((Rv[i + 1] - Rv[i] for i in up), default=0.0)
    return {"n": int(ok.sum()), "neg": len(neg), "nonneg": nonneg, "up": up, "steps": len(steps), "rise": rise,
            "first": Rv[0], "last": Rv[-1], "min": min((Rv[i] for i in range(len(Rv)) if ok[i]), default=math.nan),
            "max": max((Rv[i] for i in range(len(Rv)) if ok[i]), default=math.nan)}


def _gd_and_claim1(config: dict, keys, results: dict, N: int) -> list[str]:
    """The gradient-descent table and claim 1 (tr I ∝ tr Θ for the L2-norm loss)."""
    L = ["## Gradient descent", "",
         "| loss | lr | steps | θ start → end | loss start → end | accuracy at end | Riemannian path length |",
         "|---|---|---|---|---|---|---|"]
    for k in keys:
        r, p = results[k], results[k]["path"]
        th = r["theta"]
        L.append(
            f"| {LOSSES[k].label} | {config['gd'][k]['lr']:g} | {config['gd'][k]['steps']} | "
            f"({th[0, 0]:.2f}, {th[0, 1]:.2f}) → ({th[-1, 0]:.2f}, {th[-1, 1]:.2f}) | "
            f"{p['loss_value'][0]:.4g} → {p['loss_value'][-1]:.4g} | {p['accuracy'][-1]:.3f} | {r['length']:.4g} |"
        )
    L += ["", "## Claim 1: for the L2-norm loss, tr I and tr Θ differ only by a constant factor", ""]
    L += [
        "Factor `tr I / tr Θ` over all non-singular grid points and along the path "
        "(relative spread = (max − min)/mean). For a single output and ℓ = |f − t| the residual is ±1, so "
        f"the factor is exactly 1/N = {1 / N:.6g} (1 with the per-point mean NTK).",
        "",
        "| loss | where | factor (mean) | min | max | relative spread |",
        "|---|---|---|---|---|---|",
    ]
    for k in keys:
        for where in ("grid", "path"):
            o = results[k][where]
            mean, lo, hi, spread = _ratio_stats(o["trace_I"], o["ntk_trace"], ~o["singular"])
            L.append(f"| {LOSSES[k].label} | {where} | {mean:.6g} | {lo:.6g} | {hi:.6g} | {spread:.3g} |")
    if "l2_norm" in keys:
        o = results["l2_norm"]["grid"]
        mean, _, _, spread = _ratio_stats(o["trace_I"], o["ntk_trace"], ~o["singular"])
        verdict = "**confirmed**" if spread < 1e-8 and abs(mean * N - 1) < 1e-8 else "**not confirmed**"
        L += ["", f"Verdict: {verdict} — L2-norm factor {mean:.10g} (N·factor = {mean * N:.12g}), relative "
                  f"spread {spread:.2e} over the grid. The other losses weight each point by its residual, so "
                  "their factor varies (table)."]
    return L


def _claim2(keys, results: dict) -> list[str]:
    """Claim 2: R < 0 and decreasing along the path."""
    L = ["", "## Claim 2: R is negative and decreases along the gradient-descent path", ""]
    L += ["| loss | R at start | R at end | min / max R on path | steps with R ≥ 0 | steps where R increases "
          "| largest increase | grid: points with R < 0 |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for k in keys:
        pc = _curvature_checks(results[k]["path"]["R"], results[k]["path"]["singular"])
        gc = _curvature_checks(results[k]["grid"]["R"], results[k]["grid"]["singular"])
        L.append(
            f"| {LOSSES[k].label} | {pc['first']:.4g} | {pc['last']:.4g} | {pc['min']:.4g} / {pc['max']:.4g} | "
            f"{len(pc['nonneg'])} of {pc['n']} | {len(pc['up'])} of {pc['steps']} | {pc['rise']:.3g} | "
            f"{gc['neg']} of {gc['n']} ({gc['neg'] / max(gc['n'], 1):.1%}) |"
        )
        neg_ok = not pc["nonneg"]
        dec_ok = not pc["up"]
        notes.append(
            f"- {LOSSES[k].label}: R < 0 at every path step: {'yes' if neg_ok else 'no'}"
            + ("" if neg_ok else f" (R ≥ 0 at steps {_intervals(pc['nonneg'])})")
            + f"; R decreases at every step: {'yes' if dec_ok else 'no'}"
            + ("" if dec_ok else f" (R increases at steps {_intervals(pc['up'])} — step s means from s to s+1)")
            + "."
        )
    return [*L, "", *notes]


def _singular_and_consistency(keys, results: dict) -> list[str]:
    L = ["", "## Singular points", ""]
    for k in keys:
        for where in ("grid", "path"):
            o = results[k][where]
            ns, nr = int(o["singular"].sum()), int(o["regularized"].sum())
            reasons = sorted({r.split(" > ")[0] if "condition number" in r else r for r in o["reason"] if r})
            L.append(f"- {LOSSES[k].label}, {where}: {ns} singular, {nr} regularised of {len(o['R'])} points"
                     + (f" (reasons: {'; '.join(reasons[:3])})" if reasons else "")
                     + f"; condition number ≤ {o['cond'][~o['singular']].max().item():.3g} elsewhere.")
    L += ["", "## Consistency", ""]
    for k in keys:
        L.append(f"- {LOSSES[k].label}: metric at the end of the path vs `fl.fisher_matrix` (empirical, "
                 f"LossInduced): max relative deviation {results[k]['lib_dev']:.2e} "
                 f"({'ok' if results[k]['lib_dev'] < 1e-10 else '**CHECK**'}).")
    return L


def _summary(config: dict, keys, results: dict, N: int, elapsed: float, timings: dict, figures: dict) -> str:
    res = config["resolution"]
    L = [
        "# Sauter 2023 §5.2: Fisher geometry of the 2-parameter network",
        "",
        f"Network `f = 1/(1 + exp(−{config['steepness']:g}(θ₁x + θ₂y)))`, no bias; data `{config['data']}`, "
        f"N = {N} points (seed {config['seed']}); θ grid {res}×{res} over θ₁ ∈ [{config['grid'][0]:g}, "
        f"{config['grid'][1]:g}], θ₂ ∈ [{config['grid'][2]:g}, {config['grid'][3]:g}]; gradient descent from "
        f"θ = ({config['theta0'][0]:g}, {config['theta0'][1]:g}){' (quick mode)' if config['quick'] else ''}. "
        f"Wall time {elapsed:.1f} s ("
        + ", ".join(f"{k} grid {v:.1f} s" for k, v in timings.items()) + ").",
        "",
        "I is the loss-induced empirical Fisher `(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ` (mean over N); tr Θ = Σ_n ‖∇_θ f(x_n)‖² "
        "is the NTK trace summed over the N points (so for a per-point mean divide by N); R is the scalar "
        "curvature of I (docs/conventions.md#curvature; R = 2 × Gaussian curvature in 2-D). The cross-entropy is "
        "−[t log f + (1−t) log(1−f)], evaluated from the logit (same function, no log 0).",
        "",
        *_gd_and_claim1(config, keys, results, N),
        *_claim2(keys, results),
        *_singular_and_consistency(keys, results),
        "", *figures_section(figures),
        "Path values per step: [metrics.csv](metrics.csv); grid values: [grid.csv](grid.csv) "
        "(row per loss and grid point; `singular`/`reason` mark points without a value); settings: "
        "[config.json](config.json).", "",
    ]
    return "\n".join(L)


# ----------------------------------------------------------------------------- figures
def _norm(v: np.ndarray, kind: str):
    """Colour normalisation: ``log`` (positive values; ``symlog`` if some are ≤ 0), ``symlog`` (signed,
    centred on 0; ``log`` if all are positive) or ``lin``.  Returns ``(norm, colormap name)``."""
    fin = v[np.isfinite(v)]
    if fin.size == 0 or kind == "lin":
        return None, "magma"
    if kind in ("log", "symlog") and (fin > 0).all():
        lo = max(np.percentile(fin, 0.5), fin.max() * 1e-12)
        return colors.LogNorm(vmin=lo, vmax=fin.max()), "viridis"
    m = np.abs(fin).max()
    if m == 0:
        return None, "RdBu_r"
    nz = np.abs(fin[fin != 0])
    lin = max(np.percentile(nz, 5), m * 1e-6)  # at most ~6 decades per sign
    return colors.SymLogNorm(linthresh=lin, vmin=-m, vmax=m, base=10), "RdBu_r"


def _symlog_ticks(norm: colors.SymLogNorm) -> tuple[list[float], list[str]]:
    """0 and ±10^k at up to 3 decades per sign, so that the colour-bar labels do not overlap."""
    lo, hi = math.ceil(math.log10(norm.linthresh)), math.floor(math.log10(norm.vmax))
    if hi < lo:
        return [0.0], ["0"]
    ks = list(range(hi, lo - 1, -max(1, math.ceil((hi - lo + 1) / 3))))
    ticks = [-(10.0**k) for k in ks] + [0.0] + [10.0**k for k in reversed(ks)]
    labels = [f"$-10^{{{k}}}$" for k in ks] + ["0"] + [f"$10^{{{k}}}$" for k in reversed(ks)]
    return ticks, labels


def _heat(fig, ax, values: Tensor, sing: Tensor | None, extent, path: Tensor, title: str, kind: str, res: int,
          contours: bool = False) -> None:
    """Heat map of a grid quantity (θ₁ across, θ₂ up) with the descent path; singular cells grey."""
    v = values.reshape(res, res).T.numpy().copy()
    s = np.zeros_like(v, dtype=bool) if sing is None else sing.reshape(res, res).T.numpy()
    v[s] = np.nan
    norm, cmap = _norm(v, kind)
    cm = mpl.colormaps[cmap].with_extremes(bad="0.6")
    im = ax.imshow(np.ma.masked_invalid(v), origin="lower", extent=extent, aspect="auto", cmap=cm, norm=norm,
                   interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    if isinstance(norm, colors.SymLogNorm):
        ticks, labels = _symlog_ticks(norm)
        cb.set_ticks(ticks, labels=labels)
        cb.minorticks_off()
    if contours:
        x = np.linspace(extent[0], extent[1], res)
        y = np.linspace(extent[2], extent[3], res)
        ax.contour(x, y, np.ma.masked_invalid(v), levels=12, colors="white", linewidths=0.5, alpha=0.6)
    p = path.numpy()
    ax.plot(p[:, 0], p[:, 1], ":", color="black", linewidth=2.2)
    ax.plot(p[:, 0], p[:, 1], ":", color="white", linewidth=1.1)
    ax.plot(*p[0], "o", color="white", markeredgecolor="black", markersize=5)
    ax.plot(*p[-1], "*", color="white", markeredgecolor="black", markersize=10)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    n_s = int(s.sum())
    ax.set_title(title + (f"  [{n_s} singular cells: grey]" if n_s else ""), fontsize=10)
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")


def _fig_data(path: Path, X: Tensor, t: Tensor, dpi: int) -> None:
    Xn, tn = X.numpy(), t.numpy()
    fig = Figure(figsize=(5.6, 4.4))
    ax = fig.add_axes((0.12, 0.12, 0.6, 0.78))
    ax.scatter(Xn[tn > 0.5, 0], Xn[tn > 0.5, 1], s=14, c="tab:red", label="target 1")
    ax.scatter(Xn[tn <= 0.5, 0], Xn[tn <= 0.5, 1], s=14, c="tab:blue", label="target 0")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="y = x")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="x", ylabel="y", title=f"Data set (N = {len(X)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    save_png(fig, path, tight=False, dpi=dpi)


def _fig_loss_surfaces(path: Path, keys, results: dict, extent, res: int, dpi: int) -> None:
    fig = Figure(figsize=(5.4 * len(keys), 4.6))
    fig.subplots_adjust(left=0.06 if len(keys) > 1 else 0.14, right=0.97, bottom=0.12, top=0.88, wspace=0.3)
    for i, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        _heat(fig, ax, results[k]["grid"]["loss_value"], None, extent, results[k]["theta"],
              f"({'ABC'[i]}) {LOSSES[k].label}", "lin", res, contours=True)
    fig.suptitle("Loss surfaces and the gradient-descent path (dotted; ○ start, ★ end)")
    save_png(fig, path, tight=False, dpi=dpi)


def _fig_surfaces(path: Path, k: str, r: dict, extent, res: int, dpi: int) -> None:
    """I₁₁, I₁₂, I₂₂, tr I, tr Θ and R over the grid for loss ``k``."""
    panels = [("I11", "I₁₁", "log"), ("I12", "I₁₂", "symlog"), ("I22", "I₂₂", "log"),
              ("trace_I", "tr I", "log"), ("ntk_trace", "NTK trace tr Θ", "log"), ("R", "scalar curvature R", "symlog")]
    fig = Figure(figsize=(16.0, 9.2))
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.07, top=0.9, wspace=0.3, hspace=0.32)
    o = r["grid"]
    for i, (key, title, kind) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        _heat(fig, ax, o[key], None if key == "ntk_trace" else o["singular"], extent, r["theta"], title, kind, res)
    fig.suptitle(f"Fisher information I, NTK trace and scalar curvature R — {LOSSES[k].label}\n"
                 "(colours on log scales; R on a symmetric log scale, red > 0 > blue)")
    save_png(fig, path, tight=False, dpi=dpi)


def _fig_path(path: Path, k: str, p: dict, dpi: int) -> None:
    """tr I, tr Θ and R along the gradient-descent path of loss ``k``."""
    steps = np.arange(len(p["R"]))
    fig = Figure(figsize=(7.2, 7.0))
    fig.subplots_adjust(left=0.14, right=0.86, bottom=0.08, top=0.93, hspace=0.08)
    ax1, ax3 = fig.subplots(2, 1, sharex=True)
    l1 = ax1.plot(steps, p["trace_I"].numpy(), color="tab:blue", label="Fisher trace tr I (left axis)")
    ax1.set_yscale("log")
    ax1.set_ylabel("tr I")
    ax2 = ax1.twinx()
    l2 = ax2.plot(steps, p["ntk_trace"].numpy(), color="tab:orange", linestyle="--",
                  label="NTK trace tr Θ (right axis)")
    ax2.set_yscale("log")
    ax2.set_ylabel("tr Θ")
    ax1.legend(l1 + l2, [ln.get_label() for ln in l1 + l2], frameon=False, loc="best")
    ax1.grid(True, alpha=0.3)
    ax1.set_title(f"Along gradient descent — {LOSSES[k].label}")
    R = p["R"].numpy().copy()
    R[p["singular"].numpy()] = np.nan
    ax3.plot(steps, R, color="tab:green")
    ax3.axhline(0, color="k", linewidth=0.6)
    ax3.set_ylabel("scalar curvature R")
    ax3.set_xlabel("gradient-descent step")
    ax3.grid(True, alpha=0.3)
    save_png(fig, path, tight=False, dpi=dpi)


def _fig_output_final(path: Path, k: str, th: Tensor, X: Tensor, t: Tensor, steepness: float, dpi: int) -> None:
    """The network output at the final parameters of loss ``k``, with the data."""
    Xn, tn = X.numpy(), t.numpy()
    u = torch.linspace(0, 1, 201, dtype=DTYPE)
    U, V = torch.meshgrid(u, u, indexing="xy")
    f = torch.sigmoid(steepness * (th[0] * U + th[1] * V)).numpy()
    fig = Figure(figsize=(5.4, 4.6))
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.11, top=0.87)
    ax = fig.add_subplot()
    im = ax.imshow(f, origin="lower", extent=[0, 1, 0, 1], cmap="coolwarm", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="f(x, y)")
    one = tn > 0.5
    ax.scatter(Xn[one, 0], Xn[one, 1], marker="o", s=16, c="white", edgecolors="k", linewidths=0.6, label="target 1")
    ax.scatter(Xn[~one, 0], Xn[~one, 1], marker="s", s=14, c="black", edgecolors="white", linewidths=0.6,
               label="target 0")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.8)
    ax.set(xlabel="x", ylabel="y", title=f"Network output at the end of training, {LOSSES[k].label}\n"
           f"θ = ({th[0]:.2f}, {th[1]:.2f})")
    save_png(fig, path, tight=False, dpi=dpi)


def _figures(run: StudyRun, keys, results, t1, t2, X, t, steepness, dpi: int) -> dict[str, str]:
    """Every figure of the study; returns ``{file name: description}``."""
    res = len(t1)
    extent = [t1[0].item(), t1[-1].item(), t2[0].item(), t2[-1].item()]
    figs: dict[str, str] = {}
    _fig_data(run.file("data.png"), X, t, dpi)
    figs["data.png"] = "the data set (seed fig 5.2)."
    _fig_loss_surfaces(run.file("loss_surfaces.png"), keys, results, extent, res, dpi)
    figs["loss_surfaces.png"] = "loss surfaces with the gradient-descent path (seed fig 5.3)."
    for k in keys:
        name = f"surfaces_{k}.png"
        _fig_surfaces(run.file(name), k, results[k], extent, res, dpi)
        figs[name] = f"I₁₁, I₁₂, I₂₂, tr I, tr Θ and R over the grid, {LOSSES[k].label} (seed figs 5.5–5.7)."
    for k in keys:
        name = f"path_{k}.png"
        _fig_path(run.file(name), k, results[k]["path"], dpi)
        figs[name] = f"tr I, tr Θ and R along the path, {LOSSES[k].label} (seed figs 5.8–5.10)."
    k = "cross_entropy" if "cross_entropy" in keys else keys[-1]
    _fig_output_final(run.file("output_final.png"), k, results[k]["theta"][-1], X, t, steepness, dpi)
    figs["output_final.png"] = f"network output at the final parameters, {LOSSES[k].label} (seed fig 5.4)."
    return figs
