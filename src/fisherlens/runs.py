"""Run folders: atomic file writes, a config guard, and a plain CSV metrics table.

A run folder holds ``config.json`` (what was run), ``metrics.csv`` (one row per checkpoint), figures
(PNG) and ``summary.md``.  Every file is written atomically (temp file in the same folder,
``fsync``, ``os.replace``), so a crash never leaves a half-written file behind, and a folder is
never silently reused for a different configuration.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "RunDir",
    "write_csv",
    "append_csv_row",
    "read_csv",
]


def _file_mode(path: Path) -> int:
    """Permissions for ``path``: those of the file it replaces, else ``0o666`` minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file beside it, fsync, ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp creates 0600; keep the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _jsonable(obj: Any) -> Any:
    """Normalise a config to plain JSON types (tuples -> lists, paths -> str) for comparison."""
    return json.loads(json.dumps(obj, default=str))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (sorted keys, other values via ``str``) atomically; return the path."""
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"
    )


class RunDir:
    """A run folder bound to one configuration.

    Creates ``path`` (and parents) and writes ``config.json``.  If the folder already holds a
    ``config.json`` that differs from ``config``, raises ``ValueError`` instead of mixing results of
    two configurations; the same config may be rerun and its files are overwritten atomically.

    Args:
        path: the folder.
        config: JSON-serialisable settings of the run (non-JSON values are stored with ``str``).

    Attributes:
        path: the folder as a ``Path``; config: the config as stored (plain JSON types).
    """

    CONFIG = "config.json"

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any]):
        self.path = Path(path)
        self.config = _jsonable(dict(config))
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a folder; choose another --out.")
        cfg_file = self.path / self.CONFIG
        if cfg_file.exists():
            try:
                old = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{cfg_file} exists but is not valid JSON ({e}); "
                    "refusing to reuse this folder. "
                    "Remove it or choose another output folder."
                ) from e
            if old != self.config:
                diff = sorted(
                    k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k)
                )
                raise ValueError(
                    f"{self.path} already holds a run with a different config (differs in: "
                    f"{', '.join(diff)}); refusing to mix results. Choose another output folder "
                    "or delete the old one."
                )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_file, self.config)

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run folder."""
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        """Atomically write a text file into the run folder; returns its path."""
        return atomic_write_text(self.file(name), text)

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write a JSON file into the run folder; returns its path."""
        return atomic_write_json(self.file(name), obj)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Atomically write ``rows`` (dicts) as a CSV table with a header line.

    Args:
        path: destination.
        rows: one mapping per row; missing keys are written as empty cells.
        columns: column order (default: keys in order of first appearance).

    Returns:
        The path written.
    """
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    extra = {k for r in rows for k in r} - set(columns)
    if extra:
        raise ValueError(f"rows have keys not in columns: {sorted(extra)}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    return atomic_write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a CSV table written by :func:`write_csv` into a list of ``{column: text}`` dicts."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def append_csv_row(path: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Append one row to a CSV table, creating it (with a header) if missing; rewritten atomically.

    New keys add columns (earlier rows get empty cells).  Meant for small metrics tables.
    """
    path = Path(path)
    header: list[str] = []
    rows: list[Mapping[str, Any]] = []
    if path.exists():
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    columns = list(dict.fromkeys([*header, *row.keys()]))
    return write_csv(path, [*rows, row], columns)
