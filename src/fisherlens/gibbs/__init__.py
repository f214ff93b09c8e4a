r"""Exponential-family Gibbs models (Ising chain, Curie–Weiss, 2-D Ising, small discrete families, tiny RBMs)
whose Fisher metric ``g(θ) = ∇²_θ log Z(θ) = Cov_θ[φ]`` is a metric callable for :mod:`fisherlens.geometry`.

Conventions and references: :mod:`fisherlens.gibbs.models` (Janke, Johnston & Kenna, "Information geometry and
phase transitions", Physica A 336 (2004); M. Sauter, B.Sc. thesis, University of Stuttgart (2023), §3.4).
The zero-field 2-D torus exactly for any size: :class:`IsingTorus` (Kaufman's formula).
Monte-Carlo estimates for larger 2-D lattices: :func:`ising2d_monte_carlo` (:mod:`fisherlens.gibbs.montecarlo`:
Wolff clusters, checkerboard Metropolis, heat bath; autocorrelation-aware standard errors), and from the same
samples the scalar curvature ``R`` by :func:`monte_carlo_curvature` (second and third cumulants of ``φ``,
:func:`scalar_curvature_from_cumulants`).
"""

from .models import (
    MAX_ENUMERATE_L,
    MAX_TRANSFER_L,
    CurieWeiss,
    ExponentialFamily,
    GibbsModel,
    Ising2D,
    IsingChain,
    IsingFiniteChain,
    IsingTorus,
    rbm_metric,
)
from .montecarlo import (
    BETA_CRITICAL,
    MonteCarloCurvature,
    MonteCarloResult,
    integrated_autocorrelation_time,
    ising2d_monte_carlo,
    monte_carlo_curvature,
    scalar_curvature_from_cumulants,
)

__all__ = [
    "BETA_CRITICAL",
    "MAX_ENUMERATE_L",
    "MAX_TRANSFER_L",
    "CurieWeiss",
    "ExponentialFamily",
    "GibbsModel",
    "Ising2D",
    "IsingChain",
    "IsingFiniteChain",
    "IsingTorus",
    "rbm_metric",
    "MonteCarloCurvature",
    "MonteCarloResult",
    "integrated_autocorrelation_time",
    "ising2d_monte_carlo",
    "monte_carlo_curvature",
    "scalar_curvature_from_cumulants",
]
