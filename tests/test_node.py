"""`fracture-node run` as a user starts it: a real process tree, a real HTTP port, DCMTK's echoscu."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "fracture-node run exited early"
        try:
            return requests.get(url, timeout=2)
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or its worker still booting
            time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


@pytest.mark.dcmtk
def test_run_serves_http_and_dicom_echo_and_stops_cleanly(tmp_path: Path) -> None:
    if shutil.which("echoscu") is None:
        if os.environ.get("CI"):
            pytest.fail("echoscu (Debian package dcmtk) is required in CI")
        pytest.skip("echoscu not installed (apt-get install dcmtk)")
    http_port, dicom_port = free_port(), free_port()
    env = {**os.environ, "FRACTURE_DATA_DIR": str(tmp_path / "var"), "FRACTURE_HTTP_PORT": str(http_port),
           "FRACTURE_DICOM_PORT": str(dicom_port), "FRACTURE_WORKERS": "0",
           "FRACTURE_ADMIN_PASSWORD": "first admin password"}
    env.pop("FRACTURE_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        response = _wait_http(f"http://127.0.0.1:{http_port}/healthz", proc)
        assert response.json()["status"] == "ok"
        deadline = time.monotonic() + 30
        while True:
            echo = subprocess.run(["echoscu", "-aec", "FRACTURENODE", "127.0.0.1", str(dicom_port)],
                                  env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True)
            if echo.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert echo.returncode == 0, echo.stderr
        assert (tmp_path / "var" / "fracture.db").exists()
        # The supervisor lives as long as the node: migration and the first admin ran in a child, so it holds
        # neither the database layer nor the password hasher (issue #9's memory budget).
        mapped = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "sqlalchemy" not in mapped and "argon2" not in mapped
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output.decode()
    text = output.decode()
    assert "created first admin user 'admin'" in text
    assert "first admin password" not in text
    assert "stopping" in text
    # every child is gone: the ports are free again
    for port in (http_port, dicom_port):
        import socket

        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
