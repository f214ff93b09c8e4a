"""Karakida 2019 fig 2 (left): the learning-rate phase diagram of batch gradient descent and the critical η_c.

Artificial data as in Karakida 2019 §4.2: T Gaussian inputs ``x ~ N(0, I_M)``, teacher signals ``y = f_θ*(x)`` of a
teacher network drawn from the ensemble (eq 8), and a student drawn independently from the same ensemble
(L = 4 weight layers, α_l = 1, C = 10 linear outputs, standard parameterisation).  Squared loss
``E(θ) = (1/2T) Σ_t ‖y(t) − f_θ(x(t))‖²`` (eq 4, whose Hessian at the zero-loss minimum θ* is the FIM of eq 2),
batch gradient descent with momentum (eq 19)

    θ_{t+1} = θ_t − η ∇E(θ_t) + μ (θ_t − θ_{t−1}),   μ = 0.9,

for 100 steps, on a grid of widths M and learning rates η.  Every grid cell's final loss is the mean over
``trials`` independent (teacher, student, inputs) draws; cells whose loss exceeds 1000 (or overflows) count as
diverged and are drawn grey.  The theory line is ``η_c = 2(1 + μ)/λ_max`` with λ_max from
:func:`fisherlens.theory.meanfield` (Lemma 6 + Theorem 4, eq 20); a second line uses the λ_max measured on the
teachers themselves (their exact 1000 × 1000 dual matrix).

All (trial, η) runs of one width train together as one batched network ensemble (``torch.bmm``); runs whose
loss overflows past 1e12 are dropped from the batch as diverged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import fisherlens as fl

from ..plots import save_png
from ..theory.random_networks import MLPEnsemble, ensemble_stats, standard_normals
from ._common import (
    check_choice,
    check_distinct,
    check_int,
    check_ints,
    check_number,
    check_synthetic_data,
    torch_threads,
)
from .meanfield_spectrum import CASES, COLORS, GAUSSIAN_INPUTS
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = ["meanfield_lr", "MeanfieldLR", "MeanfieldLRConfig"]

FIGURES = {
    "fig2_phase_diagram.png": "Karakida 2019 fig 2 (left): final training loss over (M, η); grey = diverged "
    "(loss > 1000); red: theoretical η_c; dashed: η_c from the teachers' measured λ_max.",
    "loss_vs_eta.png": "Final loss vs η / η_c(theory) for every width (all activations).",
}
KILL = 1e12  # a run whose loss passes this is dropped from the batch (counted as diverged)


@dataclass
class MeanfieldLRConfig(StudyConfig):
    """Options of the Karakida 2019 fig 2 study (defaults: the full study; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds every draw; runs are deterministic.
        data: unused (Gaussian inputs and a teacher network); any value other than the command line's default is
            refused.
        m_values: widths M (7 values from 32 to 256, log-spaced; quick 16, 32; the paper went wider; one integer:
            one M).
        n_eta: learning rates per activation (20; quick 6), log-spaced from ``min_M η_c / eta_margin`` to
            ``max_M η_c · eta_margin``.
        trials: independent (teacher, student, inputs) draws per cell, losses averaged (3; quick 1; paper 5).
        steps: gradient steps (Karakida 2019: 100; quick 30); samples: T (100); depth: L (4); outputs: C (10).
        momentum: μ (0.9); threshold: final loss above which a cell counts as diverged (1000).
        dtype: ``"float32"`` (default) or ``"float64"``.
        threads: torch intra-op threads during the study (default 1); ``None`` keeps torch's setting.
    """

    QUICK = {"m_values": (16, 32), "n_eta": 6, "trials": 1, "steps": 30}

    data: str | None = None
    m_values: tuple[int, ...] = (32, 45, 64, 91, 128, 181, 256)
    n_eta: int = 20
    eta_margin: float = 6.0
    trials: int = 3
    steps: int = 100
    samples: int = 100
    depth: int = 4
    outputs: int = 10
    momentum: float = 0.9
    threshold: float = 1000.0
    dtype: str = "float32"
    threads: int | None = 1

    def validate(self) -> None:
        check_synthetic_data(self.data, GAUSSIAN_INPUTS)
        self.m_values = check_ints("m_values", self.m_values)  # --set m_values=16: one width
        check_distinct("m_values (widths)", self.m_values)
        for name in ("n_eta", "trials", "steps", "samples", "depth", "outputs"):
            check_int(name, getattr(self, name), 2 if name in ("n_eta", "depth") else 1)
        super().validate()
        if not 0 <= check_number("momentum", self.momentum) < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        check_number("eta_margin", self.eta_margin, lo=1)
        check_number("threshold", self.threshold, lo=0)
        check_choice("dtype", self.dtype, ("float32", "float64"))


def _members(ens: MLPEnsemble, pick) -> MLPEnsemble:
    """The ensemble of the members ``pick(stacked tensor)`` selects (e.g. ``lambda t: t[:1]``)."""
    return dataclasses.replace(ens, weights=[pick(w) for w in ens.weights], biases=[pick(b) for b in ens.biases])


def _train(ens: MLPEnsemble, X: Tensor, Y: Tensor, etas: Tensor, momentum: float, steps: int) -> Tensor:
    """Heavy-ball batch GD (Karakida 2019, eq 19) of every member of ``ens`` on its own data; returns final losses (B,).

    Args:
        ens: the B students (their tensors are copied, not modified).
        X: inputs ``(B, T, M_0)``; Y: targets ``(B, T, C)``; etas: learning rates ``(B,)``.

    Returns:
        ``E(θ_steps)`` per member, ``inf`` for members dropped as diverged (loss > KILL or non-finite).
    """
    B, T = X.shape[0], X.shape[1]
    params = [p.detach().clone() for p in (*ens.weights, *ens.biases)]
    vel = [torch.zeros_like(p) for p in params]
    L = len(ens.weights)
    final = torch.full((B,), math.inf, dtype=torch.float64)
    idx = torch.arange(B)

    def losses(ps: list[Tensor], Xa: Tensor, Ya: Tensor) -> Tensor:
        h = Xa
        for i in range(L):
            u = torch.baddbmm(ps[L + i][:, None, :], h, ps[i].transpose(1, 2))
            h = ens.phi(u) if i + 1 < L else u
        return 0.5 * ((h - Ya) ** 2).sum((1, 2)) / T

    Xa, Ya, eta = X, Y, etas.to(X.dtype)
    for _ in range(steps):
        for p in params:
            p.requires_grad_(True)
        loss = losses(params, Xa, Ya)
        ok = torch.isfinite(loss) & (loss < KILL)
        grads = torch.autograd.grad(loss.sum(), params)
        with torch.no_grad():
            for p, v, g in zip(params, vel, grads, strict=True):
                shape = (-1,) + (1,) * (p.dim() - 1)
                v.mul_(momentum).sub_(eta.view(shape) * g)
                p.add_(v)
        if not ok.all():
            keep = ok.nonzero().squeeze(1)
            params = [p.detach()[keep] for p in params]
            vel = [v[keep] for v in vel]
            Xa, Ya, eta, idx = Xa[keep], Ya[keep], eta[keep], idx[keep]
            if not len(idx):
                return final
    with torch.no_grad():
        last = losses([p.detach() for p in params], Xa, Ya)
    final[idx] = torch.where(torch.isfinite(last), last.double(), torch.tensor(math.inf, dtype=torch.float64))
    return final


def _width(cfg: MeanfieldLRConfig, M: int, theories: dict, grids: dict) -> tuple[list[dict], list[dict]]:
    """All activations at width M: teachers, students, the (trial, η) grid trained as one batch.

    Returns the metrics.csv rows of the cells and the widths.csv rows (η_c per activation)."""
    L, C, T, trials, tdt = cfg.depth, cfg.outputs, cfg.samples, cfg.trials, getattr(torch, cfg.dtype)
    sizes = [M] * L + [C]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + M)
    Zt = standard_normals(trials, sizes, gen, tdt)  # teachers
    Zs = standard_normals(trials, sizes, gen, tdt)  # students
    X = torch.randn(trials, T, M, generator=gen, dtype=tdt)
    rows, width_rows = [], []
    for act, (sw, sb) in CASES.items():
        th = theories[act]
        teacher = MLPEnsemble.from_normals(*Zt, act, sw, sb)
        student = MLPEnsemble.from_normals(*Zs, act, sw, sb)
        with torch.no_grad():
            Y = teacher(X)
        first = _members(teacher, lambda t: t[:1])  # λ_max of the teachers (the zero-loss minima): exact TC × TC dual
        with torch_threads(1):
            lam = ensemble_stats(first.gram(X[:1]), first.n_params)["max"][0].item()
        etas = torch.as_tensor(grids[act])
        n = len(etas)
        rep = _members(student, lambda t, n=n: t.repeat_interleave(n, 0))  # member (trial i, eta j) at i * n + j
        with torch.no_grad():
            init = (0.5 * ((student(X) - Y) ** 2).sum((1, 2)) / T).double()
        final = _train(rep, X.repeat_interleave(n, 0), Y.repeat_interleave(n, 0), etas.repeat(trials),
                       cfg.momentum, cfg.steps).view(trials, n)
        ec_th = float(th.critical_learning_rate(M, cfg.momentum))
        ec_meas = fl.critical_learning_rate(lam, cfg.momentum)
        width_rows.append({"activation": act, "M": M, "eta_c_theory": ec_th, "lambda_max_theory":
                           float(th.max_eigenvalue(M)), "lambda_max_teacher": lam, "eta_c_teacher": ec_meas,
                           "initial_loss": float(init.mean())})
        for j, eta in enumerate(etas.tolist()):
            losses = final[:, j]
            mean = float(losses.mean()) if torch.isfinite(losses).all() else math.inf
            diverged = not mean <= cfg.threshold
            rows.append({"activation": act, "M": M, "eta": eta, "eta_over_eta_c": eta / ec_th,
                         "eta_over_eta_c_teacher": eta / ec_meas,
                         "final_loss": mean, "diverged": int(diverged),
                         "predicted_diverged": int(eta > ec_th), "predicted_diverged_teacher": int(eta > ec_meas),
                         **{f"loss_trial{i}": float(losses[i]) for i in range(trials)}})
    return rows, width_rows


class MeanfieldLR(Study):
    """The learning-rate phase diagram of batch gradient descent against η_c (Karakida 2019, fig 2; module
    docstring)."""

    name = "meanfield-lr"
    description = ("Karakida 2019 fig 2 (left): final loss of momentum batch GD over a (width, learning-rate) grid "
                   "on a "
                   "teacher-student task vs the theoretical critical learning rate eta_c = 2(1+mu)/lambda_max.")
    Config = MeanfieldLRConfig

    def config_json(self, cfg: MeanfieldLRConfig, inputs) -> dict:
        return {
            "experiment": "meanfield-lr", "quick": cfg.quick, "seed": cfg.seed,
            "data": "gaussian N(0, I) + teacher network", "m_values": list(cfg.m_values), "n_eta": cfg.n_eta,
            "eta_margin": cfg.eta_margin, "trials": cfg.trials, "steps": cfg.steps, "samples": cfg.samples,
            "depth": cfg.depth, "outputs": cfg.outputs, "alphas": 1.0, "momentum": cfg.momentum,
            "threshold": cfg.threshold, "dtype": cfg.dtype,
            "cases": {a: {"sigma_w2": sw, "sigma_b2": sb} for a, (sw, sb) in CASES.items()},
            "loss": "E = (1/2T) sum_t |y - f|^2",
            "optimizer": "batch GD with heavy-ball momentum (Karakida 2019, eq 19)",
        }

    def compute(self, cfg: MeanfieldLRConfig, run: StudyRun) -> dict:
        theories = {a: fl.theory.meanfield(a, sw, sb, cfg.depth, outputs=cfg.outputs, samples=cfg.samples)
                    for a, (sw, sb) in CASES.items()}
        grids = {}
        for act, th in theories.items():
            ec = th.critical_learning_rate(np.array(cfg.m_values, dtype=float), cfg.momentum)
            grids[act] = np.geomspace(ec.min() / cfg.eta_margin, ec.max() * cfg.eta_margin, cfg.n_eta)
        rows: list[dict] = []
        width_rows: list[dict] = []
        with run.bar(len(CASES) * len(cfg.m_values), unit="width") as bar:
            for M in cfg.m_values:
                r, w = _width(cfg, M, theories, grids)
                rows += r
                width_rows += w
                bar.update(len(CASES))
        run.write_csv("metrics.csv", rows)
        run.write_csv("widths.csv", width_rows)
        return {"rows": rows, "width_rows": width_rows, "theories": theories, "grids": grids}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        cfg = run.cfg
        _figures(run, r["rows"], r["width_rows"], r["theories"], r["grids"], list(cfg.m_values), cfg.momentum,
                 cfg.threshold, self.config_json(cfg, None))
        return FIGURES

    def report(self, r: dict, run: StudyRun) -> str:
        return _summary(self.config_json(run.cfg, None), r["rows"], r["width_rows"], r["theories"], run.elapsed(),
                        run.figures)


def meanfield_lr(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True,
                 **options) -> Path:
    """Reproduce Karakida 2019 fig 2 (left): final loss over a (M, η) grid against the critical learning rate η_c.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (M ∈ {16, 32}, 6 learning rates, 1 trial, 30 steps).
        seed: seeds every draw; runs are deterministic.
        progress: tqdm progress bar.
        **options: the fields of :class:`MeanfieldLRConfig` (``m_values``, ``n_eta``, ``trials``, ``steps``, ...).

    Returns:
        Path of the run folder: ``config.json``, ``metrics.csv`` (one row per grid cell), ``widths.csv`` (η_c per
        width), two PNGs and ``summary.md``.
    """
    return run_study(MeanfieldLR, out, quick, seed, progress=progress, **options)


def _edges(v: np.ndarray) -> np.ndarray:
    lv = np.log(v)
    if len(lv) == 1:  # a single width (--set m_values=16): a cell one factor of 2 wide
        return np.exp(lv[0] + np.log(2) * np.array([-0.5, 0.5]))
    mid = (lv[1:] + lv[:-1]) / 2
    return np.exp(np.concatenate([[lv[0] - (mid[0] - lv[0])], mid, [lv[-1] + (lv[-1] - mid[-1])]]))


def _figures(run, rows, width_rows, theories, grids, m_values, momentum, threshold, config) -> None:
    Ms = np.array(m_values, dtype=float)
    finite = [r["final_loss"] for r in rows if not r["diverged"]]
    lo = max(min(finite), 1e-8) if finite else 1e-3
    norm = LogNorm(vmin=lo, vmax=threshold)
    cmap = colormaps["viridis"].copy()
    cmap = cmap.with_extremes(bad="0.6")
    fig = Figure(figsize=(16, 4.8))
    axes = fig.subplots(1, len(CASES))
    mesh = None
    for ax, act in zip(axes, CASES, strict=True):
        etas = grids[act]
        Z = np.full((len(etas), len(Ms)), np.nan)
        for r in rows:
            if r["activation"] == act and not r["diverged"]:
                Z[int(np.argmin(np.abs(etas - r["eta"]))), m_values.index(r["M"])] = r["final_loss"]
        mesh = ax.pcolormesh(_edges(Ms), _edges(etas), np.ma.masked_invalid(Z), norm=norm, cmap=cmap,
                             shading="flat")
        mg = np.geomspace(_edges(Ms)[0], _edges(Ms)[-1], 100)
        ax.plot(mg, theories[act].critical_learning_rate(mg, momentum), color="red", lw=2.2, label="theory η_c")
        wr = [w for w in width_rows if w["activation"] == act]
        ax.plot([w["M"] for w in wr], [w["eta_c_teacher"] for w in wr], "k--", lw=1.2, marker="o", ms=3,
                label="η_c from teachers' λ_max")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(_edges(Ms)[0], _edges(Ms)[-1])
        ax.set_ylim(_edges(etas)[0], _edges(etas)[-1])
        ax.set_xticks(Ms, [str(m) for m in m_values])
        ax.minorticks_off()
        ax.set_xlabel("width M")
        ax.set_ylabel("learning rate η")
        sw, sb = CASES[act]
        ax.set_title(f"{act}  (σ_w², σ_b²) = ({sw:g}, {sb:g})")
        ax.legend(fontsize=8, loc="lower left", frameon=True)
    fig.suptitle(f"Karakida 2019 fig 2 (left): batch GD, μ = {momentum}, {config['steps']} steps, "
                 f"L = {config['depth']}, "
                 f"C = {config['outputs']}, T = {config['samples']}; mean over {config['trials']} trial(s)")
    fig.subplots_adjust(left=0.05, right=0.88, bottom=0.12, top=0.86, wspace=0.28)
    cax = fig.add_axes((0.905, 0.12, 0.012, 0.74))
    fig.colorbar(mesh, cax=cax, label=f"final training loss (grey: > {threshold:g}, diverged)")
    save_png(fig, run.file("fig2_phase_diagram.png"), tight=False)

    fig = Figure(figsize=(7, 4.6))
    ax = fig.add_subplot()
    for act in CASES:
        for k, M in enumerate(m_values):
            sel = [r for r in rows if r["activation"] == act and r["M"] == M]
            y = [min(r["final_loss"], 1e6) for r in sel]
            ax.plot([r["eta_over_eta_c"] for r in sel], y, "-", color=COLORS[act], alpha=0.35 + 0.65 * k / max(
                1, len(m_values) - 1), lw=1, marker="o", ms=2.5, label=act if k == len(m_values) - 1 else None)
    ax.axvline(1.0, color="red", lw=1.5, label="η = η_c (theory)")
    ax.axhline(threshold, color="0.5", ls=":", lw=1, label=f"divergence threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("η / η_c(theory)")
    ax.set_ylabel("final loss (capped at 1e6)")
    ax.set_title("Final loss vs η/η_c; darker = wider", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    save_png(fig, run.file("loss_vs_eta.png"))


def _shares(rows, key="predicted_diverged") -> dict[str, float]:
    agree = [r["diverged"] == r[key] for r in rows]
    ratio = "eta_over_eta_c" if key == "predicted_diverged" else "eta_over_eta_c_teacher"
    near = [r["diverged"] == r[key] for r in rows if 1 / 3 <= r[ratio] <= 3]
    above = [r["diverged"] for r in rows if r[key]]
    below = [not r["diverged"] for r in rows if not r[key]]
    return {"agree": float(np.mean(agree)) if agree else math.nan, "n": len(rows),
            "near": float(np.mean(near)) if near else math.nan, "n_near": len(near),
            "above_diverged": float(np.mean(above)) if above else math.nan, "n_above": len(above),
            "below_converged": float(np.mean(below)) if below else math.nan, "n_below": len(below)}


def _summary(config: dict, rows: list[dict], width_rows: list[dict], theories: dict, elapsed: float,
             figures: dict) -> str:
    thr = config["threshold"]
    lines = [
        "# Learning-rate phase diagram vs the critical η_c (Karakida 2019, fig 2, left)",
        "",
        f"Teacher–student regression on T = {config['samples']} Gaussian inputs; L = {config['depth']}, α_l = 1, "
        f"C = {config['outputs']}; student and teacher drawn independently from the same ensemble (eq 8); "
        f"loss E = (1/2T) Σ‖y − f‖²; batch GD with momentum μ = {config['momentum']} (eq 19) for "
        f"{config['steps']} steps; widths M = {config['m_values']}; {config['n_eta']} learning rates per "
        f"activation; {config['trials']} trial(s) per cell (losses averaged); seed {config['seed']}"
        f"{' (quick mode)' if config['quick'] else ''}. Diverged = final mean loss > {thr:g} or overflow. "
        f"Wall time {elapsed:.1f} s.",
        "",
        "Scaled down from the paper to run in about a minute on 2 CPU cores: widths only up to "
        f"{max(config['m_values'])} and {config['trials']} trial(s) per cell instead of 5 (same L, C, T, μ, "
        "steps, variances and divergence threshold). At such widths C = 10 is not ≪ M: the teachers' measured "
        "λ_max exceeds the theory (the maximum of C nearly degenerate top eigenvalues is biased upwards, "
        "a bias that decays slowly with M), so the dashed line sits below the red one and approaches it as M grows.",
        "",
        "## Share of grid cells on the side of η_c that the theory predicts",
        "",
        "Prediction: diverged iff η > η_c = 2(1+μ)/λ_max. 'above': cells with η > η_c that diverged "
        "(Lemma 6: convergence to θ* is impossible there); 'below': cells with η < η_c that did not diverge "
        "(not guaranteed by the lemma, which is only a necessary condition).",
        "",
        "| activation | η_c from | agree (all cells) | agree (η/η_c in [1/3, 3]) | above η_c: diverged | "
        "below η_c: converged |",
        "|---|---|---|---|---|---|",
    ]
    for act in [*CASES, "all"]:
        sel = rows if act == "all" else [r for r in rows if r["activation"] == act]
        for key, label in (("predicted_diverged", "theory"), ("predicted_diverged_teacher", "teacher λ_max")):
            s = _shares(sel, key)
            lines.append(f"| {act} | {label} | **{100 * s['agree']:.1f}%** ({s['n']} cells) | "
                         f"{100 * s['near']:.1f}% ({s['n_near']} cells) | "
                         f"{100 * s['above_diverged']:.1f}% of {s['n_above']} | "
                         f"{100 * s['below_converged']:.1f}% of {s['n_below']} |")
    lines += ["", "## Critical learning rates per width", "",
              "| activation | M | λ_max theory | λ_max teacher (measured) | η_c theory | η_c teacher | "
              "largest converged η | smallest diverged η | initial loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for w in width_rows:
        sel = [r for r in rows if r["activation"] == w["activation"] and r["M"] == w["M"]]
        conv = [r["eta"] for r in sel if not r["diverged"]]
        div = [r["eta"] for r in sel if r["diverged"]]
        lines.append(f"| {w['activation']} | {w['M']} | {w['lambda_max_theory']:.4g} | {w['lambda_max_teacher']:.4g}"
                     f" | {w['eta_c_theory']:.4g} | {w['eta_c_teacher']:.4g} | "
                     f"{max(conv) if conv else float('nan'):.4g} | {min(div) if div else float('nan'):.4g} | "
                     f"{w['initial_loss']:.3g} |")
    lines += ["", "Where the boundary actually lies, in units of the theoretical η_c:", "",
              "| activation | largest η/η_c that converged | smallest η/η_c that diverged |", "|---|---|---|"]
    for act in CASES:
        sel = [r for r in rows if r["activation"] == act]
        conv = [r["eta_over_eta_c"] for r in sel if not r["diverged"]]
        div = [r["eta_over_eta_c"] for r in sel if r["diverged"]]
        lines.append(f"| {act} | {max(conv, default=math.nan):.3g} | {min(div, default=math.nan):.3g} |")
    off_above = [r for r in rows if r["predicted_diverged"] and not r["diverged"]]
    off_below = [r for r in rows if not r["predicted_diverged"] and r["diverged"]]
    lines += [
        "",
        f"Cells on the wrong side: {len(off_above)} converged above η_c (largest η/η_c "
        f"{max((r['eta_over_eta_c'] for r in off_above), default=float('nan')):.3g}), {len(off_below)} diverged "
        f"below η_c (smallest η/η_c {min((r['eta_over_eta_c'] for r in off_below), default=float('nan')):.3g}).",
        "",
        "Theory values: " + "; ".join(f"{a}: α = {th.alpha:g}, κ1 = {th.kappa1:.4g}, κ2 = {th.kappa2:.4g}"
                                      for a, th in theories.items()) + ".",
        "",
        *figures_section(figures),
        "Per cell: [metrics.csv](metrics.csv); per width: [widths.csv](widths.csv); settings: "
        "[config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
