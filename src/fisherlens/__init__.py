"""fisherlens: Fisher-information geometry of neural networks.

Exact and scalable Fisher information (true, empirical, Monte-Carlo), the empirical NTK and the
Fisher–NTK trace relation, random estimators, matrix-free operators and spectra, for any ``torch.nn.Module``.
Conventions: docs/conventions.md defines every quantity once (its anchors are cited throughout); every
data-averaged quantity is a mean over the N inputs unless ``reduction="sum"``. The research works behind the
library are listed in docs/references.md.
"""

from . import bounds, geometry, gibbs, losses, optim, prune, structure, theory
from .estimators import Estimate
from .fisher import fisher_blocks, fisher_diag, fisher_matrix, fisher_rao_norm, fisher_trace
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, LossInduced
from .monitor import Monitor
from .natural import natural_gradient
from .ntk import TraceRelation, fisher_ntk_trace, ntk, ntk_trace
from .operator import FisherOperator, fisher_operator
from .spectrum import SpectralDensity, critical_learning_rate, eigenvalues, spectral_density, spectrum_stats

__version__ = "0.1.0"

__all__ = [
    "Bernoulli",
    "Categorical",
    "Estimate",
    "FisherOperator",
    "Gaussian",
    "Likelihood",
    "LossInduced",
    "Monitor",
    "SpectralDensity",
    "TraceRelation",
    "bounds",
    "critical_learning_rate",
    "eigenvalues",
    "fisher_blocks",
    "fisher_diag",
    "fisher_matrix",
    "fisher_ntk_trace",
    "fisher_operator",
    "fisher_rao_norm",
    "fisher_trace",
    "geometry",
    "gibbs",
    "losses",
    "natural_gradient",
    "ntk",
    "ntk_trace",
    "optim",
    "prune",
    "spectral_density",
    "spectrum_stats",
    "structure",
    "theory",
]
