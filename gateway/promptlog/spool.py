"""The prompt log's disk spool (``promptlog.spool: disk``): where records wait while the
database is down, so that neither a long outage nor a crash loses them.

Records (already redacted) are appended to a file of the spool folder, one JSON object a
line, each append one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``: a
process killed after an append loses nothing of it (the kernel holds it), and a machine
that loses power loses nothing that was acknowledged. The file being appended to is held
under an exclusive ``flock``; a file nobody holds is a backlog: sealed by this process,
or left by one that died. :meth:`Spool.backlog` lists those (locking each), and the
writer replays them into the database, then :meth:`Spool.remove` s them. Replay is
idempotent: every record carries its ``record_key``, and the store keeps one row per key.

The methods do blocking file I/O: call them in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import uuid
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from retort.db.record import LogRecord

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

__all__ = ["Spool", "SpoolFullError", "SpoolReader", "replay"]

log = logging.getLogger("retort.promptlog")

_SUFFIX = ".jsonl"
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(LogRecord)


class SpoolFullError(OSError):
    """Appending would pass ``spool_max_bytes``."""


class SpoolReader:
    """One backlog file, read in batches from where the last read stopped. Holds the
    file's lock until :meth:`close` (or :meth:`Spool.remove`)."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path = path
        self._handle = handle
        self.corrupt = 0
        """Lines that did not decode (a write cut by a crash); skipped."""

    def read(self, n: int) -> list[LogRecord]:
        """Up to ``n`` records; ``[]`` at the end of the file."""
        out: list[LogRecord] = []
        while len(out) < n:
            line = self._handle.readline()
            if not line:
                break
            if not line.endswith(b"\n"):  # a write cut by a crash: the file's last line
                self.corrupt += 1
                break
            try:
                out.append(_DECODER.decode(line))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.corrupt += 1
        return out

    def position(self) -> int:
        return self._handle.tell()

    def rewind(self, position: int) -> None:
        """Read from ``position`` again (a batch the database did not take)."""
        self._handle.seek(position)

    def close(self) -> None:
        self._handle.close()


class Spool:
    """Append-only spool files under ``root`` (bounded by ``max_bytes`` in all)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("promptlog.spool_max_bytes must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self._active: Path | None = None
        self._fd: int | None = None
        self._readers: dict[Path, SpoolReader] = {}

    # -- appending ------------------------------------------------------------------------

    def append(self, records: list[LogRecord]) -> int:
        """Append ``records`` (one write, then fsync); returns the bytes written.
        :class:`SpoolFullError` past ``max_bytes``; ``OSError`` when the disk refuses."""
        data = b"".join(_ENCODER.encode(r) + b"\n" for r in records)
        if self.size() + len(data) > self.max_bytes:
            raise SpoolFullError(f"spool {self.root} would pass {self.max_bytes} bytes")
        fd = self._open_active()
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            # A partial write leaves a cut line, which replay skips; start a new file.
            self.seal()
            raise
        return written

    def _open_active(self) -> int:
        if self._fd is not None:
            return self._fd
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{uuid.uuid4().hex}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._active, self._fd = path, fd
        return fd

    def seal(self) -> None:
        """Close the file being appended to: it joins the backlog, new appends start a
        new file."""
        if self._fd is not None:
            fd, self._fd, self._active = self._fd, None, None
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def appending(self) -> bool:
        return self._fd is not None

    # -- the backlog --------------------------------------------------------------------

    def size(self) -> int:
        """Bytes in every spool file (this process's and others')."""
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.name.endswith(_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def backlog(self) -> list[SpoolReader]:
        """Readers of the files to replay, oldest first: every spool file but the one being
        appended to and those another live process holds."""
        try:
            entries = [e for e in os.scandir(self.root) if e.name.endswith(_SUFFIX)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("prompt log: cannot read the spool folder %s: %s", self.root, exc)
            return []
        entries.sort(key=lambda e: (e.stat().st_mtime, e.name))
        out = []
        for entry in entries:
            path = self.root / entry.name
            if path == self._active:
                continue
            reader = self._readers.get(path)
            if reader is None:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()  # another live process appends to (or replays) it
                    continue
                reader = self._readers[path] = SpoolReader(path, handle)
            out.append(reader)
        return out

    def remove(self, reader: SpoolReader) -> None:
        """Delete a replayed file (and release its lock)."""
        self._readers.pop(reader.path, None)
        with contextlib.suppress(FileNotFoundError):
            reader.path.unlink()
        reader.close()

    def close(self) -> None:
        """Seal the active file and release every lock (files stay for the next start)."""
        self.seal()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


async def replay(
    spool: Spool,
    insert: Callable[[list[LogRecord], int], Awaitable[bool]],
    batch_size: int,
) -> bool:
    """Hand the backlog to ``insert`` in chunks, oldest file first, deleting each file once
    all of it is in; the file being appended to is sealed and replayed last. ``insert(chunk,
    corrupt)`` (``corrupt``: unreadable lines the file ended with, reported once with an
    empty chunk) returns ``False`` when the database is down: the chunk is read again at
    the next call, and ``replay`` returns ``False``."""
    while True:
        readers = await asyncio.to_thread(spool.backlog)
        if not readers:
            if spool.appending:  # the database may be back: replay the open file too
                await asyncio.to_thread(spool.seal)
                continue
            return True
        for reader in readers:
            while True:
                position = reader.position()
                chunk = await asyncio.to_thread(reader.read, batch_size)
                if not chunk:
                    break
                if not await insert(chunk, 0):
                    reader.rewind(position)
                    return False
            if reader.corrupt:
                log.error("prompt log: %d unreadable lines in the spool file %s",
                          reader.corrupt, reader.path)  # fmt: skip
                await insert([], reader.corrupt)
            log.info("prompt log: replayed the spool file %s", reader.path.name)
            await asyncio.to_thread(spool.remove, reader)
        if not spool.appending:
            return True
