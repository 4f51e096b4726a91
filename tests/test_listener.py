"""The DICOM listener on loopback: C-ECHO, the calling-AE allow-list, the called-AE check, TCP_NODELAY, and
the Storage SCP (stored once, versions, aborted transfers, full disk, database down, too large)."""

import contextlib
import dataclasses
import socket
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from config import Settings
from dicom.listener import start_listener
from service.db import Database
from service.models import Instance, Job


def _associate(settings: Settings, calling: str = "MODALITY", called: str | None = None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", settings.dicom_port, ae_title=called or settings.ae_title)


def test_echo_and_nodelay(settings: Settings) -> None:
    nodelay: list[int] = []

    def record(event) -> None:  # type: ignore[no-untyped-def]
        sock = event.assoc.dul.socket.socket
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    server = start_listener(settings)
    assert server is not None
    server.bind(evt.EVT_C_ECHO, record)
    try:
        assoc = _associate(settings)
        assert assoc.is_established
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert nodelay and all(nodelay)


def test_allow_list_and_called_ae(settings: Settings) -> None:
    settings = dataclasses.replace(settings, allowed_calling_aes=("GOODMOD",))
    server = start_listener(settings)
    assert server is not None
    try:
        refused = _associate(settings, calling="STRANGER")
        assert refused.is_rejected
        wrong_called = _associate(settings, calling="GOODMOD", called="SOMEONEELSE")
        assert wrong_called.is_rejected
        ok = _associate(settings, calling="GOODMOD")
        assert ok.is_established
        ok.release()
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------- Storage SCP


DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _store_client(settings: Settings, calling: str = "MODALITY"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(DX, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    return ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)


def _counts(db: Database) -> tuple[int, int]:
    with db.session() as session:
        return (int(session.scalar(select(func.count()).select_from(Instance)) or 0),
                int(session.scalar(select(func.count()).select_from(Job)) or 0))


def _stored_files(settings: Settings) -> list[Path]:
    return [p for p in settings.storage_dir.rglob("*") if p.is_file()]


@pytest.fixture
def listener(settings: Settings, db: Database):  # type: ignore[no-untyped-def]
    server = start_listener(settings, db=db)
    assert server is not None
    yield server
    server.shutdown()


def test_c_store_stores_once_and_versions_changes(settings: Settings, db: Database, listener,  # type: ignore[no-untyped-def]
                                                  make_dicom) -> None:
    path = make_dicom("DX", sop_instance_uid="1.2.826.0.1.3680043.10.2.1", seed=1)
    changed = make_dicom("DX", sop_instance_uid="1.2.826.0.1.3680043.10.2.1", seed=2)
    assoc = _store_client(settings)
    assert assoc.is_established
    statuses = [assoc.send_c_store(dcmread(p)).Status for p in (path, path, changed)]
    assoc.release()
    assert statuses == [0x0000, 0x0000, 0x0000]
    assert _counts(db) == (2, 2)
    with db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.version)).all()
    assert [(r.version, r.changed_from_previous, r.calling_ae) for r in rows] == [(1, False, "MODALITY"),
                                                                                (2, True, "MODALITY")]
    assert rows[0].peer_address == "127.0.0.1" and rows[0].transfer_syntax_uid == ExplicitVRLittleEndian
    assert Path(rows[0].file_path).read_bytes()[132:] != b"" and len(_stored_files(settings)) == 2


