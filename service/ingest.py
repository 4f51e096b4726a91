"""The one way a study enters FractureNode.

:func:`ingest_file` is called by the DICOM listener's C-STORE handler (which receives to disk) and by the HTTP
uploads (copied to disk first by :func:`spool_upload`, then :func:`ingest_spooled`; a STOW-RS part written there
as it is read, :func:`spool_writer`); :func:`ingest` is the same for an instance already in memory (a listener
that receives to memory). It stores the encoded instance in the content-addressed store
(temp file, fsync, atomic rename, folder fsync, named by its SHA-256) and records patient, study, series,
instance, a queued job and an audit row in ONE database transaction. The two overlap (a storage thread writes
while this thread runs the statements), but the transaction commits only once the file is durable, and the
caller answers only after the commit. Nothing is decoded here beyond the header: workers do the pixel work.

Idempotency: the same SOP Instance UID with the same bytes is stored once and processed once; different
bytes under a known SOP Instance UID become a new ``version`` flagged ``changed_from_previous``, with a job
of its own. The unique constraint ``(sop_instance_uid, version)`` settles races between concurrent senders.

:func:`ingest_upload` adds the HTTP checks: size limit, content type against magic bytes, and for PNG/JPEG a
decompression-bomb guard before the image is wrapped as a DICOM Secondary Capture with generated UIDs. An upload
is never held in memory whole: it is copied in 1 MiB pieces to a file in the listener's incoming folder
(``<storage dir>/.incoming/<host>-<pid>/``, :mod:`dicom.receive`), hashed and size-checked as it is copied, and
that file is removed whatever the outcome.

Every failure is one of our :class:`IngestError` subclasses; ``dicom.status`` turns them into DIMSE
statuses and ``service.errors`` (they are :class:`~service.errors.ServiceError`) into HTTP responses.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import io
import logging
import os
import re
import secrets
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import Engine, Table, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from config import Settings
from dicom import receive
from dicom.limits import (
    MAX_DECODED_BYTES,
    MAX_IMAGE_PIXELS,
    MB,
    InputTooLarge,
    decoded_size_problem,
    read_part10,
    read_part10_file,
)
from service.db import Database
from service.errors import ServiceError
from service.jobs import QUEUED, RECEIVED
from service.models import AuditEntry, Instance, Job, JobEvent, Patient, Series, Study, utcnow
from service.storage import (
    StorageError,
    StorageFull,
    StoredFile,
    discard,
    path_for,
    sha256_bytes,
    sha256_file,
    storage_error,
    store_bytes,
    store_file,
)

log = logging.getLogger(__name__)

#: A decoded upload may not have more than MAX_IMAGE_PIXELS pixels (40 MP, shared with dicom.image: see
#: dicom.limits; a 4300x3500 detector image has 15 MP) nor decode to more than MAX_DECODED_BYTES (80 MB).
MAX_IMAGE_SIDE = 16_384
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC = b"DICM"  # at offset 128 of a Part 10 file
CONTENT_TYPES = {
    "application/dicom": "dicom",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
}
UNTYPED = ("", "application/octet-stream")
_RETRIES = 3
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


# ------------------------------------------------------------------------------------------- errors


class IngestError(ServiceError):
    """An instance or upload could not be taken in; the subclasses say why."""

    status, code = 400, "ingest_error"


class InvalidInstance(IngestError):
    """The object is DICOM but lacks what we need (SOP Class/Instance, Study, Series UIDs)."""

    status, code = 422, "invalid_instance"


class UnreadableInstance(IngestError):
    """The bytes cannot be parsed as a DICOM Part 10 object."""

    status, code = 422, "unreadable_instance"


class InstanceTooLarge(IngestError):
    """Larger than ``settings.max_upload_mb``."""

    status, code = 413, "payload_too_large"


class UnsupportedUpload(IngestError):
    """Content type or magic bytes are not DICOM, PNG or JPEG, or they disagree."""

    status, code = 415, "unsupported_media_type"


class UnreadableImage(IngestError):
    """A PNG/JPEG that cannot be decoded, or one whose pixel count is a decompression bomb."""

    status, code = 422, "unreadable_image"


class InflatedTooLarge(InstanceTooLarge):
    """A Deflated Explicit VR Little Endian object that inflates beyond ``dicom.limits.MAX_INFLATED_BYTES``
    (a deflate bomb): refused while inflating, before that much memory is allocated."""


class OutOfResources(IngestError):
    """We could not store what was sent (disk full, database unavailable): the sender should retry."""

    status, code = 503, "unavailable"


class DiskFull(OutOfResources):
    code = "storage_full"


class StorageUnavailable(OutOfResources):
    code = "storage_unavailable"


class DatabaseUnavailable(OutOfResources):
    code = "database_unavailable"


# ------------------------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class IngestResult:
    """What happened to one received object."""

    instance_pk: int
    job_pk: int | None
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    version: int
    sha256: str
    path: Path
    #: Same SOP Instance UID and same bytes as the latest stored version: nothing new was stored or queued.
    duplicate: bool
    #: Different bytes under a known SOP Instance UID: stored as a new version.
    changed: bool


@dataclass(frozen=True)
class _Header:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str | None
    ds: Dataset


def _text(ds: Dataset, keyword: str, limit: int | None = None) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).replace("\x00", "").strip()
    return text[:limit] if limit else text


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def read_header(data: bytes | Path) -> _Header:
    """Parse the header of an encoded Part 10 object, bytes or a file (no pixel data is read); raise our errors
    on anything odd.

    A deflated dataset is inflated within ``dicom.limits.MAX_INFLATED_BYTES`` (never by pydicom, which has no
    limit): beyond it, :class:`InflatedTooLarge`."""
    try:
        if isinstance(data, Path):
            ds = read_part10_file(data, stop_before_pixels=True)
        else:
            ds = read_part10(data, stop_before_pixels=True)
    except InputTooLarge as exc:
        raise InflatedTooLarge(str(exc)) from None
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, NotImplementedError,
            BytesLengthException, zlib.error, struct.error, OSError) as exc:
        raise UnreadableInstance(f"not a readable DICOM Part 10 object: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    if len(ds) == 0:
        raise UnreadableInstance("not a readable DICOM Part 10 object: no data elements")
    values: dict[str, str] = {}
    for keyword, fallback in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                              ("SOPClassUID", "MediaStorageSOPClassUID"),
                              ("StudyInstanceUID", None), ("SeriesInstanceUID", None)):
        try:
            value = _text(ds, keyword) or (_text(meta, fallback) if meta is not None and fallback else None)
        except Exception as exc:  # noqa: BLE001 - a corrupt element may fail in many ways when accessed
            raise UnreadableInstance(f"cannot read {keyword}: {exc}") from None
        if not value:
            raise InvalidInstance(f"the object has no {keyword}")
        if len(value) > 64:
            raise InvalidInstance(f"{keyword} is longer than 64 characters")
        if not _UID.fullmatch(value):
            raise InvalidInstance(f"{keyword} is not a UID (digits and dots)")
        values[keyword] = value
    tsyntax = _text(meta, "TransferSyntaxUID") if meta is not None else None
    return _Header(values["SOPInstanceUID"], values["SOPClassUID"], values["StudyInstanceUID"],
                   values["SeriesInstanceUID"], tsyntax, ds)


def _insert_ignore(engine: Engine, table: Any) -> Any:
    if engine.dialect.name == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)


def _get_or_insert(session: Session, model: Any, keys: dict[str, Any], values: dict[str, Any]) -> int:
    """The id of the row with ``keys``, inserted with ``keys + values`` if there is none (race-safe: ON CONFLICT
    DO NOTHING). One SELECT when it exists, SELECT + INSERT ... RETURNING when it is new."""
    table = model.__table__
    query = select(table.c.id)
    for name, value in keys.items():
        query = query.where(table.c[name] == value)
    found = session.execute(query).scalar()
    if found is not None:
        return int(found)
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    stmt = (_insert_ignore(engine, table).values(**keys, **values)
            .on_conflict_do_nothing(index_elements=list(keys)).returning(table.c.id))
    inserted = session.execute(stmt).scalar()
    if inserted is None:  # a concurrent transaction inserted it between our SELECT and INSERT
        inserted = session.execute(query).scalar_one()
    return int(inserted)


def _record(session: Session, settings: Settings, header: _Header, stored: StoredFile, *, source: str,
            calling_ae: str | None, peer_address: str | None, uploaded_by_id: int | None,
            original_filename: str | None) -> IngestResult:
    """Record patient, study, series, instance, its queued job (with its ``received`` and ``queued`` events) and
    the audit row in the caller's transaction.

    Core statements, not ORM objects (the C-STORE sender waits for this): 7 statements for an instance of a new
    study, 6 for a further instance of a known study (SELECT latest version, patient, study upsert, series,
    instance, job, its two events in one multi-row INSERT, audit).
    """
    ds = header.ds
    now = utcnow()
    instances, jobs_table = cast(Table, Instance.__table__), cast(Table, Job.__table__)
    latest = session.execute(
        select(instances.c.id, instances.c.version, instances.c.sha256, instances.c.series_pk, instances.c.file_path,
               instances.c.sop_class_uid)
        .where(instances.c.sop_instance_uid == header.sop_instance_uid)
        .order_by(instances.c.version.desc()).limit(1)
    ).first()
    if latest is not None and latest.sha256 == stored.sha256:
        job_pk = session.scalar(select(Job.id).where(Job.instance_pk == latest.id).order_by(Job.id.desc()).limit(1))
        series = session.get(Series, latest.series_pk)
        study = session.get(Study, series.study_pk) if series else None
        return IngestResult(latest.id, job_pk, header.sop_instance_uid, latest.sop_class_uid,
                            study.study_instance_uid if study else header.study_instance_uid,
                            series.series_instance_uid if series else header.series_instance_uid,
                            latest.version, latest.sha256, Path(latest.file_path), duplicate=True, changed=False)

    engine = session.get_bind()
    assert isinstance(engine, Engine)
    patient_id = _text(ds, "PatientID", 64) or ""
    patient_pk = _get_or_insert(
        session, Patient, {"patient_id": patient_id, "issuer": _text(ds, "IssuerOfPatientID", 64) or ""},
        {"name": _text(ds, "PatientName", 324) or "", "birth_date": _text(ds, "PatientBirthDate", 8),
         "sex": _text(ds, "PatientSex", 16), "created_at": now})
    # Insert the study, or (it exists) restart its quiet period: a new instance arriving after the report
    # re-opens it. One statement either way.
    studies = Study.__table__
    study_stmt = _insert_ignore(engine, studies).values(
        study_instance_uid=header.study_instance_uid, patient_pk=patient_pk, study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16), accession_number=_text(ds, "AccessionNumber", 16),
        referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
        description=_text(ds, "StudyDescription", 64), uploaded_by_id=uploaded_by_id, source=source,
        calling_ae=calling_ae, created_at=now, last_instance_at=now, report_state="pending")
    study_pk = int(session.execute(
        study_stmt.on_conflict_do_update(index_elements=["study_instance_uid"],
                                         set_={"last_instance_at": now, "report_state": "pending"})
        .returning(studies.c.id)).scalar_one())
    series_pk = _get_or_insert(session, Series, {"series_instance_uid": header.series_instance_uid}, {
        "study_pk": study_pk, "modality": _text(ds, "Modality", 16), "series_number": _int(ds, "SeriesNumber"),
        "body_part": _text(ds, "BodyPartExamined", 64), "laterality": _text(ds, "ImageLaterality", 16)
        or _text(ds, "Laterality", 16), "description": _text(ds, "SeriesDescription", 64),
    })
    version = 1 if latest is None else latest.version + 1
    # IntegrityError here when a concurrent sender won the race for this version (the caller retries).
    instance_pk = int(session.execute(insert(instances).values(
        sop_instance_uid=header.sop_instance_uid, version=version, series_pk=series_pk,
        sop_class_uid=header.sop_class_uid, transfer_syntax_uid=header.transfer_syntax_uid,
        instance_number=_int(ds, "InstanceNumber"), file_path=str(stored.path), size_bytes=stored.size,
        sha256=stored.sha256, source=source, calling_ae=calling_ae, peer_address=peer_address,
        uploaded_by_id=uploaded_by_id,
        original_filename=(original_filename or None) and original_filename.replace("\x00", "")[:256],
        changed_from_previous=latest is not None, received_at=now,
    ).returning(instances.c.id)).scalar_one())
    detail = f"stored {stored.sha256[:16]} ({stored.size} bytes) via {source}"
    if calling_ae:
        detail += f" from AE {calling_ae}"
    if latest is not None:
        detail += f"; changed from version {latest.version}"
    # The same rows as service.jobs.create_job: the job, queued, with its "received" and "queued" events.
    job_pk = int(session.execute(insert(jobs_table).values(
        instance_pk=instance_pk, state=QUEUED, max_attempts=settings.job_max_attempts, created_at=now, updated_at=now,
    ).returning(jobs_table.c.id)).scalar_one())
    session.execute(insert(cast(Table, JobEvent.__table__)), [
        {"job_pk": job_pk, "state": RECEIVED, "detail": detail, "at": now},
        {"job_pk": job_pk, "state": QUEUED, "detail": None, "at": now},
    ])
    actor_type, actor = ("ae", calling_ae or "?") if source == "dicom" else ("user", str(uploaded_by_id or "?"))
    session.execute(insert(cast(Table, AuditEntry.__table__)).values(
        at=now, actor_type=actor_type, actor=actor, action="instance.receive", object_type="instance",
        object_id=header.sop_instance_uid, patient_id=patient_id or None, remote_addr=peer_address, outcome="ok",
        detail={"version": version, "sha256": stored.sha256, "study": header.study_instance_uid}))
    return IngestResult(instance_pk, job_pk, header.sop_instance_uid, header.sop_class_uid,
                        header.study_instance_uid, header.series_instance_uid, version, stored.sha256, stored.path,
                        duplicate=False, changed=latest is not None)


def ingest(db: Database, settings: Settings, data: bytes, *, source: str = "dicom", calling_ae: str | None = None,
           peer_address: str | None = None, uploaded_by_id: int | None = None,
           original_filename: str | None = None) -> IngestResult:
    """Store one encoded DICOM Part 10 object and queue its analysis (see the module docstring).

    Raises :class:`InstanceTooLarge`, :class:`UnreadableInstance`, :class:`InvalidInstance`,
    :class:`DiskFull`, :class:`StorageUnavailable` or :class:`DatabaseUnavailable`; on any of them nothing
    is recorded and no file this call wrote is left behind.
    """
    if len(data) > settings.max_upload_bytes:
        raise InstanceTooLarge(f"instance of {len(data)} bytes exceeds the {settings.max_upload_mb} MB limit")
    header = read_header(data)
    digest = sha256_bytes(data)
    pending = _storage_pool().submit(store_bytes, settings.storage_dir, data, digest=digest)
    return _record_when_stored(db, settings, header, digest, len(data), pending, source=source,
                               calling_ae=calling_ae, peer_address=peer_address, uploaded_by_id=uploaded_by_id,
                               original_filename=original_filename)


def storage_failure(exc: OSError, what: str) -> OutOfResources:
    """A storage failure as what the sender is told: :class:`DiskFull` for a full disk or quota, else
    :class:`StorageUnavailable`."""
    failure = exc if isinstance(exc, StorageError) else storage_error(exc, what)
    # the sentence alone ("storage full while ...: No space left on device"), not OSError's "[Errno 28] " prefix
    return (DiskFull if isinstance(failure, StorageFull) else StorageUnavailable)(failure.strerror or str(failure))


def ingest_file(db: Database, settings: Settings, path: Path, *, source: str = "dicom",
                calling_ae: str | None = None, peer_address: str | None = None, uploaded_by_id: int | None = None,
                original_filename: str | None = None, sha256: str | None = None, link: bool = False) -> IngestResult:
    """:func:`ingest` of an encoded Part 10 object in a file (where the listener receives each instance, and an
    upload is spooled): the header is read from the file, the hash and the copy into the store go through it in
    pieces, so the instance is never held in memory whole. ``sha256``: the file's digest, where the caller
    computed it while writing the file (not read again). ``path`` is left where it is. ``link``: the caller
    owns ``path`` and writes it no more (a file of the incoming folder: an instance received, an upload
    spooled), so the store may take it by a hard link (:func:`service.storage.store_file`) and its bytes are
    not written a second time; never for a file someone else may change. Raises what :func:`ingest` raises."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableInstance(f"the received instance cannot be read: {exc.strerror or exc}") from None
    if size > settings.max_upload_bytes:
        raise InstanceTooLarge(f"instance of {size} bytes exceeds the {settings.max_upload_mb} MB limit")
    header = read_header(path)
    digest = sha256 or sha256_file(path)
    pending = _storage_pool().submit(store_file, settings.storage_dir, path, digest=digest, link=link)
    return _record_when_stored(db, settings, header, digest, size, pending, source=source, calling_ae=calling_ae,
                               peer_address=peer_address, uploaded_by_id=uploaded_by_id,
                               original_filename=original_filename)


