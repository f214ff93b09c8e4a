"""Run folders: atomic file writes, a config guard, a folder lock, and a plain CSV metrics table.

A run folder holds ``config.json`` (what was run), ``metrics.csv`` (one row per checkpoint), figures
(PNG), ``summary.md`` and the marker ``.fisherlens``.  Every file is written atomically (uniquely named
temp file in the same folder, ``fsync``, ``os.replace``), so a crash never leaves a half-written file
behind.  A folder is never silently reused: one of a different configuration is refused, and so is an
existing non-empty folder that is not a fisherlens run folder (it may hold the user's own
``metrics.csv`` or ``summary.md``).  While a :class:`RunDir` is open its folder is locked: a second run
into the same folder (another process) waits until the first has finished, then proceeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: run folders are not locked
    fcntl = None

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_config",
    "RunDir",
    "write_csv",
    "append_csv_row",
    "read_csv",
    "save_checkpoint",
    "load_checkpoint",
    "Units",
]

CONFIG = "config.json"
MARKER = ".fisherlens"
_MARKER_TEXT = (
    "This folder is a fisherlens run folder (see config.json). A running study holds a lock on this file.\n"
)


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
    return atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def _jsonable(obj: Any) -> Any:
    """Normalise a config to plain JSON types (tuples -> lists, paths -> str) for comparison."""
    return json.loads(json.dumps(obj, default=str))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (sorted keys, other values via ``str``) atomically; return the path."""
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"
    )


def read_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The settings stored in ``folder/config.json``, or ``None`` when there is no such file.

    Raises:
        ValueError: ``config.json`` is not a readable UTF-8 JSON object (the message names the file).
    """
    f = Path(folder) / CONFIG
    if not f.exists():
        return None
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{f} exists but is not valid JSON ({e}); refusing to reuse this folder. "
            "Remove it or choose another output folder."
        ) from e
    except OSError as e:
        raise ValueError(f"{f} cannot be read ({e}); choose another output folder.") from e
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{f} holds a JSON {type(cfg).__name__}, not the object a fisherlens run writes; this is not a "
            "fisherlens run folder. Remove the file or choose another output folder."
        )
    return cfg


# ------------------------------------------------------------------------------------- the folder lock
#: folder marker (real path) -> (pid, fd, number of open RunDirs of this process on it)
_HELD: dict[str, tuple[int, int, int]] = {}


def _lock(marker: Path) -> str:
    """Lock a run folder through its marker file (created if missing); waits while another process holds it.

    Re-entrant within one process (a second :class:`RunDir` on the same folder shares the lock).
    Returns the key to pass to :func:`_unlock`.
    """
    key, pid = os.path.realpath(marker), os.getpid()
    held = _HELD.get(key)
    if held is not None and held[0] == pid:  # entries inherited through fork() belong to the parent
        _HELD[key] = (pid, held[1], held[2] + 1)
        return key
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock(fd, marker.parent)
        if os.fstat(fd).st_size == 0:
            os.write(fd, _MARKER_TEXT.encode("utf-8"))
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = (pid, fd, 1)
    return key


def _flock(fd: int, folder: Path) -> None:
    """Take an exclusive advisory lock on ``fd``; tell the user on stderr when it has to wait."""
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fisherlens: {folder} is in use by another run; waiting for it to finish ...",
              file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)


def _unlock(key: str) -> None:
    """Release one hold of this process on a folder lock (the lock goes with the last one)."""
    pid, fd, n = _HELD.get(key, (None, -1, 0))
    if pid != os.getpid():
        return
    if n > 1:
        _HELD[key] = (pid, fd, n - 1)
        return
    del _HELD[key]
    os.close(fd)  # closing the descriptor releases the flock


class RunDir:
    """A run folder bound to one configuration.

    Creates ``path`` (and parents), the marker ``.fisherlens`` and ``config.json``.  Refuses (``ValueError``,
    before anything is written):

    * a folder whose ``config.json`` differs from ``config`` (results of two configurations never mix);
    * a ``config.json`` that is not valid UTF-8 JSON or not a JSON object;
    * an existing non-empty folder that is not a fisherlens run folder (neither marker nor ``config.json``):
      it may hold the user's own ``metrics.csv``/``summary.md``, which a run would overwrite.

    The same config may be rerun and its files are overwritten atomically.  The folder is locked
    (``fcntl.flock`` on the marker) from construction until :meth:`close`, the end of a ``with`` block or
    the object's garbage collection: a run started into the same folder by another process *waits* (it says
    so on stderr) and then proceeds, so two identical runs both succeed and write the same files.  Within one
    process the lock is shared.

    Args:
        path: the folder.
        config: JSON-serialisable settings of the run (non-JSON values are stored with ``str``).

    Attributes:
        path: the folder as a ``Path``; config: the config as stored (plain JSON types).
    """

    CONFIG = CONFIG
    MARKER = MARKER

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any]):
        self.path = Path(path)
        self.config = _jsonable(dict(config))
        self._check()  # before touching anything: a refused folder stays exactly as it was
        self.path.mkdir(parents=True, exist_ok=True)
        self._release = weakref.finalize(self, _unlock, _lock(self.path / self.MARKER))
        try:
            self._check()  # again under the lock: a concurrent run may have written the folder meanwhile
            atomic_write_json(self.path / self.CONFIG, self.config)
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        """Refuse a file, a folder of another config, a broken config.json, or a foreign non-empty folder."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a folder; choose another --out.")
        old = read_config(self.path)
        if old is not None:
            if old != self.config:
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise ValueError(
                    f"{self.path} already holds a run with a different config (differs in: "
                    f"{', '.join(diff)}); refusing to mix results. Choose another output folder "
                    "or delete the old one."
                )
            return  # this very config: an earlier run (also one written before folders had a marker)
        if (self.path / self.MARKER).exists():
            return
        names = sorted(p.name for p in self.path.iterdir())
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise ValueError(
                f"{self.path} is not empty and not a fisherlens run folder (no {self.CONFIG}, no {self.MARKER}); "
                f"refusing to write into it, a run would overwrite its files ({shown}). Choose a new or empty "
                "output folder."
            )

    def close(self) -> None:
        """Release the folder lock (idempotent; also done at garbage collection and process exit)."""
        self._release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """Create ``path`` atomically from ``write(binary file handle)``.

    The data go to a uniquely named temp file beside ``path`` (so concurrent writers never share one), which
    is fsynced and then renamed over ``path`` with ``os.replace``; on any error the temp file is removed and
    the old ``path`` is left as it was.

    Returns:
        The path written.
    """
    path = Path(path)
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
    return atomic_write_bytes(path, lambda fh: torch.save(dict(state), fh))