def test_aborted_association_mid_transfer_stores_nothing(settings: Settings, db: Database, listener,  # type: ignore[no-untyped-def]
                                                         make_dicom) -> None:
    """A transfer cut off half-way: nothing recorded, nothing stored, and the half received to the incoming
    folder is removed when the connection closes."""
    incoming = settings.storage_dir / ".incoming"
    big = make_dicom("DX", rows=1024, cols=1024)
    assoc = _store_client(settings)
    assert assoc.is_established
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    client_socket = transport.socket  # the test's own client end, closed below (pynetdicom may not, after Evt17)
    original_send = transport.send

    def send_half_then_drop(data: bytes) -> None:
        if len(data) < 100_000:
            return original_send(data)
        transport.socket.sendall(data[: len(data) // 2])  # type: ignore[union-attr]
        transport.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        transport.event_queue.put("Evt17")  # what pynetdicom does when the connection drops
        return None

    transport.send = send_half_then_drop  # type: ignore[method-assign]
    with contextlib.suppress(Exception):
        assoc.send_c_store(dcmread(big))
    if assoc.is_established:
        assoc.abort()
    deadline = time.monotonic() + 5
    while listener.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    client_socket.close()  # otherwise its ResourceWarning surfaces, as an error, in whichever test runs next
    assert _counts(db) == (0, 0)
    assert _stored_files(settings) == []
    deadline = time.monotonic() + 5
    while list(incoming.rglob("*.dcm")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(incoming.rglob("*.dcm")) == []
    ok = _store_client(settings)  # the listener is unharmed
    assert ok.send_c_store(dcmread(make_dicom("DX"))).Status == 0x0000
    ok.release()
    assert _counts(db) == (1, 1)


def test_a_deflate_bomb_is_refused_over_c_store(settings: Settings, db: Database, listener,  # type: ignore[no-untyped-def]
                                                make_dicom, tmp_path: Path) -> None:
    """A Deflated Explicit VR Little Endian DX of ~120 kB on the wire that inflates to 120 MB: refused with
    0xA702 and a comment saying why, nothing stored, the listener unharmed (SECURITY.md F2)."""
    from pydicom.tag import Tag
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.conftest import make_dx_dataset

    ds = make_dx_dataset(rows=32, columns=24)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new(Tag(0x0009, 0x0010), "LO", "FUZZ")
    ds.add_new(Tag(0x0009, 0x1000), "OB", bytes(120 * 1024 * 1024))
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    del ds
    assert bomb.stat().st_size < 1_000_000
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX, [DeflatedExplicitVRLittleEndian])
    ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(bomb)  # sent as encoded: the SCU does not inflate it either
    assoc.release()
    assert status.Status == 0xA702 and "deflated" in status.ErrorComment
    assert _counts(db) == (0, 0) and _stored_files(settings) == []
    ok = _store_client(settings)
    assert ok.send_c_store(dcmread(make_dicom("DX"))).Status == 0x0000
    ok.release()
    assert _counts(db) == (1, 1)


def test_too_large_and_database_down_are_out_of_resources(settings: Settings, make_dicom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    small = dataclasses.replace(settings, max_upload_mb=1)
    server = start_listener(small)
    assert server is not None
    try:
        assoc = _store_client(small)
        status = assoc.send_c_store(dcmread(make_dicom("DX", rows=1024, cols=1024)))
        assoc.release()
    finally:
        server.shutdown()
    assert status.Status == 0xA702 and "too large" in status.ErrorComment
    down_url = (f"sqlite:///{tmp_path}" if settings.database_url.startswith("sqlite")
                else "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    down = dataclasses.replace(settings, database_url=down_url)
    server = start_listener(down)
    assert server is not None
    try:
        assoc = _store_client(down)
        status = assoc.send_c_store(dcmread(make_dicom("DX")))
        assoc.release()
    finally:
        server.shutdown()
    assert status.Status == 0xA701 and "database" in status.ErrorComment
    assert _stored_files(settings) == []  # the file written before the database failed was removed


def test_disk_full_is_out_of_resources_never_success(settings: Settings, db: Database, listener, full_disk,  # type: ignore[no-untyped-def]
                                                     make_dicom) -> None:
    assoc = _store_client(settings)
    fits = assoc.send_c_store(dcmread(make_dicom("DX", rows=128, cols=128)))
    too_big = assoc.send_c_store(dcmread(make_dicom("DX", rows=1024, cols=768)))
    assoc.release()
    assert fits.Status == 0x0000
    assert too_big.Status == 0xA700 and "storage full" in too_big.ErrorComment
    assert _counts(db) == (1, 1)
    assert len(_stored_files(settings)) == 1  # no partial file left behind


def test_received_to_disk_or_to_memory_the_stored_bytes_are_the_same(  # type: ignore[no-untyped-def]
        settings: Settings, db: Database, listener, make_dicom, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener receives to disk (dicom/receive.py); an instance received to memory, as before session 24
    (and by the handler's fallback), is byte for byte the same file: re-sent after the change, it is a duplicate
    of what is stored, not a new version."""
    from pynetdicom import _config

    path = make_dicom("DX", rows=300, cols=200)
    for to_disk in (True, False):
        monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", to_disk)
        assoc = _store_client(settings)
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
    with db.session() as session:
        rows = session.scalars(select(Instance)).all()
    assert [(r.version, r.changed_from_previous) for r in rows] == [(1, False)]
    assert _counts(db) == (1, 1) and len(_stored_files(settings)) == 1
