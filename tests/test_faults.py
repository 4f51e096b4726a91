"""The fault matrix: the node's parts are killed, its database restarted and its models broken while work is
in flight, and nothing is lost.

Covered elsewhere (not repeated here): worker SIGKILL mid-job (tests/test_worker.py), a client dropping the
association mid-transfer (tests/test_listener.py), disk full during a C-STORE (tests/test_listener.py), the
destination PACS down then back (tests/test_orthanc.py, tests/test_delivery.py).

Here:

- the listener process SIGKILLed mid-association: the sender sees a failure, every instance the database
  records is complete on disk, no temporary file was promoted, and a re-send stores the rest exactly once;
- PostgreSQL restarted while a worker is processing jobs (a private PostgreSQL cluster, so that other test
  runs sharing the machine's server are not disturbed): every job ends ``done`` exactly once;
- a corrupt or missing model bundle at start-up: the worker stops with a clear error and status 2, the listener
  still stores incoming studies, and a worker started with a good bundle processes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from config import Settings
from dicom.image import read_dataset
from service.db import Database, upgrade
from service.ingest import ingest
from service.models import AnalysisResult, Instance, Job
from service.storage import sha256_file
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} (Debian package {package}) is required in CI")
        pytest.skip(f"{tool} not installed (apt-get install {package})")


def node_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a node part started as a subprocess with ``settings``."""
    env = {**os.environ, "FRACTURE_DATA_DIR": str(settings.data_dir), "FRACTURE_DATABASE_URL": settings.database_url,
           "FRACTURE_DICOM_PORT": str(settings.dicom_port), "FRACTURE_HTTP_PORT": str(settings.http_port),
           "FRACTURE_SECRET_KEY": "test-secret-key", "FRACTURE_STUDY_QUIET_SECONDS": "0",
           "FRACTURE_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if settings.model_dir is not None:
        env["FRACTURE_MODEL_DIR"] = str(settings.model_dir)
    env.update(extra)
    return env


def start_part(part: str, env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "service.cli", part, *args], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log_path.read_text()[-4000:]}" if log_path else ""))


def echo_ok(port: int, ae_title: str = "FRACTURENODE") -> bool:
    from pynetdicom import AE

    try:  # pynetdicom leaks its socket when the connection is refused: probe the port first
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def count(db: Database, model: type) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


@contextlib.contextmanager
def stopping(*procs: subprocess.Popen[bytes] | None) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def assert_store_is_whole(settings: Settings, db: Database) -> set[str]:
    """Every recorded instance is complete on disk (right SHA-256, readable to the last pixel); stored files
    are named by their hash; returns the recorded SOP Instance UIDs."""
    with db.session() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.file_path, Instance.sha256,
                                      Instance.size_bytes)).all()
    for uid, path, digest, size in rows:
        assert Path(path).stat().st_size == size and sha256_file(path) == digest, uid
        ds = read_dataset(Path(path).read_bytes())
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2, f"{uid}: pixel data cut short"
    for stored in settings.storage_dir.rglob("*.dcm"):
        # A killed writer may leave a .part file in .tmp, or a listener killed mid-transfer the instance it was
        # receiving in .incoming: neither is ever promoted (the next listener removes the latter).
        if ".tmp" not in stored.parts and ".incoming" not in stored.parts:
            assert stored.name == f"{sha256_file(stored)}.dcm", f"{stored} is not a whole file"
    return {uid for uid, *_ in rows}


# ------------------------------------------------------------------ listener SIGKILL mid-association


