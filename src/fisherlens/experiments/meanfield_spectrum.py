"""Karakida 2019 fig 1 and supplementary C.1: mean-field FIM statistics against ensembles of random networks.

Networks of Karakida's ensemble (eqs 5, 8; standard parameterisation, ``nn.Linear`` layers): L = 3 weight
layers, α_l = 1 (``M_0 = M_1 = M_2 = M``), C = 1 linear output, inputs ``x ~ N(0, I_M)``, and
``(σ_w², σ_b²)`` = (3, 0.64) for tanh, (2, 0.1) for ReLU, (1, 0.1) for linear.  For every width M an ensemble
of independent networks (each with its own T inputs) is drawn and, per network, the exact dual matrix
``F* = (1/T) Ĵ Ĵᵀ`` (T C × T C; docs/conventions.md#gram-duality) of the Gaussian-σ=1 FIM (Karakida 2019, eq 2) is
built by one batched
forward/backward pass (:class:`fisherlens.theory.MLPEnsemble`) — never the P × P matrix.  From it

    m_λ = tr F* / P,   s_λ = ‖F*‖_F² / P,   λ_max = largest eigenvalue of F*

(means over all P eigenvalues, zeros included), compared with :func:`fisherlens.theory.meanfield`
(Theorems 1, 3, 4).  The first network of each (activation, M ≤ ``library_check_max_m``) is also measured
with :func:`fisherlens.eigenvalues` (``method="gram"``) and :func:`fisherlens.spectrum_stats` on the
equivalent ``nn.Sequential``, to tie the batched evaluator to the library.

Second sweep (supplementary C.1): fixed M, T varied.  Each network is drawn once with ``T_max`` inputs and
the statistics for T inputs come from the leading ``T C × T C`` block of its dual matrix (rescaled by
``T_max / T``), so the points along T share networks (common random numbers).

Also recorded: the weights' Fisher–Rao norm ``θ_wᵀ F θ_w`` per network and its cross-term-free version
``Σ_i σ_i² F_ii`` that Theorem 5 evaluates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

import fisherlens as fl

from ..plots import save_png
from ..theory.random_networks import MLPEnsemble, ensemble_stats, standard_normals
from ._common import check_choice, check_distinct, check_int, check_ints, check_synthetic_data, torch_threads
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = ["meanfield_spectrum", "MeanfieldSpectrum", "MeanfieldSpectrumConfig", "CASES", "COLORS"]

#: Karakida 2019 fig 1: activation -> (σ_w², σ_b²)
CASES: dict[str, tuple[float, float]] = {"tanh": (3.0, 0.64), "relu": (2.0, 0.1), "linear": (1.0, 0.1)}
COLORS = {"tanh": "tab:blue", "relu": "tab:orange", "linear": "tab:green"}
STATS = ("mean", "second_moment", "max")
STAT_LABEL = {"mean": "mean eigenvalue  m_λ", "second_moment": "second moment  s_λ", "max": "max eigenvalue  λ_max"}
THEORY_FN = {"mean": "mean_eigenvalue", "second_moment": "second_moment", "max": "max_eigenvalue"}
FIGURES = {
    "fig1_statistics.png": "Karakida 2019 fig 1: m_λ, s_λ, λ_max vs M — theory (lines; dashed: finite-size counts) and "
    "ensemble mean ± s.d. (points).",
    "relative_errors.png": "Relative error (measured ensemble mean / theory − 1) vs M, ± 1 s.e.",
    "t_sweep.png": "Supplementary C.1: the three statistics vs T at fixed M.",
    "spectra.png": "All nonzero eigenvalues of one network per activation at the largest M, with the predicted "
    "λ_max and the predicted rest of the dual matrix.",
}
BUDGET = 256 * 2**20  # bytes of weights per ensemble chunk
GAUSSIAN_INPUTS = "uses synthetic Gaussian inputs x ~ N(0, I) (Karakida 2019)"


@dataclass
class MeanfieldSpectrumConfig(StudyConfig):
    """Options of the Karakida 2019 fig 1 study (defaults: the full study; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds every draw (networks and inputs); runs are deterministic.
        data: unused (Gaussian inputs); any value other than the command line's default is refused.
        seeds: networks per point (100 as in the paper — about a minute of CPU time; quick 4).
        m_values: widths M (16 … 2048 in powers of 2; quick 16, 32, 64; one integer: one M).
        samples: T for the M sweep (Karakida 2019: 100).
        depth: L weight layers (Karakida 2019, fig 1: 3); outputs: C (1).
        t_sweep_m: M of the T sweep (512, quick 32); t_values: its T values (1 … 500; quick 1, 5, 20, 50).
        dtype: ``"float32"`` (default, fast) or ``"float64"`` for the ensembles.
        library_check_max_m: check the first network of each (activation, M ≤ this) with fl.eigenvalues.
        threads: torch intra-op threads during the study (1: the work is many small batched ops, and
            multi-threaded kernels stall when the cores are oversubscribed); ``None`` keeps torch's setting.
    """

    QUICK = {"seeds": 4, "m_values": (16, 32, 64), "t_sweep_m": 32, "t_values": (1, 5, 20, 50)}

    data: str | None = None
    seeds: int = 100
    m_values: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    samples: int = 100
    depth: int = 3
    outputs: int = 1
    t_sweep_m: int = 512
    t_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500)
    dtype: str = "float32"
    library_check_max_m: int = 128
    threads: int | None = 1

    def validate(self) -> None:
        check_synthetic_data(self.data, GAUSSIAN_INPUTS)
        self.m_values = check_ints("m_values", self.m_values)  # --set m_values=64: one width
        self.t_values = check_ints("t_values", self.t_values)
        check_distinct("m_values", self.m_values)
        check_distinct("t_values", self.t_values)
        for name in ("seeds", "samples", "depth", "outputs", "t_sweep_m", "library_check_max_m"):
            check_int(name, getattr(self, name), 2 if name in ("seeds", "depth") else 1)
        super().validate()
        check_choice("dtype", self.dtype, ("float32", "float64"))


def _chunks(total: int, per_net_bytes: int) -> list[int]:
    step = max(1, min(total, BUDGET // max(1, per_net_bytes)))
    return [min(step, total - i) for i in range(0, total, step)]


def _library_check(ens: MLPEnsemble, X: Tensor, G: Tensor) -> float:
    """Max relative deviation of fl.eigenvalues(method="gram") + fl.spectrum_stats from the batched evaluator
    for member 0 (module and inputs in float64)."""
    model = ens.module(0).double()
    X0 = X[0].double()
    with torch_threads(1):
        eig = fl.eigenvalues(model, (X0, None), fl.Gaussian(1.0), method="gram")
    P = sum(p.numel() for p in model.parameters())
    lib = fl.spectrum_stats(eig, dim=P)
    ours = {k: float(v[0]) for k, v in ensemble_stats(G[:1], P).items()}
    return max(abs(lib[k] - ours[k]) / abs(lib[k]) for k in STATS)


def _aggregate(vals: np.ndarray) -> tuple[float, float, float]:
    n = len(vals)
    sd = float(vals.std(ddof=1)) if n > 1 else float("nan")
    return float(vals.mean()), sd, sd / math.sqrt(n)


class _Sweeps:
    """The two sweeps over ensembles of random networks (one row of networks.csv per network)."""

    def __init__(self, cfg: MeanfieldSpectrumConfig):
        self.cfg = cfg
        self.tdt = getattr(torch, cfg.dtype)
        self.item = torch.finfo(self.tdt).bits // 8
        self.net_rows: list[dict] = []
        self.lib_dev: dict[tuple[str, int], float] = {}
        self.example: dict[str, np.ndarray] = {}

    def sizes(self, M: int) -> list[int]:
        return [M] * self.cfg.depth + [self.cfg.outputs]

    def per_net_bytes(self, M: int, T: int) -> int:
        s, L, C = self.sizes(M), self.cfg.depth, self.cfg.outputs
        return self.item * (sum(s[i] * s[i + 1] for i in range(L)) + 4 * T * C * sum(s[:-1])) + 8 * (T * C) ** 2

    def m_sweep(self, M: int, bar) -> None:
        """Networks of width M at fixed T: statistics, Fisher–Rao norms, the library check, the example spectra."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + M)
        k = 0
        for e in _chunks(cfg.seeds, self.per_net_bytes(M, cfg.samples)):
            Zw, Zb = standard_normals(e, self.sizes(M), gen, self.tdt)
            X = torch.randn(e, cfg.samples, M, generator=gen, dtype=self.tdt)
            for act, (sw, sb) in CASES.items():
                ens = MLPEnsemble.from_normals(Zw, Zb, act, sw, sb)
                G, fr, frd = ens.measure(X)
                st = ensemble_stats(G, ens.n_params)
                if k == 0 and M <= cfg.library_check_max_m:
                    self.lib_dev[(act, M)] = _library_check(ens, X, G)
                if k == 0 and M == max(cfg.m_values):
                    self.example[act] = np.linalg.eigvalsh(G[0].double().numpy())[::-1].copy()
                for j in range(e):
                    self.net_rows.append({"sweep": "M", "activation": act, "M": M, "T": cfg.samples,
                                          "network": k + j, "P": ens.n_params, **{s: float(st[s][j]) for s in STATS},
                                          "fisher_rao": float(fr[j]), "fisher_rao_diag": float(frd[j])})
            k += e
            bar.update(e)

    def t_sweep(self, bar) -> None:
        """Fixed M, T varied: nested inputs, one dual matrix of T_max inputs per network."""
        cfg = self.cfg
        C, M, t_max = cfg.outputs, cfg.t_sweep_m, max(cfg.t_values)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_777_777 + M)
        k = 0
        for e in _chunks(cfg.seeds, self.per_net_bytes(M, t_max)):
            Zw, Zb = standard_normals(e, self.sizes(M), gen, self.tdt)
            X = torch.randn(e, t_max, M, generator=gen, dtype=self.tdt)
            for act, (sw, sb) in CASES.items():
                ens = MLPEnsemble.from_normals(Zw, Zb, act, sw, sb)
                Gfull, _, _ = ens.measure(X, fisher_rao=False)
                for T in cfg.t_values:
                    G = Gfull[:, : T * C, : T * C] * (t_max / T)
                    st = ensemble_stats(G, ens.n_params)
                    for j in range(e):
                        self.net_rows.append({"sweep": "T", "activation": act, "M": M, "T": T, "network": k + j,
                                              "P": ens.n_params, **{s: float(st[s][j]) for s in STATS}})
            k += e
            bar.update(e)


