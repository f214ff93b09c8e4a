"""The loss families of Sauter (2023, §5.1, eqs 5.1.5–5.1.7), as per-sample losses ``ℓ(f (B, C), y) -> (B,)``.

Sauter (2023): *Investigating the Evolution of Fisher Information for Neural Network Dynamics*, B.Sc. thesis,
University of Stuttgart (docs/references.md).  Definitions: docs/conventions.md#losses.

Targets ``y`` may be ``(B, C)`` floats (one-hot or soft) or integer class labels ``(B,)``,
which are one-hot encoded with ``C = f.shape[-1]``.  Use with :class:`fisherlens.LossInduced`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Loss = Callable[[Tensor, Tensor], Tensor]

__all__ = ["lp_norm", "mean_power", "softmax_cross_entropy", "as_targets"]


def as_targets(f: Tensor, y: Tensor) -> Tensor:
    """Targets as ``(B, C)`` floats: one-hot encode integer labels, check shapes."""
    if not torch.is_floating_point(y):
        y = y.reshape(-1).long()
        C = f.shape[-1]
        if y.numel() and (y.min() < 0 or y.max() >= C):
            raise ValueError(f"Class labels must lie in [0, {C}); got values in [{int(y.min())}, {int(y.max())}].")
        y = F.one_hot(y, C)
    elif y.dim() == 1 and f.shape[-1] == 1:
        y = y[:, None]
    if y.shape != f.shape:
        raise ValueError(
            f"Targets must have the outputs' shape {tuple(f.shape)} (or be class labels); got {tuple(y.shape)}."
        )
    return y.to(f.dtype)


def lp_norm(p: float = 2) -> Loss:
    r"""L_p-norm loss (Sauter 2023, eq 5.1.5): ``ℓ = (Σ_c |f_c − y_c|^p)^{1/p}``, ``p ≥ 1``.

    Its gradient at zero residual is taken as 0 (the subgradient torch uses).

    Example:
        >>> import torch
        >>> from fisherlens.losses import lp_norm
        >>> lp_norm(2)(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]]))
        tensor([5.])
    """
    p = float(p)
    if not p >= 1:
        raise ValueError(f"lp_norm(p={p}): p must be >= 1 for a norm.")

    def loss(f: Tensor, y: Tensor) -> Tensor:
        return torch.linalg.vector_norm(f - as_targets(f, y), ord=p, dim=-1)

    loss.__name__ = f"lp_norm(p={p:g})"
    return loss


def mean_power(n: int = 2) -> Loss:
    r"""Mean power loss of order n (Sauter 2023, eq 5.1.6): ``ℓ = (1/C) Σ_c (f_c − y_c)^n``.

    Odd ``n`` gives a loss that is unbounded below (as written in the thesis); even ``n`` is the usual choice.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"mean_power(n={n}): n must be a positive integer.")
    n = int(n)

    def loss(f: Tensor, y: Tensor) -> Tensor:
        return ((f - as_targets(f, y)) ** n).mean(-1)

    loss.__name__ = f"mean_power(n={n})"
    return loss


def softmax_cross_entropy() -> Loss:
    r"""Softmax cross-entropy (Sauter 2023, eq 5.1.7): ``ℓ = −Σ_c y_c log softmax(f)_c`` (via log-softmax).

    Integer labels are one-hot encoded, so this is torch's per-sample cross-entropy:

        >>> import torch
        >>> from fisherlens.losses import softmax_cross_entropy
        >>> f, y = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 2])
        >>> torch.allclose(softmax_cross_entropy()(f, y), torch.nn.functional.cross_entropy(f, y, reduction="none"))
        True
    """

    def loss(f: Tensor, y: Tensor) -> Tensor:
        return -(as_targets(f, y) * F.log_softmax(f, dim=-1)).sum(-1)

    loss.__name__ = "softmax_cross_entropy"
    return loss
