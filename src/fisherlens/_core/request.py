"""The request object: the validated arguments of one Fisher computation and the data passes they drive."""

from __future__ import annotations

import torch

from .checks import ENGINES, REDUCTIONS, check_choice, check_kind, check_positive_int
from .data import iter_batches
from .engine import stream
from .layerwise.plan import check_batch
from .model import FunctionalModel


class Request:
    """Validated arguments shared by every Fisher reduction (keyword-only), and the data passes they drive.

    Attributes:
        fm: the :class:`~.model.FunctionalModel` of ``model`` and ``params``.
        data, likelihood, kind, reduction, samples, generator, batch_size, engine: as given (validated).
        n: inputs seen by the current (last) pass over the data.
    """

    def __init__(self, *, model, data, likelihood, kind: str = "true", params=None, reduction: str = "mean",
                 samples: int = 1, generator: torch.Generator | None = None, batch_size: int | None = None,
                 engine: str = "auto"):
        check_kind(likelihood, kind)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("engine", engine, ENGINES)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        self.fm = FunctionalModel(model, params)
        self.data, self.likelihood, self.kind = data, likelihood, kind
        self.reduction, self.generator = reduction, generator
        self.samples = check_positive_int("samples", samples, what="label draws per input")
        self.batch_size, self.engine = batch_size, engine
        self.n = 0

    def batches(self, check: bool = True):
        """Yield ``(X, Y)`` batches of the data, counting this pass's inputs in :attr:`n`; with ``check``, each
        batch's signature is checked once (:func:`~.layerwise.plan.check_batch`) — callers that only gather the
        data pass False."""
        self.n = 0
        for X, Y in iter_batches(self.data, self.fm, need_y=self.kind == "empirical", batch_size=self.batch_size):
            if check:
                check_batch(self.fm, X)
            self.n += len(X)
            yield X, Y

    def v(self, f, y):
        """The kind's sandwich ``V (B, C, K)`` (:meth:`fisherlens.Likelihood.sandwich`)."""
        return self.likelihood.sandwich(f, self.kind, y, self.samples, self.generator)

    def columns(self, C: int) -> int:
        """K, the sandwich's columns per input, for a model with C outputs."""
        return {"mc": self.samples, "empirical": 1}.get(self.kind, C)

    def chunks(self, want: set[str], make_v=None, columns=None):
        """Yield ``(f, V, stats)`` per chunk of the data (:func:`~.engine.stream`); ``make_v``/``columns``
        replace the kind's sandwich and its column count.  Counts this pass's inputs in :attr:`n`."""
        self.n = 0
        for n, f, V, st in stream(self.fm, self.data, make_v or self.v, want, need_y=self.kind == "empirical",
                                  columns=columns or self.columns, batch_size=self.batch_size, engine=self.engine):
            self.n += n
            yield f, V, st

    def scale(self, n: int | None = None) -> float:
        """The one scale rule: ``1/N`` for ``reduction="mean"`` (N = ``n``, default the last pass's :attr:`n`),
        1 for ``"sum"``."""
        return 1.0 / (self.n if n is None else n) if self.reduction == "mean" else 1.0