class _Theories:
    """``fl.theory.meanfield`` per (activation, T), computed once each."""

    def __init__(self, depth: int, outputs: int):
        self.depth, self.outputs, self.cache = depth, outputs, {}

    def __call__(self, act: str, T) -> fl.theory.MeanField:
        if (act, T) not in self.cache:
            sw, sb = CASES[act]
            self.cache[(act, T)] = fl.theory.meanfield(act, sw, sb, self.depth, outputs=self.outputs, samples=T)
        return self.cache[(act, T)]


def _point_rows(net_rows: list[dict], theory: _Theories) -> list[dict]:
    """metrics.csv: per (sweep, activation, M, T) the ensemble mean, s.d., s.e. and the theory."""
    rows: list[dict] = []
    keys = sorted({(r["sweep"], r["activation"], r["M"], r["T"]) for r in net_rows},
                  key=lambda k: (k[0], list(CASES).index(k[1]), k[2], k[3]))
    for sweep, act, M, T in keys:
        sel = [r for r in net_rows if (r["sweep"], r["activation"], r["M"], r["T"]) == (sweep, act, M, T)]
        th = theory(act, T)
        row = {"sweep": sweep, "activation": act, "M": M, "T": T, "n": len(sel), "P": sel[0]["P"]}
        for s in STATS:
            mu, sd, se = _aggregate(np.array([r[s] for r in sel]))
            tv = float(getattr(th, THEORY_FN[s])(M))
            tf = float(getattr(th, THEORY_FN[s])(M, finite_size=True))
            row.update({f"{s}": mu, f"{s}_sd": sd, f"{s}_se": se, f"{s}_theory": tv, f"{s}_rel_err": mu / tv - 1,
                        f"{s}_rel_se": se / tv, f"{s}_theory_fs": tf, f"{s}_rel_err_fs": mu / tf - 1})
        if sweep == "M":
            for s in ("fisher_rao", "fisher_rao_diag"):
                mu, sd, se = _aggregate(np.array([r[s] for r in sel]))
                row.update({s: mu, f"{s}_se": se})
            row["fisher_rao_theory"] = th.fisher_rao_norm()
        rows.append(row)
    return rows


