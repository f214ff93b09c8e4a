r"""Natural-gradient descent and Fisher pruning on MNIST: exact NGD against its cheap stand-ins.

Two questions about the Fisher as an optimiser and as a saliency, on the 5000 real MNIST digits shipped with
fisherlens (4000 train / 1000 test by default) and a small ReLU MLP (``784 → 64 → 10``):

**1. Optimisers.**  From one initialisation and on one sequence of mini-batches (seeded, the same for all), train
with

* exact natural-gradient descent, :class:`fisherlens.optim.NaturalGradient` (``θ ← θ − η (F + λI)⁻¹ g``, F the true
  Fisher of the batch, the damped solve of :func:`fisherlens.natural_gradient`), at fixed dampings λ
  (``dampings``) and with Levenberg–Marquardt adaptive damping (``adaptive_damping``, started at
  ``adaptive_start``);
* a diagonal natural gradient, the baseline of this study (:func:`diag_direction`): the step
  ``η g / (d̂ + λ)``, ``d̂`` the Hutchinson estimate of the Fisher diagonal on the same batch
  (``fl.fisher_diag(method="hutchinson", samples=diag_samples)``, one backward per draw) — a step of first-order
  cost;
* SGD (no momentum, μ = 0) at the learning rate the Fisher predicts at initialisation, the critical rate
  ``η_c = 2(1 + μ)/λ_max = 2/λ_max``
  (:func:`critical_lr`: λ_max the top eigenvalue of the true Fisher of the first batch,
  ``fl.eigenvalues(k=1, method="gram")``, exact; :func:`fisherlens.critical_learning_rate`), and at the fractions
  ``sgd_fractions`` of it;
* Adam (``adam_lr``).

The natural-gradient runs take ``steps`` steps, the first-order ones (diagonal, SGD, Adam) ``first_order_steps``
(they cost far less per step: the comparison at equal wall time needs them longer).  Every ``eval_every`` steps
the study records the loss and accuracy on a fixed subset of ``n_eval`` training images and on the test set, and
the optimiser's own cumulative wall time (the steps only: evaluations are not counted); for the SGD runs also
λ_max of the first batch's Fisher, to set ``η·λ_max`` against the edge 2.  A run whose parameters, outputs or loss
become non-finite, or whose training loss exceeds ten times its initial value, is stopped and marked diverged; a
run that ends at chance-level test accuracy (below 2/C) is reported as collapsed.

**2. Pruning.**  The Adam model of part 1 is pruned (weight matrices only, one global ranking) at the sparsities
``sparsities`` by three saliencies (:mod:`fisherlens.prune`): Optimal Brain Damage with the exact true-Fisher
diagonal on ``n_saliency`` training images (``s_i = ½ F_ii θ_i²``), the same with the Hutchinson diagonal
(``hutchinson_samples`` draws), and magnitude ``|θ_i|``.  Test accuracy at each sparsity is measured right after
pruning and after a short fine-tune: ``finetune_steps`` plain SGD steps (``finetune_lr``) with the masks applied
(torch's pruning reparametrisation, so pruned entries stay zero), on the same batches for every criterion.

``summary.md`` reports, from the run's own numbers: per optimiser the final losses and accuracies, the wall time,
the steps and seconds to the first test accuracy ≥ ``target_accuracy``; the effect of damping (final loss and
accuracy, solver iterations and residuals, the adaptive λ's path); λ_max and η_c at initialisation and λ_max along
the SGD runs; and per pruning criterion the accuracy at every sparsity, the largest sparsity that keeps the test
accuracy within one point of the dense model's, and how closely the Hutchinson saliency ranks like the exact one.
Not resumable: the default run takes about a minute and a half on one thread.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

import fisherlens as fl

from .. import datasets, plots
from ._common import (
    arch_name,
    as_tuple,
    check_distinct,
    check_int,
    check_ints,
    check_number,
    evaluate,
    make_mlp,
    split_with_probe,
)
from .study import Study, StudyConfig, StudyRun, figures_section, run_study

Tensor = torch.Tensor

__all__ = [
    "NaturalGradientStudy", "NaturalGradientConfig", "natural_gradient", "OptimiserSpec", "optimiser_specs",
    "diag_direction", "DiagNaturalGradient", "critical_lr", "batch_schedule", "train_run", "prune_sweep",
    "COLUMNS", "PRUNE_COLUMNS", "CRITERIA", "FIGURES",
]

#: columns of ``metrics.csv`` (one row per optimiser and evaluation).
COLUMNS = ("optimiser", "family", "step", "seconds", "batch_loss", "train_loss", "train_accuracy", "test_loss",
           "test_accuracy", "lr", "damping", "residual", "iterations", "lambda_max")

#: columns of ``pruning.csv`` (one row per criterion and sparsity).
PRUNE_COLUMNS = ("criterion", "sparsity", "achieved_sparsity", "test_accuracy", "test_loss",
                 "finetuned_test_accuracy", "finetuned_test_loss", "overlap_with_exact")

#: pruning criteria: key → label.
CRITERIA = {"fisher_exact": "Fisher OBD (exact diag)", "fisher_hutchinson": "Fisher OBD (Hutchinson)",
            "magnitude": "magnitude |θ|"}

FIGURES = {
    "natural_gradient_steps.png": "training loss (n_eval training images) and test accuracy vs optimiser step, "
                                  "all optimisers",
    "natural_gradient_time.png": "the same vs the optimiser's own wall time (steps only, log scale)",
    "natural_gradient_damping.png": "effect of the damping λ on exact NGD: training loss vs step per λ, the adaptive "
                                    "λ along its run, final test accuracy vs λ, and the solve's cost vs λ",
    "natural_gradient_critical.png": "SGD at η_c and below: λ_max of the first batch's Fisher along training, and "
                                     "η·λ_max against the edge of stability 2",
    "natural_gradient_pruning.png": "test accuracy vs sparsity for the Fisher (exact, Hutchinson) and magnitude "
                                    "saliencies, right after pruning and after the short fine-tune",
}


# ----------------------------------------------------------------------------- config
@dataclass
class NaturalGradientConfig(StudyConfig):
    """Options of the study (full-run defaults; ``--quick``: :attr:`QUICK`).

    Attributes:
        data: ``"mnist-subset"`` (default), ``"digits"`` or a folder of MNIST IDX files (its train split).
        n_train, n_test: training and test images (4000 / 1000; an 80/20 split when the set is smaller).
        n_eval: the fixed subset of training images on which the training loss is recorded.
        hidden: hidden widths of the ReLU MLP (``(64,)``: 784-64-10).
        batch_size: mini-batch size of every optimiser (the natural gradient's Fisher is that batch's).
        steps: natural-gradient steps; first_order_steps: steps of the diagonal, SGD and Adam runs.
        eval_every: steps between evaluations (and at the first and last step).
        ngd_lr: η of every exact natural-gradient run.
        dampings: the fixed λ of the exact natural-gradient runs (one run each).
        adaptive_damping: add a run with Levenberg–Marquardt adaptive damping, started at ``adaptive_start``.
        diag_lr, diag_damping, diag_samples: η, λ and Hutchinson draws per step of the diagonal natural gradient.
        sgd_fractions: SGD runs at these fractions of η_c (1 = the critical rate itself).
        adam_lr: Adam's learning rate.
        target_accuracy: test accuracy whose first crossing is reported (steps and seconds).
        sparsities: pruning sparsities, each in [0, 1).
        n_saliency: training images for the Fisher saliencies; hutchinson_samples: Hutchinson draws for them.
        finetune_steps, finetune_lr: the SGD fine-tune after pruning.
        threads: torch intra-op threads (1: on a shared 2-core machine one thread keeps the wall times free of
            OpenMP spin-waits; the wall times depend on it).
    """

    QUICK = {"n_train": 800, "n_test": 400, "n_eval": 400, "hidden": (16,), "batch_size": 32, "steps": 12,
             "first_order_steps": 48, "eval_every": 4, "sparsities": (0.0, 0.5, 0.8, 0.95), "n_saliency": 200,
             "hutchinson_samples": 4, "finetune_steps": 10, "target_accuracy": 0.6}

    data: str = "mnist-subset"
    n_train: int = 4000
    n_test: int = 1000
    n_eval: int = 1000
    hidden: tuple[int, ...] = (64,)
    batch_size: int = 64
    steps: int = 300
    first_order_steps: int = 1200
    eval_every: int = 10
    ngd_lr: float = 0.3
    dampings: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3)
    adaptive_damping: bool = True
    adaptive_start: float = 1e-1
    diag_lr: float = 1e-2
    diag_damping: float = 1e-2
    diag_samples: int = 1
    sgd_fractions: tuple[float, ...] = (1.0, 0.5)
    adam_lr: float = 1e-3
    target_accuracy: float = 0.9
    sparsities: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
    n_saliency: int = 1000
    hutchinson_samples: int = 8
    finetune_steps: int = 50
    finetune_lr: float = 0.1
    threads: int | None = 1

    def validate(self) -> None:
        for name in ("n_train", "n_test", "n_eval", "batch_size", "steps", "first_order_steps", "eval_every",
                     "diag_samples", "n_saliency", "hutchinson_samples"):
            check_int(f"natural-gradient: {name}", getattr(self, name))
        check_int("natural-gradient: finetune_steps", self.finetune_steps, 0)
        self.hidden = check_ints("natural-gradient: hidden", self.hidden, allow_empty=True)
        for name in ("ngd_lr", "adaptive_start", "diag_lr", "diag_damping", "adam_lr", "finetune_lr"):
            check_number(f"natural-gradient: {name}", getattr(self, name), lo=0)
        if not isinstance(self.adaptive_damping, bool):
            raise ValueError(f"natural-gradient: adaptive_damping must be True or False, got "
                             f"{self.adaptive_damping!r}.")
        self.dampings = tuple(check_number("natural-gradient: a damping", v, lo=0) for v in as_tuple(self.dampings))
        self.sgd_fractions = tuple(check_number("natural-gradient: an sgd fraction", v, lo=0)
                                   for v in as_tuple(self.sgd_fractions))
        self.sparsities = tuple(check_number("natural-gradient: a sparsity", v) for v in as_tuple(self.sparsities))
        check_distinct("natural-gradient: dampings", self.dampings)
        check_distinct("natural-gradient: sgd_fractions", self.sgd_fractions)
        check_distinct("natural-gradient: sparsities", self.sparsities)
        if not self.sparsities or not all(0 <= s < 1 for s in self.sparsities):
            raise ValueError(f"natural-gradient: sparsities must be a non-empty list of numbers in [0, 1), got "
                             f"{self.sparsities!r}.")
        self.sparsities = tuple(sorted(self.sparsities))
        t = check_number("natural-gradient: target_accuracy", self.target_accuracy)
        if not 0 < t <= 1:
            raise ValueError(f"natural-gradient: target_accuracy must lie in (0, 1], got {t!r}.")
        super().validate()


# ----------------------------------------------------------------------------- the pieces
def diag_direction(grad: Tensor, diag: Tensor, damping: float) -> Tensor:
    """The diagonal natural-gradient direction ``g / (d + λ)`` (entrywise; ``d`` a Fisher-diagonal estimate).

    The library's Hutchinson diagonal is a mean of squares ``v ⊙ v`` (``v`` the pulled-back probe), so ``d ≥ 0``;
    a negative entry from another estimate is clamped to 0, so that ``d + λ ≥ λ > 0`` always.
    """
    return grad / (diag.clamp_min(0.0) + damping)


def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


class DiagNaturalGradient:
    """The baseline: ``θ ← θ − η g / (d̂ + λ)`` with ``d̂`` the Hutchinson Fisher diagonal of the batch.

    ``step((X, y))`` computes the batch's mean cross-entropy and its gradient (one forward and backward), then
    ``d̂ = fl.fisher_diag(model, (X, y), fl.Categorical(), method="hutchinson", samples=samples)`` (one backward
    per draw, the true Fisher of the mean over the batch — the normalisation of the loss), and takes the step.
    ``last`` holds the batch loss, ``g``, ``d̂`` and the direction of the last step.
    """

    def __init__(self, model: nn.Module, lr: float, damping: float, samples: int = 1,
                 generator: torch.Generator | None = None):
        self.model, self.lr, self.damping, self.samples = model, float(lr), float(damping), int(samples)
        self.generator = generator
        self.last: dict = {}

    def step(self, batch: tuple[Tensor, Tensor]) -> float:
        X, y = batch
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(X), y)
        loss.backward()
        g = _flat_grad(self.model)
        self.model.zero_grad(set_to_none=True)
        est = fl.fisher_diag(self.model, (X, y), fl.Categorical(), method="hutchinson", samples=self.samples,
                             generator=self.generator)
        d = diag_direction(g, est.value, self.damping)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(self.model.parameters())
                                                - self.lr * d, self.model.parameters())
        self.last = {"loss": loss.item(), "grad": g, "diag": est.value, "direction": d}
        return self.last["loss"]


def critical_lr(model: nn.Module, batch: tuple[Tensor, Tensor], momentum: float = 0.0) -> tuple[float, float]:
    """``(λ_max, η_c)``: the top eigenvalue of the true Fisher of ``batch`` (exact, ``fl.eigenvalues(k=1,
    method="gram")``) and the critical learning rate ``η_c = 2(1 + μ)/λ_max``
    (:func:`fisherlens.critical_learning_rate`) above which gradient descent on the batch's quadratic model
    diverges (for cross-entropy the Fisher is the Gauss–Newton part of the Hessian)."""
    lam = float(fl.eigenvalues(model, batch, fl.Categorical(), k=1, method="gram")[0])
    return lam, fl.critical_learning_rate(lam, momentum)


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """The index batches of ``steps`` steps: seeded permutations of ``range(n)`` epoch after epoch, cut into
    batches of ``batch_size`` (the last, short batch of an epoch is dropped so that every Fisher is of the same
    size).  Every optimiser uses this list."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    per_epoch = max(1, n // batch_size)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
    return out[:steps]