def _record_when_stored(db: Database, settings: Settings, header: _Header, digest: str, size: int,
                        pending: Future[StoredFile], *, source: str, calling_ae: str | None,
                        peer_address: str | None, uploaded_by_id: int | None = None,
                        original_filename: str | None = None) -> IngestResult:
    # The file is written and fsynced (file and folder) by a storage thread while this thread runs the
    # database statements; the transaction commits only once the file is durable, so a committed row always
    # names a whole file and Success (after the commit) is never early. fsync releases the GIL: the two overlap.
    planned = StoredFile(path_for(settings.storage_dir, digest), digest, size, created=True)
    stored: StoredFile | None = None

    def durable() -> StoredFile:
        nonlocal stored
        if stored is None:
            try:
                stored = pending.result()
            except OSError as exc:
                log.error("cannot store instance %s: %s", header.sop_instance_uid, exc)
                raise storage_failure(exc, "storing the instance") from exc
        return stored

    try:
        for attempt in range(1, _RETRIES + 1):
            try:
                with db.session() as session:
                    result = _record(session, settings, header, planned, source=source, calling_ae=calling_ae,
                                     peer_address=peer_address, uploaded_by_id=uploaded_by_id,
                                     original_filename=original_filename)
                    durable()  # before the commit at the end of this block
                break
            except sa_exc.IntegrityError:
                if attempt == _RETRIES:
                    raise
                log.info("concurrent insert of %s; retrying", header.sop_instance_uid)
    except (sa_exc.DBAPIError, sa_exc.TimeoutError) as exc:
        _discard_when_written(pending)
        log.error("database unavailable while recording %s: %s", header.sop_instance_uid,
                  str(exc).splitlines()[0])
        raise DatabaseUnavailable(f"database unavailable: {type(exc.__cause__ or exc).__name__}") from exc
    except BaseException:
        _discard_when_written(pending)
        raise
    if result.duplicate:
        log.info("duplicate of %s v%d (sha256 %s): already stored, not queued again", result.sop_instance_uid,
                 result.version, result.sha256[:16])
    elif result.changed:
        log.warning("instance %s re-sent with different content: stored as version %d (sha256 %s), job %s",
                    result.sop_instance_uid, result.version, result.sha256[:16], result.job_pk)
    else:
        log.info("stored %s (%s, sha256 %s, %d bytes from %s), job %s", result.sop_instance_uid, source,
                 result.sha256[:16], size, calling_ae or peer_address or "upload", result.job_pk)
    return result


