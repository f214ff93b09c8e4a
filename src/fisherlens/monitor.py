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

Observables (columns of a record; every record also has ``step``). All probe quantities are **means over the probe
inputs** (docs/conventions.md#fisher-information), measured on the parameters *after* the optimiser step, with the
model in eval mode. Costs are per record, in units of one forward+backward pass over the probe (N inputs, C
outputs):


==========================  ====================================================================  ==============
observable                  value (library function it comes from)                                cost
==========================  ====================================================================  ==============
``loss``, ``accuracy``      probe mean of ``likelihood.loss``; accuracy by argmax (Categorical,    1 forward
                            class labels) or ``f > 0`` (Bernoulli)
``grad_norm``               ``‖∇_θ (1/N) Σ ℓ_n‖`` (one ``torch.func.vjp`` per batch)              1 fwd+bwd
``fisher_trace``            :func:`fisherlens.fisher_trace` (``kind``, ``method``, ``draws``)       exact: ~K bwd
                                                                                                  (K = C true,
                                                                                                  1 empirical);
                                                                                                  hutchinson: 1
``ntk_trace``               :func:`fisherlens.ntk_trace`, ``(1/N) tr Θ``                           ~C bwd
``relation``                :func:`fisherlens.fisher_ntk_trace`: columns ``fisher_trace``,          ~C+K bwd
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

``batch_fisher_trace`` (the cheap per-step observable).  Forward hooks on the ``nn.Linear``/``Conv1d``/``Conv2d``
layers record each layer's input ``a_n`` during the caller's training forward (only when the coming step is
scheduled).  Per-sample gradient norms then follow from layer-output gradients ``δ_n`` alone — for a Linear
layer ``‖a_n‖²‖δ_n‖²`` ("ghost norms", the reduction of :mod:`fisherlens._core`'s layerwise engine), for other
layers the per-sample rows of that engine:

* ``kind="empirical"``: **exact** ``tr F_emp = (1/B) Σ_n ‖∇ℓ_n‖²``, and free: the ``δ_n`` are captured by tensor
  hooks during the caller's ``loss.backward()``.  The training loss must be the mean (or the sum) of
  ``likelihood.loss`` over the batch; pass ``targets=`` (and ``loss=``) to :meth:`Monitor.step`.  Checked: the
  value of ``loss=`` must be that mean or sum at the captured outputs (cheap); without ``loss=``, or if the value
  differs (e.g. a regulariser was added), ``∂loss/∂f`` captured in the backward must be the likelihood's residual.
* ``kind="true"``: right after the training forward one extra backward **to the layer outputs only** (no
  weight gradients) of ``Σ_n ξ_nᵀ f_n`` with ``ξ_n = S_n ε_n`` from the detached outputs, batched over the
  ``draws`` columns; ``method="hutchinson"`` (Rademacher ε, unbiased, the per-sample estimator of
  :mod:`fisherlens.estimators`) or ``method="exact"`` (``ξ = S_n``, C columns).

The monitor captures the first forward with autograd enabled after the previous :meth:`Monitor.step` (only
when the coming step is scheduled; forwards under ``torch.no_grad`` and ``torch.func.functional_call``
forwards — every library call — are ignored), so call ``step()`` once per training step with consecutive step
numbers; with gradient accumulation the trace is that of the first micro-batch.  A step with nothing captured
records NaN (with a warning).  BatchNorm or Dropout in training mode is refused (per-sample gradients are
undefined there).

Records go to ``mon.records``, to ``<run>/metrics.csv`` (one row appended atomically per record,
:func:`fisherlens.runs.append_csv_row`) and, when ``torch.utils.tensorboard`` is importable, to TensorBoard.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ._core import (
    Call,
    Capture,
    FunctionalModel,
    Stats,
    WeakHook,
    ambiguous,
    call_problems,
    check_choice,
    check_kind,
    iter_batches,
    layer_stats,
    model_errors,
    plan_for,
    quadratic_sum,
    signature,
    tap_grads,
    vjp_checked,
)
from .estimators import probe_vectors
from .fisher import fisher_rao_norm, fisher_trace
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
        model: the ``torch.nn.Module`` being trained (outputs ``(B, C)``; 1-D output: C = 1).
        likelihood: ``fl.Categorical()``, ``fl.Gaussian(sigma)``, ``fl.Bernoulli()`` or ``fl.LossInduced(loss)``
            (the latter only with ``kind="empirical"``).
        probe: the probe data, ``(X, Y)`` tensors or any *re-iterable* of ``(x, y)`` batches (a DataLoader);
            read again at every record.  ``Y`` may be ``None`` when no observable needs labels.
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
        tensorboard: a log folder for ``torch.utils.tensorboard`` (ignored, with a warning, if not installed).
        batch_size: chunk size of tensor probes (default 256, as the library).

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
        tensorboard: str | os.PathLike | None = None, batch_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_choice("kind", kind, KINDS)
        check_kind(likelihood, kind)
        check_choice("method", method, METHODS)
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
        self.batch_size = batch_size
        with self._measuring():
            self._fm()  # validates params= now, not at the first record
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
        self._tb = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard= was given but torch.utils.tensorboard is not importable (install "
                              "the 'tensorboard' package); records go to the run folder only.", stacklevel=2)
            else:
                self._tb = SummaryWriter(log_dir=str(tensorboard))
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
        column ``batch_loss``; ``targets`` (and optionally ``outputs``) of the training batch are needed by
        ``batch_fisher_trace`` with ``kind="empirical"``.  Scalar ``**extra`` values become extra columns.

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
        rec: dict = {"step": step}
        if self._batch is not None:
            rec["batch_fisher_trace"] = self._batch.value(targets, outputs, loss, required=from_step)
        if self._probe_obs:
            with self._measuring():
                rec.update(self._measure())
        rec = {c: rec[c] for c in self.columns} | {k: float(v) for k, v in extra.items()}
        self.records.append(rec)
        if self._csv is not None:
            append_csv_row(self._csv, rec)
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
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
        return FunctionalModel(self.model, self.params)

    def _measure(self) -> dict:
        obs, lik, kind, probe = self.observables, self.likelihood, self.kind, self.probe
        common = {"params": self.params, "batch_size": self.batch_size}
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
                                                     generator=self.generator, **common))
        if "ntk_trace" in obs and "ntk_trace" not in out:
            out["ntk_trace"] = ntk_trace(self.model, probe, reduction="mean", **common)
        if "top_eigenvalue" in obs:
            out["top_eigenvalue"] = float(eigenvalues(self.model, probe, lik, k=1, method="lanczos", kind=kind,
                                                      **common)[0])
        if "rao_norm" in obs:
            out["rao_norm"] = fisher_rao_norm(self.model, probe, lik, kind, **common)
        if "path_length" in obs:
            out["path_length"] = self._path_step()
        return out

    def _loss_pass(self) -> dict:
        """Probe mean loss, accuracy and ``‖∇L‖``: one forward per batch (plus one pull-back for the gradient)."""
        fm, lik = self._fm(), self.likelihood
        want_grad = "grad_norm" in self.observables
        loss = correct = 0.0
        n = 0
        grad = None
        for X, Y in iter_batches(self.probe, fm, need_y=True, batch_size=self.batch_size):
            if want_grad:
                f, pull = vjp_checked(fm, X)
            else:
                with torch.no_grad(), model_errors(X):
                    f = fm(fm.params, X)
            f = f.detach()
            y = lik.check_targets(f, Y)
            loss += lik.loss(f, y).sum().item()
            if "accuracy" in self.observables:
                correct += self._correct(f, y)
            if want_grad:
                g = fm.flatten(pull(lik.residual(f, y))[0])
                grad = g if grad is None else grad + g
            n += len(X)
        out = {"loss": loss / n, "accuracy": correct / n}
        if want_grad:
            out["grad_norm"] = (grad / n).norm().item()
        return out

    def _correct(self, f: Tensor, y: Tensor) -> float:
        lik = self.likelihood
        if isinstance(lik, Bernoulli) or f.shape[-1] == 1:
            if isinstance(lik, LossInduced):
                raise ValueError("accuracy with one output is defined for fl.Bernoulli only.")
            return ((f[:, 0] > 0) == (y.reshape(-1) > 0.5)).sum().item()
        if y.dim() == 2 and y.shape == f.shape and torch.is_floating_point(y):
            y = y.argmax(-1)
        elif torch.is_floating_point(y) or y.dim() != 1:
            raise ValueError(f"accuracy needs class labels (B,) for {lik!r}; the probe labels have shape "
                             f"{tuple(y.shape)} and dtype {y.dtype}.")
        if not isinstance(lik, (Categorical, LossInduced)):
            raise ValueError(f"accuracy is not defined for {lik!r}.")
        return (f.argmax(-1) == y).sum().item()

    def _path_step(self) -> float:
        """Add ``sqrt(Δθᵀ F(θ_prev) Δθ)`` (one jvp per probe batch at the previous θ) to the path length."""
        fm = self._fm()
        theta = fm.flatten(fm.params).detach().clone()
        if self._theta_prev is not None:
            if self._theta_prev.shape != theta.shape:
                raise ValueError("path_length: the number of selected parameters changed between records.")
            old = fm.unflatten(self._theta_prev.to(theta))
            delta = fm.unflatten(theta - self._theta_prev.to(theta))
            batches = iter_batches(self.probe, fm, need_y=self.kind == "empirical", batch_size=self.batch_size)
            q, n = quadratic_sum(fm, batches, lambda f, y: self.likelihood.sandwich(f, self.kind, y), delta, at=old)
            self._path += math.sqrt(max(q / n, 0.0))
        self._theta_prev = theta
        return self._path

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: plain Python values and tensors (``torch.load(weights_only=True)``)."""
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
            diff = sorted(k for k in self._config() if state["config"].get(k) != self._config()[k])
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
        return {"observables": list(self.observables), "kind": self.kind, "method": self.method,
                "draws": self.draws, "likelihood": repr(self.likelihood)}

    def close(self) -> None:
        """Remove the hooks of ``batch_fisher_trace`` and close the TensorBoard writer."""
        if self._batch is not None:
            self._batch.close()
        if self._tb is not None:
            self._tb.close()

    def __repr__(self):
        every = self._every if isinstance(self._every, int) else getattr(self._every, "__name__", "callable")
        return (f"Monitor(observables={list(self.observables)}, every={every}, kind={self.kind!r}, "
                f"method={self.method!r}, records={len(self.records)})")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _probe_xi(lik, f: Tensor, draws: int, generator) -> Tensor:
    """Hutchinson vectors ``ξ = S ε (B, C, draws)``, Rademacher ε drawn exactly as
    :func:`fisherlens.estimators.probe_vectors` draws them (same generator calls, same values up to rounding).

    For ``fl.Categorical`` without the ``(B, C, C)`` matrix: ``S ε = √π ⊙ ε − π (√π · ε)``."""
    if type(lik) is not Categorical:
        return probe_vectors(lik, f, "hutchinson", "rademacher", draws, generator)
    lik.check_outputs(f)
    eps = torch.randint(0, 2, (f.shape[0], f.shape[1], draws), generator=generator, device=f.device).to(f.dtype) * 2 - 1
    p = torch.softmax(f, dim=-1)[..., None]
    se = p.sqrt() * eps
    return se - p * se.sum(1, keepdim=True)


class _BatchCapture:
    """``batch_fisher_trace``: the core's :class:`~fisherlens._core.Capture` records the layer calls of the
    caller's training forward; output gradients come from an extra activation-only backward (true Fisher) or
    from the caller's backward (empirical); the core's :func:`~fisherlens._core.layer_stats` reduces them."""

    def __init__(self, mon: Monitor):
        self.mon = mon
        self.busy = False
        self.armed = False
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
                f"batch_fisher_trace needs every selected parameter to be the weight or bias of an nn.Linear/"
                f"Conv1d/Conv2d layer; not {missing}. Restrict params= or measure 'fisher_trace' on the probe.")
        self.fm, self.plan = fm, plan
        self.owned = dict(plan.owned)
        self.identity = [(which, m, fm.tensors[n]) for n, (which, ms) in self.owned.items() for m in ms]
        #: BatchNorm / Dropout modules: in training mode they make per-sample gradients undefined
        self.mixing = [(n, m) for n, m in mon.model.named_modules()
                       if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]
        self.capture = Capture((m for _, ms in self.owned.values() for m in ms), tap=False, weak=True,
                               when=self._recording)
        self.root = mon.model.register_forward_hook(WeakHook(self._root_hook))
        self.clear()

    def arm(self, flag: bool) -> None:
        self.armed = flag

    def clear(self) -> None:
        self.capture.calls = []
        self.calls, self.grads, self.f, self.u = [], None, None, None
        self.value_true: float | None = None
        self.captured = False

    def close(self) -> None:
        self.capture.close()
        self.root.remove()

    def _recording(self) -> bool:
        return self.armed and not self.busy and not self.captured and torch.is_grad_enabled()

    def _root_hook(self, model, inputs, out):
        if not self.armed or self.busy or self.captured:
            return
        calls, self.capture.calls = self.capture.calls, []
        if not isinstance(out, Tensor) or not out.requires_grad:
            return  # an evaluation forward (no autograd): wait for the training forward
        if any(getattr(m, which) is not t for which, m, t in self.identity):
            return  # a torch.func.functional_call forward (e.g. a library call) with substituted parameters
        self._prove(calls, inputs[0].detach())
        self.captured = True
        f = out[:, None] if out.dim() == 1 else out
        self.mon.likelihood.check_outputs(f.detach())
        if self.mon.kind == "true":
            self._true(calls, f)
        else:
            self._watch_backward(calls, f, out)

    def _prove(self, calls: list[Call], X: Tensor) -> None:
        """Refuse a training batch whose per-sample attribution the core cannot prove (as in its engine)."""
        for name, m in self.mixing:
            if m.training and (isinstance(m, nn.modules.batchnorm._BatchNorm) or m.p > 0):
                raise ValueError(f"batch_fisher_trace: module '{name}' ({type(m).__name__}) is in training mode, "
                                 "so per-sample gradients of the batch are not defined; measure on the probe.")
        self.busy = True
        try:
            sig = signature(self.fm, X)
        finally:
            self.busy = False
        missing = [n for n in self.owned if n not in self.plan.owned]
        if missing:
            raise ValueError(f"batch_fisher_trace: parameters {missing} are used outside their layers; "
                             "measure 'fisher_trace' on the probe instead.")
        problems = call_problems(self.plan, calls, len(X), sig.calls)
        problems.update({n: "its layer's input has another axis of the batch's size" for n, (_, ms) in
                         self.owned.items() for c in calls if c.module in ms and ambiguous(c, len(X))})
        if problems:
            raise ValueError("batch_fisher_trace cannot prove the per-sample attribution of the training batch ("
                             + "; ".join(f"'{n}': {r}" for n, r in problems.items())
                             + "); measure 'fisher_trace' on the probe instead.")

    def _true(self, calls: list[Call], f: Tensor) -> None:
        """One backward to the layer outputs of the columns ``ξ = S ε`` (Hutchinson) or ``S`` (exact)."""
        mon, fd = self.mon, f.detach()
        hutch = mon.method == "hutchinson"
        V = _probe_xi(mon.likelihood, fd, mon.draws, mon.generator) if hutch else mon.likelihood.sqrt_fisher(fd)
        K = V.shape[-1]
        grads = tap_grads(calls, f, V, retain_graph=True)
        self.value_true = self._sqnorm(calls, grads, K) / (len(fd) * (K if hutch else 1))

    def _watch_backward(self, calls: list[Call], f: Tensor, out: Tensor) -> None:
        """Empirical: the δ of the caller's own backward, captured by one multi-tensor gradient hook."""
        self.calls, self.f = calls, f.detach()
        outs = [c.tap for c in calls]
        at = next((i for i, o in enumerate(outs) if o is out), None)  # the root output is often the last layer's
        tensors = outs if at is not None else [*outs, out]
        at = len(outs) if at is None else at
        shape, n = f.shape, len(outs)

        def on_grads(gs, n=n, at=at, shape=shape):
            self.grads = [None if g is None else g.detach()[None] for g in gs[:n]]
            self.u = None if gs[at] is None else gs[at].detach().reshape(shape)

        torch.autograd.graph.register_multi_grad_hook(tensors, on_grads)

    def _sqnorm(self, calls: list[Call], grads: list, K: int) -> float:
        """``Σ_{n,k} ‖G_nk‖²`` over the owned parameters from layer inputs and output gradients ``(K, B, …)``, by
        the core's layer rules (ghost norms ``‖δ_n‖²‖a_n‖²`` for a Linear called once, rows otherwise)."""
        grads = [torch.zeros(K, *c.tap.shape, dtype=c.tap.dtype, device=c.tap.device) if g is None else g
                 for g, c in zip(grads, calls, strict=True)]
        B = calls[0].a.shape[0] if calls else 0
        stats = Stats()
        layer_stats(self.fm, self.plan, calls, grads, {"sqnorm"}, stats, B, K)
        return math.fsum(s.sum().item() for s in stats.sqnorm.values())

    def value(self, targets, outputs, loss=None, *, required: bool) -> float:
        """The batch trace of the captured step (NaN when none was captured, e.g. for ``record(0)``)."""
        try:
            if not self.captured:
                if required:
                    warnings.warn("batch_fisher_trace: no training forward (with autograd) was captured since the "
                                  "previous step(); recorded NaN. Call step() once per training step, after "
                                  "loss.backward() and optimizer.step(), with consecutive step numbers.",
                                  stacklevel=4)
                return math.nan
            if self.mon.kind == "true":
                return float(self.value_true)
            return self._empirical(targets, outputs, loss)
        finally:
            self.clear()

    def _empirical(self, targets, outputs, loss) -> float:
        lik, f = self.mon.likelihood, self.f
        if targets is None:
            raise ValueError("batch_fisher_trace with kind='empirical' needs the batch labels: "
                             "mon.step(..., targets=y).")
        if outputs is not None and isinstance(outputs, Tensor) and outputs.shape[0] != f.shape[0]:
            raise ValueError("outputs= does not match the captured training forward (different batch size).")
        if self.u is None or self.grads is None:
            raise ValueError("batch_fisher_trace with kind='empirical' reads the gradients of your loss.backward(); "
                             "call mon.step() after loss.backward().")
        y = lik.check_targets(f, torch.as_tensor(targets).to(f.device))
        B = len(f)
        tol = 1e-9 if f.dtype == torch.float64 else 1e-4
        scale = None
        if loss is not None:  # cheap: the loss value is the mean (or the sum) of the likelihood's loss
            value = float(loss.detach() if isinstance(loss, Tensor) else loss)
            total = lik.loss(f, y).sum().item()
            scale = next((c for c in (B, 1) if math.isclose(value * c, total, rel_tol=tol, abs_tol=1e-12)), None)
        if scale is None:  # otherwise (or a foreign loss value): ∂loss/∂f against the residual
            r = lik.residual(f, y)
            atol = tol * (r.abs().max().item() + 1e-30)
            scale = next((c for c in (B, 1) if torch.allclose(self.u * c, r, rtol=tol, atol=atol)), None)
        if scale is None:
            raise ValueError("batch_fisher_trace with kind='empirical': ∂loss/∂outputs is not the residual of "
                             f"{lik!r} (mean or sum over the batch); the training loss must be the likelihood's "
                             "loss, e.g. F.cross_entropy(out, y) for fl.Categorical().")
        return scale**2 * self._sqnorm(self.calls, self.grads, 1) / B
