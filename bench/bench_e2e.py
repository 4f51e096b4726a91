"""End-to-end latency: from the start of a C-STORE of one ~2000 px DX image (DCMTK storescu, TCP_NODELAY=1)
to FractureNode's Structured Report being stored in Orthanc (the destination PACS), one study at a time,
with the listener and one worker warm (models loaded, a few warm-up studies first).

    .venv/bin/python bench/bench_e2e.py                  # 50 studies (+3 warm-up), bundled models
    .venv/bin/python bench/bench_e2e.py --studies 10     # quick
    .venv/bin/python bench/bench_e2e.py --models DIR --poll-interval 0.1

Goal: p50 <= 1.5 s on two CPU cores. ``FRACTURE_STUDY_QUIET_SECONDS`` is 0 here (a single-image study is
reported as soon as its job ends); with the default of 10 s every figure grows by those 10 s by design.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import (  # noqa: E402
    ROOT,
    copies_with_new_uids,
    header,
    load_average,
    percentile,
    running_node,
    storescu,
    synth_dicoms,
)

GOAL_P50 = 1.5


def sr_in_orthanc(orthanc, study_uid: str) -> bool:  # type: ignore[no-untyped-def]
    import requests

    response = requests.post(f"{orthanc.url}/tools/find", json={
        "Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}, timeout=5)
    response.raise_for_status()
    return bool(response.json())


def stage_medians(node, studies: list[str]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median time of each stage, from the database's own timestamps: received -> claimed by a worker (queue
    wait, bounded by the worker's poll interval) -> job done -> study reported -> SR delivered."""
    from sqlalchemy import func, select

    from service.models import Artifact, Delivery, Instance, Job, JobEvent, Series, Study

    db = node.database()
    stages: dict[str, list[float]] = {"queue wait": [], "analysis": [], "reporting": [], "delivery": []}
    with db.session() as session:
        for uid in studies:
            study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
            instance = session.scalar(select(Instance).join(Series, Series.id == Instance.series_pk)
                                      .where(Series.study_pk == study.id))
            job = session.scalar(select(Job).where(Job.instance_pk == instance.id))
            claimed = session.scalar(select(func.min(JobEvent.at)).where(JobEvent.job_pk == job.id,
                                                                         JobEvent.state == "processing"))
            delivered = session.scalar(select(func.max(Delivery.delivered_at))
                                       .join(Artifact, Artifact.id == Delivery.artifact_pk)
                                       .where(Artifact.study_pk == study.id, Artifact.kind == "sr"))
            if None in (claimed, job.finished_at, study.reported_at, delivered):
                continue
            stages["queue wait"].append((claimed - instance.received_at).total_seconds())
            stages["analysis"].append((job.finished_at - claimed).total_seconds())
            stages["reporting"].append((study.reported_at - job.finished_at).total_seconds())
            stages["delivery"].append((delivered - study.reported_at).total_seconds())
    db.dispose()
    return {name: percentile(values, 0.5) for name, values in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=2000, help="long side of the DX image, px")
    parser.add_argument("--models", type=Path, default=None, help="model bundles (default: the bundled models)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="worker's queue poll interval, s (default: the worker's own default)")
    parser.add_argument("--timeout", type=float, default=120, help="per study, s")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fn-bench-inputs")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu not found (apt-get install dcmtk)")
    sys.path.insert(0, str(ROOT))
    from tests.orthanc import ORTHANC, OrthancServer

    if not Path(ORTHANC).exists():
        sys.exit("Orthanc not found (apt-get install orthanc)")
    header("end-to-end latency: C-STORE start -> SR stored in Orthanc")
    workdir = Path(tempfile.mkdtemp(prefix="fn-bench-e2e-"))
    orthanc = OrthancServer(workdir / "orthanc")
    orthanc.start()
    try:
        base = synth_dicoms(args.cache, 8, args.size, seed=11)
        files = copies_with_new_uids(base, workdir / "inputs", args.warmup + args.studies)
        from pydicom import dcmread

        studies = [str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
        worker_args = ("--poll-interval", str(args.poll_interval)) if args.poll_interval else ()
        with running_node(parts=("listen", "work"), model_dir=args.models, worker_args=worker_args,
                          destinations=f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}") as node:
            node.wait_workers_ready()
            latencies: list[float] = []
            stores: list[float] = []
            for index, (path, study) in enumerate(zip(files, studies, strict=True)):
                started = time.perf_counter()
                sent = storescu(node.dicom_port, [path])
                if sent.returncode != 0:
                    raise RuntimeError(sent.stderr[-2000:])
                stored = time.perf_counter() - started
                deadline = started + args.timeout
                while not sr_in_orthanc(orthanc, study):
                    node.check_alive()
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"no SR in Orthanc for study {study} after {args.timeout} s; see "
                                           f"{node.workdir}")
                    time.sleep(0.02)
                latency = time.perf_counter() - started
                if index >= args.warmup:
                    latencies.append(latency)
                    stores.append(stored)
                    print(f"  study {index - args.warmup + 1:3d}: C-STORE {stored:.2f} s, "
                          f"SR in Orthanc {latency:.2f} s", flush=True)
            stages = stage_medians(node, studies[args.warmup:])
    finally:
        orthanc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"studies: {len(latencies)} of one {args.size} px DX image; models: {args.models or 'bundled'}")
    print(f"latency p50 {p50:.2f} s, p95 {p95:.2f} s, min {min(latencies):.2f} s, max {max(latencies):.2f} s")
    print(f"median per stage, s: C-STORE {percentile(stores, 0.5):.2f}, " + ", ".join(
        f"{name} {value:.2f}" for name, value in stages.items())
          + f"; the rest (Orthanc storing and indexing, our 20 ms polling) "
          f"{p50 - percentile(stores, 0.5) - sum(stages.values()):.2f}")
    print(f"load average at end: {load_average()}")
    print(f"SUMMARY e2e: p50 {p50:.2f} s, p95 {p95:.2f} s over {len(latencies)} studies; goal p50 <= {GOAL_P50} s "
          f"{'met' if p50 <= GOAL_P50 else 'NOT met'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    main()
