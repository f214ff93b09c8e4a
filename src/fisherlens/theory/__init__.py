"""Analytic theory to compare measured Fisher spectra with (``fl.theory``).

* :func:`meanfield` — the mean-field statistics of the FIM of random deep networks of Karakida, Akaho & Amari (2019),
  *Universal Statistics of Fisher Information in Deep Neural Networks: Mean Field Approach*
  (docs/conventions.md#mean-field-theory):
  κ1, κ2, the mean, second moment and maximum eigenvalue, the critical learning rate, the Fisher–Rao norm.
* :mod:`.random_networks` — the matching random-network ensembles (``nn.Module`` builders and a batched
  exact Gram/dual-matrix evaluator) used to check the theory.
* :mod:`.dlnn` — deep linear networks as reviewed by Luzzatto (2023), *Understanding Deep Learning: Deep Linear
  Neural Networks and Fisher Information*, ch. 3 (docs/conventions.md#deep-linear-networks): BPKR kernel
  renormalisation, the exact Meijer-G (HZ) posterior, the Gaussian limit, an exact finite-temperature reference
  and posterior samplers (Gibbs, MALA).
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
