"""Keyword batches: a dict of tensors that share the batch axis 0, handled like one batch tensor.

Hugging Face-style batches (``{"input_ids": …, "attention_mask": …, "labels": …}``) become two :class:`Fields`:
the model's keyword inputs ``X`` and the targets ``Y`` (``labels`` and/or a position ``mask``).  A
:class:`Fields` supports what the core does with a batch tensor — ``len``, slicing along the batch, ``.to``,
``[None]`` — so the engines treat both alike; :meth:`Fields.tree` is the plain dict ``torch.func`` maps over.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensor = torch.Tensor

__all__ = ["Fields", "TARGET_KEYS", "batch_len", "describe", "split_fields"]

#: keys of a dict batch that are targets, not model inputs
TARGET_KEYS = ("labels", "mask")


class Fields(Mapping):
    """Named tensors with a common batch axis 0 (a read-only mapping).

    ``F[i:j]`` and ``F[idx]`` slice every tensor along the batch; ``F["name"]`` is one tensor.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        self._t = dict(tensors)
        bad = [k for k, v in self._t.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"A dict batch must hold tensors; {bad} are not (convert them with torch.as_tensor).")
        sizes = {k: (v.shape[0] if v.dim() else None) for k, v in self._t.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"The tensors of a dict batch must share the batch size on axis 0; got {sizes}.")

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._t[key]
        return Fields({k: v[key] for k, v in self._t.items()})

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        """The batch size (not the number of fields)."""
        return next(iter(self._t.values())).shape[0] if self._t else 0

    def names(self) -> list[str]:
        return list(self._t)

    def dim(self) -> int:
        return min((v.dim() for v in self._t.values()), default=0)

    def to(self, device, dtype=None) -> Fields:
        """On ``device``; floating tensors cast to ``dtype`` (integer ids and masks keep theirs)."""
        return Fields({k: v.to(device, dtype) if dtype is not None and torch.is_floating_point(v) else v.to(device)
                       for k, v in self._t.items()})

    def tree(self) -> dict[str, Tensor]:
        """The plain dict (a pytree ``torch.func`` maps over)."""
        return dict(self._t)

    def __repr__(self) -> str:
        return f"Fields({describe(self)})"


def batch_len(X) -> int:
    """Batch size of a tensor or :class:`Fields`."""
    return len(X) if (isinstance(X, Fields) or X.dim()) else 0


def describe(X) -> str:
    """Shapes and dtypes for messages: ``(8, 12) int64`` or ``input_ids (8, 12) int64, attention_mask …``."""
    if isinstance(X, Tensor):
        return f"{tuple(X.shape)} {str(X.dtype).replace('torch.', '')}"
    return ", ".join(f"{k} {describe(v)}" for k, v in X.items())


def split_fields(batch: Mapping) -> tuple[Fields, Fields | None]:
    """A dict batch -> ``(inputs, targets)``: every key but ``labels``/``mask`` goes to the model as a keyword
    input; the targets hold ``labels``, ``mask`` and a copy of ``attention_mask`` (which output models use as
    the mask of kept positions when its shape is the outputs' positions); ``None`` when there are none."""
    ins = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if not ins:
        raise ValueError(f"A dict batch needs model inputs besides {list(TARGET_KEYS)}; got keys {list(batch)}.")
    keys = (*TARGET_KEYS, "attention_mask")
    tgt = {k: torch.as_tensor(batch[k]) for k in keys if k in batch and batch[k] is not None}
    return Fields(ins), (Fields(tgt) if tgt else None)
