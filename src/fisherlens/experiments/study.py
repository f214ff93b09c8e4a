"""The skeleton every study follows, and the runner that executes one into a run folder.

A study is a :class:`Study` subclass with a :class:`StudyConfig` dataclass of options.  :func:`run_study` builds
the config (full defaults, the study's ``QUICK`` overrides in quick mode, then the caller's options), validates
it, lets the study load what it needs (``setup``), and only then creates the run folder
(:class:`fisherlens.runs.RunDir`, which writes ``config.json`` and guards against a folder of another
configuration).  Inside the folder it pins torch's intra-op threads to the config's ``threads`` (an option of
every study; ``None`` leaves torch's setting), starts the clock, and runs the study's three steps
``compute → figures → report``; the report becomes ``summary.md``.  Progress bars (tqdm) come from
:meth:`StudyRun.bar`, timings from :meth:`StudyRun.elapsed` / :meth:`StudyRun.lap`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import time
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from ..runs import RunDir, write_csv
from ._common import check_int, check_threads, torch_threads

__all__ = ["StudyConfig", "Study", "StudyRun", "UnknownOption", "figures_section", "run_study"]


class UnknownOption(TypeError):
    """An option the study does not have (a ``TypeError``, like an unexpected keyword argument)."""


@dataclasses.dataclass
class StudyConfig:
    """Options of a study: subclass it as a dataclass whose fields carry the full-run defaults.

    Class attribute ``QUICK`` maps field names to the ``--quick`` values (applied before the caller's own
    options, so an explicit option always wins).  :meth:`validate` raises ``ValueError`` naming the bad option and
    may normalise values (e.g. a single width for a list option becomes a one-element tuple); subclasses extend it
    and call ``super().validate()``.  Options are checked against the fields' types first (:func:`fits`).

    Attributes:
        seed: random seed of the run (every draw comes from generators seeded by it).
        threads: torch intra-op threads during the study (default 1: a busy machine is not oversubscribed, and
            results do not depend on the core count); ``None`` keeps torch's setting (one per core).
    """

    QUICK: ClassVar[Mapping[str, Any]] = {}

    quick: bool = False
    seed: int = 0
    threads: int | None = 1

    @classmethod
    def options(cls) -> list[str]:
        """The option names a caller may set (every field but ``quick``)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "quick"]

    @classmethod
    def help_rows(cls) -> list[tuple[str, str, str, str, str]]:
        """``(option, type, default, --quick value, description)`` of every option, for ``fisherlens run NAME
        --help``; descriptions come from the ``Attributes:`` section of the config's docstring."""
        hints, docs = typing.get_type_hints(cls), _attribute_docs(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.name == "quick":
                continue
            quick = repr(cls.QUICK[f.name]) if f.name in cls.QUICK else ""
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            rows.append((f.name, type_name(hints[f.name]), repr(default), quick, docs.get(f.name, "")))
        return rows

    @classmethod
    def create(cls, study: str, quick: bool = False, **options) -> StudyConfig:
        """Defaults, then ``QUICK`` (when ``quick``), then ``options``; validated.

        Raises:
            UnknownOption: an option this study does not have (the message lists the known ones).
            ValueError: a bad value (the message names the option).
        """
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            raise UnknownOption(f"{study}: unknown option(s) {', '.join(map(repr, unknown))}; options: "
                                f"{', '.join(cls.options())}.")
        hints = typing.get_type_hints(cls)
        for name, value in options.items():
            if not fits(value, hints[name]):
                raise ValueError(f"{study}: option {name!r} expects {type_name(hints[name])}, got {value!r} "
                                 f"({type(value).__name__}).")
        cfg = cls(quick=bool(quick), **{**(cls.QUICK if quick else {}), **options})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check (and normalise) the options; ``ValueError`` naming the first bad one."""
        check_int("seed", self.seed, 0)
        check_threads("threads", self.threads)


def type_name(hint) -> str:
    """A readable name of a config field's type: ``int``, ``float or None``, ``tuple of int``, ..."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if typing.get_origin(hint) in (tuple, list, Sequence):
        return f"{typing.get_origin(hint).__name__} of {type_name(args[0])}" if args else "a sequence"
    return "anything" if hint is Any else getattr(hint, "__name__", str(hint))


def fits(value, hint) -> bool:
    """Whether ``value`` (from Python code or a ``--set`` literal) can be a field of type ``hint``: ints for
    floats, a single item or a list for a tuple (the studies normalise them); never a bool for a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else fits(value, a) for a in args)
    if origin in (tuple, list, Sequence):
        items = value if isinstance(value, (tuple, list)) else [value]
        return all(fits(v, args[0]) for v in items) if args else True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _attribute_docs(cls) -> dict[str, str]:
    """Option name -> its one-paragraph description in the ``Attributes:`` sections of ``cls`` and its bases
    (an entry ``a, b: text`` describes both)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if "__doc__" in vars(klass) else None
        if not doc or "Attributes:" not in doc:
            continue
        body = doc.split("Attributes:", 1)[1]
        for m in re.finditer(r"^ {4}([\w, ]+):\s(.*(?:\n {6,}.*)*)", body, flags=re.M):
            text = " ".join(m.group(2).split())
            for name in m.group(1).split(","):
                out[name.strip()] = text
    return out


@dataclasses.dataclass
class StudyRun:
    """What the study's steps get from the runner: the open run folder, the config, the inputs prepared by
    ``setup``, progress bars and the clock.

    Attributes:
        name: the study's name; folder: the open :class:`~fisherlens.runs.RunDir`; cfg: the validated config;
        inputs: what :meth:`Study.setup` returned; progress: whether bars are shown; figures: the figures
        written (file name → description), set by the runner after :meth:`Study.figures`; laps: seconds per
        named phase (:meth:`lap`).
    """

    name: str
    folder: RunDir
    cfg: StudyConfig
    inputs: Any = None
    progress: bool = True
    figures: dict[str, str] = dataclasses.field(default_factory=dict)
    laps: dict[str, float] = dataclasses.field(default_factory=dict)
    _t0: float = dataclasses.field(default_factory=time.perf_counter)
    _last: float | None = None

    @property
    def path(self) -> Path:
        """The run folder."""
        return self.folder.path

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run folder."""
        return self.folder.file(name)

    def write_text(self, name: str, text: str) -> Path:
        """Atomically write a text file into the run folder."""
        return self.folder.write_text(name, text)

    def write_csv(self, name: str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
        """Atomically write a CSV table into the run folder (:func:`fisherlens.runs.write_csv`)."""
        return write_csv(self.file(name), rows, columns)

    def bar(self, total: int | None = None, desc: str = "", *, iterable: Iterable | None = None, unit: str = "it",
            hide: bool = False, **kw) -> tqdm:
        """A tqdm bar ``"<study>: <desc>"`` that disappears when done; hidden without progress (or with ``hide``)."""
        return tqdm(iterable, total=total, desc=f"{self.name}: {desc}" if desc else self.name, unit=unit,
                    disable=not self.progress or hide, leave=False, mininterval=0.5, **kw)

    def elapsed(self) -> float:
        """Seconds since the run folder was opened."""
        return time.perf_counter() - self._t0

    def lap(self, name: str) -> float:
        """Record (in :attr:`laps`) and return the seconds since the previous lap, or since the start."""
        now = time.perf_counter()
        self.laps[name] = now - (self._t0 if self._last is None else self._last)
        self._last = now
        return self.laps[name]


class Study:
    """Base of the studies run by ``fisherlens run NAME``.

    A new study sets ``name``, ``description`` and ``Config`` (a :class:`StudyConfig` dataclass: full defaults,
    ``QUICK`` overrides, ``validate()``) and implements ``compute(cfg, run)`` (the work and its tables),
    ``figures(results, run)`` and ``report(results, run)`` (the text of ``summary.md``); the run folder,
    ``config.json``, threads, timing and progress bars are the runner's (:func:`run_study`).

    Optional hooks: :meth:`setup` (work that must succeed before the folder exists, e.g. loading data) and
    :meth:`config_json` (the settings stored in ``config.json``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[StudyConfig]]

    def setup(self, cfg: StudyConfig) -> Any:
        """Load and check what :meth:`compute` needs before the run folder is created (a bad ``--data`` or an
        option that does not fit the data leaves no trace); the result is ``run.inputs``."""
        return None

    def config_json(self, cfg: StudyConfig, inputs: Any) -> dict[str, Any]:
        """The settings stored in ``config.json`` (default: every option, and the study's name)."""
        return {"experiment": self.name, **dataclasses.asdict(cfg)}

    def compute(self, cfg: StudyConfig, run: StudyRun) -> Any:
        """Do the work, write the tables; return what :meth:`figures` and :meth:`report` need."""
        raise NotImplementedError

    def figures(self, results: Any, run: StudyRun) -> Mapping[str, str] | None:
        """Write the PNG figures; return ``{file name: description}`` of those written (or ``None``)."""
        return None

    def report(self, results: Any, run: StudyRun) -> str:
        """The text of ``summary.md``."""
        raise NotImplementedError


def run_study(study: Study | type[Study], out: str | os.PathLike, quick: bool = False, seed: int = 0, *,
              progress: bool = True, **options) -> Path:
    """Run ``study`` into the run folder ``out``; returns the folder's path.

    Args:
        study: the study (instance or class).
        out: run folder (created; refused if it holds a run of another configuration or foreign files).
        quick: the study's tiny settings (``Config.QUICK``), for smoke tests.
        seed: random seed of the run.
        progress: show progress bars.
        **options: the study's options (fields of its ``Config``).

    Raises:
        UnknownOption: an option the study does not have.
        ValueError: a bad option value, bad data, or a refused folder — before the folder is touched.
    """
    study = study() if isinstance(study, type) else study
    cfg = study.Config.create(study.name, quick=quick, seed=seed, **options)
    inputs = study.setup(cfg)
    config = study.config_json(cfg, inputs)
    with torch_threads(cfg.threads), RunDir(out, config) as folder:
        run = StudyRun(study.name, folder, cfg, inputs, progress)
        results = study.compute(cfg, run)
        run.figures = dict(study.figures(results, run) or {})
        run.write_text("summary.md", study.report(results, run))
    return folder.path


def figures_section(figures: dict[str, str]) -> list[str]:
    """The "Figures" section of a ``summary.md``: a linked list of ``{file: description}``, then the images."""
    return ["## Figures", "", *(f"- [{n}]({n}): {d}" for n, d in figures.items()), "",
            *(f"![{n}]({n})" for n in figures), ""]