_STORAGE_POOL: ThreadPoolExecutor | None = None
_STORAGE_POOL_LOCK = threading.Lock()


def _storage_pool() -> ThreadPoolExecutor:
    """Threads that write and fsync received files (one per instance in flight; created as needed)."""
    global _STORAGE_POOL
    with _STORAGE_POOL_LOCK:
        if _STORAGE_POOL is None:
            _STORAGE_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="store")
        return _STORAGE_POOL


def _discard_when_written(pending: Future[StoredFile]) -> None:
    """The transaction failed: wait for the file's write to end, then remove the file if this call created it."""
    try:
        stored = pending.result()
    except Exception:  # noqa: BLE001 - the write failed too: nothing to remove
        return
    discard(stored)


# ------------------------------------------------------------------------------------------ uploads


#: What :func:`sniff` looks at: the DICOM prefix ends at byte 132 (PS3.10 7.1), the PNG and JPEG ones before.
SNIFF_BYTES = 132
#: Uploads are copied to disk in pieces of this size (as the listener writes what it receives).
CHUNK = receive.BUFFER
#: A multipart file part up to this size stays in memory while Werkzeug parses the request (:class:`UploadPart`):
#: Werkzeug's own threshold (``werkzeug.formparser.default_stream_factory``, 3.1.x).
PART_IN_MEMORY = 500 * 1024


