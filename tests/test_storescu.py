"""DCMTK's storescu pushes DX/CR files, uncompressed and compressed, to a listener started here; every
instance is stored, hashed and processed by a worker with real models. Also: duplicate sends and a
calling AE title that is not on the allow-list."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import func, select

from config import Settings
from dicom.listener import start_listener
from service.db import Database
from service.models import AnalysisResult, Instance, Job
from service.storage import sha256_file
from service.worker import run_worker

pytestmark = pytest.mark.dcmtk


@pytest.fixture(autouse=True)
def _need_dcmtk() -> None:
    for tool in ("storescu", "dcmcjpeg", "dcmcjpls", "dcmcrle"):
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} (Debian package dcmtk) is required in CI")
            pytest.skip(f"{tool} not installed (apt-get install dcmtk)")


def _dcmtk(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


#: storescu proposes uncompressed transfer syntaxes unless told which compressed one to propose.
PROPOSE = {JPEGLosslessSV1: "-xs", JPEGBaseline8Bit: "-xy", JPEGExtended12Bit: "-xx", JPEGLSLossless: "-xt",
           RLELossless: "-xr", JPEG2000Lossless: "-xv"}


def _storescu(settings: Settings, files: list[Path],
              calling: str = "MODALITY") -> list[subprocess.CompletedProcess[str]]:
    """One storescu run per transfer syntax (each proposes the files' own transfer syntax)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(PROPOSE.get(syntax, "-x="), []).append(path)
    return [subprocess.run(["storescu", option, "-aec", settings.ae_title, "-aet", calling, "-to", "30", "127.0.0.1",
                            str(settings.dicom_port), *map(str, group)],
                           env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120)
            for option, group in groups.items()]


def _count(db: Database, model: type) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_storescu_push_is_stored_hashed_and_processed(worker_settings: Settings, db: Database, models,  # type: ignore[no-untyped-def]
                                                      make_dicom, tmp_path: Path) -> None:
    settings = dataclasses.replace(worker_settings, allowed_calling_aes=("MODALITY",))
    out = tmp_path / "compressed"
    out.mkdir()
    files = [make_dicom("DX"), make_dicom("CR", photometric="MONOCHROME1", transfer_syntax="1.2.840.10008.1.2")]
    for flag, name in (("+e1", "jpeg-lossless"), ("+ee", "jpeg-extended")):
        _dcmtk("dcmcjpeg", flag, str(make_dicom("DX")), str(out / f"{name}.dcm"))
    _dcmtk("dcmcjpeg", "+eb", str(make_dicom("DX", bits=8)), str(out / "jpeg-baseline.dcm"))
    _dcmtk("dcmcjpls", str(make_dicom("CR")), str(out / "jpeg-ls.dcm"))
    _dcmtk("dcmcrle", str(make_dicom("DX")), str(out / "rle.dcm"))
    files += sorted(out.iterdir()) + [make_dicom("DX", transfer_syntax=JPEG2000Lossless)]
    syntaxes = {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert syntaxes >= {JPEGLosslessSV1, JPEGExtended12Bit, JPEGBaseline8Bit, JPEGLSLossless, RLELossless,
                        JPEG2000Lossless}
    server = start_listener(settings, db=db)
    assert server is not None
    try:
        for sent in _storescu(settings, files):
            assert sent.returncode == 0, sent.stderr
        for again in _storescu(settings, files):  # the whole study sent twice: stored once, processed once
            assert again.returncode == 0, again.stderr
        (refused,) = _storescu(settings, files[:1], calling="STRANGER")
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    finally:
        server.shutdown()
    assert _count(db, Instance) == _count(db, Job) == len(files)
    with db.session() as session:
        instances = session.scalars(select(Instance)).all()
    assert {i.transfer_syntax_uid for i in instances} == syntaxes
    for instance in instances:
        assert sha256_file(instance.file_path) == instance.sha256 and instance.calling_ae == "MODALITY"
    assert run_worker(settings, threading.Event(), db=db, models=models, exit_when_idle=True) == len(files)
    with db.session() as session:
        states = dict(session.execute(select(Job.instance_pk, Job.state)).all())
        reasons = [j.reason for j in session.scalars(select(Job).where(Job.state != "done"))]
        assert set(states.values()) == {"done"}, reasons
        assert session.scalar(select(func.count()).select_from(AnalysisResult)) == len(files)
