"""The main job: a short tour of fisherlens — an MLP trained on real MNIST digits with :class:`fisherlens.Monitor` on.

A 784-64-32-10 ReLU MLP is trained with Adam and softmax cross-entropy on 4000 digits of the MNIST subset
shipped with fisherlens (1000 held out).  Three monitors watch the plain training loop:

* ``mon`` (kind ``"true"``, every half epoch, on a fixed probe of 512 training images, rows appended to
  ``metrics.csv`` as they come): probe loss and accuracy, the true-Fisher trace and the Fisher–NTK relation's
  two sides (:func:`fisherlens.fisher_ntk_trace`), the NTK trace ``(1/N) tr Θ``, the top Fisher eigenvalue
  (Lanczos), the Fisher–Rao norm ``θᵀ F θ``, the gradient norm and the distance travelled on the Fisher manifold
  ``Σ sqrt(Δθᵀ F Δθ)`` (docs/conventions.md#path-length).  Extra columns: the same relation for the empirical
  Fisher (a second
  monitor, ``mon_emp``), train/test loss and accuracy, and the per-layer true-Fisher traces
  (:func:`fisherlens.fisher_blocks`).
* ``mon_step`` and ``mon_hutch`` (every step, ``batch_fisher_trace``): the exact empirical-Fisher trace of each
  training batch from the per-sample gradient norms of the training backward itself, and the true-Fisher trace
  by one-draw Hutchinson (one extra activation-only backward): ``steps.csv``.

At the end the library is checked against a naive float64 per-sample autograd loop on a few probe inputs.
All traces are means over the inputs (docs/conventions.md#fisher-information).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import fisherlens as fl

from .. import datasets, plots
from ..runs import read_csv
from ._common import (
    arch_name,
    check_int,
    check_ints,
    check_number,
    evaluate,
    make_mlp,
    rel_dev,
    split_with_probe,
    train_epoch,
)
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = ["demo", "Demo", "DemoConfig"]

#: prefix of the per-layer true-Fisher trace columns in metrics.csv.
LAYER = "layer_true:"

#: probe inputs on which the library is compared with a naive per-sample autograd loop.
NAIVE_N = 8

#: observables of the main monitor (kind "true", probe set).
OBSERVABLES = ("loss", "accuracy", "relation", "ntk_trace", "top_eigenvalue", "rao_norm", "grad_norm", "path_length")

FIGURES = {
    "training.png": "Loss and accuracy: training batches (every step), probe and test set (checkpoints).",
    "fisher_traces.png": "True and empirical Fisher traces and the NTK trace per input on the probe set.",
    "batch_traces.png": "Fisher traces of every training batch, recorded by the monitor at each step.",
    "fisher_ntk_relation.png": "Both sides of the Fisher–NTK trace relation, and tr F / tr Θ.",
    "geometry.png": "Top Fisher eigenvalue, Fisher–Rao norm, gradient norm and path length on the Fisher manifold.",
    "layer_traces.png": "Per-parameter-tensor true-Fisher traces at the end of training (log).",
}



@dataclass
class DemoConfig(StudyConfig):
    """Options of the demo (defaults: the full tour; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds the data split, the initialisation and the batch order (runs are deterministic).
        data: ``"mnist-subset"`` (default, the 5000 real MNIST digits shipped with fisherlens), ``"digits"``
            (scikit-learn 8×8) or a folder of MNIST IDX files (its train split is used).
        epochs: training epochs (20; quick 1).
        n_train, n_test, n_probe: sample counts (4000 / 1000 / 512; quick 300 / 200 / 64); shrunk to an 80/20
            split when the dataset is smaller.
        batch_size, lr: Adam mini-batch size and learning rate.
        hidden: hidden widths (a single integer: one hidden layer).
        checkpoints_per_epoch: probe records per epoch (plus one before training).
    """

    QUICK = {"epochs": 1, "n_train": 300, "n_test": 200, "n_probe": 64}

    data: str = "mnist-subset"
    epochs: int = 20
    n_train: int = 4000
    n_test: int = 1000
    n_probe: int = 512
    batch_size: int = 32
    lr: float = 1e-3
    hidden: tuple[int, ...] = (64, 32)
    checkpoints_per_epoch: int = 2

    def validate(self) -> None:
        for name in ("epochs", "n_train", "n_test", "n_probe", "batch_size", "checkpoints_per_epoch"):
            check_int(name, getattr(self, name))
        super().validate()
        check_number("lr", self.lr, lo=0)
        self.hidden = check_ints("hidden", self.hidden, allow_empty=True)  # --set hidden=16: one hidden layer


def _naive_check(model: nn.Module, probe: tuple[Tensor, Tensor], n: int = NAIVE_N) -> float:
    """Max relative deviation of fisherlens from a naive float64 per-sample autograd loop.

    On the first ``n`` probe inputs of a float64 copy of ``model``: ``tr F`` (true and empirical)
    and ``(1/N) tr Θ`` from ``J_n`` built one output at a time, independently of the library's
    engines.
    """
    md = copy.deepcopy(model).double().eval()
    X, y = probe[0][:n].double(), probe[1][:n]
    ps = [p for p in md.parameters() if p.requires_grad]
    tr_t = tr_e = tr_k = 0.0
    for i in range(len(X)):
        f = md(X[i : i + 1])[0]
        grads = [torch.autograd.grad(f[a], ps, retain_graph=True) for a in range(len(f))]
        J = torch.stack([torch.cat([g.reshape(-1) for g in ga]) for ga in grads])  # (C, P)
        pi = f.detach().softmax(-1)
        lam = torch.diag(pi) - torch.outer(pi, pi)
        g = J.T @ (pi - F.one_hot(y[i], len(f)).double())
        tr_t += ((lam @ J) * J).sum().item()
        tr_e += g.square().sum().item()
        tr_k += J.square().sum().item()
    lik, data = fl.Categorical(), (X, y)
    got = (
        fl.fisher_trace(md, data, lik, kind="true"),
        fl.fisher_trace(md, data, lik, kind="empirical"),
        fl.ntk_trace(md, X, reduction="mean"),
    )
    return max(rel_dev(a, b / len(X)) for a, b in zip(got, (tr_t, tr_e, tr_k), strict=True))


class _Tour:
    """The demo's training loop: Adam on softmax cross-entropy with four monitors watching it."""

    def __init__(self, cfg: DemoConfig, run: StudyRun, model: nn.Module, train, test, probe):
        self.cfg, self.model, self.train_set, self.test_set, self.probe = cfg, model, train, test, probe
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        lik = self.lik = fl.Categorical()
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.steps_per_epoch = math.ceil(len(train[0]) / cfg.batch_size)
        self.total = total = cfg.epochs * self.steps_per_epoch
        self.every = every = max(1, round(self.steps_per_epoch / cfg.checkpoints_per_epoch))
        schedule = lambda s: s % every == 0 or s == total  # noqa: E731  (and always the last step)
        self.mon = fl.Monitor(model, lik, probe, observables=OBSERVABLES, every=schedule, kind="true",
                              run=run.folder)
        self.mon_emp = fl.Monitor(model, lik, probe, observables=("relation",), kind="empirical")  # in checkpoint
        self.mon_step = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="empirical")
        self.mon_hutch = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="true",
                                    method="hutchinson", generator=torch.Generator().manual_seed(cfg.seed + 2))
        self.monitor_seconds = 0.0
        self.steps: list[dict] = []
        self.step = 0

    def checkpoint(self, step: int) -> dict:
        """Measure the checkpoint extras, then let the main monitor record (scheduled or forced)."""
        model = self.model
        emp = self.mon_emp.record(step)
        train_loss, train_acc = evaluate(model, *self.train_set)
        test_loss, test_acc = evaluate(model, *self.test_set)
        was = model.training
        model.eval()
        layers = fl.fisher_blocks(model, self.probe, self.lik, kind="true", what="trace")
        model.train(was)
        extra = {
            "epoch": step / self.steps_per_epoch,
            "fisher_emp": emp["fisher_trace"],
            "ntk_side_emp": emp["ntk_side"],
            "relation_ratio_emp": emp["relation_ratio"],
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **{f"{LAYER}{k}": v for k, v in layers.items()},
        }
        return self.mon.record(step, **extra)

    def after_step(self, bar, loss: Tensor, outputs: Tensor, idx: Tensor) -> None:
        """The monitors' work after one optimiser step (timed as monitor time)."""
        self.step += 1
        tm = time.perf_counter()
        r_emp = self.mon_step.step(loss=loss, outputs=outputs, targets=self.train_set[1][idx])
        r_true = self.mon_hutch.step()
        self.steps.append({"step": self.step, "batch_loss": r_emp["batch_loss"],
                           "batch_fisher_emp": r_emp["batch_fisher_trace"],
                           "batch_fisher_true_hutchinson": r_true["batch_fisher_trace"]})
        if self.mon.scheduled(self.step):
            rec = self.checkpoint(self.step)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", test_acc=f"{rec['test_acc']:.3f}")
        else:
            self.mon.step()
        self.monitor_seconds += time.perf_counter() - tm
        bar.update(1)

    def train(self, run: StudyRun) -> None:
        """Record step 0, train for the configured epochs, close the monitors."""
        tm = time.perf_counter()
        self.checkpoint(0)
        self.monitor_seconds += time.perf_counter() - tm
        Xtr, ytr = self.train_set
        with run.bar(self.total, "training", unit="step") as bar:
            self.model.train()
            for _ in range(self.cfg.epochs):
                train_epoch(self.model, self.opt, Xtr, ytr, F.cross_entropy, batch_size=self.cfg.batch_size,
                            generator=self.gen, after_step=lambda *a: self.after_step(bar, *a))
        for m in (self.mon, self.mon_emp, self.mon_step, self.mon_hutch):
            m.close()


