"""Concurrent load: ``--associations`` simultaneous DCMTK ``storescu`` associations each sending ``--images``
radiographs, and at the same time ``--uploaders`` threads posting ``--uploads`` images each to the REST API
(``POST /api/v1/studies``, one API key per thread, loopback only, a 429 retried after its Retry-After with the
same Idempotency-Key; with ``--stow`` each image goes as a DICOMweb STOW-RS request instead, ``POST
/dicomweb/studies``). Then the node works through the queue and delivers to a counting Storage SCP.

Checked from the database and the receiving PACS, not from the senders' word:

- lost: acknowledged by the listener (storescu) or the API (202; STOW-RS: 200) but not recorded: must be 0;
- duplicated: an instance recorded twice, a second job for an instance, a second analysis result for a job,
  an object delivered twice: must be 0;
- refused: what a sender was told was not stored (it knows, and may retry): reported, and an association
  refused outright is retried once after the others finished.

    .venv/bin/python bench/bench_load.py                               # 20 x 50 C-STORE + 8 x 25 uploads
    .venv/bin/python bench/bench_load.py --associations 5 --images 10 --uploaders 2 --uploads 5   # quick
    .venv/bin/python bench/bench_load.py --no-process                  # storage only (no analysis wait)
    .venv/bin/python bench/bench_load.py --associations 0 --stow --no-process   # STOW-RS uploads only
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import (  # noqa: E402
    MemorySampler,
    copies_with_new_uids,
    format_parts,
    free_port,
    header,
    job_counts,
    load_average,
    rss_by_part,
    running_node,
    synth_dicoms,
    wait_until,
    written_by_part,
)


class CountingPACS:
    """A pynetdicom Storage SCP that counts every SOP Instance UID it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.received: Counter[str] = Counter()
        lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 64

        def on_store(event: evt.Event) -> int:
            with lock:
                self.received[str(event.request.AffectedSOPInstanceUID)] += 1
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


def send_association(port: int, files: list[Path]) -> tuple[int, str]:
    done = subprocess.run(["storescu", "-v", "-aec", "FRACTURENODE", "-aet", "LOADTEST", "-to", "60", "-ta", "60",
                           "-td", "300", "127.0.0.1", str(port), *map(str, files)],
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=900)
    return done.returncode, done.stdout + done.stderr


def acknowledged(output: str, files: list[Path]) -> set[str]:
    """SOP Instance UIDs storescu was told were stored (Success response after 'Sending file')."""
    from pydicom import dcmread

    uid_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    ok, current = set(), None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = uid_of.get(sending.group(1).strip())
        elif "Received Store Response" in line and "(Success)" in line and current:
            ok.add(current)
            current = None
    return ok


