"""The clinician portal through Flask's test client, on SQLite and PostgreSQL: sign-in, lockout, CSRF,
every route's permission rule (clinician A vs B vs admin; guessed ids answer 404), masking and the audit
rows written for every view of patient data, upload, feedback, report, downloads and the admin pages."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.models import AuditEntry, Feedback, Instance, Job, User
from tests.conftest import dicom_bytes
from tests.test_portal_support import PASSWORD, Portal, csrf_from, png_bytes, two_clinicians


@pytest.fixture
def portal(app, settings, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Two clinicians and an admin (see ``two_clinicians``); Bob's study is indeterminate."""
    return two_clinicians(app, settings, tmp_path, monkeypatch, bob_call="indeterminate", bob_probability=0.46)


def audit_rows(p: Portal, action: str) -> list[AuditEntry]:
    with p.db.session() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)))


def text(response: Any) -> str:
    return response.get_data(as_text=True)


# ------------------------------------------------------------------------------------- sign-in, cookies


def test_login_page_logout_and_cookie_flags(portal: Portal) -> None:
    client = portal.app.test_client()
    page = client.get("/login")
    assert page.status_code == 200 and "Sign in" in text(page)
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    assert client.get("/history").status_code == 302  # not signed in

    bad = client.post("/login", data={"username": "ruth", "password": "wrong password"})
    assert bad.status_code == 401 and "Invalid username or password" in text(bad)
    unknown = client.post("/login", data={"username": "nobody", "password": "wrong password"})
    assert unknown.status_code == 401 and "Invalid username or password" in text(unknown)

    ok = client.post("/login?next=//evil.example/x", data={"username": "ruth", "password": PASSWORD})
    assert ok.status_code == 302 and ok.headers["Location"] == "/history"  # no open redirect
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert client.get("/history").status_code == 200
    out = client.post("/logout")
    assert out.status_code == 302 and out.headers["Location"].endswith("/login")
    assert client.get("/history").status_code == 302

    tls = portal.app.test_client()
    secure = tls.post("/login", data={"username": "ruth", "password": PASSWORD}, base_url="https://localhost")
    assert "Secure" in secure.headers["Set-Cookie"]

    fixated = portal.app.test_client()  # no session fixation: whatever was in the session before is gone
    with fixated.session_transaction() as sess:
        sess["planted"] = "by an attacker"
    fixated.post("/login", data={"username": "ruth", "password": PASSWORD})
    with fixated.session_transaction() as sess:
        assert "planted" not in sess and "_user_id" in sess

    outcomes = [(e.actor, e.outcome) for e in audit_rows(portal, "user.login")]
    assert ("ruth", "denied") in outcomes and ("nobody", "denied") in outcomes and ("ruth", "ok") in outcomes
    assert audit_rows(portal, "user.logout")


def test_lockout_after_five_failures_unlock_and_disable(portal: Portal) -> None:
    client = portal.app.test_client()
    for _ in range(5):
        assert client.post("/login", data={"username": "bob", "password": "not it at all"}).status_code == 401
    locked = client.post("/login", data={"username": "bob", "password": PASSWORD})
    assert locked.status_code == 401 and "locked" in text(locked)
    assert audit_rows(portal, "user.locked")
    with portal.db.session() as s:
        assert s.get(User, portal.users["bob"]).locked_until is not None

    admin = portal.login("admin")
    assert "Unlock" in text(admin.get("/admin/users"))
    assert admin.post(f"/admin/users/{portal.users['bob']}/unlock").status_code == 302
    assert audit_rows(portal, "admin.user.unlock")
    bob = portal.login("bob")

    # a disabled user loses their session and cannot sign in again
    response = admin.post(f"/admin/users/{portal.users['bob']}",
                          data={"display_name": "Bob", "role": "clinician", "referring_physician_name": ""})
    assert response.status_code == 302  # is_active unchecked -> disabled
    assert bob.get("/history").status_code == 302
    refused = portal.app.test_client().post("/login", data={"username": "bob", "password": PASSWORD})
    assert refused.status_code == 401


