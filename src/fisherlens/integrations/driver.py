"""What the training-framework callbacks share: build a :class:`fisherlens.Monitor` on the framework's model when
training starts, feed it the optimiser steps, hand its records (prefixed) to the framework's logging, and carry
its state through the framework's checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..monitor import Monitor

__all__ = ["MonitorDriver", "resolve_module"]


def resolve_module(root: nn.Module, module: str | Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    """The network the Fisher is taken of: ``root`` itself (``None``), its submodule named ``module`` (a dotted
    name, ``"net"`` or ``"model.encoder"``), or ``module(root)``.

    Raises:
        ValueError: no submodule of that name; TypeError: the result is not an ``nn.Module``.
    """
    if module is None:
        net = root
    elif isinstance(module, str):
        try:
            net = root.get_submodule(module)
        except AttributeError as e:
            names = [n for n, _ in root.named_children()]
            raise ValueError(f"module={module!r}: the trained model has no such submodule (children: {names}).") from e
    elif callable(module):
        net = module(root)
    else:
        raise TypeError(f"module must be None, a submodule name or a callable, got {type(module).__name__}.")
    if not isinstance(net, nn.Module):
        raise TypeError(f"module= must give a torch.nn.Module, got {type(net).__name__}.")
    return net


class MonitorDriver:
    """One :class:`fisherlens.Monitor` driven by a framework's events.

    Args:
        likelihood, probe: as for :class:`fisherlens.Monitor`.
        module: which network to monitor (see :func:`resolve_module`).
        prefix: prepended to every column name handed to the framework's loggers.
        record_start: record once when training starts (step = the framework's step counter then).
        monitor_options: every other :class:`fisherlens.Monitor` option (``observables``, ``every``, ``kind``,
            ``method``, ``run``, ``tensorboard``, ``loggers``, ``output``, ...).
    """

    def __init__(self, likelihood, probe, *, module=None, prefix: str = "fisher/", record_start: bool = True,
                 monitor_options: Mapping[str, Any]):
        if "model" in monitor_options:
            raise TypeError("the callback monitors the trainer's model; choose a part of it with module=, not model=.")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}.")
        self.likelihood, self.probe, self.module = likelihood, probe, module
        self.prefix, self.record_start = prefix, bool(record_start)
        self.options = dict(monitor_options)
        self.monitor: Monitor | None = None
        self._pending_state: dict | None = None
        self._last_step: int | None = None

    def start(self, root: nn.Module, step: int) -> dict | None:
        """Build the monitor on ``root`` (once), restore a pending checkpoint state, and record the start."""
        if self.monitor is None:
            self.monitor = Monitor(resolve_module(root, self.module), self.likelihood, self.probe, **self.options)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None
            self._last_step = self.monitor.step_count
            return None
        self._last_step = step
        if self.record_start and not any(r["step"] == step for r in self.monitor.records):
            return self.monitor.record(step)
        return None

    def step(self, step: int, **kw) -> dict | None:
        """Feed optimiser step ``step`` (ignored when the counter has not moved, e.g. during gradient
        accumulation); the record when it was scheduled."""
        if self.monitor is None:
            raise RuntimeError("the Fisher callback saw a training step before training started.")
        if step == self._last_step:
            return None
        self._last_step = step
        return self.monitor.step(step, **kw)

    def prefixed(self, record: Mapping[str, float]) -> dict[str, float]:
        """The record's values (not ``step``) under the prefixed names."""
        return {self.prefix + k: float(v) for k, v in record.items() if k != "step"}

    def state_dict(self) -> dict:
        """The monitor's :meth:`~fisherlens.Monitor.state_dict` (empty before training started)."""
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore now, or when the monitor is built (frameworks restore callbacks before training starts)."""
        if not state:
            return
        if "monitor" not in state:
            raise ValueError("Not a fisherlens callback state (no 'monitor' key).")
        if self.monitor is None:
            self._pending_state = dict(state["monitor"])
        else:
            self.monitor.load_state_dict(dict(state["monitor"]))
            self._last_step = self.monitor.step_count

    def close(self) -> None:
        """Remove the monitor's hooks and close its loggers."""
        if self.monitor is not None:
            self.monitor.close()
