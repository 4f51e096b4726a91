"""C-STORE SCU: send files to one DICOM node over as few associations as possible (PS3.4 B, PS3.7 9.1.1).

Each association turns Nagle off on its socket (``EVT_CONN_OPEN`` -> :func:`dicom.net.set_tcp_nodelay`),
proposes one presentation context per SOP class (the file's own transfer syntax, plus the two little endian
ones when the file is uncompressed, so the SCP can pick), and carries at most ``max_per_association``
objects before it is released and a new one opened. Connection, ACSE, DIMSE and network timeouts are all
bounded, so a node that is down or hangs costs seconds, not minutes. Nothing here raises for a refusal:
every file gets a :class:`StoreOutcome` with the DIMSE status, or the reason there is none.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from config import Destination
from dicom.net import set_tcp_nodelay

log = logging.getLogger(__name__)

#: DIMSE statuses of a C-STORE that mean "stored" (PS3.4 B.2.3): success and the warnings.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: Largest number of presentation contexts an association may propose (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128


def is_permanent_failure(status: int | None) -> bool:
    """True for C-STORE statuses that a retry cannot fix: SOP class refused, not authorised, bad dataset."""
    if status is None:
        return False
    return status in (0x0122, 0x0124) or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one file: the DIMSE status when the peer answered, else an error."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: str | None = None
    #: True when retrying cannot help (SOP class refused, presentation context rejected, bad file).
    permanent: bool = False

    @property
    def stored(self) -> bool:
        return self.status in STORED_STATUSES


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class StoreSCU:
    """Sends files to one destination as ``calling_ae``; see the module docstring."""

    def __init__(self, calling_ae: str, destination: Destination, *, connect_timeout: float = 5.0,
                 acse_timeout: float = 10.0, dimse_timeout: float = 60.0, network_timeout: float = 60.0,
                 max_per_association: int = 200) -> None:
        if max_per_association < 1:
            raise ValueError(f"max_per_association must be at least 1, got {max_per_association}")
        if connect_timeout <= 0 or acse_timeout <= 0 or dimse_timeout <= 0 or network_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.calling_ae = calling_ae
        self.destination = destination
        self.connect_timeout = connect_timeout
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.max_per_association = max_per_association

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.connect_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.maximum_pdu_size = 0
        return ae

    @staticmethod
    def _contexts(items: Sequence[_Item]) -> list[PresentationContext]:
        syntaxes: dict[str, list[str]] = {}
        for item in items:
            wanted = syntaxes.setdefault(item.sop_class_uid, [])
            candidates = [item.transfer_syntax_uid]
            if not UID(item.transfer_syntax_uid).is_compressed:
                candidates += [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            for ts in candidates:
                if ts not in wanted:
                    wanted.append(ts)
        if len(syntaxes) > MAX_CONTEXTS:
            raise ValueError(f"{len(syntaxes)} SOP classes in one batch; at most {MAX_CONTEXTS} fit an association")
        return [build_context(sop_class, ts_list) for sop_class, ts_list in syntaxes.items()]

    @contextmanager
    def _association(self, items: Sequence[_Item]) -> Iterator[Association]:
        dest = self.destination
        assoc = self._ae().associate(dest.host, dest.port, contexts=self._contexts(items), ae_title=dest.ae_title,
                                     evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def send(self, paths: Sequence[Path | str]) -> list[StoreOutcome]:
        """Send every file; return one outcome per file, in order."""
        outcomes: dict[Path, StoreOutcome] = {}
        items: list[_Item] = []
        for raw in paths:
            path = Path(raw)
            try:
                meta = dcmread(path, stop_before_pixels=True)
                items.append(_Item(path, str(meta.SOPClassUID), str(meta.SOPInstanceUID),
                                   str(meta.file_meta.TransferSyntaxUID)))
            except Exception as exc:  # noqa: BLE001 - a missing or broken file is that file's outcome
                outcomes[path] = StoreOutcome(path, None, None, f"cannot read {path}: {exc}", permanent=True)
        for start in range(0, len(items), self.max_per_association):
            for outcome in self._send_chunk(items[start:start + self.max_per_association]):
                outcomes[outcome.path] = outcome
        return [outcomes[Path(p)] for p in paths]

    def _reachable(self) -> str | None:
        """None when the node accepts a TCP connection, else why not.

        Checked before associating: it gives a precise reason for a node that is down, and pynetdicom 3.0
        leaks the socket of a refused connection (its shutdown of the unconnected socket raises before close).
        """
        try:
            with socket.create_connection((self.destination.host, self.destination.port),
                                          timeout=self.connect_timeout):
                return None
        except OSError as exc:
            return f"cannot connect: {exc.strerror or exc}"

    def _send_chunk(self, items: Sequence[_Item]) -> list[StoreOutcome]:
        dest = self.destination
        problem = self._reachable()
        if problem:
            log.warning("C-STORE to %s: %s", dest, problem)
            return [StoreOutcome(i.path, i.sop_instance_uid, None, f"{dest}: {problem}") for i in items]
        with self._association(items) as assoc:
            if not assoc.is_established:
                if assoc.rejected_contexts and not assoc.accepted_contexts:
                    refused = ", ".join(sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts}))
                    log.warning("C-STORE to %s: every presentation context rejected (%s)", dest, refused)
                    return [StoreOutcome(i.path, i.sop_instance_uid, None,
                                         f"{dest} rejected the presentation context for SOP class "
                                         f"{i.sop_class_uid} ({UID(i.sop_class_uid).name})", permanent=True)
                            for i in items]
                if assoc.is_rejected:
                    reason = "association rejected"
                elif assoc.is_aborted:
                    reason = "association aborted (the node may be down or refused us)"
                else:
                    reason = "could not connect"
                log.warning("C-STORE to %s: %s", dest, reason)
                return [StoreOutcome(i.path, i.sop_instance_uid, None, f"{dest}: {reason}") for i in items]
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            accepted_classes = {sop for sop, _ in accepted}
            results = []
            for item in items:
                if item.sop_class_uid not in accepted_classes:
                    results.append(StoreOutcome(item.path, item.sop_instance_uid, None,
                                                f"{dest} rejected the presentation context for SOP class "
                                                f"{item.sop_class_uid} ({UID(item.sop_class_uid).name})",
                                                permanent=True))
                    continue
                results.append(self._store_one(assoc, item))
                if not assoc.is_established:  # aborted mid-way: the rest fail transiently
                    break
            done = {o.path for o in results}
            results += [StoreOutcome(i.path, i.sop_instance_uid, None, f"{dest}: association lost")
                        for i in items if i.path not in done]
            return results

    def _store_one(self, assoc: Association, item: _Item) -> StoreOutcome:
        try:
            dataset = dcmread(item.path)
            status = assoc.send_c_store(dataset)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises for local problems (e.g. no context)
            return StoreOutcome(item.path, item.sop_instance_uid, None, f"C-STORE failed: {exc}")
        if "Status" not in status:
            return StoreOutcome(item.path, item.sop_instance_uid, None,
                                "no C-STORE response (timeout, abort or invalid response)")
        code = int(status.Status)
        if code in STORED_STATUSES:
            return StoreOutcome(item.path, item.sop_instance_uid, code)
        comment = status.get("ErrorComment", "")
        return StoreOutcome(item.path, item.sop_instance_uid, code,
                            f"C-STORE status 0x{code:04X}{': ' + str(comment) if comment else ''}",
                            permanent=is_permanent_failure(code))
