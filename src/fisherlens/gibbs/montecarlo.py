"""Monte-Carlo estimate of the Fisher metric of the 2-D Ising model.

Model and conventions
---------------------
Square ``L x L`` lattice with periodic boundaries, ``N = L**2`` spins ``s_i = ±1`` and

    p_θ(s) ∝ exp(β E_b(s) + h M(s)),   E_b = Σ_⟨ij⟩ s_i s_j,   M = Σ_i s_i,

with each nearest-neighbour bond counted once (``E_b = Σ_i s_i (s_{i+x} + s_{i+y})``, i.e. 2N bonds; for
``L = 2`` the two bonds between a pair of neighbours are both counted). The natural parameters are
``θ = (β, h)`` and the sufficient statistics ``φ = (E_b, M)``; the Fisher metric of an exponential family is
the covariance of its sufficient statistics, reported **per site**:

    g(θ) = Cov_θ[φ] / N   (2 x 2; g_ββ is the specific-heat analogue, g_hh the susceptibility).

Samplers
--------
``"wolff"``
    Wolff single-cluster updates (U. Wolff, "Collective Monte Carlo updating for spin systems",
    Phys. Rev. Lett. 62, 361 (1989)), bond probability ``p = 1 - exp(-2β)``, for any ``h``.  A field is handled
    by the *ghost spin* (R. H. Swendsen and J.-S. Wang, Phys. Rev. Lett. 58, 86 (1987); the standard
    extension of the Fortuin–Kasteleyn representation): an extra spin ``s_g = ±1`` is coupled to every lattice
    spin with coupling ``|h|``,

        p(s, s_g) ∝ exp(β E_b(s) + |h| s_g M(s)),

    so that the physical configuration ``σ = sign(h) s_g s`` has exactly the distribution ``p_θ(σ)`` (the map
    ``(s, s_g) -> σ`` is two-to-one and both pre-images have the same weight).  The ghost is one more vertex
    of the cluster graph: a bond between a cluster site and the ghost (either way) is activated with
    probability ``p_h = 1 - exp(-2|h|)`` when their spins agree.  A cluster that reaches the ghost flips the
    ghost too, which in the physical frame flips every spin *outside* the cluster.  The seed of each cluster
    is a uniformly drawn lattice site (a state-independent choice, which keeps detailed balance); at
    ``h = 0`` the ghost never joins and this is plain Wolff (same random stream).  Observables are measured
    on ``σ``: ``E_b(σ) = E_b(s)``, ``M(σ) = sign(h) s_g M(s)``.
    One measured *sweep* is a fixed number ``k`` of cluster flips,
    ``k = max(1, round(N / <|C|>))`` with the mean cluster size ``<|C|>`` (lattice sites in the cluster, the
    ghost not counted) measured in the second half of the burn-in (burn-in sweeps flip clusters until ``>= N``
    lattice sites have been in clusters), so about N spins are updated per sweep.
    ``k`` must be fixed: measuring at the state-dependent time "after N spins have flipped" biases the sampled
    distribution.  In a strong field most clusters reach the ghost and hold most sites, so ``k = 1``.
    The cluster is grown breadth-first, vectorised over each BFS layer (numpy), never per site.
``"metropolis"``
    Single-spin Metropolis, vectorised over sublattices of mutually non-adjacent sites (the checkerboard for
    even ``L``; a greedy colouring of the periodic lattice for odd ``L``), one sweep = one update of every
    sublattice in turn. Any ``h``. Beware: at ``β ≈ 0, h ≈ 0`` Metropolis accepts nearly every flip and the
    chain is almost periodic (its estimate of g_ββ is then badly wrong), and for ``L = 2, h = 0`` it is
    reducible (a warning is emitted); use ``"heatbath"`` there.
``"heatbath"``
    Same sublattice schedule with heat-bath (Glauber) acceptance ``1 / (1 + exp(-Δ))``. Any ``h``.

All randomness comes from one ``torch.Generator`` (default: a fresh generator seeded with 0); the global RNGs
of torch and numpy are never touched. The start is hot (independent uniform spins), followed by ``burn_in``
discarded sweeps.

Errors
------
φ is measured after every sweep. For each observable (``E_b``, ``M``, ``|M|`` and the centred products
``(φ_a - φ̄_a)(φ_b - φ̄_b)`` whose means are the metric entries) the integrated autocorrelation time

    τ_int = 1/2 + Σ_{t=1}^{W} ρ(t)

is estimated with the automatic window of N. Madras and A. D. Sokal, "The pivot algorithm: a highly efficient
Monte Carlo method for the self-avoiding walk", J. Stat. Phys. 50, 109 (1988) (smallest ``W ≥ c τ_int(W)``,
``c = 6``); the effective number of samples is ``sweeps / (2 τ_int)``. The reported ``stderr`` of g is a
jackknife over contiguous blocks (binning) of length ``b = ceil(20 max τ_int)`` of the per-sweep samples (at
least 20 blocks; a warning is emitted when the run is so short that the blocks are under 5 τ_int). ``stderr_tau`` gives
the τ-based error ``sqrt(2 τ_ab Var[y_ab] / T) / N`` of each entry as a cross-check.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch

__all__ = [
    "BETA_CRITICAL",
    "MonteCarloCurvature",
    "MonteCarloResult",
    "integrated_autocorrelation_time",
    "ising2d_monte_carlo",
    "monte_carlo_curvature",
    "scalar_curvature_from_cumulants",
]

#: Critical coupling of the infinite 2-D square-lattice Ising model, ``½ ln(1 + √2)``.
BETA_CRITICAL = 0.5 * math.log(1.0 + math.sqrt(2.0))

_METHODS = ("wolff", "metropolis", "heatbath")
_SOKAL_C = 6.0
_BLOCK_TAUS = 20.0
_MIN_BLOCKS = 20


@dataclass
class MonteCarloResult:
    """Monte-Carlo estimate of the per-site Fisher metric of the 2-D Ising model.

    Attributes:
        metric: ``(2, 2)`` float64, ``g = Cov[φ] / N`` in the order ``(β, h)``, sample covariance (ddof 1) of
            the per-sweep samples.
        stderr: ``(2, 2)`` float64, block-jackknife standard error of each entry of ``metric``.
        stderr_tau: ``(2, 2)`` float64, τ-based standard error ``sqrt(2 τ Var / T) / N`` (cross-check).
        mean_phi: ``(2,)`` float64, ``⟨φ⟩ / N = (⟨E_b⟩, ⟨M⟩) / N`` (expectation parameters per site).
        energy_per_site: interaction energy per site with J = 1, ``-⟨E_b⟩ / N`` (``-√2`` at β_c, L → ∞).
        magnetisation_per_site: ``⟨M⟩ / N``.
        abs_magnetisation_per_site: ``⟨|M|⟩ / N`` (the useful order parameter at ``h = 0``).
        tau: integrated autocorrelation time (in sweeps) per observable, keys ``"E"``, ``"M"``, ``"|M|"``,
            ``"g_bb"``, ``"g_bh"``, ``"g_hh"`` (the last three for the centred products behind the metric).
        effective_samples: ``sweeps / (2 τ)`` per observable, same keys.
        samples: ``(sweeps, 2)`` float64, the measured ``φ = (E_b, M)`` after each sweep (not per site).
        method: the sampler used.
        L: linear lattice size.
        theta: ``(β, h)``.
        sweeps: number of measured sweeps.
        burn_in: number of discarded sweeps.
        block_length: length (sweeps) of the jackknife blocks.
        n_blocks: number of jackknife blocks.
        acceptance: mean acceptance rate (single-spin methods) or ``None``.
        mean_cluster_size: mean Wolff cluster size (lattice sites, the ghost not counted, over the measured
            sweeps) or ``None``.
        clusters_per_sweep: the fixed number ``k`` of Wolff clusters per measured sweep or ``None``.
        elapsed_s: wall time of burn-in plus measurement.
        sweeps_per_second: ``(burn_in + sweeps) / elapsed_s``.
    """

    metric: torch.Tensor
    stderr: torch.Tensor
    stderr_tau: torch.Tensor
    mean_phi: torch.Tensor
    energy_per_site: float
    magnetisation_per_site: float
    abs_magnetisation_per_site: float
    tau: dict[str, float]
    effective_samples: dict[str, float]
    samples: torch.Tensor
    method: str
    L: int
    theta: tuple[float, float]
    sweeps: int
    burn_in: int
    block_length: int
    n_blocks: int
    acceptance: float | None = None
    mean_cluster_size: float | None = None
    clusters_per_sweep: float | None = None
    elapsed_s: float = 0.0
    sweeps_per_second: float = field(default=0.0)

    @property
    def N(self) -> int:  # noqa: N802 - physics notation
        """Number of spins ``L**2``."""
        return self.L * self.L

    @property
    def effective_samples_per_second(self) -> float:
        """Effective samples of the slowest metric entry per second of wall time."""
        slowest = min(self.effective_samples[k] for k in ("g_bb", "g_bh", "g_hh"))
        return slowest / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def curvature(self, *, symmetrize: bool | None = None) -> MonteCarloCurvature:
        """Scalar curvature ``R`` of the per-site metric from these samples: :func:`monte_carlo_curvature`."""
        return monte_carlo_curvature(self, symmetrize=symmetrize)


@dataclass
class MonteCarloCurvature:
    """Monte-Carlo estimate of the scalar curvature ``R(β, h)`` of the per-site Fisher metric (2-D Ising).

    Attributes:
        scalar_curvature: ``R`` (sign of :mod:`fisherlens.geometry`: the unit sphere has ``+2``), the plug-in
            value :func:`scalar_curvature_from_cumulants` of ``metric`` and ``third_cumulants``.
        stderr: block-jackknife standard error of ``scalar_curvature``.
        bias: jackknife estimate of the bias of the plug-in ``R``, ``(B - 1)(R̄_(·) - R_B)`` with ``R_B`` the
            plug-in value on the ``B`` whole blocks (``R`` is a nonlinear function of sample moments, biased at
            ``O(τ/T)``); not subtracted from ``scalar_curvature``.
        metric: ``(2, 2)`` float64, ``g = κ₂(φ)/N`` used for ``R`` (``g_βh = 0`` when ``symmetrized``).
        third_cumulants: ``(2, 2, 2)`` float64, ``T_abc = ∂_a∂_b∂_c (log Z/N) = κ₃(φ)_abc / N`` (index 0: β / E_b,
            index 1: h / M); the entries odd in ``h`` are 0 when ``symmetrized``.
        metric_stderr: ``(2, 2)`` block-jackknife standard errors of ``metric`` (0 where fixed by symmetry).
        third_stderr: ``(2, 2, 2)`` block-jackknife standard errors of ``third_cumulants``.
        replicates: ``(B,)`` the leave-one-block-out values of ``R`` behind ``stderr`` and ``bias``.
        symmetrized: whether the exact ``M -> -M`` symmetry of ``h = 0`` was imposed (see
            :func:`monte_carlo_curvature`).
        tau: integrated autocorrelation times (sweeps) of the centred triple products used, keys ``"T_bbb"``,
            ``"T_bbh"``, ``"T_bhh"``, ``"T_hhh"`` (only the ``h``-even two when ``symmetrized``).
        block_length: jackknife block length (sweeps), that of the :class:`MonteCarloResult`.
        n_blocks: number of jackknife blocks.
        L: linear lattice size.
        theta: ``(β, h)``.
    """

    scalar_curvature: float
    stderr: float
    bias: float
    metric: torch.Tensor
    third_cumulants: torch.Tensor
    metric_stderr: torch.Tensor
    third_stderr: torch.Tensor
    replicates: torch.Tensor
    symmetrized: bool
    tau: dict[str, float]
    block_length: int
    n_blocks: int
    L: int
    theta: tuple[float, float]


# ----------------------------------------------------------------------------------------------- validation
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_theta(theta) -> tuple[float, float]:
    if isinstance(theta, torch.Tensor):
        theta = theta.detach().cpu().reshape(-1).tolist()
    try:
        values = list(theta)
    except TypeError:
        raise ValueError(f"theta must be a pair (beta, h), got {theta!r}") from None
    if len(values) != 2:
        raise ValueError(f"theta must be a pair (beta, h), got {len(values)} values")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ValueError(f"theta[{i}] must be a real number, got {v!r}")
    beta, h = float(values[0]), float(values[1])
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"theta[0] (beta) must be finite and >= 0, got {beta!r}")
    if not math.isfinite(h):
        raise ValueError(f"theta[1] (h) must be finite, got {h!r}")
    return beta, h


# ----------------------------------------------------------------------------------------------- lattice
def _neighbours(L: int) -> np.ndarray:
    """``(N, 4)`` int64 neighbour table (right, left, down, up), row-major site index ``i * L + j``."""
    i, j = np.divmod(np.arange(L * L), L)
    return np.stack(
        [i * L + (j + 1) % L, i * L + (j - 1) % L, ((i + 1) % L) * L + j, ((i - 1) % L) * L + j], axis=1
    ).astype(np.int64)


def _colouring(nbr: np.ndarray) -> list[np.ndarray]:
    """Greedy proper colouring in row-major order (the checkerboard for even ``L``); one index array per colour."""
    n = nbr.shape[0]
    colour = np.full(n, -1, dtype=np.int64)
    for site in range(n):  # once per run, O(N)
        used = {int(c) for c in colour[nbr[site]] if c >= 0}
        c = 0
        while c in used:
            c += 1
        colour[site] = c
    return [np.flatnonzero(colour == c) for c in range(int(colour.max()) + 1)]


class _Uniforms:
    """Buffered float64 uniforms drawn from a ``torch.Generator`` (for the numpy cluster code)."""

    def __init__(self, generator: torch.Generator, chunk: int):
        self.generator = generator
        self.chunk = max(int(chunk), 1024)
        self.buffer = np.empty(0)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        if self.pos + n > self.buffer.size:
            fresh = torch.rand(max(self.chunk, n), generator=self.generator, dtype=torch.float64).numpy()
            self.buffer = np.concatenate([self.buffer[self.pos :], fresh])
            self.pos = 0
        out = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return out


# ----------------------------------------------------------------------------------------------- samplers
def _run_wolff(L, beta, h, burn_in, sweeps, generator, pbar):
    n = L * L
    nbr = _neighbours(L)
    right, down = nbr[:, 0], nbr[:, 2]
    p_bond = -math.expm1(-2.0 * beta)
    p_ghost = -math.expm1(-2.0 * abs(h))
    field_sign = -1 if h < 0 else 1
    uni = _Uniforms(generator, 16 * n)
    # spins[:n] are the lattice spins s, spins[n] the ghost s_g (fixed at +1 and never touched when h = 0)
    spins = np.ones(n + 1, dtype=np.int8)
    spins[:n] = np.where(uni.take(n) < 0.5, -1, 1)
    every_site = np.arange(n)

    def grow(frontier: np.ndarray, s0: int) -> np.ndarray:
        """The next BFS layer: sites (and the ghost, index n) bonded to ``frontier``, now flipped."""
        lattice = frontier[frontier < n]
        cand = nbr[lattice].ravel()
        cand = cand[spins[cand] == s0]  # "still s0" means "not yet in the cluster": members flip on entry
        cand = cand[uni.take(cand.size) < p_bond]  # one independent trial per (cluster site, bond)
        if p_ghost > 0.0:
            ghost = np.empty(0, dtype=np.int64)
            if spins[n] == s0 and lattice.size:  # bonds lattice site -> ghost, one trial each
                if bool((uni.take(lattice.size) < p_ghost).any()):
                    ghost = np.array([n])
            if frontier[-1] == n:  # the ghost joined in the previous layer: its bonds to every site
                free = every_site[spins[:n] == s0]
                ghost = np.concatenate([ghost, free[uni.take(free.size) < p_ghost]])
            cand = np.concatenate([cand, ghost])
        if cand.size:
            cand = np.unique(cand)  # sorted: the ghost (index n), if present, is last
            spins[cand] = -s0
        return cand

    def flip_cluster() -> int:
        seed = min(int(uni.take(1)[0] * n), n - 1)
        s0 = int(spins[seed])
        spins[seed] = -s0
        frontier = np.array([seed])
        size = 1
        while True:
            frontier = grow(frontier, s0)
            if frontier.size == 0:
                return size
            size += int(frontier.size) - int(frontier[-1] == n)

    def measure(t: int) -> None:
        s = spins[:n]
        phi[t, 0] = np.sum(s * (s[right] + s[down]), dtype=np.int64)
        phi[t, 1] = field_sign * int(spins[n]) * int(np.sum(s, dtype=np.int64))

    # Burn-in: flip clusters until ~N sites have been in clusters per sweep and record the mean cluster size.
    # The measured sweeps use a FIXED number of clusters, k = round(N / <|C|>): a state-dependent stopping rule
    # ("flip until N spins have flipped") would bias the measured distribution.
    burn_clusters = burn_flipped = 0
    for t in range(burn_in):
        flipped = clusters = 0
        while flipped < n:
            flipped += flip_cluster()
            clusters += 1
        if t >= burn_in // 2:  # <|C|> from the second half of the burn-in only (the hot start has small clusters)
            burn_clusters += clusters
            burn_flipped += flipped
        if pbar is not None:
            pbar.update(1)
    k = max(1, round(n * burn_clusters / burn_flipped))
    phi = np.empty((sweeps, 2))
    flipped_total = 0
    for t in range(sweeps):
        for _ in range(k):
            flipped_total += flip_cluster()
        measure(t)
        if pbar is not None:
            pbar.update(1)
    return phi, {"clusters": k * sweeps, "flipped": flipped_total, "clusters_per_sweep": k}


def _run_single_spin(L, beta, h, n_total, generator, pbar, heatbath):
    n = L * L
    nbr_np = _neighbours(L)
    nbr = torch.from_numpy(nbr_np)
    classes = [torch.from_numpy(c) for c in _colouring(nbr_np)]
    class_nbr = [nbr[c] for c in classes]
    right, down = nbr[:, 0], nbr[:, 2]
    spins = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    phi = torch.empty((n_total, 2), dtype=torch.float64)
    accepted = torch.zeros((), dtype=torch.float64)
    for t in range(n_total):
        for idx, nb in zip(classes, class_nbr, strict=True):
            s = spins[idx]
            delta = -2.0 * s * (beta * spins[nb].sum(1) + h)  # log p(flipped) - log p(current)
            u = torch.rand(idx.numel(), generator=generator, dtype=torch.float64)
            accept = u * (1.0 + torch.exp(-delta)) < 1.0 if heatbath else torch.log(u) < delta
            spins[idx] = torch.where(accept, -s, s)
            accepted += accept.sum()
        phi[t, 0] = (spins * (spins[right] + spins[down])).sum()
        phi[t, 1] = spins.sum()
        if pbar is not None:
            pbar.update(1)
    return phi.numpy(), {"accepted": float(accepted)}


# ----------------------------------------------------------------------------------------------- statistics
def integrated_autocorrelation_time(x, c: float = _SOKAL_C) -> tuple[float, int]:
    """Integrated autocorrelation time with the automatic window of Madras and Sokal.

    Args:
        x: ``(T,)`` time series.
        c: window constant; the window ``W`` is the smallest with ``W >= c * τ(W)``.

    Returns:
        ``(τ_int, W)`` with ``τ_int = 1/2 + Σ_{t=1}^{W} ρ(t)`` (so ``Var[mean] ≈ 2 τ_int Var[x] / T``), floored
        at 1/2 (an anticorrelated series is reported as independent, which is conservative); a constant series
        gives ``(0.5, 0)``. If no window satisfies the criterion, ``W = T - 1`` is used and a
        ``RuntimeWarning`` is emitted (the run is too short).
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = x.size
    if n < 2 or np.all(x == x[0]):
        return 0.5, 0
    x = x - x.mean()
    f = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(f * np.conj(f), 2 * n)[:n]
    if acf[0] <= 0:
        return 0.5, 0
    rho = acf / acf[0]
    taus = 0.5 + np.cumsum(rho[1:])  # τ(W) for W = 1 .. n-1
    windows = np.arange(1, n)
    ok = np.flatnonzero(windows >= c * taus)
    if ok.size == 0:
        warnings.warn(
            f"automatic window not found within {n} samples; the run is too short for a reliable tau",
            RuntimeWarning,
            stacklevel=3,
        )
        w = n - 1
    else:
        w = int(windows[ok[0]])
    return float(max(taus[w - 1], 0.5)), w


