"""``FisherCallback``: :class:`fisherlens.Monitor` inside a PyTorch Lightning ``Trainer``.

::

    from fisherlens.integrations.lightning import FisherCallback

    cb = FisherCallback(fl.Categorical(), (X_probe, y_probe), every=50,
                        observables=("loss", "fisher_trace", "batch_fisher_trace"))
    lightning.pytorch.Trainer(callbacks=[cb], ...).fit(module, loader)
    cb.monitor.records                       # also sent to every logger of the trainer, as "fisher/<column>"

The monitor is built on the ``LightningModule`` (or its submodule ``module=``) when fitting starts, records the
start (step 0), and then counts optimiser steps (``trainer.global_step``; with gradient accumulation one step
per optimiser step).  ``batch_fisher_trace`` gets the training batch's loss (``outputs["loss"]``) and targets
(the second element of an ``(x, y)`` batch, a dict batch itself, or ``targets=batch -> targets``).  Every record
goes to ``trainer.loggers`` (``log_metrics(values, step)``: TensorBoard, CSV, W&B, MLflow, ...) besides the
monitor's own ``run=`` / ``tensorboard=`` / ``loggers=``.  The callback's state (the monitor's
:meth:`~fisherlens.Monitor.state_dict`) is saved in Lightning checkpoints and restored by
``trainer.fit(..., ckpt_path=...)``, so a resumed run records as an unbroken one.

Importing this module needs ``lightning`` (``pip install lightning``; ``pytorch_lightning`` also works).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from .driver import MonitorDriver

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("fisherlens.integrations.lightning needs PyTorch Lightning: pip install lightning") from e

__all__ = ["FisherCallback", "batch_targets"]


def batch_targets(batch) -> Any:
    """The targets of a training batch: ``y`` of ``(x, y, ...)``, a dict batch itself (its ``labels`` /
    ``mask`` / ``attention_mask`` are what the monitor reads), else ``None``."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, Sequence) and not isinstance(batch, (str, Tensor)) and len(batch) >= 2:
        return batch[1]
    return None


class FisherCallback(Callback):
    """Record Fisher observables of the model a Lightning ``Trainer`` fits.

    Args:
        likelihood, probe: the output model and probe data of :class:`fisherlens.Monitor`.
        module: the network to monitor: ``None`` (the ``LightningModule``), a submodule name (``"net"``) or a
            callable ``pl_module -> nn.Module``.  Its forward must be the one ``training_step`` calls for
            ``batch_fisher_trace``.
        targets: ``batch -> targets`` for ``batch_fisher_trace`` (default :func:`batch_targets`).
        prefix: prepended to the column names sent to the trainer's loggers (default ``"fisher/"``).
        record_start: record once before the first step.
        **monitor_options: every other option of :class:`fisherlens.Monitor` (``observables``, ``every``,
            ``kind``, ``method``, ``draws``, ``run``, ``tensorboard``, ``loggers``, ``output``, ...).

    Attributes:
        monitor: the :class:`fisherlens.Monitor` (``None`` before fitting starts).
    """

    def __init__(self, likelihood, probe, *, module: str | Callable | None = None,
                 targets: Callable[[Any], Any] = batch_targets, prefix: str = "fisher/", record_start: bool = True,
                 **monitor_options):
        super().__init__()
        if not callable(targets):
            raise TypeError(f"targets must be a callable batch -> targets, got {type(targets).__name__}.")
        self.driver = MonitorDriver(likelihood, probe, module=module, prefix=prefix, record_start=record_start,
                                    monitor_options=monitor_options)
        self.targets = targets

    @property
    def monitor(self):
        return self.driver.monitor

    def _log(self, trainer, rec: dict | None) -> None:
        if rec is None:
            return
        values = self.driver.prefixed(rec)
        for lg in trainer.loggers:
            lg.log_metrics(values, step=rec["step"])

    def on_fit_start(self, trainer, pl_module) -> None:
        self._log(trainer, self.driver.start(pl_module, trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        loss = loss if isinstance(loss, Tensor) else None
        self._log(trainer, self.driver.step(trainer.global_step, loss=loss, targets=self.targets(batch)))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.driver.close()

    def state_dict(self) -> dict:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.driver.load_state_dict(state_dict)
