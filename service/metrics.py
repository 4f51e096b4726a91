"""Prometheus metrics at ``/metrics`` (text exposition format).

The counts are computed from the database at scrape time, so they are right however many listener, worker
and web processes share the node, and survive restarts:

- ``fracturenode_images_received_total{source}``: instances stored (``dicom``, ``upload``, ``api``);
- ``fracturenode_images_processed_total``, ``..._rejected_total``, ``..._failed_total``: jobs by outcome;
- ``fracturenode_delivery_failures_total``: deliveries that ran out of attempts;
- ``fracturenode_queue_depth{state}``: jobs waiting (``received``, ``queued``) or running (``processing``);
- ``fracturenode_inference_latency_seconds``: a histogram of the processing time of finished jobs (claim to
  result: decode, validity, detection, classification, explanations).

:func:`observe_inference_latency` is for a worker that times the model alone; it feeds
``fracturenode_model_inference_seconds`` in that process's registry (exposed here when the web process runs
inference itself, or across processes with prometheus-client's multiprocess mode:
``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from service.api import root_bp
from service.db import Database
from service.extensions import current_db
from service.models import Delivery, Instance, Job

#: Upper bounds (seconds) of the latency histogram buckets.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

MODEL_INFERENCE_SECONDS = Histogram(
    "fracturenode_model_inference_seconds", "Time spent in the models for one image (this process).",
    buckets=LATENCY_BUCKETS,
)


def observe_inference_latency(seconds: float) -> None:
    """Record how long the models took for one image (call from the worker)."""
    MODEL_INFERENCE_SECONDS.observe(seconds)


def _duration_seconds(db: Database) -> Any:
    if db.is_sqlite:
        return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    return func.extract("epoch", Job.finished_at - Job.started_at)


class DatabaseCollector(Collector):
    """Counts read from the database at each scrape."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        with self.db.session() as session:
            received = session.execute(select(Instance.source, func.count()).group_by(Instance.source)).all()
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            failed_deliveries = session.scalar(select(func.count()).where(Delivery.state == "failed")) or 0
            duration = _duration_seconds(self.db)
            finished = (Job.state == "done") & Job.started_at.is_not(None) & Job.finished_at.is_not(None)
            row = session.execute(select(
                func.count(), func.coalesce(func.sum(duration), 0.0),
                *[func.coalesce(func.sum(case((duration <= bound, 1), else_=0)), 0) for bound in LATENCY_BUCKETS],
            ).where(finished)).one()

        family = CounterMetricFamily("fracturenode_images_received", "Instances stored, by source.",
                                     labels=["source"])
        by_source = {"dicom": 0, "upload": 0, "api": 0}
        by_source.update({str(source): int(count) for source, count in received})
        for source, count in by_source.items():
            family.add_metric([source], count)
        yield family
        for name, state, text in (("processed", "done", "Images analysed with a result."),
                                  ("rejected", "rejected", "Images refused by validation."),
                                  ("failed", "failed", "Images whose analysis failed after all attempts.")):
            yield CounterMetricFamily(f"fracturenode_images_{name}", text, value=jobs.get(state, 0))
        yield CounterMetricFamily("fracturenode_delivery_failures", "Deliveries that ran out of attempts.",
                                  value=failed_deliveries)
        depth = GaugeMetricFamily("fracturenode_queue_depth", "Jobs waiting or running, by state.",
                                  labels=["state"])
        for state in ("received", "queued", "processing"):
            depth.add_metric([state], jobs.get(state, 0))
        yield depth
        count, total, *cumulative = row
        buckets = [(str(bound), int(n)) for bound, n in zip(LATENCY_BUCKETS, cumulative, strict=True)]
        buckets.append(("+Inf", int(count)))
        yield HistogramMetricFamily("fracturenode_inference_latency_seconds",
                                    "Processing time of finished jobs (claim to result).", buckets=buckets,
                                    sum_value=float(total))


def render(db: Database) -> bytes:
    """The exposition text: database counts plus this process's (or all processes') own metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db))
    text = generate_latest(registry)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        own = CollectorRegistry()
        multiprocess.MultiProcessCollector(own)
        return text + generate_latest(own)
    return text + generate_latest(REGISTRY)


@root_bp.get("/metrics")
def metrics() -> Response:
    """Prometheus scrape endpoint (no patient data; unauthenticated like /healthz)."""
    return Response(render(current_db()), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
