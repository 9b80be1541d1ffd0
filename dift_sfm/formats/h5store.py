"""Crash-safe writing of hloc-style h5 files.

HDF5 files are not crash-safe: a process killed in the middle of a write can leave a file that
no reader opens. So an output file is never modified in place. New entries go into small shard
files under ``<output>.parts/`` (written as ``*.tmp``, renamed when closed); ``finalize`` merges
the old output and the shards into a temporary file that atomically replaces the output. After a
crash the next run salvages every complete entry of the shards, so finished work is never lost,
and readers of the output only ever see a complete file.

One writer at a time: the writer holds an exclusive lock on ``<output>.lock`` (``flock``,
released by the OS when the process dies, so a ``kill -9`` never leaves it stuck: the file
that remains is not a lock by itself); a second writer of the same output gets an
OutputLockedError at once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import h5py
import numpy as np

from ..errors import DiftSfmError, FormatError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one writer is the user's responsibility
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("dift_sfm")

Validator = Callable[[h5py.Group], bool]
#: HDF5 format versions of every file written: v1.8+ stores root attributes over 64 KiB
#: (e.g. a PCA basis); hloc's h5py readers open it.
LIBVER = ("v108", "v110")


def open_h5(path: Path | str, mode: str = "r") -> h5py.File:
    """Open an h5 file with a clear error naming it when it is missing or corrupt."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise FormatError(f"h5 file {path} does not exist.")
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as err:
        raise FormatError(f"Could not open h5 file {path} ({err}). If a run was killed while "
                          "writing it with another tool, delete it and re-run.") from err


def iter_entries(f: h5py.Group, is_complete: Validator, prefix: str = "") -> Iterable[str]:
    """Paths of the groups below ``f`` that ``is_complete`` accepts (recursing into the rest)."""
    for key, item in f.items():
        if not isinstance(item, h5py.Group):
            continue
        path = f"{prefix}{key}"
        if is_complete(item):
            yield path
        else:
            yield from iter_entries(item, is_complete, path + "/")


def _copy_entry(src: h5py.File, dst: h5py.File, key: str) -> None:
    if key in dst:
        del dst[key]
    parent = key.rsplit("/", 1)[0] if "/" in key else None
    if parent:
        dst.require_group(parent)
    src.copy(src[key], dst, name=key)


class OutputLockedError(DiftSfmError):
    """Another process is writing the same output."""


class OutputWriteError(DiftSfmError):
    """The operating system refused a write (disk full, quota, read-only, file too large)."""


