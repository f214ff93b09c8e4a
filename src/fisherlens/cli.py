"""Command line: ``fisherlens list | run EXPERIMENT [options] | report DIR``.

Bad input (unknown experiment, a folder holding a different run, an existing folder that is not a run
folder, a broken ``config.json``, a bad ``--set`` option, a missing dataset, ...) prints one line
``fisherlens: error: ...`` to stderr and exits with status 2, without a traceback.  A run started into a
folder that another ``fisherlens run`` is writing waits for that one to finish (see
:class:`fisherlens.runs.RunDir`).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from . import __version__

__all__ = ["main"]


class _UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fisherlens",
        description="Fisher-information geometry of neural networks: run and inspect experiments.",
    )
    p.add_argument("--version", action="version", version=f"fisherlens {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("list", help="list the experiments", description="List the experiments.")
    r = sub.add_parser(
        "run",
        help="run an experiment into a run folder",
        description="Run an experiment; writes config.json, metrics.csv, figures "
        "and summary.md into the run folder. `fisherlens run NAME --help` lists NAME's options.",
        add_help=False,
    )
    r.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: and NAME's options)")
    r.set_defaults(run_parser=r)
    r.add_argument("experiment", nargs="?", help="experiment name (see `fisherlens list`)")
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: runs/EXPERIMENT): new, empty, or a run folder of the same settings; "
        "a run started while another writes it waits for that one",
    )
    r.add_argument("--quick", action="store_true", help="tiny settings (seconds), for smoke tests")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument(
        "--data",
        default=None,
        help="dataset: mnist-subset, digits, or a folder of MNIST IDX files "
        "(default: the experiment's own, mnist-subset for the MNIST studies)",
    )
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the study's own, 1 for most: a busy machine is not "
        "oversubscribed); the same as --set threads=N",
    )
    r.add_argument(
        "--device",
        default=None,
        help="torch device of the studies that can use an accelerator (e.g. cuda, cuda:1; default cpu); "
        "the same as --set device=NAME",
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an experiment option (repeatable), e.g. --set seeds=100 --set epochs=300; "
        "VALUE is a Python literal (number, list, ...) or a string",
    )
    rep = sub.add_parser(
        "report",
        help="print the summary of a run folder and the paths of its figures",
        description="Print summary.md of a run folder, then the paths of its PNG figures.",
    )
    rep.add_argument("dir", type=Path, help="run folder")
    return p


def _list() -> int:
    from .experiments import EXPERIMENTS

    width = max(map(len, EXPERIMENTS))
    for name, (desc, _) in EXPERIMENTS.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _study_help(parser: argparse.ArgumentParser, name: str) -> int:
    """``fisherlens run NAME --help``: the run options, then NAME's own (type, default, --quick value)."""
    from .experiments import STUDIES

    parser.print_help()
    cls = STUDIES[name]
    width = shutil.get_terminal_size((100, 20)).columns
    print(f"\n{name}: {cls.description}\n\noptions of {name} (--set KEY=VALUE):")
    for opt, typ, default, quick, doc in cls.Config.help_rows():
        head = f"  {opt} ({typ}) = {default}" + (f"; --quick: {quick}" if quick else "")
        print(head)
        if doc:
            print(textwrap.fill(doc.replace("``", "`"), width=max(width, 60) - 1, initial_indent=" " * 6,
                                subsequent_indent=" " * 6))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .experiments import STUDIES, UnknownOption, run_study

    if args.help and args.experiment is None:
        args.run_parser.print_help()
        return 0
    if args.experiment is None:
        raise _UsageError("run: give an experiment name (see `fisherlens list`)")
    if args.experiment not in STUDIES:
        raise _UsageError(
            f"unknown experiment {args.experiment!r}; known: {', '.join(sorted(STUDIES))} "
            "(see `fisherlens list`)"
        )
    if args.help:
        return _study_help(args.run_parser, args.experiment)
    out = args.out if args.out is not None else Path("runs") / args.experiment
    options = dict(_option(s) for s in args.set)
    for key in ("data", "threads", "device"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if "device" in options and "device" not in STUDIES[args.experiment].Config.options():
        raise _UsageError(f"{args.experiment} runs on the CPU only (it has no device option); drop --device")
    try:
        path = run_study(STUDIES[args.experiment], out, quick=args.quick, seed=args.seed,
                         progress=not args.no_progress, **options)
    except UnknownOption as e:  # an option the study does not have
        raise _UsageError(str(e)) from e
    except (ValueError, OSError, ImportError) as e:  # bad data/folder/options, missing extras
        raise _UsageError(str(e)) from e
    print(f"wrote {path}  (summary: {Path(path) / 'summary.md'})")
    return 0


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, Python literal or string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise _UsageError(f"--set expects KEY=VALUE with KEY a name, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def _report(args: argparse.Namespace) -> int:
    from .runs import read_config

    summary = args.dir / "summary.md"
    if not args.dir.is_dir():
        raise _UsageError(f"{args.dir}: no such run folder")
    if not summary.is_file():
        raise _UsageError(f"{args.dir}: no summary.md (unfinished run, or not a run folder)")
    try:
        read_config(args.dir)  # a broken config.json: not a run folder fisherlens wrote
        text = summary.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _UsageError(f"{summary} is not UTF-8 text ({e}); it was not written by fisherlens") from e
    except (ValueError, OSError) as e:
        raise _UsageError(str(e)) from e
    sys.stdout.write(text)
    figures = sorted(args.dir.glob("*.png"))
    if figures:
        print("\nfigures:\n" + "\n".join(f"  {p}" for p in figures))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherlens`` console script; returns the exit status.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad input (one-line message on stderr).
    """
    parser = _parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on a usage error
    try:
        if args.command == "list":
            return _list()
        if args.command == "run":
            return _run(args)
        return _report(args)
    except _UsageError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