def stow_body(path: Path) -> tuple[bytes, str]:
    """One image as a STOW-RS request body (multipart/related, one application/dicom part) and its
    Content-Type."""
    boundary = uuid.uuid4().hex
    body = b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes(),
                     f"\r\n--{boundary}--\r\n".encode()))
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def upload_worker(url: str, key: str, files: list[Path], deadline: float,
                  stow: bool = False) -> tuple[set[str], int, int]:
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    ok: set[str] = set()
    refused = retried = 0
    for path in files:
        idem = uuid.uuid4().hex
        while time.monotonic() < deadline:
            if stow:  # STOW-RS: a re-sent instance is a duplicate, no Idempotency-Key needed
                body, content_type = stow_body(path)
                response = session.post(f"{url}/dicomweb/studies", data=body,
                                        headers={"Content-Type": content_type}, timeout=120)
                del body
            else:
                with open(path, "rb") as handle:
                    response = session.post(f"{url}/api/v1/studies", headers={"Idempotency-Key": idem},
                                            files={"file": (path.name, handle, "application/dicom")}, timeout=120)
            if response.status_code == 429 or response.status_code == 503:
                retried += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.status_code == 202 and not stow:
                ok.update(item["sop_instance_uid"] for item in response.json()["items"])
            elif response.status_code == 200 and stow:
                ok.update(item["00081155"]["Value"][0] for item in response.json()["00081199"]["Value"])
            else:
                refused += 1
            break
    return ok, refused, retried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--images", type=int, default=50, help="per association")
    parser.add_argument("--uploaders", type=int, default=8)
    parser.add_argument("--uploads", type=int, default=25, help="per uploader")
    parser.add_argument("--stow", action="store_true",
                        help="uploaders send each image by DICOMweb STOW-RS instead of POST /api/v1/studies")
    parser.add_argument("--size", type=int, default=512, help="long side, px")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--no-process", action="store_true", help="check storage only")
    parser.add_argument("--timeout", type=float, default=1800, help="for the whole run, s")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fn-bench-inputs")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu not found (apt-get install dcmtk)")
    header(f"concurrent load: {args.associations} associations x {args.images} images + "
           f"{args.uploaders} {'STOW-RS' if args.stow else 'API'} uploaders x {args.uploads}")
    from sqlalchemy import func, select

    from service.auth import create_api_key, create_user
    from service.models import AnalysisResult, Delivery, Instance, Job, Study

    deadline = time.monotonic() + args.timeout
    workdir = Path(tempfile.mkdtemp(prefix="fn-bench-load-"))
    pacs = CountingPACS()
    try:
        base = synth_dicoms(args.cache, 10, args.size, seed=31)
        groups = [copies_with_new_uids(base, workdir / f"a{i:02d}", args.images, one_study=True)
                  for i in range(args.associations)]
        upload_groups = [copies_with_new_uids(base, workdir / f"u{i:02d}", args.uploads)
                         for i in range(args.uploaders)]
        parts = ("web", "listen", *(["work"] * (0 if args.no_process else args.workers)))
        with running_node(parts=parts, model_dir=args.models, destinations=f"PACS@127.0.0.1:{pacs.port}",
                          extra_env={"FRACTURE_RETURN_TO_SENDER": "false"}) as node:
            db = node.database()
            keys = []
            with db.session() as session:
                users = [create_user(session, f"loadtest{i}", f"load test password {i}", role="clinician")
                         for i in range(2)]
                session.flush()
                for i in range(args.uploaders):
                    keys.append(create_api_key(session, users[i % 2], f"load {i}")[1])
            url = f"http://127.0.0.1:{node.http_port}"
            idle = rss_by_part(node)
            written_before = written_by_part(node)
            started = time.perf_counter()
            with MemorySampler(node, interval=0.1) as memory, \
                    ThreadPoolExecutor(max_workers=args.associations + args.uploaders) as pool:
                stores = [pool.submit(send_association, node.dicom_port, files) for files in groups]
                uploads = [pool.submit(upload_worker, url, key, files, deadline, args.stow)
                           for key, files in zip(keys, upload_groups, strict=True)]
                store_results = [f.result() for f in stores]
                upload_results = [f.result() for f in uploads]
            elapsed = time.perf_counter() - started
            written = {part: n - written_before.get(part, 0) for part, n in written_by_part(node).items()}
            time.sleep(3.0)
            held = rss_by_part(node)
            acked: set[str] = set()
            failed_associations = []
            for files, (code, output) in zip(groups, store_results, strict=True):
                acked |= acknowledged(output, files)
                if code != 0:
                    failed_associations.append((files, output))
            api_ok = set().union(*(r[0] for r in upload_results)) if upload_results else set()
            api_refused = sum(r[1] for r in upload_results)
            api_retried = sum(r[2] for r in upload_results)
            refused_first = [o for _, o in failed_associations]
            for files, _output in failed_associations:  # a refused association is retried once, as PACS do
                code, output = send_association(node.dicom_port, files)
                acked |= acknowledged(output, files)
            sent_dicom = args.associations * args.images
            print(f"{sent_dicom} images over {args.associations} simultaneous associations and "
                  f"{args.uploaders * args.uploads} API uploads in {elapsed:.1f} s "
                  f"({(sent_dicom + args.uploaders * args.uploads) / elapsed:.1f} images/s)")
            if refused_first:
                reasons = Counter(next((line.strip() for line in o.splitlines() if "Reason:" in line), "?")
                                  for o in refused_first)
                print(f"associations that failed at first: {len(refused_first)}: {dict(reasons)}")
            print(f"API: {len(api_ok)} accepted, {api_refused} refused, {api_retried} retried after 429/503")
            print(f"memory (RSS MiB per part): idle {format_parts(idle)}; peak while receiving "
                  f"{format_parts(memory.peak_by_part)}; held 3 s after the last image {format_parts(held)}")
            print(f"written while receiving (MiB per part, write(2) calls of its processes: files, sockets, pipes): "
                  f"{format_parts({part: n // 1024 for part, n in written.items()})}")
            expected = acked | api_ok
            with db.session() as session:
                rows = session.execute(select(Instance.sop_instance_uid, Instance.id)).all()
            recorded = Counter(uid for uid, _ in rows)
            lost = expected - set(recorded)
            dup_instances = sum(n - 1 for n in recorded.values() if n > 1)
            processed_dups = delivered_dups = 0
            if not args.no_process:
                def finished() -> bool:
                    counts = job_counts(db)
                    if counts.get("queued", 0) or counts.get("processing", 0):
                        return False
                    with db.session() as session:
                        pending = session.scalar(select(func.count()).select_from(Study)
                                                 .where(Study.report_state.in_(("pending", "reporting"))))
                        undelivered = session.scalar(select(func.count()).select_from(Delivery)
                                                     .where(Delivery.state.in_(("pending", "sending"))))
                    return not pending and not undelivered

                waited = wait_until(finished, max(60.0, deadline - time.monotonic()), "the queue to drain", node, 1.0)
                print(f"queue drained {waited:.0f} s after the last image; jobs: {job_counts(db)}")
            with db.session() as session:
                jobs_per_instance = Counter(session.scalars(select(Job.instance_pk)))
                results_per_job = Counter(session.scalars(select(AnalysisResult.job_pk)))
                deliveries = session.execute(select(Delivery.artifact_pk, Delivery.destination, Delivery.state)).all()
            dup_jobs = sum(n - 1 for n in jobs_per_instance.values() if n > 1)
            missing_jobs = len({pk for _, pk in rows} - set(jobs_per_instance))
            if not args.no_process:
                processed_dups = sum(n - 1 for n in results_per_job.values() if n > 1)
                delivered_dups = sum(n - 1 for n in pacs.received.values() if n > 1) + sum(
                    n - 1 for n in Counter((a, d) for a, d, _ in deliveries).values() if n > 1)
                states = Counter(s for _, _, s in deliveries)
                print(f"deliveries: {dict(states)}; objects received by the PACS: {sum(pacs.received.values())} "
                      f"({len(pacs.received)} distinct)")
            db.dispose()
            node.stop()  # flush the parts' logs, then look for the API keys in them (gunicorn's access log too)
            logs = "".join(p.read_text(errors="replace") for p in node.workdir.glob("*.log"))
            leaked = sum(1 for key in keys if key[-20:] in logs)
            print(f"API keys found in the node's logs ({len(logs) // 1024} kB): {leaked}")
    finally:
        pacs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"recorded instances: {len(rows)} ({len(recorded)} distinct) for {len(expected)} acknowledged")
    print(f"lost: {len(lost)}; duplicated: instances {dup_instances}, jobs {dup_jobs}, missing jobs {missing_jobs}, "
          f"analyses {processed_dups}, deliveries {delivered_dups}")
    print(f"load average at end: {load_average()}")
    bad = len(lost) + dup_instances + dup_jobs + missing_jobs + processed_dups + delivered_dups + leaked
    print(f"SUMMARY load: {len(expected)} images acknowledged, {len(lost)} lost, "
          f"{dup_instances + dup_jobs + processed_dups + delivered_dups} duplicated; "
          f"{len(refused_first)} association(s) refused at first; {'OK' if bad == 0 else 'FAILED'}")
    sys.exit(0 if bad == 0 else 1)


if __name__ == "__main__":
    main()