def check_writable(folder: Path) -> None:
    """Fail before any work when ``folder`` cannot be created or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiftSfmError(f"Cannot create output folder {folder}: {err.strerror}.") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DiftSfmError(f"Output folder {folder} is not writable: choose another output "
                           "or fix its permissions.")


class OutputLock:
    """An exclusive, non-blocking lock on ``<path>.lock``, held until ``release``.

    The lock file is removed on release; a writer that locked a file another one just
    removed notices (the inode changed) and locks the new file instead.
    """

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        check_writable(self.path.parent)
        self._fd: int | None = None
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                self._fd = fd
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                raise OutputLockedError(
                    f"Another dift-sfm process is writing {path} (lock {self.path}). Wait for "
                    "it to finish, or write to another output.") from err
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:
                os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class ShardedH5Writer:
    """Adds entries (groups of numeric datasets) to an h5 output without writing it in place.

    Args:
        path: the output file.
        is_complete: tells whether a group is a complete entry (all datasets, shapes agree).
        root_attrs: attributes to set on the output's root (e.g. the conf that wrote it).
        shard_entries: entries per shard; at most this much work is lost on a kill -9.
    """

    def __init__(self, path: Path | str, is_complete: Validator,
                 root_attrs: dict | None = None, shard_entries: int = 16,
                 shard_seconds: float = 30.0):
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.is_complete = is_complete
        self.root_attrs = dict(root_attrs or {})
        self.shard_entries = shard_entries
        self.shard_seconds = shard_seconds
        self._shard: h5py.File | None = None
        self._shard_path: Path | None = None
        self._shard_count = 0
        self._shard_start = 0.0
        self._lock = OutputLock(self.path)
        self._salvage()

    # ------------------------------------------------------------------ recovery
    def _salvage(self) -> None:
        """Turn leftovers of an interrupted run into clean shards; drop what cannot be read."""
        stale = self.path.with_name(self.path.name + ".merging")
        if stale.exists():
            stale.unlink()
        if not self.parts.is_dir():
            return
        for tmp in sorted(self.parts.glob("*.tmp")):
            keys: list[str] = []
            try:
                with h5py.File(tmp, "r", locking=False) as f:
                    keys = list(iter_entries(f, self.is_complete))
                    if keys:
                        with h5py.File(tmp.with_suffix(".h5"), "w", locking=False,
                                       libver=LIBVER) as out:
                            out.attrs.update(dict(f.attrs))
                            for key in keys:
                                _copy_entry(f, out, key)
            except (OSError, KeyError, RuntimeError) as err:
                logger.warning("Dropping unreadable partial shard %s (%s).", tmp, err)
            if keys:
                logger.info("Recovered %d entries from an interrupted run (%s).", len(keys), tmp)
            tmp.unlink()

    def _shards(self) -> list[Path]:
        return sorted(self.parts.glob("*.h5")) if self.parts.is_dir() else []

    def discard_pending(self) -> None:
        """Drop every shard of an interrupted run (their entries are not wanted any more)."""
        self._close_shard()
        self._remove_parts()

    def sources(self) -> list[Path]:
        """Files holding complete entries now: the output (if any), then every closed shard."""
        return ([self.path] if self.path.exists() else []) + self._shards()

    def pending_keys(self) -> set[str]:
        """Complete entries waiting in shards from this or an interrupted run."""
        keys: set[str] = set()
        for shard in self._shards():
            try:
                with h5py.File(shard, "r", locking=False) as f:
                    keys.update(iter_entries(f, self.is_complete))
            except OSError as err:
                logger.warning("Ignoring unreadable shard %s (%s).", shard, err)
        return keys

    # ------------------------------------------------------------------ writing
    def _open_shard(self) -> h5py.File:
        if self._shard is None:
            self.parts.mkdir(parents=True, exist_ok=True)
            index = len(list(self.parts.glob("*")))
            while True:
                stem = f"{index:06d}-{os.getpid()}"
                if not (self.parts / f"{stem}.h5").exists():
                    break
                index += 1
            self._shard_path = self.parts / f"{stem}.tmp"
            # v1.8 format: root attributes over 64 KiB (e.g. a PCA basis) must fit
            self._shard = h5py.File(self._shard_path, "w", locking=False, libver=LIBVER)
            self._shard.attrs.update(self.root_attrs)  # what the entries were computed with
            self._shard_count = 0
            self._shard_start = time.monotonic()
        return self._shard

    def _close_shard(self) -> None:
        if self._shard is None:
            return
        # the root attributes travel with the entries: a run killed before the merge loses none
        self._shard.attrs.update(self.root_attrs)
        self._shard.close()
        assert self._shard_path is not None
        os.replace(self._shard_path, self._shard_path.with_suffix(".h5"))
        self._shard = None

    def _write_error(self, err: Exception) -> OutputWriteError:
        """HDF5 wraps the OS error in long messages (OSError or RuntimeError): keep the cause."""
        text = str(err)
        found = re.search(r"error message = '([^']+)'", text)
        code = re.search(r"errno = (\d+)", text)
        reason = found.group(1) if found else getattr(err, "strerror", None) or text[:120]
        reason += f", errno {code.group(1)}" if code else ""
        return OutputWriteError(
            f"Could not write {self.path} ({reason}). Finished entries are "
            f"kept in {self.parts}/; free some space (or fix the folder) and re-run the same "
            "command to continue.")

    def write(self, key: str, datasets: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """Write one entry: group ``key`` (may contain '/') holding ``datasets``."""
        try:
            self._write(key, datasets, attrs)
        except (OSError, RuntimeError) as err:
            raise self._write_error(err) from err

    def _write(self, key: str, datasets: dict[str, np.ndarray], attrs: dict | None) -> None:
        f = self._open_shard()
        if key in f:
            del f[key]
        group = f.create_group(key)
        for name, value in datasets.items():
            group.create_dataset(name, data=value)
        for name, value in (attrs or {}).items():
            group.attrs[name] = value
        f.flush()
        self._shard_count += 1
        if (self._shard_count >= self.shard_entries
                or time.monotonic() - self._shard_start > self.shard_seconds):
            self._close_shard()

    def finalize(self, drop_existing: bool = False) -> None:
        """Merge the output and all shards into a new file that atomically replaces the output.

        With ``drop_existing`` the old output's entries are discarded (a fresh file).
        """
        try:
            self._finalize(drop_existing)
        except (OSError, RuntimeError) as err:
            self.path.with_name(self.path.name + ".merging").unlink(missing_ok=True)
            raise self._write_error(err) from err

    def _finalize(self, drop_existing: bool) -> None:
        self._close_shard()
        shards = self._shards()
        if not shards and self.path.exists() and not drop_existing and not self._attrs_changed():
            self._remove_parts()
            self._lock.release()
            return
        tmp = self.path.with_name(self.path.name + ".merging")
        with h5py.File(tmp, "w", locking=False, libver=LIBVER) as out:
            from_shards: dict[str, Path] = {}
            for shard in shards:
                try:
                    with h5py.File(shard, "r", locking=False) as f:
                        for key in iter_entries(f, self.is_complete):
                            from_shards[key] = shard
                except OSError as err:
                    logger.warning("Ignoring unreadable shard %s (%s).", shard, err)
            if self.path.exists() and not drop_existing:
                with open_h5(self.path) as old:
                    out.attrs.update(dict(old.attrs))
                    for key in iter_entries(old, self.is_complete):
                        if key not in from_shards:
                            _copy_entry(old, out, key)
            by_shard: dict[Path, list[str]] = {}
            for key, shard in from_shards.items():
                by_shard.setdefault(shard, []).append(key)
            for shard in shards:
                with h5py.File(shard, "r", locking=False) as f:
                    out.attrs.update(dict(f.attrs))
                    for key in by_shard.get(shard, []):
                        _copy_entry(f, out, key)
            out.attrs.update(self.root_attrs)
        os.replace(tmp, self.path)
        self._remove_parts()
        self._lock.release()

    def _attrs_changed(self) -> bool:
        if not self.root_attrs:
            return False
        with open_h5(self.path) as f:
            return any(k not in f.attrs or _differs(f.attrs[k], v)
                       for k, v in self.root_attrs.items())

    def _remove_parts(self) -> None:
        if self.parts.is_dir():
            shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        """Close the open shard without merging (work stays in shards for the next run)."""
        try:
            self._close_shard()
        except (OSError, RuntimeError) as err:  # disk full: the open shard is salvaged next run
            logger.warning("Could not close shard %s (%s); earlier shards are kept.",
                           self._shard_path, err)
            self._shard = None
        finally:
            self._lock.release()


def _differs(a: object, b: object) -> bool:
    try:
        return bool(np.any(np.asarray(a) != np.asarray(b)))
    except (TypeError, ValueError):
        return True
