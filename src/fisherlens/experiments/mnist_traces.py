r"""Sauter 2023 §5.1.1 and appendix B: Fisher trace vs NTK trace through training on MNIST.

For every loss ℓ of Sauter 2023 eqs 5.1.5–5.1.7 — the L_p-norm loss ``(Σ_c |f_c − y_c|^p)^{1/p}`` (p = 2, 4, 6),
the mean power loss ``(1/C) Σ_c (f_c − y_c)^n`` (n = 2, 4, 6) and the softmax cross-entropy — and every width
w of a ``784 → w → w → 10`` ReLU network (w = 128 and 784), we train with Adam from several random
initialisations and record on a fixed probe set of N training inputs

* the Fisher trace of the *loss-induced empirical Fisher* of Sauter 2023 §3.2.5 / eq 5.1.3
  (``fl.LossInduced(ℓ)``, ``kind="empirical"``):  ``tr F = (1/N) Σ_n ‖∇_θ ℓ(f_θ(x_n), y_n)‖²``;
* the NTK trace per input, ``(1/N) tr Θ = (1/N) Σ_n Σ_a ‖∇_θ f_a(x_n)‖²`` (docs/conventions.md#neural-tangent-kernel:
  summed over parameters and
  outputs, averaged over the N inputs — the same 1/N as the Fisher, so the two are directly comparable);
* the probe loss and accuracy (argmax of the 10 outputs) and the test accuracy;
* the right-hand side of eq 5.1.2, ``(1/N) Σ_n r_nᵀ Θ_nn r_n`` (column ``ntk_side``), as a check of the identity.

All probe quantities come from :class:`fisherlens.Monitor` (``observables=("loss", "accuracy", "relation",
"ntk_trace")``, ``kind="empirical"``, exact), i.e. one pass of :func:`fisherlens.fisher_ntk_trace` per checkpoint.

By eq 5.1.2, ``tr F = (1/N) Σ_n r_nᵀ Θ_nn r_n`` with ``r_n = ∂ℓ/∂f(x_n)``: the Fisher trace factors into the loss
derivative and the diagonal NTK blocks.  The thesis asks when the NTK alone explains the Fisher trace, i.e. when
``tr F(t) ≈ c · tr Θ(t)/N`` with one constant c over training.  The summary quantifies this per loss and width:
the Pearson correlation of tr F and tr Θ over the recorded checkpoints, the least-squares ratio through the origin
``c = Σ_t F_t Θ_t / Σ_t Θ_t²``, and the relative residual ``‖F − cΘ‖ / ‖F‖`` of that fit (0 = exactly proportional),
each as mean ± standard deviation over seeds (sample std, ddof = 1).  The L_p-norm losses have
``∂ℓ/∂f`` homogeneous of degree 0 in the residual (for p = 2, ``r_n`` is a unit vector), so ``r_n`` does not
shrink as the fit improves; for the mean power and cross-entropy losses it does.

Setting and the choices where the thesis is silent (stated again in ``summary.md``):

* Network: two hidden ReLU layers of width w, 10 linear outputs (logits for the cross-entropy, raw outputs for
  the other losses, compared with one-hot targets), PyTorch's default ``nn.Linear`` initialisation
  ``U(−1/√fan_in, 1/√fan_in)`` for weights and biases, drawn from a seeded ``torch.Generator``.
* Optimiser: Adam (lr 1e-3, the default betas; the thesis gives no learning rate), mini-batches of 64 (not given in
  the thesis), training loss the mean of ℓ over the batch (Sauter 2023, eq 2.3.2), inputs scaled to [0, 1].
* Seeds: ``seeds`` replicates; replicate r uses the same initialisation for every loss of a width (paired
  comparison) and its own batch order; the data split and probe set are fixed by ``seed``.
* The thesis trained 300 epochs on MNIST (60 000 images).  The default run is scaled down to finish in about
  15 minutes on 2 cores: the 5000 real MNIST digits shipped with fisherlens (4000 train, 1000 test), 20 epochs,
  a probe of 256 training inputs, 2 measurements per epoch.  ``--data DIR --set epochs=300 --set n_train=None``
  gives the thesis's full setting (all 60 000 training images of the IDX files, the 10 000 test images).

Reliability: each (loss, width, seed) training run is a unit of work (:class:`fisherlens.runs.Units`),
checkpointed atomically after every epoch (model, Adam state, batch-order generator, monitor state, rows so far).
A run killed at any moment and started again with the same command resumes from there and ends with exactly the
metrics of an unbroken run (fixed intra-op thread count ``threads``, every random draw from seeded generators, no
global RNG); ``metrics.csv`` only ever holds the rows of finished units.  A folder of another configuration is
refused (:class:`fisherlens.runs.RunDir`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fisherlens as fl

from .. import datasets, plots
from ..runs import Units
from ._common import (
    as_tuple,
    check_bool,
    check_int,
    check_number,
    evaluate,
    make_mlp,
    split_with_probe,
    train_epoch,
)
from .study import Study, StudyConfig, StudyRun, run_study

Tensor = torch.Tensor

__all__ = ["LOSSES", "COLUMNS", "CKPT_KEYS", "Setup", "load_data", "train_unit", "trace_fit", "mnist_traces",
           "MnistTraces", "MnistTracesConfig"]


@dataclass(frozen=True)
class LossCase:
    """One loss of the study: label for figures, the loss family, its order, and the per-sample loss."""

    label: str
    family: str  # "lp_norm", "mean_power" or "cross_entropy"
    order: int | None
    make: Callable[[], Callable[[Tensor, Tensor], Tensor]]


#: the seven losses of Sauter 2023 §5.1.1 (eqs 5.1.5–5.1.7), in display order.
LOSSES: dict[str, LossCase] = {
    **{f"l{p}_norm": LossCase(f"L{p}-norm", "lp_norm", p, lambda p=p: fl.losses.lp_norm(p)) for p in (2, 4, 6)},
    **{
        f"mean_power{n}": LossCase(f"mean power n={n}", "mean_power", n, lambda n=n: fl.losses.mean_power(n))
        for n in (2, 4, 6)
    },
    "cross_entropy": LossCase("cross-entropy", "cross_entropy", None, fl.losses.softmax_cross_entropy),
}

#: columns of metrics.csv (one row per (loss, width, seed, checkpoint)).
COLUMNS = (
    "loss_fn", "width", "seed", "step", "epoch", "probe_loss", "probe_accuracy", "fisher_trace", "ntk_trace",
    "trace_ratio", "ntk_side", "test_accuracy",
)

#: the Monitor observables recorded at every checkpoint: probe loss and accuracy, and — in one pass over the
#: probe (:func:`fisherlens.fisher_ntk_trace`) — tr F, (1/N) tr Θ, their ratio and the right-hand side of eq 5.1.2.
OBSERVABLES = ("loss", "accuracy", "relation", "ntk_trace")

CKPT_VERSION = 1
#: the keys of a unit checkpoint (written by :func:`train_unit` through ``save``).
CKPT_KEYS = ("version", "unit", "epoch", "model", "optimizer", "generator", "monitor", "rows")


# ----------------------------------------------------------------------------- model and data
@dataclass
class Setup:
    """Data and training settings shared by all units of one run."""

    Xtr: Tensor
    ytr: Tensor
    Xte: Tensor
    yte: Tensor
    probe: tuple[Tensor, Tensor]
    n_classes: int
    epochs: int
    batch_size: int
    lr: float
    measure_per_epoch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.Xtr) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def record_steps(self) -> list[int]:
        """Steps after which the observables are recorded: 0 and ``measure_per_epoch`` evenly spaced steps per
        epoch, the last at the epoch's end."""
        spe, k = self.steps_per_epoch, self.measure_per_epoch
        return sorted({0} | {e * spe + round(j * spe / k) for e in range(self.epochs) for j in range(1, k + 1)})