class MeanfieldSpectrum(Study):
    """Mean-field FIM statistics against ensembles of random networks (Karakida 2019, fig 1; module docstring)."""

    name = "meanfield-spectrum"
    description = ("Karakida 2019 fig 1: mean-field theory of FIM eigenvalue statistics (mean, second moment, max) vs "
                   "ensembles of random tanh/ReLU/linear networks over widths M, and the T sweep; exact dual (Gram) "
                   "matrices.")
    Config = MeanfieldSpectrumConfig

    def config_json(self, cfg: MeanfieldSpectrumConfig, inputs) -> dict:
        return {
            "experiment": "meanfield-spectrum", "quick": cfg.quick, "seed": cfg.seed,
            "data": "gaussian N(0, I) (synthetic)", "seeds": cfg.seeds, "m_values": list(cfg.m_values),
            "samples": cfg.samples, "depth": cfg.depth, "outputs": cfg.outputs, "alphas": 1.0,
            "cases": {a: {"sigma_w2": sw, "sigma_b2": sb} for a, (sw, sb) in CASES.items()},
            "t_sweep_m": cfg.t_sweep_m, "t_values": list(cfg.t_values), "dtype": cfg.dtype,
            "library_check_max_m": cfg.library_check_max_m,
            "fisher": "Gaussian sigma=1, mean over T (Karakida 2019, eq 2)",
            "parameterisation": "standard: W ~ N(0, sigma_w2/M_in), b ~ N(0, sigma_b2), nn.Linear",
        }

    def compute(self, cfg: MeanfieldSpectrumConfig, run: StudyRun) -> dict:
        sweeps = _Sweeps(cfg)
        with run.bar(cfg.seeds * len(cfg.m_values) + cfg.seeds, unit="net") as bar:
            for M in cfg.m_values:
                sweeps.m_sweep(M, bar)
            sweeps.t_sweep(bar)
        theory = _Theories(cfg.depth, cfg.outputs)
        rows = _point_rows(sweeps.net_rows, theory)
        run.write_csv("metrics.csv", rows)
        run.write_csv("networks.csv", sweeps.net_rows)
        return {"rows": rows, "example": sweeps.example, "lib_dev": sweeps.lib_dev, "theory": theory}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        cfg = run.cfg
        rows, theory = r["rows"], r["theory"]
        _fig_statistics(run.file("fig1_statistics.png"), rows, theory, cfg)
        _fig_relative_errors(run.file("relative_errors.png"), rows, cfg.m_values)
        _fig_t_sweep(run.file("t_sweep.png"), rows, theory, cfg)
        _fig_spectra(run.file("spectra.png"), r["example"], theory, cfg)
        return FIGURES

    def report(self, r: dict, run: StudyRun) -> str:
        config = self.config_json(run.cfg, None)
        return _summary(config, r["rows"], r["lib_dev"], r["theory"], run.elapsed(), run.figures)


