"""Where :class:`fisherlens.Monitor` sends its records besides ``mon.records`` and ``metrics.csv``.

A logger is any callable ``log(values, step)``: ``values`` maps column names to floats (every column of the
record but ``step``), ``step`` is the record's training step.  If it also has a ``close()`` method,
:meth:`fisherlens.Monitor.close` calls it.  That is the whole protocol, so the usual trackers plug in with one
line::

    fl.Monitor(..., loggers=[lambda values, step: wandb.log(values, step=step)])         # Weights & Biases
    fl.Monitor(..., loggers=[lambda values, step: mlflow.log_metrics(values, step=step)])  # MLflow
    fl.Monitor(..., loggers=[TensorBoardLogger("runs/tb")])                                # TensorBoard
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

__all__ = ["Logger", "TensorBoardLogger", "check_loggers"]


@runtime_checkable
class Logger(Protocol):
    """``log(values, step)``: receive one record (column → float) at a training step."""

    def __call__(self, values: dict[str, float], step: int) -> None: ...


class TensorBoardLogger:
    """Each record's values as TensorBoard scalars (tag = column name) at the record's step.

    Args:
        log_dir: the folder of the event files (``torch.utils.tensorboard.SummaryWriter(log_dir)``).
        prefix: prepended to every tag, e.g. ``"fisher/"`` to group the monitor's scalars.

    Raises:
        ImportError: ``torch.utils.tensorboard`` is not importable (install ``tensorboard``).
    """

    def __init__(self, log_dir: str | os.PathLike, prefix: str = ""):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch.utils.tensorboard imports the tensorboard package
            raise ImportError("TensorBoard logging needs the 'tensorboard' package: pip install tensorboard") from e
        self.prefix = prefix
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(self.prefix + k, v, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def check_loggers(loggers) -> list:
    """``loggers`` as a list of callables (``None`` → empty); ``TypeError`` naming the first that is not one."""
    if loggers is None:
        return []
    if callable(loggers):
        loggers = [loggers]
    out = list(loggers)
    for i, lg in enumerate(out):
        if not callable(lg):
            raise TypeError(f"loggers[{i}] must be a callable log(values: dict, step: int), got "
                            f"{type(lg).__name__}.")
    return out