def _moments_from_sums(s1: np.ndarray, s2: np.ndarray, s3: np.ndarray | None, n) -> tuple:
    """Sample covariance (ddof 1) and third cumulant (k-statistic) from power sums of shifted data.

    ``s1 (..., d)``, ``s2 (..., d, d)``, ``s3 (..., d, d, d)`` are ``Σ x``, ``Σ x⊗x``, ``Σ x⊗x⊗x`` over ``n``
    samples of ``x = φ - c`` for a constant shift ``c`` (central moments do not depend on it).  With
    ``μ = s1/n``: ``m2 = s2/n - μ⊗μ``, ``m3_abc = s3_abc/n - μ_a m'_bc - μ_b m'_ac - μ_c m'_ab + 2 μ_a μ_b μ_c``
    (``m' = s2/n``), returned as ``n/(n-1) m2`` and ``n²/((n-1)(n-2)) m3`` (``None`` when ``s3`` is).
    """
    n = np.asarray(n, dtype=np.float64)
    mu = s1 / n[..., None]
    r2 = s2 / n[..., None, None]
    cov = (r2 - mu[..., :, None] * mu[..., None, :]) * (n / (n - 1))[..., None, None]
    if s3 is None:
        return cov, None
    r3 = s3 / n[..., None, None, None]
    m3 = (
        r3
        - mu[..., :, None, None] * r2[..., None, :, :]
        - mu[..., None, :, None] * r2[..., :, None, :]
        - mu[..., None, None, :] * r2[..., :, :, None]
        + 2.0 * mu[..., :, None, None] * mu[..., None, :, None] * mu[..., None, None, :]
    )
    return cov, m3 * (n * n / ((n - 1) * (n - 2)))[..., None, None, None]


