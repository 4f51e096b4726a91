"""The DICOM listener on loopback: C-ECHO, the calling-AE allow-list, the called-AE check, TCP_NODELAY."""

import dataclasses
import socket

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config import Settings
from dicom.listener import start_listener


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