def _subset(X: Tensor, y: Tensor, n: int | None, gen_seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= len(X):
        return X, y
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(gen_seed))[:n]
    return X[idx], y[idx]


def load_data(data, n_train: int | None, n_test: int | None, seed: int) -> tuple[str, Tensor, Tensor, Tensor, Tensor]:
    """Train and test sets for the study.

    ``data`` is ``None``/``"mnist-subset"`` (the 5000 real MNIST digits shipped with fisherlens), ``"digits"``
    (8×8 digits), or a folder of MNIST IDX files: its train split gives the training set and its ``t10k`` split, if
    present, the test set.  A set smaller than ``n_train + n_test`` (embedded sets) is split 80/20.  ``None`` sizes
    take everything available.  All shuffles are seeded with ``seed``.

    Returns:
        ``(description, Xtr, ytr, Xte, yte)``.
    """
    key = "mnist-subset" if data is None else str(data)
    if key not in datasets.NAMES and Path(key).is_dir():
        Xa, ya = datasets.mnist_idx(key, "train")
        try:
            Xb, yb = datasets.mnist_idx(key, "test")
        except FileNotFoundError:
            n_te = n_test if n_test is not None else round(0.2 * len(Xa))
            Xa, ya, Xb, yb = datasets.train_test_split(Xa, ya, len(Xa) - n_te, n_te, seed=seed)
        Xtr, ytr = _subset(Xa, ya, n_train, seed)
        Xte, yte = _subset(Xb, yb, n_test, seed + 1)
        desc = f"MNIST IDX files in {key} ({len(Xtr)} train, {len(Xte)} test)"
    else:
        X, y = datasets.load(key)
        N = len(X)
        n_te = n_test if n_test is not None else round(0.2 * N)
        n_tr = n_train if n_train is not None else N - n_te
        Xtr, ytr, Xte, yte = split_with_probe(X, y, n_tr, n_te, 0, seed)[:4]  # 80/20 if the set is too small
        desc = f"{key} ({len(Xtr)} train, {len(Xte)} test of {N})"
    if len(Xtr) < 1 or len(Xte) < 1:
        raise ValueError(f"mnist-traces: need at least one training and one test sample, got {len(Xtr)}/{len(Xte)}.")
    return desc, Xtr, ytr, Xte, yte