def _odd_in_field(d: int, order: int) -> np.ndarray:
    """Boolean mask of the entries of a ``(d,)*order`` moment tensor that hold an odd number of index 1 (M)."""
    idx = np.indices((d,) * order)
    return ((idx == 1).sum(0) % 2) == 1


def _block_jackknife(phi: np.ndarray, block: int, *, third: bool = False, symmetric: bool = False) -> dict:
    """Block jackknife of the sample covariance and (optionally) the third cumulant of ``phi (T, d)``.

    The ``T // block`` contiguous blocks (any tail shorter than a block is dropped) are left out one at a time;
    power sums per block make each leave-one-out estimate O(1).  ``symmetric`` (``d = 2``, column 1 = ``M``):
    the moments are those of the data together with its mirror image ``M -> -M`` — the mean of ``M`` is 0 and
    every moment odd in ``M`` vanishes; the even ones are the plain averages (about ``M = 0``).

    Returns:
        dict with ``"cov"`` (``(B, d, d)`` leave-one-block-out replicates), ``"third"`` (``(B, d, d, d)`` or
        ``None``), ``"full_cov"``, ``"full_third"`` (the same estimators on all ``T`` samples),
        ``"blocks_cov"``, ``"blocks_third"`` (on the ``B`` blocks only: the reference of the jackknife bias) and
        ``"n_blocks"``.
    """
    t, d = phi.shape
    n_blocks = t // block
    centre = phi[: n_blocks * block].mean(0)  # centring first keeps the cancellation harmless
    if symmetric:
        centre[1] = 0.0
    x = phi - centre
    xb = x[: n_blocks * block].reshape(n_blocks, block, d)
    sums = [xb.sum(1), np.einsum("kta,ktb->kab", xb, xb)]
    full = [x.sum(0), np.einsum("ta,tb->ab", x, x)]
    if third:
        sums.append(np.einsum("kta,ktb,ktc->kabc", xb, xb, xb))
        full.append(np.einsum("ta,tb,tc->abc", x, x, x))
    if symmetric:
        for order, (b, f) in enumerate(zip(sums, full, strict=True), start=1):
            odd = _odd_in_field(d, order)
            b[:, odd] = 0.0
            f[odd] = 0.0
    total = [b.sum(0) for b in sums]
    rest = np.full(n_blocks, float(n_blocks * block - block))
    loo = [s_all[None] - b for s_all, b in zip(total, sums, strict=True)]
    cov, k3 = _moments_from_sums(loo[0], loo[1], loo[2] if third else None, rest)
    full_cov, full_k3 = _moments_from_sums(full[0], full[1], full[2] if third else None, float(t))
    blocks_cov, blocks_k3 = _moments_from_sums(total[0], total[1], total[2] if third else None, float(n_blocks * block))
    return {
        "cov": cov,
        "third": k3,
        "full_cov": full_cov,
        "full_third": full_k3,
        "blocks_cov": blocks_cov,
        "blocks_third": blocks_k3,
        "n_blocks": n_blocks,
    }


