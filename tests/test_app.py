"""The application factory: proxy trust decides whether forwarded HTTPS marks the session cookie Secure; a
starting web process removes what a killed one left in the incoming folder."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess

import pytest

from config import Settings
from service.app import create_app
from service.auth import create_user
from service.db import Database

FORWARDED_HTTPS = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}


@pytest.mark.parametrize(("trusted", "secure"), [(0, False), (1, True)])
def test_session_cookie_is_secure_only_behind_a_trusted_tls_proxy(settings: Settings, trusted: int,
                                                                   secure: bool) -> None:
    db = Database.from_settings(settings)
    with db.session() as session:
        create_user(session, "jdoe", "a long enough password")
    app = create_app(dataclasses.replace(settings, trusted_proxies=trusted), db=db)
    app.config["WTF_CSRF_ENABLED"] = False
    response = app.test_client().post("/login", data={"username": "jdoe", "password": "a long enough password"},
                                      headers=FORWARDED_HTTPS)
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert ("Secure" in cookie) is secure
    db.dispose()


def test_a_starting_web_app_removes_uploads_a_killed_web_process_left_half_spooled(settings: Settings) -> None:
    """Uploads are spooled to ``<storage dir>/.incoming/<host>-<pid>/`` (service.ingest.spool_upload); a web
    process killed mid-upload leaves its file there, and the next one removes it at start (dicom.receive.sweep,
    as a starting listener does), leaving a live process's files alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: the killed web process
    incoming = settings.storage_dir / ".incoming"
    left = incoming / f"{socket.gethostname()}-{dead.pid}" / "incoming-upload-abc.dcm"
    live = incoming / f"{socket.gethostname()}-{os.getpid()}" / "incoming-upload-def.dcm"
    for path in (left, live):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the first megabytes of an upload")
    db = Database.from_settings(settings)
    create_app(settings, db=db)
    db.dispose()
    assert not left.exists() and not left.parent.exists()
    assert live.exists()