@dataclass(frozen=True)
class OptimiserSpec:
    """One optimiser of part 1: ``key`` (CSV, file names), ``label`` (figures, tables), ``family`` (``"ngd"``,
    ``"diag"``, ``"sgd"``, ``"adam"``), learning rate, damping (NGD, diagonal), adaptive damping, SGD fraction of
    η_c, steps."""

    key: str
    label: str
    family: str
    lr: float
    steps: int
    damping: float | None = None
    adaptive: bool = False
    fraction: float | None = None


def optimiser_specs(cfg: NaturalGradientConfig, eta_c: float) -> list[OptimiserSpec]:
    """The optimisers of part 1, in display order (η_c: the critical SGD rate at initialisation)."""
    specs = [OptimiserSpec(f"ngd_l{lam:g}", f"NGD λ={lam:g}", "ngd", cfg.ngd_lr, cfg.steps, lam)
             for lam in cfg.dampings]
    if cfg.adaptive_damping:
        specs.append(OptimiserSpec("ngd_adaptive", f"NGD adaptive λ (from {cfg.adaptive_start:g})", "ngd",
                                   cfg.ngd_lr, cfg.steps, cfg.adaptive_start, adaptive=True))
    specs.append(OptimiserSpec("diag_hutchinson", f"diag NGD (Hutchinson, λ={cfg.diag_damping:g})", "diag",
                               cfg.diag_lr, cfg.first_order_steps, cfg.diag_damping))
    specs += [OptimiserSpec(f"sgd_c{f:g}", "SGD η=η_c" if f == 1 else f"SGD η={f:g}·η_c", "sgd", f * eta_c,
                            cfg.first_order_steps, fraction=f) for f in cfg.sgd_fractions]
    specs.append(OptimiserSpec("adam", f"Adam lr={cfg.adam_lr:g}", "adam", cfg.adam_lr, cfg.first_order_steps))
    return specs


