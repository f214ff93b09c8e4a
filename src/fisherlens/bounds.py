"""Deterministic core-space bounds of the categorical Fisher (arXiv:2505.13614; docs/conventions.md#core-space-bounds).

In the core space of class probabilities π the output Fisher is ``Λ = diag(π) − π πᵀ``:

* eigenvalue 0 on the all-ones vector; ``tr Λ = 1 − ‖π‖²``;
* ``max_i π_i(1 − π_i) ≤ λ_max(Λ) ≤ 1 − ‖π‖²``;
* Loewner envelopes ``0 ≼ Λ ≼ diag(π)`` and ``Λ ≼ (1 − ‖π‖²) I``.

Pulled back through the Jacobians (``A ≼ B ⇒ Jᵀ A J ≼ Jᵀ B J``):

    0 ≼ F ≼ U_π = (1/N) Σ J_nᵀ diag(π_n) J_n,        F ≼ U_iso = (1/N) Σ (1 − ‖π_n‖²) J_nᵀ J_n,

so ``diag F ≤ diag U``, ``tr F ≤ tr U`` and ``λ_max(F) ≤ λ_max(U)``.  Cost: an envelope's diagonal or trace is a
Fisher diagonal/trace with another sandwich (``V = diag √π`` or ``√(1 − ‖π‖²) I``): one forward and one backward
pass batched over the C columns — the price of the exact diagonal, and ``tr U_iso = (1/N) Σ (1 − ‖π_n‖²) tr Θ_nn``
costs the same as an NTK trace.  Unlike F, the envelopes need no softmax covariance, and their Hutchinson
estimates (``ξ = √π ⊙ ε``) cost one backward pass per batch.
"""

from __future__ import annotations

import math

import torch

from ._core import Request, check_choice, check_dense, renamed
from .fisher import dense, diag_flat, trace_dict
from .likelihoods import Categorical

Tensor = torch.Tensor

__all__ = ["core_spectrum", "envelope"]

ENVELOPES = ("diag", "isotropic")


def core_spectrum(logits: Tensor) -> dict[str, Tensor]:
    """Core-space quantities of ``Λ(π)``, ``π = softmax(logits)``; each ``(B,)`` for logits ``(B, C)``.

    Returns ``trace = 1 − ‖π‖²``, ``lambda_max_lower = max_i π_i(1 − π_i)``, ``lambda_max_upper = 1 − ‖π‖²``.
    """
    logits = torch.as_tensor(logits)
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape (B, C) with C >= 2, got {tuple(logits.shape)}.")
    p = torch.softmax(logits, -1)
    tr = 1 - (p**2).sum(-1)
    return {"trace": tr, "lambda_max_lower": (p * (1 - p)).max(-1).values, "lambda_max_upper": tr}


class _Envelope(Categorical):
    """The envelope's output "Fisher" per prediction: ``diag(π)`` (``which="diag"``) or ``(1 − ‖π‖²) I``, with
    the square roots ``diag √π`` and ``√(1 − ‖π‖²) I``; structured outputs and ignored positions as in
    :class:`~fisherlens.Categorical` (only :meth:`sqrt_fisher` differs)."""

    def __init__(self, which: str, channels: str):
        super().__init__(channels=channels)
        self.which = which

    def sqrt_fisher(self, f):
        p = torch.softmax(f.detach(), -1)
        if self.which == "diag":
            return torch.diag_embed(p.sqrt())
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return (1 - (p**2).sum(-1)).clamp_min(0).sqrt()[:, None, None] * eye


def envelope(
    model, data, which: str = "diag", what: str = "diag", *, params=None, reduction: str = "mean", batch_size=None,
    engine: str = "auto", max_memory: int | None = None, output=None, channels: str = "last",
    group=None, distributed: bool | None = None,
):
    """An upper Loewner envelope of the categorical (true) Fisher, reduced like the Fisher itself.

    Args:
        which: ``"diag"`` for ``U_π = (1/N) Σ J_nᵀ diag(π_n) J_n`` or ``"isotropic"`` for
            ``U_iso = (1/N) Σ (1 − ‖π_n‖²) J_nᵀ J_n``.
        what: ``"diag"`` → ``(P,)``, ``"trace"`` → float, ``"dense"`` → ``(P, P)`` (refused if too large; the
            old spelling ``"matrix"`` still works, with a ``FutureWarning``), as in :func:`fisherlens.fisher_blocks`.
        channels: where the classes sit in structured outputs, as in :class:`fisherlens.Categorical`.
        group, distributed: as in :func:`fisherlens.fisher_matrix` (the envelope of the union of the shards).
        Others: as in :func:`fisherlens.fisher_diag` (the model's outputs are logits; labels equal to
        ``ignore_index`` drop positions).
    """
    check_choice("which", which, ENVELOPES)
    what = renamed("what", what, {"matrix": "dense"})
    check_choice("what", what, ("diag", "trace", "dense"))
    run = Request(model=model, data=data, likelihood=_Envelope(which, channels), params=params, reduction=reduction,
                  batch_size=batch_size, engine=engine, output=output, group=group, distributed=distributed)
    fm = run.fm
    if what == "dense":
        check_dense(f"envelope matrix with P={fm.P}", fm.P**2, fm.itemsize, "Use what='diag' or 'trace'", max_memory)
        return dense(run)
    if what == "diag":
        return diag_flat(run)
    return math.fsum(trace_dict(run).values())