def test_every_page_needs_a_session(portal: Portal) -> None:
    client = portal.app.test_client()
    sid, iid, rid = portal.studies["ruth"], portal.instances["ruth"], portal.results["ruth"]
    for path in ("/history", "/history/status?ids=1", f"/studies/{sid}", f"/studies/{sid}/status",
                 f"/studies/{sid}/images/{iid}/original.png", f"/studies/{sid}/report",
                 f"/studies/{sid}/report.pdf", f"/studies/{sid}/artifacts/1", "/upload", "/admin", "/admin/users",
                 "/admin/apikeys", "/admin/destinations", "/admin/audit", "/admin/jobs"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"], path
    for path in (f"/studies/{sid}/reveal", f"/studies/{sid}/results/{rid}/feedback", "/upload", "/logout"):
        assert client.post(path).status_code in (302, 401), path
    assert client.get("/").headers["Location"].endswith("/login")
    fetch = client.post("/upload", headers={"Accept": "application/json"})
    assert fetch.status_code == 401 and fetch.get_json()["ok"] is False
    assert client.get("/history").headers["Location"] == "/login?next=/history"


def test_csrf_is_enforced_on_forms_and_fetches_but_not_on_the_api(portal: Portal) -> None:
    portal.app.config["WTF_CSRF_ENABLED"] = True
    client = portal.app.test_client()
    assert client.post("/login", data={"username": "ruth", "password": PASSWORD}).status_code == 400
    token = csrf_from(text(client.get("/login")))
    signed_in = client.post("/login", data={"username": "ruth", "password": PASSWORD, "csrf_token": token})
    assert signed_in.status_code == 302
    sid = portal.studies["ruth"]
    assert client.post(f"/studies/{sid}/reveal").status_code == 400
    token = csrf_from(text(client.get("/history")))
    assert client.post(f"/studies/{sid}/reveal", headers={"X-CSRFToken": token}).status_code == 200
    assert client.post("/logout").status_code == 400
    # the REST API uses API keys, not cookies: no CSRF token, and its own 401
    api = portal.app.test_client().post("/api/v1/studies", data={})
    assert api.status_code == 401
    assert portal.app.test_client().get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- history


def test_history_shows_each_clinician_their_own_studies_masked(portal: Portal) -> None:
    ruth, bob, admin = portal.login("ruth"), portal.login("bob"), portal.login("admin")
    page = text(ruth.get("/history"))
    assert f'data-study-id="{portal.studies["ruth"]}"' in page
    assert f'data-study-id="{portal.studies["bob"]}"' not in page
    assert "T*** P***" in page and "Test" not in page and "FN-0001" not in page and "••••01" in page
    assert "87%" in page and "Greenstick" in page and "Fracture suspected" in page
    bob_page = text(bob.get("/history"))
    assert f'data-study-id="{portal.studies["bob"]}"' in bob_page and "Indeterminate" in bob_page
    assert f'data-study-id="{portal.studies["ruth"]}"' not in bob_page
    admin_page = text(admin.get("/history"))
    assert all(f'data-study-id="{sid}"' in admin_page for sid in portal.studies.values())
    listed = audit_rows(portal, "study.list")
    assert {e.actor for e in listed} == {"ruth", "bob", "admin"}
    assert listed[0].detail["studies"] == [portal.studies["ruth"]]


def test_history_search_and_filters_travel_in_the_post_body(portal: Portal, monkeypatch) -> None:
    admin = portal.login("admin")

    def ids(**form: str) -> set[int]:
        page = text(admin.post("/history", data=form))
        return {sid for sid in portal.studies.values() if f'data-study-id="{sid}"' in page}

    assert ids(q="FN-0002") == {portal.studies["bob"]}
    assert ids(q="acc0002") == {portal.studies["bob"]}
    assert ids(q="FN-9999") == set()
    assert ids(status="done") == set(portal.studies.values())
    assert ids(status="processing") == set()
    assert ids(result="indeterminate") == {portal.studies["bob"]}
    assert ids(result="fracture") == {portal.studies["ruth"]}
    today = dt.datetime.now(dt.UTC).date()
    assert ids(date_from=str(today - dt.timedelta(days=1)), date_to=str(today)) == set(portal.studies.values())
    assert ids(date_to=str(today - dt.timedelta(days=2))) == set()
    monkeypatch.setattr("service.portal.views.PAGE_SIZE", 1)
    first, second = ids(page="1"), ids(page="2")
    assert len(first) == len(second) == 1 and first != second
    assert "page 2 of 2" in text(admin.post("/history", data={"page": "2"}))
    assert audit_rows(portal, "study.list")[0].detail["searched"] is True


def test_live_status_and_reveal_are_scoped_and_reveal_is_audited(portal: Portal) -> None:
    ruth = portal.login("ruth")
    ids = ",".join(str(s) for s in portal.studies.values())
    data = ruth.get(f"/history/status?ids={ids}").get_json()
    assert [s["id"] for s in data["studies"]] == [portal.studies["ruth"]]
    assert data["studies"][0]["status"] == "done" and data["studies"][0]["result"] == "fracture"
    one = ruth.get(f"/studies/{portal.studies['ruth']}/status").get_json()
    assert one["status"] == "done" and one["images"][0]["call"] == "fracture"
    assert ruth.get(f"/studies/{portal.studies['bob']}/status").status_code == 404

    data = ruth.post(f"/studies/{portal.studies['ruth']}/reveal").get_json()
    assert data == {"patient_id": "FN-0001", "patient_name": "Test, Patient"}
    (row,) = audit_rows(portal, "patient.reveal")
    assert row.actor == "ruth" and row.patient_id == "FN-0001" and row.object_id == str(portal.studies["ruth"])
    assert ruth.post(f"/studies/{portal.studies['bob']}/reveal").status_code == 404
    assert ruth.post("/studies/999999/reveal").status_code == 404


# ------------------------------------------------------------------------------------------------ study


def test_study_view_shows_findings_model_timeline_and_disclaimer(portal: Portal) -> None:
    ruth = portal.login("ruth")
    page = text(ruth.get(f"/studies/{portal.studies['ruth']}"))
    for expected in ("Fracture suspected", "87.0%", "Operating point 50.0%", "meter-op l-50", "Greenstick",
                     "bar-fill w-90", "fn-detector", "1.2.3", "Not for diagnostic use", "Image 1 received",
                     "Image 1 analysed", "Structured Report delivered to PACS@127.0.0.1:4242",
                     "association rejected", "data-view=\"hybrid\"", "DICOM SR", "DICOM SC"):
        assert expected in page, expected
    assert "Test" not in page  # masked here too
    row = audit_rows(portal, "study.view")[-1]
    assert row.actor == "ruth" and row.patient_id == "FN-0001"
    bob = portal.login("bob")
    indeterminate = text(bob.get(f"/studies/{portal.studies['bob']}"))
    assert "verdict-indeterminate" in indeterminate and "makes no yes/no call" in indeterminate


def test_clinicians_guessing_ids_get_404(portal: Portal) -> None:
    ruth = portal.login("ruth")
    other, iid = portal.studies["bob"], portal.instances["bob"]
    for path in (f"/studies/{other}", f"/studies/{other}/report", f"/studies/{other}/report.pdf",
                 f"/studies/{other}/images/{iid}/original.png",
                 f"/studies/{other}/artifacts/{portal.artifacts['bob']['sr']}", "/studies/424242"):
        assert ruth.get(path).status_code == 404, path
    mine = portal.studies["ruth"]
    # another study's instance, result or artifact through my own study's id
    assert ruth.get(f"/studies/{mine}/images/{iid}/hybrid.png").status_code == 404
    assert ruth.get(f"/studies/{mine}/artifacts/{portal.artifacts['bob']['sc']}").status_code == 404
    assert ruth.post(f"/studies/{mine}/results/{portal.results['bob']}/feedback",
                     data={"verdict": "agree"}).status_code == 404
    assert ruth.post(f"/studies/{other}/results/{portal.results['bob']}/feedback",
                     data={"verdict": "agree"}).status_code == 404
    assert portal.login("admin").get(f"/studies/{other}").status_code == 200


def test_image_layers_are_served_only_through_access_checks(portal: Portal) -> None:
    ruth = portal.login("ruth")
    sid, iid = portal.studies["ruth"], portal.instances["ruth"]
    for kind in ("original", "edges", "heatmap", "hybrid"):
        response = ruth.get(f"/studies/{sid}/images/{iid}/{kind}.png")
        assert response.status_code == 200 and response.mimetype == "image/png", kind
        assert response.data.startswith(b"\x89PNG") and "no-store" in response.headers["Cache-Control"]
    assert ruth.get(f"/studies/{sid}/images/{iid}/secret.png").status_code == 404
    layers = [e.detail["layer"] for e in audit_rows(portal, "image.view")]
    assert layers == ["original", "edges", "heatmap", "hybrid"]
    assert str(portal.tmp) not in text(ruth.get(f"/studies/{sid}"))  # no file paths in the page


# ----------------------------------------------------------------------------------------------- upload


def test_upload_accepts_images_and_says_why_it_rejects(portal: Portal) -> None:
    ruth = portal.login("ruth")
    assert "Drop PNG, JPEG or DICOM files here" in text(ruth.get("/upload"))
    ok = ruth.post("/upload", data={"file": (io.BytesIO(png_bytes(64, seed=3)), "knee.png", "image/png"),
                                    "patient_id": "UP-1", "patient_name": "Upload^Una"},
                   content_type="multipart/form-data")
    body = ok.get_json()
    assert ok.status_code == 200 and body["ok"] is True and body["error"] is None, body
    assert f'data-study-id="{body["study_id"]}"' in text(ruth.get("/history"))  # the uploader sees it
    assert ruth.get(f"/studies/{body['study_id']}").status_code == 200
    assert portal.login("bob").get(f"/studies/{body['study_id']}").status_code == 404

    bad = ruth.post("/upload", data={"file": (io.BytesIO(b"hello, not an image"), "notes.txt", "text/plain")},
                    content_type="multipart/form-data")
    assert bad.status_code == 415 and bad.get_json()["ok"] is False and "content type" in bad.get_json()["error"]
    liar = ruth.post("/upload", data={"file": (io.BytesIO(b"hello"), "x.png", "image/png")},
                     content_type="multipart/form-data")
    assert liar.status_code == 415 and "magic bytes" in liar.get_json()["error"]
    missing = ruth.post("/upload", data={}, content_type="multipart/form-data")
    assert missing.status_code == 400 and missing.get_json()["error"] == "no file was sent"
    portal.app.config["MAX_CONTENT_LENGTH"] = 1000
    big = ruth.post("/upload", data={"file": (io.BytesIO(b"\x89PNG" + b"0" * 5000), "big.png", "image/png")},
                    content_type="multipart/form-data")
    assert big.status_code == 413 and "too large" in big.get_json()["error"]


def test_a_dicom_upload_is_stored_as_sent_through_the_incoming_folder(portal: Portal) -> None:
    """A DICOM file of several MB dropped on the upload page is copied to disk in pieces, never read whole, and
    stored as the bytes sent; its copy in the incoming folder is gone after the answer, and a second drop of the
    same file is a duplicate."""
    data = dicom_bytes(1800)  # 6.5 MB
    ruth = portal.login("ruth")

    def drop() -> Any:
        response = ruth.post("/upload", data={"file": (io.BytesIO(data), "wrist.dcm", "application/dicom")},
                             content_type="multipart/form-data")
        response.request.input_stream.close()  # the test client leaves a body over 500 kB open otherwise
        return response

    first = drop()
    body = first.get_json()
    assert first.status_code == 200 and body["ok"] is True and body["duplicate"] is False, body
    with portal.db.session() as s:
        instance = s.get(Instance, body["instance_id"])
        assert instance.source == "upload" and instance.original_filename == "wrist.dcm"
        stored = Path(instance.file_path)
    assert stored.read_bytes() == data and stored.name == f"{hashlib.sha256(data).hexdigest()}.dcm"
    assert [p for p in (portal.settings.storage_dir / ".incoming").rglob("*") if p.is_file()] == []
    assert ruth.get(f"/studies/{body['study_id']}").status_code == 200
    second = drop().get_json()
    assert second["ok"] is True and second["duplicate"] is True and second["instance_id"] == body["instance_id"]


def test_a_full_disk_while_a_dropped_file_is_received_says_so(portal: Portal, full_disk) -> None:  # type: ignore[no-untyped-def]
    """A disk that fills while Werkzeug writes a dropped file of over 500 kB to the incoming folder
    (``service.app.UploadRequest``) answers 503 with Retry-After and the reason, never a 500: in the upload
    view's shape, or, where CSRF protection reads the form before the view (as it does outside the tests), in
    the one error shape, whose message the page's script shows too (``portal.js``). Nothing is left."""
    ruth = portal.login("ruth")
    token = csrf_from(text(ruth.get("/upload")))
    for csrf in (False, True):
        portal.app.config["WTF_CSRF_ENABLED"] = csrf
        response = ruth.post("/upload", data={"file": (io.BytesIO(dicom_bytes(1024)), "big.dcm", "application/dicom")},
                             content_type="multipart/form-data",
                             headers={"X-CSRFToken": token, "Accept": "application/json"})
        response.request.input_stream.close()  # the test client leaves a body over 500 kB open otherwise
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        body = response.get_json()
        why = body["error"]["message"] if csrf else body["error"]
        assert "storage full while receiving the upload" in why and (csrf or body["ok"] is False)
    assert [p for p in full_disk.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------------------------- feedback


def test_feedback_is_stored_with_who_and_when_and_shown(portal: Portal) -> None:
    ruth = portal.login("ruth")
    sid, rid = portal.studies["ruth"], portal.results["ruth"]
    agree = ruth.post(f"/studies/{sid}/results/{rid}/feedback", data={"verdict": "agree"})
    assert agree.status_code == 302 and agree.headers["Location"].endswith(f"#image-{portal.instances['ruth']}")
    ruth.post(f"/studies/{sid}/results/{rid}/feedback",
              data={"verdict": "disagree", "fracture_present": "yes", "correct_type": "spiral",
                    "comment": "spiral line on the lateral view"})
    assert ruth.post(f"/studies/{sid}/results/{rid}/feedback", data={"verdict": "maybe"}).status_code == 400
    with portal.db.session() as s:
        rows = list(s.scalars(select(Feedback).where(Feedback.result_pk == rid).order_by(Feedback.id)))
    assert [(f.agrees, f.fracture_present, f.correct_type) for f in rows] == [(True, True, "greenstick"),
                                                                             (False, True, "spiral")]
    assert all(f.user_id == portal.users["ruth"] and f.created_at is not None for f in rows)
    page = text(ruth.get(f"/studies/{sid}"))
    assert "Ruth</strong> agrees" in page and "disagrees" in page and "spiral line on the lateral view" in page
    assert len(audit_rows(portal, "feedback.create")) == 2


# ------------------------------------------------------------------------------------ report, downloads


def test_report_html_pdf_and_dicom_downloads(portal: Portal) -> None:
    ruth = portal.login("ruth")
    sid = portal.studies["ruth"]
    html = text(ruth.get(f"/studies/{sid}/report"))
    for expected in ("FractureNode study report", "Test, Patient", "FN-0001", "Fracture suspected", "87.0%",
                     "fn-detector 1.2.3", "Not for diagnostic use", "Greenstick"):
        assert expected in html, expected
    pdf = ruth.get(f"/studies/{sid}/report.pdf")
    assert pdf.status_code == 200 and pdf.mimetype == "application/pdf" and pdf.data.startswith(b"%PDF")
    assert "attachment" in pdf.headers["Content-Disposition"] and len(pdf.data) > 2000
    for kind in ("sr", "sc"):
        download = ruth.get(f"/studies/{sid}/artifacts/{portal.artifacts['ruth'][kind]}")
        assert download.status_code == 200 and download.mimetype == "application/dicom"
        assert download.data[128:132] == b"DICM"
        download.close()
    assert [e.action for e in audit_rows(portal, "report.view")] == ["report.view"]
    assert audit_rows(portal, "report.pdf") and len(audit_rows(portal, "artifact.download")) == 2


def test_pdf_has_the_disclaimer_on_every_page() -> None:
    from service.portal.report import build_pdf

    detail = {"id": 1, "patient": {"name": "Doe^Jane", "patient_id": "P1"}, "study_date": "20260101",
              "accession_number": None, "description": None, "referring_physician_name": None, "status": "done",
              "result": "indeterminate", "created_at": "2026-01-01T00:00:00Z",
              "instances": [{"id": n, "body_part": "HAND", "laterality": "L", "modality": "DX", "status": "done",
                             "job": None, "feedback": [],
                             "result": {"validity": {"is_radiograph": True, "reason": ""}, "call": "indeterminate",
                                        "fracture_probability": 0.45, "operating_point": 0.5, "top_type": "oblique",
                                        "top_type_probability": 0.5, "type_distribution": {"oblique": 0.5},
                                        "models": [], "model": {"name": "det", "version": "2"}}}
                            for n in range(12)]}
    pdf = build_pdf(detail, {n: {"original": png_bytes(32), "hybrid": png_bytes(32, 1)} for n in range(12)})
    from fpdf import FPDF  # noqa: F401 - only to be sure the library is the pure-Python one we ship

    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") >= 2


# ------------------------------------------------------------------------------------------------ admin


def test_admin_pages_do_not_exist_for_clinicians(portal: Portal) -> None:
    ruth, admin = portal.login("ruth"), portal.login("admin")
    for path in ("/admin", "/admin/users", f"/admin/users/{portal.users['bob']}", "/admin/apikeys",
                 "/admin/destinations", "/admin/audit", "/admin/jobs"):
        assert ruth.get(path).status_code == 404, path
        assert admin.get(path).status_code in (200, 302), path
    for path in ("/admin/jobs/retry-failed", "/admin/users", "/admin/apikeys",
                 f"/admin/users/{portal.users['bob']}/reset-password"):
        assert ruth.post(path).status_code == 404, path
    assert "Admin</a>" not in text(ruth.get("/history")) and "Admin</a>" in text(admin.get("/history"))


def test_admin_manages_users_and_api_keys(portal: Portal) -> None:
    admin = portal.login("admin")
    created = admin.post("/admin/users", data={"username": "carol", "display_name": "Dr Carol", "role": "clinician",
                                               "referring_physician_name": "Someone^Else", "password": ""})
    page = text(created)
    assert created.status_code == 200 and 'data-testid="user-created"' in page
    generated = page.split('<code class="secret">')[1].split("</code>")[0]
    carol = portal.login("carol", generated)
    assert f'data-study-id="{portal.studies["bob"]}"' in text(carol.get("/history"))  # linked referring name
    duplicate = admin.post("/admin/users", data={"username": "carol", "role": "clinician"})
    assert duplicate.status_code == 400 and "already exists" in text(duplicate)

    reset = text(admin.post(f"/admin/users/{portal.users['ruth']}/reset-password"))
    new_password = reset.split('<code class="secret">')[1].split("</code>")[0]
    assert portal.app.test_client().post("/login", data={"username": "ruth", "password": PASSWORD}).status_code == 401
    portal.login("ruth", new_password)
    own = admin.post(f"/admin/users/{portal.users['admin']}", data={"role": "clinician", "is_active": "y"})
    assert own.status_code == 302
    with portal.db.session() as s:
        assert s.get(User, portal.users["admin"]).role == "admin"  # cannot demote oneself

    key_page = text(admin.post("/admin/apikeys", data={"username": "bob", "name": "RIS bridge"}))
    plaintext = key_page.split('<code class="secret">')[1].split("</code>")[0]
    assert plaintext.startswith("fn_")
    api = portal.app.test_client().get("/api/v1/studies", headers={"Authorization": f"Bearer {plaintext}"})
    assert api.status_code == 200
    from service.models import ApiKey

    with portal.db.session() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.name == "RIS bridge"))
    assert admin.post(f"/admin/apikeys/{key_id}/revoke").status_code == 302
    revoked = portal.app.test_client().get("/api/v1/studies", headers={"Authorization": f"Bearer {plaintext}"})
    assert revoked.status_code == 401
    actions = {e.action for e in audit_rows(portal, "admin.user.create") + audit_rows(portal, "admin.apikey.create")
               + audit_rows(portal, "admin.apikey.revoke") + audit_rows(portal, "admin.user.reset_password")}
    assert actions == {"admin.user.create", "admin.apikey.create", "admin.apikey.revoke", "admin.user.reset_password"}