def load_checkpoint(
    path: str | os.PathLike, *, missing_ok: bool = False, required: Sequence[str] = ()
) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(..., weights_only=True)``.

    Args:
        path: the checkpoint file.
        missing_ok: return ``None`` for a missing file instead of raising ``FileNotFoundError``.
        required: keys the checkpoint must hold (a foreign checkpoint lacking one is refused).

    Raises:
        ValueError: the file is not a readable checkpoint, or lacks a ``required`` key (the message names the
            file, the missing keys and what to do).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        if missing_ok:  # also when another process removed it a moment ago
            return None
        raise
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {e}). Delete it to restart that part "
            "of the run from scratch."
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: a checkpoint must hold a dict, found {type(state).__name__}.")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"{path}: not a checkpoint of this run, it lacks the key(s) {', '.join(map(repr, missing))}. "
            "Delete it to restart that part of the run from scratch."
        )
    return state


_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
_UNIT_FORMAT = "fisherlens-unit/1"


def _unit_digest(key: str, rows: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a unit's key and rows."""
    text = json.dumps({"key": key, "rows": rows}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Units:
    """Resumable *units of work* in a run folder: each unit checkpoints itself and stores its result rows.

    A study is split into independent units (e.g. one training run per (loss, width, seed)), each named by
    a key.  For a unit ``key`` the folder ``<run>/<folder>/`` holds

    * ``key.ckpt.pt`` — the unit's latest checkpoint while it runs (:func:`save_checkpoint`);
    * ``key.json`` — its finished result: the list of row dicts (floats round-trip exactly through JSON)
      with the unit's key and a sha256 checksum of both, written atomically; the checkpoint is deleted
      afterwards.  A result file whose checksum does not match (edited by hand, damaged, copied from another
      unit, or written without a checksum) is refused with a ``ValueError`` naming it — never taken as is.

    :meth:`run` executes the units in order: finished units are read back, an interrupted unit resumes
    from its checkpoint, the rest start fresh.  So a process killed at any moment (``kill -9``) and started
    again ends with the same rows as an unbroken run, provided each unit is deterministic given its
    checkpoint.  Combine with :class:`RunDir`, whose config guard refuses a folder of another configuration
    and whose lock keeps a second run of the folder waiting.

    Args:
        root: the run folder (a :class:`RunDir` or a path).
        folder: sub-folder for the unit files.
    """

    CKPT = ".ckpt.pt"

    def __init__(self, root: RunDir | str | os.PathLike, folder: str = "units"):
        self.root = root  # a RunDir stays open (locked) while its Units are in use
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
        """The stored rows of the finished unit ``key``, after checking the file's checksum.

        Raises:
            ValueError: the file is corrupt, has no checksum, belongs to another unit or fails its checksum.
        """
        f = self.result_file(key)
        redo = "delete it to recompute that unit"
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: corrupt unit result ({e}); {redo}.") from e
        if not isinstance(doc, dict) or doc.get("format") != _UNIT_FORMAT:
            raise ValueError(f"{f}: not a unit result of this fisherlens version (no checksum); {redo}.")
        rows = doc.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{f}: a unit result must hold a JSON list of row objects; {redo}.")
        if doc.get("key") != key:
            raise ValueError(f"{f}: holds the result of unit {doc.get('key')!r}, not {key!r}; {redo}.")
        if doc.get("sha256") != _unit_digest(key, rows):
            raise ValueError(
                f"{f}: checksum mismatch, the file was changed after the unit finished (edited by hand or "
                f"damaged); its rows are not used: {redo}."
            )
        return rows

    def load(self, key: str, required: Sequence[str] = ()) -> dict[str, Any] | None:
        """The latest checkpoint of an unfinished unit (holding the ``required`` keys), or ``None``."""
        return load_checkpoint(self.checkpoint_file(key), missing_ok=True, required=required)

    def save(self, key: str, state: Mapping[str, Any]) -> Path:
        """Atomically replace the checkpoint of unit ``key``."""
        return save_checkpoint(self.checkpoint_file(key), state)

    def finish(self, key: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Store the result rows of ``key`` with their checksum atomically, then drop its checkpoint."""
        plain = json.loads(json.dumps([dict(r) for r in rows], default=_json_scalar))
        doc = {"format": _UNIT_FORMAT, "key": key, "sha256": _unit_digest(key, plain), "rows": plain}
        f = atomic_write_text(self.result_file(key), json.dumps(doc) + "\n")
        self._drop_checkpoint(key)
        return f

    def _drop_checkpoint(self, key: str) -> None:
        """Delete the checkpoint of ``key`` if there is one (a missing file is fine)."""
        try:
            self.checkpoint_file(key).unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self.path)

    def run(
        self,
        keys: Sequence[str],
        work: Callable[[str, dict[str, Any] | None, Callable[[Mapping[str, Any]], Path]], Sequence[Mapping]],
        *,
        on_done: Callable[[str, list[dict[str, Any]]], None] | None = None,
        state_keys: Sequence[str] = (),
    ) -> dict[str, list[dict[str, Any]]]:
        """Run (or resume) the units ``keys`` in order; return ``{key: rows}`` for all of them.

        Args:
            keys: unit keys (unique, file-name-safe).
            work: ``work(key, state, save) -> rows``.  ``state`` is the unit's last checkpoint (``None`` for a
                fresh start); ``save(state)`` checkpoints it atomically (call it after each completed step
                of the unit, e.g. each epoch).  Must return the unit's rows (dicts of plain scalars).
            on_done: called as ``on_done(key, rows)`` after each unit finishes or is read back, e.g. to
                rewrite a metrics table.
            state_keys: keys every checkpoint must hold; a checkpoint lacking one (a foreign file) is refused
                with a ``ValueError`` naming the file and the missing keys before ``work`` sees it.

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
                self._drop_checkpoint(key)  # killed between finishing and dropping the checkpoint
            else:
                state = self.load(key, state_keys)
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
