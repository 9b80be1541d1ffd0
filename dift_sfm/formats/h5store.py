"""Crash-safe writing of hloc-style h5 files.

HDF5 files are not crash-safe: a process killed in the middle of a write can leave a file that
no reader opens. So entries are first written to small shard files under ``<output>.parts/``
(written as ``*.tmp``, renamed ``*.h5`` when closed: at the latest ``flush_seconds`` after their
first entry, whether or not another entry follows). ``finalize`` then appends the shards'
entries to the existing output in place, through the redo journal of ``journal.py`` (cost: what
is added, never a copy of what is there), or, for a new output, renames or merges the shards
into it. A crash at any moment leaves the old output or the new one; the next run completes or
undoes an interrupted append from the journal and salvages every complete entry of the shards.
Workers of a distributed run can hand over whole shards (``build_piece`` / ``add_piece``).

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
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5o, h5p, h5s, h5t

from ..errors import DiftSfmError, FormatError
from .journal import AppendSession, journal_path, recover

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
    if journal_path(path).exists():
        _recover_unlocked(path)
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as err:
        raise FormatError(f"Could not open h5 file {path} ({err}). If a run was killed while "
                          "writing it with another tool, delete it and re-run.") from err


def decode_attr(value: object) -> object:
    """An h5 attribute as Python reads it: bytes decoded to str, everything else as stored."""
    return value.decode() if isinstance(value, bytes) else value


class H5Reader:
    """An h5 file kept open for reading (a context manager); ``attrs`` are its root
    attributes, decoded. ``FeaturesReader`` and ``MatchesReader`` add the layouts."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.file = open_h5(self.path)
        self.attrs = {k: decode_attr(v) for k, v in self.file.attrs.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()


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


def _recover_unlocked(path: Path) -> None:
    """Complete an append a crash interrupted, unless a writer holds the output (it recovers
    itself; until its commit the file holds its old content)."""
    try:
        lock = OutputLock(path)
    except (OutputLockedError, DiftSfmError):
        return
    try:
        recover(path)
    finally:
        lock.release()


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
        shard_entries: a shard is closed (renamed ``*.h5``, safe from then on) after this many
            entries.
        flush_seconds: a shard is closed at the latest this long after its first entry, by a
            background thread when no other entry follows (0: after every entry).
        consolidate_seconds: pieces (``add_piece``) are added to the output at most this long
            after the last time (0: at every piece; None: only by ``finalize``), so that a long
            distributed run merges as it goes rather than all at the end. Not when the run
            replaces the output (``discard_pending``).

    What a ``kill -9`` can lose: the entries of the open shard, i.e. at most ``flush_seconds``
    of work (an entry being written when the kill comes is never half kept). Closed shards and
    the output are never lost. ``finalize`` costs what was added (see the module docstring).
    """

    def __init__(self, path: Path | str, is_complete: Validator,
                 root_attrs: dict | None = None, shard_entries: int = 16,
                 flush_seconds: float = 1.0, consolidate_seconds: float | None = 30.0):
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.is_complete = is_complete
        self.root_attrs = dict(root_attrs or {})
        self.shard_entries = shard_entries
        self.flush_seconds = flush_seconds
        self.consolidate_seconds = consolidate_seconds
        self._consolidated = time.monotonic()
        self._shard: h5py.File | None = None
        self._shard_path: Path | None = None
        self._shard_count = 0
        self._shard_start = 0.0
        self._shard_keys: set[str] = set()
        self._shard_clean = True
        #: shards closed by this writer in which every write succeeded: their keys and the
        #: root attributes they hold (no need to validate them again when merging)
        self._closed: dict[Path, tuple[list[str], dict]] = {}
        self._fresh = False  # this run replaces the output (``discard_pending``)
        self._next_index: int | None = None
        self._entry_writer = _EntryWriter()
        #: one entry at a time: the thread that closes idle shards never splits an entry
        self._mutex = threading.RLock()
        self._closer: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = OutputLock(self.path)
        try:
            recover(self.path)  # an append a crash interrupted: finish or undo it
            self._salvage()
        except BaseException:
            self._lock.release()
            raise

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
        """Drop every shard of an interrupted run (their entries are not wanted any more): this
        run replaces the output (``finalize(drop_existing=True)``)."""
        with self._mutex:
            self._close_shard()
            self._remove_parts()
            self._fresh = True

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
    def _new_stem(self) -> str:
        """A new shard name: shards sort in the order they were started."""
        self.parts.mkdir(parents=True, exist_ok=True)
        if self._next_index is None:
            self._next_index = len(list(self.parts.glob("*")))
        while True:
            stem = f"{self._next_index:06d}-{os.getpid()}"
            self._next_index += 1
            if not (self.parts / f"{stem}.h5").exists():
                return stem

    def add_piece(self, image: bytes, keys: Iterable[str] | None = None) -> None:
        """Add a closed shard built elsewhere (``build_piece``, e.g. by a distributed worker):
        it is written to disk as it is, with no HDF5 work per entry here; ``finalize`` or
        ``consolidate`` adds its entries to the output. ``keys``: the complete entries it
        holds, as ``build_piece`` wrote them (else they are found and validated when added;
        after a crash they always are). The piece must carry the writer's ``root_attrs``
        (``build_piece(entries, root_attrs)``): a later run judges it by them.

        Shards are merged in the order they were closed, a later entry replacing an earlier
        one of the same key: the open shard is closed first, so that order is the order of the
        ``write`` and ``add_piece`` calls."""
        if not image.startswith(b"\x89HDF"):
            raise FormatError("add_piece expects the bytes of an HDF5 file (build_piece).")
        try:
            with self._mutex:
                self._close_shard()
                tmp = self.parts / f"{self._new_stem()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(image)
                os.replace(tmp, tmp.with_suffix(".h5"))
                if keys is not None:
                    self._closed[tmp.with_suffix(".h5")] = (sorted(keys), dict(self.root_attrs))
        except OSError as err:
            raise self._write_error(err) from err
        if self.consolidate_seconds is not None and \
                time.monotonic() - self._consolidated >= self.consolidate_seconds:
            self.consolidate()

    def _open_shard(self) -> h5py.File:
        if self._shard is None:
            self._shard_path = self.parts / f"{self._new_stem()}.tmp"
            # v1.8 format: root attributes over 64 KiB (e.g. a PCA basis) must fit
            self._shard = h5py.File(self._shard_path, "w", locking=False, libver=LIBVER)
            self._shard.attrs.update(self.root_attrs)  # what the entries were computed with
            self._shard_count = 0
            self._shard_keys = set()
            self._shard_clean = True
            self._entry_writer.parents.clear()
            self._shard_start = time.monotonic()
            self._start_closer()
        return self._shard

    def _start_closer(self) -> None:
        if self._closer is None and self.flush_seconds > 0:
            self._stop.clear()
            self._closer = threading.Thread(target=self._close_idle, daemon=True,
                                            name="dift-sfm shard closer")
            self._closer.start()

    def _stop_closer(self) -> None:
        if self._closer is not None:
            self._stop.set()
            if self._closer is not threading.current_thread():
                self._closer.join()
            self._closer = None

    def _close_idle(self) -> None:
        """Close the open shard once its first entry is ``flush_seconds`` old: a finished entry
        is on disk, readable, within about that time whether or not another entry follows."""
        tick = min(0.1, self.flush_seconds / 4)
        while not self._stop.wait(tick):
            with self._mutex:
                if (self._shard is not None and self._shard_count
                        and time.monotonic() - self._shard_start >= self.flush_seconds):
                    try:
                        self._close_shard()
                    except Exception as err:  # disk full: the next write says it
                        logger.warning("Could not close shard %s (%s).", self._shard_path, err)
                        return

    def _close_shard(self) -> None:
        if self._shard is None:
            return
        # the root attributes travel with the entries: a run killed before the merge loses none
        self._shard.attrs.update(self.root_attrs)
        self._shard.close()
        assert self._shard_path is not None
        closed = self._shard_path.with_suffix(".h5")
        os.replace(self._shard_path, closed)
        if self._shard_clean:
            self._closed[closed] = (sorted(self._shard_keys), dict(self.root_attrs))
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
            with self._mutex:
                self._write(key, datasets, attrs)
        except (OSError, RuntimeError) as err:
            self._shard_clean = False  # the entry may be half written: validate when merging
            raise self._write_error(err) from err

    def _write(self, key: str, datasets: dict[str, np.ndarray], attrs: dict | None) -> None:
        f = self._open_shard()
        if key in self._shard_keys:
            del f[key]
        try:
            group = self._entry_writer.create_group(f, key)
        except ValueError:  # the name exists as the parent of other entries: replace it
            del f[key]
            self._entry_writer.parents.clear()
            group = self._entry_writer.create_group(f, key)
        self._entry_writer.write(group, datasets, attrs or {})
        self._shard_keys.add(key)
        self._shard_count += 1
        if (self._shard_count >= self.shard_entries
                or time.monotonic() - self._shard_start >= self.flush_seconds):
            self._close_shard()

    def finalize(self, drop_existing: bool = False) -> None:
        """Add every shard's entries to the output and release it.

        An existing output is extended in place (``_append``: cost of what is added); a new
        one is the single shard renamed, or the shards merged. With ``drop_existing`` the old
        output's entries are discarded: the shards are merged into a new file that atomically
        replaces it.
        """
        try:
            self._finalize(drop_existing)
        except (OSError, RuntimeError) as err:
            self.path.with_name(self.path.name + ".merging").unlink(missing_ok=True)
            raise self._write_error(err) from err

    def consolidate(self) -> None:
        """Add the closed shards' entries to the output now, keeping the writer open (e.g. a
        distributed run's driver between pieces). Only for a run that extends (or creates) the
        output, not after ``discard_pending``: a replaced output is written whole by
        ``finalize``, which drops whatever the output held."""
        if self._fresh:
            return
        try:
            with self._mutex:
                self._close_shard()
                if self._shards():
                    self._consolidate(drop_existing=False)
        except (OSError, RuntimeError) as err:
            raise self._write_error(err) from err
        finally:
            self._consolidated = time.monotonic()

    def _finalize(self, drop_existing: bool) -> None:
        self._stop_closer()
        self._close_shard()
        self._consolidate(drop_existing)
        self._remove_parts()
        self._lock.release()

    def _consolidate(self, drop_existing: bool) -> None:
        self._close_shard()
        shards = self._shards()
        keep_old = self.path.exists() and not drop_existing
        if not shards and keep_old and not self._attrs_changed():
            return
        own = {s: keys for s, (keys, attrs) in self._closed.items()
               if s in shards and not _attrs_differ(attrs, self.root_attrs)}
        if len(shards) == 1 and shards[0] in own and not keep_old:
            # the shard is exactly what a merge would write: it becomes the output
            os.replace(shards[0], self.path)
            self._closed.pop(shards[0], None)
            return
        from_shards: dict[str, Path] = {}
        for shard in shards:
            if shard in own:  # written here, every write succeeded: no need to validate
                from_shards.update(dict.fromkeys(own[shard], shard))
                continue
            try:
                with h5py.File(shard, "r", locking=False) as f:
                    for key in iter_entries(f, self.is_complete):
                        from_shards[key] = shard
            except OSError as err:
                logger.warning("Ignoring unreadable shard %s (%s).", shard, err)
        by_shard: dict[Path, list[str]] = {}
        for key, shard in from_shards.items():
            by_shard.setdefault(shard, []).append(key)
        if keep_old and not self._mostly_replaced(from_shards):
            self._append(shards, by_shard)
        else:
            self._rewrite(shards, by_shard, own, keep_old)
        for shard in shards:
            self._closed.pop(shard, None)

    def _mostly_replaced(self, keys: Iterable[str]) -> bool:
        """Whether the new entries replace over half of the output's (counted at its root):
        then a rewrite costs at most twice the work added and reclaims the replaced space
        (an in-place replacement leaves the old datasets' bytes unused in the file)."""
        with open_h5(self.path) as f:
            replaced = sum(1 for key in keys if key in f)
            return replaced > 0 and 2 * replaced > len(f)

    def _append(self, shards: list[Path], by_shard: dict[Path, list[str]]) -> None:
        """Copy the shards' entries into the output in place, under the redo journal."""
        lock_fd = self._lock._fd
        session = AppendSession(self.path, LIBVER, () if lock_fd is None else (lock_fd,))
        try:
            out = session.file
            copier = _EntryCopier(set(), in_place=True)
            for shard in shards:
                with h5py.File(shard, "r", locking=False) as f:
                    _update_attrs(out, dict(f.attrs))
                    copier.copy(f, out, by_shard.get(shard, []))
            _update_attrs(out, self.root_attrs)
            session.close(consumed=[f"{self.parts.name}/{s.name}" for s in shards])
        except BaseException:
            session.abort()  # back to the last commit: the old output, shards kept
            raise

    def _rewrite(self, shards: list[Path], by_shard: dict[Path, list[str]],
                 own: dict[Path, list[str]], keep_old: bool) -> None:
        """Merge (the old output and) the shards into a new file that replaces the output."""
        tmp = self.path.with_name(self.path.name + ".merging")
        from_shards = {k for keys in by_shard.values() for k in keys}
        # the merge starts from a byte copy of this run's biggest shard (when no old output
        # is kept): its entries need no copying one by one
        base = None if keep_old or not own else max(own, key=lambda s: len(own[s]))
        if base is not None:
            shutil.copyfile(base, tmp)
        copier = _EntryCopier(set(own[base]) if base is not None else set())
        with h5py.File(tmp, "r+" if base is not None else "w", locking=False,
                       libver=LIBVER) as out:
            if keep_old:
                with open_h5(self.path) as old:
                    out.attrs.update(dict(old.attrs))
                    copier.copy(old, out, [k for k in iter_entries(old, self.is_complete)
                                           if k not in from_shards])
            for shard in shards:
                with h5py.File(shard, "r", locking=False) as f:
                    out.attrs.update(dict(f.attrs))
                    if shard != base:
                        copier.copy(f, out, by_shard.get(shard, []))
            out.attrs.update(self.root_attrs)
        os.replace(tmp, self.path)
        for shard in shards:
            shard.unlink(missing_ok=True)

    def _attrs_changed(self) -> bool:
        if not self.root_attrs:
            return False
        with open_h5(self.path) as f:
            return any(k not in f.attrs or _differs(f.attrs[k], v)
                       for k, v in self.root_attrs.items())

    def _remove_parts(self) -> None:
        self._closed.clear()
        if self.parts.is_dir():
            shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        """Close the open shard without merging (work stays in shards for the next run)."""
        try:
            self._stop_closer()
            self._close_shard()
        except (OSError, RuntimeError) as err:  # disk full: the open shard is salvaged next run
            logger.warning("Could not close shard %s (%s); earlier shards are kept.",
                           self._shard_path, err)
            self._shard = None
        finally:
            self._lock.release()


def build_piece(entries: Iterable[tuple[str, dict[str, np.ndarray], dict | None]],
                root_attrs: dict | None = None) -> bytes:
    """The bytes of a closed shard holding ``entries`` ((key, datasets, attrs) as for
    ``ShardedH5Writer.write``), built in memory (HDF5's core driver, nothing on disk): what a
    worker hands over to its driver's ``ShardedH5Writer.add_piece``."""
    writer = _EntryWriter()
    name = f"dift-sfm-piece-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False, libver=LIBVER) as f:
        f.attrs.update(dict(root_attrs or {}))
        for key, datasets, attrs in entries:
            if key in f:
                del f[key]
                writer.parents.clear()
            writer.write(writer.create_group(f, key), datasets, attrs or {})
        f.flush()
        return f.id.get_file_image()


def _update_attrs(f: h5py.File, attrs: dict) -> None:
    """Set the attributes that are new or differ (an unchanged one is not rewritten)."""
    for key, value in attrs.items():
        if key not in f.attrs or _differs(f.attrs[key], value):
            f.attrs[key] = value


def _attrs_differ(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)


class _EntryCopier:
    """Copies entries between open files as ``_copy_entry`` does, with one HDF5 copy call per
    entry: ``present`` are the entries the destination holds already."""

    def __init__(self, present: set[str], in_place: bool = False):
        self.present = present
        self.in_place = in_place  # the destination may hold any key already: look it up
        self.parents: set[str] = set()
        self.lcpl = h5p.create(h5p.LINK_CREATE)  # what h5py's Group.copy passes
        self.lcpl.set_create_intermediate_group(True)

    def copy(self, src: h5py.File, dst: h5py.File, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self.present or (self.in_place and key in dst):
                del dst[key]
            parent = key.rpartition("/")[0]
            if parent and parent not in self.parents:
                dst.require_group(parent)
                self.parents.add(parent)
            name = _encode(key)
            try:
                h5o.copy(src.id, name, dst.id, name, None, self.lcpl)
            except ValueError:  # the name exists as the parent of other entries
                _copy_entry(src, dst, key)
            self.present.add(key)


def _encode(name: str) -> bytes:
    """A name as h5py encodes it (ASCII where it can)."""
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("utf8")


class _EntryWriter:
    """Creates entry groups as the merge links them, and writes an entry's datasets and
    attributes as h5py's ``create_dataset(name, data=...)``
    and ``attrs[name] = ...`` do (same types, dataspaces and property lists: identical files),
    with one low-level call each and the types and property lists built once. Anything but
    numeric arrays and ``str`` attributes goes through h5py's own calls."""

    def __init__(self):
        track_order = h5py.get_config().track_order
        self.gcpl = h5p.create(h5p.GROUP_CREATE)  # as h5py's create_group
        self.gcpl.set_obj_track_times(False)
        if track_order:
            flags = h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED
            self.gcpl.set_link_creation_order(flags)
            self.gcpl.set_attr_creation_order(flags)
        self.lcpl = h5p.create(h5p.LINK_CREATE)  # as h5py's Group.copy (the merge)
        self.lcpl.set_create_intermediate_group(True)
        self.parents: dict[str, h5py.Group] = {}
        self.dcpl = h5p.create(h5p.DATASET_CREATE)
        self.dcpl.set_obj_track_times(False)  # h5py's defaults
        self.dcpl.set_attr_creation_order(
            h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED if track_order else 0)
        self.types: dict[np.dtype, h5t.TypeID] = {}
        self.str_dtype = h5py.string_dtype()
        self.str_type = h5t.py_create(self.str_dtype, logical=True)
        self.str_mtype = h5t.py_create(self.str_dtype)

    def create_group(self, f: h5py.File, key: str) -> h5py.Group:
        """Group ``key``, linked as the merge's copy links it (parents by ``require_group``),
        so that a shard holds exactly what the merged output would."""
        parent, _, leaf = key.rpartition("/")
        where = f
        if parent:
            where = self.parents.get(parent) or self.parents.setdefault(
                parent, f.require_group(parent))
        return h5py.Group(h5g.create(where.id, _encode(leaf), lcpl=self.lcpl, gcpl=self.gcpl))

    def write(self, group: h5py.Group, datasets: dict[str, np.ndarray], attrs: dict) -> None:
        gid = group.id
        for name, value in datasets.items():
            if not (isinstance(value, np.ndarray) and value.dtype.kind in "iuf"
                    and value.dtype.isnative and value.ndim > 0):
                group.create_dataset(name, data=value)
                continue
            data = np.ascontiguousarray(value)
            tid = self.types.get(data.dtype)
            if tid is None:
                tid = self.types[data.dtype] = h5t.py_create(data.dtype, logical=1)
            dset = h5d.create(gid, _encode(name), tid, h5s.create_simple(data.shape),
                              dcpl=self.dcpl)
            dset.write(h5s.ALL, h5s.ALL, data)
        for name, value in attrs.items():
            if type(value) is not str:
                group.attrs[name] = value
                continue
            attr = h5a.create(gid, _encode(name), self.str_type, h5s.create_simple(()))
            attr.write(np.array(value, dtype=self.str_dtype), mtype=self.str_mtype)


def _differs(a: object, b: object) -> bool:
    try:
        return bool(np.any(np.asarray(a) != np.asarray(b)))
    except (TypeError, ValueError):
        return True
