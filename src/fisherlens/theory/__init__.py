"""Analytic theory to compare measured Fisher spectra with (``fl.theory``).

* :func:`meanfield` — seed 003's mean-field statistics of the FIM of random deep networks (SCIENCE §9):
  κ1, κ2, the mean, second moment and maximum eigenvalue, the critical learning rate, the Fisher–Rao norm.
* :mod:`.random_networks` — the matching random-network ensembles (``nn.Module`` builders and a batched
  exact Gram/dual-matrix evaluator) used to check the theory.
* :mod:`.dlnn` — seed 002 ch. 3, deep linear networks: BPKR kernel renormalisation, the exact Meijer-G (HZ)
  posterior, the Gaussian limit, an exact finite-temperature reference and posterior samplers (Gibbs, MALA).
"""

from . import dlnn
from .meanfield import (
    ACTIVATIONS,
    Activation,
    MeanField,
    activation,
    gaussian_pair,
    gaussian_pairs,
    gaussian_square,
    gaussian_squares,
    meanfield,
)
from .random_networks import MLPEnsemble, ensemble_stats, random_mlp

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "MLPEnsemble",
    "MeanField",
    "activation",
    "dlnn",
    "ensemble_stats",
    "gaussian_pair",
    "gaussian_pairs",
    "gaussian_square",
    "gaussian_squares",
    "meanfield",
    "random_mlp",
]
