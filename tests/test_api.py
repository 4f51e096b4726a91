"""The /api/v1 REST API against a real database: auth, scoping, submission, idempotency, listing, downloads,
feedback, models, rate limiting, STOW-RS and every error status, each in the one error shape."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from service.auth import create_api_key, create_user, revoke_api_key
from service.db import Database
from service.models import (
    AnalysisResult,
    ApiKey,
    Artifact,
    AuditEntry,
    Delivery,
    Feedback,
    IdempotencyKey,
    Instance,
    Job,
    JobEvent,
    Study,
    User,
    utcnow,
)
from tests.conftest import dicom_bytes, png_bytes

TYPES = ("transverse", "oblique", "spiral", "comminuted", "greenstick", "hairline", "impacted", "longitudinal",
         "avulsion", "pathological", "fracture_dislocation")




def _read(response: Any) -> Any:
    """Buffer the body and close the response (a streamed file would otherwise stay open), and the request's
    body: Werkzeug's test client keeps one over 500 kB in a temporary file and closes it only when it follows
    redirects (``werkzeug.test.Client.open``)."""
    response.get_data()
    response.close()
    response.request.input_stream.close()
    return response


@dataclass
class Api:
    """A test client with one API key per user (admin, ruth and bob are clinicians... see the fixture)."""

    client: Any
    db: Database
    keys: dict[str, str]
    users: dict[str, int]
    tmp: Path
    prefixes: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return {**out, **(extra or {})}

    def get(self, path: str, who: str | None = "admin", **kw: Any) -> Any:
        return _read(self.client.get(path, headers=self.headers(who, kw.pop("headers", None)), **kw))

    def post(self, path: str, who: str | None = "admin", **kw: Any) -> Any:
        return _read(self.client.post(path, headers=self.headers(who, kw.pop("headers", None)), **kw))

    def submit(self, who: str = "admin", files: list[tuple[bytes, str, str]] | None = None,
               headers: dict[str, str] | None = None, **form: str) -> Any:
        files = files if files is not None else [(png_bytes(), "x.png", "image/png")]
        data: dict[str, Any] = {"file": [(io.BytesIO(b), name, ctype) for b, name, ctype in files], **form}
        return self.post("/api/v1/studies", who, data=data, content_type="multipart/form-data", headers=headers)

    def finish(self, instance_id: int, *, call: str = "fracture", probability: float = 0.9,
               outputs: bool = True) -> int:
        """What a worker and the reporter would leave behind: a done job, a result, PNGs, SC and SR."""
        now = utcnow()
        with self.db.session() as s:
            job = s.scalars(select(Job).where(Job.instance_pk == instance_id).order_by(Job.id.desc())).first()
            job.state, job.started_at, job.finished_at, job.attempts = "done", now, now + dt.timedelta(seconds=2), 1
            s.add_all([JobEvent(job_pk=job.id, state="processing", at=now),
                       JobEvent(job_pk=job.id, state="done", at=now)])
            paths = {}
            for kind in ("heatmap", "edges", "hybrid"):
                paths[kind] = self.tmp / f"{instance_id}-{kind}.png"
                paths[kind].write_bytes(png_bytes(16, seed=instance_id))
            distribution = {t: 0.01 for t in TYPES} | {"greenstick": 0.9}
            result = AnalysisResult(
                instance_pk=instance_id, job_pk=job.id, is_radiograph=True, validity_score=0.98,
                validity_reason="radiograph", fracture_probability=probability, operating_point=0.5,
                detection_call=call, top_type="greenstick", top_type_probability=0.9,
                type_distribution=distribution, peak_box=[1, 2, 10, 12],
                models=[{"name": "fn-detector", "version": "1.0.0", "sha256": "a" * 64, "task": "detect"}],
                model_name="fn-detector", model_version="1.0.0",
                **({f"{k}_path": str(v) for k, v in paths.items()} if outputs else {}))
            s.add(result)
            instance = s.get(Instance, instance_id)
            if outputs:
                from service.models import Series

                study_pk = s.get(Series, instance.series_pk).study_pk
                for kind in ("sc", "sr"):
                    path = self.tmp / f"{instance_id}-{kind}.dcm"
                    path.write_bytes(Path(instance.file_path).read_bytes())
                    artifact = Artifact(study_pk=study_pk, instance_pk=instance_id if kind == "sc" else None,
                                        kind=kind, sop_instance_uid=f"2.25.{instance_id}{1 + (kind == 'sr')}",
                                        file_path=str(path), sha256="0" * 64)
                    s.add(artifact)
                    s.flush()
                    s.add(Delivery(artifact_pk=artifact.id, destination="PACS@127.0.0.1:4242", state="failed",
                                   attempts=8, last_error="association rejected"))
            s.flush()
            return result.id


@pytest.fixture
def api(app, tmp_path):  # type: ignore[no-untyped-def]
    app.config["API_RATE_LIMIT_BURST"] = 100_000
    db: Database = app.extensions["fracture.db"]
    keys, users = {}, {}
    with db.session() as s:
        for name, role, referring in (("admin", "admin", None), ("ruth", "clinician", "Referrer^Ruth"),
                                      ("bob", "clinician", "Other^Bob"), ("ris", "service", None)):
            user = create_user(s, name, None, role=role, referring_physician_name=referring)
            key, plaintext = create_api_key(s, user, f"{name} key")
            keys[name], users[name] = plaintext, user.id
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    return Api(app.test_client(), db, keys, users, out_dir)


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    if code:
        assert body["error"]["code"] == code
    return body["error"]


# ---------------------------------------------------------------------------------------------- auth


def test_auth_is_required_and_checked(api, app):  # type: ignore[no-untyped-def]
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
                    {"Authorization": "Bearer fn_nope_nope"}, {"Authorization": api.keys["ruth"] + "x"}):
        response = api.client.get("/api/v1/studies", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # A key that works records its last use.
    assert api.get("/api/v1/studies", "ruth").status_code == 200
    with api.db.session() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.user_id == api.users["ruth"]))
        assert key.last_used_at is not None
        prefix = key.prefix
        revoke_api_key(s, prefix)
    assert_error(api.get("/api/v1/studies", "ruth"), 401)
    with api.db.session() as s:
        s.get(User, api.users["bob"]).is_active = False
    assert_error(api.get("/api/v1/studies", "bob"), 401)


def test_portal_session_cookie_never_authorises(api):  # type: ignore[no-untyped-def]
    with api.client.session_transaction() as session:
        session["_user_id"] = str(api.users["admin"])
        session["user_id"] = api.users["admin"]
        session["_fresh"] = True
    assert_error(api.client.get("/api/v1/studies"), 401)
    assert_error(api.client.post("/api/v1/studies", data={"file": (io.BytesIO(png_bytes()), "a.png")}), 401)


# --------------------------------------------------------------------------------- submit, poll, results


def test_submit_png_then_poll_for_the_result(api):  # type: ignore[no-untyped-def]
    response = api.submit("ruth", patient_id="PAT-7", patient_name="Doe^Jane")
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    (item,) = body["items"]
    assert response.headers["Location"] == f"/api/v1/studies/{item['study_id']}" == body["location"]
    assert body["study_ids"] == [item["study_id"]] and body["job_ids"] == [item["job_id"]]
    assert item["duplicate"] is False and item["filename"] == "x.png"

    study = api.get(item["status_url"], "ruth").get_json()
    assert study["status"] == "processing" and study["result"] is None
    assert study["patient"]["patient_id"] == "PAT-7" and study["source"] == "api"
    (instance,) = study["instances"]
    assert instance["job"]["state"] == "queued"
    assert [e["state"] for e in instance["job"]["timeline"]] == ["received", "queued"]
    assert instance["result"] is None and set(instance["links"]) == {"original"}
    job = api.get(f"/api/v1/jobs/{item['job_id']}", "ruth").get_json()
    assert job["state"] == "queued" and job["study_id"] == item["study_id"]

    base = f"/api/v1/studies/{item['study_id']}/instances/{item['instance_id']}"
    original = api.get(f"{base}/original", "ruth")
    assert original.status_code == 200 and original.mimetype == "application/dicom"
    assert original.data[128:132] == b"DICM"
    for name in ("heatmap.png", "hybrid.png", "edges.png", "sc.dcm"):
        assert_error(api.get(f"{base}/{name}", "ruth"), 404, "not_found")
    assert_error(api.get(f"/api/v1/studies/{item['study_id']}/sr.dcm", "ruth"), 404)

    api.finish(item["instance_id"], call="indeterminate", probability=0.52)
    study = api.get(item["status_url"], "ruth").get_json()
    assert study["status"] == "done" and study["result"] == "indeterminate"
    result = study["instances"][0]["result"]
    assert result["validity"] == {"is_radiograph": True, "score": 0.98, "reason": "radiograph"}
    assert result["fracture_probability"] == 0.52 and result["operating_point"] == 0.5
    assert result["call"] == "indeterminate" and result["peak_box"] == [1, 2, 10, 12]
    assert result["type_distribution"]["greenstick"] == 0.9 and result["top_type"] == "greenstick"
    assert result["model"] == {"name": "fn-detector", "version": "1.0.0"}
    assert "Not for diagnostic use" in result["disclaimer"] and result["created_at"].endswith("Z")
    assert study["artifacts"][0]["deliveries"][0]["state"] == "failed"
    links = study["instances"][0]["links"]
    assert set(links) == {"original", "heatmap", "hybrid", "edges", "sc", "feedback"}
    for name, mimetype in (("heatmap", "image/png"), ("hybrid", "image/png"), ("sc", "application/dicom")):
        download = api.get(links[name], "ruth")
        assert download.status_code == 200 and download.mimetype == mimetype
    sr = api.get(study["links"]["sr"], "ruth")
    assert sr.status_code == 200 and sr.mimetype == "application/dicom"

    with api.db.session() as s:
        actions = set(s.scalars(select(AuditEntry.action).where(AuditEntry.actor_type == "api_key")))
        assert {"study.read", "download.original", "download.heatmap", "download.sr", "job.read"} <= actions
        read = s.scalars(select(AuditEntry).where(AuditEntry.action == "study.read")).first()
        assert read.patient_id == "PAT-7" and api.keys["ruth"].startswith(f"fn_{read.actor}_")


def test_dicom_resubmission_is_a_duplicate(api, monkeypatch):  # type: ignore[no-untyped-def]
    data = dicom_bytes()
    first = api.submit("ris", files=[(data, "a.dcm", "application/dicom")]).get_json()["items"][0]
    monkeypatch.setattr("service.api.routes.BUFFER_LIMIT", 0)  # large files are streamed
    original = api.get(f"/api/v1/studies/{first['study_id']}/instances/{first['instance_id']}/original", "ris")
    assert original.status_code == 200 and original.data == data
    assert original.headers["Content-Disposition"].startswith("attachment")
    again = api.submit("ris", files=[(data, "a.dcm", "application/octet-stream")])
    assert again.status_code == 202
    second = again.get_json()["items"][0]
    assert second["duplicate"] is True and second["instance_id"] == first["instance_id"]
    assert second["job_id"] == first["job_id"]


def test_several_files_in_one_request(api):  # type: ignore[no-untyped-def]
    uid = "1.2.826.0.1.3680043.8.498.42"
    files = [(dicom_bytes(StudyInstanceUID=uid), "a.dcm", "application/dicom"),
             (dicom_bytes(StudyInstanceUID=uid), "b.dcm", "application/dicom"),
             (png_bytes(seed=3), "c.png", "image/png")]
    body = api.submit("ris", files=files).get_json()
    assert len(body["items"]) == 3 and len(body["job_ids"]) == 3
    assert len(body["study_ids"]) == 2  # the two DICOM files share a study; the PNG gets its own
    assert api.get(f"/api/v1/studies/{body['study_ids'][0]}", "ris").get_json()["instance_count"] == 2


def test_idempotency_key(api):  # type: ignore[no-untyped-def]
    headers = {"Idempotency-Key": "order-123"}
    first = api.submit("ruth", headers=headers)
    second = api.submit("ruth", headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.get_json() == second.get_json() and second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == first.headers["Location"]
    with api.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 1
    assert_error(api.submit("ruth", files=[(png_bytes(seed=9), "x.png", "image/png")], headers=headers), 409,
                 "idempotency_key_reused")
    # Keys are per API key: another key may use the same value.
    assert api.submit("bob", headers=headers).status_code == 202
    # A failed request does not keep its key.
    bad = {"Idempotency-Key": "bad-1"}
    assert_error(api.submit("ruth", files=[(b"hello", "x.txt", "text/plain")], headers=bad), 415)
    assert api.submit("ruth", headers=bad).status_code == 202
    assert_error(api.submit("ruth", headers={"Idempotency-Key": "x" * 200}), 400, "invalid_idempotency_key")
    # A claim whose request is still running is 409; one left by a dead process is taken over.
    from service.api import idempotency
    from service.errors import Conflict

    prefix = api.keys["ruth"].split("_")[1]
    with api.db.session() as s:
        s.add(IdempotencyKey(owner=prefix, key="running", request_hash="h", status_code=0, response={}))
    with pytest.raises(Conflict) as caught:
        idempotency.begin(api.db, prefix, "running", "h")
    assert caught.value.code == "idempotency_key_in_use"
    with api.db.session() as s:
        row = s.scalars(select(IdempotencyKey).where(IdempotencyKey.key == "running")).one()
        row.created_at = utcnow() - dt.timedelta(hours=1)
    assert idempotency.begin(api.db, prefix, "running", "h") is None
    with api.db.session() as s:
        assert s.scalar(select(func.count()).select_from(IdempotencyKey)) == 4


def test_submit_errors(api, app):  # type: ignore[no-untyped-def]
    assert_error(api.post("/api/v1/studies", "ruth", data=png_bytes(), content_type="image/png"), 415)
    assert_error(api.post("/api/v1/studies", "ruth", data={"note": "x"}, content_type="multipart/form-data"),
                 422, "no_file")
    assert_error(api.submit("ruth", files=[(b"just text", "a.txt", "text/plain")]), 415)
    assert_error(api.submit("ruth", files=[(b"just text", "a.png", "image/png")]), 415)
    assert_error(api.submit("ruth", files=[(png_bytes(), "a.jpg", "image/jpeg")]), 415)
    assert_error(api.submit("ruth", files=[(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "a.png", "image/png")]), 422)
    assert_error(api.submit("ruth", files=[(b"\0" * 128 + b"DICM" + b"\0" * 16, "a.dcm", "application/dicom")]),
                 422)
    assert_error(api.submit("ruth", patient_id="x" * 65), 422, "invalid_field")
    # One bad file refuses the whole request before anything is stored.
    assert_error(api.submit("ruth", files=[(png_bytes(), "a.png", "image/png"), (b"no", "b.txt", "text/plain")]),
                 415)
    with api.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    app.config["MAX_CONTENT_LENGTH"] = 1000
    error = assert_error(api.submit("ruth", files=[(png_bytes(100), "big.png", "image/png")]), 413)
    assert error["code"] == "payload_too_large"


# ------------------------------------------------------------------------- uploads go to disk, not memory


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _incoming(app: Any) -> list[Path]:
    """What is left in the incoming folder, where uploads are spooled (and the listener receives)."""
    return _files_under(app.extensions["fracture.settings"].storage_dir / ".incoming")


def _instance_count(api: Api) -> int:
    with api.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)))


def test_a_large_dicom_upload_is_stored_byte_identical_and_its_spooled_copy_removed(api, app):  # type: ignore[no-untyped-def]
    """A DICOM upload of several MB (several 1 MiB pieces) goes to disk and through ingest_file: the store holds
    the bytes sent, nothing stays in the incoming folder, and the same bytes taken in memory (``ingest``, the
    path every upload took before) are a duplicate of it, not a new version."""
    from service.ingest import ingest

    data = dicom_bytes(1800)  # 6.5 MB
    assert len(data) > 6 * 1024 * 1024
    item = api.submit("ris", files=[(data, "big.dcm", "application/dicom")]).get_json()["items"][0]
    assert item["duplicate"] is False
    with api.db.session() as s:
        instance = s.get(Instance, item["instance_id"])
        path, size, sha256 = Path(instance.file_path), instance.size_bytes, instance.sha256
    assert path.read_bytes() == data and size == len(data) and sha256 == hashlib.sha256(data).hexdigest()
    assert _incoming(app) == []
    settings = app.extensions["fracture.settings"]
    assert _files_under(settings.storage_dir) == [path]  # nothing but the stored instance
    in_memory = ingest(api.db, settings, data, source="api")
    assert in_memory.duplicate is True and in_memory.instance_pk == item["instance_id"]
    again = api.submit("ris", files=[(data, "big.dcm", "application/octet-stream")]).get_json()["items"][0]
    assert again["duplicate"] is True and again["instance_id"] == item["instance_id"]
    assert _incoming(app) == []


def test_an_upload_over_the_limit_is_413_and_leaves_no_file(api, app, settings):  # type: ignore[no-untyped-def]
    """The size limit holds while an upload is copied to disk (behind Werkzeug's own limit on the whole
    request, lifted here so that the copy's is the one that bites): 413 with the ingest message, nothing stored,
    and no spooled file left, also of the request's first part, which fitted."""
    app.extensions["fracture.settings"] = dataclasses.replace(settings, max_upload_mb=1)
    app.config["MAX_CONTENT_LENGTH"] = None
    fits, too_big = dicom_bytes(256), dicom_bytes(1024)  # 0.13 MB, 2 MB
    error = assert_error(api.submit("ris", files=[(fits, "a.dcm", "application/dicom"),
                                                  (too_big, "b.dcm", "application/dicom")]), 413,
                         "payload_too_large")
    assert error["message"] == "upload exceeds the 1 MB limit"
    assert _instance_count(api) == 0 and _incoming(app) == []
    assert _files_under(settings.storage_dir) == []
    # With Werkzeug's limit on the request back (as the app sets it), the same upload is 413 before any copy.
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    assert_error(api.submit("ris", files=[(too_big, "b.dcm", "application/dicom")]), 413, "payload_too_large")
    assert _instance_count(api) == 0 and _incoming(app) == []
    assert api.submit("ris", files=[(fits, "a.dcm", "application/dicom")]).status_code == 202


def test_one_bad_part_refuses_the_request_and_leaves_nothing_behind(api, app, settings):  # type: ignore[no-untyped-def]
    """A multi-file request with one part that is not DICOM/PNG/JPEG stores none of them (the precheck), and
    the parts already copied to disk are removed."""
    files = [(dicom_bytes(1024), "a.dcm", "application/dicom"), (png_bytes(seed=4), "b.png", "image/png"),
             (b"%PDF-1.7 not an image", "c.pdf", "application/octet-stream"),
             (dicom_bytes(512), "d.dcm", "application/dicom")]
    error = assert_error(api.submit("ris", files=files), 415, "unsupported_media_type")
    assert error["details"] == {"filename": "c.pdf"} and "magic bytes" in error["message"]
    liar = [files[0], (png_bytes(seed=5), "e.jpg", "image/jpeg")]
    error = assert_error(api.submit("ris", files=liar), 415, "unsupported_media_type")
    assert error["details"] == {"filename": "e.jpg"} and "does not match" in error["message"]
    assert _instance_count(api) == 0
    assert _files_under(settings.storage_dir) == []  # neither stored nor spooled
    assert api.submit("ris", files=files[:2] + files[3:]).status_code == 202
    assert _instance_count(api) == 3 and _incoming(app) == []


def test_idempotency_key_replay_of_a_streamed_upload_has_the_same_request_hash(api, app):  # type: ignore[no-untyped-def]
    """The request hash of a streamed upload is the one computed from the parts' bytes in memory (as before
    uploads were streamed), so a client retrying across the upgrade gets its replay; and the replay works."""
    from service.api import idempotency

    data, image = dicom_bytes(1200), png_bytes(seed=6)  # the DICOM part spans three 1 MiB pieces
    files = [(data, "big.dcm", "application/dicom"), (image, "x.png", "image/png")]
    headers = {"Idempotency-Key": "streamed-1"}
    first = api.submit("ris", files=files, headers=headers, patient_id="P-9")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    with app.test_request_context("/api/v1/studies", method="POST", content_type="multipart/form-data",
                                  data={"file": [(io.BytesIO(b), n, c) for b, n, c in files], "patient_id": "P-9"}):
        from flask import request

        in_memory = idempotency.request_hash(request, [("file", n, c, hashlib.sha256(b).hexdigest())
                                                       for b, n, c in files])
        request.input_stream.close()  # see _read
    with api.db.session() as s:
        row = s.scalars(select(IdempotencyKey).where(IdempotencyKey.key == "streamed-1")).one()
        assert row.request_hash == in_memory
    second = api.submit("ris", files=files, headers=headers, patient_id="P-9")
    assert second.status_code == 202 and second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json() == first.get_json()
    assert _instance_count(api) == 2 and _incoming(app) == []
    changed = [(data[:-1] + b"\1", "big.dcm", "application/dicom"), files[1]]  # one byte in the last piece
    assert_error(api.submit("ris", files=changed, headers=headers, patient_id="P-9"), 409, "idempotency_key_reused")


def test_a_full_disk_while_spooling_an_upload_is_the_full_store_error(api, app, settings, full_disk):  # type: ignore[no-untyped-def]
    """The incoming folder is on the store's file system: a disk that fills while an upload is copied there
    answers what a full store answers (503 ``storage_full``, the sender may retry), and leaves no file. The
    store takes the spooled copy by a hard link, so an upload needs room for one copy, not two."""
    part = dicom_bytes(440)  # 378 KiB: Werkzeug keeps it in memory (up to 500 kB), so only its copies take disk
    filler = full_disk / "filler"
    filler.write_bytes(bytes(800 * 1024))  # of the 1 MiB, 224 KiB left: the spooled copy does not fit
    spool_full = assert_error(api.submit("ris", files=[(part, "b.dcm", "application/dicom")]), 503, "storage_full")
    assert "storage full" in spool_full["message"] and "receiving the upload" in spool_full["message"]
    assert _instance_count(api) == 0 and _files_under(full_disk) == [filler]
    filler.write_bytes(bytes(400 * 1024))  # 624 KiB left: room for the spooled copy, not for a second one
    assert api.submit("ris", files=[(part, "a.dcm", "application/dicom")]).status_code == 202
    filler.unlink()
    (stored,) = _files_under(full_disk)  # the spooled file's inode, now the store's, and nothing else
    assert stored.read_bytes() == part and _instance_count(api) == 1


def test_a_full_disk_while_werkzeug_parses_an_upload_is_the_full_store_error(api, app, full_disk, monkeypatch):  # type: ignore[no-untyped-def]
    """Werkzeug writes a file part over 500 kB to the incoming folder while it parses the request
    (``service.app.UploadRequest``): a disk that fills there answers 503 ``storage_full`` too, never a 500, before
    any part is spooled; the part already written is closed with the request, giving back all the space it took."""
    from service.api import routes

    spooled: list[Any] = []
    real_spool = routes.spool_upload
    monkeypatch.setattr(routes, "spool_upload", lambda settings, stream: spooled.append(stream) or real_spool(
        settings, stream))
    free = os.statvfs(full_disk).f_bfree
    large, larger = dicom_bytes(560), dicom_bytes(1024)  # 613 KiB, 2 MiB: of the disk's 1 MiB
    for files in ([larger],  # its first 500 kB go to the file, then writing the rest fills the disk
                  [large, larger]):  # the first is written whole, then moving the second's 500 kB there fills it
        error = assert_error(api.submit("ris", files=[(data, "a.dcm", "application/dicom") for data in files]),
                             503, "storage_full")
        assert "storage full while receiving the upload" in error["message"]
        assert spooled == []  # it failed while Werkzeug wrote the parts
        assert os.statvfs(full_disk).f_bfree == free and _files_under(full_disk) == []
    assert _instance_count(api) == 0
    assert api.submit("ris", files=[(dicom_bytes(128), "c.dcm", "application/dicom")]).status_code == 202
    assert len(spooled) == 1


def test_werkzeug_writes_a_large_part_to_the_incoming_folder_not_the_system_temp_folder(api, app, tmp_path,  # type: ignore[no-untyped-def]
                                                                                       monkeypatch):
    """A multipart file part over 500 kB goes to a file while Werkzeug parses the request: an unnamed one in this
    process's incoming folder (on the store's file system; ``service.app.UploadRequest``), never in the system
    temporary folder (Werkzeug's default), which may be a RAM-backed tmpfs. Nothing is left in either. That file is
    the one the store keeps (named, then linked into the store): the upload's bytes are written to disk once."""
    import tempfile

    from dicom import receive
    from service.api import routes

    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    where: list[str] = []
    inodes: list[int] = []
    real_spool = routes.spool_upload

    def spool_upload(settings: Any, stream: Any) -> Any:
        where.append(os.readlink(f"/proc/self/fd/{stream.fileno()}"))  # the file Werkzeug wrote the part to
        inodes.append(os.fstat(stream.fileno()).st_ino)
        return real_spool(settings, stream)

    monkeypatch.setattr(routes, "spool_upload", spool_upload)
    data = dicom_bytes(1024)  # 2 MiB
    response = api.submit("ris", files=[(data, "big.dcm", "application/dicom")])
    assert response.status_code == 202, response.data
    settings = app.extensions["fracture.settings"]
    incoming = receive.incoming_folder(settings.storage_dir / receive.FOLDER)
    assert len(where) == 1 and Path(where[0]).parent == incoming and where[0].endswith(" (deleted)")
    assert list(system_temp.iterdir()) == [] and _incoming(app) == []
    [(path, sha256)] = _stored_instances(api).values()
    assert sha256 == hashlib.sha256(data).hexdigest() and path.read_bytes() == data
    assert os.stat(path).st_ino == inodes[0]  # the part's own file: not copied to a spool, nor into the store


def test_a_full_disk_says_when_to_retry_as_the_openapi_document_does(api, app, full_disk):  # type: ignore[no-untyped-def]
    """A 503 (here ``storage_full``: the disk fills while an upload is received) carries ``Retry-After``, an
    integer number of seconds, as the OpenAPI document says of every 503."""
    from service.errors import RETRY_AFTER_SECONDS

    response = api.submit("ris", files=[(dicom_bytes(1024), "b.dcm", "application/dicom")])
    assert_error(response, 503, "storage_full")
    documented = api.get("/api/v1/openapi.json", None).get_json()["paths"]["/api/v1/studies"]["post"]
    headers = documented["responses"]["503"]["headers"]
    assert set(headers) == {"Retry-After"} and headers["Retry-After"]["schema"] == {"type": "integer"}
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS) and RETRY_AFTER_SECONDS >= 1


