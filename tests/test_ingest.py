"""service.ingest: the one ingest path, on real databases and a real file store."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from sqlalchemy import func, select

from config import Settings
from dicom import receive
from service.db import Database
from service.ingest import (
    PART_IN_MEMORY,
    DiskFull,
    InstanceTooLarge,
    InvalidInstance,
    UnreadableImage,
    UnreadableInstance,
    UnsupportedUpload,
    UploadPart,
    ingest,
    ingest_file,
    ingest_upload,
    spool_upload,
)
from service.models import Instance, Job, JobEvent, Patient, Series, Study
from service.storage import sha256_file, store_file


def _count(db: Database, model: type) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _leftovers(settings: Settings) -> list[Path]:
    return [p for p in settings.storage_dir.rglob("*") if p.is_file()]


def test_ingest_stores_hashes_and_queues_one_job(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    path = make_dicom("DX")
    result = ingest(db, settings, path.read_bytes(), calling_ae="MODALITY", peer_address="127.0.0.1")
    assert not result.duplicate and not result.changed and result.version == 1
    assert result.path.is_file() and sha256_file(result.path) == result.sha256 == sha256_file(path)
    assert result.path.read_bytes() == path.read_bytes()  # stored exactly as received
    assert not list((settings.storage_dir / ".tmp").iterdir())
    with db.session() as session:
        instance = session.get(Instance, result.instance_pk)
        assert instance is not None and instance.sha256 == result.sha256 and instance.calling_ae == "MODALITY"
        job = session.get(Job, result.job_pk)
        assert job is not None and job.state == "queued"
        states = session.scalars(select(JobEvent.state).where(JobEvent.job_pk == job.id).order_by(JobEvent.id)).all()
        assert states == ["received", "queued"]
        study = session.scalars(select(Study)).one()
        assert study.study_instance_uid == result.study_instance_uid and study.report_state == "pending"
    assert _count(db, Patient) == _count(db, Series) == 1


def test_duplicate_is_stored_once_and_a_changed_file_is_a_new_version(settings: Settings, db: Database,  # type: ignore[no-untyped-def]
                                                                       make_dicom) -> None:
    first = make_dicom("DX", sop_instance_uid="1.2.826.0.1.3680043.10.1.1", seed=1)
    again = ingest(db, settings, first.read_bytes())
    duplicate = ingest(db, settings, first.read_bytes())
    assert duplicate.duplicate and duplicate.instance_pk == again.instance_pk and duplicate.job_pk == again.job_pk
    assert _count(db, Instance) == _count(db, Job) == 1
    with db.session() as session:  # a report already made is re-opened by a new version
        session.execute(Study.__table__.update().values(report_state="reported"))
    changed = make_dicom("DX", sop_instance_uid="1.2.826.0.1.3680043.10.1.1", seed=2,
                         study_instance_uid=again.study_instance_uid, series_instance_uid=again.series_instance_uid)
    second = ingest(db, settings, changed.read_bytes())
    assert second.changed and second.version == 2 and second.job_pk != again.job_pk
    with db.session() as session:
        versions = session.scalars(select(Instance).order_by(Instance.version)).all()
        assert [(v.version, v.changed_from_previous) for v in versions] == [(1, False), (2, True)]
        assert session.scalars(select(Study.report_state)).one() == "pending"
    assert _count(db, Job) == 2 and len(_leftovers(settings)) == 2


def test_bad_objects_are_refused_and_leave_nothing(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnreadableInstance):
        ingest(db, settings, b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(InvalidInstance, match="StudyInstanceUID"):
        path = make_dicom("DX")
        ds = dcmread(path)
        del ds.StudyInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer)
        ingest(db, settings, buffer.getvalue())
    small = Settings.from_env({}, data_dir=settings.data_dir, database_url=settings.database_url, max_upload_mb=1)
    with pytest.raises(InstanceTooLarge):
        ingest(db, small, make_dicom("DX", rows=1024, cols=1024).read_bytes())
    assert _count(db, Instance) == _count(db, Job) == 0 and not _leftovers(settings)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_and_jpeg_uploads_become_secondary_capture(settings: Settings, db: Database) -> None:
    grey16 = (np.linspace(0, 60000, 128 * 96).reshape(128, 96)).astype(np.uint16)
    result = ingest_upload(db, settings, _png(grey16), content_type="image/png", filename="hand.png",
                           referring_physician_name="Doe^Jane")
    ds = dcmread(result.path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.SOPInstanceUID == result.sop_instance_uid
    assert ds.BitsAllocated == 16 and ds.PhotometricInterpretation == "MONOCHROME2"
    assert np.array_equal(ds.pixel_array, grey16) and ds.ReferringPhysicianName == "Doe^Jane"
    jpeg = io.BytesIO()
    Image.fromarray((grey16 >> 8).astype(np.uint8)).convert("RGB").save(jpeg, format="JPEG")
    second = ingest_upload(db, settings, io.BytesIO(jpeg.getvalue()), content_type="application/octet-stream")
    ds2 = dcmread(second.path)
    assert ds2.PhotometricInterpretation == "MONOCHROME2" and ds2.BitsAllocated == 8  # grey stored as RGB
    assert second.study_instance_uid != result.study_instance_uid
    assert ds.PatientID.startswith("ANON-") and ds2.PatientID.startswith("ANON-") and ds.PatientID != ds2.PatientID
    with db.session() as session:
        sources = session.scalars(select(Instance.source)).all()
        assert sources == ["upload", "upload"]
        assert session.scalars(select(Instance.original_filename).where(Instance.id == result.instance_pk)).one() \
            == "hand.png"
    assert sorted(_leftovers(settings)) == sorted([result.path, second.path])  # the upload and its SC: removed


class _Recording(io.BytesIO):
    """An upload stream that records what it was asked for and gives at most ``most`` bytes a read."""

    def __init__(self, data: bytes, most: int | None = None) -> None:
        super().__init__(data)
        self.asked: list[int | None] = []
        self.most = most

    def read(self, size: int | None = -1, /) -> bytes:
        self.asked.append(size)
        return super().read(size if self.most is None else self.most)


def test_a_file_received_to_disk_enters_the_store_by_a_hard_link(settings: Settings, db: Database,  # type: ignore[no-untyped-def]
                                                                 make_dicom) -> None:
    """ingest_file(link=True), as the listener, uploads and STOW-RS call it for their own files of the incoming
    folder: the stored file is the received file's inode, so its bytes are written once; it outlives the received
    name. Without link (a file someone else may change) it is a copy."""
    received = settings.storage_dir / ".incoming" / "received.dcm"
    received.parent.mkdir(parents=True, exist_ok=True)
    received.write_bytes(make_dicom("DX").read_bytes())
    data = received.read_bytes()
    result = ingest_file(db, settings, received, calling_ae="MODALITY", link=True)
    assert result.path.stat().st_ino == received.stat().st_ino and received.stat().st_nlink == 2
    received.unlink()
    assert result.path.read_bytes() == data and sha256_file(result.path) == result.sha256
    assert result.path.stat().st_nlink == 1 and not list((settings.storage_dir / ".tmp").iterdir())
    other = make_dicom("CR")
    copied = ingest_file(db, settings, other, calling_ae="MODALITY")
    assert copied.path.stat().st_ino != other.stat().st_ino and copied.path.read_bytes() == other.read_bytes()


def test_where_no_hard_link_can_be_made_the_store_copies(settings: Settings, make_dicom,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A store on another file system than the received file (EXDEV), or one without hard links: copied, the
    same bytes; a full disk while linking is a full disk, as while copying."""
    import errno

    from service.storage import StorageFull

    source = make_dicom("DX")

    def refuse(code: int):  # type: ignore[no-untyped-def]
        def link(*_args, **_kwargs):  # type: ignore[no-untyped-def]
            raise OSError(code, os.strerror(code))
        return link

    monkeypatch.setattr(os, "link", refuse(errno.EXDEV))
    stored = store_file(settings.storage_dir, source, link=True)
    assert stored.created and stored.path.stat().st_ino != source.stat().st_ino
    assert stored.path.read_bytes() == source.read_bytes() and source.stat().st_nlink == 1
    monkeypatch.setattr(os, "link", refuse(errno.ENOSPC))
    with pytest.raises(StorageFull, match="storage full"):
        store_file(settings.storage_dir, make_dicom("CR"), link=True)
    assert not list((settings.storage_dir / ".tmp").iterdir())


