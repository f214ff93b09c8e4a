"""The only validators of the core: choices, memory refusals, finiteness, and output checks.

Every refusal is a ``ValueError``/``TypeError`` whose message says what was wrong and what to do instead;
dense results are refused *before* allocating (:func:`check_dense`).
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager

import torch

from ..likelihoods import Likelihood
from .fields import Fields, batch_len

Tensor = torch.Tensor

KINDS = ("true", "empirical", "mc")
REDUCTIONS = ("mean", "sum", "per_prediction")
ENGINES = ("auto", "layerwise", "functional")


def check_choice(name: str, value, choices) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def check_positive_int(name: str, value, *, optional: bool = False, what: str = "") -> int | None:
    """``value`` must be a positive integer (``None`` too when ``optional``); a bool, 0, a negative number or a
    float is refused with a message naming ``name`` (``what`` says what it counts)."""
    if optional and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        also = " or None" if optional else ""
        raise ValueError(f"{name} must be a positive integer{also}{f' ({what})' if what else ''}, got {value!r}.")
    return value


def renamed(name: str, value, renames: dict):
    """The current spelling of an option value, with a ``FutureWarning`` for an old one (``renames``: old -> new)."""
    if isinstance(value, str) and value in renames:
        warnings.warn(f"{name}={value!r} is deprecated; use {name}={renames[value]!r} (same meaning).", FutureWarning,
                      stacklevel=3)
        return renames[value]
    return value


def check_kind(likelihood, kind: str) -> None:
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be a fisherlens output model such as fl.Categorical(), fl.Gaussian(sigma), "
            f"fl.Bernoulli() or fl.LossInduced(loss); got {likelihood!r}."
        )
    check_choice("kind", kind, KINDS)
    if kind != "empirical" and not likelihood.has_fisher:
        raise ValueError(
            f"{likelihood!r} defines only the empirical Fisher (its normaliser is unknown, so neither the "
            f"true Fisher nor label sampling exists); use kind='empirical', or an output model such as "
            "fl.Gaussian()/fl.Categorical() for kind='true'/'mc'."
        )


def available_memory() -> int:
    """Bytes of memory currently available (Linux ``sysconf``; a generous guess elsewhere)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def check_dense(what: str, numel: int, itemsize: int, alternative: str, max_memory: int | None) -> None:
    """Refuse, before allocating, a dense result that would not fit in memory."""
    need = numel * itemsize
    limit = max_memory if max_memory is not None else available_memory() // 2
    if need > limit:
        raise ValueError(
            f"{what} would need {need / 2**30:.2f} GiB but only {limit / 2**30:.2f} GiB may be used. "
            f"{alternative} (or pass max_memory=bytes to raise the limit)."
        )


