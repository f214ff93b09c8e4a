"""Reproducible studies, each a :class:`~fisherlens.experiments.study.Study` run by
:func:`~fisherlens.experiments.study.run_study`.

``STUDIES`` maps a name to the study's class, ``EXPERIMENTS`` to ``(one-line description, function)`` where the
function is the study's entry point ``fn(out, quick=False, seed=0, *, progress=True, **options)`` (the options are
the fields of the study's config dataclass).  The command line (``fisherlens list`` / ``fisherlens run NAME``)
reads them.  Every study writes a run folder (:class:`fisherlens.runs.RunDir`): ``config.json``, its tables,
PNG figures and ``summary.md``, and returns the folder's path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import (
    demo,
    dlnn,
    estimators,
    lm_fisher,
    meanfield_lr,
    meanfield_spectrum,
    mnist_traces,
    natural_gradient,
    phase_transitions,
    sloppy,
    two_param,
)
from .study import Study, StudyConfig, StudyRun, UnknownOption, run_study

__all__ = ["EXPERIMENTS", "STUDIES", "get", "Study", "StudyConfig", "StudyRun", "UnknownOption", "run_study"]

Experiment = Callable[..., Path]

#: (study class, entry-point function), in the order of ``fisherlens list``.
_ENTRIES: tuple[tuple[type[Study], Experiment], ...] = (
    (demo.Demo, demo.demo),
    (estimators.Estimators, estimators.estimators),
    (meanfield_spectrum.MeanfieldSpectrum, meanfield_spectrum.meanfield_spectrum),
    (meanfield_lr.MeanfieldLR, meanfield_lr.meanfield_lr),
    (sloppy.Sloppy, sloppy.sloppy),
    (dlnn.Dlnn, dlnn.dlnn),
    (two_param.TwoParam, two_param.two_param),
    (mnist_traces.MnistTraces, mnist_traces.mnist_traces),
    (lm_fisher.LmFisher, lm_fisher.lm_fisher),
    (natural_gradient.NaturalGradientStudy, natural_gradient.natural_gradient),
    (phase_transitions.PhaseTransitions, phase_transitions.phase_transitions),
)

STUDIES: dict[str, type[Study]] = {cls.name: cls for cls, _ in _ENTRIES}

EXPERIMENTS: dict[str, tuple[str, Experiment]] = {cls.name: (cls.description, fn) for cls, fn in _ENTRIES}


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