def _finite(model: nn.Module, X: Tensor) -> bool:
    """Whether the parameters and the outputs on ``X`` are finite."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(model(X)).all())


def train_run(spec: OptimiserSpec, init: nn.Module, data: dict, batches: Sequence[Tensor], eval_every: int, *,
              seed: int = 0, diag_samples: int = 1, sharpness_batch: tuple[Tensor, Tensor] | None = None,
              on_step: Callable[[], None] | None = None):
    """Train a copy of ``init`` with the optimiser ``spec`` on ``batches`` (index tensors into ``data["Xtr"]``).

    Returns ``(rows, model, info)``: one row per evaluation (steps 0, every ``eval_every``, the last) with the
    columns :data:`COLUMNS` (``seconds``: the optimiser's cumulative wall time, steps only; ``lambda_max``: for the
    SGD runs, the top true-Fisher eigenvalue of ``sharpness_batch`` at that step, :func:`critical_lr`, else NaN),
    the trained model, and ``info`` (``diverged``: the step at which the run was stopped or ``None``; ``residuals``,
    ``iterations``, ``dampings``: per step of a natural-gradient run; ``solvers``: the solvers it used).
    """
    model = copy.deepcopy(init)
    Xtr, ytr = data["Xtr"], data["ytr"]
    lik = fl.Categorical()
    if spec.family == "ngd":
        opt = fl.optim.NaturalGradient(model.parameters(), model, lik, lr=spec.lr, damping=spec.damping,
                                       adaptive_damping=spec.adaptive)
    elif spec.family == "diag":
        opt = DiagNaturalGradient(model, spec.lr, spec.damping, diag_samples,
                                  generator=torch.Generator().manual_seed(seed * 7919 + 5))
    elif spec.family == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    elif spec.family == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    else:
        raise ValueError(f"unknown optimiser family {spec.family!r}")
    rows: list[dict] = []
    info: dict = {"diverged": None, "residuals": [], "iterations": [], "dampings": [], "solvers": set()}
    seconds, batch_loss = 0.0, math.nan
    steps = min(spec.steps, len(batches))
    initial_loss = None

    def record(step: int) -> bool:
        nonlocal initial_loss
        tr_loss, tr_acc = evaluate(model, data["Xev"], data["yev"])
        te_loss, te_acc = evaluate(model, data["Xte"], data["yte"])
        initial_loss = tr_loss if initial_loss is None else initial_loss
        d = opt.last.get("direction") if spec.family == "ngd" else None
        rows.append({
            "optimiser": spec.key, "family": spec.family, "step": step, "seconds": seconds, "batch_loss": batch_loss,
            "train_loss": tr_loss, "train_accuracy": tr_acc, "test_loss": te_loss, "test_accuracy": te_acc,
            "lr": spec.lr, "damping": (opt.damping if spec.family in ("ngd", "diag") else math.nan),
            "residual": (d.residual if d is not None else math.nan),
            "iterations": (d.iterations if d is not None else math.nan),
            "lambda_max": (critical_lr(model, sharpness_batch)[0] if spec.family == "sgd" and sharpness_batch
                           is not None and math.isfinite(tr_loss) else math.nan),
        })
        return math.isfinite(tr_loss) and tr_loss <= 10 * initial_loss

    record(0)
    for step in range(1, steps + 1):
        idx = batches[step - 1]
        xb, yb = Xtr[idx], ytr[idx]
        t0 = time.perf_counter()
        try:
            if spec.family == "ngd":
                info["dampings"].append(opt.damping)
                batch_loss = float(opt.step((xb, yb)))
                info["residuals"].append(opt.last["direction"].residual)
                info["iterations"].append(opt.last["direction"].iterations)
                info["solvers"].add(opt.last["direction"].solver)
            elif spec.family == "diag":
                batch_loss = opt.step((xb, yb))
            else:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                batch_loss = loss.item()
        except ValueError:  # the library refuses NaN/inf outputs: a diverged run, unless the model is finite
            if _finite(model, xb):
                raise
            info["diverged"] = step
        seconds += time.perf_counter() - t0
        if on_step is not None:
            on_step()
        if info["diverged"] is None and not (math.isfinite(batch_loss) and _finite(model, xb)):
            info["diverged"] = step
        if info["diverged"] is not None:
            break
        if step % eval_every == 0 or step == steps:
            if not record(step):
                info["diverged"] = step
                break
    return rows, model, info


def _effective_weights(model: nn.Module) -> list[Tensor]:
    """The weight matrices the forward uses (pruned entries zero)."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def prune_sweep(model: nn.Module, data: dict, sparsities: Sequence[float], *, n_saliency: int,
                hutchinson_samples: int, finetune_steps: int, finetune_lr: float, batch_size: int, seed: int,
                on_step: Callable[[], None] | None = None) -> tuple[list[dict], dict]:
    """Prune copies of ``model`` at every sparsity by each criterion of :data:`CRITERIA`; test accuracy before and
    after ``finetune_steps`` SGD steps with the masks applied (the same batches for every criterion and sparsity).

    Returns ``(rows, info)``: rows with the columns :data:`PRUNE_COLUMNS` (``overlap_with_exact``: the fraction of
    the entries pruned by the criterion that the exact-Fisher criterion prunes too), and ``info`` with the
    saliencies' Spearman correlation with the exact Fisher's, the seconds each saliency took, and the test
    ``(loss, accuracy)`` of the unpruned model before (``dense``) and after (``dense_finetuned``) the same fine-tune.
    """
    Xs, ys = data["Xtr"][:n_saliency], data["ytr"][:n_saliency]
    lik = fl.Categorical()
    sal, secs = {}, {}
    t0 = time.perf_counter()
    sal["fisher_exact"] = fl.prune.saliency(model, (Xs, ys), lik, "fisher")
    secs["fisher_exact"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = fl.prune.saliency(model, (Xs, ys), lik, "fisher", method="hutchinson", samples=hutchinson_samples,
                            generator=torch.Generator().manual_seed(seed * 7919 + 11))
    sal["fisher_hutchinson"] = {n: v.value for n, v in est.items()}
    secs["fisher_hutchinson"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sal["magnitude"] = fl.prune.saliency(model, criterion="magnitude")
    secs["magnitude"] = time.perf_counter() - t0
    flat = {k: torch.cat([v.reshape(-1) for v in s.values()]).double() for k, s in sal.items()}
    spearman = {k: _spearman(flat[k], flat["fisher_exact"]) for k in sal}
    batches = batch_schedule(len(data["Xtr"]), batch_size, finetune_steps, seed + 1)

    def finetune(m: nn.Module) -> tuple[float, float]:
        opt = torch.optim.SGD(m.parameters(), lr=finetune_lr)
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(data["Xtr"][idx]), data["ytr"][idx]).backward()
            opt.step()
            if on_step is not None:
                on_step()
        return evaluate(m, data["Xte"], data["yte"])

    dense = evaluate(model, data["Xte"], data["yte"])
    dense_ft = finetune(copy.deepcopy(model))
    rows = []
    for s in sparsities:
        exact_pruned = torch.cat([~m.reshape(-1) for m in fl.prune.masks(sal["fisher_exact"], s).values()])
        for crit in CRITERIA:
            keep = fl.prune.masks(sal[crit], s)
            pruned = torch.cat([~m.reshape(-1) for m in keep.values()])
            m = copy.deepcopy(model)
            fl.prune.apply(m, keep)
            W = _effective_weights(m)
            achieved = sum(int((w == 0).sum()) for w in W) / sum(w.numel() for w in W)
            te_loss, te_acc = evaluate(m, data["Xte"], data["yte"])
            ft_loss, ft_acc = finetune(m)
            n_pruned = int(pruned.sum())
            rows.append({
                "criterion": crit, "sparsity": s, "achieved_sparsity": achieved, "test_accuracy": te_acc,
                "test_loss": te_loss, "finetuned_test_accuracy": ft_acc, "finetuned_test_loss": ft_loss,
                "overlap_with_exact": (float((pruned & exact_pruned).sum()) / n_pruned) if n_pruned else 1.0,
            })
    return rows, {"spearman": spearman, "seconds": secs, "dense": dense, "dense_finetuned": dense_ft}


def _spearman(a: Tensor, b: Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    return float(np.corrcoef(ra.numpy(), rb.numpy())[0, 1])


# ----------------------------------------------------------------------------- the study
class NaturalGradientStudy(Study):
    """Exact NGD vs diagonal NGD, SGD at the critical rate and Adam; Fisher vs magnitude pruning (docstring)."""

    name = "natural-gradient"
    description = ("Exact natural-gradient descent (damping 1..1e-3, adaptive) vs Hutchinson-diagonal NGD, SGD at "
                   "the critical lr 2/λ_max and Adam on MNIST (loss/accuracy vs steps and wall time); Fisher (OBD) "
                   "vs magnitude pruning, with and without fine-tune.")
    Config = NaturalGradientConfig

    def setup(self, cfg: NaturalGradientConfig):
        X, y = datasets.load(cfg.data)  # before the folder is created: a bad --data leaves no trace
        n_train = cfg.n_train if cfg.n_train + cfg.n_test <= len(X) else len(X) - max(1, round(0.2 * len(X)))
        if cfg.batch_size > n_train:
            raise ValueError(f"natural-gradient: batch_size {cfg.batch_size} exceeds the {n_train} training images.")
        return X, y

    def config_json(self, cfg: NaturalGradientConfig, inputs) -> dict:
        d = {"experiment": self.name, **{k: getattr(cfg, k) for k in ("quick", *cfg.options())}}
        for k in ("hidden", "dampings", "sgd_fractions", "sparsities"):
            d[k] = list(d[k])
        d.update(loss="softmax cross-entropy", likelihood="Categorical", fisher="true", prune_scope="global")
        return d

    def compute(self, cfg: NaturalGradientConfig, run: StudyRun) -> dict:
        X, y = run.inputs
        Xtr, ytr, Xte, yte, (Xev, yev), C = split_with_probe(X, y, cfg.n_train, cfg.n_test, cfg.n_eval, cfg.seed)
        data = {"Xtr": Xtr, "ytr": ytr, "Xte": Xte, "yte": yte, "Xev": Xev, "yev": yev}
        init = make_mlp(X.shape[1], cfg.hidden, C, generator=torch.Generator().manual_seed(cfg.seed * 7919 + 3))
        batches = batch_schedule(len(Xtr), cfg.batch_size, max(cfg.steps, cfg.first_order_steps), cfg.seed)
        b0 = (Xtr[batches[0]], ytr[batches[0]])
        lam0, eta_c = critical_lr(init, b0)
        specs = optimiser_specs(cfg, eta_c)
        rows, infos, models = [], {}, {}
        n_prune = (len(cfg.sparsities) * len(CRITERIA) + 1) * cfg.finetune_steps
        with run.bar(sum(s.steps for s in specs) + n_prune, unit="step") as bar:
            for spec in specs:
                bar.set_postfix_str(spec.key)
                r, m, info = train_run(spec, init, data, batches, cfg.eval_every, seed=cfg.seed,
                                       diag_samples=cfg.diag_samples, sharpness_batch=b0,
                                       on_step=lambda: bar.update(1))
                rows += r
                infos[spec.key], models[spec.key] = info, m
                run.write_csv("metrics.csv", rows, COLUMNS)
            run.lap("optimisers")
            bar.set_postfix_str("pruning")
            prows, pinfo = prune_sweep(models["adam"], data, cfg.sparsities, n_saliency=cfg.n_saliency,
                                       hutchinson_samples=cfg.hutchinson_samples, finetune_steps=cfg.finetune_steps,
                                       finetune_lr=cfg.finetune_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                       on_step=lambda: bar.update(1))
            run.write_csv("pruning.csv", prows, PRUNE_COLUMNS)
            run.lap("pruning")
        P = sum(p.numel() for p in init.parameters())
        dense = pinfo["dense"]
        return {"rows": rows, "infos": infos, "specs": specs, "lam0": lam0, "eta_c": eta_c,
                "prune": prows, "pinfo": pinfo, "dense": dense,
                "used": {"arch": arch_name(X.shape[1], cfg.hidden, C), "P": P, "n_train": len(Xtr),
                         "n_test": len(Xte), "n_eval": len(Xev), "C": C,
                         "batch_size": cfg.batch_size, "finetune_steps": cfg.finetune_steps}}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        _fig_curves(run.file("natural_gradient_steps.png"), r, "step", "optimiser step")
        _fig_curves(run.file("natural_gradient_time.png"), r, "seconds", "optimiser wall time (s)", logx=True)
        _fig_damping(run.file("natural_gradient_damping.png"), r)
        _fig_critical(run.file("natural_gradient_critical.png"), r)
        _fig_pruning(run.file("natural_gradient_pruning.png"), r)
        return FIGURES

    def report(self, r: dict, run: StudyRun) -> str:
        return _summary(run.cfg, r, run)


def natural_gradient(out: str | os.PathLike, quick: bool = False, seed: int = 0, *, progress: bool = True,
                     **options) -> Path:
    """Exact vs diagonal natural gradient, SGD at the critical rate and Adam; Fisher vs magnitude pruning.

    Args:
        out: run folder (refused if it holds a run of another configuration).
        quick: tiny settings for tests (784-16-10, 12 NGD / 48 first-order steps, 4 sparsities).
        seed: seeds the data split, the initialisation, the batch order and the Hutchinson draws.
        progress: tqdm bar over all steps.
        **options: the fields of :class:`NaturalGradientConfig`.

    Returns:
        The run folder: ``config.json``, ``metrics.csv``, ``pruning.csv``, the figures ``natural_gradient_*.png``
        and ``summary.md``.
    """
    return run_study(NaturalGradientStudy, out, quick, seed, progress=progress, **options)


# ----------------------------------------------------------------------------- figures
def _by_opt(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["optimiser"], []).append(row)
    return out


def _style(spec: OptimiserSpec, i: int) -> dict:
    ngd = ["tab:blue", "tab:cyan", "tab:purple", "tab:pink", "navy", "slateblue"]
    if spec.family == "ngd":
        return {"color": ngd[i % len(ngd)], "linestyle": "--" if spec.adaptive else "-"}
    sgd = ["tab:orange", "goldenrod", "peru", "chocolate"]
    return {"diag": {"color": "tab:green"}, "adam": {"color": "tab:red"}}.get(spec.family,
                                                                               {"color": sgd[i % len(sgd)]})


def _styles(specs: Sequence[OptimiserSpec]) -> dict[str, dict]:
    counts: dict[str, int] = {}
    out = {}
    for s in specs:
        i = counts.get(s.family, 0)
        counts[s.family] = i + 1
        out[s.key] = _style(s, i)
    return out


def _loss_top(rows: list[dict]) -> float:
    """Upper limit of the loss axes: 12× the initial loss (a diverging run leaves the plot, the others stay legible;
    runs are stopped beyond 10×)."""
    return 12 * rows[0]["train_loss"]


def _fig_curves(path: Path, r: dict, xkey: str, xlabel: str, logx: bool = False) -> None:
    g, styles = _by_opt(r["rows"]), _styles(r["specs"])
    fig = Figure(figsize=(13.5, 4.4))
    axes = fig.subplots(1, 2)
    for spec in r["specs"]:
        rs = g.get(spec.key, [])
        if logx:
            rs = [x for x in rs if x["seconds"] > 0]
        x = [x[xkey] for x in rs]
        lab = spec.label + _status(r["infos"][spec.key], g[spec.key], r["used"]["C"])
        axes[0].plot(x, [x["train_loss"] for x in rs], label=lab, linewidth=1.5, **styles[spec.key])
        axes[1].plot(x, [x["test_accuracy"] for x in rs], linewidth=1.5, **styles[spec.key])
    axes[0].set_yscale("log")
    axes[0].set_ylim(top=_loss_top(r["rows"]))
    axes[0].set_ylabel("training loss (cross-entropy)")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"MNIST {r['used']['arch']}, batch {r['used']['batch_size']}: exact vs diagonal natural "
                 "gradient, SGD at η_c, Adam")
    fig.tight_layout(rect=(0, 0, 0.76, 1))
    fig.legend(loc="center left", bbox_to_anchor=(0.76, 0.5), frameon=False, fontsize=8.5)
    plots.save_png(fig, path, tight=False)


def _fig_damping(path: Path, r: dict) -> None:
    g, styles, infos = _by_opt(r["rows"]), _styles(r["specs"]), r["infos"]
    ngd = [s for s in r["specs"] if s.family == "ngd"]
    fig = Figure(figsize=(17, 4.2))
    axes = fig.subplots(1, 4)
    for s in ngd:
        rs = g[s.key]
        axes[0].plot([x["step"] for x in rs], [x["train_loss"] for x in rs], label=s.label, **styles[s.key])
    axes[0].set_yscale("log")
    axes[0].set_ylim(top=_loss_top(r["rows"]))
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(frameon=False, fontsize=8)
    axes[0].set_title("exact NGD: training loss per λ")
    ad = [s for s in ngd if s.adaptive]
    if ad:
        lam = infos[ad[0].key]["dampings"]
        axes[1].plot(range(1, len(lam) + 1), lam, color=styles[ad[0].key]["color"])
        axes[1].set_yscale("log")
        axes[1].set_title("adaptive damping: λ used at each step")
    else:
        axes[1].set_title("(no adaptive-damping run)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("λ")
    fixed = sorted((s for s in ngd if not s.adaptive), key=lambda s: s.damping)
    lams = [s.damping for s in fixed]
    acc = [g[s.key][-1]["test_accuracy"] for s in fixed]
    axes[2].plot(lams, acc, "-", color="tab:blue")
    bad = [bool(infos[s.key]["diverged"]) or _collapsed(g[s.key], r["used"]["C"]) for s in fixed]
    axes[2].plot([v for v, b in zip(lams, bad, strict=True) if not b], [a for a, b in zip(acc, bad, strict=True)
                 if not b], "o", color="tab:blue", label="fixed λ")
    axes[2].plot([v for v, b in zip(lams, bad, strict=True) if b], [a for a, b in zip(acc, bad, strict=True) if b],
                 "x", color="tab:red", markersize=9, label="fixed λ: diverged / collapsed (last value)")
    if ad:
        axes[2].axhline(g[ad[0].key][-1]["test_accuracy"], color="gray", linestyle="--", label="adaptive λ (final)")
    axes[2].set_ylabel(f"final test accuracy ({max(s.steps for s in ngd)} steps at most)")
    axes[2].legend(frameon=False, fontsize=8)
    axes[2].set_title("final test accuracy vs λ")
    its = [float(np.mean(infos[s.key]["iterations"])) if infos[s.key]["iterations"] else math.nan for s in fixed]
    ms = [1000 * g[s.key][-1]["seconds"] / max(g[s.key][-1]["step"], 1) for s in fixed]
    solver = ", ".join(sorted(set().union(*(infos[s.key]["solvers"] for s in fixed)))) or "—"
    axes[3].plot(lams, its, "o-", color="tab:purple", label=f"solver iterations ({solver})")
    axes[3].plot(lams, ms, "s--", color="tab:gray", label="ms per step")
    axes[3].set_yscale("log")
    axes[3].legend(frameon=False, fontsize=8)
    axes[3].set_title("cost of the solve vs λ (mean per step)")
    for ax in axes[2:]:
        ax.set_xscale("log")
        ax.set_xlabel("damping λ")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    plots.save_png(fig, path)


def _fig_critical(path: Path, r: dict) -> None:
    g, styles = _by_opt(r["rows"]), _styles(r["specs"])
    fig = Figure(figsize=(11.5, 4.2))
    axes = fig.subplots(1, 2)
    for spec in (s for s in r["specs"] if s.family == "sgd"):
        rs = [x for x in g[spec.key] if math.isfinite(x["lambda_max"])]
        st = [x["step"] for x in rs]
        axes[0].plot(st, [x["lambda_max"] for x in rs], label=spec.label, **styles[spec.key])
        axes[1].plot(st, [spec.lr * x["lambda_max"] for x in rs], label=f"{spec.label} (η = {spec.lr:.3g})",
                     **styles[spec.key])
    axes[0].axhline(r["lam0"], color="gray", linestyle=":", label=f"at initialisation ({r['lam0']:.3g})")
    axes[0].set_ylabel("λ_max of the first batch's Fisher")
    axes[1].axhline(2.0, color="black", linestyle="--", label="2 (edge of stability)")
    axes[1].set_ylabel("η · λ_max")
    for ax in axes:
        ax.set_xlabel("SGD step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(f"SGD at the critical rate predicted at initialisation, η_c = 2/λ_max = {r['eta_c']:.3g}, "
                 "and below it")
    plots.save_png(fig, path)


def _fig_pruning(path: Path, r: dict) -> None:
    fig = Figure(figsize=(11.5, 4.4))
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"fisher_exact": "tab:blue", "fisher_hutchinson": "tab:cyan", "magnitude": "tab:orange"}
    for crit, lab in CRITERIA.items():
        rs = [x for x in r["prune"] if x["criterion"] == crit]
        s = [x["sparsity"] for x in rs]
        axes[0].plot(s, [x["test_accuracy"] for x in rs], "o-", label=lab, color=colors[crit], markersize=3)
        axes[1].plot(s, [x["finetuned_test_accuracy"] for x in rs], "o-", label=lab, color=colors[crit],
                     markersize=3)
    axes[0].set_title("right after pruning")
    axes[1].set_title(f"after the fine-tune ({r['used']['finetune_steps']} SGD steps)")
    axes[0].axhline(r["dense"][1], color="gray", linestyle=":", label="dense")
    axes[1].axhline(r["pinfo"]["dense_finetuned"][1], color="gray", linestyle=":", label="dense, same fine-tune")
    for ax in axes:
        ax.set_xlabel("sparsity (fraction of weights pruned, global)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(frameon=False, fontsize=8, loc="lower left")
    fig.suptitle(f"Pruning the Adam-trained {r['used']['arch']}: Fisher (OBD) vs magnitude")
    plots.save_png(fig, path)


# ----------------------------------------------------------------------------- summary
def _collapsed(rows: list[dict], C: int) -> bool:
    """A run that did not diverge but ended at chance level (final test accuracy below 2/C: e.g. all ReLUs dead)."""
    return rows[-1]["test_accuracy"] < 2.0 / C


def _status(info: dict, rows: list[dict], C: int) -> str:
    """`` (diverged at step k)``, `` (collapsed to chance)`` or ``""``."""
    if info["diverged"]:
        return f" (diverged at step {info['diverged']})"
    return " (collapsed to chance)" if _collapsed(rows, C) else ""


def _first(rows: list[dict], target: float) -> tuple[int | None, float | None]:
    for x in rows:
        if x["test_accuracy"] >= target:
            return x["step"], x["seconds"]
    return None, None


def _fmt(v, spec: str = ".3g", none: str = "—") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _max_sparsity(rows: list[dict], key: str, ref: float, tol: float = 0.01) -> float | None:
    """Largest sparsity whose accuracy (``key``) is within ``tol`` of ``ref`` with every smaller sparsity too."""
    best = None
    for x in sorted(rows, key=lambda x: x["sparsity"]):
        if x[key] < ref - tol:
            break
        best = x["sparsity"]
    return best


def _summary(cfg: NaturalGradientConfig, r: dict, run: StudyRun) -> str:
    g = _by_opt(r["rows"])
    specs, infos, used = r["specs"], r["infos"], r["used"]
    t = cfg.target_accuracy
    L = [
        "# natural-gradient: exact natural-gradient descent vs its stand-ins, and Fisher pruning",
        "",
        f"Data: {cfg.data} ({used['n_train']} train, {used['n_test']} test; training loss on a fixed subset of "
        f"{used['n_eval']} training images). Network {used['arch']} ReLU (P = {used['P']:,}), softmax cross-entropy, "
        f"batch {cfg.batch_size}, the same initialisation and batch sequence for every optimiser"
        f"{' — quick mode' if cfg.quick else ''}. Exact NGD: `fl.optim.NaturalGradient` (true Fisher of the batch, "
        f"η = {cfg.ngd_lr:g}), {cfg.steps} steps; diagonal NGD (Hutchinson, {cfg.diag_samples} draw(s) per step, "
        f"η = {cfg.diag_lr:g}), SGD and Adam {cfg.first_order_steps} steps. Wall times are each optimiser's own "
        f"steps ({cfg.threads} torch threads), evaluations excluded.",
        "",
        "## The critical learning rate at initialisation",
        "",
        f"λ_max of the true Fisher of the first batch at initialisation: {r['lam0']:.4g}, so "
        f"η_c = 2/λ_max = {r['eta_c']:.4g} (`fl.critical_learning_rate`).",
    ]
    L += ["", "Along each SGD run, λ_max of the same batch at every evaluation (η·λ_max > 2: beyond the edge of the "
          "batch's quadratic model):", ""]
    for spec in specs:
        if spec.family != "sgd":
            continue
        info, rs = infos[spec.key], g[spec.key]
        lam = [(x["step"], x["lambda_max"]) for x in rs if math.isfinite(x["lambda_max"])]
        peak = max(lam, key=lambda v: v[1])
        over = [st for st, v in lam if spec.lr * v > 2]
        status = _status(info, rs, used["C"]).strip(" ()") or "no divergence"
        L.append(f"- {spec.label} (η = {spec.lr:.4g}): {status}; final test accuracy {rs[-1]['test_accuracy']:.4f} "
                 f"after {rs[-1]['step']} steps. λ_max peaked at {peak[1]:.4g} (step {peak[0]}; η·λ_max = "
                 f"{spec.lr * peak[1]:.3g}) and ended at {lam[-1][1]:.4g}; η·λ_max > 2 at {len(over)} of {len(lam)} "
                 f"evaluations{f' (first at step {over[0]})' if over else ''}.")
    L += [
        "",
        "## Optimisers",
        "",
        f"Final = last recorded step (or the last before divergence). 'to {t:g}': the first evaluation with test "
        f"accuracy ≥ {t:g} (every {cfg.eval_every} steps).",
        "",
        "| optimiser | lr | steps | final train loss | final test acc | best test acc | wall s | ms/step | "
        f"steps to {t:g} | s to {t:g} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary_rows = {}
    for spec in specs:
        rs, info = g[spec.key], infos[spec.key]
        last = rs[-1]
        n_steps = info["diverged"] or last["step"]
        ms = 1000 * last["seconds"] / max(last["step"], 1)
        s_t, sec_t = _first(rs, t)
        best = max(x["test_accuracy"] for x in rs)
        summary_rows[spec.key] = {"last": last, "ms": ms, "steps_t": s_t, "sec_t": sec_t, "best": best}
        div = _status(info, rs, used["C"])
        L.append(f"| {spec.label}{div} | {spec.lr:.4g} | {n_steps} | {last['train_loss']:.4f} | "
                 f"{last['test_accuracy']:.4f} | {best:.4f} | {last['seconds']:.2f} | {ms:.1f} | {_fmt(s_t, 'd')} | "
                 f"{_fmt(sec_t, '.2f')} |")
    L += ["", _verdict_optimisers(specs, summary_rows, infos, t, g), "", "## Damping", ""]
    ngd = [s for s in specs if s.family == "ngd"]
    L += ["| run | λ (start → end) | final train loss | final test acc | solver | iterations per step (mean) | "
          "ms/step | median solve residual | max solve residual |", "|---|---|---|---|---|---|---|---|---|"]
    for s in ngd:
        info, last = infos[s.key], g[s.key][-1]
        ms = 1000 * last["seconds"] / max(last["step"], 1)
        lam = info["dampings"]
        lam_txt = f"{lam[0]:.3g} → {lam[-1]:.3g} (range {min(lam):.3g}–{max(lam):.3g})" if s.adaptive and lam else \
            f"{s.damping:g}"
        res = np.asarray(info["residuals"], dtype=float)
        its = np.asarray(info["iterations"], dtype=float)
        L.append(f"| {s.label}{_status(info, g[s.key], used['C'])} | {lam_txt} | {last['train_loss']:.4f} | "
                 f"{last['test_accuracy']:.4f} | {', '.join(sorted(info['solvers'])) or '—'} | "
                 f"{_fmt(float(its.mean()) if its.size else None, '.1f')} | {ms:.1f} | "
                 f"{_fmt(float(np.median(res)) if res.size else None, '.2g')} | "
                 f"{_fmt(float(res.max()) if res.size else None, '.2g')} |")
    L += ["", _verdict_damping(ngd, infos, g), ""]
    # pruning
    pr, dense = r["prune"], r["dense"]
    L += ["## Pruning", "",
          f"The Adam model (dense test accuracy {dense[1]:.4f}), weight matrices only, one global ranking; Fisher "
          f"saliency ½ F_ii θ_i² with the exact true-Fisher diagonal and the Hutchinson one ({cfg.hutchinson_samples} "
          f"draws) on {min(cfg.n_saliency, used['n_train'])} training images; fine-tune: {cfg.finetune_steps} SGD "
          f"steps, lr {cfg.finetune_lr:g}, batch {cfg.batch_size}, masks applied. Test accuracy (after the fine-tune "
          "in parentheses):", "",
          "| sparsity | " + " | ".join(CRITERIA.values()) + " |", "|---|" + "---|" * len(CRITERIA)]
    for s in cfg.sparsities:
        cells = []
        for crit in CRITERIA:
            x = next(x for x in pr if x["criterion"] == crit and x["sparsity"] == s)
            cells.append(f"{x['test_accuracy']:.4f} ({x['finetuned_test_accuracy']:.4f})")
        L.append(f"| {s:g} | " + " | ".join(cells) + " |")
    dense_ft = r["pinfo"]["dense_finetuned"]
    L += ["", f"Largest sparsity with test accuracy within 1 point of the dense model at it and every smaller "
          f"sparsity (without fine-tune: against the dense {dense[1]:.4f}; with it: against the dense model after the "
          f"same fine-tune, {dense_ft[1]:.4f}):", ""]
    ms = {}
    for crit, lab in CRITERIA.items():
        rs = [x for x in pr if x["criterion"] == crit]
        ms[crit] = (_max_sparsity(rs, "test_accuracy", dense[1]), _max_sparsity(rs, "finetuned_test_accuracy",
                                                                                dense_ft[1]))
        L.append(f"- {lab}: {_fmt(ms[crit][0], 'g')} without fine-tune, {_fmt(ms[crit][1], 'g')} with it.")
    sp, secs = r["pinfo"]["spearman"], r["pinfo"]["seconds"]
    ov = [x["overlap_with_exact"] for x in pr if x["criterion"] == "fisher_hutchinson" and x["sparsity"] > 0]
    L += ["", f"Hutchinson vs exact saliency: Spearman rank correlation {sp['fisher_hutchinson']:.4f}; of the "
          f"entries the Hutchinson criterion prunes, {_fmt(min(ov) if ov else None, '.3f')}–"
          f"{_fmt(max(ov) if ov else None, '.3f')} (over the sparsities > 0) are pruned by the exact one too. "
          f"Magnitude vs exact Fisher: Spearman {sp['magnitude']:.4f}. Saliency times: exact "
          f"{secs['fisher_exact']:.2f} s, Hutchinson {secs['fisher_hutchinson']:.2f} s, magnitude "
          f"{secs['magnitude']:.3f} s.",
          f"Achieved sparsity equals the target to {max(abs(x['achieved_sparsity'] - x['sparsity']) for x in pr):.1e} "
          "(fraction of zero weights in the pruned model, incl. any weight that was already zero).",
          "", _verdict_pruning(pr, cfg.sparsities), ""]
    L += figures_section(run.figures)
    laps = run.laps
    L += ["## Run", "", f"{run.elapsed():.1f} s wall time: optimisers {laps.get('optimisers', math.nan):.1f} s, "
          f"pruning {laps.get('pruning', math.nan):.1f} s; {cfg.threads} torch threads.", ""]
    return "\n".join(L)


def _verdict_optimisers(specs, srows, infos, t, g) -> str:
    ok = [s for s in specs if not infos[s.key]["diverged"]]
    if not ok:
        return "Every optimiser diverged."
    best = max(ok, key=lambda s: srows[s.key]["last"]["test_accuracy"])
    ngd_ok = [s for s in ok if s.family == "ngd"]
    parts = [f"Highest final test accuracy: {best.label} ({srows[best.key]['last']['test_accuracy']:.4f})."]
    reach = [s for s in ok if srows[s.key]["steps_t"] is not None]
    if reach:
        by_steps = min(reach, key=lambda s: (srows[s.key]["steps_t"], srows[s.key]["sec_t"]))
        by_time = min(reach, key=lambda s: srows[s.key]["sec_t"])
        parts.append(f"First to test accuracy {t:g} in steps: {by_steps.label} ({srows[by_steps.key]['steps_t']} "
                     f"steps); in wall time: {by_time.label} ({srows[by_time.key]['sec_t']:.2f} s).")
    else:
        parts.append(f"No optimiser reached test accuracy {t:g}.")
    if ngd_ok:
        n = min(s.steps for s in ngd_ok)
        at = {s.key: _at_step(g[s.key], n) for s in ok}
        fo = [s for s in ok if s.family != "ngd" and at[s.key] is not None]
        if fo:
            bn = max(ngd_ok, key=lambda s: at[s.key]["test_accuracy"])
            bf = max(fo, key=lambda s: at[s.key]["test_accuracy"])
            parts.append(f"Test accuracy at equal steps ({n}): best exact-NGD run ({bn.label}) "
                         f"{at[bn.key]['test_accuracy']:.4f}, best first-order run ({bf.label}) "
                         f"{at[bf.key]['test_accuracy']:.4f}.")
        ng_ms = np.mean([srows[s.key]["ms"] for s in ngd_ok])
        fo_ms = [srows[s.key]["ms"] for s in ok if s.family in ("sgd", "adam")]
        if fo_ms:
            parts.append(f"An exact NGD step costs {ng_ms:.0f} ms, {ng_ms / np.mean(fo_ms):.0f}× an SGD/Adam step "
                         f"({np.mean(fo_ms):.2f} ms).")
    return " ".join(parts)


def _at_step(rows: list[dict], step: int) -> dict | None:
    for x in rows:
        if x["step"] == step:
            return x
    return None


def _verdict_damping(ngd, infos, g) -> str:
    fixed = [s for s in ngd if not s.adaptive]
    if not fixed:
        return ""
    ok = [s for s in fixed if not infos[s.key]["diverged"]]
    parts = []
    div = [s for s in fixed if infos[s.key]["diverged"]]
    if div:
        parts.append("Diverged: " + ", ".join(f"λ={s.damping:g} (step {infos[s.key]['diverged']})" for s in div)
                     + ".")
    if ok:
        best = max(ok, key=lambda s: g[s.key][-1]["test_accuracy"])
        low = min(ok, key=lambda s: g[s.key][-1]["train_loss"])
        parts.append(f"Best final test accuracy at fixed λ: λ={best.damping:g} "
                     f"({g[best.key][-1]['test_accuracy']:.4f}); lowest final training loss: "
                     f"λ={low.damping:g} ({g[low.key][-1]['train_loss']:.4f}).")
    ad = [s for s in ngd if s.adaptive]
    if ad and not infos[ad[0].key]["diverged"]:
        s = ad[0]
        lam = infos[s.key]["dampings"]
        parts.append(f"The adaptive run ended at λ = {lam[-1]:.3g} with test accuracy "
                     f"{g[s.key][-1]['test_accuracy']:.4f}.")
    return " ".join(parts)


def _verdict_pruning(pr: list[dict], sparsities) -> str:
    hi = [s for s in sparsities if s >= 0.5]
    if not hi:
        return ""
    parts = []
    for key, what in (("test_accuracy", "without fine-tune"), ("finetuned_test_accuracy", "after fine-tune")):
        wins = {c: 0 for c in CRITERIA}
        for s in hi:
            acc = {c: next(x[key] for x in pr if x["criterion"] == c and x["sparsity"] == s) for c in CRITERIA}
            for c in CRITERIA:
                wins[c] += acc[c] == max(acc.values())
        s_max = max(hi)
        acc = {c: next(x[key] for x in pr if x["criterion"] == c and x["sparsity"] == s_max) for c in CRITERIA}
        parts.append(f"{what}, the highest accuracy at the {len(hi)} sparsities ≥ 0.5 (ties count for each): "
                     + ", ".join(f"{CRITERIA[c]} {n}×" for c, n in wins.items())
                     + f"; at {s_max:g}: " + ", ".join(f"{CRITERIA[c]} {a:.4f}" for c, a in acc.items()))
    return ("Which saliency prunes best — " + "; ".join(parts) + ".")