def all_finite(t: Tensor) -> bool:
    """Whether a floating tensor has no NaN/inf: one sum (NaN and inf propagate), the elementwise test only when
    the sum is not finite (it may just overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def finite_result(what: str, value, explain=None):
    """Return ``value`` (a tensor, a float or a dict of them) after checking it is finite: an overflow in the
    model's dtype (e.g. 1/σ⁴ of a tiny σ in float32) is refused, never returned as inf/NaN.  ``explain()``, if
    given, may first raise a more precise error (a non-finite parameter that did not reach the outputs)."""
    items = list(value.values()) if isinstance(value, dict) else [value]
    sums = [float(v.sum()) if isinstance(v, Tensor) else float(v) for v in items]
    if not math.isfinite(math.fsum(sums)) and not all(  # one sum each; the elementwise test only if needed
            all_finite(v) if isinstance(v, Tensor) else math.isfinite(v) for v in items):
        if explain is not None:
            explain()
        raise ValueError(
            f"{what} overflowed to inf/NaN in the model's dtype, or NaN/inf inputs reached the gradients without "
            "showing in the outputs (a saturated layer); check the data, compute in float64 (model.double()) or "
            "rescale the outputs (e.g. a larger sigma)."
        )
    return value


def check_inputs(X) -> None:
    """Refuse NaN/inf in floating inputs (a tensor or every tensor of keyword inputs): their Fisher is undefined,
    and they poison every check."""
    for t in (X.values() if isinstance(X, Fields) else [X]):
        if torch.is_floating_point(t) and not all_finite(t):
            raise ValueError("The inputs contain NaN or inf; the Fisher is undefined there. Clean the data first.")


def check_outputs(f: Tensor, X, dtype: torch.dtype, explain=None) -> None:
    """Flat outputs ``f (B, M)`` of inputs ``X``: floating, of the parameters' dtype, one per input, finite.

    Finiteness is checked on the outputs only (one sum); when they are not finite, ``explain()`` (if given) may
    raise a more precise error first (a non-finite parameter), then the inputs are checked (:func:`check_inputs`)."""
    if not torch.is_floating_point(f):
        raise TypeError(f"The model returned {f.dtype} outputs; outputs must be floating point (logits, means).")
    if f.dtype != dtype:
        raise TypeError(
            f"The model returned {f.dtype} outputs but its parameters are {dtype}; make them agree "
            f"(e.g. model.to({dtype}) or drop the cast inside forward)."
        )
    if f.shape[0] != batch_len(X):
        raise ValueError(f"The model returned {f.shape[0]} outputs for a batch of {batch_len(X)} inputs.")
    if _DEFERRED:  # a pass reads its flags once, at its end (deferred_outputs)
        _DEFERRED[-1].append(torch.isfinite(f.detach()).all())
        return
    if not all_finite(f.detach()):
        if explain is not None:
            explain()
        check_inputs(X)
        raise ValueError("The model produced NaN or inf outputs on this data; the Fisher is undefined there.")


#: the open :func:`deferred_outputs` scopes, innermost last: each a list of per-batch finiteness flags
_DEFERRED: list[list[Tensor]] = []


@contextmanager
def deferred_outputs(explain=None, enabled: bool = True):
    """A data pass whose output checks read the device once, at the end, instead of once per batch.

    Inside, :func:`check_outputs` still checks types and shapes at once but keeps each batch's finiteness as a
    0-d flag on the outputs' device: reading it per batch is a host sync, which stalls an accelerator's stream.
    On exit the flags are read together and a non-finite batch is refused (``explain()`` first, e.g. naming a NaN
    parameter or in-memory input), as :func:`check_outputs` would refuse it; an error raised inside after such a
    batch (NaN outputs can break later arithmetic) becomes that refusal.  The flags are tiny (one per forward);
    the batches are not kept, so a streamed batch's inputs cannot be named afterwards.  ``enabled=False`` (e.g.
    a pass that samples labels from the outputs, which must be finite first): checks at once."""
    if not enabled:
        yield
        return
    flags: list[Tensor] = []
    _DEFERRED.append(flags)
    try:
        yield
    except Exception as e:
        _refuse_nonfinite(flags, explain, e)
        raise
    finally:
        _drop(flags)
    _refuse_nonfinite(flags, explain)


def _drop(flags: list) -> None:
    """Close one :func:`deferred_outputs` scope (by identity: a suspended generator may close out of order)."""
    for i in range(len(_DEFERRED) - 1, -1, -1):
        if _DEFERRED[i] is flags:
            del _DEFERRED[i]
            return


def _refuse_nonfinite(flags: list[Tensor], explain, cause: Exception | None = None) -> None:
    """Read a pass's finiteness flags (one host sync) and refuse a non-finite pass."""
    if not flags:
        return
    ok = torch.stack(flags).cpu()
    if bool(ok.all()):
        return
    if explain is not None:
        explain()
    raise ValueError("The model produced NaN or inf outputs on this data (found at the end of the pass); the Fisher "
                     "is undefined there. Check the inputs for NaN or inf.") from cause


def autocast_dtype() -> torch.dtype | None:
    """The lower-precision dtype of an active ``torch.autocast`` region (CPU or CUDA), else ``None``."""
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    return None


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the core's self-checks in ``dtype``; for bfloat16 / float16 values, and inside
    ``torch.autocast`` (whose forward rounds in its compute dtype), a few of their roundings: 3e-2 for bfloat16,
    4e-3 for float16."""
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for low in (dtype, autocast_dtype()):
        if low in (torch.bfloat16, torch.float16):
            tol = max(tol, 4 * torch.finfo(low).eps)
    return tol


def close_enough(a: Tensor, b: Tensor, scale: float = 0.0) -> bool:
    """``a ≈ b`` to :func:`tolerance`, with an absolute floor at the scale of ``b`` (or at ``scale`` when larger:
    a quantity that is exactly zero in theory, such as the gradient of a key bias under softmax, is round-off
    at the scale of its neighbours)."""
    tol = tolerance(a.dtype)
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * (max(b.abs().max().item(), scale) + 1e-30)))
