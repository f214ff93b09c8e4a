"""``fl.Monitor``: Fisher-information observables recorded inside any plain PyTorch training loop.

Usage (a plain loop; the monitor never touches the optimiser)::

    mon = fl.Monitor(model, fl.Categorical(), (X_probe, y_probe), every=50,
                     observables=("loss", "accuracy", "fisher_trace", "relation", "path_length"),
                     run="runs/mine")                      # rows appended atomically to runs/mine/metrics.csv
    mon.record(0)                                         # the state before training (optional)
    for x, y in loader:
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(); loss.backward(); opt.step()
        mon.step(loss=loss, outputs=out, targets=y)       # counts steps 1, 2, ...; returns a record or None

Structured outputs work as everywhere in the library: a language model's logits ``(B, T, V)`` with labels
``(B, T)`` (``-100`` = ignored), a channel-first segmentation model ``(B, C, *positions)`` with
``fl.Categorical(channels="first")``, models returning a tuple / dict / ``ModelOutput`` with ``output=`` (e.g.
``output=lambda out: out.logits``), and dict probe batches (``{"input_ids", "attention_mask", "labels"}``).

Observables (columns of a record; every record also has ``step``). All probe quantities are **means over the probe
inputs** of each input's sum over its kept positions (docs/conventions.md#fisher-information), or means over the
kept predictions with ``reduction="per_prediction"``, measured on the parameters *after* the optimiser step, with
the model in eval mode. Costs are per record, in units of one forward+backward pass over the probe (N inputs,
M = T·C outputs each: T positions of C outputs):


==========================  ====================================================================  ==============
observable                  value (library function it comes from)                                cost
==========================  ====================================================================  ==============
``loss``, ``accuracy``      probe mean of ``likelihood.input_loss``; accuracy over the kept         1 forward
                            predictions, by argmax over the class axis (Categorical, class
                            labels) or ``f > 0`` (Bernoulli)
``grad_norm``               ``‖∇_θ (1/N) Σ ℓ_n‖`` (one ``torch.func.vjp`` per batch)              1 fwd+bwd
``fisher_trace``            :func:`fisherlens.fisher_trace` (``kind``, ``method``, ``draws``)       exact: ~K bwd
                                                                                                  (K = M true,
                                                                                                  1 empirical);
                                                                                                  hutchinson: 1
``ntk_trace``               :func:`fisherlens.ntk_trace`, ``(1/N) tr Θ`` (per input always)        ~M bwd
``relation``                :func:`fisherlens.fisher_ntk_trace`: columns ``fisher_trace``,          ~M+K bwd
                            ``ntk_side``, ``relation_ratio`` (= tr F / ((1/N) tr Θ)); also fills
                            ``ntk_trace`` when that is requested (one pass for both)
``top_eigenvalue``          :func:`fisherlens.eigenvalues` (``k=1``, ``method="lanczos"``)          ~15-30 FVPs
``rao_norm``                :func:`fisherlens.fisher_rao_norm`, ``θᵀ F θ``                          1 jvp
``path_length``             ``Σ_k sqrt(Δθ_kᵀ F(θ_k) Δθ_k)`` between consecutive records             1 jvp
                            (docs/conventions.md#path-length, left rule; 0 at the first record)
``batch_fisher_trace``      tr F on the **training batch** of this step, at θ *before* the         see below
                            optimiser step, from the caller's own forward/backward
==========================  ====================================================================  ==============

``path_length``: with ``Δθ = θ_k − θ_{k−1}`` of the selected parameters, one ``torch.func.jvp`` per probe
batch at the previous record's parameters gives ``J_n Δθ``, and ``Δθᵀ F Δθ = (1/N) Σ_n ‖V_nᵀ J_n Δθ‖²``; no
P×P matrix and no second model copy (the previous θ is one P-vector).

``batch_fisher_trace`` (the cheap per-step observable).  Forward hooks on the layers with a rule of the core
(``nn.Linear``, ``Conv1d``/``Conv2d``, ``Embedding``, ``LayerNorm``, ``BatchNorm*`` in eval mode, transformers'
``Conv1D``) record each
layer's input ``a_n`` during the caller's training forward (only when the coming step is scheduled; positional or
keyword inputs).  Per-sample gradient norms then follow from layer-output gradients ``δ_n`` alone — for a Linear
layer ``‖a_n‖²‖δ_n‖²`` ("ghost norms", the reduction of :mod:`fisherlens._core`'s layerwise engine), for other
layers the per-sample rows of that engine.  The value has the normalisation of ``fl.fisher_trace`` on that batch
(per input; per kept prediction with ``reduction="per_prediction"``):

* ``kind="empirical"``: **exact** ``tr F_emp = (1/B) Σ_n ‖∇ℓ_n‖²`` (``ℓ_n`` each input's loss summed over its
  kept positions), and free: the ``δ_n`` are captured by tensor hooks during the caller's ``loss.backward()``.
  The training loss must be the likelihood's loss, as the mean over the inputs of ``input_loss``, the mean over
  the kept predictions (``F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))`` with ``ignore_index=-100``) or
  the sum; pass ``targets=`` (and ``loss=``) to :meth:`Monitor.step`.  Checked: the value of ``loss=`` must be
  one of those at the captured outputs (cheap); without ``loss=``, or if the value differs (e.g. a regulariser
  was added), ``∂loss/∂f`` captured in the backward must be the likelihood's residual over 1, B or that count.
* ``kind="true"``: right after the training forward one extra backward **to the layer outputs only** (no
  weight gradients) of columns that each live at one position, batched: ``method="exact"`` the ``S_t e_c``
  (``T·C`` columns; ``C`` for ``(B, C)`` outputs), ``method="hutchinson"`` the Rademacher ``ξ_t = S_t ε_t`` of
  :func:`fisherlens.estimators.probe_vectors` split by position (``T·draws`` columns, one draw of each position's
  own Hutchinson term ``‖J_tᵀ ξ_t‖²``: unbiased, never mixing positions).  The labels of the batch are known only
  at :meth:`Monitor.step`, so the squared norms are kept per input and position and the kept positions are summed
  there: **with more than one position per input, ``targets=`` is required** (labels with ``ignore_index``, or a
  dict batch / mapping with ``labels``, ``mask``, ``attention_mask``).  For ``(B, C)`` outputs ``targets=`` is
  optional and the Hutchinson value equals the per-sample Hutchinson estimator of ``fl.fisher_trace`` draw for
  draw.  The columns are back-propagated in chunks of positions that fit :data:`fisherlens._core.WORK_BUDGET`.

The monitor captures the first forward with autograd enabled after the previous :meth:`Monitor.step` (only
when the coming step is scheduled; forwards under ``torch.no_grad``, ``torch.func.functional_call`` forwards
and the library's own calls are ignored), so call ``step()`` once per training step with consecutive step
numbers; with gradient accumulation the trace is that of the first micro-batch.  A step with nothing captured
records NaN (with a warning).  BatchNorm or Dropout in training mode is refused (per-sample gradients are
undefined there); where shapes alone cannot show that a layer keeps the batch on axis 0 (another input axis of
size B, e.g. B = T), one more activation-only backward of a random check column proves it.

Records go to ``mon.records``, to ``<run>/metrics.csv`` (one row appended atomically per record,
:func:`fisherlens.runs.append_csv_row`), to TensorBoard with ``tensorboard=DIR``, and to any logger — a callable
``log(values, step)`` (:mod:`fisherlens.integrations.loggers`: Weights & Biases, MLflow, ... in one line each).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ._core import (
    Call,
    Capture,
    Fields,
    FunctionalModel,
    Stats,
    WeakHook,
    ambiguous,
    call_problems,
    check_choice,
    check_kind,
    close_enough,
    forward_checked,
    iter_batches,
    layer_stats,
    library_forward,
    plan_for,
    quadratic_sum,
    ruled_layers,
    shards_for,
    signature,
    tap_grads,
    tolerance,
    unwrap_model,
    vjp_checked,
    work_budget,
)
from .estimators import probe_vectors
from .fisher import fisher_rao_norm, fisher_trace
from .integrations.loggers import TensorBoardLogger, check_loggers
from .likelihoods import Bernoulli, Categorical, Gaussian, LossInduced
from .ntk import fisher_ntk_trace, ntk_trace
from .runs import RunDir, append_csv_row, write_csv
from .spectrum import eigenvalues

Tensor = torch.Tensor

__all__ = ["Monitor", "OBSERVABLES"]

#: observable name -> the columns it produces.
OBSERVABLES: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "accuracy": ("accuracy",),
    "fisher_trace": ("fisher_trace",),
    "ntk_trace": ("ntk_trace",),
    "relation": ("fisher_trace", "ntk_side", "relation_ratio"),
    "top_eigenvalue": ("top_eigenvalue",),
    "rao_norm": ("rao_norm",),
    "grad_norm": ("grad_norm",),
    "path_length": ("path_length",),
    "batch_fisher_trace": ("batch_fisher_trace",),
}
KINDS = ("true", "empirical")
METHODS = ("exact", "hutchinson")
REDUCTIONS = ("mean", "per_prediction")
#: ``record_on=``: the ranks of a process group that keep and write the records.
RECORD_ON = ("rank0", "all")
_STATE_VERSION = 1
#: the keys of :meth:`Monitor.state_dict`.
_STATE_KEYS = ("version", "config", "step_count", "path", "theta_prev", "generator", "records")


def _check_run_folder(run) -> None:
    """``run=`` must be a RunDir or a path of a folder (existing or not): not a file, nor inside one."""
    if isinstance(run, RunDir):
        return
    if not isinstance(run, (str, os.PathLike)):
        raise TypeError(f"run must be a fisherlens.runs.RunDir or a folder path, got {type(run).__name__}.")
    path = Path(run)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"run={str(run)!r}: {str(p)!r} is an existing file, not a folder; the Monitor writes "
                                 "metrics.csv into a run folder. Pass a folder path.")
            break
    if (path / "metrics.csv").is_dir():
        raise ValueError(f"run={str(run)!r}: {str(path / 'metrics.csv')!r} is a folder; the Monitor needs to write "
                         "its table there.")
    if (path / "metrics.csv").exists() and not (path / RunDir.MARKER).exists():
        raise ValueError(f"run={str(run)!r} holds a metrics.csv that fisherlens did not write (no {RunDir.MARKER} "
                         "marker); the Monitor would append to it. Choose a new or empty folder.")


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    return v


class Monitor:
    """Record Fisher-information observables on a schedule inside a plain training loop.

    Args:
        model: the ``torch.nn.Module`` being trained: outputs ``(B, C)`` (1-D output: C = 1) or structured
            ``(B, *S)`` (``(B, *positions, C)``, or channel-first as the likelihood's ``channels`` says).
        likelihood: ``fl.Categorical()``, ``fl.Gaussian(sigma)``, ``fl.Bernoulli()`` or ``fl.LossInduced(loss)``
            (the latter only with ``kind="empirical"``).
        probe: the probe data, ``(X, Y)`` tensors or any *re-iterable* of ``(x, y)`` or dict batches (a
            DataLoader, a list of ``{"input_ids", "labels", ...}``); read again at every record.  ``Y`` may be
            ``None`` when no observable needs labels; labels ``(B, *positions)`` may hold ``ignore_index``.
        observables: names from :data:`OBSERVABLES` (see the module doc for values and costs).
        every: an int ``k`` (record when ``step % k == 0``) or a callable ``step -> bool``.
        kind: ``"true"`` or ``"empirical"``: the Fisher of every Fisher observable.
        method: ``"exact"`` or ``"hutchinson"`` for ``fisher_trace`` and ``batch_fisher_trace``
            (Hutchinson needs ``kind="true"``).
        draws: Hutchinson draws per record.
        generator: ``torch.Generator`` of every random draw (default: a private one seeded with 0; the global
            RNG is never used).  Its state is part of :meth:`state_dict`.
        params: parameter subset (names, module prefixes or tensors), as everywhere in the library.
        run: a :class:`fisherlens.runs.RunDir` or a folder: each record is appended (atomically, the table is
            rewritten) to ``metrics.csv`` there — after the rows already in it; :meth:`load_state_dict` rewrites
            the table to the restored records.  Extra columns join the header when they first appear.  A path
            that is (or lies inside) an existing regular file raises ``ValueError``.
        tensorboard: a log folder for ``torch.utils.tensorboard``: shorthand for
            ``loggers=[TensorBoardLogger(dir)]`` (ignored, with a warning, if ``tensorboard`` is not installed).
        loggers: callables ``log(values: dict[str, float], step: int)`` (or one), called with every record (all
            columns but ``step``); closed by :meth:`close` when they have a ``close()``
            (:mod:`fisherlens.integrations.loggers`).
        batch_size: chunk size of tensor probes (default 256, as the library).
        output: a callable picking the output tensor from what the model returns (tuple, dict, ``ModelOutput``),
            e.g. ``output=lambda out: out.logits``; used by every observable.  Not part of :meth:`state_dict`
            (a callable is not serialisable): pass it again when resuming.
        reduction: ``"mean"`` (per input, the library's convention) or ``"per_prediction"`` (per kept
            prediction, what ``F.cross_entropy(reduction="mean")`` averages over) for ``loss``, ``grad_norm``,
            ``fisher_trace``, ``top_eigenvalue``, ``rao_norm``, ``path_length`` and ``batch_fisher_trace``;
            ``ntk_trace`` stays per input and ``relation`` needs ``"mean"``.
        group, distributed: as in :func:`fisherlens.fisher_matrix`.  Under a process group (``torchrun``, DDP)
            ``probe`` is this rank's shard and every observable is that of the union of the shards
            (``batch_fisher_trace``: of the union of the ranks' training batches), the same on every rank.  The
            rule: **call** :meth:`step` **and** :meth:`record` **on every rank, with the same steps** — a record
            is a collective (a mismatched step is refused with a ``ValueError``); ``record_on`` chooses the ranks
            that keep and write the records.  A monitor meant to run on one rank alone takes
            ``distributed=False`` (its own probe only, no collective).  A ``DistributedDataParallel`` model is
            measured through the module it wraps.
        record_on: ``"rank0"`` (default): only the group's first rank appends to :attr:`records`, writes
            ``run=`` and calls the loggers (the others return the same record from :meth:`step`); ``"all"``:
            every rank does (give each its own ``run=`` folder).

    Attributes:
        records: list of all records (``dict`` column -> float; ``step`` is an int).
        step_count: the last step seen (0 before the first call).

    Every measurement puts the model in eval mode and restores each module's mode afterwards; parameters,
    their ``.grad`` and the global RNG state are never changed.  Call :meth:`close` to remove the hooks of
    ``batch_fisher_trace`` when done.
    """

    def __init__(
        self, model: nn.Module, likelihood, probe, *,
        observables: Iterable[str] = ("loss", "accuracy", "fisher_trace", "ntk_trace", "grad_norm"),
        every: int | Callable[[int], bool] = 1, kind: str = "true", method: str = "exact", draws: int = 1,
        generator: torch.Generator | None = None, params=None, run: RunDir | str | os.PathLike | None = None,
        tensorboard: str | os.PathLike | None = None, batch_size: int | None = None, output=None,
        reduction: str = "mean", loggers=None, group=None, distributed: bool | None = None,
        record_on: str = "rank0",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        model = unwrap_model(model)  # a DistributedDataParallel wrapper: measure the module it wraps
        check_choice("record_on", record_on, RECORD_ON)
        self._shards = shards_for(group, distributed)
        #: whether this rank keeps and writes the records (always, single-process; docs/distributed.md#the-monitor)
        self.records_here = self._shards is None or record_on == "all" or self._shards.rank == 0
        if not self.records_here:
            run = tensorboard = loggers = None
        check_choice("kind", kind, KINDS)
        check_kind(likelihood, kind)
        check_choice("method", method, METHODS)
        check_choice("reduction", reduction, REDUCTIONS)
        if method == "hutchinson" and kind != "true":
            raise ValueError("method='hutchinson' estimates the true Fisher; use kind='true', or method='exact' "
                             "(the empirical Fisher trace is cheap to compute exactly).")
        self.draws = _positive_int("draws", draws)
        if isinstance(observables, str):
            observables = (observables,)
        obs = list(dict.fromkeys(observables))
        if not obs:
            raise ValueError(f"observables is empty; choose from {', '.join(OBSERVABLES)}.")
        for o in obs:
            if o not in OBSERVABLES:
                raise ValueError(f"Unknown observable {o!r}; choose from {', '.join(OBSERVABLES)}.")
        if "relation" in obs and "fisher_trace" in obs and method == "hutchinson":
            raise ValueError("'relation' writes the exact trace into column 'fisher_trace', which clashes with "
                             "method='hutchinson' for 'fisher_trace'; request one of them (or method='exact').")
        if "relation" in obs and reduction != "mean":
            raise ValueError("'relation' (fl.fisher_ntk_trace) is normalised per input; use reduction='mean', or "
                             "drop 'relation' and record 'fisher_trace' and 'ntk_trace'.")
        if "accuracy" in obs and isinstance(likelihood, Gaussian):
            raise ValueError("accuracy needs a classifier (fl.Categorical, fl.Bernoulli, or fl.LossInduced with "
                             "class labels); drop 'accuracy' for a Gaussian output model.")
        if callable(every):
            self._every = every
        else:
            self._every = _positive_int("every", every)
        if generator is None:
            generator = torch.Generator(device=_device(model)).manual_seed(0)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if isinstance(probe, Iterator):
            raise TypeError("The probe is read at every record; pass a re-iterable ((X, Y) tensors, a list of "
                            "batches, a DataLoader), not a one-shot iterator.")
        if batch_size is not None:
            _positive_int("batch_size", batch_size)
        if run is not None:
            _check_run_folder(run)
        self.model, self.likelihood, self.probe = model, likelihood, probe
        self.observables = tuple(obs)
        self.kind, self.method, self.generator, self.params = kind, method, generator, params
        self.batch_size, self.output, self.reduction = batch_size, output, reduction
        with self._measuring():
            self._fm()  # validates params= and output= now, not at the first record
        self._probe_obs = [o for o in self.observables if o != "batch_fisher_trace"]
        self.columns = ("step", *dict.fromkeys(c for o in self.observables for c in OBSERVABLES[o]))
        self.records: list[dict] = []
        self.step_count = 0
        self._path = 0.0
        self._theta_prev: Tensor | None = None
        self._csv: Path | None = None
        if run is not None:
            self._csv = (run.path if isinstance(run, RunDir) else Path(run)) / "metrics.csv"
            self._csv.parent.mkdir(parents=True, exist_ok=True)
            (self._csv.parent / RunDir.MARKER).touch()  # a folder the monitor writes is a run folder
        self.loggers = check_loggers(loggers)
        if tensorboard is not None:
            try:
                self.loggers.append(TensorBoardLogger(tensorboard))
            except ImportError as e:
                warnings.warn(f"tensorboard= was given but {e}; records go to the run folder only.", stacklevel=2)
        self._batch = _BatchCapture(self) if "batch_fisher_trace" in self.observables else None
        self._arm()

    # ------------------------------------------------------------------ schedule
    def scheduled(self, step: int) -> bool:
        """Whether ``step`` is on the schedule (``step % every == 0``, or ``every(step)``)."""
        if isinstance(self._every, int):
            return step % self._every == 0
        return bool(self._every(step))

    def _arm(self) -> None:
        if self._batch is not None:
            self._batch.arm(self.scheduled(self.step_count + 1))

    def step(self, step: int | None = None, *, loss=None, outputs=None, targets=None, **extra) -> dict | None:
        """Advance the step counter (or set it to ``step``) and record if the step is scheduled.

        Call once per training step, after ``optimizer.step()``.  ``loss`` (the training batch loss) becomes
        column ``batch_loss``; ``targets`` of the training batch (labels, or a dict batch / mapping with
        ``labels``, ``mask``, ``attention_mask``) are needed by ``batch_fisher_trace`` with
        ``kind="empirical"``, and with ``kind="true"`` when the outputs have more than one position per input
        (they say which positions count); ``outputs`` optionally.  Scalar ``**extra`` values become extra
        columns.

        Returns:
            The record (``dict``) when the step is scheduled, else ``None``.
        """
        if step is None:
            step = self.step_count + 1
        elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        self.step_count = step
        if not self.scheduled(step):
            if self._batch is not None:
                self._batch.clear()
            self._arm()
            return None
        if loss is not None:
            extra = {"batch_loss": float(loss.detach() if isinstance(loss, Tensor) else loss), **extra}
        return self._record(step, extra, targets=targets, outputs=outputs, from_step=True, loss=loss)

    def record(self, step: int | None = None, **extra) -> dict:
        """Measure now, regardless of the schedule (``step`` defaults to the current count and sets it)."""
        if step is None:
            step = self.step_count
        elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        self.step_count = step
        return self._record(step, extra, targets=None, outputs=None, from_step=False)

    def _record(self, step: int, extra: dict, *, targets, outputs, from_step: bool, loss=None) -> dict:
        for k, v in extra.items():
            if not isinstance(k, str) or k in self.columns:
                raise ValueError(f"Extra column {k!r} clashes with an observable's column (or is not a name).")
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ValueError(f"Extra column {k!r} must be a scalar, got a tensor of shape {tuple(v.shape)}.")
                extra[k] = v.item()
            elif not isinstance(v, (int, float)):
                raise TypeError(f"Extra column {k!r} must be a number, got {type(v).__name__}.")
        if self._shards is not None:  # every rank measures the same step (the measurement is collective)
            self._shards.same(step, "the step of this record: call mon.step() / mon.record() on every rank, with "
                                    "the same steps (record_on= chooses the ranks that keep and write the records)")
        rec: dict = {"step": step}
        if self._batch is not None:
            rec["batch_fisher_trace"] = self._batch.value(targets, outputs, loss, required=from_step)
        if self._probe_obs:
            with self._measuring():
                rec.update(self._measure())
        rec = {c: rec[c] for c in self.columns} | {k: float(v) for k, v in extra.items()}
        if not self.records_here:  # distributed: other ranks keep and write the records (record_on=)
            self._arm()
            return rec
        self.records.append(rec)
        if self._csv is not None:
            append_csv_row(self._csv, rec)
        values = {k: v for k, v in rec.items() if k != "step"}
        for log in self.loggers:
            log(values, step)
        self._arm()
        return rec

    # ------------------------------------------------------------------ measurements
    @contextmanager
    def _measuring(self):
        modes = [(m, m.training) for m in self.model.modules()]
        busy = self._batch_busy(True)
        self.model.eval()
        try:
            yield
        finally:
            for m, t in modes:
                m.training = t
            self._batch_busy(busy)

    def _batch_busy(self, flag: bool) -> bool:
        b = getattr(self, "_batch", None)
        if b is None:
            return False
        old, b.busy = b.busy, flag
        return old

    def _fm(self) -> FunctionalModel:
        return FunctionalModel(self.model, self.params, self.output)

    def _per(self, n: int, m: int, what: str) -> int:
        """The divisor of the normalisation: ``n`` inputs (``reduction="mean"``) or ``m`` kept predictions."""
        if m == 0:
            raise ValueError(f"{what}: every position of the probe is ignored (labels equal to ignore_index, or "
                             "masked out); there is no prediction to average over.")
        return n if self.reduction == "mean" else m

    def _measure(self) -> dict:
        obs, lik, kind, probe = self.observables, self.likelihood, self.kind, self.probe
        common = {"params": self.params, "batch_size": self.batch_size, "output": self.output,
                  "group": None if self._shards is None else self._shards.group,
                  "distributed": self._shards is not None}
        red = {"reduction": self.reduction}
        out: dict = {}
        if {"loss", "accuracy", "grad_norm"} & set(obs):
            out.update(self._loss_pass())
        if "relation" in obs:
            rel = fisher_ntk_trace(self.model, probe, lik, kind, **common)
            out.update(fisher_trace=rel.fisher_trace, ntk_side=rel.ntk_side, relation_ratio=rel.ratio)
            if "ntk_trace" in obs:
                out["ntk_trace"] = rel.ntk_trace
        if "fisher_trace" in obs and "fisher_trace" not in out:
            out["fisher_trace"] = float(fisher_trace(self.model, probe, lik, kind, self.method, samples=self.draws,
                                                     generator=self.generator, **red, **common))
        if "ntk_trace" in obs and "ntk_trace" not in out:
            out["ntk_trace"] = ntk_trace(self.model, probe, reduction="mean", **common)
        if "top_eigenvalue" in obs:
            out["top_eigenvalue"] = float(eigenvalues(self.model, probe, lik, k=1, method="lanczos", kind=kind,
                                                      **red, **common)[0])
        if "rao_norm" in obs:
            out["rao_norm"] = fisher_rao_norm(self.model, probe, lik, kind, **red, **common)
        if "path_length" in obs:
            out["path_length"] = self._path_step()
        return out

    def _loss_pass(self) -> dict:
        """Probe loss (the mean over inputs of ``input_loss``, or per kept prediction), accuracy over the kept
        predictions and ``‖∇_θ loss‖``: one forward per batch (plus one pull-back for the gradient)."""
        fm, lik = self._fm(), self.likelihood
        want_grad = "grad_norm" in self.observables
        loss, correct, n, m, grad = 0.0, 0, 0, 0, None
        for X, Y in iter_batches(self.probe, fm, need_y=True, batch_size=self.batch_size,
                                 empty_ok=self._shards is not None):
            if want_grad:
                f, pull = vjp_checked(fm, X)
            else:
                with torch.no_grad():
                    f = forward_checked(fm, fm.params, X)
            fs = fm.structured(f.detach())  # (B, *S)
            loss += lik.input_loss(fs, Y).sum().item()
            m += lik.count(fs, Y)
            if "accuracy" in self.observables:
                correct += self._correct(fs, Y)
            if want_grad:
                g = fm.flatten(pull(lik.residual(fs, Y).reshape(f.shape))[0])
                grad = g if grad is None else grad + g
            n += len(X)
        if self._shards is not None:  # the probe's shards of all ranks: one all-reduce
            if want_grad and grad is None:
                grad = torch.zeros(fm.P, dtype=fm.dtype, device=fm.device)
            loss, correct, n, m, *g = self._shards.sum([loss, correct, n, m, *([] if grad is None else [grad])],
                                                       device=fm.device)
            grad = g[0] if g else None
        per = self._per(n, m, "loss")
        out = {"loss": loss / per, "accuracy": correct / max(m, 1)}
        if want_grad:
            out["grad_norm"] = (grad / per).norm().item()
        return out

    def _correct(self, fs: Tensor, Y) -> int:
        """Correct kept predictions of outputs ``fs (B, *S)``: argmax over the class axis against class labels
        (or probability targets), ``f > 0`` for Bernoulli logits."""
        lik = self.likelihood
        rows = lik.rows(fs, Y)
        f, y = rows.f, rows.y
        if isinstance(lik, Bernoulli) or f.shape[-1] == 1:
            if isinstance(lik, LossInduced):
                raise ValueError("accuracy with one output is defined for fl.Bernoulli only.")
            return int(((f[:, 0] > 0) == (y.reshape(-1) > 0.5)).sum())
        if y.dim() == 2 and y.shape == f.shape and torch.is_floating_point(y):
            y = y.argmax(-1)
        elif torch.is_floating_point(y) or y.dim() != 1:
            raise ValueError(f"accuracy needs class labels (one per position) for {lik!r}; the probe labels give "
                             f"rows of shape {tuple(y.shape)} and dtype {y.dtype}.")
        if not isinstance(lik, (Categorical, LossInduced)):
            raise ValueError(f"accuracy is not defined for {lik!r}.")
        return int((f.argmax(-1) == y).sum())

    def _path_step(self) -> float:
        """Add ``sqrt(Δθᵀ F(θ_prev) Δθ)`` (one jvp per probe batch at the previous θ) to the path length."""
        fm = self._fm()
        theta = fm.flatten(fm.params).detach().clone()
        if self._theta_prev is not None:
            if self._theta_prev.shape != theta.shape:
                raise ValueError("path_length: the number of selected parameters changed between records.")
            old = fm.unflatten(self._theta_prev.to(theta))
            delta = fm.unflatten(theta - self._theta_prev.to(theta))
            batches = iter_batches(self.probe, fm, need_y=self.kind == "empirical", batch_size=self.batch_size,
                                   empty_ok=self._shards is not None)
            kept = [0]

            def sandwich(f, y, lik=self.likelihood):
                kept[0] += lik.count(f, y)
                return lik.sandwich(f, self.kind, y)

            q, n = quadratic_sum(fm, batches, sandwich, delta, at=old)
            if self._shards is not None:
                q, n, kept[0] = self._shards.sum([q, n, kept[0]], device=fm.device)
            self._path += math.sqrt(max(q / self._per(n, kept[0], "path_length"), 0.0))
        self._theta_prev = theta
        return self._path

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: plain Python values and tensors (``torch.load(weights_only=True)``);
        not ``output=`` (a callable): pass it to the new Monitor again."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "step_count": self.step_count,
            "path": self._path,
            "theta_prev": None if self._theta_prev is None else self._theta_prev.clone(),
            "generator": self.generator.get_state(),
            "records": [dict(r) for r in self.records],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the later records are then those of an unbroken run.

        With ``run=``, ``metrics.csv`` is rewritten (atomically) to hold exactly the restored records, so rows
        written after the checkpoint by an interrupted run are dropped and recorded again.

        Raises:
            ValueError: the state is not a Monitor state (not a dict, an unknown ``version``, missing keys: the
                message lists them) or comes from a monitor configured differently.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("Not a fisherlens Monitor state (missing or unknown 'version').")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"Incomplete Monitor state: missing keys {missing} (a state_dict() has "
                             f"{list(_STATE_KEYS)}); pass the dict that Monitor.state_dict() returned.")
        if not isinstance(state["config"], dict):
            raise ValueError(f"Not a fisherlens Monitor state: 'config' is a {type(state['config']).__name__}, "
                             "not a dict.")
        if state["config"] != self._config():
            mine = self._config()
            diff = sorted(k for k in {**state["config"], **mine} if state["config"].get(k) != mine.get(k))
            raise ValueError(f"The state comes from a monitor configured differently (differs in: {', '.join(diff)}).")
        self.step_count = int(state["step_count"])
        self._path = float(state["path"])
        tp = state["theta_prev"]
        self._theta_prev = None if tp is None else tp.clone()
        self.generator.set_state(state["generator"])
        self.records = [dict(r) for r in state["records"]]
        if self._csv is not None:
            write_csv(self._csv, self.records, list(dict.fromkeys(k for r in self.records for k in r))
                      if self.records else list(self.columns))
        if self._batch is not None:
            self._batch.clear()
        self._arm()

    def _config(self) -> dict:
        """What a state must agree on (``reduction`` only when not the default, so older states still load;
        ``output=`` is a callable, not serialisable, and is left out)."""
        cfg = {"observables": list(self.observables), "kind": self.kind, "method": self.method,
               "draws": self.draws, "likelihood": repr(self.likelihood)}
        return cfg | ({"reduction": self.reduction} if self.reduction != "mean" else {})

    def close(self) -> None:
        """Remove the hooks of ``batch_fisher_trace`` and close the loggers (those with a ``close()``)."""
        if self._batch is not None:
            self._batch.close()
        for log in self.loggers:
            if callable(getattr(log, "close", None)):
                log.close()

    def __repr__(self):
        every = self._every if isinstance(self._every, int) else getattr(self._every, "__name__", "callable")
        return (f"Monitor(observables={list(self.observables)}, every={every}, kind={self.kind!r}, "
                f"method={self.method!r}, records={len(self.records)})")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_inputs(args: tuple, kwargs: dict):
    """The training forward's inputs as the core takes them: one positional tensor, or keyword tensors only (a
    :class:`~fisherlens._core.Fields`, ``None`` values dropped)."""
    kw = {k: v for k, v in kwargs.items() if v is not None}
    if len(args) == 1 and not kw and isinstance(args[0], Tensor):
        return args[0].detach()
    if not args and kw and all(isinstance(v, Tensor) for v in kw.values()):
        return Fields({k: v.detach() for k, v in kw.items()})
    raise ValueError(
        f"batch_fisher_trace: the model was called with {len(args)} positional argument(s) and keyword arguments "
        f"{sorted(kw)}; the monitor re-runs it as the library does, with one input tensor or with keyword tensors "
        "only (a dict batch). Call it so, or measure 'fisher_trace' on the probe instead.")


def _targets(targets, device):
    """The targets of :meth:`Monitor.step` for the likelihood: a tensor, or a mapping (a whole dict batch may be
    passed) reduced to its ``labels``, ``mask`` and ``attention_mask``."""
    if isinstance(targets, Mapping):
        keys = ("labels", "mask", "attention_mask")
        return {k: torch.as_tensor(targets[k]).to(device) for k in keys if targets.get(k) is not None}
    return torch.as_tensor(targets).to(device)


#: depth of the monitors' own forwards and backwards inside a training step: while it is nonzero no monitor
#: records layer calls, takes a root output or reads gradients (two monitors on one model stay apart)
_INTERNAL = [0]


@contextmanager
def _internal():
    _INTERNAL[0] += 1
    try:
        yield
    finally:
        _INTERNAL[0] -= 1


class _Seen:
    """The gradients of ``tensors`` in the last backward through their graph (``None`` where that backward did not
    reach), kept by one tensor hook each; :attr:`task` is that backward's graph task (``None`` before one ran).
    Backward passes of the library's own (:func:`_internal`) are ignored."""

    def __init__(self, tensors: list[Tensor], at: int):
        self.at, self.task = at, None
        self.grads: list[Tensor | None] = [None] * len(tensors)
        for i, t in enumerate(tensors):
            t.register_hook(functools.partial(self._keep, i))

    def _keep(self, i: int, g: Tensor) -> None:
        if _INTERNAL[0]:  # another monitor's activation-only backward through the same graph
            return
        task = torch._C._current_graph_task_id()
        if task != self.task:  # a new backward: forget what an earlier one through this graph left
            self.task, self.grads = task, [None] * len(self.grads)
        self.grads[i] = g.detach()


class _BatchCapture:
    """``batch_fisher_trace``: the core's :class:`~fisherlens._core.Capture` records the layer calls of the
    caller's training forward; output gradients come from an extra activation-only backward (true Fisher) or
    from the caller's backward (empirical); the core's :func:`~fisherlens._core.layer_stats` reduces them.

    The root hook sees the model's raw output: ``output=`` picks the tensor ``(B, *S)``; the backward runs on
    its flat view ``f (B, M)`` and the likelihood sees the detached structured ``fs (B, *S)``."""

    def __init__(self, mon: Monitor):
        self.mon = mon
        self.busy = False
        self.armed = False
        self.suited = None  # (per-input output shape, dtype) the likelihood was checked against
        modes = [(m, m.training) for m in mon.model.modules()]
        mon.model.eval()
        try:
            fm = mon._fm()
        finally:
            for m, t in modes:
                m.training = t
        plan = plan_for(fm)
        missing = [n for n in fm.names if n not in plan.owned]
        if missing:
            raise ValueError(
                f"batch_fisher_trace needs every selected parameter to be the weight or bias of a layer with a rule "
                f"({ruled_layers()}); not {missing}. Restrict params= or measure 'fisher_trace' on the probe.")
        self.fm, self.plan = fm, plan
        self.owned = dict(plan.owned)
        self.identity = [(which, m, fm.tensors[n]) for n, (which, ms) in self.owned.items() for m in ms]
        #: BatchNorm / Dropout modules: in training mode they make per-sample gradients undefined
        self.mixing = [(n, m) for n, m in mon.model.named_modules()
                       if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]
        self.capture = Capture((m for _, ms in self.owned.values() for m in ms), tap=False, weak=True,
                               when=self._recording)
        self.root = mon.model.register_forward_hook(WeakHook(self._root_hook), with_kwargs=True)
        self.clear()

    def arm(self, flag: bool) -> None:
        self.armed = flag

    def clear(self) -> None:
        self.capture.calls = []
        self.calls, self.fs = [], None
        self.seen: _Seen | None = None  # the caller's backward (empirical)
        self.sq: Tensor | None = None  # (B, T) per input and position (true)
        self.sig = None
        self.captured = False

    def close(self) -> None:
        self.capture.close()
        self.root.remove()

    def _recording(self) -> bool:
        return (self.armed and not self.busy and not self.captured and not _INTERNAL[0] and not library_forward()
                and torch.is_grad_enabled())

    def _root_hook(self, model, args, kwargs, out):
        if not self.armed or self.busy or self.captured or _INTERNAL[0] or library_forward():
            return
        calls, self.capture.calls = self.capture.calls, []
        o = self._pick(out)
        if not o.requires_grad:
            return  # an evaluation forward (no autograd): wait for the training forward
        if any(getattr(m, which) is not t for which, m, t in self.identity):
            return  # a torch.func.functional_call forward (e.g. a library call) with substituted parameters
        amb = self._prove(calls, _batch_inputs(args, kwargs))
        self.captured = True
        f = o.reshape(len(o), -1)
        self.fs = f.detach().reshape(len(o), *(tuple(o.shape[1:]) or (1,)))
        # the outputs suit the likelihood (e.g. C >= 2 for Categorical): a check of shape and dtype, once for each
        if self.suited != (self.fs.shape[1:], self.fs.dtype):
            self.mon.likelihood.kept_rows(self.fs[:1])
            self.suited = (self.fs.shape[1:], self.fs.dtype)
        if amb:
            self._check_separation(amb, f)
        if self.mon.kind == "true":
            self._true(calls, f)
        else:
            self._watch_backward(calls, o)

    def _pick(self, out) -> Tensor:
        """The output tensor of the model's return value (``output=``)."""
        o = out if self.mon.output is None else self.mon.output(out)
        if not isinstance(o, Tensor):
            raise TypeError(f"batch_fisher_trace: the model returned a {type(o).__name__}, not a tensor of outputs; "
                            "pass output= to the Monitor, a callable that picks it (e.g. output=lambda out: "
                            "out.logits, or lambda out: out[0]).")
        if o.dim() == 0:
            raise ValueError("batch_fisher_trace: the model returned a scalar; it must return outputs (B, ...).")
        return o

    def _prove(self, calls: list[Call], X) -> list[Call]:
        """Refuse a training batch whose per-sample attribution the core cannot prove (as in its engine); return
        the owned calls whose input has another axis of the batch's size (checked by :meth:`_check_separation`)."""
        for name, m in self.mixing:
            if m.training and (isinstance(m, nn.modules.batchnorm._BatchNorm) or m.p > 0):
                raise ValueError(f"batch_fisher_trace: module '{name}' ({type(m).__name__}) is in training mode, "
                                 "so per-sample gradients of the batch are not defined; measure on the probe.")
        with _internal():
            self.sig = signature(self.fm, X)
        missing = [n for n in self.owned if n not in self.plan.owned]
        if missing:
            raise ValueError(f"batch_fisher_trace: parameters {missing} are used outside their layers; "
                             "restrict params= or measure 'fisher_trace' on the probe instead.")
        B = len(X)
        problems = call_problems(self.plan, calls, B, self.sig.calls)
        if problems:
            raise ValueError("batch_fisher_trace cannot prove the per-sample attribution of the training batch ("
                             + "; ".join(f"'{n}': {r}" for n, r in problems.items())
                             + "); measure 'fisher_trace' on the probe instead.")
        return [c for c in calls if ambiguous(c, B)]

    def _check_separation(self, amb: list[Call], f: Tensor) -> None:
        """Layers whose input has another axis of size B (e.g. B = T): one activation-only backward of a random
        column ``w`` and of ``c_b w_b`` must scale each output gradient by ``c_b`` along axis 0 (the core's check
        column, :func:`fisherlens._core.checked_grads`); otherwise the batch is refused."""
        gen = torch.Generator(device="cpu").manual_seed(1)
        w = torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)
        c = (torch.rand(len(f), generator=gen, dtype=f.dtype) + 0.5).to(f.device)
        with _internal():
            grads = tap_grads(amb, f, w[..., None], extra=c[:, None] * w, retain_graph=True)
        bad = {n for call, g in zip(amb, grads, strict=True)
               if not close_enough(g[1], c.reshape(-1, *[1] * (g.dim() - 2)) * g[0])
               for n, (_, ms) in self.owned.items() if any(m is call.module for m in ms)}
        if bad:
            raise ValueError(f"batch_fisher_trace: the output gradients of the layers of {sorted(bad)} mix the "
                             "samples along axis 0 (the batch is on another axis); measure 'fisher_trace' on the "
                             "probe instead.")

    def _true(self, calls: list[Call], f: Tensor) -> None:
        """Activation-only backward of columns that each live at one position — exact ``S_t e_c`` (C per
        position), Hutchinson ``ξ_t = S_t ε_t`` (``draws`` per position, ε as :func:`probe_vectors` draws them) —
        in chunks of positions; keeps ``sq (B, T)``: each input's squared factor-row norms per position, summed
        over that position's columns (the kept positions are summed at :meth:`value`)."""
        mon, fs = self.mon, self.fs
        lik, S = mon.likelihood, tuple(fs.shape[1:])
        pos, C = lik.layout(S)
        T, B = math.prod(pos), len(fs)
        hutch = mon.method == "hutchinson"
        xi = probe_vectors(lik, fs, "hutchinson", "rademacher", mon.draws, mon.generator) if hutch else None
        order = None if T == 1 else lik.from_rows_layout(torch.arange(T * C, device=f.device).reshape(1, T, C), S)[0]
        step = 1 if T == 1 else self._positions_per_backward(B, f.shape[1], mon.draws if hutch else C, T)
        parts = []
        for t0 in range(0, T, step):
            ts = None if T == 1 else torch.arange(t0, min(T, t0 + step), device=f.device)
            V = self._columns(xi, order, ts, C, T)
            with _internal():
                grads = tap_grads(calls, f, V, retain_graph=True)
            parts.append(self._sqnorm(calls, grads, V.shape[-1]).reshape(B, 1 if ts is None else len(ts), -1).sum(-1))
        self.sq = parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _columns(self, xi: Tensor | None, order: Tensor | None, ts: Tensor | None, C: int, T: int) -> Tensor:
        """The columns ``(B, M, |ts|·k)`` of positions ``ts`` (position-major); ``order (M,)`` is the row-layout
        index ``t·C + c`` of each flat output (``None`` for one position: ξ itself, or the rows' ``S``)."""
        fs = self.fs
        if T == 1:
            return xi if xi is not None else self.mon.likelihood.fisher_factor(fs.reshape(len(fs), C))
        if xi is not None:
            at = ((order // C)[:, None] == ts[None, :]).to(xi.dtype)  # (M, |ts|)
            return (xi[:, :, None, :] * at[None, :, :, None]).reshape(len(fs), len(order), -1)
        cols = (ts[:, None] * C + torch.arange(C, device=ts.device)).reshape(-1)
        eye = (order[:, None] == cols[None, :]).to(fs.dtype)  # one-hot ε: probe gives S_t e_c at position t
        return self.mon.likelihood.probe(fs, eye.expand(len(fs), -1, -1))

    def _positions_per_backward(self, B: int, M: int, k: int, T: int) -> int:
        """Positions per batched backward (``k`` columns each): per column the core's working set per input — the
        M outputs, the backward's activations, the fast paths' temporaries, the largest rows — times B must fit
        :func:`fisherlens._core.work_budget`."""
        sig, fm = self.sig, self.fm
        rows = max((fm.sizes[n] for n in self.owned if n not in sig.fast), default=0)
        per = fm.itemsize * B * k * (M + sig.act + sig.column + rows)
        return int(max(1, min(T, work_budget() // per)))

    def _watch_backward(self, calls: list[Call], o: Tensor) -> None:
        """Empirical: the δ of the caller's own backward, kept by a gradient hook on each layer's output and on the
        model's output (one plain tensor hook each: torch's multi-gradient hook costs ≈ 0.2 ms per backward)."""
        self.calls = calls
        outs = [c.tap for c in calls]
        at = next((i for i, t in enumerate(outs) if t is o), None)  # the root output is often the last layer's
        self.seen = _Seen(outs if at is not None else [*outs, o], len(outs) if at is None else at)

    def _sqnorm(self, calls: list[Call], grads: list, K: int) -> Tensor:
        """``‖G_nk‖² (B, K)`` summed over the owned parameters from layer inputs and output gradients ``(K, B, …)``,
        by the core's layer rules (ghost norms ``‖δ_n‖²‖a_n‖²`` for a Linear called once, rows otherwise)."""
        grads = [torch.zeros(K, *c.tap.shape, dtype=c.tap.dtype, device=c.tap.device) if g is None else g
                 for g, c in zip(grads, calls, strict=True)]
        stats = Stats()
        layer_stats(self.fm, self.plan, calls, grads, {"sqnorm"}, stats, len(self.fs), K)
        return torch.stack(list(stats.sqnorm.values())).sum(0)

    def value(self, targets, outputs, loss=None, *, required: bool) -> float:
        """The batch trace of the captured step (NaN when none was captured, e.g. for ``record(0)``)."""
        try:
            if not self.captured:
                if required:
                    warnings.warn("batch_fisher_trace: no training forward (with autograd) was captured since the "
                                  "previous step(); recorded NaN. Call step() once per training step, after "
                                  "loss.backward() and optimizer.step(), with consecutive step numbers.",
                                  stacklevel=4)
                if self.mon._shards is not None:  # still joins the all-reduce: its NaN makes the union's NaN
                    return self._normalise(math.nan, 0, 0)
                return math.nan
            if self.mon.kind == "true":
                return self._true_value(targets)
            return self._empirical(targets, outputs, loss)
        finally:
            self.clear()

    def _true_value(self, targets) -> float:
        """``Σ`` of ``sq`` over the kept positions (and over ``draws`` for Hutchinson), normalised."""
        lik, fs, T = self.mon.likelihood, self.fs, self.sq.shape[1]
        k = self.mon.draws if self.mon.method == "hutchinson" else 1
        if targets is None:
            if T > 1:
                raise ValueError(
                    f"batch_fisher_trace with kind='true' on outputs of shape {tuple(fs.shape)} ({T} positions per "
                    "input) needs the batch's targets, which say which positions count: mon.step(..., targets=y) "
                    f"with labels (ignore_index={lik.ignore_index} drops a position), or a dict batch / mapping "
                    "with 'labels', 'mask' or 'attention_mask'.")
            return self._normalise(self.sq.sum().item() / k, len(fs))
        y = _targets(targets, fs.device)
        if T == 1:  # one prediction per input: only ignore_index / a mask can drop it (the cheap per-step path)
            keep = lik.keep(fs, y)[:, 0]
            total, m = torch.stack([torch.where(keep, self.sq[:, 0], 0).sum(), keep.sum().to(self.sq.dtype)]).tolist()
            return self._normalise(total / k, int(m))
        rows = lik.rows(fs, y)  # the kept positions; validates the labels
        return self._normalise(self.sq[rows.which, rows.pos].sum().item() / k, len(rows.which))

    def _normalise(self, total: float, m: int, n: int | None = None) -> float:
        """Per input (``reduction="mean"``) or per kept prediction; NaN (warned) when every position is ignored.
        Under a process group the union of the ranks' training batches: ``total``, ``n`` (default this batch's
        inputs) and ``m`` summed over the ranks by one all-reduce."""
        n = len(self.fs) if n is None else n
        if self.mon._shards is not None:
            total, n, m = self.mon._shards.sum([total, n, m], device=self.fm.device)
            if math.isnan(total):  # a rank captured nothing (warned there)
                return math.nan
        if m == 0:
            warnings.warn("batch_fisher_trace: every position of the training batch is ignored (labels equal to "
                          "ignore_index, or masked out); recorded NaN.", stacklevel=5)
            return math.nan
        return total / (n if self.mon.reduction == "mean" else m)

    def _empirical(self, targets, outputs, loss) -> float:
        lik, fs = self.mon.likelihood, self.fs
        if targets is None:
            raise ValueError("batch_fisher_trace with kind='empirical' needs the batch labels: "
                             "mon.step(..., targets=y).")
        if outputs is not None:
            o = outputs if isinstance(outputs, Tensor) or self.mon.output is None else self.mon.output(outputs)
            if isinstance(o, Tensor) and o.shape[0] != fs.shape[0]:
                raise ValueError("outputs= does not match the captured training forward (different batch size).")
        if self.seen is None or self.seen.grads[self.seen.at] is None:
            raise ValueError("batch_fisher_trace with kind='empirical' reads the gradients of your loss.backward(); "
                             "call mon.step() after loss.backward().")
        y = _targets(targets, fs.device)
        ell = lik.input_loss(fs, y)  # (B,), validates the labels
        m = lik.count(fs, y)
        c = self._loss_scale(ell, y, m, loss)
        grads = [None if g is None else g[None] for g in self.seen.grads[: len(self.calls)]]
        return self._normalise(c**2 * self._sqnorm(self.calls, grads, 1).sum().item(), m)

    def _loss_scale(self, ell: Tensor, y, m: int, loss) -> int:
        """``c`` with the caller's loss ``= Σ_n ℓ_n / c``: B (mean over the inputs), m (mean over the kept
        predictions) or 1 (sum); from the loss value (cheap), else from ``∂loss/∂f`` against the residual."""
        lik, fs = self.mon.likelihood, self.fs
        cands = [c for c in dict.fromkeys((len(fs), m, 1)) if c > 0]
        tol = tolerance(fs.dtype)
        if loss is not None:
            value = float(loss.detach() if isinstance(loss, Tensor) else loss)
            total = ell.sum().item()
            c = next((c for c in cands if math.isclose(value * c, total, rel_tol=tol, abs_tol=1e-12)), None)
            if c is not None:
                return c
        r = lik.residual(fs, y)
        atol = tol * (r.abs().max().item() + 1e-30)
        u = self.seen.grads[self.seen.at].reshape(fs.shape)
        c = next((c for c in cands if torch.allclose(u * c, r, rtol=tol, atol=atol)), None)
        if c is None:
            raise ValueError(
                f"batch_fisher_trace with kind='empirical': ∂loss/∂outputs is not the residual of {lik!r} over the "
                f"batch (its mean over the {len(fs)} inputs, its mean over the {m} kept predictions, or its sum); "
                "the training loss must be the likelihood's loss, e.g. F.cross_entropy(out, y) for fl.Categorical(), "
                "or F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)) (ignore_index=-100) for a language model.")
        return c
