r"""Mean-field theory of the Fisher eigenvalue statistics of random deep networks.

Karakida, Akaho & Amari (2019), *Universal Statistics of Fisher Information in Deep Neural Networks: Mean Field
Approach*, AISTATS 2019 (docs/references.md); equation numbers below are theirs.  Setting (their §2.2–2.3;
docs/conventions.md#mean-field-theory): a fully connected network
with L weight layers, widths ``M_l = α_l M`` (l = 0 … L−1; ``M_0`` is the input dimension) and C linear
outputs (``M_L = C``),

    u^l = W^l h^{l−1} + b^l,   h^l = φ(u^l),   f = u^L,                                     (eq 5)
    W^l_ij ~ N(0, σ_w²/M_{l−1}),   b^l_i ~ N(0, σ_b²),   x = h^0 ~ N(0, I_{M_0}).           (eq 8)

This is the *standard* parameterisation (the 1/√M_{l−1} sits in the initial variance, not in the forward
pass as in the NTK parameterisation), which is exactly ``nn.Linear`` with weights drawn as above.
The Fisher is the empirical FIM of the Gaussian (σ = 1) output model over T inputs (eq 2),

    F = (1/T) Σ_t Σ_k ∇_θ f_k(x_t) ∇_θ f_k(x_t)ᵀ      (P × P),

and its statistics are means over *all* P eigenvalues, zeros included: ``m_λ = Σ λ_i / P``,
``s_λ = Σ λ_i² / P``.

Macroscopic variables (l = 1 … L; ``q̂^0 = 1``, ``q̂^0_st = 0`` for standard Gaussian inputs):

    q^l    = σ_w² q̂^{l−1} + σ_b²,          q̂^l    = ∫Du φ(√q^l u)²                          (eq 9)
    q^l_st = σ_w² q̂^{l−1}_st + σ_b²,       q̂^l_st = I_φ[q^l, q^l_st]                         (eq 10)
    q̃^l    = σ_w² q̃^{l+1} ∫Du φ'(√q^l u)²,   q̃^L = 1                                         (eq 11)
    q̃^l_st = σ_w² q̃^{l+1}_st I_φ'[q^l, q^l_st], q̃^L_st = 1                                  (eq 12)

with ``I_g[a, b] = E[g(X) g(Y)]`` for a centred Gaussian pair of variances a and covariance b.  Then

    α  = Σ_{l=1}^{L−1} α_l α_{l−1},   κ1 = Σ_{l=1}^{L} (α_{l−1}/α) q̃^l q̂^{l−1},   κ2 = same with _st   (eqs 13, 15)
    m_λ = C κ1 / M,   s_λ = C α ((T−1)/T κ2² + κ1²/T),   λ_max = α ((T−1)/T κ2 + κ1/T) M        (eqs 13, 14, 16)
    η_c = 2(1 + μ) / λ_max                                                                   (Lemma 6, eq 20)

The Gaussian integrals use half-range Gauss–Hermite rules (Gauss rules for the weights ``e^{−u²/2}`` and
``ρ e^{−ρ²/2}`` on ``[0, ∞)``, built once by a discretised Stieltjes/Lanczos procedure): 1-D integrals are
split at u = 0 and 2-D integrals are done in polar coordinates with the angular range split where either
argument changes sign.  Activations that are smooth away from 0 (ReLU, its derivative the step, leaky ReLU,
…) are therefore integrated to spectral accuracy, not only the analytic ones.  Closed forms for linear,
ReLU (arc-cosine kernels) and erf (φ = erf x, Williams' kernel; ``integrator="closed"``) serve as cross-checks.

Also here: the Fisher–Rao norm of Theorem 5 (eq 18), the C = O(M) bounds of §4.3 (eqs 21–22) and the count
bound of Corollary 2.  Odd activations without bias (σ_b² = 0) give ``q̂_st = 0`` in every layer and so κ2 = 0:
the leading order of s_λ and λ_max then vanishes (Karakida et al. 2019, footnote 1) and :func:`meanfield` warns.
Variances may differ per layer (σ_w², σ_b² as sequences of length L).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.linalg import eigh_tridiagonal
from scipy.special import erf as _erf
from scipy.special import expit

__all__ = [
    "ACTIVATIONS", "Activation", "MeanField", "activation", "gaussian_pair", "gaussian_pairs", "gaussian_square",
    "gaussian_squares", "half_range_rule", "meanfield",
]

ArrayLike = float | np.ndarray
Fn = Callable[[np.ndarray], np.ndarray]

N_RADIAL = 48  # nodes of the half-range rules
N_ANGLE = 40  # Gauss–Legendre nodes per angular segment


# ----------------------------------------------------------------------------- quadrature rules
def _jacobi_rule(a: np.ndarray, b: np.ndarray, mu0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule from the Jacobi matrix (diagonal a, off-diagonal b) of a measure of mass mu0 (Golub–Welsch).

    Tridiagonal LAPACK only: multi-threaded BLAS kernels stall on small problems when the cores are
    oversubscribed, and these rules are built on the first call of :func:`meanfield`."""
    nodes, V = eigh_tridiagonal(a, b)
    return nodes, mu0 * V[0] ** 2