def test_an_upload_is_spooled_in_pieces_hashed_as_it_goes_and_removed(settings: Settings, make_dicom) -> None:  # type: ignore[no-untyped-def]
    data = make_dicom("DX", rows=1500, cols=1200).read_bytes()  # 3.6 MB
    stream = _Recording(data)
    with spool_upload(settings, stream) as upload:
        assert upload.path.parent == settings.storage_dir / ".incoming" / f"{socket.gethostname()}-{os.getpid()}"
        assert upload.path.read_bytes() == data and upload.size == len(data)
        assert upload.sha256 == hashlib.sha256(data).hexdigest() and upload.kind == "dicom"
    assert not upload.path.exists()
    assert len(stream.asked) > 3 and all(n is not None and 0 < n <= 1024 * 1024 for n in stream.asked)
    trickle = _Recording(data[:500], most=7)  # a stream that gives less than asked: the magic bytes still count
    with spool_upload(settings, trickle) as upload:
        assert upload.kind == "dicom" and upload.path.read_bytes() == data[:500]
    with pytest.raises(RuntimeError), spool_upload(settings, _png(np.zeros((8, 8), np.uint8))) as png:
        assert png.kind == "png" and png.path.is_file()
        raise RuntimeError("whatever fails while the upload is being taken in")
    assert not png.path.exists()
    small = Settings.from_env({}, data_dir=settings.data_dir, database_url=settings.database_url, max_upload_mb=1)
    too_big = _Recording(b"\0" * (5 * 1024 * 1024))
    with pytest.raises(InstanceTooLarge, match="upload exceeds the 1 MB limit"), spool_upload(small, too_big):
        pass
    assert too_big.tell() <= 2 * 1024 * 1024  # refused once over the limit, not read to the end
    assert _leftovers(settings) == []


