"""Output models ("likelihoods") p(y | f) and their output-space Fisher Λ(f).

Every Fisher in fisherlens is the pull-back ``J_nᵀ Λ(f_n) J_n`` of an output-space
Fisher Λ (docs/conventions.md#output-models).  A likelihood knows

* ``loss(f, y)``      per-sample negative log-likelihood (up to a y-independent constant), ``(B,)``;
* ``sqrt_fisher(f)``  a square root ``S`` with ``S Sᵀ = Λ(f)``, ``(B, C, C)``;
* ``fisher_out(f)``   ``Λ(f)`` itself, ``(B, C, C)``;
* ``sample(f, k, generator)``  ``k`` labels per input drawn from p(y | f), ``(k, B, ...)``;
* ``kl(f, g)``        per-sample KL(p(·|f) ‖ p(·|g)), used by the KL self-test.

Shapes: ``f`` is always ``(B, C)``; labels are validated by ``check_targets``.

Refused with a ``ValueError`` (never a silent NaN or a wrong finite number): NaN or inf targets (every
``check_targets``); a loss whose value or gradient ``∂ℓ/∂f`` is NaN or inf on the given outputs and targets
(``residual``, e.g. ``sqrt``/``log`` of a negative number); a Gaussian ``sigma`` that is not a positive finite
number, or whose ``σ²`` or ``1/σ²`` is not a finite normal number in the model's dtype (``check_outputs``: in
float32 ``1.1e-19 ≤ σ ≤ 9.2e18``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["Likelihood", "Gaussian", "Categorical", "Bernoulli", "LossInduced"]


def _check_finite_targets(y: Tensor, what: str) -> None:
    """Refuse NaN/inf targets (a floating ``y``; integer labels are always finite)."""
    if torch.is_floating_point(y) and not torch.isfinite(y).all():
        bad = int((~torch.isfinite(y)).sum())
        raise ValueError(
            f"{what} contain NaN or inf ({bad} of {y.numel()} entries); the loss and its gradient are undefined "
            "there. Remove or impute those samples."
        )


class Likelihood:
    """Base class of the output models ``p(y | f)``.

    **A new output model subclasses this and implements** :meth:`loss` **and, when its Fisher exists,**
    :meth:`sqrt_fisher` **,** :meth:`sample` **and** :meth:`kl` (set ``has_fisher = False`` otherwise);
    :meth:`check_outputs`/:meth:`check_targets` validate, :meth:`fisher_out`, :meth:`residual` and
    :meth:`sandwich` follow from the rest.  Shapes: outputs ``f (B, C)``, labels in the form
    :meth:`check_targets` returns.
    """

    #: whether ``Λ(f)`` exists (kind="true" and kind="mc" need it).
    has_fisher: bool = True

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Per-sample negative log-likelihood ``ℓ(f_n, y_n)`` (up to a y-independent constant), ``(B,)``."""
        raise NotImplementedError

    def sqrt_fisher(self, f: Tensor) -> Tensor:
        """A square root ``S (B, C, C)`` of the output-space Fisher: ``S Sᵀ = Λ(f) = E_y[∇_f ℓ ∇_f ℓᵀ]``."""
        raise NotImplementedError

    def fisher_out(self, f: Tensor) -> Tensor:
        """``Λ(f) (B, C, C)``."""
        s = self.sqrt_fisher(f)
        return s @ s.transpose(-1, -2)

    def sample(self, f: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` labels per input drawn from ``p(y | f)``, ``(k, B, ...)`` (``generator`` for reproducibility)."""
        raise NotImplementedError

    def kl(self, f: Tensor, g: Tensor) -> Tensor:
        """Per-sample ``KL(p(·|f) ‖ p(·|g))``, ``(B,)``."""
        raise NotImplementedError

    def check_outputs(self, f: Tensor) -> None:
        """Raise ``ValueError`` if outputs ``f (B, C)`` have a number C of outputs this model cannot take."""

    def check_targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Validate labels against outputs ``f (B, C)``; return them in the form ``loss`` expects."""
        return y

    def sandwich(self, f: Tensor, kind: str, y: Tensor | None = None, samples: int = 1,
                 generator: torch.Generator | None = None) -> Tensor:
        """The factor ``V (B, C, K)`` of the per-input Fisher ``F_n = J_nᵀ V_n V_nᵀ J_n`` from outputs ``f (B, C)``.

        * ``kind="true"``: ``V = S(f)``, ``V Vᵀ = Λ(f)`` (K = C);
        * ``kind="empirical"``: ``V = ∂ℓ(f, y)/∂f`` at the observed labels ``y`` (K = 1);
        * ``kind="mc"``: ``V = [∂ℓ(f, ŷ_1)/∂f … ∂ℓ(f, ŷ_k)/∂f] / √k`` with ``ŷ ~ p(y | f)``, ``k = samples`` (K = k),
          so that ``E[V Vᵀ] = Λ(f)``.

        Refuses, before allocating, ``samples`` draws that cannot fit in memory.
        """
        from ._core.checks import check_dense  # the core's memory rule (imported late: the core imports this)

        f = f.detach()
        self.check_outputs(f)
        if kind == "true":
            return self.sqrt_fisher(f)
        if kind == "empirical":
            return self.residual(f, self.check_targets(f, y))[:, :, None]
        if kind != "mc":
            raise ValueError(f"kind={kind!r} is not supported; choose one of 'true', 'empirical', 'mc'.")
        check_dense(f"kind='mc' with samples={samples} label draws for {len(f)} inputs", f.numel() * samples,
                    4 * f.element_size(), "Use fewer samples=, or method='hutchinson'", None)
        ys = self.sample(f, samples, generator)  # (k, B, ...)
        fk = f.expand(samples, *f.shape).reshape(-1, f.shape[-1])
        r = self.residual(fk, ys.reshape(-1, *ys.shape[2:]))
        return r.reshape(samples, *f.shape).permute(1, 2, 0) / math.sqrt(samples)

    def residual(self, f: Tensor, y: Tensor) -> Tensor:
        """``r_n = ∂ℓ(f_n, y_n)/∂f_n``, shape ``(B, C)``; batched autograd, no loop over samples.

        Raises ``ValueError`` when the loss or its gradient is NaN or inf for some sample (the Fisher would be
        NaN, or finite and wrong): the message names the first such sample.
        """
        with torch.enable_grad():
            f = f.detach().requires_grad_(True)
            ell = self.loss(f, y)
            (r,) = torch.autograd.grad(ell.sum(), f)
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


class Gaussian(Likelihood):
    r"""Isotropic Gaussian ``N(y; f, σ² I)``: ``Λ = I/σ²``, ``S = I/σ``, loss ``‖f − y‖²/(2σ²)``.

    ``sigma`` must be a positive finite number whose ``σ²`` and ``1/σ²`` are finite normal float64 numbers
    (``1.5e-154 ≤ σ ≤ 6.7e153``; else ``ValueError``); outputs of a lower precision narrow the range to where
    they are finite and normal in their dtype (float32: ``1.1e-19 ≤ σ ≤ 9.2e18``), checked by
    :meth:`check_outputs`.
    Targets: the outputs' shape, finite.
    """

    def __init__(self, sigma: float = 1.0):
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
        return f"Gaussian(sigma={self.sigma})"


class Categorical(Likelihood):
    r"""Softmax classifier on logits ``f``: ``π = softmax(f)``, ``Λ = diag(π) − π πᵀ``.

    Square root ``S = diag(√π) − π √πᵀ`` (check: ``S Sᵀ = diag(π) − 2ππᵀ + π(Σπ)πᵀ = Λ``).
    Labels: integer classes ``(B,)`` in ``[0, C)`` or probability vectors ``(B, C)`` (finite, non-negative,
    rows summing to 1); anything else, NaN and inf included, is refused.
    """

    def loss(self, f, y):
        logp = F.log_softmax(f, dim=-1)
        if y.dtype == torch.long:
            return -logp.gather(-1, y[:, None])[:, 0]
        return -(y * logp).sum(-1)

    def sqrt_fisher(self, f):
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]

    def fisher_out(self, f):
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

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
        if y.numel() and (y.min() < 0 or y.max() >= C):
            raise ValueError(
                f"Class labels must lie in [0, {C}) for a model with {C} outputs; "
                f"got values in [{int(y.min())}, {int(y.max())}]."
            )
        return y


class Bernoulli(Likelihood):
    r"""One logit ``f (B, 1)``: ``π = sigmoid(f)``, ``Λ = π(1 − π)``, ``S = √(π(1 − π))``.

    Labels in ``{0, 1}`` (or probabilities in ``[0, 1]``), shape ``(B,)`` or ``(B, 1)``; NaN is refused.
    """

    def loss(self, f, y):
        return F.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)

    def sqrt_fisher(self, f):
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt()[:, :, None]

    def sample(self, f, k, generator=None):
        p = torch.sigmoid(f.detach()).expand(k, *f.shape)
        return torch.bernoulli(p, generator=generator)

    def kl(self, f, g):
        pf = torch.sigmoid(f)
        return (pf * (F.logsigmoid(f) - F.logsigmoid(g)) + (1 - pf) * (F.logsigmoid(-f) - F.logsigmoid(-g))).sum(-1)

    def check_outputs(self, f):
        if f.shape[-1] != 1:
            raise ValueError(
                f"Bernoulli needs a model with one output (a logit); this one has {f.shape[-1]}. "
                "For several classes use fl.Categorical()."
            )

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
    ``loss(f (B, C), y) -> (B,)`` per-sample losses, e.g. from :mod:`fisherlens.losses`.  Refused
    (``ValueError``): NaN/inf floating targets, a loss of another shape, and a loss whose value or gradient is
    NaN or inf on the data (:meth:`Likelihood.residual`).
    """

    has_fisher = False

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor]):
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