class Demo(Study):
    """The tour of fisherlens: an MLP trained on MNIST digits with :class:`fisherlens.Monitor` on."""

    name = "demo"
    description = ("The tour: train a 784-64-32-10 MLP on the embedded MNIST subset with fl.Monitor on (Fisher/NTK "
                   "traces and relation, top eigenvalue, Fisher-Rao norm, path length, per-step batch traces).")
    Config = DemoConfig

    def setup(self, cfg: DemoConfig):
        return datasets.load(cfg.data)  # before the folder is created: a bad --data leaves no trace

    def config_json(self, cfg: DemoConfig, inputs) -> dict:
        return {
            "experiment": "demo", "quick": cfg.quick, "seed": cfg.seed, "data": str(cfg.data), "epochs": cfg.epochs,
            "n_train": cfg.n_train, "n_test": cfg.n_test, "n_probe": cfg.n_probe, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "hidden": list(cfg.hidden), "checkpoints_per_epoch": cfg.checkpoints_per_epoch,
            "optimizer": "Adam", "loss": "softmax cross-entropy", "likelihood": "Categorical",
            "monitor": list(OBSERVABLES),
        }

    def compute(self, cfg: DemoConfig, run: StudyRun) -> dict:
        for stale in ("metrics.csv", "steps.csv"):  # a rerun of the same config starts its tables afresh
            run.file(stale).unlink(missing_ok=True)
        X, y = run.inputs
        Xtr, ytr, Xte, yte, probe, n_classes = split_with_probe(X, y, cfg.n_train, cfg.n_test, cfg.n_probe, cfg.seed)
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the global RNG
            torch.manual_seed(cfg.seed)
            model = make_mlp(X.shape[1], cfg.hidden, n_classes)
        tour = _Tour(cfg, run, model, (Xtr, ytr), (Xte, yte), probe)
        tour.train(run)
        model.eval()
        naive_dev = _naive_check(model, probe)
        rows, steps = tour.mon.records, tour.steps
        run.write_csv("steps.csv", steps)
        csv_ok = [{k: float(v) for k, v in r.items()} for r in read_csv(run.file("metrics.csv"))] == [
            {k: float(v) for k, v in r.items()} for r in rows
        ]
        used = {
            "arch": arch_name(X.shape[1], cfg.hidden, n_classes), "n_train": len(Xtr), "n_test": len(Xte),
            "n_probe": len(probe[0]), "P": sum(p.numel() for p in model.parameters()), "steps": tour.total,
            "every": tour.every, "monitor_seconds": tour.monitor_seconds, "naive_dev": naive_dev, "csv_ok": csv_ok,
        }
        layers = {k[len(LAYER) :]: v for k, v in rows[-1].items() if k.startswith(LAYER)}
        return {"rows": rows, "steps": steps, "layers": layers, "used": used}

    def figures(self, results: dict, run: StudyRun) -> dict[str, str]:
        rows, steps = results["rows"], results["steps"]
        _fig_training(run.file("training.png"), rows, steps)
        _fig_batch_traces(run.file("batch_traces.png"), rows, steps)
        _fig_traces_relation_geometry(run, rows)
        plots.bar_plot(run.file("layer_traces.png"), results["layers"], log=True, ylabel="true-Fisher trace",
                       title=f"Per-layer true-Fisher trace at step {rows[-1]['step']}")
        return FIGURES

    def report(self, results: dict, run: StudyRun) -> str:
        return _summary(run.cfg, {**results["used"], "seconds": run.elapsed()}, results["rows"], results["steps"],
                        results["layers"], run.figures)


