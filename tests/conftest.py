"""Shared fixtures: real databases (a SQLite file and a PostgreSQL database per test), settings with free
ports, and the Flask ``app`` / ``client`` / ``runner`` trio.

Every test that asks for ``database_url`` runs once on SQLite and once on PostgreSQL. The PostgreSQL server
comes from ``FRACTURE_TEST_POSTGRES_URL`` (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/postgres``);
when it cannot be reached those tests are skipped and the run says so at the end, unless
``FRACTURE_REQUIRE_POSTGRES=1`` (set by CI) turns that into a failure.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from config import Settings

PG_ADMIN_URL = os.environ.get(
    "FRACTURE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
_pg_state: dict[str, str | None] = {}


def _postgres_problem() -> str | None:
    """None when the PostgreSQL server is reachable, else why not (checked once per run)."""
    if "problem" not in _pg_state:
        try:
            engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_state["problem"] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "not available"
            _pg_state["problem"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return _pg_state["problem"]


def require_postgres() -> None:
    problem = _postgres_problem()
    if problem is None:
        return
    message = f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).render_as_string()} ({problem})"
    if os.environ.get("FRACTURE_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " and FRACTURE_REQUIRE_POSTGRES=1")
    pytest.skip(message + "; set FRACTURE_TEST_POSTGRES_URL to run the PostgreSQL tests")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    require_postgres()
    name = f"fn_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fracture.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each engine in turn."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings for one test: its own data dir, database and free ports; the database is migrated."""
    from service.db import upgrade

    upgrade(database_url)
    return Settings.from_env(
        {}, data_dir=tmp_path / "var", database_url=database_url, http_port=free_port(),
        dicom_port=free_port(), secret_key="test-secret-key", study_quiet_seconds=0, job_lease_seconds=5,
    )


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from service.app import create_app

    application = create_app(settings)
    application.config["TESTING"] = True
    yield application
    application.extensions["fracture.db"].dispose()


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    problem = _pg_state.get("problem")
    if problem:
        terminalreporter.write_line(
            f"NOTE: PostgreSQL tests were SKIPPED ({problem}). Start PostgreSQL or set "
            "FRACTURE_TEST_POSTGRES_URL=postgresql+psycopg2://user@host:port/postgres to run them.",
            yellow=True,
        )


# ------------------------------------------------------------------ DICOM outputs (SC / SR / delivery)


def make_dx_dataset(study_uid: str | None = None, rows: int = 256, columns: int = 256):  # type: ignore[no-untyped-def]
    """A small, valid Digital X-Ray (For Presentation) dataset with the patient and study modules filled."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "FN-0001", "19800101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC0001", "S1"
    ds.ReferringPhysicianName = "Referrer^Ruth"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Rows, ds.Columns, ds.PatientOrientation = rows, columns, ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[0:rows, 0:columns]
    ds.PixelData = ((xx + yy) * 4 % 4096).astype(np.uint16).tobytes()
    return ds


@pytest.fixture
def dx_source():  # type: ignore[no-untyped-def]
    return make_dx_dataset()


@pytest.fixture
def fracture_findings():  # type: ignore[no-untyped-def]
    from dicom.sr import DetectionCallValues, ImageFindings
    from pipeline.types import ModelIdentity

    models = (ModelIdentity("fn-detector", "1.2.0", "a" * 64, "detect"),  # tasks as the bundles' cards name them
              ModelIdentity("fn-classifier", "1.1.0", "b" * 64, "classify"))
    distribution = {"transverse": 0.05, "oblique": 0.1, "spiral": 0.05, "comminuted": 0.05, "greenstick": 0.4,
                    "hairline": 0.15, "impacted": 0.05, "longitudinal": 0.05, "avulsion": 0.04,
                    "pathological": 0.03, "fracture_dislocation": 0.03}
    return ImageFindings(fracture_probability=0.91, detection_call=DetectionCallValues.FRACTURE,
                         algorithm=models[0], models=models, operating_point=0.5, top_type="greenstick",
                         top_type_probability=0.4, type_distribution=distribution, peak_box=(40, 60, 120, 150))


@pytest.fixture
def device(fracture_findings):  # type: ignore[no-untyped-def]
    from dicom.sr import DeviceIdentity

    return DeviceIdentity(models=fracture_findings.models)


@pytest.fixture
def dciodvfy():  # type: ignore[no-untyped-def]
    """``check(path)``: run dicom3tools' dciodvfy and return its error lines (warnings are logged)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is required in CI")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")

    def check(path: Path) -> list[str]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        for line in lines:
            if line.startswith("Warning"):
                print(f"dciodvfy {path.name}: {line}")
        return [line for line in lines if line.startswith("Error")]

    return check


