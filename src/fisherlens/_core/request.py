"""The request object: the validated arguments of one Fisher computation and the data passes they drive."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .checks import ENGINES, REDUCTIONS, check_choice, check_kind, check_positive_int, deferred_outputs
from .data import iter_batches
from .distributed import rank_generator, shards_for
from .engine import stream
from .layerwise.plan import check_batch
from .model import FunctionalModel
from .stats import DiagSum


class Request:
    """Validated arguments shared by every Fisher reduction (keyword-only), and the data passes they drive.

    Attributes:
        fm: the :class:`~.model.FunctionalModel` of ``model``, ``params`` and ``output``.
        data, likelihood, kind, reduction, samples, batch_size, engine: as given (validated).
        generator: as given; under a process group a per-rank generator derived from it on first use
            (:func:`~.distributed.rank_generator`).
        shards: the :class:`~.distributed.Shards` of ``group=`` / ``distributed=``, ``None`` single-process;
            ``data`` is then this rank's shard, and :meth:`total` sums a pass's statistics over the ranks.
        n: inputs seen by the current (last) pass over the data; m: kept predictions (positions) in it (after
            :meth:`total`: over all ranks); during a pass a 0-d tensor on the device (no host read per batch),
            an int once :meth:`scale` or :meth:`total` has read it.
        progress: whether long loops show a progress bar (:meth:`bar`).
    """

    def __init__(self, *, model, data, likelihood, kind: str = "true", params=None, reduction: str = "mean",
                 samples: int = 1, generator: torch.Generator | None = None, batch_size: int | None = None,
                 engine: str = "auto", output=None, group=None, distributed: bool | None = None,
                 progress: bool = False):
        check_kind(likelihood, kind)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("engine", engine, ENGINES)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        self.fm = FunctionalModel(model, params, output)
        self.data, self.likelihood, self.kind = data, likelihood, kind
        self.reduction, self._generator = reduction, generator
        self.shards = shards_for(group, distributed)
        self._rank_generator: torch.Generator | None = None
        self.samples = check_positive_int("samples", samples, what="label draws per input")
        self.batch_size, self.engine = batch_size, engine
        self.n = self.m = 0
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}.")
        self.progress = progress

    def explain_nonfinite(self) -> None:
        """Raise ``ValueError`` naming the cause of a non-finite result when it is a NaN/inf selected parameter or
        in-memory input (a saturated layer can hide either from the outputs and still poison the gradients)."""
        X = self.data[0] if isinstance(self.data, tuple) and self.data else self.data
        self.fm.check_finite(X if isinstance(X, torch.Tensor) else None)

    def bar(self, total: int | None, desc: str, unit: str) -> tqdm:
        """A tqdm progress bar ``"fisherlens: <desc>"`` (use as a context manager), shown with ``progress=True``
        (under a process group on the first rank only), else disabled; it disappears when done."""
        show = self.progress and (self.shards is None or self.shards.rank == 0)
        return tqdm(total=total, desc=f"fisherlens: {desc}", unit=unit, disable=not show, leave=False,
                    mininterval=0.5)

    @property
    def generator(self) -> torch.Generator | None:
        """The generator of the random draws: the one given, or, under a process group, this rank's generator
        derived from it (once per request, at the first draw)."""
        if self.shards is None:
            return self._generator
        if self._rank_generator is None:
            self._rank_generator = rank_generator(self._generator, self.shards.rank, self.fm.device)
        return self._rank_generator

    @property
    def empty_ok(self) -> bool:
        """Whether this rank's data may be empty (under a process group; :meth:`total` checks the global N)."""
        return self.shards is not None

    def total(self, values: list) -> list:
        """``values`` (tensors and numbers summed over this rank's data) summed over the ranks, with this pass's
        counts :attr:`n` and :attr:`m`, by one all-reduce; ``values`` themselves when single-process.

        Raises ``ValueError`` when every shard is empty."""
        if self.shards is None:
            return values
        *out, self.n, self.m = self.shards.sum([*values, self.n, int(self.m)], device=self.fm.device)
        if self.n == 0:
            raise ValueError("The data is empty on every rank: no samples to average over.")
        return out

    @property
    def sharding(self) -> dict:
        """``group=`` / ``distributed=`` that give another call this request's shards."""
        return {"group": None if self.shards is None else self.shards.group, "distributed": self.shards is not None}

    def batches(self, check: bool = True):
        """Yield ``(X, Y)`` batches of the data, counting this pass's inputs in :attr:`n`; with ``check``, each
        batch's signature is checked once (:func:`~.layerwise.plan.check_batch`) — callers that only gather the
        data pass False."""
        self.n = self.m = 0
        for X, Y in iter_batches(self.data, self.fm, need_y=self.kind == "empirical", batch_size=self.batch_size,
                                 empty_ok=self.empty_ok):
            if check:
                check_batch(self.fm, X)
            self.n += len(X)
            yield X, Y

    def sandwich(self, f, y):
        """The kind's sandwich ``V (B, M, K)`` for outputs ``f (B, *S)`` (:meth:`fisherlens.Likelihood.sandwich`)."""
        return self.likelihood.sandwich(f, self.kind, y, self.samples, self.generator)

    def compact_sandwich(self, f, y):
        """:meth:`sandwich` with the fewest columns (``compact=True``: C − 1 per prediction for a categorical true
        Fisher), for the reductions that sum over the columns (diag, trace)."""
        return self.likelihood.sandwich(f, self.kind, y, self.samples, self.generator, compact=True)

    def v(self, f, y):
        """:meth:`sandwich`, counting the kept predictions in :attr:`m`."""
        return self.counted(self.sandwich)(f, y)

    def counted(self, make_v):
        """``make_v(f, y)`` that also counts the kept predictions in :attr:`m`."""
        def make(f, y):
            self.m = self.m + self.likelihood.kept(f, y)  # on the device: read once, by scale() or total()
            return make_v(f, y)

        return make

    def columns(self, M: int) -> int:
        """K, the sandwich's columns per input, for a model with M (flat) outputs per input."""
        return {"mc": self.samples, "empirical": 1}.get(self.kind, M)

    def chunks(self, want: set[str], make_v=None, columns=None, samples_labels: bool | None = None,
               into: DiagSum | None = None):
        """Yield ``(f, V, stats)`` per chunk of the data (:func:`~.engine.stream`); ``make_v``/``columns``
        replace the kind's sandwich and its column count; ``into`` sums the diagonal in place.  Counts this
        pass's inputs in :attr:`n` and its kept predictions in :attr:`m`.  The outputs' finiteness is read once,
        after the pass (:func:`~.checks.deferred_outputs`), unless the sandwich ``samples_labels`` from them
        (default: for ``kind="mc"``), which needs finite outputs first."""
        self.n = self.m = 0
        make = self.counted(make_v or self.sandwich)
        sampling = self.kind == "mc" if samples_labels is None else samples_labels
        with deferred_outputs(self.explain_nonfinite, enabled=not sampling):
            for n, f, V, st in stream(self.fm, self.data, make, want, need_y=self.kind == "empirical",
                                      columns=columns or self.columns, batch_size=self.batch_size,
                                      engine=self.engine, empty_ok=self.empty_ok, into=into):
                self.n += n
                yield f, V, st

    def scale(self, n: int | None = None, m: int | None = None) -> float:
        """The one scale rule: ``1/N`` for ``reduction="mean"`` (N = ``n``, default the last pass's :attr:`n`),
        ``1/M`` for ``"per_prediction"`` (M = ``m``, default :attr:`m`, the kept predictions), 1 for ``"sum"``.

        Raises ``ValueError`` when every position of the data was ignored."""
        if m is None:
            self.m = m = int(self.m)  # the pass's one host read of its count
        if m == 0 and (self.n if n is None else n) > 0:
            raise ValueError(
                "Every position of the data is ignored (labels equal to ignore_index, or masked out): there is "
                "no prediction to average over. Check the labels, the mask and ignore_index."
            )
        if self.reduction == "per_prediction":
            return 1.0 / m
        return 1.0 / (self.n if n is None else n) if self.reduction == "mean" else 1.0