def meanfield_spectrum(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True,
                       **options) -> Path:
    """Reproduce Karakida 2019 fig 1 (and the T sweep of its supplementary C.1); write a run folder.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (M ∈ {16, 32, 64}, 4 networks per point, T sweep at M = 32).
        seed: seeds every draw (networks and inputs); runs are deterministic.
        progress: tqdm progress bar.
        **options: the fields of :class:`MeanfieldSpectrumConfig` (``seeds``, ``m_values``, ``t_values``, ...).

    Returns:
        Path of the run folder: ``config.json``, ``metrics.csv`` (one row per point), ``networks.csv`` (one row per
        network), four PNGs and ``summary.md``.
    """
    return run_study(MeanfieldSpectrum, out, quick, seed, progress=progress, **options)


# ----------------------------------------------------------------------------- figures
def _sel(rows, sweep, act):
    return [r for r in rows if r["sweep"] == sweep and r["activation"] == act]


def _fig_statistics(path: Path, rows: list[dict], theory: _Theories, cfg: MeanfieldSpectrumConfig) -> None:
    """Karakida 2019 fig 1: the three statistics vs M, theory and ensembles."""
    m_values, T, L, C = cfg.m_values, cfg.samples, cfg.depth, cfg.outputs
    Ms = np.geomspace(min(m_values) / 1.3, max(m_values) * 1.3, 200)
    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3)
    for ax, s in zip(axes, STATS, strict=True):
        for act in CASES:
            th, sel = theory(act, T), _sel(rows, "M", act)
            fn = getattr(th, THEORY_FN[s])
            ax.plot(Ms, fn(Ms), color=COLORS[act], lw=1.8, label=f"{act} theory")
            mgrid = np.array(m_values, dtype=float)
            ax.plot(mgrid, [fn(m, finite_size=True) for m in mgrid], color=COLORS[act], lw=1, ls="--", alpha=0.7)
            ax.errorbar([r["M"] for r in sel], [r[s] for r in sel], yerr=[r[f"{s}_sd"] for r in sel], fmt="o",
                        color=COLORS[act], mec="black", ms=5, capsize=3, label=f"{act} measured")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(m_values), [str(m) for m in m_values])
        ax.set_yscale("log")
        ax.set_xlabel("width M")
        ax.set_title(STAT_LABEL[s])
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"Karakida 2019 fig 1: FIM eigenvalue statistics of random nets (L={L}, α=1, C={C}, T={T}); "
                 f"points: mean ± s.d. over {cfg.seeds} networks; dashed: finite-size counts")
    save_png(fig, path)


