"""Content-addressed file store for received instances.

A file is named by the SHA-256 of its bytes (``<storage dir>/ab/cd/abcd....dcm``), so storing the same
bytes twice keeps one copy. Writing is crash-safe: the bytes go to a temporary file in the store's own
``.tmp`` folder (same file system), are fsync'ed, and the file is renamed into place atomically; the folder
is fsync'ed too. A reader therefore sees either the whole file or none of it. A file received to disk enters
the store by a hard link where it can (:func:`store_file` with ``link``), so its bytes are written once.

Errors are our own: :class:`StorageFull` for ENOSPC/EDQUOT/EFBIG (the disk or a quota is full),
:class:`StorageError` for any other I/O failure.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StorageError(OSError):
    """The instance could not be written to (or read from) the store."""


class StorageFull(StorageError):
    """The store's file system (or a quota, or a file-size limit) is full."""


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    size: int
    #: True when this call wrote the file; False when identical bytes were already stored.
    created: bool


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_for(storage_dir: Path, sha256: str, suffix: str = ".dcm") -> Path:
    return storage_dir / sha256[:2] / sha256[2:4] / f"{sha256}{suffix}"


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, what: str) -> StorageError:
    """``exc`` as :class:`StorageFull` (the disk or a quota is full) or :class:`StorageError`, saying ``what``
    was being done."""
    if exc.errno in _FULL_ERRNOS:
        return StorageFull(exc.errno, f"storage full while {what}: {exc.strerror}")
    return StorageError(exc.errno, f"storage error while {what}: {exc.strerror or exc}")


def store_bytes(storage_dir: Path, data: bytes, suffix: str = ".dcm", *, digest: str | None = None) -> StoredFile:
    """Store ``data`` under its SHA-256 (``digest`` if the caller has it); temp file, fsync, atomic rename,
    folder fsync. Raises :class:`StorageError`.

    Identical bytes already in the store are not written again; their file and folder are fsynced all the
    same (cheap when already clean), as a concurrent call may have renamed it into place without having
    fsynced its folder yet, and the caller is about to rely on it being durable."""
    return _store(storage_dir, digest or sha256_bytes(data), len(data), suffix, lambda handle: handle.write(data))


#: os.link's failures that mean "no hard link here" (another file system, one without hard links, a link limit),
#: after which :func:`store_file` copies instead.
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def store_file(storage_dir: Path, source: Path, suffix: str = ".dcm", *, digest: str | None = None,
               link: bool = False) -> StoredFile:
    """:func:`store_bytes` for a file already on disk (an instance the listener received to a temporary file):
    copied into the store in 1 MiB pieces, never held in memory whole. ``source`` is left where it is. Raises
    :class:`StorageError`, also when ``source`` cannot be read.

    With ``link`` (the caller writes ``source`` no more: an instance received or an upload spooled to the
    incoming folder, which lies on the store's file system) the store takes the file by a hard link instead
    of a copy, so its bytes are written to disk once; they are fsynced through the link as a copy would be.
    Where no hard link can be made (another file system, or one without them) it is copied."""
    try:
        size = source.stat().st_size
        digest = digest or sha256_file(source)
    except OSError as exc:
        raise storage_error(exc, f"reading {source.name}") from exc

    def copy(handle: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle, 1 << 20)

    return _store(storage_dir, digest, size, suffix, copy, link_from=source if link else None)


def _linked(source: Path, tmp_dir: Path, digest: str) -> str | None:
    """A new hard link to ``source`` in ``tmp_dir``, fsynced; None where the file system cannot link it."""
    name = str(tmp_dir / f"{digest[:16]}.{os.urandom(8).hex()}.link")
    try:
        os.link(source, name)
    except OSError as exc:
        if exc.errno in _NO_LINK_ERRNOS:
            log.debug("cannot hard-link %s into the store (%s): copying it", source, exc.strerror or exc)
            return None
        raise
    try:
        _fsync_path(Path(name))  # the received bytes reach the disk, as the copy's fsync makes them
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return name


def _store(storage_dir: Path, digest: str, size: int, suffix: str, write: Callable[[BinaryIO], object],
           link_from: Path | None = None) -> StoredFile:
    final = path_for(storage_dir, digest, suffix)
    if final.is_file() and final.stat().st_size == size:
        try:
            _fsync_path(final)
            _fsync_path(final.parent)
        except OSError as exc:
            raise storage_error(exc, f"syncing {final.name}") from exc
        return StoredFile(final, digest, size, created=False)
    tmp_dir = storage_dir / ".tmp"
    tmp_name: str | None = None
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_name = _linked(link_from, tmp_dir, digest) if link_from is not None else None
        if tmp_name is None:
            fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=digest[:16] + ".", suffix=".part")
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, final)
        tmp_name = None
        _fsync_path(final.parent)
    except OSError as exc:
        raise storage_error(exc, f"writing {size} bytes") from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return StoredFile(final, digest, size, created=True)


def discard(stored: StoredFile) -> None:
    """Remove a file this process just created (its database transaction failed)."""
    if stored.created:
        with contextlib.suppress(OSError):
            stored.path.unlink()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a generated file (an artifact) atomically: temp file in the same folder, fsync, rename."""
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise storage_error(exc, f"writing {path.name}") from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