def _gen(seed: int, rep: int, stream: int) -> torch.Generator:
    """Generator of one random stream (1: initialisation, 2: batch order) of replicate ``rep`` of run ``seed``."""
    return torch.Generator().manual_seed((seed * 100_003 + rep) * 8 + stream)


# ----------------------------------------------------------------------------- one unit of work
class _Unit:
    """The training objects of one (loss, width, replicate) run and its recorded rows."""

    def __init__(self, setup: Setup, loss_key: str, width: int, rep: int):
        self.setup = setup
        self.loss_fn = LOSSES[loss_key].make()
        self.model = make_mlp(setup.Xtr.shape[1], (width, width), setup.n_classes, generator=_gen(setup.seed, rep, 1))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=setup.lr)
        self.gen = _gen(setup.seed, rep, 2)
        self.mon = fl.Monitor(self.model, fl.LossInduced(self.loss_fn), setup.probe, observables=OBSERVABLES,
                              kind="empirical", method="exact")
        self.unit = {"loss_fn": loss_key, "width": width, "seed": rep}
        self.rows: list[dict] = []
        self.step = 0

    def record(self, step: int) -> None:
        """Measure the observables (and the test accuracy) after ``step``; append a row."""
        setup, model = self.setup, self.model
        spe = setup.steps_per_epoch
        model.eval()
        test_acc = evaluate(model, setup.Xte, setup.yte)[1]
        rec = self.mon.record(step, epoch=step / spe, test_accuracy=test_acc)
        model.train()
        f, t = float(rec["fisher_trace"]), float(rec["ntk_trace"])
        if not (math.isfinite(f) and math.isfinite(t)):
            raise FloatingPointError(f"mnist-traces: non-finite traces for {self.unit} at step {step}; lower lr.")
        self.rows.append({
            **self.unit, "step": step, "epoch": step / spe, "probe_loss": float(rec["loss"]),
            "probe_accuracy": float(rec["accuracy"]), "fisher_trace": f, "ntk_trace": t,
            "trace_ratio": float(rec["relation_ratio"]), "ntk_side": float(rec["ntk_side"]), "test_accuracy": test_acc,
        })

    def checkpoint(self, epoch: int) -> dict:
        """The state after ``epoch`` epochs (loadable with ``weights_only=True``)."""
        return {"version": CKPT_VERSION, "unit": self.unit, "epoch": epoch, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "generator": self.gen.get_state(),
                "monitor": self.mon.state_dict(), "rows": self.rows}

    def train(self, start: int, save, on_step) -> None:
        """Epochs ``start…`` with a record at every scheduled step and a checkpoint after every epoch."""
        setup = self.setup
        checks = set(setup.record_steps())
        self.step = start * setup.steps_per_epoch

        def after_step(_loss, _outputs, _idx) -> None:
            self.step += 1
            if self.step in checks:
                self.record(self.step)
            if on_step is not None:
                on_step()

        self.model.train()
        for epoch in range(start, setup.epochs):
            train_epoch(self.model, self.opt, setup.Xtr, setup.ytr, lambda f, y: self.loss_fn(f, y).mean(),
                        batch_size=setup.batch_size, generator=self.gen, after_step=after_step)
            if save is not None:
                save(self.checkpoint(epoch + 1))
        self.model.eval()