def _fig_relative_errors(path: Path, rows: list[dict], m_values) -> None:
    fig = Figure(figsize=(15, 4.4))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, s in zip(axes, STATS, strict=True):
        for i, act in enumerate(CASES):
            sel = _sel(rows, "M", act)
            x = np.array([r["M"] for r in sel], dtype=float) * (1 + 0.04 * (i - 1))
            ax.errorbar(x, [r[f"{s}_rel_err"] for r in sel], yerr=[r[f"{s}_rel_se"] for r in sel], fmt="o-",
                        color=COLORS[act], ms=4, capsize=3, label=act)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(m_values), [str(m) for m in m_values])
        ax.set_yscale("symlog", linthresh=0.02)
        ax.set_xlabel("width M")
        ax.set_title(f"{STAT_LABEL[s]}: measured / theory − 1")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("relative error (symlog; linear within ±0.02)")
    axes[0].legend(fontsize=8, frameon=False)
    save_png(fig, path)


def _fig_t_sweep(path: Path, rows: list[dict], theory: _Theories, cfg: MeanfieldSpectrumConfig) -> None:
    t_m = cfg.t_sweep_m
    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3)
    t_rows = [r for r in rows if r["sweep"] == "T"]
    Ts = sorted({r["T"] for r in t_rows})
    Tg = np.geomspace(min(Ts), max(Ts), 120)
    for ax, s in zip(axes, STATS, strict=True):
        for act in CASES:
            sel = _sel(rows, "T", act)
            fn = THEORY_FN[s]
            ax.plot(Tg, [getattr(theory(act, float(t)), fn)(t_m) for t in Tg], color=COLORS[act], lw=1.8,
                    label=f"{act} theory")
            ax.errorbar([r["T"] for r in sel], [r[s] for r in sel], yerr=[r[f"{s}_sd"] for r in sel], fmt="o",
                        color=COLORS[act], mec="black", ms=5, capsize=3, label=f"{act} measured")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of inputs T")
        ax.set_title(STAT_LABEL[s])
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"Karakida 2019 supplementary C.1: statistics vs T at M = {t_m} (L={cfg.depth}, C={cfg.outputs}); "
                 f"mean ± s.d. over {cfg.seeds} networks (shared across T)")
    save_png(fig, path)


