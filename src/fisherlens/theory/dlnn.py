r"""Statistical mechanics of deep linear networks, after Luzzatto (2023), chapter 3.

Luzzatto (2023): *Understanding Deep Learning: Deep Linear Neural Networks and Fisher Information*, M.Sc. thesis,
Leiden University (docs/references.md); equation numbers below are the thesis's.  Conventions:
docs/conventions.md#deep-linear-networks.

Setting (§3.1.1).  A single-output linear network with ``L`` hidden layers of widths ``N_1 … N_L``
(``depth = L``; ``depth = 0`` is linear regression without a hidden layer), input dimension ``N_0``::

    f(x; W) = w^{L+1} W^L ⋯ W^1 x = θ(W) · x,        θ(W) = (W^1)ᵀ ⋯ (W^L)ᵀ (w^{L+1})ᵀ ∈ R^{N_0},

trained on ``P`` pairs ``(x^μ, y^μ)`` (rows of ``X`` ∈ R^{P×N_0}, ``y`` ∈ R^P).  The ensemble of trained networks
is the Gibbs distribution at temperature ``T = 1/β`` (eqs 3.3–3.6)::

    p(W) ∝ exp(−β/2 Σ_μ (f(x^μ) − y^μ)²) · Π_ℓ N(W^ℓ; 0, σ²/N_{ℓ−1}),

i.e. the prior weight variance of layer ℓ is ``σ²/N_{ℓ−1}`` (eqs 3.5a–c, 3.54).  *Luzzatto (2023) eq 3.2 writes the
regulariser as* ``T/(2σ²) Σ_ℓ ‖W^ℓ‖²`` *without the fan-in factors* ``N_{ℓ−1}``; *the measures (3.5) that the
whole derivation uses have them, and so do we:* ``βE = β/2 Σ_μ (f − y)² + Σ_ℓ N_{ℓ−1}/(2σ²) ‖W^ℓ‖²``.

The one fact everything here rests on (derived, not in the thesis; it is the content of HZ's eq 3.40): by rotation
invariance of the Gaussian layers, the end-to-end vector under the prior is a Gaussian *scale mixture*::

    θ | s ~ N(0, s I_{N_0}),    s = (σ²/N_0) Π_{ℓ=1}^{L} (σ²/N_ℓ) χ²_{N_ℓ} = a Π_ℓ γ_ℓ,
    a = (σ²/N_0) Π_ℓ (2σ²/N_ℓ),   γ_ℓ ~ Gamma(N_ℓ/2, 1) independent.

Given ``s`` the posterior of θ is Gaussian (Bayesian linear regression), and ``s`` has the one-dimensional
posterior ``p(s | data) ∝ p(s) N(y; 0, s X Xᵀ + T I)``.  At ``T = 0`` the network interpolates: ``θ = θ* + θ_⊥``,
``θ*`` the minimum-norm interpolator (eq 3.41), ``θ_⊥ ~ N(0, s P_⊥)``, so::

    ⟨f(x)⟩ = θ*·x   (eq 3.42a),      Var f(x) = E[s | data] ‖x_⊥‖²,
    E[s | data] = E_prior[s^{1−P/2} e^{−‖θ*‖²/(2s)}] / E_prior[s^{−P/2} e^{−‖θ*‖²/(2s)}] = a G[1]/G[0],

which is eq 3.42b with ``G[k] = G^{L+1,0}_{0,L+1}(b | P/2, N_1/2 + k, …, N_L/2 + k)``, ``b = ‖θ*‖²/(2a)``.

Contents
--------
* :class:`BPKR` — Li–Sompolinsky back-propagating kernel renormalisation: ``u0`` from eq 3.32 (and its
  finite-temperature form, eq 3.24 generalised to depth L), ``r0`` (3.26), mean (3.35), variance (3.36), the
  effective Hamiltonian (3.31).
* :class:`HZ` — Hanin–Zlokapa exact zero-temperature result through Meijer G-functions (3.40–3.42, ``mpmath``),
  the large-width asymptotics (3.43a–c) and ``u0 = σ²(1 + z*)`` (3.45).
* :class:`ExactPosterior` — the same exact posterior at any temperature ``T ≥ 0`` by one-dimensional quadrature
  over ``s`` (the slow, obvious reference for everything else; also ``log Z``).
* :class:`GaussianLimit` — the Gaussian (NNGP) limit of §3.3: kernel ``σ^{2L} K_0`` (3.65–3.66), and
  ``⟨H⟩`` of eq 3.64.
* :func:`sample_posterior` — ensembles of networks drawn from ``p(W)``: blocked Gibbs (each layer's conditional is
  exactly Gaussian) or MALA (Metropolis-adjusted Langevin on the regularised loss); batched over chains.

All theory is float64 (numpy / mpmath); the sampler is torch float64 with a ``torch.Generator``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import mpmath
import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import digamma, gammaln, logsumexp, polygamma
from tqdm.auto import tqdm

__all__ = [
    "BPKR",
    "HZ",
    "ExactPosterior",
    "GaussianLimit",
    "PosteriorSamples",
    "bpkr",
    "gaussian_limit",
    "hz",
    "exact_posterior",
    "sample_posterior",
    "scale_grid",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence


# ----------------------------------------------------------------------------- data and shared algebra
def _as_array(v, name: str, ndim: tuple[int, ...]) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a numeric array or tensor, got {type(v).__name__}.") from e
    if a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimension(s), got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values.")
    return a


def _check_pos(v, name: str, allow_zero: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {v!r}.") from e
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'≥ 0' if allow_zero else '> 0'} and finite, got {v!r}.")
    return f


def _check_depth(depth) -> int:
    if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth (number of hidden layers L) must be an integer ≥ 0, got {depth!r}.")
    return int(depth)


def _check_widths(width, depth: int) -> tuple[int, ...]:
    ws = (width,) * depth if isinstance(width, (int, np.integer)) and not isinstance(width, bool) else width
    try:
        ws = tuple(ws)
    except TypeError as e:
        raise TypeError(f"width must be an integer or a sequence of {depth} integers, got {width!r}.") from e
    if len(ws) != depth or any(not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1 for n in ws):
        raise ValueError(f"width must be a positive integer or {depth} positive integers (one per hidden layer), "
                         f"got {width!r}.")
    return tuple(int(n) for n in ws)


@dataclass(frozen=True)
class _Data:
    r"""Training set in the eigenbasis of the P × P Gram matrix ``X Xᵀ = U diag(d) Uᵀ``: ``ỹ = Uᵀ y``."""

    X: np.ndarray
    y: np.ndarray
    d: np.ndarray
    U: np.ndarray
    yt: np.ndarray
    theta_star: np.ndarray

    @property
    def P(self) -> int:
        return self.X.shape[0]

    @property
    def N0(self) -> int:
        return self.X.shape[1]

    @property
    def theta_norm2(self) -> float:
        """‖θ*‖² = yᵀ (X Xᵀ)⁻¹ y (eq 3.41 with eq 3.44)."""
        return float(np.sum(self.yt**2 / self.d))

    def project(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """For test inputs x (M, N0) or (N0,): ``c = Uᵀ X x`` (M, P), ``‖x‖²``, ``‖x_⊥‖²`` and whether 1-D."""
        xa = _as_array(x, "x", (1, 2))
        one = xa.ndim == 1
        xa = xa[None] if one else xa
        if xa.shape[1] != self.N0:
            raise ValueError(f"test inputs must have N0 = {self.N0} features, got shape {xa.shape}.")
        c = xa @ self.X.T @ self.U
        n2 = np.sum(xa**2, axis=1)
        # ‖x_⊥‖² = ‖x − P x‖² computed directly (no cancellation): P x = Xᵀ U D⁻¹ c
        xperp = xa - (c / self.d) @ self.U.T @ self.X
        return c, n2, np.sum(xperp**2, axis=1), one


def _data(X, y) -> _Data:
    Xa = _as_array(X, "X", (2,))
    ya = _as_array(y, "y", (1, 2))
    if ya.ndim == 2:
        if ya.shape[1] != 1:
            raise ValueError(f"y must hold one label per input (single-output network), got shape {ya.shape}.")
        ya = ya[:, 0]
    P, N0 = Xa.shape
    if ya.shape[0] != P:
        raise ValueError(f"X has {P} inputs but y has {ya.shape[0]} labels.")
    if P < 1:
        raise ValueError("need at least one training input.")
    if P >= N0:
        raise ValueError(f"the theory of deep linear networks (Luzzatto 2023, §3.2) needs α0 = P/N0 < 1 "
                         f"(interpolation possible); got P = {P}, N0 = {N0}.")
    d, U = np.linalg.eigh(Xa @ Xa.T)
    if d[0] <= 1e-10 * d[-1]:
        raise ValueError("the training inputs are linearly dependent (X Xᵀ is singular); remove duplicates.")
    yt = U.T @ ya
    theta = Xa.T @ (U @ (yt / d))
    return _Data(Xa, ya, d, U, yt, theta)


def _gp_moments(data: _Data, s: float, T: float, x) -> tuple[np.ndarray, np.ndarray]:
    r"""Posterior mean and variance of ``f(x) = θ·x`` for the Gaussian prior ``θ ~ N(0, s I)`` and likelihood
    ``exp(−β/2 ‖Xθ − y‖²)``: with ``c = Uᵀ X x``::

        mean = Σ_i c_i ỹ_i s/(s d_i + T),     var = s ‖x_⊥‖² + T Σ_i (c_i²/d_i) s/(s d_i + T)

    (the second form of ``s‖x‖² − Σ c_i² s²/(s d_i + T)`` has no cancellation).
    """
    c, _, xperp2, one = data.project(x)
    w = s / (s * data.d + T)
    mean = c @ (data.yt * w)
    var = s * xperp2 + T * (c**2 / data.d) @ w
    return (mean[0], var[0]) if one else (mean, var)


# ----------------------------------------------------------------------------- BPKR (Li–Sompolinsky)
@dataclass
class BPKR:
    r"""Back-propagating kernel renormalisation (Li & Sompolinsky; Luzzatto 2023, §3.1), equal hidden widths ``N``.

    Zero temperature (eqs 3.26, 3.32, 3.35, 3.36)::

        K_0 = (σ²/N_0) X Xᵀ,   r_0 = yᵀ K_0⁻¹ y / P,   α = P/N,
        1 − u_0/σ² = α (1 − r_0 / u_0^L),
        ⟨f(x)⟩ = (σ²/N_0) xᵀXᵀ K_0⁻¹ y = θ*·x,
        Var f(x) = u_0^L [ (σ²/N_0) ‖x‖² − (σ⁴/N_0²) xᵀXᵀ K_0⁻¹ X x ] = u_0^L (σ²/N_0) ‖x_⊥‖².

    For ``L ≥ 1`` the left side of eq 3.32 minus the right is strictly decreasing in ``u > 0`` and runs from +∞ to
    −∞, so the root is unique; it is bracketed by doubling/halving and found with ``brentq``.

    Temperature ``T > 0`` (eq 3.24, written there for one layer; its depth-L form, which we derived by the
    same saddle point on the layer scales)::

        N (1 − u/σ²) = Tr(Γ⁻¹ u^L K_0) − yᵀ Γ⁻² u^L K_0 y,     Γ = u^L K_0 + T I,

    and the predictor is the Gaussian process with the renormalised kernel ``u_0^L K_0``.  At ``T > 0`` the root
    need not be unique; all roots on a fine grid are refined and the one maximising the saddle-point action
    (minus eq 3.31's effective Hamiltonian) is kept.

    Attributes:
        u0: the kernel renormalisation factor.
        r0: mean squared read-out (3.26).
        alpha: ``P/N``; ``alpha0`` is ``P/N_0``.
        kernel_scale: ``u0^L``.
    """

    X: ArrayLike
    y: ArrayLike
    depth: int
    width: int
    sigma2: float = 1.0
    temperature: float = 0.0
    u0: float = field(init=False)
    r0: float = field(init=False)

    def __post_init__(self):
        self.depth = _check_depth(self.depth)
        if self.depth >= 1:
            ws = _check_widths(self.width, self.depth)
            if len(set(ws)) != 1:
                raise ValueError(f"BPKR (Luzzatto 2023, §3.1) assumes equal hidden widths, got {ws}; use HZ or "
                                 "ExactPosterior for layer-dependent widths.")
            self.width = ws[0]
        self.sigma2 = _check_pos(self.sigma2, "sigma2")
        self.temperature = _check_pos(self.temperature, "temperature", allow_zero=True)
        self._data = _data(self.X, self.y)
        self._kappa = self.sigma2 * self._data.d / self._data.N0  # eigenvalues of K_0
        self.r0 = float(np.sum(self._data.yt**2 / self._kappa)) / self._data.P
        self.u0 = self._solve()

    @property
    def alpha(self) -> float:
        return self._data.P / self.width if self.depth else 0.0

    @property
    def alpha0(self) -> float:
        return self._data.P / self._data.N0

    @property
    def kernel_scale(self) -> float:
        """``u0^L``: the factor multiplying ``K_0`` in the predictor."""
        return self.u0**self.depth

    def saddle_residual(self, u: float) -> float:
        """Residual of the saddle-point equation divided by N: eq 3.32 (T = 0) or its T > 0 form; 0 at ``u0``."""
        L, s2 = self.depth, self.sigma2
        if L == 0:
            return 0.0
        if self.temperature == 0:
            return (1 - u / s2) - self.alpha * (1 - self.r0 / u**L)
        g = u**L * self._kappa
        den = g + self.temperature
        rhs = np.sum(g / den) - np.sum(self._data.yt**2 * g / den**2)
        return (1 - u / s2) - rhs / self.width

    def effective_hamiltonian(self, u: float | None = None) -> float:
        r"""``βH_0(u)`` of eq 3.31 (``T = 0``; at ``T > 0`` with ``u^L K_0`` → ``Γ = u^L K_0 + T I``)::

            βH_0 = ½ yᵀ Γ⁻¹ y + ½ log det Γ − (LN/2) log u + (LN/2σ²) u.

        ``u0`` is its stationary point (a minimum).  Default ``u = u0``.
        """
        u = self.u0 if u is None else float(u)
        L, N = self.depth, (self.width if self.depth else 0)
        den = u**L * self._kappa + self.temperature
        return float(0.5 * np.sum(self._data.yt**2 / den) + 0.5 * np.sum(np.log(den))
                     - 0.5 * L * N * math.log(u) + 0.5 * L * N * u / self.sigma2)

    def _solve(self) -> float:
        L, s2 = self.depth, self.sigma2
        if L == 0:
            return s2
        f = self.saddle_residual
        if self.temperature == 0:
            if self.r0 <= 0:
                raise ValueError("r0 = 0 (all labels zero): eq 3.32 has no positive root; use nonzero labels.")
            lo, hi = s2, s2
            for _ in range(2000):
                if f(lo) > 0:
                    break
                lo /= 2
            for _ in range(2000):
                if f(hi) < 0:
                    break
                hi *= 2
            if not (f(lo) > 0 > f(hi)):
                raise ValueError("could not bracket the root of eq 3.32 (check the data scale).")
            return brentq(f, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
        # T > 0: f(0+) = 1 > 0, and f(u) < 0 for u > σ²(1 + ‖y‖²/(4 T N)) (bound derived in the docstring's setting)
        hi = s2 * (1 + float(np.sum(self._data.yt**2)) / (4 * self.temperature * self.width)) * 1.01
        grid = np.geomspace(s2 * 1e-12, hi, 4000)
        vals = np.array([f(u) for u in grid])
        roots = [brentq(f, grid[i], grid[i + 1], xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
                 for i in np.nonzero(np.sign(vals[:-1]) * np.sign(vals[1:]) < 0)[0]]
        if not roots:
            raise ValueError("no root of the finite-temperature saddle-point equation was found on (0, "
                             f"{hi:.3g}]; check the data scale and temperature.")
        return min(roots, key=self.effective_hamiltonian)

    def mean(self, x) -> np.ndarray:
        """⟨f(x)⟩ (eq 3.35 at T = 0); x (M, N0) → (M,), or (N0,) → scalar."""
        return _gp_moments(self._data, self.sigma2 * self.kernel_scale / self._data.N0, self.temperature, x)[0]

    def variance(self, x) -> np.ndarray:
        """Var f(x) (eq 3.36 at T = 0) — the variance across the ensemble of trained networks."""
        return _gp_moments(self._data, self.sigma2 * self.kernel_scale / self._data.N0, self.temperature, x)[1]


def bpkr(X, y, depth: int, width: int, sigma2: float = 1.0, temperature: float = 0.0) -> BPKR:
    """:class:`BPKR` (functional spelling)."""
    return BPKR(X, y, depth, width, sigma2, temperature)


# ----------------------------------------------------------------------------- Gaussian limit (§3.3)
@dataclass
class GaussianLimit:
    r"""The Gaussian limit of Luzzatto (2023, §3.3) (any widths; single output, ``σ_ℓ = σ``).

    Dropping the kernel renormalisation (approximation (III), ``N → ∞`` at fixed P) leaves the Gaussian process with
    kernel ``σ^{2L} K_0 = (σ^{2(L+1)}/N_0) X Xᵀ`` (eqs 3.65–3.66): θ ~ N(0, σ^{2(L+1)}/N_0 I).  Its predictor is
    BPKR with ``u0 = σ²`` (eq 3.32 at α = 0)::

        ⟨f(x)⟩ = k(x)ᵀ (σ^{2L}K_0 + T I)⁻¹ y,    Var f(x) = σ^{2(L+1)}/N_0 ‖x‖² − k(x)ᵀ(σ^{2L}K_0 + T I)⁻¹ k(x),

    → ``θ*·x`` and ``σ^{2(L+1)}/N_0 ‖x_⊥‖²`` at T = 0.

    :meth:`expected_energy` is ``⟨H⟩`` of eq 3.64 (prior average of the loss; output width 1).  Luzzatto (2023) eq 3.61
    calls ``⟨e^{−βH}⟩ → e^{−β⟨H⟩}`` a low-temperature saddle point; it is Jensen's inequality
    ``⟨e^{−βH}⟩ ≥ e^{−β⟨H⟩}``, tight to first order in **β → 0** (the cumulant expansion
    ``log⟨e^{−βH}⟩ = −β⟨H⟩ + β² Var H/2 − …``) — consistent with §3.3.2, which needs β/N_0 ≪ 1.  Eq 3.62 also drops
    a factor 2 in the cross term ``−2⟨f⟩y`` (irrelevant since ⟨f⟩ = 0 under the prior).  Both are checked against
    :meth:`ExactPosterior.log_partition` in the tests.
    """

    X: ArrayLike
    y: ArrayLike
    depth: int
    sigma2: float = 1.0
    temperature: float = 0.0

    def __post_init__(self):
        self.depth = _check_depth(self.depth)
        self.sigma2 = _check_pos(self.sigma2, "sigma2")
        self.temperature = _check_pos(self.temperature, "temperature", allow_zero=True)
        self._data = _data(self.X, self.y)

    @property
    def prior_scale(self) -> float:
        """``σ^{2(L+1)}/N_0``: prior variance of each component of θ."""
        return self.sigma2 ** (self.depth + 1) / self._data.N0

    def mean(self, x) -> np.ndarray:
        return _gp_moments(self._data, self.prior_scale, self.temperature, x)[0]

    def variance(self, x) -> np.ndarray:
        return _gp_moments(self._data, self.prior_scale, self.temperature, x)[1]

    def expected_energy(self) -> float:
        """``⟨H⟩ = ½ Σ_μ [σ^{2(L+1)}/N_0 ‖x^μ‖² + (y^μ)²]`` (eq 3.64)."""
        return 0.5 * float(self.prior_scale * np.sum(self._data.X**2) + np.sum(self._data.y**2))


def gaussian_limit(X, y, depth: int, sigma2: float = 1.0, temperature: float = 0.0) -> GaussianLimit:
    """:class:`GaussianLimit` (functional spelling)."""
    return GaussianLimit(X, y, depth, sigma2, temperature)


# ----------------------------------------------------------------------------- quadrature over the scale s
def scale_grid(shapes: Sequence[float], points_per_sd: int = 50) -> tuple[np.ndarray, np.ndarray]:
    r"""Discretised law of ``V = Σ_ℓ log γ_ℓ`` with ``γ_ℓ ~ Gamma(k_ℓ, 1)`` independent.

    Each ``log γ`` has density ``exp(k v − e^v − log Γ(k))`` (mean ψ(k), s.d. √ψ'(k)); it is sampled on a common
    uniform grid (spacing ``min_ℓ s.d./points_per_sd``, range mean − max(15 s.d., 60/k) … mean + 15 s.d.), and the
    densities are convolved directly (``np.convolve``: exact sums of positive terms, so tails keep their relative
    accuracy, unlike an FFT).  The Riemann sum of a smooth, rapidly decaying integrand converges faster than any
    power of the spacing.

    Returns:
        ``(v, log_w)``: grid (n,) and log quadrature weights (n,) with ``Σ exp(log_w) g(v) ≈ E g(V)``.
    """
    ks = [float(k) for k in shapes]
    if not ks:
        return np.zeros(1), np.zeros(1)
    if any(k <= 0 for k in ks):
        raise ValueError(f"Gamma shapes must be positive, got {shapes!r}.")
    sds = [math.sqrt(float(polygamma(1, k))) for k in ks]
    h = min(sds) / points_per_sd
    pmf, v0, log_off = np.ones(1), 0.0, 0.0
    for k, sd in zip(ks, sds, strict=True):
        mu = float(digamma(k))
        lo = mu - max(15 * sd, 60.0 / k)
        n = int(math.ceil((mu + 15 * sd - lo) / h)) + 1
        v = lo + h * np.arange(n)
        lp = k * v - np.exp(v) - gammaln(k) + math.log(h)
        mx = lp.max()
        pmf = np.convolve(pmf, np.exp(lp - mx))
        log_off += mx
        v0 += lo
    with np.errstate(divide="ignore"):
        log_w = np.log(pmf) + log_off
    v = v0 + h * np.arange(len(pmf))
    keep = log_w > log_w.max() - 700
    return v[keep], log_w[keep]


@dataclass
class ExactPosterior:
    r"""Exact ensemble statistics of a deep linear network at any temperature ``T ≥ 0`` by quadrature over ``s``.

    With ``s = a Π_ℓ γ_ℓ`` (module docstring), ``X Xᵀ = U diag(d) Uᵀ``, ``ỹ = Uᵀy``, ``c = UᵀXx``::

        p(s | data) ∝ p(s) Π_i (s d_i + T)^{−1/2} exp(−ỹ_i²/(2(s d_i + T))),
        E[f(x) | s] = Σ_i c_i ỹ_i s/(s d_i + T),    Var[f(x) | s] = s ‖x_⊥‖² + T Σ_i (c_i²/d_i) s/(s d_i + T),
        ⟨f(x)⟩ = E_s E[f|s],   Var f(x) = E_s Var[f|s] + Var_s E[f|s].

    ``E_s`` is the quadrature of :func:`scale_grid` (``depth = 0``: ``s = σ²/N_0`` exactly).  At ``T = 0`` this is
    HZ's result (eq 3.42) evaluated without Meijer G-functions; at ``T > 0`` it is what a finite-temperature
    sampler must reproduce.  Any hidden widths (``width`` an int or one per layer).
    """

    X: ArrayLike
    y: ArrayLike
    depth: int
    width: int | Sequence[int] = 1
    sigma2: float = 1.0
    temperature: float = 0.0
    points_per_sd: int = 50

    def __post_init__(self):
        self.depth = _check_depth(self.depth)
        self.widths = _check_widths(self.width, self.depth)
        self.sigma2 = _check_pos(self.sigma2, "sigma2")
        self.temperature = _check_pos(self.temperature, "temperature", allow_zero=True)
        self._data = _data(self.X, self.y)
        N0 = self._data.N0
        self.a = self.sigma2 / N0 * math.prod(2 * self.sigma2 / n for n in self.widths)
        v, log_prior = scale_grid([n / 2 for n in self.widths], self.points_per_sd)
        s = self.a * np.exp(v)
        loglik = self._loglik(s)
        lw = log_prior + loglik
        self._log_prior, self._loglik_s = log_prior, loglik
        keep = lw > lw.max() - 80
        self.s = s[keep]
        self.weights = np.exp(lw[keep] - logsumexp(lw[keep]))

    def _loglik(self, s: np.ndarray) -> np.ndarray:
        d, yt, T = self._data.d, self._data.yt, self.temperature
        if T == 0:
            return -0.5 * self._data.P * np.log(s) - 0.5 * self._data.theta_norm2 / s
        den = s[:, None] * d + T
        return -0.5 * np.sum(np.log(den), axis=1) - 0.5 * np.sum(yt**2 / den, axis=1)

    @property
    def scale_mean(self) -> float:
        """``E[s | data]`` (at T = 0: ``a G[1]/G[0]``)."""
        return float(self.weights @ self.s)

    def mean(self, x) -> np.ndarray:
        c, _, _, one = self._data.project(x)
        A = self.weights @ (self.s[:, None] / (self.s[:, None] * self._data.d + self.temperature))  # (P,)
        m = c @ (self._data.yt * A)
        return m[0] if one else m

    def variance(self, x) -> np.ndarray:
        c, _, xperp2, one = self._data.project(x)
        d, T = self._data.d, self.temperature
        R = self.s[:, None] / (self.s[:, None] * d + T)  # (G, P)
        A = self.weights @ R
        within = self.scale_mean * xperp2 + T * (c**2 / d) @ A
        between = self.weights @ (((R - A) * self._data.yt) @ c.T) ** 2 if T > 0 else 0.0 * xperp2
        v = within + between
        return v[0] if one else v

    def log_partition(self) -> float:
        r"""``log Z = log ⟨exp(−β/2 Σ_μ (f(x^μ) − y^μ)²)⟩_prior`` (eqs 3.39, 3.60; requires T > 0)::

            Z = E_s[(2πT)^{P/2} N(y; 0, s X Xᵀ + T I)] = E_s[Π_i (T/(s d_i + T))^{1/2} e^{−ỹ_i²/(2(s d_i+T))}].
        """
        if self.temperature == 0:
            raise ValueError("log Z diverges at T = 0; use a positive temperature.")
        ll = self._loglik_s + 0.5 * self._data.P * math.log(self.temperature)
        return float(logsumexp(self._log_prior + ll))


def exact_posterior(X, y, depth: int, width=1, sigma2: float = 1.0, temperature: float = 0.0) -> ExactPosterior:
    """:class:`ExactPosterior` (functional spelling)."""
    return ExactPosterior(X, y, depth, width, sigma2, temperature)


# ----------------------------------------------------------------------------- HZ (Meijer G)
@dataclass
class HZ:
    r"""Hanin–Zlokapa exact zero-temperature posterior (Luzzatto 2023, §3.2, eqs 3.40–3.45); any widths per layer.

    ::

        ⟨f(x)⟩ = θ*·x                                                              (3.42a)
        Var f(x) = ½ [Π_{ℓ=0}^{L} 2σ²/N_ℓ] ‖x_⊥‖² G[1]/G[0]                          (3.42b)
        G[k] = G^{L+1,0}_{0,L+1}( [Π_{ℓ=0}^{L} N_ℓ/(2σ²)] ‖θ*‖²  |  P/2, N_1/2 + k, …, N_L/2 + k ).

    (Derivation: module docstring; ``G(b | 0, c_1…c_L) = ∫ Π dγ_ℓ γ_ℓ^{c_ℓ−1} e^{−γ_ℓ} e^{−b/Πγ}``, the Mellin–Barnes
    integral of A.1 with ``e^{−z} = (2πi)⁻¹ ∫ Γ(t) z^{−t} dt``, shifted by P/2 with A.3b.)

    ``method``: ``"meijerg"`` — ``mpmath.meijerg`` at ``dps`` digits (fails for very large parameters, where mpmath's
    series needs thousands of bits); ``"quadrature"`` — the defining integral by :func:`scale_grid`; ``"auto"``
    (default) — mpmath, falling back to quadrature with a warning when mpmath does not converge.
    ``method_used`` records which.

    Large-width asymptotics (equal widths N, ``α = P/N``, ``α0 = P/N_0``; eqs 3.43a–c)::

        (1 + z*/α)(1 + z*)^L = ‖θ*‖² / (σ^{2(L+1)} α0),   z* > max(−α, −1),
        log G[k] ≈ (Nα/2)[log(Nα/2) + log(1 + z*/α) − (1 + z*/α)] + (NL/2)[log(N/2) + log(1+z*) − (1+z*)]
                   + k L [log(N/2) + log(1 + z*)],

    with ``u0 = σ²(1 + z*)`` (eq 3.45).  *Luzzatto (2023) writes the domain as* ``z* > min{−α, −1}``; *both factors
    must be positive, i.e.* ``z* > max{−α, −1}``, *on which the left side increases from 0 to ∞ (unique root).*
    """

    X: ArrayLike
    y: ArrayLike
    depth: int
    width: int | Sequence[int] = 1
    sigma2: float = 1.0
    dps: int = 30
    method: str = "auto"

    def __post_init__(self):
        self.depth = _check_depth(self.depth)
        self.widths = _check_widths(self.width, self.depth)
        self.sigma2 = _check_pos(self.sigma2, "sigma2")
        if not isinstance(self.dps, int) or self.dps < 15:
            raise ValueError(f"dps (mpmath decimal digits) must be an integer ≥ 15, got {self.dps!r}.")
        if self.method not in ("auto", "meijerg", "quadrature"):
            raise ValueError(f"method must be 'auto', 'meijerg' or 'quadrature', got {self.method!r}.")
        self._data = _data(self.X, self.y)
        N0 = self._data.N0
        self.theta_star = self._data.theta_star
        self.prefactor = 0.5 * (2 * self.sigma2 / N0) * math.prod(2 * self.sigma2 / n for n in self.widths)
        self.argument = self._data.theta_norm2 / (2 * self.prefactor)  # [Π N_ℓ/(2σ²)] ‖θ*‖²
        self.method_used = ""
        self._log_g: dict[int, float] = {}

    # -- exact
    def log_G(self, k: int) -> float:
        """``log G[k]`` (natural log), by the configured method."""
        if k not in self._log_g:
            self._log_g[k] = self._eval(k)
        return self._log_g[k]

    def _eval(self, k: int) -> float:
        if self.method in ("auto", "meijerg"):
            try:
                val = self.log_G_meijerg(k)
                self.method_used = self.method_used or "meijerg"
                return val
            except (mpmath.libmp.NoConvergence, ValueError, ZeroDivisionError) as e:
                if self.method == "meijerg":
                    raise ValueError(f"mpmath.meijerg did not converge for G[{k}] (argument {self.argument:.3g}, "
                                     f"P = {self._data.P}, widths {self.widths}); use method='quadrature'.") from e
                warnings.warn(f"mpmath.meijerg did not converge for G[{k}]; using quadrature.", stacklevel=3)
        self.method_used = "quadrature"
        return self.log_G_quadrature(k)

    def log_G_meijerg(self, k: int, maxprec: int = 4000) -> float:
        """``log G[k]`` with ``mpmath.meijerg`` at ``self.dps`` decimal digits."""
        P = self._data.P
        with mpmath.workdps(self.dps):
            b = [mpmath.mpf(P) / 2] + [mpmath.mpf(n) / 2 + k for n in self.widths]
            g = mpmath.meijerg([[], []], [b, []], mpmath.mpf(self.argument), maxprec=maxprec)
            if not g > 0:
                raise ValueError(f"mpmath.meijerg returned {g} for G[{k}].")
            return float(mpmath.log(g))

    def log_G_quadrature(self, k: int) -> float:
        r"""``log G[k]`` from ``G(b | P/2, c_ℓ) = b^{P/2} Π Γ(c_ℓ) E_{γ_ℓ ~ Gamma(c_ℓ)}[(Πγ)^{−P/2} e^{−b/Πγ}]``,
        ``c_ℓ = N_ℓ/2 + k``, by :func:`scale_grid`."""
        P, b = self._data.P, self.argument
        shapes = [n / 2 + k for n in self.widths]
        v, lw = scale_grid(shapes)
        if not self.widths:
            v, lw = np.zeros(1), np.zeros(1)
        return float(0.5 * P * math.log(b) + sum(gammaln(c) for c in shapes)
                     + logsumexp(lw - 0.5 * P * v - b * np.exp(-v)))

    @property
    def ratio(self) -> float:
        """``G[1]/G[0]``."""
        return math.exp(self.log_G(1) - self.log_G(0)) if self.depth else 1.0

    @property
    def scale_mean(self) -> float:
        """``E[s | data] = ½ Π(2σ²/N_ℓ) · G[1]/G[0]`` — posterior variance per direction orthogonal to the data."""
        return self.prefactor * self.ratio

    def mean(self, x) -> np.ndarray:
        """``θ*·x`` (eq 3.42a)."""
        c, _, _, one = self._data.project(x)
        m = c @ (self._data.yt / self._data.d)
        return m[0] if one else m

    def variance(self, x) -> np.ndarray:
        """Eq 3.42b."""
        _, _, xperp2, one = self._data.project(x)
        v = self.scale_mean * xperp2
        return v[0] if one else v

    # -- asymptotics (equal widths)
    def _equal_width(self) -> int:
        if self.depth == 0 or len(set(self.widths)) != 1:
            raise ValueError("the large-width asymptotics (eq 3.43) need depth ≥ 1 and equal hidden widths.")
        return self.widths[0]

    @property
    def z_star(self) -> float:
        """Root of eq 3.43c."""
        N, L = self._equal_width(), self.depth
        alpha, alpha0 = self._data.P / N, self._data.P / self._data.N0
        rhs = self._data.theta_norm2 / (self.sigma2 ** (L + 1) * alpha0)

        def g(q):  # q = 1 + z; log form is monotone and well scaled
            return math.log1p((q - 1) / alpha) + L * math.log(q) - math.log(rhs)

        lo = max(0.0, 1 - alpha) * (1 + 1e-15) + 1e-300
        hi = 2.0
        while g(hi) < 0:
            hi *= 2
        while g(lo) > 0:  # only when lo is at the open boundary: g → −∞ there, so this ends
            lo = 0.5 * (lo + max(0.0, 1 - alpha))
        return brentq(g, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500) - 1

    def log_G_asymptotic(self, k: int) -> float:
        """Eqs 3.43a + 3.43b: ``log G[k]`` up to O(log N)."""
        N, L = self._equal_width(), self.depth
        alpha = self._data.P / N
        z = self.z_star
        qa, q = 1 + z / alpha, 1 + z
        return (0.5 * N * alpha * (math.log(0.5 * N * alpha) + math.log(qa) - qa)
                + 0.5 * N * L * (math.log(0.5 * N) + math.log(q) - q) + k * L * (math.log(0.5 * N) + math.log(q)))

    @property
    def ratio_asymptotic(self) -> float:
        """``(N(1 + z*)/2)^L`` (eq 3.49 with 3.45)."""
        return (0.5 * self._equal_width() * (1 + self.z_star)) ** self.depth

    def variance_asymptotic(self, x) -> np.ndarray:
        """Eq 3.50: ``u0^L (σ²/N_0) ‖x_⊥‖²`` with ``u0 = σ²(1 + z*)`` — equals :meth:`BPKR.variance` at T = 0."""
        _, _, xperp2, one = self._data.project(x)
        v = self.prefactor * self.ratio_asymptotic * xperp2
        return v[0] if one else v


def hz(X, y, depth: int, width=1, sigma2: float = 1.0, dps: int = 30, method: str = "auto") -> HZ:
    """:class:`HZ` (functional spelling)."""
    return HZ(X, y, depth, width, sigma2, dps, method)


# ----------------------------------------------------------------------------- ensembles: posterior samplers
@dataclass
class PosteriorSamples:
    r"""Per-chain averages from :func:`sample_posterior` (chains are independent, so chain-to-chain spread gives
    honest standard errors: each chain's time average is one "batch mean").

    Attributes:
        chain_f: (C, M) per-chain average of ``f(x_t)``; ``chain_f2``: (C, M) average of ``f(x_t)²``.
        chain_scale: (C,) per-chain average of ``‖θ_⊥‖²/(N_0 − P)`` (θ_⊥ = part of θ orthogonal to the training
            inputs; its law given s is N(0, s P_⊥) at every T, so this estimates ``E[s | data]``).
        chain_residual: (C,) per-chain average of ``(1/P) Σ_μ (f(x^μ) − y^μ)²``.
        scale_halves: (C, 2) the scale average over the first and second half of the kept samples (a
            convergence diagnostic: see :meth:`drift`).
        samples: kept samples per chain; acceptance: MALA acceptance rate after burn-in (1 for Gibbs);
        step_size: MALA step (None for Gibbs); method.
    """

    chain_f: torch.Tensor
    chain_f2: torch.Tensor
    chain_scale: torch.Tensor
    chain_residual: torch.Tensor
    scale_halves: torch.Tensor
    samples: int
    acceptance: float
    step_size: float | None
    method: str

    @property
    def chains(self) -> int:
        return self.chain_f.shape[0]

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """``(⟨f(x_t)⟩, s.e.)`` over the pooled samples, each (M,)."""
        m = self.chain_f.double().numpy()
        return m.mean(0), m.std(0, ddof=1) / math.sqrt(m.shape[0])

    def _jackknife(self, stat) -> tuple[np.ndarray, np.ndarray]:
        m, q = self.chain_f.double().numpy(), self.chain_f2.double().numpy()
        C = m.shape[0]
        full = stat(m.mean(0), q.mean(0))
        mj = (m.sum(0) - m) / (C - 1)
        qj = (q.sum(0) - q) / (C - 1)
        loo = stat(mj, qj)  # (C, ...)
        se = np.sqrt((C - 1) / C * np.sum((loo - loo.mean(0)) ** 2, axis=0))
        return full, se

    def variance(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Var f(x_t), s.e.)``: pooled ``⟨f²⟩ − ⟨f⟩²`` with a jackknife over chains, each (M,)."""
        return self._jackknife(lambda m, q: q - m**2)

    def average_variance(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """``Σ_t w_t Var f(x_t)`` (default ``w_t = 1/M``) with its jackknife s.e."""
        M = self.chain_f.shape[1]
        w = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, dtype=float)
        v, se = self._jackknife(lambda m, q: (q - m**2) @ w)
        return float(v), float(se)

    def scale(self) -> tuple[float, float]:
        """``(E[s | data] estimate, s.e.)`` from ``‖θ_⊥‖²/(N_0 − P)``."""
        s = self.chain_scale.double().numpy()
        return float(s.mean()), float(s.std(ddof=1) / math.sqrt(len(s)))

    def drift(self) -> float:
        """Split-run diagnostic: (second-half − first-half mean of the scale estimate) / its s.e. over chains.
        ``|drift| ≳ 3`` means the chains were still relaxing (burn-in too short or slow mixing): do not trust the
        run.  (For Gibbs at low T this happens when N ≤ P: each hidden layer's conditional is then pinned by the
        P constraints and the overall scale moves slowly.)"""
        d = (self.scale_halves[:, 1] - self.scale_halves[:, 0]).double().numpy()
        return float(d.mean() / (d.std(ddof=1) / math.sqrt(len(d)) + 1e-300))


def _forward_theta(Ws: list[torch.Tensor]) -> torch.Tensor:
    """End-to-end vectors θ (C, N_0) = w^{L+1} W^L ⋯ W^1 for stacked layers ``Ws[ℓ]`` (C, N_ℓ, N_{ℓ−1})."""
    a = Ws[-1][:, 0, :]
    for W in reversed(Ws[:-1]):
        a = torch.einsum("co,coi->ci", a, W)
    return a


def _gibbs_sweep(Ws, variances, X, y, T, gen) -> None:
    r"""One systematic-scan blocked Gibbs sweep, in place.  With everything but layer ℓ fixed,
    ``f(x^μ) = aᵀ W^ℓ h^μ`` is linear in W^ℓ (a = downstream row vector, h^μ = input to layer ℓ), so the conditional
    is Gaussian; it is sampled exactly by Matheron's rule: ``W0 ~ prior``, ``ε ~ N(0, T I)``,
    ``W = W0 + v a ⊗ (Hᵀ c)``, ``c = (v ‖a‖² H Hᵀ + T I)⁻¹ (y − f(W0) − ε)``."""
    C, P = Ws[0].shape[0], X.shape[0]
    n = len(Ws)
    down = [None] * n  # a for every layer from the current (not yet updated) downstream weights
    a = torch.ones(C, 1, dtype=X.dtype)
    for ell in range(n - 1, -1, -1):
        down[ell] = a
        a = torch.einsum("co,coi->ci", a, Ws[ell])
    H = X.expand(C, *X.shape)
    eye = torch.eye(P, dtype=X.dtype)
    for ell in range(n):
        v, a = variances[ell], down[ell]
        W0 = math.sqrt(v) * torch.randn(Ws[ell].shape, generator=gen, dtype=X.dtype)
        f0 = torch.einsum("cpi,coi,co->cp", H, W0, a)
        K = (v * (a * a).sum(1))[:, None, None] * (H @ H.transpose(1, 2)) + T * eye
        r = y - f0 - math.sqrt(T) * torch.randn(C, P, generator=gen, dtype=X.dtype)
        c = torch.cholesky_solve(r[..., None], torch.linalg.cholesky(K))[..., 0]
        Ws[ell] = W0 + v * a[:, :, None] * torch.einsum("cpi,cp->ci", H, c)[:, None, :]
        H = H @ Ws[ell].transpose(1, 2)


def _check_sampler(data, xt, chains, samples, burn_in, thin, method, target_accept) -> None:
    """Refuse bad options of :func:`sample_posterior`, naming them."""
    if xt.shape[1] != data.N0:
        raise ValueError(f"x_test must have N0 = {data.N0} features, got shape {xt.shape}.")
    for name, v, lo in (("chains", chains, 2), ("samples", samples, 1), ("burn_in", burn_in, 0), ("thin", thin, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}.")
    if method not in ("gibbs", "mala"):
        raise ValueError(f"method must be 'gibbs' or 'mala', got {method!r}.")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept!r}.")


def _mala_step(Zs, U, G, h: float, energy_grad, gen: torch.Generator):
    """One Metropolis-adjusted Langevin step of every chain: ``Z' = Z − h∇H + √(2h) ξ``, accepted with the
    Metropolis–Hastings ratio; returns ``(Zs, U, G, acceptance rate)``."""
    noise = [torch.randn(z.shape, generator=gen, dtype=z.dtype) for z in Zs]
    Zp = [z - h * g + math.sqrt(2 * h) * e for z, g, e in zip(Zs, G, noise, strict=True)]
    Up, Gp = energy_grad(Zp)
    fwd = sum(((zp - z + h * g) ** 2).sum((1, 2)) for zp, z, g in zip(Zp, Zs, G, strict=True))
    bwd = sum(((z - zp + h * gp) ** 2).sum((1, 2)) for zp, z, gp in zip(Zp, Zs, Gp, strict=True))
    log_acc = U - Up + (fwd - bwd) / (4 * h)
    acc = torch.log(torch.rand(U.shape[0], generator=gen, dtype=U.dtype)) < log_acc
    Zs = [torch.where(acc[:, None, None], zp, z) for zp, z in zip(Zp, Zs, strict=True)]
    G = [torch.where(acc[:, None, None], gp, g) for gp, g in zip(Gp, G, strict=True)]
    return Zs, torch.where(acc, Up, U), G, float(acc.double().mean())


class _Tally:
    """Running sums over the kept samples of every chain: f and f² on the test inputs, the per-weight variance
    orthogonal to the data (and its two halves, for a convergence check) and the training residual."""

    def __init__(self, chains: int, m: int, samples: int):
        dt = torch.float64
        self.f, self.f2 = torch.zeros(chains, m, dtype=dt), torch.zeros(chains, m, dtype=dt)
        self.s, self.r = torch.zeros(chains, dtype=dt), torch.zeros(chains, dtype=dt)
        self.halves = torch.zeros(chains, 2, dtype=dt)
        self.samples, self.kept = samples, 0

    def add(self, theta, Xq, Xt, yt, proj, dof: int) -> None:
        f = theta @ Xq.T
        self.f += f
        self.f2 += f * f
        perp = theta - theta @ proj
        sc = (perp * perp).sum(1) / dof
        self.s += sc
        self.halves[:, int(2 * self.kept >= self.samples)] += sc
        self.r += ((theta @ Xt.T - yt) ** 2).mean(1)
        self.kept += 1

    def result(self, acceptance: float, h, method: str) -> PosteriorSamples:
        n1 = (self.samples + 1) // 2
        halves = self.halves / torch.tensor([n1, max(self.samples - n1, 1)], dtype=torch.float64)
        k = self.kept
        return PosteriorSamples(self.f / k, self.f2 / k, self.s / k, self.r / k, halves, k, acceptance, h, method)


def sample_posterior(
    X,
    y,
    x_test,
    depth: int,
    width: int | Sequence[int] = 1,
    sigma2: float = 1.0,
    temperature: float = 1e-2,
    *,
    chains: int = 64,
    samples: int = 200,
    burn_in: int = 100,
    thin: int = 1,
    method: str = "gibbs",
    step_size: float | None = None,
    target_accept: float = 0.574,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> PosteriorSamples:
    r"""Draw an ensemble of deep linear networks from the Gibbs posterior and record ``f`` on test inputs.

    Target (Luzzatto 2023, eqs 3.3–3.6 with the fan-in scaling of eq 3.5)::

        p(W) ∝ exp(−H(W)),   H(W) = β/2 Σ_μ (f(x^μ) − y^μ)² + Σ_{ℓ=1}^{L+1} N_{ℓ−1}/(2σ²) ‖W^ℓ‖²,   β = 1/T.

    ``chains`` independent chains run as one batch (weights stacked as (C, N_ℓ, N_{ℓ−1}); no loop over chains),
    float64, initialised from the prior.

    The two samplers (``method=``):

    * ``"gibbs"`` (default): blocked Gibbs over layers; each layer's conditional is exactly Gaussian (f is linear
      in one layer) and is sampled exactly (Matheron's rule, one P × P Cholesky per layer and chain).  Exactly
      stationary, no step size, mixes well at low T.  For ``depth = 0`` it gives independent exact draws.
    * ``"mala"``: Metropolis-adjusted Langevin on H in prior-whitened coordinates ``Z^ℓ = W^ℓ √(N_{ℓ−1}/σ²)``:
      ``Z' = Z − h∇H + √(2h) ξ``, accepted with the Metropolis–Hastings ratio (exactly stationary); ``h`` is
      adapted towards ``target_accept`` during burn-in only and then frozen.

    Args:
        X (P, N_0), y (P,): training set; x_test (M, N_0): unseen inputs.
        depth: L hidden layers (0 = no hidden layer); width: N or one per hidden layer; sigma2: σ².
        temperature: T > 0.  samples: kept samples per chain, one every ``thin`` sweeps/steps after ``burn_in``.
        step_size: MALA initial h (default from the curvature scale β σ^{2(L+1)} λ_max(X Xᵀ)/N_0).
        generator: torch.Generator (default seeded 0).  progress: tqdm bar.

    Returns:
        :class:`PosteriorSamples`.
    """
    depth = _check_depth(depth)
    widths = _check_widths(width, depth)
    sigma2 = _check_pos(sigma2, "sigma2")
    T = _check_pos(temperature, "temperature")
    data = _data(X, y)
    xt = _as_array(x_test, "x_test", (2,))
    _check_sampler(data, xt, chains, samples, burn_in, thin, method, target_accept)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    dt = torch.float64
    Xt, yt, Xq = torch.from_numpy(data.X).to(dt), torch.from_numpy(data.y).to(dt), torch.from_numpy(xt).to(dt)
    proj = torch.from_numpy(data.X.T @ data.U @ np.diag(1 / data.d) @ data.U.T @ data.X).to(dt)  # P_∥ (N0, N0)
    sizes = [data.N0, *widths, 1]
    variances = [sigma2 / sizes[i] for i in range(depth + 1)]
    shapes = [(chains, sizes[i + 1], sizes[i]) for i in range(depth + 1)]
    Ws = [math.sqrt(v) * torch.randn(s, generator=gen, dtype=dt) for v, s in zip(variances, shapes, strict=True)]
    beta = 1.0 / T

    def energy(Zs):
        Wl = [z * math.sqrt(v) for z, v in zip(Zs, variances, strict=True)]
        f = _forward_theta(Wl) @ Xt.T
        return 0.5 * beta * ((f - yt) ** 2).sum(1) + 0.5 * sum((z * z).sum((1, 2)) for z in Zs)

    def energy_grad(Zs):
        Zs = [z.detach().requires_grad_(True) for z in Zs]
        with torch.enable_grad():
            U = energy(Zs)
            g = torch.autograd.grad(U.sum(), Zs)
        return U.detach(), [gi.detach() for gi in g]

    h = None
    if method == "mala":
        lam = float(data.d[-1]) * sigma2 ** (depth + 1) / data.N0
        h = float(step_size) if step_size is not None else 0.5 / (1 + beta * (depth + 1) * lam)
        if not h > 0:
            raise ValueError(f"step_size must be positive, got {step_size!r}.")
        Zs = [W / math.sqrt(v) for W, v in zip(Ws, variances, strict=True)]
        U, G = energy_grad(Zs)

    tally = _Tally(chains, xt.shape[0], samples)
    accepted, proposals = 0.0, 0
    total = burn_in + samples * thin
    bar = tqdm(total=total, desc=f"dlnn {method} L={depth}", disable=not progress, leave=False)
    for step in range(total):
        if method == "gibbs":
            _gibbs_sweep(Ws, variances, Xt, yt, T, gen)
        else:
            Zs, U, G, rate = _mala_step(Zs, U, G, h, energy_grad, gen)
            if step < burn_in:
                h *= math.exp(0.2 * (rate - target_accept))
            else:
                accepted += rate
                proposals += 1
            Ws = [z * math.sqrt(v) for z, v in zip(Zs, variances, strict=True)]
        if step >= burn_in and (step - burn_in) % thin == thin - 1:
            tally.add(_forward_theta(Ws), Xq, Xt, yt, proj, data.N0 - data.P)
        bar.update(1)
    bar.close()
    return tally.result(accepted / proposals if proposals else 1.0, h, method)