@pytest.mark.dcmtk
@pytest.mark.slow
def test_listener_killed_mid_association_records_no_partial_instance(settings: Settings, db: Database,  # type: ignore[no-untyped-def]
                                                                      make_dicom, tmp_path: Path) -> None:
    _need("storescu", "dcmtk")
    first = make_dicom("DX", rows=1536, cols=1536)  # 4.5 MB; 24 of them, so the kill lands mid-association
    files = [first]
    for i in range(23):
        ds = dcmread(first)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.543.{i + 1}"
        files.append(tmp_path / f"copy-{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    sent_uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    log_path = tmp_path / "listener.log"
    env = node_env(settings)
    listener = start_part("listen", env, log_path)
    sender = None
    with stopping(listener):
        wait_for(lambda: echo_ok(settings.dicom_port), 60, "the listener", log_path)
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", settings.ae_title, "-aet", "MODALITY", "-to", "20", "127.0.0.1",
             str(settings.dicom_port), *map(str, files)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with stopping(sender):
            wait_for(lambda: count(db, Instance) >= 1, 60, "the first instance to be stored", log_path)
            listener.send_signal(signal.SIGKILL)
            assert listener.wait(10) == -signal.SIGKILL
            output, _ = sender.communicate(timeout=60)
    assert sender.returncode != 0, output  # the sender knows the association failed
    acknowledged = len(re.findall(r"Received Store Response \(Success\)", output))
    recorded = assert_store_is_whole(settings, db)
    assert recorded <= sent_uids
    assert acknowledged <= len(recorded) < len(files), output  # everything acknowledged was recorded
    assert count(db, Job) == len(recorded)
    # A new listener takes the whole study again: the rest is stored, nothing is stored twice.
    listener = start_part("listen", env, log_path)
    with stopping(listener):
        wait_for(lambda: echo_ok(settings.dicom_port), 60, "the restarted listener", log_path)
        again = subprocess.run(["storescu", "-aec", settings.ae_title, "-aet", "MODALITY", "-to", "20", "127.0.0.1",
                                str(settings.dicom_port), *map(str, files)],
                               env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120)
        listener.send_signal(signal.SIGTERM)
        listener.wait(30)
    assert again.returncode == 0, again.stderr
    assert assert_store_is_whole(settings, db) == sent_uids
    # The killed listener's partial instance went when the new one started; the new one's files went as it answered.
    assert list((settings.storage_dir / ".incoming").rglob("*.dcm")) == []
    assert count(db, Instance) == count(db, Job) == len(files)


# ------------------------------------------------------------------ PostgreSQL restarted under load


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, owned by the ``postgres`` user (root cannot run it)."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not bins:
            pytest.skip("PostgreSQL server binaries not installed")
        self.bin = bins[-1].parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fn-pg-"))
        self.data = self.dir / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.as_postgres, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def restart(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l", str(self.dir / "log"),
                  "-m", "fast", "restart")

    def outage(self, seconds: float) -> None:
        """Stop the server for ``seconds``, then start it again on the same port."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "stop")
        time.sleep(seconds)
        self.start()

    def stop(self) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if shutil.which("runuser") is None and os.geteuid() == 0:
        pytest.skip("runuser is needed to start PostgreSQL as the postgres user")
    server = PrivatePostgres()
    try:
        server.start()
    except AssertionError as exc:
        server.stop()
        if os.environ.get("FRACTURE_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"cannot start a private PostgreSQL cluster: {exc}")
    yield server
    server.stop()


@pytest.mark.postgres
@pytest.mark.slow
def test_postgresql_restart_while_a_worker_runs_loses_and_repeats_nothing(  # type: ignore[no-untyped-def]
        private_postgres: PrivatePostgres, tmp_path: Path, model_dir: Path, make_dicom) -> None:
    upgrade(private_postgres.url)
    settings = Settings.from_env({}, data_dir=tmp_path / "var", database_url=private_postgres.url,
                                 http_port=free_port(), dicom_port=free_port(), secret_key="test-secret-key",
                                 study_quiet_seconds=0, job_lease_seconds=3, model_dir=model_dir)
    settings.ensure_dirs()
    db = Database.from_settings(settings)
    total, later = 16, 4
    try:
        for i in range(total):
            ingest(db, settings, make_dicom("DX", rows=384, cols=384, seed=100 + i).read_bytes(), calling_ae="MOD")
        log_path = tmp_path / "worker.log"
        worker = start_part("work", node_env(settings, FRACTURE_JOB_LEASE_SECONDS="3"), log_path,
                            "--poll-interval", "0.2", "--batch-size", "2")
        with stopping(worker):
            wait_for(lambda: _terminal(db) >= 2, 120, "the first jobs to finish", log_path)
            private_postgres.restart()  # every connection is dropped mid-work
            wait_for(lambda: _terminal(db) == total or worker.poll() is not None, 180, "all jobs to finish",
                     log_path)
            survived_restart = worker.poll() is None
            if survived_restart:  # now an outage of a few seconds while the worker polls an empty queue
                private_postgres.outage(3.0)
                for i in range(later):
                    ingest(db, settings, make_dicom("DX", rows=384, cols=384, seed=200 + i).read_bytes())
                wait_for(lambda: _terminal(db) == total + later or worker.poll() is not None, 180,
                         "the jobs queued after the outage", log_path)
            survived_outage = worker.poll() is None
            worker.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(30)
        log = log_path.read_text()
        assert survived_restart, f"the worker died when PostgreSQL restarted mid-work:\n{log[-3000:]}"
        assert survived_outage, f"the worker died during a 3 s PostgreSQL outage while idle:\n{log[-3000:]}"
        with db.session() as session:
            states = session.scalars(select(Job.state)).all()
            per_job = session.execute(select(AnalysisResult.job_pk, func.count()).group_by(AnalysisResult.job_pk)).all()
        assert sorted(set(states)) == ["done"] and len(states) == total + later, log[-3000:]
        assert len(per_job) == total + later and {n for _, n in per_job} == {1}  # processed once each
    finally:
        db.dispose()


def _terminal(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.state.in_(("done", "rejected", "failed")))) or 0)


# --------------------------------------------------------------------- model bundle corrupt or missing


@pytest.mark.slow
def test_corrupt_or_missing_models_stop_the_worker_clearly_and_studies_wait(  # type: ignore[no-untyped-def]
        settings: Settings, db: Database, model_dir: Path, make_dicom, tmp_path: Path) -> None:
    from pynetdicom import AE

    from dicom.listener import start_listener

    corrupt = tmp_path / "corrupt-models"
    shutil.copytree(model_dir, corrupt)
    weights = corrupt / "detector" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    log_path = tmp_path / "worker.log"
    for bad_dir, expected in ((corrupt, "does not match|corrupt|cannot"), (tmp_path / "no-models", "does not exist")):
        worker = start_part("work", node_env(dataclasses.replace(settings, model_dir=bad_dir)), log_path)
        with stopping(worker):
            assert worker.wait(120) == 2, log_path.read_text()[-3000:]
        assert re.search(r"cannot load the models: .*(" + expected + ")", log_path.read_text()), \
            log_path.read_text()[-3000:]
    # Meanwhile the listener keeps storing studies.
    server = start_listener(settings, db=db)
    assert server is not None
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
        statuses = [assoc.send_c_store(dcmread(make_dicom("DX", seed=50 + i))).Status for i in range(3)]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0, 0, 0]
    with db.session() as session:
        assert session.scalars(select(Job.state)).all() == ["queued"] * 3
    # A good bundle is back: the queued studies are processed.
    worker = start_part("work", node_env(dataclasses.replace(settings, model_dir=model_dir)), log_path,
                        "--exit-when-idle", "--poll-interval", "0.2")
    with stopping(worker):
        assert worker.wait(180) == 0, log_path.read_text()[-3000:]
    with db.session() as session:
        assert sorted(session.scalars(select(Job.state)).all()) == ["done"] * 3, log_path.read_text()[-3000:]
    assert count(db, AnalysisResult) == 3
