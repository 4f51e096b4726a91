"""The C-STORE SCU: Nagle off, presentation contexts per SOP class, bounded associations, clear outcomes."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from config.settings import Destination
from dicom import sender
from dicom.sc import build_secondary_capture
from dicom.sender import StoreSCU, is_permanent_failure
from tests.conftest import free_port


def _files(tmp_path: Path, source, findings, device, count: int) -> list[Path]:  # type: ignore[no-untyped-def]
    paths = []
    for i in range(count):
        path = tmp_path / f"sc{i}.dcm"
        build_secondary_capture(source, np.zeros((256, 256, 3), np.uint8), findings, device,
                                series_instance_uid=generate_uid(), series_number=1, sop_instance_uid=generate_uid(),
                                instance_number=i + 1).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_sends_with_nodelay_in_bounded_associations(tmp_path: Path, scp_factory, monkeypatch, dx_source,  # type: ignore[no-untyped-def]
                                                    fracture_findings, device) -> None:
    pacs = scp_factory([SecondaryCaptureImageStorage])
    nodelay: list[int] = []
    original = sender.set_tcp_nodelay

    def spy(event):  # type: ignore[no-untyped-def]
        original(event)
        nodelay.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(sender, "set_tcp_nodelay", spy)
    paths = _files(tmp_path, dx_source, fracture_findings, device, 5)
    missing = tmp_path / "missing.dcm"
    outcomes = StoreSCU("FRACTURENODE", pacs.destination, max_per_association=2).send([*paths, missing])
    assert [o.status for o in outcomes[:5]] == [0] * 5 and all(o.stored for o in outcomes[:5])
    assert outcomes[5].permanent and "cannot read" in (outcomes[5].error or "")
    assert pacs.associations == 3  # 2 + 2 + 1
    assert nodelay and all(nodelay)


def test_a_node_that_is_down_costs_a_clear_error(tmp_path: Path, dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    paths = _files(tmp_path, dx_source, fracture_findings, device, 1)
    (outcome,) = StoreSCU("FRACTURENODE", Destination("DOWN", "127.0.0.1", free_port()),
                          connect_timeout=1).send(paths)
    assert outcome.status is None and not outcome.permanent and "cannot connect" in (outcome.error or "")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_per_association"):
        StoreSCU("FN", Destination("X", "127.0.0.1", 104), max_per_association=0)
    with pytest.raises(ValueError, match="timeouts"):
        StoreSCU("FN", Destination("X", "127.0.0.1", 104), connect_timeout=0)


@pytest.mark.parametrize("status, permanent", [(0x0122, True), (0xA900, True), (0xC001, True), (0xA700, False),
                                               (0x0110, False), (None, False)])
def test_permanent_failures(status: int | None, permanent: bool) -> None:
    assert is_permanent_failure(status) is permanent
