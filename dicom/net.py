"""Socket details shared by our DICOM listener and sender."""

from __future__ import annotations

import logging
import socket

from pynetdicom import events
from pynetdicom.transport import AssociationSocket

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


class _FastAssociationSocket(AssociationSocket):
    """pynetdicom's :class:`AssociationSocket` with a faster :meth:`recv`.

    pynetdicom reads a PDU in 4 kB ``recv`` calls, each appended to a growing ``bytearray``: about 1,600 calls
    and as many reallocations for a 6 MB radiograph. This reads straight into a buffer of the PDU's size with
    ``recv_into`` (as many calls as the kernel needs, typically a few per 128 kB PDU). Same contract: blocks
    until ``nr_bytes`` are read and returns what was read when the peer closes early.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        try:
            while read < nr_bytes:
                count = sock.recv_into(view[read:], nr_bytes - read)
                if not count:  # the peer closed the connection: return what we have
                    break
                read += count
        finally:
            view.release()
        if read < nr_bytes:
            del buffer[read:]
        return buffer


def use_fast_recv(event: events.Event) -> None:
    """``EVT_CONN_OPEN`` handler (acceptor side): give the association's socket :class:`_FastAssociationSocket`'s
    ``recv``. The socket object stays the one pynetdicom made (same state); only its class changes."""
    transport = event.assoc.dul.socket
    if type(transport) is AssociationSocket:
        transport.__class__ = _FastAssociationSocket
