"""Reproducible experiments: ``fn(out, *, quick=False, seed=0, data=..., progress=True, **opts)``.

``EXPERIMENTS`` maps a name to ``(one-line description, function)``; the command line
(``fisherlens list`` / ``fisherlens run NAME``) reads it.  Every experiment writes a run folder
(:class:`fisherlens.runs.RunDir`): ``config.json``, ``metrics.csv``, PNG figures and ``summary.md``,
and returns the folder's path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import demo, dlnn, estimators, meanfield_lr, meanfield_spectrum, mnist_traces, sloppy, two_param

__all__ = ["EXPERIMENTS", "get"]

Experiment = Callable[..., Path]

EXPERIMENTS: dict[str, tuple[str, Experiment]] = {
    "demo": (
        "The tour: train a 784-64-32-10 MLP on the embedded MNIST subset with fl.Monitor on (Fisher/NTK traces "
        "and relation, top eigenvalue, Fisher-Rao norm, path length, per-step batch traces).",
        demo.demo,
    ),
    "estimators": (
        "Hutchinson, MC-Fisher and empirical Fisher vs the exact diagonal and trace of an MNIST MLP: bias, "
        "CV per parameter, error vs draws and wall time, core-space bounds.",
        estimators.estimators,
    ),
    "meanfield-spectrum": (
        "Seed 003 fig 1: mean-field theory of FIM eigenvalue statistics (mean, second moment, max) vs ensembles "
        "of random tanh/ReLU/linear networks over widths M, and the T sweep; exact dual (Gram) matrices.",
        meanfield_spectrum.meanfield_spectrum,
    ),
    "meanfield-lr": (
        "Seed 003 fig 2 (left): final loss of momentum batch GD over a (width, learning-rate) grid on a "
        "teacher-student task vs the theoretical critical learning rate eta_c = 2(1+mu)/lambda_max.",
        meanfield_lr.meanfield_lr,
    ),
    "sloppy": (
        "Seed 002 §4.3-4.4: are MNIST classifiers (784-10, 784-16-10, 784-25-10; 10 each) sloppy? All nonzero "
        "per-input FIM eigenvalues (Gaussian and categorical) for an easy and a hard input, the data-averaged FIM, "
        "stiff eigenvectors as images.",
        sloppy.sloppy,
    ),
    "dlnn": (
        "Seed 002 ch. 3: deep linear networks sampled from the weight posterior (Gibbs/MALA) vs the exact "
        "posterior, HZ (Meijer G), BPKR kernel renormalisation and the Gaussian limit, over depth and width.",
        dlnn.dlnn,
    ),
    "two-param": (
        "Seed 000 §5.2: one sigmoid neuron with 2 weights; loss surfaces, Fisher entries, traces, NTK trace and "
        "scalar curvature R on a θ grid and along gradient descent, for three losses.",
        two_param.two_param,
    ),
    "mnist-traces": (
        "Seed 000 §5.1.1 / app. B: tr of the loss-induced empirical Fisher vs the NTK trace through Adam training "
        "on MNIST, 7 losses (Lp-norm, mean power, cross-entropy) x widths 128/784 x 5 seeds; resumable.",
        mnist_traces.mnist_traces,
    ),
}


def get(name: str) -> Experiment:
    """The experiment function registered as ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return EXPERIMENTS[name][1]
    except KeyError:
        raise KeyError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}"
        ) from None
