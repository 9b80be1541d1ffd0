"""In-place appends to an HDF5 file that a SIGKILL cannot tear: a redo journal of the
metadata that an append rewrites.

HDF5 has no journal of its own: an append rewrites a few metadata blocks in the existing part
of a file (superblock, the root group's B-tree and heap nodes) and writes everything new past
its end. ``AppendSession`` opens the file through h5py's ``fileobj`` driver on a
``JournaledFile``, which keeps every write below the committed length (``base``) in memory
(4 KiB pages, copy-on-write) and writes everything past it straight to the file. A commit:

1. ``H5Fflush`` (every dirty metadata block reaches the ``JournaledFile``), fsync the new tail;
2. write ``<file>.journal`` (new length, the changed pages, the shard files the append
   consumed; CRC-checked) to a temporary name, fsync, rename: this is the commit point;
3. write the pages in place, truncate to the new length, fsync, delete the consumed shards;
4. replace the journal by one naming the new length and no pages.

Before the first write a session writes a journal naming the current length and no pages.
``recover`` therefore has one rule for every crash point: write the journal's pages (if any),
truncate the file to the journal's length, delete what it consumed. Before the commit point
that gives back the old file (the bytes below ``base`` were never touched; the tail is cut);
after it, the new one. Cost of an append: the new bytes plus the changed pages (tens of KiB).

Step 3 is the one moment when the file on disk is neither the old nor the new one (a few
4 KiB ``pwrite`` calls). So it runs in a small helper process in a session of its own that
shares the output lock: a ``kill -9`` of the writer (or of its process group) during step 3
does not stop it, and readers that do not recover first (hloc, h5py) still find a whole file.
Only a crash of the machine (or a kill of that helper) can leave the file torn; the journal is
committed by then, and the next dift-sfm command that opens the file completes it.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path

import h5py

from ..errors import FormatError

logger = logging.getLogger("dift_sfm")

PAGE = 4096
_MAGIC = b"DIFTJNL1"
_HEAD = struct.Struct("<8sQII")  # magic, length, pages, consumed
_EXTENT = struct.Struct("<QI")  # offset, size


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_journal(path: Path, length: int, pages: dict[int, bytes],
                   consumed: Iterable[str] = ()) -> None:
    """Atomically replace ``path``'s journal (write, fsync, rename, fsync the folder)."""
    names = [n.encode() for n in consumed]
    parts = [_HEAD.pack(_MAGIC, length, len(pages), len(names))]
    for name in names:
        parts += [struct.pack("<H", len(name)), name]
    for offset in sorted(pages):
        parts += [_EXTENT.pack(offset, len(pages[offset])), pages[offset]]
    body = b"".join(parts)
    journal = journal_path(path)
    tmp = journal.with_name(journal.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(body + struct.pack("<I", zlib.crc32(body)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, journal)
    _fsync_dir(journal.parent)


def _read_journal(journal: Path) -> tuple[int, dict[int, bytes], list[str]]:
    data = journal.read_bytes()
    body, crc = data[:-4], data[-4:]
    if len(data) < _HEAD.size + 4 or struct.unpack("<I", crc)[0] != zlib.crc32(body):
        raise FormatError(f"Journal {journal} is damaged (checksum); the file beside it may be "
                          "inconsistent: restore it from a backup or recompute it.")
    magic, length, npages, nconsumed = _HEAD.unpack_from(body)
    if magic != _MAGIC:
        raise FormatError(f"{journal} is not a dift-sfm journal.")
    pos = _HEAD.size
    consumed = []
    for _ in range(nconsumed):
        (n,) = struct.unpack_from("<H", body, pos)
        consumed.append(body[pos + 2:pos + 2 + n].decode())
        pos += 2 + n
    pages = {}
    for _ in range(npages):
        offset, size = _EXTENT.unpack_from(body, pos)
        pos += _EXTENT.size
        pages[offset] = body[pos:pos + size]
        pos += size
    return length, pages, consumed


def _apply(fd: int, length: int, pages: dict[int, bytes]) -> None:
    for offset in sorted(pages):
        os.pwrite(fd, pages[offset], offset)
    if os.fstat(fd).st_size != length:
        os.ftruncate(fd, length)
    os.fsync(fd)


#: What the helper process runs: the journal's pages written in place, the length set, synced
#: (standard library only: it starts in a few milliseconds).
_APPLY = r"""
import os, struct, sys, zlib
path, journal = sys.argv[1], sys.argv[2]
data = open(journal, "rb").read()
body = data[:-4]
assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(body)
magic, length, npages, nconsumed = struct.unpack_from("<8sQII", body)
pos = 24
for _ in range(nconsumed):
    pos += 2 + struct.unpack_from("<H", body, pos)[0]
fd = os.open(path, os.O_RDWR)
for _ in range(npages):
    offset, size = struct.unpack_from("<QI", body, pos)
    os.pwrite(fd, body[pos + 12:pos + 12 + size], offset)
    pos += 12 + size
if os.fstat(fd).st_size != length:
    os.ftruncate(fd, length)
os.fsync(fd)
"""


def _apply_detached(path: Path, keep_fds: tuple[int, ...]) -> None:
    """Step 3 of a commit, in a helper process that a kill of this one does not stop."""
    try:
        # not subprocess.run: it kills the helper when an exception (Ctrl-C, SIGTERM) arrives
        # while it waits; the helper must finish whatever happens here
        helper = subprocess.Popen([sys.executable, "-S", "-c", _APPLY, str(path),
                                   str(journal_path(path))], start_new_session=True,
                                  pass_fds=keep_fds, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as err:  # no helper process on this system: apply it here
        logger.debug("Applying the journal in process (%s).", err)
        length, pages, _ = _read_journal(journal_path(path))
        fd = os.open(path, os.O_RDWR)
        try:
            _apply(fd, length, pages)
        finally:
            os.close(fd)
        return
    _, err = helper.communicate()
    if helper.returncode:
        raise OSError(f"Could not complete the append to {path}: "
                      f"{err.decode(errors='replace')[-300:]}")


def recover(path: Path | str) -> bool:
    """Finish or undo an append that a crash interrupted (the caller holds the output lock).

    Returns True when a journal was found (and applied)."""
    path = Path(path)
    journal = journal_path(path)
    journal.with_name(journal.name + ".tmp").unlink(missing_ok=True)  # never committed
    if not journal.exists():
        return False
    length, pages, consumed = _read_journal(journal)
    if path.exists():
        fd = os.open(path, os.O_RDWR)
        try:
            changed = bool(pages) or os.fstat(fd).st_size != length
            _apply(fd, length, pages)
        finally:
            os.close(fd)
        if changed:
            logger.warning("Completed an interrupted append to %s from its journal "
                           "(%d bytes, %d pages).", path, length, len(pages))
    for name in consumed:
        (path.parent / name).unlink(missing_ok=True)
    journal.unlink()
    _fsync_dir(path.parent)
    return True


class JournaledFile(io.RawIOBase):
    """A file for h5py's ``fileobj`` driver: writes below ``base`` stay in memory until
    ``commit``; writes past it go to the file at once (module docstring)."""

    def __init__(self, path: Path, keep_fds: tuple[int, ...] = ()):
        self.path = path
        self.keep_fds = keep_fds  # the output lock: the helper that applies pages holds it too
        self.fd = os.open(path, os.O_RDWR)
        self.base = self.size = os.fstat(self.fd).st_size
        self.pages: dict[int, bytearray] = {}
        self.pos = 0

    # ---------------------------------------------------------------- io.RawIOBase
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (offset if whence == 0 else self.pos + offset if whence == 1
                    else self.size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            page = bytearray(os.pread(self.fd, PAGE, index * PAGE).ljust(PAGE, b"\0"))
            self.pages[index] = page
        return page

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        start = off = self.pos
        end = off + len(view)  # past the end: zeros, as HDF5's own drivers read
        while off < end:
            index = off // PAGE
            if off < self.base and index in self.pages:
                k = min(PAGE - off % PAGE, end - off, self.base - off)
                view[off - start:off - start + k] = self.pages[index][off % PAGE:off % PAGE + k]
            else:
                stop = end  # read from the file up to the next page held in memory
                if self.pages and off < self.base:
                    nxt = (index + 1) * PAGE
                    while nxt < min(end, self.base) and nxt // PAGE not in self.pages:
                        nxt += PAGE
                    if nxt < min(end, self.base):
                        stop = nxt
                k = stop - off
                data = os.pread(self.fd, k, off)
                view[off - start:off - start + len(data)] = data
                if len(data) < k:  # allocated but never written: zeros
                    view[off - start + len(data):off - start + k] = bytes(k - len(data))
            off += k
        self.pos = off
        return off - start

    def write(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        off, done, n = self.pos, 0, len(view)
        while done < n:
            if off < self.base:
                o = off % PAGE
                k = min(PAGE - o, n - done, self.base - off)
                self._page(off // PAGE)[o:o + k] = view[done:done + k]
            else:
                k = os.pwrite(self.fd, view[done:], off)
            done += k
            off += k
        self.pos = off
        self.size = max(self.size, off)
        return n

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        if self.size >= self.base:
            os.ftruncate(self.fd, self.size)
        return self.size

    def flush(self) -> None:
        pass

    # ---------------------------------------------------------------- journal
    def changed_pages(self) -> dict[int, bytes]:
        """The pages written below ``base``, clipped to it, by file offset."""
        out = {}
        for index, page in self.pages.items():
            offset = index * PAGE
            out[offset] = bytes(page[:min(PAGE, self.base - offset)])
        return out

    def commit(self, consumed: Iterable[str] = ()) -> None:
        """Make everything written so far the file's committed content (module docstring)."""
        os.fsync(self.fd)
        pages = self.changed_pages()
        _write_journal(self.path, self.size, pages, consumed)  # the commit point
        if pages:
            _apply_detached(self.path, self.keep_fds)
        else:
            _apply(self.fd, self.size, pages)
        for name in consumed:
            (self.path.parent / name).unlink(missing_ok=True)
        _write_journal(self.path, self.size, {})
        self.pages.clear()
        self.base = self.size

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:  # h5py may close its file object: keep the descriptor
        pass


class AppendSession:
    """An existing h5 file opened for appending: ``file`` is the h5py File; ``commit`` makes
    what was written so far durable; ``close`` commits and ends the session; ``abort`` rolls
    back to the last commit. The caller holds the output lock."""

    def __init__(self, path: Path | str, libver: tuple[str, str],
                 keep_fds: tuple[int, ...] = ()):
        self.path = Path(path)
        recover(self.path)
        self.raw = JournaledFile(self.path, keep_fds)
        _write_journal(self.path, self.raw.base, {})  # undo record: cut back to this length
        try:
            self.file = h5py.File(self.raw, "r+", libver=libver, locking=False)
        except BaseException:
            self.abort()
            raise

    def commit(self, consumed: Iterable[str] = ()) -> None:
        self.file.flush()
        self.raw.commit(consumed)

    def close(self, consumed: Iterable[str] = ()) -> None:
        """Close the h5 file, commit everything, remove the journal."""
        self.file.close()
        self.raw.commit(consumed)
        self.raw.release()
        journal_path(self.path).unlink()
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop everything since the last commit (the file goes back to it)."""
        try:
            if getattr(self, "file", None) is not None and self.file.id.valid:
                self.file.close()
        except (OSError, RuntimeError, ValueError):
            pass
        finally:
            self.raw.pages.clear()
            self.raw.release()
            recover(self.path)
