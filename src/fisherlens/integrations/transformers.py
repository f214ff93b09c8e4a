"""``FisherCallback``: :class:`fisherlens.Monitor` inside a Hugging Face ``transformers.Trainer``.

::

    from fisherlens.integrations.transformers import FisherCallback

    cb = FisherCallback(fl.Categorical(), probe_batches, every=50, observables=("loss", "fisher_trace"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    cb.monitor.records        # also in trainer.state.log_history and every report_to integration, "fisher/<column>"

The probe is a list of dict batches (``{"input_ids", "attention_mask", "labels"}``) or ``(X, Y)`` tensors; the
model's ``ModelOutput`` is read through ``output=`` (default :func:`logits`).  The monitor is built on the
trainer's model when training starts, records the start, then counts optimiser steps (``state.global_step``).
The start record goes to ``trainer.state.log_history`` only.  On a recorded step the callback asks the trainer
to log (``control.should_log``) and adds its values to that log entry: to ``trainer.state.log_history`` and — for
the ``report_to`` integrations (TensorBoard, W&B, MLflow, ...) registered *after* it — to what they receive.  The
trainer puts its own integrations first, so :meth:`FisherCallback.attach` moves the callback to the front.

``batch_fisher_trace`` is not available here: the ``Trainer`` hands callbacks neither the training batch nor its
loss; record ``fisher_trace`` on the probe (the Hutchinson estimate costs one backward per draw) or use the
Lightning callback or a plain loop.  Importing this module needs ``transformers``; the ``Trainer`` itself also
needs ``accelerate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .driver import MonitorDriver

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("fisherlens.integrations.transformers needs Hugging Face transformers: "
                      "pip install transformers accelerate") from e

__all__ = ["FisherCallback", "logits"]


def logits(out) -> Any:
    """The ``logits`` of a ``transformers`` ``ModelOutput`` (anything else as it is)."""
    return getattr(out, "logits", out)


class FisherCallback(TrainerCallback):
    """Record Fisher observables of the model a ``transformers.Trainer`` trains.

    Args:
        likelihood, probe: the output model and probe data of :class:`fisherlens.Monitor`.
        module: the network to monitor: ``None`` (the trainer's model), a submodule name or a callable.
        output: picks the output tensor from what the model returns (default :func:`logits`).
        prefix: prepended to the column names logged (default ``"fisher/"``).
        record_start: record once before the first step.
        **monitor_options: every other option of :class:`fisherlens.Monitor` except ``batch_fisher_trace``
            among the observables (``observables``, ``every``, ``kind``, ``method``, ``run``, ``loggers``, ...).

    Attributes:
        monitor: the :class:`fisherlens.Monitor` (``None`` before training starts).
    """

    def __init__(self, likelihood, probe, *, module: str | Callable | None = None, output: Callable = logits,
                 prefix: str = "fisher/", record_start: bool = True, **monitor_options):
        obs = monitor_options.get("observables", ())
        if "batch_fisher_trace" in ((obs,) if isinstance(obs, str) else tuple(obs)):
            raise ValueError("batch_fisher_trace needs the training batch's targets and loss, which the transformers "
                             "Trainer does not pass to callbacks; record 'fisher_trace' on the probe instead.")
        self.driver = MonitorDriver(likelihood, probe, module=module, prefix=prefix, record_start=record_start,
                                    monitor_options={"output": output, **monitor_options})
        self._pending: dict[str, float] = {}

    @property
    def monitor(self):
        return self.driver.monitor

    def attach(self, trainer) -> FisherCallback:
        """Register this callback first in ``trainer`` (before its ``report_to`` integrations, so that they
        receive the Fisher values too); returns ``self``."""
        handler = trainer.callback_handler
        handler.callbacks[:] = [self, *(c for c in handler.callbacks if c is not self)]
        return self

    def _keep(self, rec: dict | None, control) -> None:
        if rec is not None:
            self._pending.update(self.driver.prefixed(rec))
            control.should_log = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        rec = self.driver.start(model, state.global_step)
        if rec is not None:  # no log call comes before the first step: into the history at its own step
            state.log_history.append({**self.driver.prefixed(rec), "step": rec["step"]})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._keep(self.driver.step(state.global_step), control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return
        if logs is not None:
            logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)  # the trainer appended a copy of logs before on_log
        else:
            state.log_history.append({**self._pending, "step": state.global_step})
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending:  # a record with no log call after it (the last step)
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending = {}
        self.driver.close()
