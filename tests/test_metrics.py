"""/metrics: Prometheus text whose counts come from the database (right across processes)."""

from __future__ import annotations

import datetime as dt

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from service.metrics import observe_inference_latency
from service.models import Artifact, Delivery, Job, utcnow
from tests.test_api import api, dicom_bytes, png_bytes  # noqa: F401  (the api fixture)


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}


def test_metrics_count_from_the_database(api):  # type: ignore[no-untyped-def]  # noqa: F811
    empty = scrape(api.client)
    assert empty[("fracturenode_images_received_total", (("source", "api"),))] == 0
    assert empty[("fracturenode_inference_latency_seconds_count", ())] == 0

    items = [api.submit("ris", files=[(dicom_bytes(), f"{n}.dcm", "application/dicom")]).get_json()["items"][0]
             for n in range(4)]
    api.finish(items[0]["instance_id"])  # done in 2 s, with a failed delivery
    now = utcnow()
    with api.db.session() as s:
        s.scalars(select(Job).where(Job.id == items[1]["job_id"])).one().state = "rejected"
        failed = s.scalars(select(Job).where(Job.id == items[2]["job_id"])).one()
        failed.state = "failed"
        s.scalars(select(Job).where(Job.id == items[3]["job_id"])).one().state = "processing"
        artifact = s.scalars(select(Artifact)).first()
        s.add(Delivery(artifact_pk=artifact.id, destination="OTHER@127.0.0.1:1", state="delivered",
                       delivered_at=now - dt.timedelta(seconds=1)))
    observe_inference_latency(0.3)

    metrics = scrape(api.client)
    assert metrics[("fracturenode_images_received_total", (("source", "api"),))] == 4
    assert metrics[("fracturenode_images_received_total", (("source", "dicom"),))] == 0
    assert metrics[("fracturenode_images_processed_total", ())] == 1
    assert metrics[("fracturenode_images_rejected_total", ())] == 1
    assert metrics[("fracturenode_images_failed_total", ())] == 1
    assert metrics[("fracturenode_delivery_failures_total", ())] == 2  # the SC's and the SR's
    assert metrics[("fracturenode_queue_depth", (("state", "processing"),))] == 1
    assert metrics[("fracturenode_queue_depth", (("state", "queued"),))] == 0
    assert metrics[("fracturenode_inference_latency_seconds_count", ())] == 1
    assert abs(metrics[("fracturenode_inference_latency_seconds_sum", ())] - 2.0) < 0.01
    assert metrics[("fracturenode_inference_latency_seconds_bucket", (("le", "1.0"),))] == 0
    assert metrics[("fracturenode_inference_latency_seconds_bucket", (("le", "2.5"),))] == 1
    assert metrics[("fracturenode_model_inference_seconds_count", ())] >= 1
    assert api.get("/metrics", None).status_code == 200  # no key needed: no patient data
