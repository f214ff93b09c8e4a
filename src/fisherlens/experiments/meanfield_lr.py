"""Seed 003 fig 2 (left): the learning-rate phase diagram of batch gradient descent and the critical η_c.

Artificial data as in seed 003 §4.2: T Gaussian inputs ``x ~ N(0, I_M)``, teacher signals ``y = f_θ*(x)`` of a
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

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import fisherlens as fl

from ..runs import RunDir, write_csv
from ..theory.random_networks import MLPEnsemble, single_thread, standard_normals
from ._common import check_int, check_ints, check_number, torch_threads
from .meanfield_spectrum import CASES, COLORS, _save, check_gaussian_data

Tensor = torch.Tensor

__all__ = ["meanfield_lr"]

FIGURES = {
    "fig2_phase_diagram.png": "Seed 003 fig 2 (left): final training loss over (M, η); grey = diverged "
    "(loss > 1000); red: theoretical η_c; dashed: η_c from the teachers' measured λ_max.",
    "loss_vs_eta.png": "Final loss vs η / η_c(theory) for every width (all activations).",
}
KILL = 1e12  # a run whose loss passes this is dropped from the batch (counted as diverged)


def _train(ens: MLPEnsemble, X: Tensor, Y: Tensor, etas: Tensor, momentum: float, steps: int) -> Tensor:
    """Heavy-ball batch GD (seed 003 eq 19) of every member of ``ens`` on its own data; returns final losses (B,).

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


def meanfield_lr(
    out: str | os.PathLike,
    *,
    quick: bool = False,
    seed: int = 0,
    data: str | None = None,
    m_values: tuple[int, ...] | None = None,
    n_eta: int | None = None,
    eta_margin: float = 6.0,
    trials: int | None = None,
    steps: int = 100,
    samples: int = 100,
    depth: int = 4,
    outputs: int = 10,
    momentum: float = 0.9,
    threshold: float = 1000.0,
    dtype: str = "float32",
    threads: int | None = 1,
    progress: bool = True,
) -> Path:
    """Reproduce seed 003 fig 2 (left): final loss over a (M, η) grid against the critical learning rate η_c.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (M ∈ {16, 32}, 6 learning rates, 1 trial, 30 steps).
        seed: seeds every draw; runs are deterministic.
        data: unused (Gaussian inputs and a teacher network); any value other than the CLI default is refused.
        m_values: widths M (default 7 values from 32 to 256, log-spaced; the paper went wider; one integer: one M).
        n_eta: learning rates per activation (default 20), log-spaced from ``min_M η_c / eta_margin`` to
            ``max_M η_c · eta_margin``.
        trials: independent (teacher, student, inputs) draws per cell, losses averaged (default 3; paper 5).
        steps: gradient steps (seed 003: 100); samples: T (100); depth: L (4); outputs: C (10).
        momentum: μ (0.9); threshold: final loss above which a cell counts as diverged (1000).
        dtype: ``"float32"`` (default) or ``"float64"``.
        threads: torch intra-op threads during the study (default 1); ``None`` keeps torch's setting.
        progress: tqdm progress bar.

    Returns:
        Path of the run folder: ``config.json``, ``metrics.csv`` (one row per grid cell), ``widths.csv`` (η_c per
        width), two PNGs and ``summary.md``.
    """
    check_gaussian_data(data)
    with torch_threads(threads):
        return _meanfield_lr(out, quick, seed, m_values, n_eta, eta_margin, trials, steps, samples, depth, outputs,
                             momentum, threshold, dtype, progress)


