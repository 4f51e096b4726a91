"""Receiving C-STORE datasets to disk instead of memory.

pynetdicom gathers a received dataset in memory by default: one growing buffer per association, copied once
more when the handler asks for the encoded bytes. A listener taking several large radiographs at once then
holds each of them two to three times over, and an instance far over ``FRACTURE_MAX_UPLOAD_MB`` is held whole
before it can be refused. With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom instead writes the dataset's fragments
to a temporary file as they arrive (with File Meta Information built from the C-STORE request and the accepted
transfer syntax: the same bytes as the in-memory path) and deletes the file once the handler has answered.

Two things pynetdicom leaves to us, done here:

* **Where.** Its temporary files are made by ``tempfile.NamedTemporaryFile`` in the system temporary folder,
  which may be a small RAM-backed ``tmpfs``. :func:`receive_to_disk` puts them in a folder of ours
  (``<storage dir>/.incoming/<host>-<pid>``, on the store's own file system) instead.
* **A full disk.** pynetdicom writes in its network thread: a write that fails there (``ENOSPC``) breaks the
  association without a C-STORE response. :class:`IncomingFile` keeps the error and drops the rest of the
  dataset instead, so the transfer completes and the handler answers with a status (0xA700, storage full),
  as it does when the store itself is full.

A transfer cut off mid-way leaves its file behind in pynetdicom: :func:`discard_partial` removes it when the
connection closes, and :func:`sweep` removes what a killed listener left, when the next one starts.

The web server spools HTTP uploads to the same folders (:func:`incoming_folder`, ``service.ingest.spool_upload``),
so one sweep covers both; Werkzeug's files for large multipart parts go there too, unnamed
(``service.ingest.UploadPart``), so they leave nothing to sweep. pynetdicom is imported only by
:func:`receive_to_disk`: the web process never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

#: The folder, under the storage folder, that the listener receives to.
FOLDER = ".incoming"
PREFIX = "incoming-"
BUFFER = 1 << 20
_lock = threading.Lock()
_open: dict[str, IncomingFile] = {}
_folder: Path | None = None


class IncomingFile:
    """The file pynetdicom writes one received dataset to (it calls ``write``, ``file.flush``, ``close`` and
    reads ``name``). A failing write is recorded, not raised, and what follows is dropped. Writes are buffered
    (1 MiB): pynetdicom's flush after every fragment is ignored, and :func:`finish` flushes once the whole
    dataset is in."""

    def __init__(self, folder: Path) -> None:
        self.error: OSError | None = None
        self._handle: BinaryIO | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, self.name = tempfile.mkstemp(dir=folder, prefix=PREFIX, suffix=".dcm")
            self._handle = os.fdopen(fd, "wb", buffering=BUFFER)
        except OSError as exc:  # no file at all: the dataset is dropped as it arrives, and the handler told why
            self.name = str(folder / f"{PREFIX}unwritable-{uuid.uuid4().hex}.dcm")
            self._failed(exc)
        with _lock:
            _open[self.name] = self

    @property
    def file(self) -> IncomingFile:
        return self

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
            log.error("cannot write a received instance to %s: %s", self.name, exc.strerror or exc)

    def write(self, data: bytes) -> int:
        if self.error is None and self._handle is not None:
            try:
                self._handle.write(data)
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        """pynetdicom's flush after each fragment: nothing (see the class docstring)."""

    def finish(self) -> OSError | None:
        """Flush what is buffered; the error that kept the dataset from being written whole, if any."""
        if self.error is None and self._handle is not None:
            try:
                self._handle.flush()
            except OSError as exc:
                self._failed(exc)
        return self.error

    def close(self) -> None:
        with _lock:
            _open.pop(self.name, None)
        if self._handle is None:
            return
        with contextlib.suppress(OSError):  # whatever failed here was reported by finish(), or nobody reads it
            self._handle.close()


def _incoming_file(*_args: Any, **_kwargs: Any) -> IncomingFile:
    """Stands in for ``tempfile.NamedTemporaryFile`` in pynetdicom's DIMSE message decoder."""
    return IncomingFile(_folder or Path(tempfile.gettempdir()))


def incoming_folder(base: Path) -> Path:
    """This process's folder under ``base`` (``<host>-<pid>``: what :func:`sweep` removes once the process is
    gone). Not created here."""
    return base / f"{socket.gethostname()}-{os.getpid()}"


def receive_to_disk(base: Path | None = None) -> Path | None:
    """From now on this process's Storage SCPs receive each dataset to a file in a folder of this process's own
    under ``base`` (``<host>-<pid>``; default: the system temporary folder itself, as read when each file is
    made), which it returns. Process-wide: pynetdicom's setting is global, so every SCP here then reads
    ``event.dataset_path`` (``event.dataset`` works too; ``event.encoded_dataset()`` does not)."""
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom import dimse_messages

    global _folder
    _folder = None if base is None else incoming_folder(base)
    if _folder is not None:
        _folder.mkdir(parents=True, exist_ok=True)
    dimse_messages.NamedTemporaryFile = _incoming_file  # type: ignore[assignment]
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    return _folder


def finish(path: Path) -> OSError | None:
    """For the C-STORE handler, once the dataset received to ``path`` is complete: its buffered tail written to
    the file, and the error that kept it from being written whole, if one did (None: the file is whole)."""
    with _lock:
        incoming = _open.get(str(path))
    return incoming.finish() if incoming is not None else None


def discard_partial(message: Any) -> bool:
    """Close and remove the file of a DIMSE message whose dataset was still being received; True if there was
    one."""
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return False
    with contextlib.suppress(OSError):
        handle.close()
    with contextlib.suppress(OSError):
        os.unlink(handle.name)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep(base: Path, older_than: float = 600.0) -> int:
    """Remove what listeners (and web servers, which spool uploads here) killed mid-transfer left under
    ``base``: every file of a process on this host that is no longer running (and its folder), and elsewhere (a
    process on another host sharing the store, or one that took a dead one's pid) only files not written to for
    ``older_than`` seconds (a transfer in progress writes at least once per network timeout; an upload is
    spooled and stored within a request). Returns how many files were removed."""
    removed = 0
    cutoff = time.time() - older_than
    host = socket.gethostname()
    for folder in [base, *(p for p in base.glob("*-*") if p.is_dir())] if base.is_dir() else []:
        owner_host, _, pid = folder.name.rpartition("-")
        dead = folder != base and owner_host == host and pid.isdigit() and not _alive(int(pid))
        for path in folder.glob(f"{PREFIX}*.dcm"):
            with contextlib.suppress(OSError):
                if dead or path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        if dead:
            with contextlib.suppress(OSError):
                folder.rmdir()
    if removed:
        log.info("removed %d partial instance(s) left under %s by a listener or web server that stopped "
                 "mid-transfer", removed, base)
    return removed