# ------------------------------------------------------------------------------------- scoping, listing


def test_a_key_cannot_read_another_users_studies(api):  # type: ignore[no-untyped-def]
    bob = api.submit("bob").get_json()["items"][0]
    ruth_referred = api.submit("ris", files=[(dicom_bytes(), "r.dcm", "application/dicom")]).get_json()["items"][0]
    study_url = f"/api/v1/studies/{bob['study_id']}"
    base = f"{study_url}/instances/{bob['instance_id']}"
    assert api.get(study_url, "bob").status_code == 200
    assert api.get(study_url, "admin").status_code == 200
    for path in (study_url, f"{base}/original", f"{base}/heatmap.png", f"{study_url}/sr.dcm",
                 f"/api/v1/jobs/{bob['job_id']}"):
        assert_error(api.get(path, "ruth"), 404)
        assert_error(api.get(path, "ris"), 404)
    assert_error(api.post(f"{base}/feedback", "ruth", json={"agrees": True}), 404)
    # Ruth sees the study the RIS sent that names her as the referring physician; the RIS sees it too.
    assert [s["id"] for s in api.get("/api/v1/studies", "ruth").get_json()["items"]] == [ruth_referred["study_id"]]
    assert [s["id"] for s in api.get("/api/v1/studies", "ris").get_json()["items"]] == [ruth_referred["study_id"]]
    assert len(api.get("/api/v1/studies", "admin").get_json()["items"]) == 2
    # An instance of another study is not found through a visible study.
    assert_error(api.get(f"/api/v1/studies/{ruth_referred['study_id']}/instances/{bob['instance_id']}/original",
                         "ruth"), 404)


