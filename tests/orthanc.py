"""Orthanc as the destination PACS in tests: a plain process with a JSON config on loopback ports.

The Debian package's default configuration loads plugins from /usr/share/orthanc/plugins; ours names none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from config.settings import Destination
from tests.conftest import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def require_orthanc() -> None:
    if not Path(ORTHANC).exists():
        if os.environ.get("CI"):
            pytest.fail("Orthanc (Debian package orthanc) is required in CI")
        pytest.skip("Orthanc not installed (apt-get install orthanc)")


class OrthancServer:
    """One Orthanc on loopback, restartable on the same ports and storage."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC") -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "FractureNode test PACS", "DicomAet": ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": False,
            "DicomModalities": {}, "Plugins": [], "HttpServerEnabled": True, "DicomServerEnabled": True,
            "ConcurrentJobs": 1, "StorageCompression": False, "DicomScpTimeout": 10,
        }))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> Destination:
        return Destination(self.ae_title, "127.0.0.1", self.dicom_port)

    def start(self, timeout: float = 30) -> None:
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "TCP_NODELAY": "1"}, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer on its HTTP port")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        response = requests.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def file(self, instance_id: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=10)
        response.raise_for_status()
        return response.content