def test_an_upload_part_stays_in_memory_up_to_500_kb_then_goes_to_an_unnamed_file_of_the_incoming_folder(  # type: ignore[no-untyped-def]
        settings: Settings) -> None:
    """Where Werkzeug writes a multipart file part: in memory up to Werkzeug's own 500 kB, then a file of this
    process's incoming folder that has no name (nothing to sweep after a crash) and is gone once closed."""
    incoming = settings.storage_dir / ".incoming" / f"{socket.gethostname()}-{os.getpid()}"
    assert PART_IN_MEMORY == 500 * 1024  # werkzeug.formparser.default_stream_factory's max_size
    part = UploadPart(settings)
    part.write(b"\1" * PART_IN_MEMORY)
    assert part.name is None and not incoming.exists()  # no file yet
    part.write(b"\2")
    assert isinstance(part.name, int)  # a file's descriptor, and no path
    assert Path(os.readlink(f"/proc/self/fd/{part.name}")).parent == incoming and list(incoming.iterdir()) == []
    part.seek(0)
    assert part.read() == b"\1" * PART_IN_MEMORY + b"\2"
    descriptor = part.name
    part.close()
    assert not os.path.exists(f"/proc/self/fd/{descriptor}")


def test_an_upload_part_on_disk_is_taken_by_naming_its_file_not_copied(settings: Settings) -> None:
    """spool_upload takes a part Werkzeug wrote to the incoming folder by naming its unnamed file there (a link to
    the same inode: no second copy), with the hash, size and kind taken while it was written; the name goes when
    the block ends and the file with the part. A part still in memory, or one rewritten in place, is copied."""
    incoming = receive.incoming_folder(settings.storage_dir / receive.FOLDER)
    data = os.urandom(PART_IN_MEMORY + 70_000)
    data = data[:128] + b"DICM" + data[132:]
    part = UploadPart(settings)
    for k in range(0, len(data), 65_536):  # in pieces, as Werkzeug writes them
        part.write(memoryview(data)[k:k + 65_536])
    part.seek(0)
    with spool_upload(settings, part) as upload:
        assert upload.path.parent == incoming and upload.path.name.startswith(receive.PREFIX)
        assert os.stat(upload.path).st_ino == os.fstat(part.fileno()).st_ino  # the part's own file, named
        assert upload.path.read_bytes() == data and upload.size == len(data)
        assert upload.sha256 == hashlib.sha256(data).hexdigest() and upload.kind == "dicom"
    assert not upload.path.exists() and list(incoming.iterdir()) == []
    assert part.read() == data  # the part itself is untouched
    part.close()
    small = Settings.from_env({}, data_dir=settings.data_dir, database_url=settings.database_url, max_upload_mb=1)
    big = UploadPart(small)
    big.write(b"\0" * (1024 * 1024 + 1))
    with pytest.raises(InstanceTooLarge, match="upload exceeds the 1 MB limit"), spool_upload(small, big):
        pass
    big.close()
    for rewrite in (False, True):
        part = UploadPart(settings)
        part.write(data if rewrite else data[:1000])
        if rewrite:  # an edit in place: what was hashed is no longer the file
            part.seek(5)
            part.write(b"edited")
        part.seek(0)
        expected = data[:5] + b"edited" + data[11:] if rewrite else data[:1000]
        assert part.take(settings.max_upload_bytes) is None
        with spool_upload(settings, part) as upload:  # copied, and hashed as it is copied
            assert os.stat(upload.path).st_nlink == 1 and upload.path.read_bytes() == expected
            assert upload.sha256 == hashlib.sha256(expected).hexdigest()
        part.close()
    assert _leftovers(settings) == []