def test_list_filters_and_cursor_pagination(api):  # type: ignore[no-untyped-def]
    ids = []
    for n in range(5):
        data = dicom_bytes(PatientID=f"P{n % 2}", AccessionNumber=f"ACC{n}")
        ids.append(api.submit("ris", files=[(data, f"{n}.dcm", "application/dicom")]).get_json()["items"][0])
    api.finish(ids[0]["instance_id"], call="fracture")
    api.finish(ids[1]["instance_id"], call="no_fracture", outputs=False)
    api.finish(ids[2]["instance_id"], call="indeterminate", outputs=False)
    with api.db.session() as s:
        s.scalars(select(Job).where(Job.id == ids[3]["job_id"])).one().state = "failed"

    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/v1/studies", "ris", query_string=query).get_json()
        pages += 1
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    expected = [item["study_id"] for item in reversed(ids)]
    assert seen == expected and pages == 3

    def listed(**query: Any) -> list[int]:
        response = api.get("/api/v1/studies", "ris", query_string=query)
        assert response.status_code == 200, response.get_data(as_text=True)
        return [s["id"] for s in response.get_json()["items"]]

    sid = [item["study_id"] for item in ids]
    assert listed(result="fracture") == [sid[0]]
    assert listed(result="no_fracture") == [sid[1]]
    assert listed(result="indeterminate") == [sid[2]]
    assert listed(status="done") == [sid[2], sid[1], sid[0]]
    assert listed(status="failed") == [sid[3]]
    assert listed(status="processing") == [sid[4]]
    assert listed(status="rejected") == [] and listed(status="received") == []
    assert listed(patient_id="P1") == [sid[3], sid[1]]
    assert listed(accession="ACC2") == [sid[2]]
    assert listed(since="2000-01-01", until="2999-01-01T00:00:00Z") == list(reversed(sid))
    assert listed(since="2999-01-01") == [] and listed(until="2000-01-01T00:00:00+02:00") == []
    summary = api.get("/api/v1/studies", "ris", query_string={"accession": "ACC0"}).get_json()["items"][0]
    assert summary["result"] == "fracture" and summary["max_fracture_probability"] == 0.9
    assert summary["links"]["self"] == f"/api/v1/studies/{sid[0]}"

    for query, code in (({"limit": 0}, "invalid_parameter"), ({"limit": 101}, "invalid_parameter"),
                        ({"limit": "x"}, "invalid_parameter"), ({"status": "maybe"}, "invalid_parameter"),
                        ({"result": "broken"}, "invalid_parameter"), ({"since": "yesterday"}, "invalid_parameter"),
                        ({"cursor": "!!!"}, "invalid_cursor"),
                        ({"cursor": base64.urlsafe_b64encode(b'["x", 1]').decode()}, "invalid_cursor")):
        assert_error(api.get("/api/v1/studies", "ris", query_string=query), 400, code)
    with api.db.session() as s:
        listing = s.scalars(select(AuditEntry).where(AuditEntry.action == "study.list")).first()
        assert listing.actor_type == "api_key" and listing.detail["count"] == 2