def test_admin_audit_log_destinations_and_job_queue(portal: Portal) -> None:
    ruth, admin = portal.login("ruth"), portal.login("admin")
    ruth.post(f"/studies/{portal.studies['ruth']}/reveal")
    audit_page = text(admin.post("/admin/audit", data={"action": "patient", "patient_id": "FN-0001"}))
    assert "patient.reveal" in audit_page and "study.list" not in audit_page.split("<tbody>")[1]
    assert "user.login" in text(admin.post("/admin/audit", data={"actor": "ruth", "action": "user.login"}))
    assert "No entries" in text(admin.post("/admin/audit", data={"outcome": "denied"}))

    dest = text(admin.get("/admin/destinations"))
    assert "PACS@127.0.0.1:4242" in dest and "health-failing" in dest and "association rejected" in dest

    with portal.db.session() as s:
        job = s.scalar(select(Job).where(Job.instance_pk == portal.instances["bob"]))
        job.state, job.error = "failed", "model crashed"
        job_id = job.id
    jobs = text(admin.get("/admin/jobs"))
    assert 'data-testid="count-failed">1<' in jobs and "model crashed" in jobs
    assert admin.post(f"/admin/jobs/{job_id}/retry").status_code == 302
    with portal.db.session() as s:
        assert s.get(Job, job_id).state == "queued"
        s.get(Job, job_id).state = "failed"
    assert admin.post("/admin/jobs/retry-failed").status_code == 302
    with portal.db.session() as s:
        assert s.get(Job, job_id).state == "queued"
    assert audit_rows(portal, "admin.job.retry") and audit_rows(portal, "admin.job.retry_failed")


def test_the_web_app_leaves_the_networks_and_the_pdf_library_to_whoever_needs_them(tmp_path: Any) -> None:
    """A web process only serves pages, the API and uploads (the workers run the models): building the WSGI app
    imports no network runtime, nor pynetdicom (the listener's; uploads share only its incoming folder), and fpdf2
    only comes with the first PDF report (the node's memory budget)."""
    import os
    import subprocess
    import sys

    code = ("import sys, service.wsgi; assert service.wsgi.app is not None; "
            "print(sorted(m for m in ('fpdf', 'torch', 'onnxruntime', 'pynetdicom') if m in sys.modules))")
    env = {**os.environ, "FRACTURE_DATA_DIR": str(tmp_path)}
    env.pop("FRACTURE_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
