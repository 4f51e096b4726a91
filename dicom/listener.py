"""The DICOM listener: Verification (C-ECHO) and Storage SCP, guarded by the calling-AE allow-list.

Handlers are bound as ``(event, handler, [args])`` so they get their dependencies passed in. The C-STORE
handler is thin: it stores the instance, records it and returns a status (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from config import Settings
from dicom.net import set_tcp_nodelay

log = logging.getLogger(__name__)


def _log_request(event: Any, settings: Settings) -> None:
    """``EVT_REQUESTED``: log every association request, and each one the allow-list refuses."""
    calling = event.assoc.requestor.ae_title.strip()
    called = event.assoc.acceptor.ae_title.strip()
    peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
    if settings.allowed_calling_aes and calling not in settings.allowed_calling_aes:
        log.warning("refusing association from %s: calling AE %r is not allowed", peer, calling)
    elif called != settings.ae_title:
        log.warning("refusing association from %s: called AE %r is not %r", peer, called, settings.ae_title)
    else:
        log.info("association request from %s (calling AE %r)", peer, calling)


def _handle_echo(event: Any) -> int:
    return 0x0000


def build_ae(settings: Settings) -> AE:
    """An AE configured from settings: our title, the allow-list and the called-AE check."""
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.maximum_pdu_size = 0  # no limit: large radiographs in few PDUs
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.add_supported_context(Verification)
    return ae


def handlers(settings: Settings) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_REQUESTED, _log_request, [settings]),
        (evt.EVT_C_ECHO, _handle_echo),
    ]


def start_listener(settings: Settings, *, block: bool = False) -> ThreadedAssociationServer | None:
    """Start listening on ``settings.dicom_host:dicom_port``. With ``block=False`` returns the server."""
    ae = build_ae(settings)
    address = (settings.dicom_host, settings.dicom_port)
    log.info("DICOM listener %s on %s:%s", settings.ae_title, *address)
    return ae.start_server(address, block=block, evt_handlers=handlers(settings))
