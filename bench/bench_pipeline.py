"""Pipeline throughput and the node's peak memory, in one run.

The whole node runs as a user starts it, ``fracture-node run`` (its supervisor, the web server, the listener and
``--workers`` workers with the models loaded; SQLite in a temporary data dir; a DCMTK ``storescp`` as the
destination PACS). ``storescu`` pushes ``--images``
synthetic DX radiographs (one study each) to the listener as fast as it takes them, so that every worker is
busy; each image then goes through decode + validity + detection + classification + Grad-CAM + explanation
PNGs, and each study through SC + GSPS + SR encoding and delivery.

Throughput = images / (first job claimed -> last study reported), from the database's own timestamps.
Memory = the peak, sampled every 0.25 s from /proc, of the sum of the resident set sizes (RSS) of every node
process (the supervisor, web incl. its gunicorn worker, listener, workers); PSS (shared pages divided among the
processes that share them) is printed beside it.

    .venv/bin/python bench/bench_pipeline.py                     # 60 images, 2000 px, 1 worker (the memory goal)
    .venv/bin/python bench/bench_pipeline.py --workers 2         # all cores busy
    .venv/bin/python bench/bench_pipeline.py --images 10 --size 1024 --models DIR   # quick

Goal (memory): <= 512 MB for the whole node with one worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import (  # noqa: E402
    MemorySampler,
    copies_with_new_uids,
    free_port,
    header,
    job_counts,
    load_average,
    running_node,
    storescu,
    synth_dicoms,
    wait_until,
)

MEMORY_GOAL_MB = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=2000, help="long side, px")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--models", type=Path, default=None, help="model bundles (default: the bundled models)")
    parser.add_argument("--runtime", choices=("onnx", "numpy", "torch"), default="onnx",
                        help="FRACTURE_MODEL_RUNTIME of the workers (onnx is the default)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fn-bench-inputs")
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install dcmtk)")
    header(f"pipeline throughput and peak memory: web + listener + {args.workers} worker(s)")
    from sqlalchemy import func, select

    from service.models import Job, JobEvent, Study

    workdir = Path(tempfile.mkdtemp(prefix="fn-bench-pipeline-"))
    sink_port = free_port()
    (workdir / "pacs").mkdir()
    sink = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(workdir / "pacs"), str(sink_port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        base = synth_dicoms(args.cache, min(args.images, 12), args.size, seed=21)
        files = copies_with_new_uids(base, workdir / "inputs", args.images)
        parts = ("web", "listen", *(["work"] * args.workers))
        with running_node(parts=parts, supervised=True, model_dir=args.models,
                          destinations=f"PACS@127.0.0.1:{sink_port}",
                          extra_env={"FRACTURE_MODEL_RUNTIME": args.runtime}) as node:
            node.wait_workers_ready()
            db = node.database()
            with MemorySampler(node) as memory:
                time.sleep(1.0)
                idle = memory.peak_rss
                idle_parts = dict(memory.peak_by_part)
                started = time.perf_counter()
                sent = storescu(node.dicom_port, files)
                if sent.returncode != 0:
                    raise RuntimeError(sent.stderr[-2000:])
                received = time.perf_counter() - started

                def all_reported() -> bool:
                    with db.session() as session:
                        return session.scalar(select(func.count()).select_from(Study)
                                              .where(Study.report_state == "reported")) == len(files)

                wait_until(all_reported, args.timeout, "every study to be reported", node, poll=0.5)
                wall = time.perf_counter() - started
            with db.session() as session:
                first_claim = session.scalar(select(func.min(JobEvent.at)).where(JobEvent.state == "processing"))
                last_report = session.scalar(select(func.max(Study.reported_at)))
                last_job = session.scalar(select(func.max(Job.finished_at)))
            states = job_counts(db)
            db.dispose()
        delivered = len(list((workdir / "pacs").iterdir()))
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    span = (last_report - first_claim).total_seconds()
    jobs_span = (last_job - first_claim).total_seconds()
    rate = len(files) / span
    print(f"images: {len(files)} x {args.size} px DX; workers: {args.workers}; models: {args.models or 'bundled'}"
          f" ({args.runtime} runtime)")
    print(f"C-STORE of all images took {received:.1f} s; wall time to the last report {wall:.1f} s")
    print(f"jobs: {states}; objects delivered to the PACS: {delivered}")
    print(f"pipeline throughput: {rate:.2f} images/s ({span / len(files):.2f} s per image; analysis alone "
          f"{len(files) / jobs_span:.2f} images/s)")
    print(f"memory: {memory.report()}")
    print(f"memory idle, models loaded: total RSS {idle / 1024:.0f} MiB; per part "
          + ", ".join(f"{part} {kib / 1024:.0f}" for part, kib in sorted(idle_parts.items())))
    peak_mb = memory.peak_rss / 1024
    print(f"load average at end: {load_average()}")
    print(f"SUMMARY pipeline: {rate:.2f} images/s with {args.workers} worker(s); peak node RSS {peak_mb:.0f} MiB "
          f"(PSS {memory.peak_pss / 1024:.0f} MiB); memory goal <= {MEMORY_GOAL_MB} MB "
          f"{'met' if peak_mb * 1.048576 <= MEMORY_GOAL_MB else 'NOT met'}")


if __name__ == "__main__":
    main()