def train_unit(
    setup: Setup,
    loss_key: str,
    width: int,
    rep: int,
    *,
    state: Mapping | None = None,
    save: Callable[[Mapping], object] | None = None,
    on_step: Callable[[], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[list[dict], nn.Module]:
    """Train one network (loss, width, replicate) and record the traces; resumable from a checkpoint.

    Args:
        setup: data and settings.
        loss_key: a key of :data:`LOSSES`.
        width: hidden width.
        rep: replicate index (chooses the initialisation and the batch order).
        state: a checkpoint written through ``save`` by an earlier, interrupted call: training resumes after the
            epoch it holds.
        save: called with the checkpoint (a dict loadable with ``weights_only=True``) after every epoch.
        on_step: called after every optimiser step (progress bars).
        checkpoint: the file ``state`` was read from, named in the error for a checkpoint that does not fit.

    Returns:
        ``(rows, model)``: one row per recorded step (columns :data:`COLUMNS`) and the trained model.

    Raises:
        ValueError: ``state`` is not a checkpoint of this unit (another unit or version, missing keys, or contents
            that do not restore).
    """
    u = _Unit(setup, loss_key, width, rep)
    start = 0
    if state is not None:
        u.rows, start = _restore(state, u.unit, setup.epochs, u.model, u.opt, u.gen, u.mon,
                                 "checkpoint" if checkpoint is None else f"checkpoint {checkpoint}")
    else:
        u.record(0)
    u.train(start, save, on_step)
    return u.rows, u.model


def _restore(state: Mapping, unit: dict, epochs: int, model, opt, gen, mon, what: str) -> tuple[list[dict], int]:
    """Load a unit checkpoint into the training objects; returns ``(rows, epoch)`` (``ValueError`` if it does not
    belong to ``unit`` or does not restore; ``what`` names it in the message)."""
    redo = "delete it to restart that unit."
    if state.get("version") != CKPT_VERSION or state.get("unit") != unit:
        raise ValueError(f"mnist-traces: {what} is for {state.get('unit')} (version {state.get('version')}) and does "
                         f"not belong to unit {unit}; {redo}")
    missing = [k for k in CKPT_KEYS if k not in state]
    if missing:
        raise ValueError(f"mnist-traces: {what} lacks the key(s) {', '.join(map(repr, missing))}; {redo}")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        mon.load_state_dict(state["monitor"])
        rows, start = [dict(r) for r in state["rows"]], int(state["epoch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"mnist-traces: {what} of unit {unit} does not restore ({type(e).__name__}: {e}); "
                         f"{redo}") from e
    if not 0 <= start <= epochs:
        raise ValueError(f"mnist-traces: {what} is at epoch {start}, outside 0..{epochs}; {redo}")
    return rows, start


# ----------------------------------------------------------------------------- statistics
def trace_fit(fisher: Sequence[float], ntk: Sequence[float]) -> dict[str, float]:
    """How well one constant explains the Fisher trace by the NTK trace over a training run.

    With ``F_t`` the Fisher traces and ``Θ_t`` the NTK traces at the recorded steps:

    * ``pearson``: the Pearson correlation of ``F`` and ``Θ`` (NaN if either is constant);
    * ``ratio``: the least-squares slope through the origin ``c = Σ F_t Θ_t / Σ Θ_t²``;
    * ``residual``: the relative residual ``‖F − cΘ‖ / ‖F‖`` (0 when F is exactly proportional to Θ);
    * ``ratio_span``: ``max_t(F_t/Θ_t) / min_t(F_t/Θ_t)`` (1 when exactly proportional).
    """
    F = np.asarray(fisher, dtype=float)
    T = np.asarray(ntk, dtype=float)
    if F.shape != T.shape or F.ndim != 1 or len(F) < 2:
        raise ValueError(f"trace_fit needs two 1-D series of equal length >= 2, got {F.shape} and {T.shape}.")
    fc, tc = F - F.mean(), T - T.mean()
    den = math.sqrt(float(fc @ fc) * float(tc @ tc))
    c = float(F @ T) / float(T @ T)
    r = F / T
    return {
        "pearson": float(fc @ tc) / den if den > 0 else math.nan,
        "ratio": c,
        "residual": float(np.linalg.norm(F - c * T) / np.linalg.norm(F)),
        "ratio_span": float(r.max() / r.min()) if r.min() > 0 else math.inf,
    }


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _group(rows: list[dict]) -> dict[tuple[str, int], dict[int, list[dict]]]:
    """``{(loss, width): {seed: rows in step order}}``."""
    out: dict[tuple[str, int], dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault((r["loss_fn"], int(r["width"])), {}).setdefault(int(r["seed"]), []).append(r)
    return out


def _curves(runs: dict[int, list[dict]], col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over seeds of column ``col``."""
    seeds = sorted(runs)
    x = np.array([float(r["epoch"]) for r in runs[seeds[0]]])
    Y = np.array([[float(r[col]) for r in runs[s]] for s in seeds])
    return x, Y.mean(0), (Y.std(0, ddof=1) if len(seeds) > 1 else np.zeros(len(x)))


# ----------------------------------------------------------------------------- the experiment
@dataclass
class MnistTracesConfig(StudyConfig):
    """Options of the mnist-traces study (defaults: the scaled-down full run; ``--quick``: :attr:`QUICK`).

    Attributes:
        seed: seeds the data split, the probe set and (with the replicate index) every initialisation and batch
            order.
        data: ``None``/``"mnist-subset"`` (default), ``"digits"``, or a folder of MNIST IDX files.
        epochs: training epochs per run (20; quick 2; the thesis: 300).
        n_train, n_test: training / test samples (4000 / 1000 of the embedded subset; quick 256 / 128; ``None``:
            all of the data, e.g. the 60 000 / 10 000 images of full MNIST).
        n_probe: probe inputs (the first of the training set) on which the traces are measured (256; quick 64).
        batch_size, lr: Adam mini-batch size (64; quick 32) and learning rate (1e-3).
        widths: hidden widths (128 and 784; quick 16 and 32).
        losses: keys of :data:`LOSSES` (default all seven).
        seeds: replicates per (loss, width) (5; quick 2).
        measure_per_epoch: recorded checkpoints per epoch, plus one before training (2).
        threads: torch intra-op threads (2, quick 1); part of the config because results depend on it bitwise.
        figures: draw the PNG figures (``False`` skips them; not part of the config, the metrics do not change).
    """

    QUICK = {"epochs": 2, "n_train": 256, "n_test": 128, "n_probe": 64, "batch_size": 32, "widths": (16, 32),
             "seeds": 2, "threads": 1}

    data: str | None = None
    epochs: int = 20
    n_train: int | None = 4000
    n_test: int | None = 1000
    n_probe: int = 256
    batch_size: int = 64
    lr: float = 1e-3
    widths: tuple[int, ...] = (128, 784)
    losses: tuple[str, ...] = tuple(LOSSES)
    seeds: int = 5
    measure_per_epoch: int = 2
    threads: int = 2
    figures: bool = True

    def validate(self) -> None:
        self.widths, self.losses = as_tuple(self.widths), as_tuple(self.losses)  # widths=16: one width
        for name in ("epochs", "n_probe", "batch_size", "seeds", "measure_per_epoch", "threads"):
            check_int(f"mnist-traces: {name}", getattr(self, name))
        for name in ("n_train", "n_test"):  # None: all of the data
            if getattr(self, name) is not None:
                check_int(f"mnist-traces: {name} (or None)", getattr(self, name))
        for w in self.widths:
            check_int("mnist-traces: a width", w)
        if not self.widths or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"mnist-traces: widths must be distinct positive integers, got {self.widths!r}.")
        bad = [k for k in self.losses if k not in LOSSES]
        if bad or not self.losses or len(set(self.losses)) != len(self.losses):
            raise ValueError(f"mnist-traces: unknown or repeated losses {bad or list(self.losses)}; choose from "
                             f"{list(LOSSES)}.")
        check_number("mnist-traces: lr", self.lr, lo=0)
        check_int("mnist-traces: seed", self.seed, 0)
        check_bool("mnist-traces: figures", self.figures)
        super().validate()


class MnistTraces(Study):
    """Fisher trace vs NTK trace through training on MNIST (Sauter 2023, §5.1.1; module docstring)."""

    name = "mnist-traces"
    description = ("Sauter 2023 §5.1.1 / app. B: tr of the loss-induced empirical Fisher vs the NTK trace through Adam "
                   "training on MNIST, 7 losses (Lp-norm, mean power, cross-entropy) x widths 128/784 x 5 seeds; "
                   "resumable.")
    Config = MnistTracesConfig

    def setup(self, cfg: MnistTracesConfig):
        # before the folder is created: a bad --data leaves no trace
        return load_data(cfg.data, cfg.n_train, cfg.n_test, cfg.seed)

    def config_json(self, cfg: MnistTracesConfig, inputs) -> dict:
        return {
            "experiment": "mnist-traces", "quick": cfg.quick, "seed": cfg.seed,
            "data": "mnist-subset" if cfg.data is None else str(cfg.data),
            "epochs": cfg.epochs, "n_train": cfg.n_train, "n_test": cfg.n_test, "n_probe": cfg.n_probe,
            "batch_size": cfg.batch_size, "lr": float(cfg.lr), "widths": list(cfg.widths), "losses": list(cfg.losses),
            "seeds": cfg.seeds, "measure_per_epoch": cfg.measure_per_epoch, "threads": cfg.threads, "depth": 2,
            "optimizer": "Adam", "fisher": "empirical, LossInduced(loss)", "observables": list(OBSERVABLES),
        }

    def compute(self, cfg: MnistTracesConfig, run: StudyRun) -> dict:
        desc, Xtr, ytr, Xte, yte = run.inputs
        n_classes = int(max(int(ytr.max()), int(yte.max()))) + 1
        setup = Setup(Xtr, ytr, Xte, yte, (Xtr[: cfg.n_probe], ytr[: cfg.n_probe]), n_classes, cfg.epochs,
                      cfg.batch_size, float(cfg.lr), cfg.measure_per_epoch, cfg.seed)
        units = Units(run.folder)
        plan = [(k, w, r) for w in cfg.widths for k in cfg.losses for r in range(cfg.seeds)]
        keys = [f"{k}_w{w}_s{r}" for k, w, r in plan]
        by_key = dict(zip(keys, plan, strict=True))
        done_before = sum(units.is_done(k) for k in keys)
        resumed = sum(units.checkpoint_file(k).exists() and not units.is_done(k) for k in keys)
        finished: dict[str, list[dict]] = {}
        with run.bar(len(keys) * setup.total_steps, unit="step") as bar:

            def work(key, state, save):
                loss_key, width, rep = by_key[key]
                bar.set_postfix_str(key)
                if state is not None and isinstance(state["epoch"], int):  # the keys are checked by units.run
                    bar.update(state["epoch"] * setup.steps_per_epoch)
                rows, _ = train_unit(setup, loss_key, width, rep, state=state, save=save,
                                     on_step=lambda: bar.update(1), checkpoint=units.checkpoint_file(key))
                return rows

            def on_done(key, rows):
                finished[key] = rows
                run.write_csv("metrics.csv", [r for k in keys if k in finished for r in finished[k]], COLUMNS)

            for key in keys:  # keep the bar right for units read back from disk
                if units.is_done(key):
                    bar.update(setup.total_steps)
            units.run(keys, work, on_done=on_done, state_keys=CKPT_KEYS)
        run.lap("units")
        return {"desc": desc, "setup": setup, "rows": [r for k in keys for r in finished[k]],
                "computed": len(keys) - done_before, "read_back": done_before, "resumed": resumed}

    def figures(self, r: dict, run: StudyRun) -> dict[str, str]:
        cfg = run.cfg
        return _figures(run, r["rows"], cfg.widths, cfg.losses) if cfg.figures else {}

    def report(self, r: dict, run: StudyRun) -> str:
        cfg = run.cfg
        return _summary(self.config_json(cfg, run.inputs), r["desc"], r["setup"], r["rows"], cfg.widths, cfg.losses,
                        run.figures, run.laps["units"], r["computed"], r["read_back"], r["resumed"])


def mnist_traces(out: str | os.PathLike, quick: bool = False, seed: int = 0, data=None, progress: bool = True,
                 **options) -> Path:
    """Fisher trace vs NTK trace through training on MNIST (Sauter 2023, §5.1.1, figs 5.1 and B.1–B.5).

    Args:
        out: run folder; a folder holding a run of another configuration is refused (``ValueError``), a folder of
            the same configuration is resumed.
        quick: tiny settings for tests (widths 16/32, 2 seeds, 256 train samples, 2 epochs).
        seed: seeds the data split, the probe set and (with the replicate index) every initialisation and batch
            order.
        data: ``None``/``"mnist-subset"`` (default), ``"digits"``, or a folder of MNIST IDX files.
        progress: tqdm bar over all training steps.
        **options: the fields of :class:`MnistTracesConfig` (``epochs``, ``widths``, ``losses``, ``seeds``, ...).

    Returns:
        The run folder: ``config.json``, ``metrics.csv``, ``units/`` (per-unit results and checkpoints), PNG figures
        ``mnist_traces_*.png`` and ``summary.md``.
    """
    return run_study(MnistTraces, out, quick, seed, progress=progress, data=data, **options)


# ----------------------------------------------------------------------------- figures
TRACE_STYLES = {"tr F (empirical Fisher)": {"color": "tab:red", "marker": None},
                "(1/N) tr Θ (NTK)": {"color": "tab:blue", "marker": None}}


#: (width, order) -> the thesis's figure showing the same panels.
SEED_FIGURES = {(128, 2): "fig 5.1", (128, 4): "fig B.1", (128, 6): "fig B.2", (784, 2): "fig B.3",
                (784, 4): "fig B.4", (784, 6): "fig B.5"}


def _figures(run: StudyRun, rows: list[dict], widths, losses) -> dict[str, str]:
    g = _group(rows)
    figs: dict[str, str] = {}
    for w in widths:
        for order in (2, 4, 6):
            keys = [k for k in (f"l{order}_norm", f"mean_power{order}", "cross_entropy") if k in losses]
            if not any(LOSSES[k].order == order for k in keys):
                continue
            panels = []
            x = None
            for k in keys:
                x, fm, fs = _curves(g[(k, w)], "fisher_trace")
                _, tm, ts = _curves(g[(k, w)], "ntk_trace")
                panels.append({
                    "series": {"tr F (empirical Fisher)": fm, "(1/N) tr Θ (NTK)": tm},
                    "stds": {"tr F (empirical Fisher)": fs, "(1/N) tr Θ (NTK)": ts},
                    "styles": TRACE_STYLES, "ylabel": "trace", "logy": True, "title": LOSSES[k].label,
                })
            name = f"mnist_traces_w{w}_order{order}.png"
            plots.line_panels(run.file(name), x, panels, xlabel="epoch",
                              title=f"width {w}: Fisher and NTK traces (mean ± 1 std over seeds)")
            seed_fig = SEED_FIGURES.get((w, order))
            figs[name] = (f"width {w}, order {order}: tr F and (1/N) tr Θ vs epoch for {', '.join(keys)}"
                          + (f" (Sauter 2023, {seed_fig})" if seed_fig else ""))
    for col, name, ylabel, logy, what in (
        ("trace_ratio", "mnist_traces_ratio.png", "tr F / ((1/N) tr Θ)", True,
         "the ratio tr F / ((1/N) tr Θ) vs epoch, all losses, one panel per width (constant = NTK explains tr F)"),
        ("test_accuracy", "mnist_traces_accuracy.png", "test accuracy", False, "test accuracy vs epoch"),
    ):
        panels = []
        for w in widths:
            series, stds = {}, {}
            for k in losses:
                x, m, s = _curves(g[(k, w)], col)
                series[LOSSES[k].label], stds[LOSSES[k].label] = m, s
            panels.append({"series": series, "stds": stds, "ylabel": ylabel, "logy": logy, "title": f"width {w}",
                           "styles": {lab: {"marker": None} for lab in series}})
        plots.line_panels(run.file(name), x, panels, xlabel="epoch", title=f"{ylabel} (mean ± 1 std over seeds)",
                          figsize=(7.5, 0.6 + 3.6 * len(panels)))
        figs[name] = what
    resid = {}
    for w in widths:
        for k in losses:
            resid[f"{LOSSES[k].label} w{w}"] = _mean_std([
                trace_fit([r["fisher_trace"] for r in rs], [r["ntk_trace"] for r in rs])["residual"]
                for rs in g[(k, w)].values()])[0]
    plots.bar_plot(run.file("mnist_traces_residual.png"), resid, log=True,
                   ylabel="‖F − cΘ‖ / ‖F‖", title="How far tr F is from c · tr Θ (mean over seeds; 0 = proportional)")
    figs["mnist_traces_residual.png"] = (
        "relative residual of the best proportional fit tr F ≈ c (1/N) tr Θ, per loss and width")
    return figs


# ----------------------------------------------------------------------------- summary
def _pm(m: float, s: float, fmt: str = ".3g") -> str:
    return f"{m:{fmt}} ± {s:{fmt}}"


def _summary(config, desc, setup: Setup, rows, widths, losses, figures, elapsed, computed, read_back, resumed) -> str:
    g = _group(rows)
    stats: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    for (k, w), runs in g.items():
        fits = [trace_fit([r["fisher_trace"] for r in rs], [r["ntk_trace"] for r in rs]) for rs in runs.values()]
        stats[(k, w)] = {q: _mean_std([f[q] for f in fits]) for q in ("pearson", "ratio", "residual", "ratio_span")}
        stats[(k, w)]["test_accuracy"] = _mean_std([rs[-1]["test_accuracy"] for rs in runs.values()])
    d, C = setup.Xtr.shape[1], setup.n_classes
    P = {w: (d + 1) * w + (w + 1) * w + (w + 1) * C for w in widths}  # 784 → w → w → C with biases
    L = [
        "# mnist-traces: Fisher trace vs NTK trace through training (Sauter 2023, §5.1.1, figs 5.1, B.1–B.5)",
        "",
        f"Data: {desc}. Network {setup.Xtr.shape[1]} → w → w → {setup.n_classes}, ReLU, widths "
        + ", ".join(f"{w} (P = {P[w]:,})" for w in widths)
        + f". Adam, lr {setup.lr:g}, batch {setup.batch_size}, {setup.epochs} epochs ({setup.total_steps} steps), "
        f"{config['seeds']} seeds per (loss, width){' — quick mode' if config['quick'] else ''}.",
        f"Traces on a fixed probe of N = {len(setup.probe[0])} training inputs at {len(setup.record_steps())} "
        f"checkpoints per run ({setup.measure_per_epoch} per epoch and the initialisation):",
        "tr F = (1/N) Σ_n ‖∇_θ ℓ_n‖² (loss-induced empirical Fisher, Sauter 2023 eq 5.1.3) and "
        "(1/N) tr Θ = (1/N) Σ_n Σ_a ‖∇_θ f_a(x_n)‖² (fl.Monitor, exact).",
        "",
        f"Choices where the thesis is silent: Adam lr {setup.lr:g} (default betas), batch {setup.batch_size}, "
        "PyTorch's default initialisation, outputs compared with one-hot targets (cross-entropy on the logits), "
        "training loss = batch mean of ℓ, std over seeds with ddof = 1. The thesis trained 300 epochs on 60 000 "
        "images; `--data DIR --set epochs=300 --set n_train=None --set n_test=None` reproduces that setting.",
        "",
        "## Does the NTK trace alone explain the Fisher trace?",
        "",
        "Per loss and width, over the checkpoints of each run: Pearson r of tr F and tr Θ, the least-squares ratio "
        "through the origin c = Σ F Θ / Σ Θ², the relative residual ‖F − cΘ‖/‖F‖ (0 = tr F exactly proportional to "
        "tr Θ), the span max/min of F/Θ over training, and the final test accuracy; mean ± std over seeds.",
        "",
        "| loss | width | Pearson r | ratio c | residual | ratio span | final test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in widths:
        for k in losses:
            s = stats[(k, w)]
            L.append(f"| {LOSSES[k].label} | {w} | {_pm(*s['pearson'])} | {_pm(*s['ratio'])} | "
                     f"{_pm(*s['residual'])} | {_pm(*s['ratio_span'])} | {_pm(*s['test_accuracy'])} |")
    dev = max(abs(r["ntk_side"] - r["fisher_trace"]) / max(abs(r["fisher_trace"]), 1e-300) for r in rows)
    L += ["", _verdict(stats, widths, losses), "",
          f"Eq 5.1.2 check: tr F computed directly and as (1/N) Σ_n r_nᵀ Θ_nn r_n agree to {dev:.1e} (max relative "
          f"difference over all {len(rows)} rows; float32 training and measurement).", ""]
    if figures:
        L += ["## Figures", ""] + [f"- `{n}`: {d}" for n, d in figures.items()]
    L += ["", "## Run", "",
          f"{computed} of {len(g) * config['seeds']} units computed in this invocation ({resumed} of them resumed "
          f"from a checkpoint), {read_back} read back from an earlier one; {elapsed:.1f} s wall time, "
          f"{config['threads']} torch threads.", ""]
    return "\n".join(L)


def _verdict(stats, widths, losses) -> str:
    """The thesis's finding, tested: (a) the L2-norm traces evolve nearly proportionally while mean power n=2 and
    cross-entropy do not (fig 5.1); (b) the deviations grow with the width (appendix B)."""
    parts = []
    res = {kw: s["residual"][0] for kw, s in stats.items()}
    if "l2_norm" in losses:
        others = [k for k in ("mean_power2", "cross_entropy") if k in losses]
        per_w = []
        for w in widths:
            best = min(losses, key=lambda k: res[(k, w)])
            worse = all(res[(k, w)] > res[("l2_norm", w)] for k in others)
            per_w.append((w, worse, best))
        held = all(x[1] for x in per_w) and bool(others)
        detail = "; ".join(
            f"width {w}: L2-norm residual {res[('l2_norm', w)]:.3g} vs "
            + ", ".join(f"{LOSSES[k].label} {res[(k, w)]:.3g}" for k in others)
            + f" (smallest of all losses: {LOSSES[best].label})"
            for w, _, best in per_w)
        parts.append(f"(a) L2-norm loss nearly proportional, mean power n=2 and cross-entropy not: "
                     f"**{'holds' if held else 'does not hold'}** ({detail}).")
    if len(widths) >= 2:
        lo, hi = min(widths), max(widths)
        grow = [k for k in losses if res[(k, hi)] > res[(k, lo)]]
        parts.append(f"(b) deviations larger at width {hi} than at {lo}: for {len(grow)} of {len(losses)} losses"
                     f"{' (' + ', '.join(LOSSES[k].label for k in grow) + ')' if grow else ''} — "
                     f"**{'holds' if 2 * len(grow) > len(losses) else 'does not hold'}** (majority of losses).")
    if not parts:
        return "The thesis's finding needs the L2-norm loss or two widths to be tested; this run has neither."
    return "Seed's finding — " + " ".join(parts)
