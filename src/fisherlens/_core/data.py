"""Data streaming: every accepted form of ``data`` becomes ``(X, Y)`` batches on the model's device.

``data`` is a tuple ``(X, Y)`` of tensors, a dict of tensors, a ``Dataset`` or any iterable of batches (each a
tensor, an ``(X, Y)`` pair or a dict of tensors, :func:`~.fields.split_fields`); nothing is accumulated.
The one chunking policy of the core is :func:`chunk_size` (see :mod:`fisherlens._core.engine`), the one
scale rule :meth:`fisherlens._core.request.Request.scale`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from .checks import check_positive_int
from .fields import Fields, batch_len, split_fields
from .model import FunctionalModel

Tensor = torch.Tensor


def _is_xy(data) -> bool:
    """Whether ``data`` is one ``(X, Y)`` pair of tensors (a tuple; a list of two tensors only when the second
    cannot be a batch of inputs like the first)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, Fields))):
        return False
    X, Y = data
    if Y is not None and not isinstance(Y, (Tensor, Fields)):
        return False
    if isinstance(data, list) and isinstance(Y, Tensor) and isinstance(X, Tensor) and Y.shape[1:] == X.shape[1:] \
            and Y.dtype == X.dtype:
        raise ValueError(
            "data=[A, B] is ambiguous: two tensors of the same shape and dtype may be two batches of inputs or one "
            "(X, Y) pair. Pass a tuple (X, Y) for inputs with targets, or [(A,), (B,)] for two unlabelled batches."
        )
    return True


def _split_batch(batch):
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return split_fields(batch)
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], Fields):  # a slice of a dict
        return batch
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) == 2 else None
        if y is not None and not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        return batch[0], y
    raise TypeError(
        f"Each batch must be a tensor X, a pair (X, Y) of tensors or a dict of tensors (keyword inputs of the "
        f"model, with 'labels'); got {type(batch).__name__}."
    )


def _slices(X, Y, bs: int) -> Iterator[tuple]:
    for i in range(0, batch_len(X), bs):
        yield X[i : i + bs], None if Y is None else Y[i : i + bs]


def _source(data, batch_size: int | None):
    """The batch iterable behind ``data`` (see :func:`iter_batches`)."""
    if isinstance(data, Tensor):
        data = (data, None)
    if isinstance(data, Mapping):
        data = split_fields(data)
    if _is_xy(data):
        X, Y = data
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"X has {len(X)} samples but Y has {len(Y)}; they must match.")
        return _slices(X, Y, batch_size or 256)
    if isinstance(data, torch.utils.data.DataLoader) and data.batch_size is None and data.batch_sampler is None:
        raise ValueError(
            "The DataLoader has batch_size=None (automatic batching off), so it yields single samples without a "
            "batch dimension. Give it a batch_size, e.g. DataLoader(dataset, batch_size=64)."
        )
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(data, batch_size=batch_size or 256, shuffle=False)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return data
    raise TypeError(
        f"data must be a tuple (X, Y) of tensors, a dict of tensors, a torch Dataset or an iterable of batches; "
        f"got {type(data).__name__}."
    )


def iter_batches(data, fm: FunctionalModel, *, need_y: bool, batch_size: int | None = None,
                 empty_ok: bool = False) -> Iterator:
    """Yield ``(X, Y)`` batches on the model's device; floating ``X`` cast to the model's dtype.

    ``data`` is a tuple ``(X, Y)`` of tensors or a dict of tensors (split into chunks of ``batch_size``), a
    ``Dataset`` (read through a ``DataLoader``) or any iterable of batches (streamed: nothing is accumulated).
    A dict batch gives keyword inputs ``X`` and targets ``Y`` (:class:`~.fields.Fields` with ``labels`` and/or
    ``mask``, and its ``attention_mask``).  ``Y`` may be ``None`` unless ``need_y``.  Raises ``ValueError`` for
    empty data (unless ``empty_ok``: a rank's shard may be empty, the global count is checked after the
    all-reduce, docs/distributed.md), mismatched lengths and missing labels; non-finite inputs are refused by the
    checked forwards (:func:`~.checks.check_outputs`, when they make the outputs non-finite).
    """
    check_positive_int("batch_size", batch_size, optional=True)
    seen = 0
    for batch in _source(data, batch_size):
        X, Y = _split_batch(batch)
        if batch_len(X) == 0:
            continue
        if need_y and (Y is None or (isinstance(Y, Fields) and "labels" not in Y)):
            raise ValueError("This quantity needs labels (e.g. kind='empirical'): pass data as (X, Y), or dict "
                             "batches with a 'labels' entry.")
        if Y is not None and len(Y) != len(X):
            raise ValueError(f"A batch has {len(X)} inputs but {len(Y)} labels; they must match.")
        X = X.to(fm.device, fm.dtype) if isinstance(X, Fields) or torch.is_floating_point(X) else X.to(fm.device)
        if Y is not None:
            Y = Y.to(fm.device)
        seen += len(X)
        yield X, Y
    if seen == 0 and not empty_ok:
        raise ValueError("The data is empty: no samples to average over.")
