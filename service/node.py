"""Running the node: first-start bootstrap, the process supervisor behind ``fracture-node run``, and the
blocking entry points of the web server and the DICOM listener."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

from config import Settings

log = logging.getLogger(__name__)

#: Exit status of a part that must not be restarted (bad configuration, part not built).
EXIT_PERMANENT = 2


def bootstrap(settings: Settings) -> None:
    """On a new database, create the first admin: password from FRACTURE_ADMIN_PASSWORD or printed once."""
    from sqlalchemy import func, select

    from service.audit import audit
    from service.auth import create_user, generate_password
    from service.db import Database
    from service.models import User

    database = Database.from_settings(settings)
    try:
        with database.session() as session:
            if session.scalar(select(func.count()).select_from(User)):
                return
            password = os.environ.get("FRACTURE_ADMIN_PASSWORD") or generate_password()
            create_user(session, "admin", password, role="admin", display_name="Administrator")
            audit(session, actor_type="system", actor="bootstrap", action="user.create", object_type="user",
                  object_id="admin", detail={"role": "admin"})
        if "FRACTURE_ADMIN_PASSWORD" in os.environ:
            print("created first admin user 'admin' (password from FRACTURE_ADMIN_PASSWORD)", flush=True)
        else:
            print(f"created first admin user 'admin' with password (shown once): {password}", flush=True)
    finally:
        database.dispose()


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        self.event.set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


def supervise(parts: list[str], *, grace_seconds: float = 30.0) -> int:
    """Run each part (``web``, ``listen``, ``work``) as a child process until SIGINT/SIGTERM.

    A part that dies unexpectedly is restarted with exponential backoff; one that exits with status 2
    (bad configuration, not built) is not. On stop, children get SIGTERM, then SIGKILL after the grace.
    """
    stop = _Stop()
    stop.install()
    children: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
    backoff: dict[int, float] = {}
    restart_at: dict[int, float] = {}

    def start(slot: int) -> None:
        part = parts[slot]
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", part])
        children[slot] = (part, proc)
        log.info("started %s (pid %s)", part, proc.pid)

    for slot in range(len(parts)):
        start(slot)
    if not parts:
        log.error("nothing to run")
        return 1
    while not stop.event.wait(0.5):
        now = time.monotonic()
        for slot, (part, proc) in list(children.items()):
            code = proc.poll()
            if code is None:
                continue
            del children[slot]
            if code == EXIT_PERMANENT:
                log.error("%s exited with status %s and will not be restarted", part, code)
                continue
            delay = min(backoff.get(slot, 0.5) * 2, 30.0)
            backoff[slot] = delay
            restart_at[slot] = now + delay
            log.error("%s (pid %s) exited with status %s; restarting in %.0f s", part, proc.pid, code, delay)
        for slot, when in list(restart_at.items()):
            if now >= when:
                del restart_at[slot]
                start(slot)
        if not children and not restart_at:
            log.error("no part of the node is running; stopping")
            return 1
    log.info("stopping (signal %s)", stop.signum)
    for _part, proc in children.values():
        proc.terminate()
    deadline = time.monotonic() + grace_seconds
    for part, proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", part, grace_seconds)
            proc.kill()
            proc.wait()
    return 0


def serve_web(settings: Settings, *, threads: int = 8) -> None:
    """Serve the Flask app with gunicorn (one worker process, ``threads`` request threads).

    The app is built in gunicorn's worker, after the fork, not in its master: the master only supervises the
    worker, and would otherwise hold its own copy of Flask, the portal, pydicom and the database layer (about
    100 MB resident in both processes: CPython's reference counting writes to the pages of every object it
    touches, so copy-on-write does not keep them shared for long)."""
    from gunicorn.app.base import BaseApplication

    from service.malloc import tune_malloc

    tune_malloc()  # in the master before the fork, so in gunicorn's worker too: uploads go back once stored

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.http_host}:{settings.http_port}")
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 20)
            self.cfg.set("accesslog", "-")
            self.cfg.set("limit_request_line", 8190)

        def load(self) -> Any:
            from service.app import create_app

            return create_app(settings)

    log.info("web portal and API on http://%s:%s", settings.http_host, settings.http_port)
    _Gunicorn().run()


def serve_dicom(settings: Settings) -> None:
    """Run the DICOM listener until SIGINT/SIGTERM."""
    from dicom.listener import start_listener
    from service.malloc import tune_malloc

    tune_malloc()  # before the association threads: received instances go back to the system once stored
    stop = _Stop()
    stop.install()
    server = start_listener(settings, block=False)
    assert server is not None
    try:
        stop.event.wait()
    finally:
        log.info("DICOM listener stopping")
        server.shutdown()