def _fig_spectra(path: Path, example: dict, theory: _Theories, cfg: MeanfieldSpectrumConfig) -> None:
    T, M = cfg.samples, max(cfg.m_values)
    fig = Figure(figsize=(6.8, 4.6))
    ax = fig.add_subplot()
    for act, ev in example.items():
        th = theory(act, T)
        ax.plot(np.arange(1, len(ev) + 1), ev, "o", ms=3, color=COLORS[act], label=f"{act}")
        ax.axhline(th.max_eigenvalue(M), color=COLORS[act], ls="--", lw=1)
        inv_T = 0.0 if math.isinf(th.samples) else 1 / th.samples  # the weight of the diagonal term, 1/T
        ax.axhline(th.alpha * (th.kappa1 - th.kappa2) * M * inv_T, color=COLORS[act], ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"Nonzero FIM eigenvalues of one network, M = {M}, T = {T}\ndashed: theory λ_max;  dotted: "
                 "α(κ1−κ2)M/T,\nthe mean of the other T−1 eigenvalues of F* (same mean-field argument)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    save_png(fig, path)


# ----------------------------------------------------------------------------- summary
def _pct(v: float, se: float) -> str:
    return f"{100 * v:+.1f}% ± {100 * se:.1f}"


def _theory_and_errors(config: dict, m_rows: list[dict], theory: _Theories) -> list[str]:
    """The theory table and the relative errors of the ensemble means per statistic."""
    T = config["samples"]
    Ms = sorted({r["M"] for r in m_rows})
    lines = [
        f"## Theory (fl.theory.meanfield, T = {T})",
        "",
        "| activation | (σ_w², σ_b²) | α | κ1 | κ2 | q^L = E f² | m_λ·M | s_λ | λ_max / M | ⟨θ_wᵀFθ_w⟩ (Thm 5) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for act, (sw, sb) in CASES.items():
        th = theory(act, T)
        lines.append(f"| {act} | ({sw:g}, {sb:g}) | {th.alpha:g} | {th.kappa1:.5g} | {th.kappa2:.5g} | "
                     f"{th.q[-1]:.4g} | {th.mean_eigenvalue(1.0):.5g} | {th.second_moment(1.0):.5g} | "
                     f"{th.max_eigenvalue(1.0):.5g} | {th.fisher_rao_norm():.5g} |")
    lines += ["", "## Relative error of the ensemble mean vs the theory (measured / theory − 1, ± 1 s.e.)", ""]
    for s in STATS:
        lines += [f"**{STAT_LABEL[s]}**", "", "| M | P | " + " | ".join(CASES) + " |",
                  "|---|---|" + "---|" * len(CASES)]
        for M in Ms:
            cells = []
            for act in CASES:
                r = next(r for r in m_rows if r["activation"] == act and r["M"] == M)
                cells.append(_pct(r[f"{s}_rel_err"], r[f"{s}_rel_se"]))
            P = next(r["P"] for r in m_rows if r["M"] == M)
            lines.append(f"| {M} | {P} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _largest_width_and_finite_size(m_rows: list[dict]) -> list[str]:
    Ms = sorted({r["M"] for r in m_rows})
    big = max(Ms)
    worst = max((abs(r[f"{s}_rel_err"]), s, r["activation"]) for r in m_rows if r["M"] == big for s in STATS)
    within = sum(abs(r[f"{s}_rel_err"]) <= 3 * r[f"{s}_rel_se"] for r in m_rows if r["M"] == big for s in STATS)
    lines = [
        f"At the largest width M = {big} the largest deviation is {100 * worst[0]:.1f}% ({worst[2]}, "
        f"{STAT_LABEL[worst[1]]}); {within} of {3 * len(CASES)} statistics lie within 3 s.e. of the theory. "
        "Deviations at small M are the finite-width corrections the M ≫ 1 theory omits; they shrink roughly "
        "like 1/M (see relative_errors.png). m_λ is right at every M (it only needs tr F); s_λ converges slowest, "
        "most for small κ2 (linear, tanh), where its limit C α κ2² is small compared with the O(1/M) excess "
        "that the fluctuating off-diagonal entries of the dual matrix add (see also the T sweep: the relative "
        "excess grows with T as s_λ falls towards C α κ2²).",
        "",
        "Finite-size variant (same macroscopic variables, exact parameter count P(M) and the O(1) bias terms; "
        "not part of Karakida 2019) — relative error at each M:",
        "",
        "| M | " + " | ".join(f"{a}: m / s / λ_max" for a in CASES) + " |",
        "|---|" + "---|" * len(CASES),
    ]
    for M in Ms:
        cells = []
        for act in CASES:
            r = next(r for r in m_rows if r["activation"] == act and r["M"] == M)
            cells.append(" / ".join(f"{100 * r[f'{s}_rel_err_fs']:+.1f}%" for s in STATS))
        lines.append(f"| {M} | " + " | ".join(cells) + " |")
    return lines


def _t_sweep_and_fisher_rao(config: dict, rows: list[dict], m_rows: list[dict]) -> list[str]:
    t_rows = [r for r in rows if r["sweep"] == "T"]
    Ts = sorted({r["T"] for r in t_rows})
    Ms = sorted({r["M"] for r in m_rows})
    lines = ["", f"## T sweep at M = {config['t_sweep_m']} (supplementary C.1): relative error m / s / λ_max", "",
             "| T | " + " | ".join(CASES) + " |", "|---|" + "---|" * len(CASES)]
    for T_ in Ts:
        cells = []
        for act in CASES:
            r = next(r for r in t_rows if r["activation"] == act and r["T"] == T_)
            cells.append(" / ".join(f"{100 * r[f'{s}_rel_err']:+.1f}%" for s in STATS))
        lines.append(f"| {T_} | " + " | ".join(cells) + " |")
    lines += ["", "## Fisher–Rao norm of the weights (Theorem 5)", "",
              "Theorem 5's value C Σ_l σ_w² q̃^l q̂^{l−1} equals Σ_i ⟨θ_i²⟩ F_ii (cross terms dropped). The actual "
              "θ_wᵀ F θ_w of each network keeps the cross terms θ_i θ_j F_ij, which do not average out.", "",
              "| activation | M | theory (Thm 5) | measured Σ σ_i² F_ii | rel. err | measured θ_wᵀFθ_w "
              "| ratio to theory |",
              "|---|---|---|---|---|---|---|"]
    for act in CASES:
        for M in (Ms[len(Ms) // 2], max(Ms)):
            r = next(r for r in m_rows if r["activation"] == act and r["M"] == M)
            th = r["fisher_rao_theory"]
            lines.append(f"| {act} | {M} | {th:.4g} | {r['fisher_rao_diag']:.4g} ± {r['fisher_rao_diag_se']:.2g} | "
                         f"{100 * (r['fisher_rao_diag'] / th - 1):+.1f}% | {r['fisher_rao']:.4g} ± "
                         f"{r['fisher_rao_se']:.2g} | {r['fisher_rao'] / th:.3g} |")
    return lines


def _library_section(config: dict, lib_dev: dict) -> list[str]:
    lines = ["", "## Cross-check with the library", ""]
    if lib_dev:
        dev = max(lib_dev.values())
        lines.append(f"For the first network of every (activation, M ≤ {config['library_check_max_m']}), "
                     f"`fl.eigenvalues(model, (X, None), fl.Gaussian(1.0), method=\"gram\")` + `fl.spectrum_stats` "
                     f"on the equivalent `nn.Sequential` (float64) agree with the batched dual matrix to "
                     f"{dev:.1e} (max relative deviation over {len(lib_dev)} networks; "
                     f"{'ok' if dev < (1e-4 if config['dtype'] == 'float32' else 1e-9) else '**CHECK**'}).")
    else:
        lines.append("Skipped (no M ≤ library_check_max_m).")
    return lines


def _summary(config: dict, rows: list[dict], lib_dev: dict, theory: _Theories, elapsed: float, figures: dict) -> str:
    T, L, C = config["samples"], config["depth"], config["outputs"]
    m_rows = [r for r in rows if r["sweep"] == "M"]
    lines = [
        "# Mean-field FIM statistics vs random networks (Karakida 2019, fig 1, supplementary C.1)",
        "",
        f"Random networks of Karakida's ensemble: L = {L} weight layers, α_l = 1, C = {C} linear output(s), "
        f"inputs x ~ N(0, I_M), standard parameterisation (W ~ N(0, σ_w²/M_in), b ~ N(0, σ_b²), `nn.Linear`). "
        f"FIM of Karakida 2019 eq 2 (Gaussian σ = 1, mean over T = {T} inputs); m_λ = tr F / P and s_λ = tr F² / P "
        f"over all P eigenvalues (zeros included), from the exact {T * C}×{T * C} dual matrix of each network "
        f"(never the P × P matrix). {config['seeds']} networks per point, seed {config['seed']}"
        f"{' (quick mode)' if config['quick'] else ''}, ensembles in {config['dtype']}. "
        f"Wall time {elapsed:.1f} s.",
        "",
        *_theory_and_errors(config, m_rows, theory),
        *_largest_width_and_finite_size(m_rows),
        *_t_sweep_and_fisher_rao(config, rows, m_rows),
        *_library_section(config, lib_dev),
        "", *figures_section(figures),
        "Per point: [metrics.csv](metrics.csv); per network: [networks.csv](networks.csv); "
        "settings: [config.json](config.json).", "",
    ]
    return "\n".join(lines)
