r"""Exponential-family Gibbs models and their Fisher metrics ``g(θ) = ∇²_θ log Z(θ) = Cov_θ[φ]``.

Every model here is ``p_θ(x) = w(x) exp(θ · φ(x)) / Z(θ)`` with natural parameters ``θ (d,)`` and sufficient
statistics ``φ(x) (d,)``.  Its Fisher metric is the Hessian of the log-partition function, equal to the covariance
of the statistics.  Each model is a *metric callable* in the sense of :mod:`fisherlens.geometry`
(``θ (d,) float64 tensor -> g (d, d) float64 tensor``, written with torch operations only, so ``torch.func`` can
differentiate it to the order the curvature needs): ``fl.geometry.scalar_curvature(IsingChain(), θ)`` works.

Conventions
-----------
* Ising models: ``p(s) ∝ exp(β Σ_⟨ij⟩ s_i s_j + h Σ_i s_i)``, spins ``s_i = ±1``, ``J = 1``, natural parameters
  ``θ = (β, h)`` (``h = βH`` for an external field ``H``), statistics ``φ = (Σ_⟨ij⟩ s_i s_j, Σ_i s_i)``.
  Nearest-neighbour bonds are counted once: the bonds of a periodic lattice are the pairs (site, next site) along
  each axis, ``N`` bonds for a chain of ``N`` spins and ``2N`` for an ``L × L`` lattice.  For a periodic length
  of 2 the "next" and "previous" site coincide, so that pair appears twice (this is what the transfer matrix
  trace gives, and what the brute-force enumerations in the tests use).
* *Per site*: ``log_partition`` and ``metric`` are divided by the number of spins ``N`` (``log Z / N`` and
  ``Cov[φ] / N``); the thermodynamic-limit models (``IsingChain()``, ``CurieWeiss()``) are per site by nature.
* Curvature sign: that of :mod:`fisherlens.geometry` (the unit 2-sphere has ``R = +2``).  In this convention the
  infinite 1-D chain has ``R = 1 + cosh h / √(sinh² h + e^{−4β})`` (Janke, Johnston & Kenna; the tests verify
  it to 1e-8 relative with :func:`fisherlens.geometry.scalar_curvature`), positive, diverging as ``β → ∞`` at
  ``h = 0``.
* ``β < 0`` (antiferromagnetic coupling) is accepted everywhere: every formula used here holds for it.

References
----------
* W. Janke, D. A. Johnston and R. Kenna, "Information geometry and phase transitions", Physica A 336 (2004)
  157–164.
* M. Sauter, *Investigating the Evolution of Fisher Information for Neural Network Dynamics*, B.Sc. thesis,
  University of Stuttgart (2023), §3.4.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch.func import hessian

from .montecarlo import ising2d_monte_carlo

Tensor = torch.Tensor
DTYPE = torch.float64

__all__ = [
    "CurieWeiss",
    "ExponentialFamily",
    "GibbsModel",
    "Ising2D",
    "IsingChain",
    "IsingFiniteChain",
    "IsingTorus",
    "rbm_metric",
]

#: largest ``L`` for which :class:`Ising2D` enumerates all ``2^(L²)`` states.
MAX_ENUMERATE_L = 4
#: largest ``L`` for which :class:`Ising2D` builds the ``2^L × 2^L`` row transfer matrix.
MAX_TRANSFER_L = 10


def _all_finite(t: Tensor) -> bool:
    """``True`` unless ``t`` has a NaN/inf entry.  Under ``vmap`` the check cannot be made and passes."""
    try:
        return bool(torch.isfinite(t).all())
    except RuntimeError:  # data-dependent control flow under vmap: the caller (geometry) has checked θ already
        return True


def _theta(theta, d: int, what: str) -> Tensor:
    """θ as a float64 tensor of shape ``(d,)`` (kept in the autograd / torch.func graph when it is a tensor)."""
    if isinstance(theta, Tensor):
        t = theta.to(DTYPE)
    else:
        try:
            t = torch.as_tensor(theta, dtype=DTYPE)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{what}: theta must be a tensor or array-like of {d} numbers, got {theta!r}.") from e
    if tuple(t.shape) != (d,):
        raise ValueError(f"{what}: theta must have shape ({d},), got {tuple(t.shape)}.")
    if not _all_finite(t):
        raise ValueError(f"{what}: theta contains NaN or inf.")
    return t


class GibbsModel:
    """Base class: a log-partition function ``θ -> log Z(θ) / N`` and its Hessian as the metric.

    Subclasses define :attr:`dim` and :meth:`log_partition`; :meth:`metric` defaults to the Hessian of
    :meth:`log_partition` by ``torch.func.hessian`` (forward-over-reverse), so it can be differentiated further.
    The instance is itself the metric callable: ``model(θ) == model.metric(θ)``.
    """

    dim: int = 2
    #: number of sites ``N`` the per-site quantities are divided by (``None`` for a thermodynamic limit).
    n_sites: int | None = None

    def log_partition(self, theta) -> Tensor:  # pragma: no cover - abstract
        """Per-site ``log Z(θ) / N`` as a 0-d float64 tensor."""
        raise NotImplementedError

    def hessian(self, theta) -> Tensor:
        """``∇²_θ (log Z / N)`` of shape ``(d, d)`` by ``torch.func.hessian``."""
        t = _theta(theta, self.dim, type(self).__name__)
        return hessian(self.log_partition)(t)

    def metric(self, theta) -> Tensor:
        """Per-site Fisher metric ``g(θ) (d, d)``, float64, differentiable by ``torch.func``."""
        return self.hessian(theta)

    def __call__(self, theta) -> Tensor:
        return self.metric(theta)


# ----------------------------------------------------------------------------- 1-D chain
class IsingChain(GibbsModel):
    r"""The 1-D Ising chain in the thermodynamic limit (per site), ``θ = (β, h)``.

    Per-site ``log Z = log λ₊`` with the largest eigenvalue of the 2×2 transfer matrix
    ``λ₊ = e^β cosh h + √(e^{2β} sinh² h + e^{−2β})``, evaluated as ``β + log(cosh h + √(sinh² h + e^{−4β}))``.
    The metric is its Hessian, in closed form (:meth:`metric`; :meth:`hessian` is the ``torch.func`` one).  Scalar
    curvature (geometry's sign):
    ``R = 1 + cosh h / √(sinh² h + e^{−4β})``, see :meth:`scalar_curvature_exact`.

    Example:
        >>> import torch, fisherlens as fl
        >>> from fisherlens.gibbs import IsingChain
        >>> th = torch.tensor([0.5, 0.2], dtype=torch.float64)
        >>> abs(fl.geometry.scalar_curvature(IsingChain(), th) - IsingChain.scalar_curvature_exact(th)) < 1e-9
        True
    """

    dim = 2

    def log_partition(self, theta) -> Tensor:
        """Per-site ``log λ₊(β, h)`` (0-d tensor)."""
        b, h = _theta(theta, 2, "IsingChain.log_partition").unbind()
        return b + torch.log(torch.cosh(h) + torch.sqrt(torch.sinh(h) ** 2 + torch.exp(-4 * b)))

    def metric(self, theta) -> Tensor:
        r"""Per-site metric, closed form (equal to :meth:`hessian`, but without its rounding in the curvature).

        With ``u = e^{−4β}``, ``s = sinh h``, ``c = cosh h``, ``D = √(s² + u)``:
        ``g = (u/D³) [[4(2s²(c+D) + uc)/(c+D)², 2s], [2s, c]]`` — a sum of positive terms, no cancellation.
        Through this form ``scalar_curvature`` matches the closed-form ``R`` to ~1e-9 relative for
        ``β ≤ 1.5, |h| ≤ 2``; deep in the saturated region (``e^{−4β} ≪ sinh² h``, e.g. ``β = 0.8, h = 4``) the
        curvature loses digits to cancellation inside the geometry (2e-7 there, 2e-4 at ``β = 3, h = 4``).
        """
        b, h = _theta(theta, 2, "IsingChain.metric").unbind()
        u, s, c = torch.exp(-4 * b), torch.sinh(h), torch.cosh(h)
        D = torch.sqrt(s * s + u)
        gbb = 4 * (2 * s * s * (c + D) + u * c) / (c + D) ** 2
        return (u / D**3) * torch.stack([torch.stack([gbb, 2 * s]), torch.stack([2 * s, c])])

    @staticmethod
    def scalar_curvature_exact(theta) -> float:
        """Closed form ``R = 1 + cosh h / √(sinh² h + e^{−4β})`` (sign of :mod:`fisherlens.geometry`)."""
        b, h = (float(x) for x in _theta(theta, 2, "IsingChain.scalar_curvature_exact"))
        return 1.0 + math.cosh(h) / math.sqrt(math.sinh(h) ** 2 + math.exp(-4 * b))

    @staticmethod
    def finite(n: int) -> IsingFiniteChain:
        """The periodic chain of ``n`` spins (exact, per site): see :class:`IsingFiniteChain`."""
        return IsingFiniteChain(n)


class IsingFiniteChain(GibbsModel):
    r"""Periodic 1-D Ising chain of ``n >= 2`` spins, exact, per site: ``log Z / n = log(λ₊ⁿ + λ₋ⁿ) / n``.

    Evaluated as ``log λ₊ + log1p(rⁿ) / n`` with ``r = λ₋/λ₊ = 2 sinh 2β / λ₊²`` (no cancellation; ``|r| < 1``,
    ``r < 0`` for ``β < 0``).  Bonds ``(i, i+1 mod n)``, ``n`` of them (``n = 2``: the pair twice).
    """

    dim = 2

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"IsingChain.finite: n must be an int, got {type(n).__name__}.")
        if n < 2:
            raise ValueError(f"IsingChain.finite: the periodic chain needs n >= 2 spins, got n={n}.")
        self.n = self.n_sites = n

    def log_partition(self, theta) -> Tensor:
        """Per-site ``log Z_n / n`` (0-d tensor)."""
        b, h = _theta(theta, 2, "IsingChain.finite(n).log_partition").unbind()
        log_lp = b + torch.log(torch.cosh(h) + torch.sqrt(torch.sinh(h) ** 2 + torch.exp(-4 * b)))
        r = 2 * torch.sinh(2 * b) * torch.exp(-2 * log_lp)
        return log_lp + torch.log1p(r**self.n) / self.n


# ----------------------------------------------------------------------------- general discrete family
class ExponentialFamily(GibbsModel):
    r"""A small discrete exponential family ``p(x) = w(x) exp(θ · φ(x)) / Z`` over ``S`` enumerated states.

    Args:
        statistics: ``(S, d)`` tensor of ``φ`` over the states, or a callable ``φ(states) -> (S, d)``.
        states: ``(S, n)`` tensor of states; required when ``statistics`` is a callable, ignored otherwise.
        sites: the per-site divisor ``N`` (default 1: plain ``log Z`` and ``Cov[φ]``).
        log_weights: optional ``(S,)`` base log-measure ``log w(x)`` (e.g. log multiplicities when each row of
            ``statistics`` stands for a class of states).

    ``log_partition(θ) = logsumexp(φ θ + log w) / N``; ``metric(θ) = Cov_θ[φ] / N`` computed from the softmax
    weights (equal to :meth:`hessian`, the Hessian of ``log_partition``); :meth:`mean` is ``E_θ[φ] / N``.

    Raises:
        ValueError: shapes that do not match, non-finite statistics or weights, ``sites < 1``.
        TypeError: a callable without ``states``.
    """

    def __init__(self, statistics, states=None, *, sites: int = 1, log_weights=None):
        if callable(statistics):
            if states is None:
                raise TypeError("ExponentialFamily: a callable `statistics` needs `states` (S, n) to evaluate.")
            states_t = torch.as_tensor(states)
            if states_t.dim() != 2:
                raise ValueError(f"ExponentialFamily: states must have shape (S, n), got {tuple(states_t.shape)}.")
            phi = torch.as_tensor(statistics(states_t))
            if phi.dim() != 2 or phi.shape[0] != states_t.shape[0]:
                raise ValueError(
                    f"ExponentialFamily: statistics(states) must have shape (S={states_t.shape[0]}, d), got "
                    f"{tuple(phi.shape)}."
                )
        else:
            phi = torch.as_tensor(statistics)
        phi = phi.to(DTYPE)
        if phi.dim() != 2 or phi.shape[0] < 1 or phi.shape[1] < 1:
            raise ValueError(
                f"ExponentialFamily: statistics must have shape (S, d) with S, d >= 1, got {tuple(phi.shape)}."
            )
        if not torch.isfinite(phi).all():
            raise ValueError("ExponentialFamily: statistics contain NaN or inf.")
        if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
            raise ValueError(f"ExponentialFamily: sites must be an int >= 1, got {sites!r}.")
        if log_weights is None:
            lw = torch.zeros(phi.shape[0], dtype=DTYPE)
        else:
            lw = torch.as_tensor(log_weights).to(DTYPE)
            if tuple(lw.shape) != (phi.shape[0],):
                raise ValueError(
                    f"ExponentialFamily: log_weights must have shape ({phi.shape[0]},), got {tuple(lw.shape)}."
                )
            if torch.isnan(lw).any() or (lw == math.inf).any():
                raise ValueError("ExponentialFamily: log_weights contain NaN or +inf.")
        self.statistics = phi
        self.log_weights = lw
        self.dim = phi.shape[1]
        self.n_sites = sites

    def _logits(self, theta, what: str) -> Tensor:
        return self.statistics @ _theta(theta, self.dim, what) + self.log_weights

    def log_partition(self, theta) -> Tensor:
        """Per-site ``log Z / N`` (0-d tensor)."""
        return torch.logsumexp(self._logits(theta, "ExponentialFamily.log_partition"), 0) / self.n_sites

    def probabilities(self, theta) -> Tensor:
        """``p_θ`` over the ``S`` states, shape ``(S,)``."""
        return torch.softmax(self._logits(theta, "ExponentialFamily.probabilities"), 0)

    def mean(self, theta) -> Tensor:
        """Per-site ``E_θ[φ] / N``, shape ``(d,)``."""
        return self.probabilities(theta) @ self.statistics / self.n_sites

    def metric(self, theta) -> Tensor:
        """Per-site ``Cov_θ[φ] / N``, shape ``(d, d)``."""
        p = torch.softmax(self._logits(theta, "ExponentialFamily.metric"), 0)
        c = self.statistics - p @ self.statistics
        return (c.T * p) @ c / self.n_sites


# ----------------------------------------------------------------------------- Curie–Weiss
class CurieWeiss(GibbsModel):
    r"""Mean-field (Curie–Weiss) Ising model ``p(s) ∝ exp((β/2n)(Σ s)² + h Σ s)``, ``θ = (β, h)``, per site.

    Statistics ``φ = (M²/(2n), M)`` with ``M = Σ_i s_i``.

    * ``n`` an int: exact, by summing over ``M = 2k − n`` (``k = 0..n`` up spins) with binomial multiplicities
      ``log C(n, k)`` (``torch.lgamma``); an :class:`ExponentialFamily` of ``n + 1`` classes, ``sites = n``.
    * ``n=None``: the thermodynamic limit, ``log Z / n → max_m [β m²/2 + h m + H(m)]`` with the binary entropy
      ``H`` and ``m = tanh(βm + h)``; for ``h = 0, β > 1`` the branch ``m > 0`` (``h → 0⁺``) is taken.  ``m`` is
      found by unrolled Newton steps (torch ops, so differentiable; exact at convergence — slow only right at
      ``β = 1, h = 0``).  The metric is ``g = χ [[m², m], [m, 1]]`` with ``χ = ∂m/∂h = 1/(1/(1−m²) − β)``: it
      has **rank 1** (``det g = 0``; the energy per site is a function of ``m``), so the limit has no curvature
      (:mod:`fisherlens.geometry` refuses it as singular); use a finite ``n`` for ``R``.  ``χ`` diverges at
      ``β = 1, h = 0``.
    """

    dim = 2
    newton_steps = 60

    def __init__(self, n: int | None = None):
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"CurieWeiss: n must be an int or None, got {type(n).__name__}.")
            if n < 1:
                raise ValueError(f"CurieWeiss: n must be >= 1, got {n}.")
            k = torch.arange(n + 1, dtype=DTYPE)
            M = 2 * k - n
            lw = torch.lgamma(torch.tensor(n + 1.0, dtype=DTYPE)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
            self._family = ExponentialFamily(torch.stack([M**2 / (2 * n), M], 1), sites=n, log_weights=lw)
        self.n = self.n_sites = n

    def magnetisation(self, theta) -> Tensor:
        """Per-site ``m = E[M]/n``: the exact mean for finite ``n``, the mean-field solution for ``n=None``."""
        if self.n is not None:
            return self._family.mean(theta)[1]
        b, h = _theta(theta, 2, "CurieWeiss.magnetisation").unbind()
        s = torch.where(h < 0, -1.0, 1.0).to(DTYPE)  # solve for u = s m >= 0 with field s h = |h|
        sh = s * h
        u = torch.tanh(torch.abs(b) + sh + 1.0)  # to the right of the largest root: Newton descends monotonically
        u = torch.where(b < 0, torch.tanh(sh), u)  # β < 0: unique root in [0, tanh|h|]; start there (F >= 0)
        for _ in range(self.newton_steps):
            f = torch.atanh(u) - b * u - sh
            u = u - f / (1 / (1 - u**2) - b)
        return s * u

    def log_partition(self, theta) -> Tensor:
        """Per-site ``log Z / n`` (finite ``n``) or its limit ``β m²/2 + h m + H(m)`` (``n=None``)."""
        if self.n is not None:
            return self._family.log_partition(theta)
        t = _theta(theta, 2, "CurieWeiss.log_partition")
        m = self.magnetisation(t)
        b, h = t.unbind()
        p, q = (1 + m) / 2, (1 - m) / 2
        ent = -(torch.xlogy(p, p) + torch.xlogy(q, q))
        return b * m**2 / 2 + h * m + ent

    def metric(self, theta) -> Tensor:
        """Per-site Fisher metric (finite ``n``: ``Cov[φ]/n``; limit: ``χ [[m², m], [m, 1]]``, rank 1)."""
        if self.n is not None:
            return self._family.metric(theta)
        t = _theta(theta, 2, "CurieWeiss.metric")
        m = self.magnetisation(t)
        chi = 1 / (1 / (1 - m**2) - t[0])
        v = torch.stack([m, torch.ones_like(m)])
        return chi * torch.outer(v, v)


# ----------------------------------------------------------------------------- 2-D Ising
def _spin_rows(L: int) -> Tensor:
    """All ``2^L`` rows of ``L`` spins ±1, shape ``(2^L, L)``, int64 (row ``a``: bit ``j`` of ``a`` -> spin j)."""
    a = torch.arange(2**L)[:, None]
    return 1 - 2 * ((a >> torch.arange(L)) & 1)


def _axis_bonds(x: Tensor, dim: int, periodic: bool) -> Tensor:
    """Σ over bonds along ``dim`` of ``x_i x_{i+1}`` (periodic: including the wrap-around bond)."""
    if periodic:
        return (x * torch.roll(x, -1, dim)).sum(dim)
    n = x.shape[dim]
    return (x.narrow(dim, 0, n - 1) * x.narrow(dim, 1, n - 1)).sum(dim)


class Ising2D(GibbsModel):
    r"""The ``L × L`` square-lattice Ising model, exact, per site (``N = L²``), ``θ = (β, h)``.

    Args:
        L: linear size, ``2 <= L <= 10``.
        boundary: ``"periodic"`` (bonds (site, right) and (site, down) with wrap-around: ``2N`` bonds) or
            ``"open"`` (free edges: ``2L(L−1)`` bonds).
        method: ``"enumerate"`` (all ``2^N`` states, ``L <= 4``), ``"transfer"`` (row transfer matrix,
            ``L <= 10``) or ``"auto"`` (enumeration for ``L <= 4``, else the transfer matrix).

    Enumeration builds ``φ = (E, M)`` over all states once, keeps the distinct pairs with their counts, and is an
    :class:`ExponentialFamily` (``log Z`` by ``logsumexp``, metric ``= Cov[φ]/N``): cheap enough for the curvature.

    The transfer matrix is the symmetric ``T[a, b] = exp(β(E_h(a) + E_h(b))/2 + β a·b + h(M(a) + M(b))/2)`` over
    the ``2^L`` row configurations; ``Z = tr T^L`` (periodic) or ``d T^{L−1} d`` with the edge-row half-weights
    ``d`` (open), evaluated by repeated squaring with a rescaling after every product (the log-scales are
    accumulated), all in torch ops; the metric is the Hessian of ``log Z / N`` by ``torch.func``.  Cost: ``O(log L)``
    products of ``2^L × 2^L`` matrices per evaluation, times the number of derivative passes.  Measured on 2 CPU
    cores (``benchmarks/bench_gibbs.py``): the metric takes ≈ 0.05 ms by enumeration (``L ≤ 4``), 12–30 ms at
    ``L = 5 … 7``, 66 ms at ``L = 8``, 0.4 s at ``L = 9`` and 2.2 s at ``L = 10``; ``scalar_curvature`` (fourth
    derivatives of ``log Z``) ≈ 0.2 s at ``L = 5, 6``, 0.5 s at ``L = 7`` and 1.5 s at ``L = 8``.  At ``h = 0``,
    :class:`IsingTorus` is exact for any ``L`` and far cheaper.

    ``β < 0`` is accepted (all formulas hold).

    Raises:
        ValueError: ``L < 2``, ``L`` too large for the method, unknown ``boundary`` or ``method``.
    """

    dim = 2

    def __init__(self, L: int, boundary: str = "periodic", *, method: str = "auto"):
        if isinstance(L, bool) or not isinstance(L, int):
            raise TypeError(f"Ising2D: L must be an int, got {type(L).__name__}.")
        if L < 2:
            raise ValueError(f"Ising2D: L must be >= 2, got L={L}.")
        if boundary not in ("periodic", "open"):
            raise ValueError(f"Ising2D: unknown boundary {boundary!r}; use 'periodic' or 'open'.")
        if method not in ("auto", "enumerate", "transfer"):
            raise ValueError(f"Ising2D: unknown method {method!r}; use 'auto', 'enumerate' or 'transfer'.")
        if method == "auto":
            method = "enumerate" if L <= MAX_ENUMERATE_L else "transfer"
        if method == "enumerate" and L > MAX_ENUMERATE_L:
            raise ValueError(
                f"Ising2D: enumeration of 2^(L²) states is limited to L <= {MAX_ENUMERATE_L}, got "
                f"L={L}; use method='transfer' (L <= {MAX_TRANSFER_L})."
            )
        if method == "transfer" and L > MAX_TRANSFER_L:
            raise ValueError(
                f"Ising2D: the 2^L × 2^L transfer matrix is limited to L <= {MAX_TRANSFER_L}, got "
                f"L={L}; use Ising2D.monte_carlo for larger lattices."
            )
        self.L, self.boundary, self.method = L, boundary, method
        self.n_sites = L * L
        periodic = boundary == "periodic"
        if method == "enumerate":
            N = L * L
            s = _spin_rows(N).reshape(-1, L, L)
            E = _axis_bonds(s, 1, periodic).sum(1) + _axis_bonds(s, 2, periodic).sum(1)
            M = s.sum((1, 2))
            pairs, counts = torch.unique(torch.stack([E, M], 1), dim=0, return_counts=True)
            self._family = ExponentialFamily(pairs, sites=N, log_weights=torch.log(counts.to(DTYPE)))
        else:
            rows = _spin_rows(L)
            self._Eh = _axis_bonds(rows, 1, periodic).to(DTYPE)  # (2^L,)
            self._M = rows.sum(1).to(DTYPE)
            self._Ev = (rows @ rows.T).to(DTYPE)  # (2^L, 2^L) vertical bonds a·b

    def log_partition(self, theta) -> Tensor:
        """Per-site ``log Z / L²`` (0-d tensor)."""
        t = _theta(theta, 2, "Ising2D.log_partition")
        if self.method == "enumerate":
            return self._family.log_partition(t)
        return self._log_z_transfer(t) / self.n_sites

    def metric(self, theta) -> Tensor:
        """Per-site Fisher metric ``Cov[φ]/L²`` (enumeration) or ``∇²(log Z/L²)`` (transfer matrix), ``(2, 2)``."""
        t = _theta(theta, 2, "Ising2D.metric")
        if self.method == "enumerate":
            return self._family.metric(t)
        return hessian(self.log_partition)(t)

    def _log_z_transfer(self, t: Tensor) -> Tensor:
        b, h = t.unbind()
        half = 0.5 * (b * self._Eh + h * self._M)  # (2^L,) half row weight, log
        logT = half[:, None] + half[None, :] + b * self._Ev
        c = logT.max()
        T = torch.exp(logT - c)
        periodic = self.boundary == "periodic"
        power = self.L if periodic else self.L - 1
        # P = T^power by repeated squaring; log_scale tracks the factors divided out.
        P, log_scale = None, torch.zeros((), dtype=DTYPE)
        base, base_scale, k = T, c, power
        while k:
            if k & 1:
                if P is None:
                    P, log_scale = base, base_scale
                else:
                    P = P @ base
                    s = P.abs().max()
                    P, log_scale = P / s, log_scale + base_scale + torch.log(s)
            k >>= 1
            if k:
                base = base @ base
                s = base.abs().max()
                base, base_scale = base / s, 2 * base_scale + torch.log(s)
        if periodic:
            return log_scale + torch.log(torch.diagonal(P).sum())
        dmax = half.max()
        d = torch.exp(half - dmax)
        return log_scale + 2 * dmax + torch.log(d @ P @ d)

    def monte_carlo(self, theta, **kw):
        """Monte-Carlo estimate of the per-site metric: ``fisherlens.gibbs.montecarlo.ising2d_monte_carlo``.

        Keyword arguments (``sweeps``, ``burn_in``, ``method``, ``generator``) are passed on; periodic only.
        """
        if self.boundary != "periodic":
            raise ValueError("Ising2D.monte_carlo: the Monte-Carlo sampler is for periodic boundaries only.")
        return ising2d_monte_carlo(self.L, theta, **kw)


# ----------------------------------------------------------------------------- 2-D Ising at h = 0, any L
class IsingTorus(GibbsModel):
    r"""The ``L × L`` periodic square-lattice Ising model at zero field, exact for any ``L``, per site; ``θ = (β,)``.

    Kaufman's product formula for the torus (B. Kaufman, "Crystal statistics. II. Partition function evaluated by
    spinor analysis", Phys. Rev. 76, 1232 (1949); in the form of A. E. Ferdinand and M. E. Fisher, "Bounded and
    inhomogeneous Ising models. I. Specific-heat anomaly of a finite lattice", Phys. Rev. 185, 832 (1969)), with
    ``K = β`` (bonds counted once, as in :class:`Ising2D`):

    ``Z = ½ (2 sinh 2K)^{N/2} (Z₁ + Z₂ + Z₃ + Z₄)``, ``Z₁ = Π_{r=0}^{L−1} 2 cosh(L γ_{2r+1}/2)``,
    ``Z₂ = Π 2 sinh(L γ_{2r+1}/2)``, ``Z₃ = Π 2 cosh(L γ_{2r}/2)``, ``Z₄ = Π 2 sinh(L γ_{2r}/2)``, where
    ``cosh γ_l = cosh 2K coth 2K − cos(lπ/L)`` (``γ_l > 0``, ``l ≥ 1``) and ``γ₀ = 2K + ln tanh K`` keeps its sign
    (negative above the critical temperature, so ``Z₄ < 0`` there).  It is evaluated as
    ``log Z₁ + log1p(Z₂/Z₁ + (Z₃/Z₁)(1 + Z₄/Z₃))`` with the ratios as products of ``tanh`` (smooth through
    ``γ₀ = 0`` at ``β_c``, no cancellation), all in torch ops, so :meth:`metric` — the ``1 × 1`` Hessian of
    ``log Z / N``, i.e. ``Var[E_b] / N``, the specific heat per site divided by ``β²`` — is exact to round-off
    for every ``L`` at a cost of ``O(L)`` per evaluation.  It equals ``Ising2D(L).metric((β, 0))[0, 0]``
    (tested for ``L = 2 … 8``).  No field: for ``h ≠ 0`` use :class:`Ising2D` (``L ≤ 10``) or Monte Carlo.

    Args:
        L: linear size, an int ``>= 2``.

    Raises:
        ValueError: ``L < 2``; ``β <= 0`` or non-finite (the formula holds for ``β > 0``; ``β = 0`` is the
        trivial ``log 2``).
    """

    dim = 1

    def __init__(self, L: int):
        if isinstance(L, bool) or not isinstance(L, int):
            raise TypeError(f"IsingTorus: L must be an int, got {type(L).__name__}.")
        if L < 2:
            raise ValueError(f"IsingTorus: L must be >= 2, got L={L}.")
        self.L = L
        self.n_sites = L * L
        self._cos = torch.cos(torch.arange(1, 2 * L, dtype=DTYPE) * math.pi / L)  # cos(lπ/L), l = 1 .. 2L−1

    def log_partition(self, theta) -> Tensor:
        """Per-site ``log Z / L²`` at ``h = 0`` (0-d tensor)."""
        b = _theta(theta, 1, "IsingTorus.log_partition")[0]
        if not _all_positive(b):
            raise ValueError(f"IsingTorus: beta must be > 0 (Kaufman's formula), got {float(b)!r}.")
        return self._log_z(b.reshape(1))[0]

    def _log_z(self, b: Tensor) -> Tensor:
        """Per-site ``log Z / L²`` for couplings ``b (K,)``, elementwise, shape ``(K,)``."""
        b = b[:, None]
        gamma = torch.cat(
            [2 * b + torch.log(torch.tanh(b)), torch.acosh(torch.cosh(2 * b) / torch.tanh(2 * b) - self._cos)], 1
        )  # (K, 2L): γ_0 (signed), γ_1 … γ_{2L−1}
        x = self.L * gamma / 2
        odd, even = x[:, 1::2], x[:, 0::2]
        log_z1 = _log_2cosh(odd).sum(1)
        log_z3 = _log_2cosh(even).sum(1)
        # Z₄/Z₃ = tanh(x₀) Π_{r≥1} tanh(x_{2r}): the factor that vanishes at β_c (γ₀ = 0) kept out of the product,
        # whose backward divides by its elements.
        z4_over_z3 = torch.tanh(even[:, 0]) * torch.tanh(even[:, 1:]).prod(1)
        rest = torch.tanh(odd).prod(1) + torch.exp(log_z3 - log_z1) * (1 + z4_over_z3)
        b = b[:, 0]
        log_z = math.log(0.5) + (self.n_sites / 2) * torch.log(2 * torch.sinh(2 * b)) + log_z1 + torch.log1p(rest)
        return log_z / self.n_sites

    def metric_curve(self, betas) -> Tensor:
        """``g_ββ(β) = Var[E_b] / N`` at many couplings at once, ``betas (K,) -> (K,)`` float64 (two reverse passes
        through the batched formula; each coupling is independent, so the gradient of the sum is elementwise).

        Raises:
            ValueError: a coupling ``<= 0`` or non-finite, or ``betas`` not one-dimensional.
        """
        b = torch.as_tensor(betas, dtype=DTYPE).detach().clone()
        if b.dim() != 1 or not bool(torch.isfinite(b).all()) or not bool((b > 0).all()):
            raise ValueError(
                f"IsingTorus.metric_curve: betas must be a 1-D array of finite couplings > 0, got "
                f"shape {tuple(b.shape)}, min {float(b.min()) if b.numel() else float('nan')!r}."
            )
        b.requires_grad_(True)
        with torch.enable_grad():
            (d1,) = torch.autograd.grad(self._log_z(b).sum(), b, create_graph=True)
            (d2,) = torch.autograd.grad(d1.sum(), b)
        return d2

    def specific_heat(self, beta: float) -> float:
        """Specific heat per site ``c = β² Var[E_b] / N = β² g(β)`` (units of ``k_B``, ``J = 1``)."""
        g = self.metric(torch.tensor([float(beta)], dtype=DTYPE))
        return float(beta) ** 2 * float(g[0, 0])


def _log_2cosh(x: Tensor) -> Tensor:
    """``log(2 cosh x)``, smooth to every order of autograd: ``log(2 cosh x)`` for ``|x| < 10``, else
    ``|x| + log1p(e^{−2|x|})`` (each branch fed only the inputs it is safe for, so no NaN leaks through ``where``;
    ``torch.logaddexp(x, −x)`` gives a NaN second derivative for ``|x|`` in the hundreds)."""
    small = x.abs() < 10.0
    xs = torch.where(small, x, torch.zeros_like(x))
    xl = torch.where(small, torch.full_like(x, 10.0), x.abs())
    return torch.where(small, torch.log(2 * torch.cosh(xs)), xl + torch.log1p(torch.exp(-2 * xl)))


def _all_positive(t: Tensor) -> bool:
    """``True`` if every entry is ``> 0``; under ``vmap`` the check cannot be made and passes."""
    try:
        return bool((t > 0).all())
    except RuntimeError:
        return True


# ----------------------------------------------------------------------------- RBM
def rbm_metric(n_visible: int, n_hidden: int) -> Callable[[Tensor], Tensor]:
    r"""Fisher metric of a tiny binary RBM over its flattened weights, by enumeration of ``(v, h)``.

    ``p(v, h) ∝ exp(vᵀ W h)`` with ``v ∈ {0,1}^{n_visible}``, ``h ∈ {0,1}^{n_hidden}`` (no biases), natural
    parameters ``θ = W.flatten()`` (row-major, ``d = n_visible · n_hidden``) and statistics ``φ = (v hᵀ).flatten()``.
    The returned callable maps ``θ (d,) -> g (d, d) = Cov_θ[φ]`` (joint model, not the visible marginal); it is an
    :class:`ExponentialFamily` (with ``log_partition``, ``hessian``) over the ``2^{n_visible + n_hidden}`` states.

    Raises:
        ValueError: sizes < 1 or more than 16 units in all.
    """
    for name, k in (("n_visible", n_visible), ("n_hidden", n_hidden)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"rbm_metric: {name} must be an int >= 1, got {k!r}.")
    if n_visible + n_hidden > 16:
        raise ValueError(f"rbm_metric: enumeration of 2^{n_visible + n_hidden} states is limited to 16 units.")
    states = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n_visible + n_hidden)), dtype=DTYPE)
    v, hid = states[:, :n_visible], states[:, n_visible:]
    phi = (v[:, :, None] * hid[:, None, :]).reshape(len(states), -1)
    return ExponentialFamily(phi)
