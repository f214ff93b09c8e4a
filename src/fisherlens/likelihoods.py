"""Output models ("likelihoods") p(y | f) and their output-space Fisher Λ(f).

Every Fisher in fisherlens is the pull-back ``J_nᵀ Λ(f_n) J_n`` of an output-space
Fisher Λ (docs/conventions.md#output-models).  A likelihood knows, per prediction (rows ``f (R, C)``)

* ``loss(f, y)``      negative log-likelihood (up to a y-independent constant), ``(R,)``;
* ``sqrt_fisher(f)``  a square root ``S`` with ``S Sᵀ = Λ(f)``, ``(R, C, C)`` (``fisher_factor(f)``: one with
  fewer columns where Λ's rank is lower, C − 1 for Categorical);
* ``fisher_out(f)``   ``Λ(f)`` itself, ``(R, C, C)``;
* ``sample(f, k, generator)``  ``k`` labels per row drawn from p(y | f), ``(k, R, ...)``;
* ``kl(f, g)``        per-row KL(p(·|f) ‖ p(·|g)), used by the KL self-test,

and the base class lifts them to structured outputs ``(B, *positions, C)`` (or channel-first) with ignored
positions (:meth:`Likelihood.rows`): for ``(B, C)`` outputs the rows are the inputs.  Labels are validated by
``check_targets``.

Refused with a ``ValueError`` (never a silent NaN or a wrong finite number): NaN or inf targets (every
``check_targets``); a loss whose value or gradient ``∂ℓ/∂f`` is NaN or inf on the given outputs and targets
(``residual``, e.g. ``sqrt``/``log`` of a negative number); a Gaussian ``sigma`` that is not a positive finite
number, or whose ``σ²`` or ``1/σ²`` is not a finite normal number in the model's dtype (``check_outputs``: in
float32 ``1.1e-19 ≤ σ ≤ 9.2e18``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["Likelihood", "Rows", "Gaussian", "Categorical", "Bernoulli", "LossInduced"]


def _check_finite_targets(y: Tensor, what: str) -> None:
    """Refuse NaN/inf targets (a floating ``y``; integer labels are always finite)."""
    if torch.is_floating_point(y) and not torch.isfinite(y).all():
        bad = int((~torch.isfinite(y)).sum())
        raise ValueError(
            f"{what} contain NaN or inf ({bad} of {y.numel()} entries); the loss and its gradient are undefined "
            "there. Remove or impute those samples."
        )


@dataclass
class Rows:
    """The kept predictions of a batch of structured outputs, one row each.

    Attributes:
        f: ``(R, C)`` outputs of the kept positions; ``y``: their labels (rows), or ``None``.
        which: ``(R,)`` input of each row; ``pos``: ``(R,)`` its position ``t < T``.
        B, T, C: inputs, positions per input, outputs per position; ``shape``: the per-input output shape ``S``.
    """

    f: Tensor
    y: Tensor | None
    which: Tensor
    pos: Tensor
    B: int
    T: int
    C: int
    shape: tuple


class Likelihood:
    """Base class of the output models ``p(y | f)``.

    **A new output model subclasses this and implements** :meth:`loss` **and, when its Fisher exists,**
    :meth:`sqrt_fisher` **,** :meth:`sample` **and** :meth:`kl` (set ``has_fisher = False`` otherwise);
    :meth:`check_outputs`/:meth:`check_targets` validate.  These act on *rows*: ``f (R, C)``, one prediction
    per row, labels in the form :meth:`check_targets` returns.

    The base class lifts them to structured outputs ``f (B, *S)``: ``(B, *positions, C)`` with
    ``channels="last"``, ``(B, C, *positions)`` with ``channels="first"`` (as ``F.cross_entropy`` takes them).
    Positions are conditionally independent given the input, so an input's Fisher is the sum over its kept
    positions of the per-position Fisher; labels equal to ``ignore_index`` (integer labels), a ``mask``
    (``True`` = keep) and an ``attention_mask`` of the positions' shape drop positions (:meth:`rows`).
    :meth:`input_loss`, :meth:`residual`, :meth:`sandwich`, :meth:`probe`, :meth:`fisher_times` and
    :meth:`count` take structured outputs; plain ``(B, C)`` outputs are one position per input.
    """

    #: whether ``Λ(f)`` exists (kind="true" and kind="mc" need it).
    has_fisher: bool = True
    #: where the C outputs of one prediction sit: ``"last"`` (``(B, *positions, C)``) or ``"first"``
    channels: str = "last"
    #: integer labels equal to this are ignored (as in ``torch.nn.functional.cross_entropy``)
    ignore_index: int = -100
    #: every output entry is its own prediction (C = 1), e.g. independent Bernoulli logits
    per_entry: bool = False

    def _set_layout(self, channels: str, ignore_index: int) -> None:
        if channels not in ("last", "first"):
            raise ValueError(f"channels={channels!r} is not supported; choose 'last' ((B, *positions, C)) or "
                             "'first' ((B, C, *positions), as torch.nn.functional.cross_entropy takes them).")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}.")
        self.channels, self.ignore_index = channels, ignore_index

    # ------------------------------------------------------------------ row-level API (subclasses)
    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Per-row negative log-likelihood ``ℓ(f_r, y_r)`` (up to a y-independent constant), ``(R,)``."""
        raise NotImplementedError

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        """A square root ``S (R, C, C)`` of the output-space Fisher: ``S Sᵀ = Λ(f) = E_y[∇_f ℓ ∇_f ℓᵀ]``."""
        raise NotImplementedError

    def fisher_factor(self, f: Tensor) -> Tensor:
        """A factor ``U (R, C, K)``, ``U Uᵀ = Λ(f)``, with as few columns K ≤ C as the likelihood knows (default
        :meth:`sqrt_fisher`): the true sandwich of the reductions that sum over the columns (diag, trace)."""
        return self.sqrt_fisher(f)

    def sqrt_fisher_times(self, f: Tensor, eps: Tensor) -> Tensor:
        """``S(f) ε`` for rows ``f (R, C)`` and ``ε (R, C, d)``, ``(R, C, d)`` (override to skip forming S)."""
        return self.sqrt_fisher(f) @ eps

    def fisher_out(self, f: Tensor) -> Tensor:
        """``Λ(f) (R, C, C)``."""
        s = self.sqrt_fisher(f)
        return s @ s.transpose(-1, -2)

    def fisher_out_times(self, f: Tensor, u: Tensor) -> Tensor:
        """``Λ(f) u`` for rows ``f (R, C)`` and ``u (R, C, d)``, ``(R, C, d)``."""
        s = self.sqrt_fisher(f)
        return s @ (s.transpose(-1, -2) @ u)

    def sample(self, f: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` labels per row drawn from ``p(y | f)``, ``(k, R, ...)`` (``generator`` for reproducibility)."""
        raise NotImplementedError

    def kl(self, f: Tensor, g: Tensor) -> Tensor:
        """Per-row ``KL(p(·|f) ‖ p(·|g))``, ``(R,)``."""
        raise NotImplementedError

    def check_outputs(self, f: Tensor) -> None:
        """Raise ``ValueError`` if rows ``f (R, C)`` have a number C of outputs this model cannot take."""

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Validate labels against rows ``f (R, C)``; return them in the form ``loss`` expects."""
        return y

    # ------------------------------------------------------------------ structured outputs
    def layout(self, shape: tuple) -> tuple[tuple, int]:
        """``(positions, C)`` of a per-input output shape ``S``."""
        if self.per_entry:
            return tuple(shape), 1
        return (tuple(shape[:-1]), shape[-1]) if self.channels == "last" else (tuple(shape[1:]), shape[0])

    def to_rows_layout(self, x: Tensor, shape: tuple) -> Tensor:
        """``x (B, *S, *extra)`` -> ``(B, T, C, *extra)``."""
        pos, C = self.layout(shape)
        if self.channels == "first" and not self.per_entry:
            x = x.movedim(1, len(pos) + 1)
        return x.reshape(x.shape[0], math.prod(pos), C, *x.shape[1 + len(shape):])

    def from_rows_layout(self, x: Tensor, shape: tuple) -> Tensor:
        """``x (B, T, C, *extra)`` -> flat ``(B, M, *extra)`` in the model's own output order."""
        pos, C = self.layout(shape)
        extra = x.shape[3:]
        x = x.reshape(x.shape[0], *pos, C, *extra)
        if self.channels == "first" and not self.per_entry:
            x = x.movedim(len(pos) + 1, 1)
        return x.reshape(x.shape[0], -1, *extra)

    def keep(self, f: Tensor, y) -> Tensor:
        """``(B, T)`` bool: the kept positions of outputs ``f (B, *S)`` under targets ``y`` (a tensor, or a
        mapping with ``labels``/``mask``/``attention_mask``)."""
        B, shape = f.shape[0], tuple(f.shape[1:])
        pos, _ = self.layout(shape)
        keep = None
        labels, mask, attention = _targets(y)
        if labels is not None:
            self._check_label_shape(labels, B, shape)
        if labels is not None and not torch.is_floating_point(labels) and tuple(labels.shape) == (B, *pos):
            keep = (labels != self.ignore_index).reshape(B, -1).to(f.device)
        if mask is None and attention is not None:
            if tuple(attention.shape) == (B, *pos):
                mask = attention
            elif labels is None:
                raise ValueError(
                    f"The attention_mask has shape {tuple(attention.shape)} but the outputs have positions "
                    f"{(B, *pos)}; pass labels with ignore_index={self.ignore_index} at dropped positions, or a "
                    "'mask' entry of the positions' shape."
                )
        if mask is not None:
            if tuple(mask.shape) != (B, *pos):
                raise ValueError(f"The mask has shape {tuple(mask.shape)}; it must have the outputs' positions "
                                 f"{(B, *pos)} (True = keep).")
            m = mask.to(f.device).bool().reshape(B, -1)
            keep = m if keep is None else keep & m
        return torch.ones(B, math.prod(pos), dtype=torch.bool, device=f.device) if keep is None else keep

    def rows(self, f: Tensor, y=None, with_labels: bool = True) -> Rows:
        """The kept predictions of outputs ``f (B, *S)`` as rows, with their labels when ``y`` has labels (and
        ``with_labels``; without, labels only drop positions).

        Labels are ``(B, *positions)`` (class ids, or one target per position), shaped like the outputs, or —
        for one position per input — anything with B rows the row-level :meth:`check_targets` takes.
        """
        B, shape = f.shape[0], tuple(f.shape[1:])
        pos, C = self.layout(shape)
        T = math.prod(pos)
        keep = self.keep(f, y)
        labels = _targets(y)[0] if with_labels else None
        fr = self.to_rows_layout(f, shape)
        if T == 1 and bool(keep.all()):  # one prediction per input: the rows are the inputs
            yr = None if labels is None else self.check_targets(fr[:, 0], labels)
            idx = torch.arange(B, device=f.device)
            return Rows(fr[:, 0], yr, idx, torch.zeros_like(idx), B, T, C, shape)
        which, t = keep.nonzero(as_tuple=True)
        yr = None
        if labels is not None:
            if tuple(labels.shape) == (B, *pos):
                yl = labels.reshape(B, T)
            elif tuple(labels.shape) == (B, *shape):
                yl = self.to_rows_layout(labels, shape)
            else:  # one position per input (checked by keep): anything with B rows
                yl = labels.reshape(B, 1, *labels.shape[1:])
            yr = self.check_targets(fr[which, t], yl[which, t]) if len(which) else yl[which, t]
        return Rows(fr[which, t], yr, which, t, B, T, C, shape)

    def _check_label_shape(self, labels: Tensor, B: int, shape: tuple) -> None:
        """Labels are ``(B, *positions)``, shaped like the outputs, or (one position per input) B rows."""
        pos, _ = self.layout(shape)
        if tuple(labels.shape) in ((B, *pos), (B, *shape)) or (math.prod(pos) == 1 and len(labels) == B):
            return
        raise ValueError(
            f"Labels of shape {tuple(labels.shape)} do not match outputs of shape {(B, *shape)}: give one label "
            f"per position, {(B, *pos)} (ignore_index={self.ignore_index} drops one), or targets shaped like the "
            "outputs."
        )

    def scatter(self, rows: Rows, x: Tensor) -> Tensor:
        """Row values ``x (R, C, *extra)`` back to flat ``(B, M, *extra)`` outputs (zeros at dropped positions)."""
        if rows.T == 1 and len(rows.which) == rows.B:
            return self.from_rows_layout(x[:, None], rows.shape)
        out = x.new_zeros(rows.B, rows.T, *x.shape[1:])
        out[rows.which, rows.pos] = x
        return self.from_rows_layout(out, rows.shape)

    def count(self, f: Tensor, y=None) -> int:
        """Kept predictions (positions) of outputs ``f (B, *S)``: the ``reduction="per_prediction"`` count."""
        return int(self.kept(f, y))

    def kept(self, f: Tensor, y=None) -> Tensor | int:
        """:meth:`count` without reading the device: a 0-d integer tensor on ``f``'s device, or :meth:`positions`
        (an int) when ``y`` cannot drop a position (:meth:`drops`)."""
        return self.keep(f, y).sum() if self.drops(y) else self.positions(f)

    def drops(self, y) -> bool:
        """Whether targets ``y`` may drop positions, from their kind alone (no values read): class labels (one may
        equal ``ignore_index``), a mask or an attention mask."""
        labels, mask, attention = _targets(y)
        return mask is not None or attention is not None or (labels is not None and not torch.is_floating_point(labels))

    def positions(self, f: Tensor) -> int:
        """All predictions (positions) of outputs ``f (B, *S)``, kept or not: :meth:`count` when nothing drops."""
        return len(f) * math.prod(self.layout(tuple(f.shape[1:]))[0])

    def input_loss(self, f: Tensor, y) -> Tensor:
        """Each input's loss summed over its kept positions, ``(B,)``, for outputs ``f (B, *S)``."""
        rows = self.rows(f, y)
        if rows.y is None:
            raise ValueError("This quantity needs labels (e.g. kind='empirical'): pass data as (X, Y).")
        ell = self.loss(rows.f, rows.y) if len(rows.which) else rows.f.sum(-1) * 0  # (0,), still differentiable
        if rows.T == 1 and len(rows.which) == rows.B:  # one kept prediction per input: the rows are the inputs
            return ell
        return ell.new_zeros(rows.B).index_add(0, rows.which, ell)

    def sandwich(self, f: Tensor, kind: str, y=None, samples: int = 1,
                 generator: torch.Generator | None = None, compact: bool = False) -> Tensor:
        """The factor ``V (B, M, K)`` of the per-input Fisher ``F_n = J_nᵀ V_n V_nᵀ J_n`` from outputs ``f (B, *S)``.

        * ``kind="true"``: block-diagonal over positions, each block ``S(f_t)`` with ``S Sᵀ = Λ(f_t)`` (K = M);
          ``compact``: each block :meth:`fisher_factor` ``(C, K_t)`` instead (``K = T·K_t``, ``T·(C − 1)`` for
          :class:`Categorical`), for reductions that sum over the columns;
        * ``kind="empirical"``: ``V = ∂ℓ_n/∂f`` of each input's summed loss at the observed labels (K = 1);
        * ``kind="mc"``: ``V = [∂ℓ_n(ŷ_1)/∂f … ∂ℓ_n(ŷ_k)/∂f] / √k`` with labels ``ŷ ~ p(y | f)`` drawn at every
          kept position, ``k = samples`` (K = k), so that ``E[V Vᵀ] = Σ_t Λ(f_t)``.

        Dropped positions have zero rows.  Refuses, before allocating, ``samples`` draws that cannot fit in memory.
        """
        from ._core.checks import check_dense  # the core's memory rule (imported late: the core imports this)

        f = f.detach()
        factor = self.fisher_factor if compact else self.sqrt_fisher
        if kind == "empirical":
            return self.residual(f, y).reshape(len(f), -1, 1)
        if kind not in ("true", "mc"):
            raise ValueError(f"kind={kind!r} is not supported; choose one of 'true', 'empirical', 'mc'.")
        if kind == "true" and math.prod(self.layout(tuple(f.shape[1:]))[0]) == 1:  # rows are the inputs
            return self._row_product(f, None, y, lambda fr, _: factor(fr))
        rows = self.kept_rows(f, y)
        if kind == "true":
            S = factor(rows.f)  # (R, C, K)
            K = S.shape[-1]
            check_dense(f"kind='true' on {rows.T} positions × {rows.C} outputs ({rows.T * K} sandwich columns "
                        f"per input, for {rows.B} inputs)", rows.B * rows.T * rows.C * rows.T * K, f.element_size(),
                        "Use method='hutchinson' (one backward per batch) or kind='mc'", None)
            blocks = S.new_zeros(len(S), rows.C, rows.T, K)
            blocks[torch.arange(len(S)), :, rows.pos] = S
            return self.scatter(rows, blocks.reshape(len(S), rows.C, rows.T * K))
        check_dense(f"kind='mc' with samples={samples} label draws for {len(f)} inputs", f.numel() * samples,
                    4 * f.element_size(), "Use fewer samples=, or method='hutchinson'", None)
        R = len(rows.f)
        if R == 0:  # every position dropped: no label to draw
            return f.new_zeros(len(f), f[0].numel(), samples)
        ys = self.sample(rows.f, samples, generator)  # (k, R, ...)
        fk = rows.f.expand(samples, *rows.f.shape).reshape(-1, rows.C)
        r = self.row_residual(fk, ys.reshape(-1, *ys.shape[2:])).reshape(samples, R, rows.C)
        return self.scatter(rows, r.permute(1, 2, 0)) / math.sqrt(samples)

    def kept_rows(self, f: Tensor, y=None) -> Rows:
        """:meth:`rows` of the kept positions without labels (they only drop positions), outputs checked."""
        rows = self.rows(f, y, with_labels=False)
        self.check_outputs(rows.f)
        return rows

    def _row_product(self, f: Tensor, x: Tensor | None, y, product) -> Tensor:
        """``product(f_r, x_r)`` per kept position for outputs ``f (B, *S)`` and flat ``x (B, M, d)`` (or ``None``),
        back to ``(B, M, d)`` (zeros at dropped positions; no host read for one position per input)."""
        f = f.detach()
        B, shape = len(f), tuple(f.shape[1:])
        pos, C = self.layout(shape)
        if math.prod(pos) == 1:  # one prediction per input: the rows are the inputs, a dropped one is zeroed
            fr = f.reshape(B, C)
            self.check_outputs(fr)
            out = product(fr, None if x is None else x.reshape(B, C, -1))
            return torch.where(self.keep(f, y)[:, :, None], out, 0) if self.drops(y) else out
        rows = self.kept_rows(f, y)
        xr = self.to_rows_layout(x.reshape(*f.shape, -1), rows.shape)[rows.which, rows.pos]  # (R, C, d)
        return self.scatter(rows, product(rows.f, xr))

    def probe(self, f: Tensor, eps: Tensor, y=None) -> Tensor:
        """``ξ = S ε`` per kept position for outputs ``f (B, *S)`` and flat ``ε (B, M, d)``, ``(B, M, d)``:
        ``E[ξ ξᵀ] = Σ_t Λ(f_t)`` for probes with ``E[ε εᵀ] = I``."""
        return self._row_product(f, eps, y, self.sqrt_fisher_times)

    def fisher_times(self, f: Tensor, u: Tensor, y=None) -> Tensor:
        """``Σ_t Λ(f_t) u_t`` per input for outputs ``f (B, *S)`` and flat ``u (B, M, d)``: ``(B, M, d)``."""
        return self._row_product(f, u, y, self.fisher_out_times)

    def residual(self, f: Tensor, y) -> Tensor:
        """``r_n = ∂ℓ_n/∂f_n`` of each input's summed loss, shaped like ``f (B, *S)``; batched autograd.

        Raises ``ValueError`` when the loss or its gradient is NaN or inf for some input (the Fisher would be
        NaN, or finite and wrong): the message names the first such input.
        """
        with torch.enable_grad():
            f = f.detach().requires_grad_(True)
            ell = self.input_loss(f, y)
            (r,) = torch.autograd.grad(ell.sum(), f)
        return self._check_residual(f, ell, r)

    def row_residual(self, f: Tensor, y: Tensor) -> Tensor:
        """``∂ℓ(f_r, y_r)/∂f_r`` for rows ``f (R, C)`` and row labels, ``(R, C)``."""
        with torch.enable_grad():
            f = f.detach().requires_grad_(True)
            ell = self.loss(f, y)
            (r,) = torch.autograd.grad(ell.sum(), f)
        return self._check_residual(f, ell, r)

    def _check_residual(self, f: Tensor, ell: Tensor, r: Tensor) -> Tensor:
        good_value = torch.isfinite(ell.detach()).reshape(len(r), -1).all(1)
        ok = good_value & torch.isfinite(r).reshape(len(r), -1).all(1)
        if not ok.all():
            i = int((~ok).nonzero()[0])
            where = "value" if not good_value[i] else "gradient ∂ℓ/∂f"
            shown = f" (output {f[i].detach().tolist()})" if f[i].numel() <= 8 else ""
            raise ValueError(
                f"The loss of {self!r} is NaN or inf ({where}) for {int((~ok).sum())} of {len(ok)} samples, first "
                f"at sample {i}{shown}: the Fisher is undefined there. Check the loss's domain (e.g. sqrt or log of "
                "a negative number, division by zero) and the outputs and targets you pass it."
            )
        return r

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _targets(y) -> tuple:
    """``(labels, mask, attention_mask)`` of targets ``y``: a tensor of labels, ``None`` or a mapping."""
    if y is None:
        return None, None, None
    if isinstance(y, Mapping):
        return y.get("labels"), y.get("mask"), y.get("attention_mask")
    return torch.as_tensor(y), None, None


class Gaussian(Likelihood):
    r"""Isotropic Gaussian ``N(y; f, σ² I)``: ``Λ = I/σ²``, ``S = I/σ``, loss ``‖f − y‖²/(2σ²)``.

    ``sigma`` must be a positive finite number whose ``σ²`` and ``1/σ²`` are finite normal float64 numbers
    (``1.5e-154 ≤ σ ≤ 6.7e153``; else ``ValueError``); outputs of a lower precision narrow the range to where
    they are finite and normal in their dtype (float32: ``1.1e-19 ≤ σ ≤ 9.2e18``), checked by
    :meth:`check_outputs`.
    Targets: the outputs' shape, finite.  On structured outputs each position is one prediction of its C
    outputs (``channels`` says which axis holds them); only a ``mask`` drops positions.
    """

    def __init__(self, sigma: float = 1.0, *, channels: str = "last"):
        self._set_layout(channels, -100)
        try:
            s = float(sigma)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Gaussian(sigma={sigma!r}): sigma must be a positive finite number.") from e
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"Gaussian(sigma={sigma!r}): sigma must be a positive finite number.")
        self.sigma = s
        self._check_scale(torch.float64)

    def _check_scale(self, dtype: torch.dtype) -> None:
        """Refuse a σ whose ``σ²`` or ``Λ = 1/σ²`` is not a finite normal number in ``dtype`` (it would overflow
        to inf, or underflow to 0 or a denormal): ``√tiny ≤ σ ≤ 1/√tiny``."""
        if not dtype.is_floating_point:
            return
        hi = torch.finfo(dtype).tiny ** -0.5
        lo = 1 / hi
        if not lo <= self.sigma <= hi:
            what = "1/sigma² overflows to inf" if self.sigma < lo else "1/sigma² underflows to 0"
            raise ValueError(
                f"Gaussian(sigma={self.sigma:g}): {what} (the output Fisher, and sigma² the other way) in {dtype}; "
                f"sigma must lie in [{lo:.3g}, {hi:.3g}] there. Rescale the targets (and sigma with them), or use a "
                "float64 model."
            )

    def check_outputs(self, f):
        self._check_scale(f.dtype)

    def loss(self, f, y):
        return 0.5 * ((f - y) ** 2).sum(-1) / self.sigma**2

    def sqrt_fisher(self, f):
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device) / self.sigma
        return eye.expand(f.shape[0], -1, -1)

    def sqrt_fisher_times(self, f, eps):
        return eps / self.sigma

    def fisher_out_times(self, f, u):
        return u / self.sigma**2

    def sample(self, f, k, generator=None):
        noise = torch.randn((k, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return f.detach() + self.sigma * noise

    def kl(self, f, g):
        return 0.5 * ((f - g) ** 2).sum(-1) / self.sigma**2

    def check_targets(self, f, y):
        self.check_outputs(f)
        _check_finite_targets(y, "Gaussian targets")
        if not torch.is_floating_point(y):
            y = y.to(f.dtype)
        if y.dim() == 1 and f.shape[-1] == 1:
            y = y[:, None]
        if y.shape != f.shape:
            raise ValueError(
                f"Gaussian targets must have the outputs' shape {tuple(f.shape)}, got {tuple(y.shape)}. "
                "For class labels use fl.Categorical(), or one-hot encode them."
            )
        return y.to(f.dtype)

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma})" if self.channels == "last" else \
            f"Gaussian(sigma={self.sigma}, channels='first')"


class Categorical(Likelihood):
    r"""Softmax classifier on logits ``f``: ``π = softmax(f)``, ``Λ = diag(π) − π πᵀ``.

    Square root ``S = diag(√π) − π √πᵀ`` (check: ``S Sᵀ = diag(π) − 2ππᵀ + π(Σπ)πᵀ = Λ``); ``S ε`` and
    ``Λ u`` cost O(C) per prediction (no C×C matrix).
    Labels: integer classes ``(B, *positions)`` in ``[0, C)`` (``ignore_index``, default −100 as in torch,
    drops a position) or probability vectors shaped like the outputs (finite, non-negative, summing to 1);
    anything else, NaN and inf included, is refused.  Outputs ``(B, *positions, C)``, or ``(B, C, *positions)``
    with ``channels="first"`` (``F.cross_entropy``'s layout).
    """

    def __init__(self, *, channels: str = "last", ignore_index: int = -100):
        self._set_layout(channels, ignore_index)

    def __repr__(self):
        opts = [f"channels={self.channels!r}"] * (self.channels != "last") + \
            [f"ignore_index={self.ignore_index}"] * (self.ignore_index != -100)
        return f"Categorical({', '.join(opts)})"

    def loss(self, f, y):
        logp = F.log_softmax(f, dim=-1)
        if y.dtype == torch.long:
            return -logp.gather(-1, y[:, None])[:, 0]
        return -(y * logp).sum(-1)

    def sqrt_fisher(self, f):
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]

    def fisher_factor(self, f):
        """``U (R, C, C − 1)`` with ``U Uᵀ = Λ``: ``Λ = diag π − ππᵀ`` has rank C − 1 (``Λ 1 = 0``), so the exact
        diagonal and trace back-propagate one column fewer per prediction (half the columns for C = 2).

        ``U = S Q`` with ``S = diag(√π) − π√πᵀ`` (:meth:`sqrt_fisher`) and ``Q`` the first C − 1 columns of the
        Householder reflection ``H = I − w wᵀ/(1 + √π_C)``, ``w = √π + e_C``: ``H √π = −e_C``, so ``Q`` is an
        orthonormal basis of ``√π^⊥``, the row space of S (``S √π = 0``), and ``U Uᵀ = S (I − √π√πᵀ) Sᵀ = S Sᵀ``.
        In closed form ``U = (E − (π + c (e_C − π)) 1ᵀ) diag(√π_{:C−1})``, ``E`` the first C − 1 columns of I
        and ``c = √π_C/(1 + √π_C) ≤ 1/2`` (no cancellation).  A subclass with its own :meth:`sqrt_fisher` (another
        Λ) gets that one."""
        if type(self).sqrt_fisher is not Categorical.sqrt_fisher:
            return self.sqrt_fisher(f)
        p = torch.softmax(f, dim=-1)
        q, C = p.sqrt(), f.shape[-1]
        c = q[:, -1:] / (1 + q[:, -1:])  # (R, 1)
        r = (torch.arange(C, device=f.device) == C - 1).to(p.dtype) - p  # e_C − π
        E = torch.eye(C, C - 1, dtype=p.dtype, device=f.device)
        return (E - (p + c * r)[:, :, None]) * q[:, None, : C - 1]

    def fisher_out(self, f):
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    def sqrt_fisher_times(self, f, eps):
        p = torch.softmax(f, dim=-1)[:, :, None]
        se = p.sqrt() * eps
        return se - p * se.sum(1, keepdim=True)

    def fisher_out_times(self, f, u):
        p = torch.softmax(f, dim=-1)[:, :, None]
        return p * u - p * (p * u).sum(1, keepdim=True)

    def sample(self, f, k, generator=None):
        p = torch.softmax(f.detach(), dim=-1)
        return torch.multinomial(p, k, replacement=True, generator=generator).T.contiguous()

    def kl(self, f, g):
        lf, lg = F.log_softmax(f, -1), F.log_softmax(g, -1)
        return (lf.exp() * (lf - lg)).sum(-1)

    def check_outputs(self, f):
        if f.shape[-1] < 2:
            raise ValueError("Categorical needs at least 2 outputs (logits); for one logit use fl.Bernoulli().")

    def check_targets(self, f, y):
        C = f.shape[-1]
        self.check_outputs(f)
        _check_finite_targets(y, "Categorical labels")
        if torch.is_floating_point(y) and y.dim() == 2:
            if y.shape != f.shape:
                raise ValueError(f"Probability targets must have shape {tuple(f.shape)}, got {tuple(y.shape)}.")
            if (y < 0).any() or not torch.allclose(y.sum(-1), torch.ones_like(y[:, 0]), atol=1e-5):
                raise ValueError("Probability targets must be non-negative and sum to 1 per row.")
            return y.to(f.dtype)
        if torch.is_floating_point(y):
            if not torch.equal(y, y.round()):
                raise ValueError("Categorical labels must be integer class indices (or (B, C) probabilities).")
        y = y.reshape(-1).long()
        if y.shape[0] != f.shape[0]:
            raise ValueError(f"Got {y.shape[0]} labels for {f.shape[0]} inputs.")
        lo, hi = torch.stack(torch.aminmax(y)).tolist() if y.numel() else (0, 0)  # one pass, one read
        if lo < 0 or hi >= C:
            raise ValueError(
                f"Class labels must lie in [0, {C}) for a model with {C} outputs; got values in [{lo}, {hi}]."
            )
        return y


class Bernoulli(Likelihood):
    r"""Independent logits: every output entry ``f`` is one prediction, ``π = sigmoid(f)``, ``Λ = π(1 − π)``,
    ``S = √(π(1 − π))``.

    One logit ``(B, 1)`` is a binary classifier; ``(B, K)`` are K independent labels (multi-label, the model
    of ``BCEWithLogitsLoss``), and any ``(B, *S)`` works alike.  Labels in ``{0, 1}`` (or probabilities in
    ``[0, 1]``) shaped like the outputs (``(B,)`` for one logit); NaN is refused; integer labels equal to
    ``ignore_index`` and a ``mask`` drop entries.
    """

    per_entry = True

    def __init__(self, *, ignore_index: int = -100):
        self._set_layout("last", ignore_index)

    def loss(self, f, y):
        return F.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def sqrt_fisher(self, f):
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt()[:, :, None]

    def sqrt_fisher_times(self, f, eps):
        p = torch.sigmoid(f)[:, :, None]
        return (p * (1 - p)).sqrt() * eps

    def fisher_out_times(self, f, u):
        p = torch.sigmoid(f)[:, :, None]
        return p * (1 - p) * u

    def sample(self, f, k, generator=None):
        p = torch.sigmoid(f.detach()).expand(k, *f.shape)
        return torch.bernoulli(p, generator=generator)

    def kl(self, f, g):
        pf = torch.sigmoid(f)
        return (pf * (F.logsigmoid(f) - F.logsigmoid(g)) + (1 - pf) * (F.logsigmoid(-f) - F.logsigmoid(-g))).sum(-1)

    def check_outputs(self, f):
        if f.shape[-1] != 1:  # rows of independent logits always have C = 1
            raise ValueError(f"Bernoulli rows hold one logit each; got {f.shape[-1]}.")

    def check_targets(self, f, y):
        self.check_outputs(f)
        _check_finite_targets(y, "Bernoulli labels")
        y = y.reshape(-1, 1).to(f.dtype)
        if y.shape[0] != f.shape[0]:
            raise ValueError(f"Got {y.shape[0]} labels for {f.shape[0]} inputs.")
        if ((y < 0) | (y > 1)).any():
            raise ValueError("Bernoulli labels must lie in [0, 1] (usually 0 or 1).")
        return y


class LossInduced(Likelihood):
    r"""The model ``p(y | f) ∝ exp(−ℓ(f, y))`` of Sauter (2023) §3.2.5, defined by a loss only.

    Its normaliser is unknown, so only the empirical Fisher (``g_n = ∇_θ ℓ``) is defined.
    ``loss(f (R, C), y) -> (R,)`` per-prediction losses, e.g. from :mod:`fisherlens.losses` (one row per input
    for ``(B, C)`` outputs; one per position for structured outputs, ``channels`` as in :class:`Categorical`).
    Refused
    (``ValueError``): NaN/inf floating targets, a loss of another shape, and a loss whose value or gradient is
    NaN or inf on the data (:meth:`Likelihood.residual`).
    """

    has_fisher = False

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], *, channels: str = "last",
                 ignore_index: int = -100):
        self._set_layout(channels, ignore_index)
        if not callable(loss):
            raise TypeError(f"LossInduced(loss) needs a callable loss(f, y) -> per-sample losses, got {loss!r}.")
        self._loss = loss

    def loss(self, f, y):
        out = self._loss(f, y)
        if out.shape != f.shape[:1]:
            raise ValueError(
                f"The loss must return one value per sample, shape ({f.shape[0]},); got {tuple(out.shape)}. "
                "Use reduction='none' or sum over the output dimension only."
            )
        return out

    def check_targets(self, f, y):
        if y.shape[0] != f.shape[0]:
            raise ValueError(f"Got {y.shape[0]} targets for {f.shape[0]} inputs.")
        _check_finite_targets(y, "The targets")
        return y.to(f.dtype) if torch.is_floating_point(y) else y

    def __repr__(self):
        return f"LossInduced({getattr(self._loss, '__name__', repr(self._loss))})"
