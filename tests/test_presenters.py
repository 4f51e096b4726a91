"""service.presenters: the study views shared by the API and the portal."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from service.models import Study
from service.presenters import aggregate_call, iso, study_detail, study_status, study_summary
from tests.test_api import api, dicom_bytes  # noqa: F401  (the api fixture)


def test_study_status_and_call_rules():  # type: ignore[no-untyped-def]
    assert study_status([]) == "received"
    assert study_status(["done", "queued"]) == "processing"
    assert study_status(["done", "failed", "rejected"]) == "failed"
    assert study_status(["rejected", "done"]) == "done"
    assert study_status(["rejected"]) == "rejected"
    assert aggregate_call(["no_fracture", None, "indeterminate"]) == "indeterminate"
    assert aggregate_call(["no_fracture", "fracture"]) == "fracture"
    assert aggregate_call([None]) is None
    assert iso(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
    assert iso(None) is None


def test_detail_has_instances_jobs_results_artifacts(api):  # type: ignore[no-untyped-def]  # noqa: F811
    uid = "1.2.826.0.1.3680043.8.498.77"
    for n in range(2):
        api.submit("ris", files=[(dicom_bytes(StudyInstanceUID=uid, InstanceNumber=n + 1), "a.dcm",
                                  "application/dicom")])
    with api.db.session() as s:
        study = s.scalars(select(Study)).one()
        detail = study_detail(s, study)
        first = detail["instances"][0]["id"]
    api.finish(first, call="no_fracture", probability=0.1)
    with api.db.session() as s:
        study = s.scalars(select(Study)).one()
        summary = study_summary(s, study)
        detail = study_detail(s, study)
    assert summary["status"] == "processing" and summary["result"] == "no_fracture"
    assert summary["instance_count"] == 2 and summary["patient"]["patient_id"] == "FN-0001"
    assert summary["referring_physician_name"] == "Referrer^Ruth" and summary["accession_number"] == "ACC0001"
    done, waiting = detail["instances"]
    assert done["status"] == "done" and waiting["status"] == "queued" and waiting["result"] is None
    assert [e["state"] for e in done["job"]["timeline"]] == ["received", "queued", "processing", "done"]
    assert done["result"]["call"] == "no_fracture" and done["result"]["models"][0]["name"] == "fn-detector"
    assert done["available"] == {"original": True, "heatmap": True, "edges": True, "hybrid": True, "sc": True}
    assert {a["kind"] for a in detail["artifacts"]} == {"sc", "sr"} and detail["available"]["sr"]
    assert detail["artifacts"][0]["deliveries"][0]["last_error"] == "association rejected"
    assert detail["disclaimer"] == "Research use only. Not for diagnostic use."