def _gauss_from_discrete(x: np.ndarray, w: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n-point Gauss rule of the discrete measure ``Σ w_j δ(x_j)``: Lanczos on diag(x) started at √w (full
    reorthogonalisation, written with ``einsum`` so that no threaded BLAS is involved) gives its Jacobi matrix."""
    q = np.sqrt(w)
    mu0 = float(np.einsum("i,i->", q, q))
    Q = np.zeros((n, len(x)))
    Q[0] = q / math.sqrt(mu0)
    a, b = np.zeros(n), np.zeros(n - 1)
    for k in range(n):
        v = x * Q[k]
        a[k] = np.einsum("i,i->", Q[k], v)
        for _ in range(2):
            v -= np.einsum("ki,k->i", Q[: k + 1], np.einsum("ki,i->k", Q[: k + 1], v))
        if k < n - 1:
            b[k] = math.sqrt(np.einsum("i,i->", v, v))
            Q[k + 1] = v / b[k]
    return _jacobi_rule(a, b, mu0)


@lru_cache(maxsize=8)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre rule on [−1, 1] (Golub–Welsch: ``b_k = k / √(4k² − 1)``)."""
    k = np.arange(1, n)
    return _jacobi_rule(np.zeros(n), k / np.sqrt(4.0 * k * k - 1), 2.0)


@lru_cache(maxsize=8)
def half_range_rule(n: int = N_RADIAL, power: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule for the weight ``u^power e^{−u²/2}`` on ``[0, ∞)`` (half-range Gauss–Hermite).

    Exact for polynomials of degree ≤ 2n − 1 in u (to rounding).  The weight is discretised by 24 × 120-point
    Gauss–Legendre panels on [0, 24] (the tail beyond is below 1e-120 of the mass).

    Returns:
        ``(nodes (n,), weights (n,))``; ``weights.sum() = ∫_0^∞ u^power e^{−u²/2} du``.
    """
    t, wt = _legendre(120)
    edges = np.linspace(0.0, 24.0, 25)
    lo, hi = edges[:-1, None], edges[1:, None]
    x = ((hi - lo) / 2 * t + (hi + lo) / 2).ravel()
    w = ((hi - lo) / 2 * wt).ravel() * x**power * np.exp(-(x**2) / 2)
    return _gauss_from_discrete(x, w, n)


def _rule_size(q: float, homogeneous: bool) -> tuple[int, int]:
    """Node counts ``(n_radial, n_angle)``: few for positively homogeneous φ (the integrands are then exactly
    polynomials in ρ and trigonometric polynomials within each angular segment), more as a saturating φ steepens
    (its transition has width 1/√q).  Accuracy against closed forms (erf): ≤ 1e-10 for q ≤ 10, ≈ 1e-8 at q = 300;
    it degrades slowly beyond (pass explicit node counts)."""
    if homogeneous:
        return 16, 16
    if q <= 3:
        return 32, 32
    if q <= 10:
        return N_RADIAL, N_ANGLE
    if q <= 100:
        return 96, 64
    return 128, 128


def _sizes(q: np.ndarray, homogeneous: bool, n_radial: int | None, n_angle: int | None) -> list[tuple[int, int]]:
    return [(n_radial or nr, n_angle or na) for nr, na in (_rule_size(v, homogeneous) for v in q.tolist())]


def gaussian_squares(
    g: Fn, q: ArrayLike, *, n: int | None = None, homogeneous: bool = False
) -> np.ndarray:
    """``∫Du g(√q u)²`` for each q — the 1-D integrals of Karakida et al. (2019) eqs 9 and 11 — by the half-range
    rule split at 0: ``∫Du h(u) = (2π)^{-1/2} ∫_0^∞ e^{−u²/2} [h(u) + h(−u)] du``, so a kink or jump of g at 0
    costs nothing.

    Args:
        g: vectorised function (numpy in, numpy out); q: variances ``(m,)`` (or a number).
        n: nodes (default from q, see :func:`_rule_size`); homogeneous: see :func:`gaussian_pairs`.

    Returns:
        ``(m,)`` array.
    """
    q = np.atleast_1d(np.asarray(q, dtype=float))
    out = np.empty(len(q))
    sizes = [nr for nr, _ in _sizes(q, homogeneous, n, None)]
    for size in set(sizes):
        idx = np.flatnonzero(np.array(sizes) == size)
        u, w = half_range_rule(size, 0)
        x = np.sqrt(np.maximum(q[idx], 0.0))[:, None] * u  # (k, n)
        vals = np.square(np.asarray(g(x), dtype=float)) + np.square(np.asarray(g(-x), dtype=float))
        out[idx] = vals @ w / math.sqrt(2 * math.pi)
    return out


def gaussian_square(g: Fn, q: float, *, n: int | None = None, homogeneous: bool = False) -> float:
    """Scalar form of :func:`gaussian_squares`: ``∫Du g(√q u)²``."""
    return float(gaussian_squares(g, q, n=n, homogeneous=homogeneous)[0])


def _polar_nodes(c: np.ndarray, n_radial: int, n_angle: int):
    """Nodes of :func:`gaussian_pairs` for correlations ``c (k,)``.

    Returns ``cos θ (k, 4 n_angle)``, angular weights ``(k, 4 n_angle)``, radial nodes and weights ``(n_radial,)``
    and ``perm (k, 4 n_angle)``, the permutation of the angular nodes that maps θ to φ0 − θ (``cos φ0 = c``):
    the node set is symmetric under this reflection, so the second argument ``cos(θ − φ0) = cos(φ0 − θ)`` takes
    the first argument's values, permuted, and φ is evaluated once per node.
    """
    s = np.sqrt(np.maximum(0.0, 1.0 - c * c))
    phi0 = np.arctan2(s, c)[:, None]
    r, wr = half_range_rule(n_radial, 1)
    t, wt = _legendre(n_angle)
    two_pi = 2 * math.pi
    breaks = np.sort(np.mod(np.concatenate([np.full_like(phi0, 0.5 * math.pi), np.full_like(phi0, 1.5 * math.pi),
                                            phi0 + 0.5 * math.pi, phi0 + 1.5 * math.pi], axis=1), two_pi), axis=1)
    lo = breaks
    hi = np.concatenate([breaks[:, 1:], breaks[:, :1] + two_pi], axis=1)  # (k, 4)
    theta = ((hi - lo)[..., None] / 2 * t + (hi + lo)[..., None] / 2).reshape(len(c), -1)
    wtheta = ((hi - lo)[..., None] / 2 * wt).reshape(len(c), -1)
    # segment j = [lo_j, hi_j] reflects onto [φ0 − hi_j, φ0 − lo_j] = segment match_j, with its nodes reversed
    ref_lo, length = np.mod(phi0 - hi, two_pi), hi - lo
    circ = np.abs(np.mod(ref_lo[:, :, None] - lo[:, None, :] + math.pi, two_pi) - math.pi)
    match = np.argmin(circ + np.abs(length[:, :, None] - length[:, None, :]), axis=2)  # (k, 4)
    perm = (match[..., None] * n_angle + np.arange(n_angle - 1, -1, -1)).reshape(len(c), -1)
    return np.cos(theta), wtheta, r, wr, perm


def gaussian_pairs(
    g: Fn, a: ArrayLike, b: ArrayLike, *, n_radial: int | None = None, n_angle: int | None = None,
    homogeneous: bool = False,
) -> np.ndarray:
    """``I_g[a, b] = ∫Dz1 Dz2 g(√a z1) g(√a (c z1 + √(1−c²) z2))``, c = b/a (Karakida et al. 2019, below eq 10).

    Elementwise over ``a, b``.

    Polar coordinates ``z = ρ (cos θ, sin θ)``: ``E h(z) = (1/2π) ∫_0^{2π} dθ ∫_0^∞ ρ e^{−ρ²/2} h dρ``.  Along each
    ray both arguments are ``ρ`` times a constant, so ``ρ`` is integrated with the half-range Gauss–Hermite rule
    for the weight ``ρ e^{−ρ²/2}``; the angular range is split at the four angles where an argument changes sign,
    each segment taking ``n_angle`` Gauss–Legendre nodes.

    Args:
        g: vectorised function (numpy in, numpy out).
        a: variances ``q ≥ 0`` ``(m,)``; b: covariances ``q_st`` ``(m,)`` (``c`` is clipped to [−1, 1]).
        n_radial, n_angle: node counts (default chosen from ``a``, see :func:`_rule_size`).
        homogeneous: g is positively homogeneous on each half-line (linear, ReLU, step): a small rule is exact.

    Returns:
        ``(m,)`` array.
    """
    a = np.atleast_1d(np.asarray(a, dtype=float))
    b = np.broadcast_to(np.asarray(b, dtype=float), a.shape)
    out = np.empty(len(a))
    zero = a <= 0.0
    if zero.any():
        out[zero] = float(np.asarray(g(np.zeros(1)), dtype=float)[0]) ** 2
    sizes = _sizes(a, homogeneous, n_radial, n_angle)
    for size in set(sizes):
        idx = np.flatnonzero(np.array([sz == size for sz in sizes]) & ~zero)
        if not len(idx):
            continue
        c = np.clip(b[idx] / a[idx], -1.0, 1.0)
        cos_t, wtheta, r, wr, perm = _polar_nodes(c, *size)
        G = np.asarray(g(np.sqrt(a[idx])[:, None, None] * cos_t[..., None] * r), dtype=float)  # (k, angles, radii)
        Gp = G[np.arange(len(idx))[:, None], perm]
        out[idx] = np.einsum("ka,kar,r->k", wtheta, G * Gp, wr) / (2 * math.pi)
    return out


def gaussian_pair(
    g: Fn, a: float, b: float, *, n_radial: int | None = None, n_angle: int | None = None, homogeneous: bool = False
) -> float:
    """Scalar form of :func:`gaussian_pairs`: ``I_g[a, b]``."""
    return float(gaussian_pairs(g, a, b, n_radial=n_radial, n_angle=n_angle, homogeneous=homogeneous)[0])


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    """An activation φ with its derivative φ', vectorised over numpy arrays.

    Attributes:
        name: label.
        phi, dphi: ``np.ndarray -> np.ndarray``.
        odd: True when φ is odd (then ``E φ = 0`` and, without bias, ``κ2 = 0``); None when unknown.
        homogeneous: φ and φ' are positively homogeneous on each half-line (linear, ReLU): small exact rules.
        closed: optional closed forms ``(pair_phi, pair_dphi)``, each ``(a, b) -> I[a, b]`` (the 1-D integrals
            are ``I[q, q]``).
    """

    name: str
    phi: Fn
    dphi: Fn
    odd: bool | None = None
    homogeneous: bool = False
    closed: tuple[Callable[[float, float], float], Callable[[float, float], float]] | None = field(
        default=None, repr=False
    )


def _relu_angle(a: float, b: float) -> float:
    return math.acos(min(1.0, max(-1.0, b / a))) if a > 0 else 0.0


def _relu_pair(a: float, b: float) -> float:  # arc-cosine kernel of degree 1 (Cho & Saul 2009)
    th = _relu_angle(a, b)
    return a / (2 * math.pi) * (math.sin(th) + (math.pi - th) * math.cos(th))


def _relu_dpair(a: float, b: float) -> float:  # arc-cosine kernel of degree 0
    return (math.pi - _relu_angle(a, b)) / (2 * math.pi)


def _erf_pair(a: float, b: float) -> float:  # Williams (1997)
    return 2 / math.pi * math.asin(min(1.0, max(-1.0, 2 * b / (1 + 2 * a))))


def _erf_dpair(a: float, b: float) -> float:  # φ' = (2/√π) e^{−x²}: E[e^{−X²−Y²}] = det(I + 2Σ)^{−1/2}
    return 4 / math.pi / math.sqrt((1 + 2 * a) ** 2 - 4 * b * b)


def _sigmoid_d(x: np.ndarray) -> np.ndarray:
    s = expit(x)
    return s * (1 - s)


ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation("linear", lambda x: np.asarray(x, dtype=float), lambda x: np.ones_like(x, dtype=float),
                         True, True, (lambda a, b: b, lambda a, b: 1.0)),
    "relu": Activation("relu", lambda x: np.maximum(x, 0.0), lambda x: (np.asarray(x) > 0).astype(float), False,
                       True, (_relu_pair, _relu_dpair)),
    "tanh": Activation("tanh", np.tanh, lambda x: 1.0 / np.cosh(x) ** 2, True),
    "erf": Activation("erf", _erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-np.square(x)), True, False,
                      (_erf_pair, _erf_dpair)),
    "sigmoid": Activation("sigmoid", expit, _sigmoid_d, False),
}


def activation(spec: str | Activation | tuple[Fn, Fn] | Fn, derivative: Fn | None = None) -> Activation:
    """Resolve an activation: a name (``"relu"``, ``"tanh"``, ``"linear"``, ``"erf"``, ``"sigmoid"``), an
    :class:`Activation`, a pair ``(φ, φ')`` or a callable φ with ``derivative=φ'`` (numpy-vectorised)."""
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key not in ACTIVATIONS:
            raise ValueError(f"unknown activation {spec!r}; known: {', '.join(ACTIVATIONS)}, or pass (phi, dphi).")
        return ACTIVATIONS[key]
    if isinstance(spec, tuple) and len(spec) == 2 and all(map(callable, spec)):
        phi, dphi = spec
    elif callable(spec):
        if derivative is None:
            raise TypeError("a callable activation needs its derivative: pass (phi, dphi) or derivative=dphi.")
        phi, dphi = spec, derivative
    else:
        raise TypeError(f"activation must be a name, an Activation, (phi, dphi) or a callable; got {spec!r}.")
    x = np.linspace(-2.0, 2.0, 5)
    for nm, fn in (("phi", phi), ("dphi", dphi)):
        try:
            y = np.asarray(fn(x), dtype=float)
        except Exception as e:  # noqa: BLE001 - report any failure of user code in one message
            raise TypeError(f"activation {nm} must accept numpy arrays: {e}") from e
        if y.shape != x.shape or not np.all(np.isfinite(y)):
            raise TypeError(f"activation {nm} must map a numpy array elementwise to finite values.")
    return Activation(getattr(phi, "__name__", "custom"), phi, dphi, None)


_resolve_activation = activation  # ``meanfield``'s argument shadows the name


# ----------------------------------------------------------------------------- the theory
def _per_layer(name: str, v, L: int, *, positive: bool = False) -> np.ndarray:
    try:
        arr = np.broadcast_to(np.asarray(v, dtype=float), (L,)).copy() if np.ndim(v) == 0 else np.asarray(v, float)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number or a sequence of {L} numbers, got {v!r}.") from e
    if arr.shape != (L,):
        raise ValueError(f"{name} must be a number or a sequence of {L} numbers (one per weight layer).")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or (positive and np.any(arr == 0)):
        why = (" (a zero weight variance makes the layer's weights 0: the Fisher degenerates and λ_max → 0, "
               "η_c → ∞)") if positive else ""
        raise ValueError(f"{name} must be finite and {'positive' if positive else 'non-negative'}, got {v!r}{why}.")
    return arr


def _width_scale(M, name: str = "M") -> np.ndarray:
    """The width scale(s) M as a float array; refuses M <= 0, NaN, inf (λ_max < 0, η_c < 0 otherwise)."""
    try:
        a = np.asarray(M, dtype=float)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} (the width scale) must be a number or an array of numbers, got {M!r}.") from e
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} (the width scale, M_l = α_l M) must be positive and finite, got {M!r}.")
    return a


def _out(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


@dataclass(eq=False)
class MeanField:
    """Macroscopic variables and eigenvalue statistics of Karakida et al. (2019) (see the module docstring).

    Layer arrays are indexed from 0: ``q[l−1] = q^l`` and ``q_tilde[l−1] = q̃^l`` (l = 1 … L),
    ``q_hat[l] = q̂^l`` (l = 0 … L−1).  Methods take the width scale M (number or array, positive and finite:
    anything else raises ``ValueError``) and return the paper's large-M formulas; ``finite_size=True`` keeps
    the exact parameter count P(M) and the O(1) bias terms (same macroscopic variables — a finite-M refinement
    that is not part of Karakida et al. 2019).

    Attributes:
        activation: the :class:`Activation`.
        sigma_w2, sigma_b2: per-layer variances ``(L,)``.
        depth: L; widths: ``(α_0, …, α_{L−1})``; outputs: C; samples: T (``math.inf``: the expected FIM).
        q, q_st: pre-activation variance / covariance ``q^l, q^l_st`` ``(L,)`` (``q^L`` is ``E f_k²``).
        q_hat, q_hat_st: ``q̂^l, q̂^l_st`` ``(L,)``; q_tilde, q_tilde_st: ``q̃^l, q̃^l_st`` ``(L,)``.
        alpha, kappa1, kappa2: eqs 13 and 15.
        kappa2_vanishes: True when κ2 = 0 (odd φ without bias): the leading κ2 terms of s_λ and λ_max vanish.
    """

    activation: Activation
    sigma_w2: np.ndarray
    sigma_b2: np.ndarray
    depth: int
    widths: np.ndarray
    outputs: int
    samples: float
    q: np.ndarray
    q_st: np.ndarray
    q_hat: np.ndarray
    q_hat_st: np.ndarray
    q_tilde: np.ndarray
    q_tilde_st: np.ndarray
    alpha: float
    kappa1: float
    kappa2: float
    kappa2_vanishes: bool = False

    # -- sizes
    def layer_widths(self, M: int) -> list[int]:
        """Integer widths ``[M_0, …, M_{L−1}, C]`` at scale M (``M_l = round(α_l M)``, at least 1)."""
        M = float(_width_scale(M))
        return [max(1, round(a * M)) for a in self.widths] + [self.outputs]

    def n_params(self, M: ArrayLike) -> ArrayLike:
        """Exact parameter count ``P = Σ_l M_l (M_{l−1} + 1)`` (≈ α M² for large M)."""
        Ms = np.atleast_1d(_width_scale(M))
        P = np.array([sum(w[i + 1] * (w[i] + 1) for i in range(self.depth)) for w in map(self._widths_f, Ms)])
        return _out(P if np.ndim(M) else P[0])

    def _widths_f(self, M: float) -> list[float]:
        return [max(1.0, round(a * M)) for a in self.widths] + [float(self.outputs)]

    def _gram_entries(self, M: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Mean-field NTK entries per output, ``K_ss = Σ_l q̃^l (M_{l−1} q̂^{l−1} + 1)`` and the s≠t analogue."""
        Ms = np.atleast_1d(np.asarray(M, dtype=float))
        Kss, Kst = [], []
        for w in map(self._widths_f, Ms):
            Kss.append(sum(self.q_tilde[i] * (w[i] * self.q_hat[i] + 1) for i in range(self.depth)))
            Kst.append(sum(self.q_tilde_st[i] * (w[i] * self.q_hat_st[i] + 1) for i in range(self.depth)))
        return np.array(Kss), np.array(Kst)

    def _tw(self) -> tuple[float, float]:
        T = self.samples
        return (1.0, 0.0) if math.isinf(T) else ((T - 1) / T, 1 / T)

    # -- statistics
    def mean_eigenvalue(self, M: ArrayLike, *, finite_size: bool = False) -> ArrayLike:
        """``m_λ = C κ1 / M`` (Theorem 1, eq 13); ``finite_size``: ``C K_ss / P(M)``."""
        M = _width_scale(M)
        if not finite_size:
            return _out(self.outputs * self.kappa1 / M)
        Kss, _ = self._gram_entries(M)
        return _out((self.outputs * Kss / np.atleast_1d(self.n_params(M))).reshape(M.shape))

    def second_moment(self, M: ArrayLike, *, finite_size: bool = False) -> ArrayLike:
        """``s_λ = C α ((T−1)/T κ2² + κ1²/T)`` (Theorem 3, eq 14; independent of M);
        ``finite_size``: ``C ((T−1)/T K_st² + K_ss²/T) / P(M)``."""
        M = _width_scale(M)
        a, b = self._tw()
        if not finite_size:
            return _out(np.full(M.shape, self.outputs * self.alpha * (a * self.kappa2**2 + b * self.kappa1**2)))
        Kss, Kst = self._gram_entries(M)
        val = self.outputs * (a * Kst**2 + b * Kss**2) / np.atleast_1d(self.n_params(M))
        return _out(val.reshape(M.shape))

    def max_eigenvalue(self, M: ArrayLike, *, finite_size: bool = False) -> ArrayLike:
        """``λ_max = α ((T−1)/T κ2 + κ1/T) M`` (Theorem 4, eq 16; independent of C);
        ``finite_size``: ``(T−1)/T K_st + K_ss/T`` (adds the O(1) bias terms)."""
        M = _width_scale(M)
        a, b = self._tw()
        if not finite_size:
            return _out(self.alpha * (a * self.kappa2 + b * self.kappa1) * M)
        Kss, Kst = self._gram_entries(M)
        return _out((a * Kst + b * Kss).reshape(M.shape))

    def variance(self, M: ArrayLike) -> ArrayLike:
        """``s_λ − m_λ²`` (O(1): most eigenvalues are near 0 while λ_max is O(M))."""
        return _out(np.asarray(self.second_moment(M)) - np.asarray(self.mean_eigenvalue(M)) ** 2)

    def critical_learning_rate(self, M: ArrayLike, momentum: float = 0.0) -> ArrayLike:
        """``η_c = 2(1 + μ)/λ_max`` (Lemma 6 with Theorem 4: eq 20); batch GD with momentum μ diverges above it.

        Raises ``ValueError`` when λ_max vanishes at leading order (κ2 = 0 with T = ∞: an odd activation
        without bias, see the module doc) — the theory then gives no finite η_c."""
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}.")
        lam = np.asarray(self.max_eigenvalue(M))
        if not np.all(lam > 0):
            raise ValueError(
                f"λ_max = {float(np.min(lam)):.3g} at leading order (kappa2 = {self.kappa2:.3g}, samples T = "
                f"{self.samples}): no finite critical learning rate. With sigma_b2 = 0 an odd activation has κ2 = 0; "
                "use sigma_b2 > 0, a finite T, or measure λ_max."
            )
        return _out(2 * (1 + momentum) / lam)

    def count_bound(self, M: ArrayLike, k: float) -> ArrayLike:
        """Corollary 2: ``N(λ ≥ k) ≤ min(α κ1 C M / k, C T)`` (k > 0)."""
        M = _width_scale(M)
        if not np.all(np.asarray(k, dtype=float) > 0):
            raise ValueError(f"k (the eigenvalue threshold) must be positive, got {k!r}.")
        return _out(np.minimum(self.alpha * self.kappa1 * self.outputs * M / k, self.outputs * self.samples))

    def fisher_rao_norm(self) -> float:
        """``⟨θᵀ F θ⟩_θ`` over the weights as Karakida et al. (2019, Theorem 5): ``Σ_l σ_{w,l}² C q̃^l q̂^{l−1}``.

        This is ``Σ_i ⟨θ_i²⟩ F_ii`` — the weights averaged independently of F, cross terms ``θ_i θ_j F_ij``
        dropped (the reading under which the theorem's equality holds).  For a given network the cross terms do
        not vanish: e.g. for a deep linear network without bias ``θ_wᵀ F θ_w = L² ⟨f²⟩``, L times this value.
        Equals :meth:`fisher_rao_norm_bound` for uniform widths.
        """
        return float(self.outputs * np.sum(self.sigma_w2 * self.q_tilde * self.q_hat))

    def fisher_rao_norm_bound(self) -> float:
        """Right-hand side of eq 18: ``σ_w² (α/α_min) C κ1`` (``max_l σ_{w,l}²`` if the variances differ)."""
        return float(np.max(self.sigma_w2) * self.alpha / np.min(self.widths) * self.outputs * self.kappa1)

    def large_output_bounds(self, M: ArrayLike) -> dict[str, ArrayLike | tuple[ArrayLike, ArrayLike]]:
        """Karakida et al. (2019) §4.3 for C = O(M) (eqs 21–22), with s_λ and λ_max the C = O(1) values at this C:
        ``m'_λ = m_λ``, ``s_λ ≤ s'_λ ≤ C s_λ``, ``λ_max ≤ λ'_max ≤ √(α C s_λ) M``."""
        M = _width_scale(M)
        s = np.asarray(self.second_moment(M))
        return {
            "mean": self.mean_eigenvalue(M),
            "second_moment": (_out(s), _out(self.outputs * s)),
            "max": (self.max_eigenvalue(M), _out(np.sqrt(self.alpha * self.outputs * s) * M)),
        }

    def as_dict(self) -> dict:
        """Plain-type summary (for config files and tables)."""
        return {
            "activation": self.activation.name, "sigma_w2": self.sigma_w2.tolist(),
            "sigma_b2": self.sigma_b2.tolist(), "depth": self.depth, "widths": self.widths.tolist(),
            "outputs": self.outputs, "samples": self.samples, "alpha": self.alpha, "kappa1": self.kappa1,
            "kappa2": self.kappa2, "kappa2_vanishes": self.kappa2_vanishes,
        }

    def __repr__(self) -> str:
        sw = self.sigma_w2[0] if np.all(self.sigma_w2 == self.sigma_w2[0]) else self.sigma_w2.tolist()
        sb = self.sigma_b2[0] if np.all(self.sigma_b2 == self.sigma_b2[0]) else self.sigma_b2.tolist()
        note = ", kappa2 = 0: leading order of s and lambda_max vanishes" if self.kappa2_vanishes else ""
        return (f"MeanField({self.activation.name}, sigma_w2={sw}, sigma_b2={sb}, L={self.depth}, "
                f"C={self.outputs}, T={self.samples}: alpha={self.alpha:.6g}, kappa1={self.kappa1:.6g}, "
                f"kappa2={self.kappa2:.6g}{note})")


def meanfield(
    activation: str | Activation | tuple[Fn, Fn] | Fn,
    sigma_w2: float | Sequence[float],
    sigma_b2: float | Sequence[float],
    depth: int,
    widths: Sequence[float] | None = None,
    outputs: int = 1,
    samples: float = math.inf,
    *,
    derivative: Fn | None = None,
    integrator: str = "quadrature",
    q0: float = 1.0,
    q0_st: float = 0.0,
) -> MeanField:
    """The mean-field FIM statistics (Karakida et al. 2019) of a random L-layer network (recurrences eqs 9–12, κ1, κ2).

    Args:
        activation: ``"relu"``, ``"tanh"``, ``"linear"``, ``"erf"`` (φ = erf x), ``"sigmoid"``, a pair
            ``(φ, φ')`` or a callable φ with ``derivative=φ'`` (numpy-vectorised; kinks at 0 are fine).
        sigma_w2, sigma_b2: weight and bias variances σ_w², σ_b² (eq 8), a number or one per weight layer;
            σ_w² > 0 and σ_b² ≥ 0, finite (else ``ValueError`` naming the argument).
        depth: L ≥ 2, the number of weight layers (L − 1 hidden layers).
        widths: ``(α_0, …, α_{L−1})`` with ``M_l = α_l M`` for the input and hidden layers (default all 1).
        outputs: C, the number of linear outputs.
        samples: T, the number of inputs in the empirical FIM (eq 2); ``math.inf`` for the expected FIM.
        derivative: φ' when ``activation`` is a bare callable.
        integrator: ``"quadrature"`` (default; half-range Gauss–Hermite, any activation) or ``"closed"``
            (closed forms; only linear, ReLU and erf).
        q0, q0_st: input statistics ``q̂^0 = |x|²/M_0`` and ``q̂^0_st = x(s)·x(t)/M_0`` (1 and 0 for N(0, I));
            ``q0 > 0`` and ``|q0_st| ≤ q0``, finite.

    Returns:
        A :class:`MeanField`.  Warns (``UserWarning``) when κ2 = 0 — an odd activation without bias keeps
        ``q̂_st = 0`` in every layer and the leading κ2 terms of s_λ and λ_max vanish (Karakida et al. 2019, footnote 1):
        the formulas then keep only their κ1/T parts and lower-order corrections the theory omits may dominate.

    Example:
        ReLU with σ_w² = 2, σ_b² = 0.1 and three weight layers of equal width:

        >>> import fisherlens as fl
        >>> mf = fl.theory.meanfield("relu", 2.0, 0.1, depth=3)
        >>> round(float(mf.kappa1), 6), float(mf.alpha)
        (1.575, 2.0)
        >>> M = 1000
        >>> abs(mf.critical_learning_rate(M, momentum=0.9) - 2 * 1.9 / mf.max_eigenvalue(M)) < 1e-12
        True
    """
    act = _resolve_activation(activation, derivative)
    if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or depth < 2:
        raise ValueError(f"depth (number of weight layers L) must be an integer ≥ 2, got {depth!r}.")
    L = int(depth)
    if not isinstance(outputs, (int, np.integer)) or isinstance(outputs, bool) or outputs < 1:
        raise ValueError(f"outputs (C) must be a positive integer, got {outputs!r}.")
    T = float(samples)
    if not (T >= 1):
        raise ValueError(f"samples (T) must be ≥ 1 (or math.inf), got {samples!r}.")
    sw, sb = _per_layer("sigma_w2", sigma_w2, L, positive=True), _per_layer("sigma_b2", sigma_b2, L)
    q0, q0_st = float(q0), float(q0_st)
    if not (math.isfinite(q0) and q0 > 0):
        raise ValueError(f"q0 (the input statistic |x|²/M_0) must be positive and finite, got {q0!r}.")
    if not (math.isfinite(q0_st) and abs(q0_st) <= q0):
        raise ValueError(f"q0_st (x(s)·x(t)/M_0) must be finite with |q0_st| <= q0 = {q0!r}, got {q0_st!r}.")
    alphas = np.ones(L) if widths is None else np.asarray(widths, dtype=float)
    if alphas.shape != (L,) or not np.all(alphas > 0) or not np.all(np.isfinite(alphas)):
        raise ValueError(f"widths must be {L} positive numbers (α_0, …, α_{{L−1}}), got {widths!r}.")
    if integrator == "closed":
        if act.closed is None:
            raise ValueError(f"no closed form for activation {act.name!r}; closed forms exist for linear, relu, erf.")
        cp, cdp = act.closed

        def pair(g, a, b):
            return np.array([(cp if g is act.phi else cdp)(x, y) for x, y in zip(a, b, strict=True)])

        def square(g, a):
            return pair(g, a, a)
    elif integrator == "quadrature":
        def pair(g, a, b):
            return gaussian_pairs(g, a, b, homogeneous=act.homogeneous)

        def square(g, a):
            return gaussian_squares(g, a, homogeneous=act.homogeneous)
    else:
        raise ValueError(f"integrator must be 'quadrature' or 'closed', got {integrator!r}.")

    # forward (eqs 9–10), sequential in l; index i = l − 1
    q, qst = np.zeros(L), np.zeros(L)
    qh, qhst = np.zeros(L), np.zeros(L)
    qh[0], qhst[0] = q0, q0_st
    for i in range(L):
        q[i] = sw[i] * qh[i] + sb[i]
        qst[i] = sw[i] * qhst[i] + sb[i]
        if i + 1 < L:
            qh[i + 1] = square(act.phi, q[i : i + 1])[0]
            qhst[i + 1] = pair(act.phi, q[i : i + 1], qst[i : i + 1])[0]
    # backward (eqs 11–12): the Gaussian factors of all layers at once, then cumulative products;
    # q̃^l = σ_{w,l+1}² q̃^{l+1} E φ'(u^l)², for l = L−1 … 1
    qt, qtst = np.ones(L), np.ones(L)
    if L > 1:
        d1 = sw[1:] * square(act.dphi, q[:-1])
        d2 = sw[1:] * pair(act.dphi, q[:-1], qst[:-1])
        qt[:-1] = np.cumprod(d1[::-1])[::-1]
        qtst[:-1] = np.cumprod(d2[::-1])[::-1]
    alpha = float(np.sum(alphas[1:] * alphas[:-1]))
    kappa1 = float(np.sum(alphas * qt * qh) / alpha)
    kappa2 = float(np.sum(alphas * qtst * qhst) / alpha)
    vanish = bool(abs(kappa2) <= 1e-12 * abs(kappa1))
    if vanish:
        kappa2 = 0.0
        warnings.warn(
            f"kappa2 = 0 for activation {act.name!r} with these variances (an odd activation without bias keeps "
            "the inputs' zero correlation q̂_st = 0 in every layer): the leading-order κ2 terms of the second "
            "moment (eq 14) and the maximum eigenvalue (eq 16) vanish; only their κ1/T parts remain and the "
            "finite-M corrections that the mean-field theory omits may dominate.", UserWarning, stacklevel=2,
        )
    return MeanField(act, sw, sb, L, alphas, int(outputs), T, q, qst, qh, qhst, qt, qtst, alpha, kappa1, kappa2,
                     vanish)