def sniff(data: bytes) -> str | None:
    """``dicom``, ``png``, ``jpeg`` from the magic bytes (the first :data:`SNIFF_BYTES`), else None."""
    if len(data) >= SNIFF_BYTES and data[SNIFF_BYTES - 4:SNIFF_BYTES] == DICOM_MAGIC:
        return "dicom"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def check_upload(content_type: str | None, kind: str | None, *, details: Any = None) -> str:
    """The upload's kind (``dicom``, ``png``, ``jpeg``) if its declared ``content_type`` is accepted and agrees
    with ``kind``, what :func:`sniff` found (``application/octet-stream`` or none: the magic bytes decide); else
    :class:`UnsupportedUpload` (with ``details``)."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in UNTYPED and declared not in CONTENT_TYPES:
        raise UnsupportedUpload(f"content type {declared!r} is not accepted; send application/dicom, image/png "
                                "or image/jpeg", details=details)
    if kind is None:
        raise UnsupportedUpload("the file is not DICOM Part 10, PNG or JPEG (magic bytes)", details=details)
    if declared in CONTENT_TYPES and CONTENT_TYPES[declared] != kind:
        raise UnsupportedUpload(f"content type {declared!r} does not match the file's content ({kind})",
                                details=details)
    return kind


@dataclass(frozen=True)
class SpooledUpload:
    """An upload copied to a file of the incoming folder (:func:`spool_upload`, :meth:`UploadWriter.finish`)."""

    path: Path
    #: SHA-256 (hex) of the bytes, computed while copying them: the same as ``sha256_bytes`` of the upload.
    sha256: str
    size: int
    #: What :func:`sniff` says of its first bytes.
    kind: str | None


@contextlib.contextmanager
def _incoming_path(settings: Settings, what: str) -> Iterator[Path]:
    """A new, empty file in this process's incoming folder (``<storage dir>/.incoming/<host>-<pid>/``, where
    the listener receives to and which :func:`dicom.receive.sweep` cleans after a killed process), removed when
    the block ends, whatever the outcome. A file that cannot be made is a storage failure (:func:`storage_failure`:
    a full disk is :class:`DiskFull`, as for the store itself)."""
    folder = receive.incoming_folder(settings.storage_dir / receive.FOLDER)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f"{receive.PREFIX}upload-", suffix=".dcm")
        os.close(fd)
    except OSError as exc:
        log.error("cannot make a file in %s: %s", folder, exc.strerror or exc)
        raise storage_failure(exc, what) from exc
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


class _Tally:
    """What an upload's bytes say as they pass, in order: SHA-256, size and the first :data:`SNIFF_BYTES` (for
    :func:`sniff`), without holding them (:class:`UploadWriter`, :class:`UploadPart`)."""

    def __init__(self) -> None:
        self.size = 0
        self._digest = hashlib.sha256()
        self._head = b""

    def add(self, piece: bytes | memoryview) -> None:
        if len(self._head) < SNIFF_BYTES:
            self._head += bytes(piece[:SNIFF_BYTES - len(self._head)])
        self._digest.update(piece)
        self.size += len(piece)

    def upload(self, path: Path) -> SpooledUpload:
        return SpooledUpload(path, self._digest.hexdigest(), self.size, sniff(self._head))


class UploadWriter:
    """An upload written to a file of the incoming folder in the pieces it arrives in (made by
    :func:`spool_writer`): hashed as it is written, refused with :class:`InstanceTooLarge` as soon as it would
    exceed ``limit`` bytes (the piece that crosses the limit is not written), its kind sniffed from its first
    bytes. A disk that fills while writing is :class:`DiskFull` (any other I/O failure
    :class:`StorageUnavailable`), as when the store fills."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self._tally = _Tally()
        try:
            self._out: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - closed by finish() or close()
        except OSError as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: OSError) -> OutOfResources:
        log.error("cannot spool an upload to %s: %s", self.path, exc.strerror or exc)
        return storage_failure(exc, "receiving the upload")

    def write(self, piece: bytes) -> None:
        """Append ``piece`` (of any size)."""
        if self._out is None:
            raise ValueError(f"{self.path} is finished")
        if self._tally.size + len(piece) > self.limit:
            raise InstanceTooLarge(f"upload exceeds the {self.limit // (1024 * 1024)} MB limit")
        try:
            self._out.write(piece)
        except OSError as exc:
            raise self._failure(exc) from exc
        self._tally.add(piece)

    def finish(self) -> SpooledUpload:
        """Close the file (it stays until :func:`spool_writer`'s block ends) and say what it holds."""
        if self._out is not None:
            out, self._out = self._out, None
            try:
                out.close()  # writes what is still buffered: a full disk may show here
            except OSError as exc:
                raise self._failure(exc) from exc
        return self._tally.upload(self.path)

    def close(self) -> None:
        """Close the file, whatever state it is in (the upload is abandoned)."""
        if self._out is not None:
            out, self._out = self._out, None
            with contextlib.suppress(OSError):
                out.close()