def _jackknife_stderr(replicates: np.ndarray) -> np.ndarray:
    """``sqrt((B-1)/B Σ_k (θ_(k) - θ̄)²)`` over the leading axis of leave-one-block-out replicates."""
    b = replicates.shape[0]
    dev = replicates - replicates.mean(0)
    return np.sqrt((b - 1) / b * (dev**2).sum(0))


def _statistics(phi: np.ndarray, n_sites: int):
    t = phi.shape[0]
    centred = phi - phi.mean(0)
    series = {
        "E": phi[:, 0],
        "M": phi[:, 1],
        "|M|": np.abs(phi[:, 1]),
        "g_bb": centred[:, 0] * centred[:, 0],
        "g_bh": centred[:, 0] * centred[:, 1],
        "g_hh": centred[:, 1] * centred[:, 1],
    }
    tau = {k: integrated_autocorrelation_time(v)[0] for k, v in series.items()}
    eff = {k: t / (2.0 * v) for k, v in tau.items()}
    metric = np.cov(phi.T, ddof=1) / n_sites if t > 1 else np.zeros((2, 2))
    stderr_tau = np.zeros((2, 2))
    for (a, b), k in {(0, 0): "g_bb", (0, 1): "g_bh", (1, 1): "g_hh"}.items():
        stderr_tau[a, b] = stderr_tau[b, a] = math.sqrt(2.0 * tau[k] * series[k].var() / t) / n_sites
    tau_max = max(tau.values())
    block = max(1, math.ceil(_BLOCK_TAUS * tau_max))
    if t // block < _MIN_BLOCKS:
        block = max(1, t // _MIN_BLOCKS)
        if block < 5.0 * tau_max:
            warnings.warn(
                f"sweeps={t} is short for tau_max={tau_max:.3g}: {_MIN_BLOCKS} blocks of {block} sweeps "
                "(< 5 tau); the stderr may be underestimated",
                RuntimeWarning,
                stacklevel=3,
            )
    jk = _block_jackknife(phi, block)
    stderr, n_blocks = _jackknife_stderr(jk["cov"]), jk["n_blocks"]
    return metric, stderr / n_sites, stderr_tau, tau, eff, block, n_blocks


# ----------------------------------------------------------------------------------------------- public API
def ising2d_monte_carlo(
    L: int,
    theta,
    *,
    sweeps: int = 2000,
    burn_in: int = 200,
    method: str = "wolff",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> MonteCarloResult:
    """Monte-Carlo estimate of the per-site Fisher metric ``g = Cov_θ[φ] / N`` of the 2-D Ising model.

    See the module docstring for the model, the samplers and the error analysis.

    Args:
        L: linear lattice size (integer ``>= 2``); ``N = L**2`` spins, periodic boundaries.
        theta: natural parameters ``(β, h)``: ``β >= 0`` finite, ``h`` finite (pair, list or 2-element tensor).
        sweeps: number of measured sweeps (integer ``>= 2``); φ is measured after each.
        burn_in: number of discarded sweeps before measuring (integer ``>= 1``).
        method: ``"wolff"`` (cluster updates; a field through the ghost spin), ``"metropolis"`` or
            ``"heatbath"``.
        generator: ``torch.Generator`` (CPU) that supplies all randomness; default ``torch.Generator()`` seeded
            with 0. It is advanced in place.
        progress: show a tqdm progress bar.

    Returns:
        :class:`MonteCarloResult` with ``metric`` ``(2, 2)`` float64 in the order ``(β, h)``, its block-jackknife
        ``stderr`` ``(2, 2)``, ``tau`` and ``effective_samples`` per observable and the ``(sweeps, 2)`` samples.

    Raises:
        ValueError: on an invalid argument (the message names it).
    """
    L = _check_int("L", L, 2)
    beta, h = _check_theta(theta)
    sweeps = _check_int("sweeps", sweeps, 2)
    burn_in = _check_int("burn_in", burn_in, 1)
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if method == "metropolis" and L == 2 and h == 0.0:
        warnings.warn(
            "the sublattice Metropolis chain is reducible for L = 2 and h = 0 (it need not converge to p_theta); "
            "use method='heatbath' or 'wolff'",
            RuntimeWarning,
            stacklevel=2,
        )
    n_total = burn_in + sweeps
    n_sites = L * L

    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=n_total, desc=f"ising2d {method} L={L}", unit="sweep")
    start = time.perf_counter()
    try:
        if method == "wolff":
            phi, info = _run_wolff(L, beta, h, burn_in, sweeps, generator, pbar)
        else:
            phi, info = _run_single_spin(L, beta, h, n_total, generator, pbar, heatbath=(method == "heatbath"))
            phi = phi[burn_in:]
    finally:
        if pbar is not None:
            pbar.close()
    elapsed = time.perf_counter() - start

    metric, stderr, stderr_tau, tau, eff, block, n_blocks = _statistics(phi, n_sites)
    mean_phi = phi.mean(0) / n_sites
    extra: dict = {}
    if method == "wolff":
        extra["mean_cluster_size"] = info["flipped"] / info["clusters"]
        extra["clusters_per_sweep"] = info["clusters_per_sweep"]
    else:
        extra["acceptance"] = info["accepted"] / (n_total * n_sites)
    return MonteCarloResult(
        metric=torch.from_numpy(np.ascontiguousarray(metric, dtype=np.float64)),
        stderr=torch.from_numpy(np.ascontiguousarray(stderr, dtype=np.float64)),
        stderr_tau=torch.from_numpy(np.ascontiguousarray(stderr_tau, dtype=np.float64)),
        mean_phi=torch.from_numpy(np.ascontiguousarray(mean_phi, dtype=np.float64)),
        energy_per_site=float(-mean_phi[0]),
        magnetisation_per_site=float(mean_phi[1]),
        abs_magnetisation_per_site=float(np.abs(phi[:, 1]).mean() / n_sites),
        tau=tau,
        effective_samples=eff,
        samples=torch.from_numpy(np.ascontiguousarray(phi, dtype=np.float64)),
        method=method,
        L=L,
        theta=(beta, h),
        sweeps=sweeps,
        burn_in=burn_in,
        block_length=block,
        n_blocks=n_blocks,
        elapsed_s=elapsed,
        sweeps_per_second=n_total / elapsed if elapsed > 0 else float("inf"),
        **extra,
    )


# ----------------------------------------------------------------------------------------------- curvature
def scalar_curvature_from_cumulants(metric, third) -> torch.Tensor:
    r"""Scalar curvature of a Hessian metric ``g = ∇²ψ`` from ``g`` and the third derivatives ``T = ∇³ψ``.

    For an exponential family ``ψ = log Z`` (or ``log Z / N`` per site) ``g_ab = κ₂(φ)_ab`` and
    ``T_abc = κ₃(φ)_abc`` (divided by ``N``), and ``Γ_abc = ½ T_abc`` (Christoffel symbols of the first kind),
    so the curvature needs no fourth derivative.  The Riemann tensor of a Hessian metric is
    ``R_abcd = ¼ g^{pq} (T_adp T_bcq − T_acp T_bdq)`` (sign of :mod:`fisherlens.geometry`, where the unit
    2-sphere has ``R = +2``), and its contraction is

        R = ¼ (T_abc T_def g^{ad} g^{be} g^{cf} − V_p g^{pq} V_q),   V_p = T_abp g^{ab}.

    In two dimensions this is ``R = 2 R_1212 / det g`` with ``R_1212 = ¼ g^{pq}(T_12p T_12q − T_11p T_22q)``.
    Scaling: with ``ψ = log Z / N``, ``g`` and ``T`` are ``1/N`` times the cumulants of ``φ``, so ``R`` of the
    per-site metric is ``N`` times ``R`` of the metric of ``log Z``.

    Args:
        metric: ``(..., d, d)`` symmetric positive-definite ``g``.
        third: ``(..., d, d, d)`` totally symmetric ``T`` (same leading shape).

    Returns:
        ``(...)`` float64 tensor of ``R`` (a 0-d tensor for a single point).

    Raises:
        ValueError: shapes that do not match.

    Example:
        >>> import torch, fisherlens as fl
        >>> from torch.func import jacfwd
        >>> from fisherlens.gibbs import IsingChain, scalar_curvature_from_cumulants
        >>> th = torch.tensor([0.5, 0.3], dtype=torch.float64)
        >>> R = scalar_curvature_from_cumulants(IsingChain().metric(th), jacfwd(IsingChain().metric)(th))
        >>> abs(float(R) - IsingChain.scalar_curvature_exact(th)) < 1e-10
        True
    """
    g = torch.as_tensor(metric, dtype=torch.float64)
    t = torch.as_tensor(third, dtype=torch.float64)
    d = g.shape[-1] if g.dim() >= 2 else 0
    if g.dim() < 2 or g.shape[-2] != d or tuple(t.shape) != (*g.shape[:-2], d, d, d):
        raise ValueError(
            f"scalar_curvature_from_cumulants: metric must be (..., d, d) and third (..., d, d, d) with the same "
            f"leading shape, got {tuple(g.shape)} and {tuple(t.shape)}."
        )
    gi = torch.linalg.inv(g)
    full = torch.einsum("...abc,...def,...ad,...be,...cf->...", t, t, gi, gi, gi)
    v = torch.einsum("...abp,...ab->...p", t, gi)
    trace = torch.einsum("...p,...pq,...q->...", v, gi, v)
    return 0.25 * (full - trace)


def monte_carlo_curvature(result: MonteCarloResult, *, symmetrize: bool | None = None) -> MonteCarloCurvature:
    r"""Scalar curvature ``R(β, h)`` of the per-site Fisher metric of the 2-D Ising model from Monte-Carlo samples.

    The per-site log-partition ``ψ = log Z / N`` of the exponential family ``p ∝ exp(β E_b + h M)`` has the
    derivatives ``∂_a∂_b ψ = κ₂(φ)_ab / N`` and ``∂_a∂_b∂_c ψ = κ₃(φ)_abc / N``, the joint cumulants of
    ``φ = (E_b, M)`` divided by ``N`` (equivalently ``N^{k−1} κ_k(φ/N)``: the per-site statistics ``φ/N`` have
    cumulants ``O(N^{1−k})``).  The curvature of a Hessian metric needs only these
    (:func:`scalar_curvature_from_cumulants`), so ``R`` is estimated by plugging in the sample covariance
    (ddof 1) and the sample third cumulant (k-statistic, ``T²/((T−1)(T−2))`` times the third central moment)
    of the measured ``φ``.  ``R`` scales as ``N κ₃² / κ₂³``: finite per site away from a transition, ``~ ξ²``
    near it (Janke, Johnston and Kenna 2004), so for ``L ≪ ξ`` it grows like ``L²`` up to logarithms.

    Errors: block jackknife over the contiguous blocks of ``result`` (``result.block_length``, chosen from the
    autocorrelation times of φ and its centred products): each block is left out in turn, ``g``, ``T`` and
    ``R`` recomputed, ``stderr = sqrt((B−1)/B Σ (R_(k) − R̄)²)``; the jackknife bias estimate is reported
    (``bias``), not subtracted.  The integrated autocorrelation times of the centred triple products are
    measured too (``tau``) and a ``RuntimeWarning`` is emitted if the blocks are shorter than 5 of them.  Third
    cumulants are noisy — ``R`` is quadratic in them, so its relative error is about twice theirs; plan for
    thousands of effective samples.

    At ``h = 0`` the model is symmetric under ``M -> −M``: ``g_βh``, ``T_ββh`` and ``T_hhh`` vanish exactly.
    ``symmetrize=None`` (default) imposes this **exactly at h = 0 and nowhere else**: the moments are those of
    the samples together with their mirror images ``M -> −M`` (mean of ``M`` taken as 0, the three odd entries
    set to 0, the even ones averaged about ``M = 0``); the result says so (``symmetrized=True``).  This removes
    noise that enters ``R`` only at second order (``∂R`` with respect to the odd entries vanishes at ``h = 0``)
    and the bias it causes, and it gives the symmetric finite-``L`` answer even when a sampler is stuck in one
    magnetisation sign (Metropolis in the ordered phase).  ``symmetrize=False`` uses the raw sample moments at
    every ``h`` (consistent as well, noisier at ``h = 0``); ``symmetrize=True`` at ``h ≠ 0`` is refused.  Because
    of the mirror images, ``metric[1, 1]`` at ``h = 0`` is ``⟨M²⟩/N`` and may differ from ``result.metric[1, 1]``
    (``Var[M]/N``) by ``⟨M⟩²/N``.

    For finite ``L`` ``ψ`` is analytic (``Z`` is a finite sum of positive terms) and ``g`` positive definite, so
    ``R`` is defined everywhere, ``h = 0`` included; only the limit ``L → ∞`` is singular (at ``β_c``, and on
    the line ``h = 0, β > β_c``).

    Args:
        result: a :class:`MonteCarloResult` of :func:`ising2d_monte_carlo` (its ``samples`` are used).
        symmetrize: ``None`` (impose the ``h = 0`` symmetry exactly when ``h == 0``), ``True`` (same, but only
            allowed at ``h = 0``) or ``False`` (never).

    Returns:
        :class:`MonteCarloCurvature`.

    Raises:
        ValueError: ``result`` is not a :class:`MonteCarloResult`, ``symmetrize=True`` at ``h ≠ 0``, or the
            estimated metric is singular (e.g. a frozen chain).

    Example:
        >>> import torch
        >>> from fisherlens.gibbs import ising2d_monte_carlo
        >>> res = ising2d_monte_carlo(4, (0.3, 0.1), sweeps=2000, generator=torch.Generator().manual_seed(0))
        >>> est = res.curvature()
        >>> est.stderr > 0 and not est.symmetrized
        True
    """
    if not isinstance(result, MonteCarloResult):
        raise ValueError(f"result must be a MonteCarloResult, got {type(result).__name__}")
    h = result.theta[1]
    if symmetrize is None:
        symmetrize = h == 0.0
    elif not isinstance(symmetrize, bool):
        raise ValueError(f"symmetrize must be None, True or False, got {symmetrize!r}")
    elif symmetrize and h != 0.0:
        raise ValueError(f"symmetrize=True needs h = 0 (the M -> -M symmetry holds only there), got h={h!r}")
    phi = result.samples.detach().cpu().numpy().astype(np.float64)
    n_sites = result.N
    block = result.block_length
    if phi.shape[0] // block < 2:
        raise ValueError(f"result has {phi.shape[0]} samples: fewer than 2 jackknife blocks of {block}")

    # autocorrelation of the centred triple products behind T (the blocks were sized for φ and its products)
    centre = phi.mean(0)
    if symmetrize:
        centre[1] = 0.0
    e, m = (phi - centre).T
    triples = {"T_bbb": e * e * e, "T_bbh": e * e * m, "T_bhh": e * m * m, "T_hhh": m * m * m}
    if symmetrize:
        triples = {k: triples[k] for k in ("T_bbb", "T_bhh")}
    tau = {k: integrated_autocorrelation_time(v)[0] for k, v in triples.items()}
    tau_max = max(tau.values())
    if block < 5.0 * tau_max:
        warnings.warn(
            f"jackknife blocks of {block} sweeps are < 5 tau = {5 * tau_max:.3g} of the third-cumulant series; "
            "the stderr of R may be underestimated",
            RuntimeWarning,
            stacklevel=2,
        )

    jk = _block_jackknife(phi, block, third=True, symmetric=symmetrize)
    g_rep = torch.from_numpy(jk["cov"] / n_sites)
    t_rep = torch.from_numpy(jk["third"] / n_sites)
    g = torch.from_numpy(np.ascontiguousarray(jk["full_cov"] / n_sites))
    t = torch.from_numpy(np.ascontiguousarray(jk["full_third"] / n_sites))
    if not bool(torch.linalg.eigvalsh(g)[0] > 0):
        raise ValueError(
            f"the estimated metric {g.tolist()} is not positive definite (a frozen chain?): R is undefined"
        )
    R = float(scalar_curvature_from_cumulants(g, t))
    # the bias is measured against R on the same B blocks (a tail shorter than a block is left out of them)
    R_blocks = float(
        scalar_curvature_from_cumulants(
            torch.from_numpy(jk["blocks_cov"] / n_sites), torch.from_numpy(jk["blocks_third"] / n_sites)
        )
    )
    reps = scalar_curvature_from_cumulants(g_rep, t_rep)
    n_blocks = jk["n_blocks"]
    reps_np = reps.numpy()
    if not np.all(np.isfinite(reps_np)):
        raise ValueError("a leave-one-block-out metric is singular: R's jackknife is undefined (run longer)")
    return MonteCarloCurvature(
        scalar_curvature=R,
        stderr=float(_jackknife_stderr(reps_np)),
        bias=float((n_blocks - 1) * (reps_np.mean() - R_blocks)),
        metric=g,
        third_cumulants=t,
        metric_stderr=torch.from_numpy(np.ascontiguousarray(_jackknife_stderr(jk["cov"]) / n_sites)),
        third_stderr=torch.from_numpy(np.ascontiguousarray(_jackknife_stderr(jk["third"]) / n_sites)),
        replicates=reps,
        symmetrized=symmetrize,
        tau=tau,
        block_length=block,
        n_blocks=n_blocks,
        L=result.L,
        theta=result.theta,
    )