# ---------------------------------------------------------------------------------------------- feedback


def test_feedback(api):  # type: ignore[no-untyped-def]
    item = api.submit("ruth").get_json()["items"][0]
    url = f"/api/v1/studies/{item['study_id']}/instances/{item['instance_id']}/feedback"
    assert_error(api.post(url, "ruth", json={"agrees": True}), 409, "no_result")
    result_id = api.finish(item["instance_id"])
    response = api.post(url, "ruth", json={"agrees": False, "fracture_present": True, "correct_type": "spiral",
                                           "comment": "spiral, not greenstick"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["result_id"] == result_id and body["correct_type"] == "spiral" and body["agrees"] is False
    with api.db.session() as s:
        feedback = s.scalars(select(Feedback)).one()
        assert feedback.user_id == api.users["ruth"] and feedback.comment == "spiral, not greenstick"
    error = assert_error(api.post(url, "ruth", json={"agrees": "yes", "correct_type": "bent", "extra": 1}), 422)
    assert set(error["details"]) == {"agrees", "correct_type", "extra"}
    assert_error(api.post(url, "ruth", json=[1, 2]), 422)
    assert_error(api.post(url, "ruth", data="{not json", content_type="application/json"), 400, "invalid_json")
    assert_error(api.post(url, "ruth", data="agrees=1", content_type="application/x-www-form-urlencoded"), 415)


# ------------------------------------------------------------------------------------ models, limits, 503


def test_models_lists_the_bundle_cards(api, app, tmp_path):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from pipeline.taxonomy import DETECTION_CLASSES, FRACTURE_TYPES

    models = tmp_path / "models"
    for name, task, good in (("detector", "detect", True), ("classifier", "classify", False),
                             ("renamed", "detect", True)):
        (models / name).mkdir(parents=True)
        weights = models / name / "weights.safetensors"
        weights.write_bytes(b"weights of " + name.encode())
        digest = hashlib.sha256(weights.read_bytes()).hexdigest() if good else "0" * 64
        classes = list(FRACTURE_TYPES if task == "classify" else DETECTION_CLASSES)
        card = {"name": f"fn-{name}", "version": "1.2.0", "task": task,
                "classes": classes[::-1] if name == "renamed" else classes,  # off the taxonomy contract
                "architecture": {"class": "FractureNet"}, "weights": {"file": weights.name, "sha256": digest},
                "operating_point": {"threshold": 0.42, "indeterminate_band": [0.35, 0.5]}, "temperature": 1.3,
                "metrics": {"auroc": 0.9}, "disclaimer": "Research use only. Not for diagnostic use."}
        if task == "classify":
            card["detection_fusion"] = {"weights": {"detector_logit": 2.0, "reader_evidence": 0.8}, "bias": -1.0,
                                        "operating_point": {"threshold": 0.3, "indeterminate_band": [0.2, 0.6]}}
        (models / name / "model.json").write_text(json.dumps(card))
    (models / "notes").mkdir()
    app.extensions["fracture.settings"] = replace(app.extensions["fracture.settings"], model_dir=models)
    body = api.get("/api/v1/models", "ruth").get_json()
    cards = {m["bundle"]: m for m in body["models"]}
    assert set(cards) == {"detector", "classifier", "renamed"}
    assert cards["detector"]["status"] == "ok" and cards["detector"]["operating_point"] == 0.42
    # checked as the workers' loader checks it: a card whose classes differ from the taxonomy is refused too
    assert cards["renamed"]["status"] == "invalid" and "taxonomy contract" in cards["renamed"]["problem"]
    assert cards["detector"]["version"] == "1.2.0" and cards["detector"]["metrics"] == {"auroc": 0.9}
    assert cards["classifier"]["status"] == "invalid" and "SHA-256" in cards["classifier"]["problem"]
    assert cards["detector"]["detection_fusion"] is None  # the fusion the pipeline applies is the reader's
    assert cards["classifier"]["detection_fusion"]["operating_point"]["threshold"] == 0.3
    assert body["mirror_look"] is True  # FRACTURE_MIRROR_LOOK, the default: a mirrored card reads images twice
    app.extensions["fracture.settings"] = replace(app.extensions["fracture.settings"], mirror_look=False)
    assert api.get("/api/v1/models", "ruth").get_json()["mirror_look"] is False
    assert_error(api.get("/api/v1/models", None), 401)


def test_rate_limit_answers_429_with_retry_after(api, app):  # type: ignore[no-untyped-def]
    app.config.update(API_RATE_LIMIT_BURST=3, API_RATE_LIMIT_PER_SECOND=0.01)
    app.extensions.pop("fracture.api_rate", None)
    for _ in range(3):
        assert api.get("/api/v1/studies", "ruth").status_code == 200
    response = api.get("/api/v1/studies", "ruth")
    error = assert_error(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1 and error["details"]["retry_after_seconds"] >= 1
    assert api.get("/api/v1/studies", "bob").status_code == 200  # buckets are per key


def test_database_unavailable_is_503(settings):  # type: ignore[no-untyped-def]
    from service.app import create_app
    from service.errors import RETRY_AFTER_SECONDS

    app = create_app(settings, db=Database("postgresql+psycopg2://nobody@127.0.0.1:1/none"))
    response = app.test_client().get("/api/v1/studies", headers={"Authorization": "Bearer fn_abcd_x"})
    assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)  # as for every 503
    app.extensions["fracture.db"].dispose()


def test_unknown_api_path_is_json_404(api):  # type: ignore[no-untyped-def]
    assert_error(api.get("/api/v1/nothing-here"), 404)
    assert_error(api.client.delete("/api/v1/studies", headers=api.headers("admin")), 405)


# --------------------------------------------------------------------------------------------- STOW-RS


def _related(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b""
    for ctype, data in parts:
        body += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_rs(api):  # type: ignore[no-untyped-def]
    good = dicom_bytes()
    body, ctype = _related([("application/dicom", good), ("application/dicom", b"not dicom"),
                            ("application/dicom", dicom_bytes())])
    response = api.post("/dicomweb/studies", "ris", data=body, content_type=ctype)
    assert response.status_code == 202 and response.mimetype == "application/dicom+json", response.data
    payload = response.get_json()
    assert len(payload["00081199"]["Value"]) == 2 and len(payload["00081198"]["Value"]) == 1
    assert payload["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    body, ctype = _related([("application/dicom", good)])
    response = api.post("/dicomweb/studies", "ris", data=body, content_type=ctype)
    assert response.status_code == 200 and "00081198" not in response.get_json()
    body, ctype = _related([("text/plain", b"hello")])
    assert api.post("/dicomweb/studies", "ris", data=body, content_type=ctype).status_code == 409
    assert_error(api.post("/dicomweb/studies", "ris", data=good, content_type="application/dicom"), 415)
    assert_error(api.post("/dicomweb/studies", None, data=body, content_type=ctype), 401)
    assert_error(api.post("/dicomweb/studies", "ris", data=b"x", content_type="multipart/related"), 400)
    with api.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 2


# ----------------------------------------------------------------- STOW-RS bodies go to disk, not memory


def _stow(api: Api, body: bytes, ctype: str, who: str = "ris") -> Any:
    return api.post("/dicomweb/studies", who, data=body, content_type=ctype)


def _uid(data: bytes) -> str:
    from pydicom import dcmread

    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _stored_instances(api: Api) -> dict[str, tuple[Path, str]]:
    with api.db.session() as s:
        return {uid: (Path(path), sha256) for uid, path, sha256 in
                s.execute(select(Instance.sop_instance_uid, Instance.file_path, Instance.sha256))}


def test_a_stow_of_several_mb_parts_is_stored_byte_identical_through_the_incoming_folder(api, app):  # type: ignore[no-untyped-def]
    """A STOW-RS body of a few MB a part is read in 1 MiB pieces, each part written to the incoming folder as
    it arrives and stored from there: the store holds the bytes sent, the incoming folder is empty afterwards,
    each part taken in memory (``ingest``, the path STOW-RS took before) is a duplicate of what was stored, not a
    new version, and so is a second STOW of the same body. The boundary is quoted, with characters RFC 2046
    allows in one."""
    from service.ingest import ingest

    datas = [dicom_bytes(1100), dicom_bytes(1300), dicom_bytes(900)]  # 2.4, 3.4 and 1.6 MB
    boundary = "----=_Part 0.5/x?y"
    body, _ = _related([("application/dicom", d) for d in datas], boundary=boundary)
    ctype = f'multipart/related; type="application/dicom"; boundary="{boundary}"'
    first = _stow(api, body, ctype)
    assert first.status_code == 200 and first.mimetype == "application/dicom+json", first.data
    referenced = first.get_json()["00081199"]["Value"]
    uids = [_uid(d) for d in datas]
    assert [r["00081155"]["Value"] for r in referenced] == [[uid] for uid in uids]
    stored = _stored_instances(api)
    for uid, data in zip(uids, datas, strict=True):
        path, sha256 = stored[uid]
        assert path.read_bytes() == data and sha256 == hashlib.sha256(data).hexdigest()
    assert _incoming(app) == []
    settings = app.extensions["fracture.settings"]
    assert sorted(_files_under(settings.storage_dir)) == sorted(p for p, _ in stored.values())
    with api.db.session() as s:
        audit = s.execute(select(AuditEntry.actor_type, AuditEntry.actor, AuditEntry.object_id)
                          .where(AuditEntry.action == "instance.receive")).all()
    assert sorted(audit) == sorted(("user", str(api.users["ris"]), uid) for uid in uids)
    for data in datas:
        in_memory = ingest(api.db, settings, data, source="api")
        assert in_memory.duplicate is True and in_memory.version == 1
    again = _stow(api, body, ctype)
    assert again.status_code == 200 and again.get_json() == first.get_json()
    assert _stored_instances(api) == stored and _incoming(app) == []


def _dicom_part(data: bytes, pad: int = 0) -> bytes:
    """A part's delimiter line (after the CRLF that ends the bytes before it), headers and body."""
    padding = f"X-Pad: {'p' * pad}\r\n" if pad else ""
    return f"--edge-7f3a\r\nContent-Type: application/dicom\r\n{padding}\r\n".encode() + data


def test_a_stow_delimiter_that_straddles_the_1_mib_read_edge_is_found(api, app):  # type: ignore[no-untyped-def]
    """The body is read in 1 MiB pieces: a delimiter (CRLF ``--boundary``) cut in two by a piece's end is still
    found, at each place it can be cut. Each part here ends so that its delimiter has 1, half or all but one of
    its bytes before a multiple of 1 MiB (a preamble and a padding header put it there), and each is stored as
    sent."""
    from service.ingest import CHUNK

    delimiter = b"\r\n--edge-7f3a"
    datas = [dicom_bytes(722) for _ in range(3)]  # 1 043 456 bytes each: one part a piece
    cuts = [1, len(delimiter) // 2, len(delimiter) - 1]  # bytes of the delimiter before the edge
    body = b""
    for i, (data, cut) in enumerate(zip(datas, cuts, strict=True)):
        edge = (i + 1) * CHUNK
        if i == 0:
            preamble = edge - cut - len(_dicom_part(data)) - 2
            body = b"p" * preamble + b"\r\n" + _dicom_part(data)
        else:
            pad = edge - cut - len(body) - 2 - len(_dicom_part(data, pad=1)) + 1
            body += b"\r\n" + _dicom_part(data, pad=pad)
    body += delimiter + b"--\r\n"
    for i, cut in enumerate(cuts):
        assert body.index(delimiter, (i + 1) * CHUNK - len(delimiter)) == (i + 1) * CHUNK - cut
    response = _stow(api, body, 'multipart/related; type="application/dicom"; boundary=edge-7f3a')
    assert response.status_code == 200, response.data
    stored = _stored_instances(api)
    assert sorted(path.read_bytes() for path, _ in stored.values()) == sorted(datas)
    assert _incoming(app) == []


def test_the_multipart_reader_finds_every_delimiter_at_every_piece_size() -> None:
    """The reader alone, on a body with a preamble, a part without headers, transport padding, an empty part
    and an epilogue, read in pieces of every size from 1 byte to well past a delimiter's length: the same parts
    each time, whichever byte a piece ends at."""
    from service.api.dicomweb import read_multipart_related

    body = (b"preamble --b0undary\r\n--b0undary\r\nContent-Type: application/dicom\r\nX-A:  1 \r\n\r\n"
            b"first\r\n-b0undary --b0undar\r\n\r\n--b0undary \t\r\n\r\nsecond\r\n--b0undary\r\n"
            b"Content-Type: text/plain\r\n\r\n\r\n--b0undary--\r\nepilogue\r\n--b0undary\r\n")
    expected = [({"content-type": "application/dicom", "x-a": "1"}, b"first\r\n-b0undary --b0undar\r\n"),
                ({}, b"second"), ({"content-type": "text/plain"}, b"")]
    for chunk in range(1, 64):
        stream = io.BytesIO(body)
        parts: list[tuple[dict[str, str], bytes]] = []
        for event in read_multipart_related(stream, "b0undary", chunk=chunk):
            if isinstance(event, dict):
                parts.append((event, b""))
            else:
                assert 0 < len(event) < chunk + len(b"\r\n--b0undary"), chunk
                parts[-1] = (parts[-1][0], parts[-1][1] + event)
        assert parts == expected, chunk
        assert stream.read() == b""  # the epilogue was read too


def test_a_stow_body_without_its_close_delimiter_is_refused_and_leaves_nothing(api, app):  # type: ignore[no-untyped-def]
    """A body cut off before its close delimiter (``--boundary--``) is 400 ``bad_multipart``, also when whole
    parts of several MB came before the cut: every part is written to disk before any is stored, so nothing is
    stored, and the parts' files are removed. So are a body without any part and one with a part whose headers
    do not end."""
    big, small = dicom_bytes(1300), dicom_bytes(64)
    body, ctype = _related([("application/dicom", big), ("application/dicom", small)])
    closed = body.rindex(b"\r\n--b0undary--")
    for cut in (body[:closed], body[:closed + len(b"\r\n--b0undary")], body[:closed - 100],
                body[:len(body) // 2]):
        error = assert_error(_stow(api, cut, ctype), 400, "bad_multipart")
        assert "before its close delimiter" in error["message"], error
    assert "no parts" in assert_error(_stow(api, b"--b0undary--\r\n", ctype), 400, "bad_multipart")["message"]
    assert "no parts" in assert_error(_stow(api, big, ctype), 400, "bad_multipart")["message"]
    headless = b"--b0undary\r\nContent-Type: application/dicom\r\n" + b"X-Long: x\r\n" * 2000
    assert "headers" in assert_error(_stow(api, headless, ctype), 400, "bad_multipart")["message"]
    assert _instance_count(api) == 0 and _incoming(app) == []
    assert _files_under(app.extensions["fracture.settings"].storage_dir) == []
    assert _stow(api, body, ctype).status_code == 200 and _instance_count(api) == 2


def test_a_stow_of_more_parts_than_allowed_is_refused_and_leaves_nothing(api, app, monkeypatch):  # type: ignore[no-untyped-def]
    """A STOW-RS body of more parts than MAX_PARTS is 422 ``too_many_parts`` as soon as the next part begins:
    nothing is stored and no part's file is left; as many parts as allowed are stored."""
    from service.api import dicomweb

    monkeypatch.setattr(dicomweb, "MAX_PARTS", 3)
    instances = [dicom_bytes(64) for _ in range(4)]
    body, ctype = _related([("application/dicom", data) for data in instances])
    error = assert_error(_stow(api, body, ctype), 422, "too_many_parts")
    assert "at most 3 parts" in error["message"]
    assert _instance_count(api) == 0 and _incoming(app) == []
    body, ctype = _related([("application/dicom", data) for data in instances[:3]])
    assert _stow(api, body, ctype).status_code == 200 and _instance_count(api) == 3


def test_a_stow_part_over_the_limit_fails_alone_and_leaves_no_file(api, app, settings):  # type: ignore[no-untyped-def]
    """The size limit holds for each part while it is written to disk (behind Werkzeug's own limit on the
    whole request, lifted here so that the part's is the one that bites): that part fails (0xC000, named by the
    header read from its first bytes, as when it was read whole), the others are stored, and no file of either
    is left in the incoming folder. With the request limit back, the same body is 413 before anything is read."""
    app.extensions["fracture.settings"] = dataclasses.replace(settings, max_upload_mb=1)
    app.config["MAX_CONTENT_LENGTH"] = None
    fits, too_big = dicom_bytes(256), dicom_bytes(1024)  # 0.13 MB, 2 MB
    body, ctype = _related([("application/dicom", fits), ("application/dicom", too_big)])
    response = _stow(api, body, ctype)
    assert response.status_code == 202, response.data
    payload = response.get_json()
    assert len(payload["00081199"]["Value"]) == 1
    too_big_uid = _uid(too_big)
    assert payload["00081198"]["Value"] == [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1.1"]},
                                             "00081155": {"vr": "UI", "Value": [too_big_uid]},
                                             "00081197": {"vr": "US", "Value": [0xC000]}}]
    assert _instance_count(api) == 1 and _incoming(app) == []
    assert set(_stored_instances(api)) == {_uid(fits)}
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    assert_error(_stow(api, body, ctype), 413, "payload_too_large")
    assert _instance_count(api) == 1 and _incoming(app) == []


def test_a_full_disk_while_spooling_a_stow_is_the_full_store_error(api, app, settings, full_disk,  # type: ignore[no-untyped-def]
                                                                   monkeypatch):
    """A disk that fills while a STOW-RS part is written to the incoming folder answers what the other uploads
    answer (503 ``storage_full``, the sender may retry) for the whole request, storing none of its parts. A part
    the store cannot take fails that part alone with Out of Resources (0xA700): here the store must copy it (no
    hard link across file systems) and the copy does not fit. No file is left."""
    import errno

    body, ctype = _related([("application/dicom", dicom_bytes(128)), ("application/dicom", dicom_bytes(1024))])
    error = assert_error(_stow(api, body, ctype), 503, "storage_full")
    assert "storage full" in error["message"] and "receiving the upload" in error["message"]
    assert _instance_count(api) == 0 and _files_under(full_disk) == []

    def no_link(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    with monkeypatch.context() as patched:
        patched.setattr(os, "link", no_link)
        fits_spool_not_store = dicom_bytes(560)  # 0.6 MB: written, then the store's copy does not fit in 1 MB
        body, ctype = _related([("application/dicom", fits_spool_not_store)])
        response = _stow(api, body, ctype)
    assert response.status_code == 409, response.data
    assert response.get_json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert _instance_count(api) == 0 and _files_under(full_disk) == []
    body, ctype = _related([("application/dicom", fits_spool_not_store)])  # linked: one copy fits
    assert _stow(api, body, ctype).status_code == 200