@contextlib.contextmanager
def spool_writer(settings: Settings) -> Iterator[UploadWriter]:
    """An :class:`UploadWriter` on a new file of the incoming folder, limited to ``settings.max_upload_bytes``;
    the file is removed when the block ends, whatever the outcome. For an upload that arrives in pieces of its
    own (a part of a STOW-RS body); :func:`spool_upload` copies one from a stream."""
    with _incoming_path(settings, "receiving the upload") as path:
        writer = UploadWriter(path, settings.max_upload_bytes)
        try:
            yield writer
        finally:
            writer.close()


@contextlib.contextmanager
def spool_upload(settings: Settings, stream: bytes | IO[bytes]) -> Iterator[SpooledUpload]:
    """Copy an upload (a file-like object, read from where it is; or bytes) to a file of the incoming folder in
    :data:`CHUNK` pieces, never holding it whole (:class:`UploadWriter`): hashed as it is copied, refused with
    :class:`InstanceTooLarge` as soon as it exceeds ``settings.max_upload_bytes``, its kind sniffed from its first
    bytes. The file is removed when the block ends, whatever the outcome. A disk that fills while copying is
    :class:`DiskFull` (any other I/O failure :class:`StorageUnavailable`), as when the store fills. A request's
    file part that Werkzeug already wrote to the incoming folder (:class:`UploadPart`) is not copied: its file is
    named there instead (:meth:`UploadPart.take`), and the name removed when the block ends."""
    taken = stream.take(settings.max_upload_bytes) if isinstance(stream, UploadPart) else None
    if taken is not None:  # a part Werkzeug wrote to the incoming folder: named there, not copied
        try:
            yield taken
        finally:
            with contextlib.suppress(OSError):
                os.unlink(taken.path)
        return
    source: IO[bytes] = io.BytesIO(stream) if isinstance(stream, bytes | bytearray | memoryview) else stream
    with spool_writer(settings) as writer:
        try:
            while chunk := source.read(CHUNK):
                writer.write(chunk)
        except OSError as exc:  # reading the request's own spooled copy: the host's storage too
            log.error("cannot read an upload to spool it to %s: %s", writer.path, exc.strerror or exc)
            raise storage_failure(exc, "receiving the upload") from exc
        yield writer.finish()


