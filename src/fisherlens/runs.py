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
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "RunDir",
    "write_csv",
    "append_csv_row",
    "read_csv",
    "save_checkpoint",
    "load_checkpoint",
    "Units",
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
    return _atomic_write_bytes(Path(path), lambda fh: fh.write(text.encode("utf-8")))


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


def _fsync_dir(folder: Path) -> None:
    """Make a rename or unlink inside ``folder`` durable (best effort: not every OS can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> Path:
    """Create ``path`` atomically from ``write(binary file handle)``: temp file beside it, fsync, replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Save a training state atomically with ``torch.save`` (temp file, fsync, ``os.replace``).

    A process killed at any moment leaves either the previous checkpoint or the complete new one.  Keep
    ``state`` to what :func:`load_checkpoint` can read back with ``weights_only=True``: tensors, numbers,
    strings, ``None`` and lists/tuples/dicts of those (``model.state_dict()``, ``optimizer.state_dict()``,
    ``generator.get_state()`` all qualify).

    Returns:
        The path written.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint needs a mapping (dict) of state, got {type(state).__name__}.")
    return _atomic_write_bytes(Path(path), lambda fh: torch.save(dict(state), fh))


def load_checkpoint(path: str | os.PathLike, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(..., weights_only=True)``.

    Args:
        path: the checkpoint file.
        missing_ok: return ``None`` for a missing file instead of raising ``FileNotFoundError``.

    Raises:
        ValueError: the file is not a readable checkpoint (the message names it and says what to do).
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {e}). Delete it to restart that part "
            "of the run from scratch."
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: a checkpoint must hold a dict, found {type(state).__name__}.")
    return state


_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


class Units:
    """Resumable *units of work* in a run folder: each unit checkpoints itself and stores its result rows.

    A study is split into independent units (e.g. one training run per (loss, width, seed)), each named by
    a key.  For a unit ``key`` the folder ``<run>/<folder>/`` holds

    * ``key.ckpt.pt`` — the unit's latest checkpoint while it runs (:func:`save_checkpoint`);
    * ``key.json`` — its finished result, a list of row dicts (written atomically; floats round-trip
      exactly through JSON); the checkpoint is deleted afterwards.

    :meth:`run` executes the units in order: finished units are read back, an interrupted unit resumes
    from its checkpoint, the rest start fresh.  So a process killed at any moment (``kill -9``) and started
    again ends with the same rows as an unbroken run, provided each unit is deterministic given its
    checkpoint.  Combine with :class:`RunDir`, whose config guard refuses a folder of another configuration.

    Args:
        root: the run folder (a :class:`RunDir` or a path).
        folder: sub-folder for the unit files.
    """

    CKPT = ".ckpt.pt"

    def __init__(self, root: RunDir | str | os.PathLike, folder: str = "units"):
        base = root.path if isinstance(root, RunDir) else Path(root)
        self.path = base / folder
        self.path.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not _KEY.fullmatch(key) or len(key) > 200:
            raise ValueError(
                f"unit key {key!r} must be a non-empty file-name-safe string (letters, digits, _ . = + -)."
            )
        return key

    def result_file(self, key: str) -> Path:
        """Where the finished result of ``key`` is stored."""
        return self.path / f"{self._check_key(key)}.json"

    def checkpoint_file(self, key: str) -> Path:
        """Where the running checkpoint of ``key`` is stored."""
        return self.path / f"{self._check_key(key)}{self.CKPT}"

    def is_done(self, key: str) -> bool:
        """Whether unit ``key`` has finished (its result file exists)."""
        return self.result_file(key).is_file()

    def result(self, key: str) -> list[dict[str, Any]]:
        """The stored rows of the finished unit ``key``."""
        f = self.result_file(key)
        try:
            rows = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: corrupt unit result ({e}); delete it to recompute that unit.") from e
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{f}: a unit result must be a JSON list of objects; delete it to recompute.")
        return rows

    def load(self, key: str) -> dict[str, Any] | None:
        """The latest checkpoint of an unfinished unit, or ``None``."""
        return load_checkpoint(self.checkpoint_file(key), missing_ok=True)

    def save(self, key: str, state: Mapping[str, Any]) -> Path:
        """Atomically replace the checkpoint of unit ``key``."""
        return save_checkpoint(self.checkpoint_file(key), state)

    def finish(self, key: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Store the result rows of ``key`` atomically, then drop its checkpoint."""
        rows = [dict(r) for r in rows]
        f = atomic_write_text(self.result_file(key), json.dumps(rows, default=_json_scalar) + "\n")
        ck = self.checkpoint_file(key)
        if ck.exists():
            ck.unlink()
            _fsync_dir(self.path)
        return f

    def run(
        self,
        keys: Sequence[str],
        work: Callable[[str, dict[str, Any] | None, Callable[[Mapping[str, Any]], Path]], Sequence[Mapping]],
        *,
        on_done: Callable[[str, list[dict[str, Any]]], None] | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Run (or resume) the units ``keys`` in order; return ``{key: rows}`` for all of them.

        Args:
            keys: unit keys (unique, file-name-safe).
            work: ``work(key, state, save) -> rows``.  ``state`` is the unit's last checkpoint (``None`` for a
                fresh start); ``save(state)`` checkpoints it atomically (call it after each completed step
                of the unit, e.g. each epoch).  Must return the unit's rows (dicts of plain scalars).
            on_done: called as ``on_done(key, rows)`` after each unit finishes or is read back, e.g. to
                rewrite a metrics table.

        Returns:
            The rows of every unit, in the order of ``keys``.
        """
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError("unit keys must be unique.")
        for k in keys:
            self._check_key(k)
        out: dict[str, list[dict[str, Any]]] = {}
        for key in keys:
            if self.is_done(key):
                rows = self.result(key)
                stale = self.checkpoint_file(key)
                if stale.exists():  # killed between finishing and dropping the checkpoint
                    stale.unlink()
            else:
                state = self.load(key)
                rows = [dict(r) for r in work(key, state, lambda s, key=key: self.save(key, s))]
                self.finish(key, rows)
                rows = self.result(key)  # exactly what a later resume reads back
            out[key] = rows
            if on_done is not None:
                on_done(key, rows)
        return out


def _json_scalar(v: Any) -> Any:
    """JSON fallback for result rows: one-element tensors / numpy scalars -> Python numbers, else ``str``."""
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):
            pass
    return str(v)


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