def demo(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True, **options) -> Path:
    """Train a small MLP with :class:`fisherlens.Monitor` on; write figures, ``summary.md`` and the metrics.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (300 train / 200 test / 64 probe samples, 1 epoch).
        seed: seeds the data split, the initialisation and the batch order (runs are deterministic).
        progress: show a tqdm bar over training steps.
        **options: the fields of :class:`DemoConfig` (``data``, ``epochs``, ``hidden``, ...).

    Returns:
        Path of the run folder with ``config.json``, ``metrics.csv`` (one row per checkpoint), ``steps.csv``
        (one row per training step), six PNGs and ``summary.md``.
    """
    return run_study(Demo, out, quick, seed, progress=progress, **options)


# ----------------------------------------------------------------------------- figures
def _moving_average(v: list[float], w: int) -> list[float]:
    t = torch.tensor(v, dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)])
    i = torch.arange(1, len(t) + 1)
    lo = (i - w).clamp_min(0)
    return ((c[i] - c[lo]) / (i - lo)).tolist()


def _col(rows: list[dict], k: str) -> list[float]:
    return [r[k] for r in rows]


def _fig_training(path: Path, rows: list[dict], steps: list[dict]) -> None:
    x, xs = _col(rows, "step"), _col(steps, "step")
    fig = Figure(figsize=(6.4, 6.6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(xs, _col(steps, "batch_loss"), color="0.8", lw=0.6, label="training batch (every step)")
    ax1.plot(x, _col(rows, "train_loss"), "o-", ms=3, label="all training samples")
    ax1.plot(x, _col(rows, "loss"), "s-", ms=3, label="probe (monitor)")
    ax1.plot(x, _col(rows, "test_loss"), "^-", ms=3, label="test")
    ax1.set_ylabel("cross-entropy")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title("Loss and accuracy during training")
    ax2.plot(x, _col(rows, "train_acc"), "o-", ms=3, label="train")
    ax2.plot(x, _col(rows, "accuracy"), "s-", ms=3, label="probe (monitor)")
    ax2.plot(x, _col(rows, "test_acc"), "^-", ms=3, label="test")
    ax2.set_ylabel("accuracy")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    plots.save_png(fig, path)


def _fig_batch_traces(path: Path, rows: list[dict], steps: list[dict]) -> None:
    x, xs = _col(rows, "step"), _col(steps, "step")
    w = max(1, len(steps) // 50)
    emp, hut = _col(steps, "batch_fisher_emp"), _col(steps, "batch_fisher_true_hutchinson")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.plot(xs, hut, color="C0", alpha=0.25, lw=0.5)
    ax.plot(xs, emp, color="C1", alpha=0.25, lw=0.5)
    ax.plot(xs, _moving_average(hut, w), color="C0", lw=1.6, label=f"true, one-draw Hutchinson (mean of {w})")
    ax.plot(xs, _moving_average(emp, w), color="C1", lw=1.6, label=f"empirical, exact (mean of {w})")
    ax.plot(x, _col(rows, "fisher_trace"), "s", color="C0", ms=4, mfc="none", label="true, exact, probe set")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("tr F of the training batch")
    ax.set_title("Fisher trace of every training batch (monitor, batch_fisher_trace)")
    ax.legend(fontsize=8)
    plots.save_png(fig, path)


def _fig_traces_relation_geometry(run: StudyRun, rows: list[dict]) -> None:
    x = _col(rows, "step")

    def col(k: str) -> list[float]:
        return _col(rows, k)

    plots.line_plot(
        run.file("fisher_traces.png"), x,
        {"true Fisher  tr F": col("fisher_trace"), "empirical Fisher  tr F_emp": col("fisher_emp"),
         "NTK  (1/N) tr Θ": col("ntk_trace")},
        ylabel="trace (mean over probe inputs)", logy=True, title="Fisher and NTK traces on the probe set",
    )
    direct = {"marker": None, "linewidth": 1.8}
    via_ntk = {"linestyle": "none", "marker": "o", "markersize": 5, "markerfacecolor": "none"}
    plots.line_panels(
        run.file("fisher_ntk_relation.png"), x,
        [
            {
                "series": {"true: tr F": col("fisher_trace"), "true: (1/N) Σ tr(Λ Θ_nn)": col("ntk_side"),
                           "empirical: tr F_emp": col("fisher_emp"),
                           "empirical: (1/N) Σ rᵀ Θ_nn r": col("ntk_side_emp")},
                "styles": {"true: tr F": direct, "empirical: tr F_emp": direct,
                           "true: (1/N) Σ tr(Λ Θ_nn)": via_ntk, "empirical: (1/N) Σ rᵀ Θ_nn r": via_ntk},
                "ylabel": "trace (mean over probe)", "logy": True,
                "title": "Fisher trace: directly (lines) and via the NTK (circles)",
            },
            {
                "series": {"true: tr F / tr Θ": col("relation_ratio"),
                           "empirical: tr F_emp / tr Θ": col("relation_ratio_emp")},
                "ylabel": "ratio", "logy": True, "title": "Fisher / NTK trace ratio",
            },
        ],
    )
    plots.line_panels(
        run.file("geometry.png"), x,
        [
            {"series": {"λ_max(F)": col("top_eigenvalue"), "tr F": col("fisher_trace")}, "logy": True,
             "ylabel": "eigenvalue / trace", "title": "Top Fisher eigenvalue (Lanczos) and the trace"},
            {"series": {"θᵀ F θ (Fisher–Rao norm)": col("rao_norm"), "‖∇L‖² (probe)":
                        [g * g for g in col("grad_norm")]}, "logy": True, "ylabel": "value",
             "title": "Fisher–Rao norm and squared gradient norm"},
            {"series": {"Σ sqrt(Δθᵀ F Δθ)": col("path_length")}, "ylabel": "length",
             "title": "Distance travelled on the Fisher manifold (between checkpoints)"},
        ],
    )


# ----------------------------------------------------------------------------- summary
def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _final_numbers(last: dict) -> list[tuple[str, str]]:
    return [
        ("step / epoch", f"{last['step']} / {last['epoch']:.2f}"),
        ("train loss (all train samples)", _fmt(last["train_loss"])),
        ("probe loss", _fmt(last["loss"])),
        ("train accuracy", _fmt(last["train_acc"])),
        ("test accuracy", _fmt(last["test_acc"])),
        ("true Fisher trace tr F", _fmt(last["fisher_trace"])),
        ("empirical Fisher trace tr F_emp", _fmt(last["fisher_emp"])),
        ("NTK trace per input (1/N) tr Θ", _fmt(last["ntk_trace"])),
        ("tr F / tr Θ (true)", _fmt(last["relation_ratio"])),
        ("tr F_emp / tr Θ (empirical)", _fmt(last["relation_ratio_emp"])),
        ("top Fisher eigenvalue λ_max", _fmt(last["top_eigenvalue"])),
        ("critical learning rate of GD, 2/λ_max", _fmt(fl.critical_learning_rate(last["top_eigenvalue"]))),
        ("Fisher–Rao norm θᵀ F θ", _fmt(last["rao_norm"])),
        ("probe gradient norm ‖∇L‖", _fmt(last["grad_norm"])),
        ("path length on the Fisher manifold", _fmt(last["path_length"])),
    ]


def _checks(used: dict, rows: list[dict]) -> list[str]:
    """The consistency-check table of the summary."""
    dev_t = max(rel_dev(r["fisher_trace"], r["ntk_side"]) for r in rows)
    dev_e = max(rel_dev(r["fisher_emp"], r["ntk_side_emp"]) for r in rows)
    dev_blocks = max(
        rel_dev(r["fisher_trace"], math.fsum(v for k, v in r.items() if k.startswith(LAYER))) for r in rows
    )
    bound_ok = all(r["top_eigenvalue"] <= r["fisher_trace"] * (1 + 1e-5) for r in rows)
    tol = 1e-4  # float32 accumulation

    def ok(d: float) -> str:
        return "ok" if d < tol else "**CHECK**"

    return [
        "| identity | max rel. deviation | |",
        "|---|---|---|",
        f"| Fisher–NTK relation, true Fisher: tr F = (1/N) Σ tr(Λ_n Θ_nn) | {dev_t:.2e} | {ok(dev_t)} |",
        f"| Fisher–NTK relation, empirical: tr F_emp = (1/N) Σ r_nᵀ Θ_nn r_n | {dev_e:.2e} | {ok(dev_e)} |",
        f"| Σ per-layer traces (fisher_blocks) = monitor's tr F | {dev_blocks:.2e} | {ok(dev_blocks)} |",
        f"| final tr F, tr F_emp, tr Θ vs a naive float64 autograd loop ({NAIVE_N} probe inputs) | "
        f"{used['naive_dev']:.2e} | {ok(used['naive_dev'])} |",
        f"| λ_max ≤ tr F at every record | | {'ok' if bound_ok else '**CHECK**'} |",
        f"| metrics.csv (written by the monitor) re-read equals its records | | "
        f"{'ok' if used['csv_ok'] else '**CHECK**'} |",
    ]


def _summary(cfg: DemoConfig, used: dict, rows: list[dict], steps: list[dict], layers: dict, figures: dict) -> str:
    last, first = rows[-1], rows[0]
    emp = torch.tensor([r["batch_fisher_emp"] for r in steps], dtype=torch.float64)
    hut = torch.tensor([r["batch_fisher_true_hutchinson"] for r in steps], dtype=torch.float64)
    lines = [
        "# fisherlens tour: an MLP trained with fl.Monitor on",
        "",
        f"Data `{cfg.data}`: {used['n_train']} train / {used['n_test']} test samples, "
        f"probe set = first {used['n_probe']} training samples. Model {used['arch']} ReLU MLP "
        f"(P = {used['P']} parameters), Adam lr={cfg.lr}, batch {cfg.batch_size}, "
        f"{cfg.epochs} epoch(s) = {used['steps']} steps, seed {cfg.seed}"
        f"{' (quick mode)' if cfg.quick else ''}. Probe records every {used['every']} steps "
        f"({len(rows)} records); training-batch traces at every step. Wall time {used['seconds']:.1f} s, "
        f"of which {used['monitor_seconds']:.1f} s in the monitors.",
        "",
        "All traces are means over the inputs (docs/conventions.md#fisher-information); probe quantities in eval "
        "mode after the step, "
        "training-batch traces at the parameters of the step's forward pass.",
        "",
        "## Final numbers",
        "",
        "| quantity | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _final_numbers(last)),
        "",
        "Per-layer true-Fisher traces at the end:",
        "",
        "| parameter | tr F block | share |",
        "|---|---|---|",
        *(f"| `{k}` | {v:.4g} | {v / last['fisher_trace']:.1%} |" for k, v in layers.items()),
        "",
        f"From step 0 to {last['step']}: tr F {first['fisher_trace']:.4g} → {last['fisher_trace']:.4g}, "
        f"tr F_emp {first['fisher_emp']:.4g} → {last['fisher_emp']:.4g}, "
        f"(1/N) tr Θ {first['ntk_trace']:.4g} → {last['ntk_trace']:.4g}, "
        f"λ_max {first['top_eigenvalue']:.4g} → {last['top_eigenvalue']:.4g}.",
        "",
        f"Training-batch traces over all {len(steps)} steps: empirical (exact) mean {emp.mean().item():.4g}, "
        f"true (one-draw Hutchinson) mean {hut.mean().item():.4g}.",
        "",
        "## Consistency checks",
        "",
        *_checks(used, rows),
        "",
        *figures_section(figures),
        "Metrics per probe record: [metrics.csv](metrics.csv); per training step: [steps.csv](steps.csv); "
        "settings: [config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