class UploadPart(tempfile.SpooledTemporaryFile[bytes]):
    """Where Werkzeug writes a multipart file part while it parses a request (``service.app.UploadRequest``), before
    :func:`spool_upload` takes it: in memory up to :data:`PART_IN_MEMORY`, as Werkzeug does, then in an unnamed
    file of this process's incoming folder, on the store's file system, instead of the system temporary folder
    (Werkzeug's default), which may be a RAM-backed tmpfs (Debian 13, Fedora): there, large concurrent uploads
    would cost memory outside any process's RSS.

    The file is unnamed (``O_TMPFILE``), so it is gone when it is closed or the process ends, however it ends:
    :func:`dicom.receive.sweep` has nothing to remove after a killed process. It is opened so that it can be given
    a name later (without ``O_EXCL``), and the part hashes what is written to it as it is written: once Werkzeug
    has parsed the request, :meth:`take` names the file in the incoming folder and :func:`spool_upload` uses it
    as the spooled upload, so a large upload is written to disk once, not copied a second time (since session 27).
    Where the file system lacks ``O_TMPFILE``, tempfile's own way stands (a named file unlinked at once; it is
    named with the incoming folder's prefix, so sweep covers even that instant) and the part is copied as before.
    A disk that fills, or any other I/O failure, while the part is written is :class:`DiskFull`
    (:class:`StorageUnavailable`), as in :class:`UploadWriter`; the file is then closed, which frees what it
    held."""

    def __init__(self, settings: Settings) -> None:
        self.folder = receive.incoming_folder(settings.storage_dir / receive.FOLDER)
        super().__init__(max_size=PART_IN_MEMORY, mode="w+b", dir=str(self.folder), prefix=f"{receive.PREFIX}part-",
                         suffix=".dcm")
        self._tally = _Tally()
        self._appended = True  # every write so far went to the end: the tally is the file's
        self._nameable = False  # the file is an O_TMPFILE opened without O_EXCL

    def _failure(self, exc: OSError) -> OutOfResources:
        log.error("cannot write an upload's part to %s: %s", self.folder, exc.strerror or exc)
        with contextlib.suppress(OSError):  # a full disk may fail the buffered tail's flush here too
            self.close()
        return storage_failure(exc, "receiving the upload")

    def rollover(self) -> None:
        if self._rolled:  # type: ignore[has-type]  # tempfile's own flag: set once, below or by the base class
            return
        self.folder.mkdir(parents=True, exist_ok=True)  # made for the first part over PART_IN_MEMORY
        fd = None
        if hasattr(os, "O_TMPFILE"):  # Linux
            try:
                fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise  # a full disk, no permission: write() says so
        if fd is None:  # no O_TMPFILE here: tempfile's way, copied by spool_upload
            super().rollover()
            return
        memory = cast(io.BytesIO, self._file)  # where the part has been until now
        disk = os.fdopen(fd, "w+b")
        try:
            disk.write(memory.getvalue())
            disk.seek(memory.tell())
        except OSError:
            disk.close()
            raise
        self._file, self._rolled, self._nameable = disk, True, True

    def write(self, s: Any) -> int:
        try:
            if self._appended and self.tell() != self._tally.size:
                self._appended = False  # rewritten in place: the tally no longer describes the file
            count = super().write(s)  # rolls over (above) once past PART_IN_MEMORY: a failure there shows here
        except OSError as exc:
            raise self._failure(exc) from exc
        if self._appended:
            self._tally.add(memoryview(s)[:count])
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        try:
            return super().seek(offset, whence)  # writes what is still buffered: a full disk may show here
        except OSError as exc:
            raise self._failure(exc) from exc

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:
            raise self._failure(exc) from exc

    def take(self, limit: int) -> SpooledUpload | None:
        """The part as a spooled upload without copying it: its file given a name in the incoming folder (a hard
        link to the unnamed file, ``linkat`` through ``/proc/self/fd``), with the hash, size and kind taken while
        it was written. None where that cannot be (a part still in memory, a file system without ``O_TMPFILE``
        or ``/proc``, a part rewritten in place): the caller copies it instead. Over ``limit`` bytes it is
        :class:`InstanceTooLarge`. The caller removes the name when done (the unnamed file goes with the part)."""
        if self.closed or not (self._nameable and self._appended):
            return None
        if self._tally.size > limit:
            raise InstanceTooLarge(f"upload exceeds the {limit // (1024 * 1024)} MB limit")
        self.flush()
        name = self.folder / f"{receive.PREFIX}upload-{secrets.token_hex(8)}.dcm"
        try:
            # linkat(..., AT_SYMLINK_FOLLOW) on the /proc entry, which os.link makes only when given a directory
            # descriptor (else it calls link(2), which would link the /proc symlink itself: EXDEV).
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(str(self.fileno()), name, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
        except OSError as exc:
            log.info("copying an upload's part instead of naming it in %s: %s", self.folder, exc.strerror or exc)
            return None
        return self._tally.upload(name)


def decode_upload_image(data: bytes | Path, kind: str) -> np.ndarray:
    """Decode a PNG/JPEG (its bytes, or a file read as it decodes) with a decompression-bomb guard; return
    uint8/uint16 grey (HxW) or uint8 RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        source = data if isinstance(data, Path) else io.BytesIO(data)
        with Image.open(source, formats=["PNG" if kind == "png" else "JPEG"]) as img:
            width, height = img.size
            # What load() and the conversions below allocate: a palette becomes RGB, 16-bit stays 16-bit.
            samples = 3 if img.mode in ("P", "PA") else len(img.getbands())
            depth = 2 if img.mode.startswith("I;16") else 4 if img.mode in ("I", "F") else 1
            problem = decoded_size_problem(width, height, samples=samples, bytes_per_sample=depth)
            if problem or max(width, height) > MAX_IMAGE_SIDE:
                raise UnreadableImage(f"image of {width}x{height} pixels is larger than allowed "
                                      f"({MAX_IMAGE_PIXELS // 1_000_000} MP, {MAX_IMAGE_SIDE} px a side, "
                                      f"{MAX_DECODED_BYTES // MB} MB decoded)")
            img.load()
            image: Image.Image = ImageOps.exif_transpose(img) if kind == "jpeg" else img
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image)
                if array.dtype != np.uint16:
                    array = np.clip(array, 0, 65535).astype(np.uint16)
                return array
            if image.mode == "L":
                return np.asarray(image, dtype=np.uint8).copy()
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"cannot decode the {kind.upper()} image: {exc}") from None
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0].copy()
    return rgb


def secondary_capture(pixels: np.ndarray, *, patient_id: str = "", patient_name: str = "",
                      referring_physician_name: str | None = None, study_description: str | None = None,
                      modality: str = "OT") -> Dataset:
    """Wrap a decoded image as a DICOM Secondary Capture Image (PS3.3 A.8.1) with generated UIDs; written with
    ``save_as(..., enforce_file_format=True)``."""
    now = dt.datetime.now(dt.UTC)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = referring_physician_name or ""
    if study_description:
        ds.StudyDescription = study_description[:64]
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16 if pixels.dtype == np.uint16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def ingest_upload(db: Database, settings: Settings, stream: bytes | IO[bytes], *, content_type: str | None,
                  filename: str | None = None, uploaded_by_id: int | None = None, source: str = "upload",
                  remote_addr: str | None = None, patient_id: str = "", patient_name: str = "",
                  referring_physician_name: str | None = None) -> IngestResult:
    """Take an HTTP upload (DICOM Part 10, PNG or JPEG; a file-like object or bytes) to disk
    (:func:`spool_upload`), through the checks, then into the store (:func:`ingest_spooled`)."""
    with spool_upload(settings, stream) as upload:
        return ingest_spooled(db, settings, upload, content_type=content_type, filename=filename,
                              uploaded_by_id=uploaded_by_id, source=source, remote_addr=remote_addr,
                              patient_id=patient_id, patient_name=patient_name,
                              referring_physician_name=referring_physician_name)


def ingest_spooled(db: Database, settings: Settings, upload: SpooledUpload, *, content_type: str | None,
                   filename: str | None = None, uploaded_by_id: int | None = None, source: str = "upload",
                   remote_addr: str | None = None, patient_id: str = "", patient_name: str = "",
                   referring_physician_name: str | None = None) -> IngestResult:
    """An upload spooled by :func:`spool_upload`, through the checks, then :func:`ingest_file`.

    ``content_type`` must be ``application/dicom``, ``image/png`` or ``image/jpeg`` and agree with the magic
    bytes (``application/octet-stream`` or none: the magic bytes decide). A DICOM file is stored as the bytes
    uploaded. PNG/JPEG become Secondary Capture objects with generated UIDs, written to a second file of the
    incoming folder; ``patient_*`` and ``referring_physician_name`` fill their header.
    """
    kind = check_upload(content_type, upload.kind)
    if kind == "dicom":
        return ingest_file(db, settings, upload.path, source=source, peer_address=remote_addr,
                           uploaded_by_id=uploaded_by_id, original_filename=filename, sha256=upload.sha256,
                           link=True)
    pixels = decode_upload_image(upload.path, kind)
    # An image without a patient ID is its own anonymous patient, never merged with other uploads.
    patient_id = patient_id.strip() or f"ANON-{secrets.token_hex(6).upper()}"
    capture = secondary_capture(pixels, patient_id=patient_id, patient_name=patient_name,
                                referring_physician_name=referring_physician_name,
                                study_description=(f"Upload {filename}" if filename else "Upload"))
    del pixels  # the dataset holds its own copy of the pixels
    with _incoming_path(settings, "writing the Secondary Capture") as path:
        try:
            capture.save_as(path, enforce_file_format=True)
        except OSError as exc:
            raise storage_failure(exc, "writing the Secondary Capture") from exc
        del capture
        if path.stat().st_size > settings.max_upload_bytes:
            raise InstanceTooLarge("the decoded image exceeds the upload size limit")
        return ingest_file(db, settings, path, source=source, peer_address=remote_addr,
                           uploaded_by_id=uploaded_by_id, original_filename=filename, link=True)