def test_without_o_tmpfile_an_upload_part_falls_back_to_a_copy(settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system that refuses O_TMPFILE (EOPNOTSUPP, as some network file systems do), the part goes to
    tempfile's own file (named, unlinked at once), cannot be named again, and spool_upload copies it as before:
    the same bytes and hash, nothing left."""
    real_open = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    data = os.urandom(PART_IN_MEMORY + 10_000)
    part = UploadPart(settings)
    part.write(data)
    part.seek(0)
    assert part.take(settings.max_upload_bytes) is None
    with spool_upload(settings, part) as upload:
        assert upload.path.read_bytes() == data and upload.sha256 == hashlib.sha256(data).hexdigest()
        assert os.stat(upload.path).st_ino != os.fstat(part.fileno()).st_ino  # a copy
    part.close()
    assert _leftovers(settings) == []


def test_a_full_disk_while_an_upload_part_is_written_is_disk_full_and_closes_it(settings: Settings,  # type: ignore[no-untyped-def]
                                                                                 full_disk) -> None:
    """A disk that fills while Werkzeug writes a part, also where the file's buffered tail is written only when
    Werkzeug seeks back to the start (or flushes), is :class:`DiskFull`; the part is closed, freeing its file."""
    for finish in ("seek", "flush"):
        part = UploadPart(settings)
        part.write(b"\1" * (PART_IN_MEMORY + 4096 - PART_IN_MEMORY % 4096))  # whole pages, in the file
        part.flush()
        filler = os.open(full_disk / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):  # noqa: PT011 - ENOSPC, however the file system words it
            while os.write(filler, b"\0" * 65536):
                pass
        part.write(b"\2" * 100)  # buffered: nothing reaches the disk yet
        with pytest.raises(DiskFull, match="storage full while receiving the upload"):
            part.seek(0) if finish == "seek" else part.flush()
        assert part.closed
        os.close(filler)
        os.unlink(full_disk / "filler")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_checks(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    png = _png(np.zeros((8, 8), np.uint8))
    with pytest.raises(UnsupportedUpload, match="does not match"):
        ingest_upload(db, settings, png, content_type="image/jpeg")
    with pytest.raises(UnsupportedUpload, match="not accepted"):
        ingest_upload(db, settings, png, content_type="text/html")
    with pytest.raises(UnsupportedUpload, match="magic"):
        ingest_upload(db, settings, b"%PDF-1.7 not an image", content_type="application/octet-stream")
    with pytest.raises(UnreadableImage, match="larger than allowed"):
        ingest_upload(db, settings, _png_header_only(9_000, 8_000), content_type="image/png")
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        ingest_upload(db, settings, _png_header_only(40_000, 40_000), content_type="image/png")
    with pytest.raises(UnreadableImage):
        ingest_upload(db, settings, png[:40], content_type="image/png")
    small = Settings.from_env({}, data_dir=settings.data_dir, database_url=settings.database_url, max_upload_mb=1)
    with pytest.raises(InstanceTooLarge):
        ingest_upload(db, small, io.BytesIO(b"\0" * (2 * 1024 * 1024)), content_type="application/dicom")
    assert _count(db, Instance) == 0
    dicom = ingest_upload(db, settings, make_dicom("CR").read_bytes(), content_type="application/dicom")
    assert dicom.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"
    assert _leftovers(settings) == [dicom.path]  # no spooled copy of any of them is left


def test_concurrent_sends_of_one_study_are_race_safe(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    import threading

    study, series = "1.2.826.0.1.3680043.10.3.1", "1.2.826.0.1.3680043.10.3.2"
    files = [make_dicom("DX", study_instance_uid=study, series_instance_uid=series, rows=64, cols=64)
             for _ in range(3)]
    payloads = [f.read_bytes() for f in files] * 2  # every instance twice, all at once
    errors: list[BaseException] = []

    def send(data: bytes) -> None:
        try:
            ingest(db, settings, data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert _count(db, Instance) == _count(db, Job) == 3
    assert _count(db, Study) == _count(db, Series) == _count(db, Patient) == 1
