"""Socket details shared by our DICOM listener and sender."""

from __future__ import annotations

import logging
import socket

from pynetdicom import events

log = logging.getLogger(__name__)


def set_tcp_nodelay(event: events.Event) -> None:
    """``EVT_CONN_OPEN`` handler: switch Nagle's algorithm off on the association's socket.

    pynetdicom leaves Nagle on, which with delayed ACKs caps small DIMSE exchanges on loopback at about
    20 per second.
    """
    transport = event.assoc.dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # the peer may already have gone
        log.debug("could not set TCP_NODELAY: %s", exc)