# ------------------------------------------------------------------------- ingest, jobs and workers


def _bone_pattern(rows: int, cols: int, seed: int):  # type: ignore[no-untyped-def]
    """A radiograph-like 12-bit image: soft tissue, a bright bone shaft with a cortex, a dark gap, noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 600 + 300 * np.exp(-(((x - cols / 2) / (cols / 3)) ** 2))
    shaft = np.abs(x - cols / 2 - 8 * np.sin(y / rows * 3)) < cols / 8
    img[shaft] += 1800
    cortex = shaft & (np.abs(np.abs(x - cols / 2) - cols / 8) < 4)
    img[cortex] += 800
    img[(np.abs(y - rows * (0.4 + 0.2 * rng.random())) < 2) & shaft] -= 1500
    img += rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


@pytest.fixture
def make_dicom(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: write a small DICOM file (DX by default) and return its path.

    ``make_dicom(modality="CR", transfer_syntax=RLELossless, photometric="MONOCHROME1", ...)``; CT/MR get
    their own SOP classes; ``pixel_bytes`` overrides the pixel data (e.g. truncated, for corrupt images).
    """
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    sop_classes = {
        "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1", "CT": "1.2.840.10008.5.1.4.1.1.2",
        "MR": "1.2.840.10008.5.1.4.1.1.4", "IO": "1.2.840.10008.5.1.4.1.1.1.3",
    }
    counter = iter(range(1, 10_000))

    def make(modality: str = "DX", *, rows: int = 256, cols: int = 224, transfer_syntax: str = ExplicitVRLittleEndian,
             photometric: str = "MONOCHROME2", sop_instance_uid: str | None = None,
             study_instance_uid: str | None = None,
             series_instance_uid: str | None = None, bits: int = 16, seed: int | None = None,
             pixel_bytes: bytes | None = None, patient_id: str = "PAT-1", name: str | None = None,
             **attributes: object) -> Path:
        import numpy as np

        n = next(counter)
        pixels = _bone_pattern(rows, cols, n if seed is None else seed)
        if bits == 8:
            pixels = (pixels >> 4).astype(np.uint8)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_classes[modality]
        ds.SOPInstanceUID = sop_instance_uid or generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_instance_uid or generate_uid()
        ds.SeriesInstanceUID = series_instance_uid or generate_uid()
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Test^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "ACC1", ""
        ds.StudyID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "1", modality, 1, n
        ds.BodyPartExamined = "HAND"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, 12 if bits == 16 else 8, 11 if bits == 16 else 7
        ds.PixelRepresentation = 0
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        if pixel_bytes is not None:
            ds.PixelData = pixel_bytes
        else:
            ds.PixelData = pixels.tobytes()
            if UID(transfer_syntax).is_compressed:
                ds.compress(transfer_syntax, pixels)
            else:
                ds.file_meta.TransferSyntaxUID = transfer_syntax
        path = tmp_path / "dicom" / (name or f"{modality.lower()}-{n:04d}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    return make


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real model bundles for worker tests: ``FRACTURE_TEST_MODEL_DIR`` if set, else tiny bundles trained here
    for a few steps on the toy dataset (real networks, real outputs; the validity bundle's operating point is
    set to 0 so that every image passing the rule checks is analysed)."""
    import warnings

    configured = os.environ.get("FRACTURE_TEST_MODEL_DIR")
    if configured:
        return Path(configured)
    from pipeline.models.bundle import read_card, update_card
    from pipeline.training.datasets import load_records, split_records
    from pipeline.training.loop import TrainConfig, train_fracture, train_validity
    from pipeline.training.toydata import write_toy_dataset

    root = tmp_path_factory.mktemp("tiny-models")
    write_toy_dataset(root / "data", count=12, negatives=6)
    train, val = split_records(load_records(root / "data"), 0.25, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training code warnings are the models suite's business
        train_fracture(train, val, TrainConfig(task="fracture", epochs=1, batch_size=4, long_side=128, crop=64,
                                               width=4, max_steps=2, num_workers=0, val_limit=4,
                                               checkpoint_every=1000), root / "models", root / "ckpt-f", show=False)
        train_validity(train, val, TrainConfig(task="validity", epochs=1, batch_size=8, width=4, max_steps=2,
                                               num_workers=0, val_limit=4, checkpoint_every=1000),
                       root / "models" / "validity", root / "ckpt-v", show=False)
    op = read_card(root / "models" / "validity").get("operating_point", {})
    update_card(root / "models" / "validity", operating_point={**op, "threshold": 0.0})
    return root / "models"


@pytest.fixture(scope="session")
def models(model_dir: Path):  # type: ignore[no-untyped-def]
    """The model set, loaded once per test session (as a worker loads it once)."""
    from pipeline.run import load_models

    return load_models(model_dir)


@pytest.fixture
def worker_settings(settings: Settings, model_dir: Path) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, model_dir=model_dir)


@pytest.fixture
def full_disk(settings: Settings):  # type: ignore[no-untyped-def]
    """``settings.storage_dir`` (the store and the incoming folder the listener and uploads write to) on a 1 MB
    tmpfs (needs root; skipped where mounting is not permitted)."""
    import subprocess

    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(settings.storage_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk: {mounted.stderr.strip()}")
    yield settings.storage_dir
    subprocess.run(["umount", "-l", str(settings.storage_dir)], check=False)


@pytest.fixture
def db(settings: Settings):  # type: ignore[no-untyped-def]
    """A :class:`service.db.Database` on the test's (migrated) database."""
    from service.db import Database

    database = Database.from_settings(settings)
    yield database
    database.dispose()


@pytest.fixture
def orthanc(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A running Orthanc (the destination PACS), stopped after the test."""
    from tests.orthanc import OrthancServer, require_orthanc

    require_orthanc()
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


ANALYSIS_MODELS = [{"name": "fn-detector", "version": "1.2.0", "sha256": "a" * 64, "task": "detector"},
                   {"name": "fn-classifier", "version": "1.1.0", "sha256": "b" * 64, "task": "classifier"}]


def add_analysed_image(db, settings: Settings, study_uid: str, *, job_state: str = "done",  # type: ignore[no-untyped-def]
                       radiograph: bool = True) -> str:
    """Ingest a radiograph of ``study_uid`` and record a finished analysis for it, as the worker would;
    return its SOP Instance UID."""
    import cv2
    import numpy as np
    from sqlalchemy import update

    from service.ingest import ingest
    from service.models import AnalysisResult, Job

    source = make_dx_dataset(study_uid=study_uid)
    settings.ensure_dirs()
    path = settings.data_dir / f"{source.SOPInstanceUID}.dcm"
    source.save_as(path, enforce_file_format=True)
    result = ingest(db, settings, path.read_bytes(), calling_ae="MODALITY")
    hybrid = settings.data_dir / f"{source.SOPInstanceUID}.png"
    cv2.imwrite(str(hybrid), np.full((256, 256, 3), 60, np.uint8))
    with db.session() as session:
        session.execute(update(Job).where(Job.id == result.job_pk).values(state=job_state))
        if job_state == "done":
            session.add(AnalysisResult(
                instance_pk=result.instance_pk, job_pk=result.job_pk, is_radiograph=radiograph,
                validity_score=0.99 if radiograph else 0.1, validity_reason="ok",
                fracture_probability=0.83 if radiograph else None, operating_point=0.5,
                detection_call="fracture" if radiograph else None, top_type="spiral" if radiograph else None,
                top_type_probability=0.7, type_distribution={"spiral": 0.7, "oblique": 0.3},
                peak_box=[30, 40, 90, 120], models=ANALYSIS_MODELS, model_name="fn-detector",
                model_version="1.2.0", hybrid_path=str(hybrid) if radiograph else None))
    return str(source.SOPInstanceUID)


# ------------------------------------------------------------------ a Storage SCP peer (pynetdicom)


class StorageSCP:
    """A pynetdicom Storage SCP on loopback that answers every C-STORE with ``status``."""

    def __init__(self, sop_classes: list[str], status: int = 0x0000, ae_title: str = "PACS") -> None:
        import threading

        from pynetdicom import AE, evt

        self.received: list[str] = []
        self.associations = 0
        self.ae_title = ae_title
        self.port = free_port()
        ae = AE(ae_title=ae_title)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class)
        lock = threading.Lock()

        def on_accepted(event: evt.Event) -> None:
            with lock:
                self.associations += 1

        def on_store(event: evt.Event) -> int:
            with lock:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
            return status

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store),
                                                    (evt.EVT_ACCEPTED, on_accepted)])

    @property
    def destination(self):  # type: ignore[no-untyped-def]
        from config.settings import Destination

        return Destination(self.ae_title, "127.0.0.1", self.port)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory():  # type: ignore[no-untyped-def]
    servers: list[StorageSCP] = []

    def make(*args, **kwargs) -> StorageSCP:  # type: ignore[no-untyped-def]
        server = StorageSCP(*args, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    """A small 8-bit grayscale PNG of noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(size: int = 64, **attrs: object) -> bytes:
    """A small DX object (Part 10 bytes) with ``attrs`` set on the dataset."""
    import io

    ds = make_dx_dataset(rows=size, columns=size)
    for key, value in attrs.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