def _meanfield_lr(out, quick, seed, m_values, n_eta, eta_margin, trials, steps, samples, depth, outputs, momentum,
                  threshold, dtype, progress) -> Path:
    if m_values is None:
        m_values = (16, 32) if quick else (32, 45, 64, 91, 128, 181, 256)
    m_values = check_ints("m_values", m_values)  # --set m_values=16: one width
    if len(set(m_values)) != len(m_values):
        raise ValueError(f"m_values must be distinct widths, got {m_values!r}.")
    n_eta = (6 if quick else 20) if n_eta is None else n_eta
    trials = (1 if quick else 3) if trials is None else trials
    steps = 30 if quick and steps == 100 else steps
    for name, v in (("n_eta", n_eta), ("trials", trials), ("steps", steps), ("samples", samples),
                    ("depth", depth), ("outputs", outputs)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name in ("n_eta", "depth") else 1):
            raise ValueError(f"{name} must be an integer ≥ {2 if name in ('n_eta', 'depth') else 1}, got {v!r}.")
    check_int("seed", seed, 0)
    if not 0 <= check_number("momentum", momentum) < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    check_number("eta_margin", eta_margin, lo=1)
    check_number("threshold", threshold, lo=0)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
    tdt = getattr(torch, dtype)
    L, C, T = depth, outputs, samples
    config = {
        "experiment": "meanfield-lr", "quick": quick, "seed": seed, "data": "gaussian N(0, I) + teacher network",
        "m_values": list(m_values), "n_eta": n_eta, "eta_margin": eta_margin, "trials": trials, "steps": steps,
        "samples": T, "depth": L, "outputs": C, "alphas": 1.0, "momentum": momentum, "threshold": threshold,
        "dtype": dtype, "cases": {a: {"sigma_w2": sw, "sigma_b2": sb} for a, (sw, sb) in CASES.items()},
        "loss": "E = (1/2T) sum_t |y - f|^2", "optimizer": "batch GD with heavy-ball momentum (seed 003 eq 19)",
    }
    run = RunDir(out, config)
    t0 = time.perf_counter()
    theories = {a: fl.theory.meanfield(a, sw, sb, L, outputs=C, samples=T) for a, (sw, sb) in CASES.items()}
    grids = {}
    for act, th in theories.items():
        ec = th.critical_learning_rate(np.array(m_values, dtype=float), momentum)
        grids[act] = np.geomspace(ec.min() / eta_margin, ec.max() * eta_margin, n_eta)

    rows: list[dict] = []
    width_rows: list[dict] = []
    bar = tqdm(total=len(CASES) * len(m_values), desc="meanfield-lr", unit="width", disable=not progress,
               leave=False)
    for M in m_values:
        sizes = [M] * L + [C]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + M)
        Zt = standard_normals(trials, sizes, gen, tdt)  # teachers
        Zs = standard_normals(trials, sizes, gen, tdt)  # students
        X = torch.randn(trials, T, M, generator=gen, dtype=tdt)
        for act, (sw, sb) in CASES.items():
            th = theories[act]
            teacher = MLPEnsemble.from_normals(*Zt, act, sw, sb)
            student = MLPEnsemble.from_normals(*Zs, act, sw, sb)
            with torch.no_grad():
                Y = teacher(X)
            with single_thread():  # λ_max of the teachers (the zero-loss minima): exact TC × TC dual matrix
                lam = torch.linalg.eigvalsh(MLPEnsemble([w[:1] for w in teacher.weights],
                                                        [b[:1] for b in teacher.biases], act, teacher.phi,
                                                        teacher.dphi, teacher.sigma_w2, teacher.sigma_b2)
                                            .gram(X[:1]).double())[0, -1].item()
            etas = torch.as_tensor(grids[act])
            n = len(etas)
            # member (trial i, eta j) at position i * n + j
            rep = MLPEnsemble([w.repeat_interleave(n, 0) for w in student.weights],
                              [b.repeat_interleave(n, 0) for b in student.biases], act, student.phi, student.dphi,
                              student.sigma_w2, student.sigma_b2)
            with torch.no_grad():
                init = (0.5 * ((student(X) - Y) ** 2).sum((1, 2)) / T).double()
            final = _train(rep, X.repeat_interleave(n, 0), Y.repeat_interleave(n, 0), etas.repeat(trials),
                           momentum, steps).view(trials, n)
            ec_th = float(th.critical_learning_rate(M, momentum))
            ec_meas = fl.critical_learning_rate(lam, momentum)
            width_rows.append({"activation": act, "M": M, "eta_c_theory": ec_th, "lambda_max_theory":
                               float(th.max_eigenvalue(M)), "lambda_max_teacher": lam, "eta_c_teacher": ec_meas,
                               "initial_loss": float(init.mean())})
            for j, eta in enumerate(etas.tolist()):
                losses = final[:, j]
                mean = float(losses.mean()) if torch.isfinite(losses).all() else math.inf
                diverged = not mean <= threshold
                rows.append({"activation": act, "M": M, "eta": eta, "eta_over_eta_c": eta / ec_th,
                             "eta_over_eta_c_teacher": eta / ec_meas,
                             "final_loss": mean, "diverged": int(diverged),
                             "predicted_diverged": int(eta > ec_th), "predicted_diverged_teacher": int(eta > ec_meas),
                             **{f"loss_trial{i}": float(losses[i]) for i in range(trials)}})
            bar.update(1)
    bar.close()
    write_csv(run.file("metrics.csv"), rows)
    write_csv(run.file("widths.csv"), width_rows)
    _figures(run, rows, width_rows, theories, grids, m_values, momentum, threshold, config)
    elapsed = time.perf_counter() - t0
    run.write_text("summary.md", _summary(config, rows, width_rows, theories, elapsed))
    return run.path


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
    fig.suptitle(f"Seed 003 fig 2 (left): batch GD, μ = {momentum}, {config['steps']} steps, L = {config['depth']}, "
                 f"C = {config['outputs']}, T = {config['samples']}; mean over {config['trials']} trial(s)")
    fig.subplots_adjust(left=0.05, right=0.88, bottom=0.12, top=0.86, wspace=0.28)
    cax = fig.add_axes((0.905, 0.12, 0.012, 0.74))
    fig.colorbar(mesh, cax=cax, label=f"final training loss (grey: > {threshold:g}, diverged)")
    _save(fig, run.file("fig2_phase_diagram.png"), tight=False)

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
    _save(fig, run.file("loss_vs_eta.png"))


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


def _summary(config, rows, width_rows, theories, elapsed) -> str:
    thr = config["threshold"]
    lines = [
        "# Learning-rate phase diagram vs the critical η_c (seed 003 fig 2, left)",
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
        "## Figures",
        "",
        *(f"- [{n}]({n}): {d}" for n, d in FIGURES.items()),
        "",
        *(f"![{n}]({n})" for n in FIGURES),
        "",
        "Per cell: [metrics.csv](metrics.csv); per width: [widths.csv](widths.csv); settings: "
        "[config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
