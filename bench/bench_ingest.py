"""Ingest throughput, side by side: DCMTK ``storescu`` (TCP_NODELAY=1) sends the same synthetic radiographs
(a) to DCMTK's own ``storescp`` and (b) to FractureNode's listener (``fracture-node listen``, which stores,
fsyncs, hashes and records every instance and its job in the database). One association per run; the two
receivers alternate, each run on a fresh output folder / data dir; the median run is reported.

    .venv/bin/python bench/bench_ingest.py                     # 512 px ×200 and 2048 px ×40, 3 runs each
    .venv/bin/python bench/bench_ingest.py --quick             # 512 px ×40 and 2048 px ×8, 1 run
    .venv/bin/python bench/bench_ingest.py --database-url postgresql+psycopg2://postgres@127.0.0.1/fn_bench

Unless ``--no-reference``, two reference receivers (``reference_scp.py``) run in the same rotation: FractureNode's
own pynetdicom AE answering Success without doing anything (the stack's ceiling), and the same AE storing each
instance durably as the listener does but recording nothing (the floor durability adds). They show how much of
the gap to storescp is ours to close.

Goal: FractureNode >= 0.5x storescp's images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from node_harness import (  # noqa: E402
    free_port,
    header,
    load_average,
    median,
    running_node,
    storescu,
    synth_dicoms,
)

GOAL = 0.5


def _run_receiver(name: str, argv: list[str], port: int, files: list[Path], out: Path, *, called: str,
                  received: Callable[[], int] | None, env: dict[str, str] | None = None) -> float:
    """Start the receiver ``argv`` (listening on ``port``, writing under ``out``), time storescu sending ``files``
    to it, check with ``received`` (if given) that it holds every file; stop it and remove ``out``."""
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        started = time.perf_counter()
        sent = storescu(port, files, called=called)
        elapsed = time.perf_counter() - started
        if sent.returncode != 0:
            raise RuntimeError(f"storescu -> {name} failed: {sent.stderr[-2000:]}")
        count = received() if received else len(files)
        if count != len(files):
            raise RuntimeError(f"{name} holds {count} of {len(files)} files")
        return elapsed
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def run_storescp(files: list[Path], workdir: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="storescp-"))
    port = free_port()
    return _run_receiver("storescp", ["storescp", "-aet", "STORESCP", "-od", str(out), "-pm", str(port)], port, files,
                         out, called="STORESCP", received=lambda: len(list(out.iterdir())),
                         env={**os.environ, "TCP_NODELAY": "1"})


def run_reference(files: list[Path], workdir: Path, mode: str) -> float:
    """storescu -> ``reference_scp.py`` in ``mode`` (``receive`` or ``durable``)."""
    out = Path(tempfile.mkdtemp(dir=workdir, prefix=f"reference-{mode}-"))
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("reference_scp.py")), str(port), mode, str(out)]

    def stored() -> int:
        return sum(1 for f in out.rglob("*.dcm") if ".tmp" not in f.parts)

    return _run_receiver(f"the {mode} reference", argv, port, files, out, called="FRACTURENODE",
                         received=stored if mode == "durable" else None)


def run_fracturenode(files: list[Path], database_url: str | None) -> float:
    from sqlalchemy import func, select

    from service.models import Instance, Job

    if database_url and database_url.startswith("postgresql"):
        database_url = _fresh_postgres(database_url)
    with running_node(parts=("listen",), database_url=database_url) as node:
        started = time.perf_counter()
        sent = storescu(node.dicom_port, files)
        elapsed = time.perf_counter() - started
        if sent.returncode != 0:
            raise RuntimeError(f"storescu -> FractureNode failed: {sent.stderr[-2000:]}")
        db = node.database()
        with db.session() as session:
            instances = session.scalar(select(func.count()).select_from(Instance))
            jobs = session.scalar(select(func.count()).select_from(Job))
        db.dispose()
        if instances != len(files) or jobs != len(files):
            raise RuntimeError(f"FractureNode recorded {instances} instances and {jobs} jobs for {len(files)} files")
        return elapsed


def _fresh_postgres(url: str) -> str:
    """A new database next to the one named in ``url`` (dropped by the operator; names start fn_bench_)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"fn_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


RECEIVERS = {
    "storescp": "DCMTK storescp",
    "receive": "pynetdicom AE, empty handler",
    "durable": "  + durable store, no database",
    "fracturenode": "FractureNode listener",
}


def bench_set(label: str, files: list[Path], runs: int, workdir: Path, database_url: str | None,
              reference: bool = True) -> float:
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    names = [name for name in RECEIVERS if reference or name in ("storescp", "fracturenode")]
    times: dict[str, list[float]] = {name: [] for name in names}
    for run in range(runs):
        for name in names if run % 2 == 0 else names[::-1]:  # alternate the order between runs
            if name == "storescp":
                times[name].append(run_storescp(files, workdir))
            elif name == "fracturenode":
                times[name].append(run_fracturenode(files, database_url))
            else:
                times[name].append(run_reference(files, workdir, name))
    print(f"{label}: {len(files)} images, {megabytes:.1f} MB, median of {runs} run(s)")
    t_scp = median(times["storescp"])
    for name in names:
        t = median(times[name])
        print(f"  {RECEIVERS[name]:<31}: {len(files) / t:8.1f} images/s {megabytes / t:8.1f} MB/s  "
              f"{t_scp / t:5.2f}x storescp   (runs: {', '.join(f'{x:.2f}s' for x in times[name])})")
    ratio = t_scp / median(times["fracturenode"])
    print(f"  ratio FractureNode/storescp: {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})")
    return ratio


def breakdown(files: list[Path], workdir: Path, label: str) -> str:
    """Where FractureNode's time per image goes, in-process (no network), on SQLite: header parse, store +
    fsync (file and folder), the database transaction alone (its statements and commit, no file), and the
    whole ingest, in which the statements run while the file is being fsynced (the commit waits for it)."""
    import hashlib
    import logging

    from config import Settings
    from service.db import Database, upgrade
    from service.ingest import _record, ingest, read_header
    from service.storage import StoredFile, store_bytes

    logging.disable(logging.INFO)  # one log line per instance is not what is measured here
    workdir = workdir / f"breakdown-{label.split()[0]}"
    datas = [f.read_bytes() for f in files]
    started = time.perf_counter()
    headers = [read_header(data) for data in datas]
    header_ms = (time.perf_counter() - started) / len(datas) * 1000
    started = time.perf_counter()
    for data in datas:
        store_bytes(workdir / "store-only", data)
    store_ms = (time.perf_counter() - started) / len(datas) * 1000

    def database(name: str) -> tuple[Settings, Database]:
        url = f"sqlite:///{workdir / name}"
        upgrade(url)
        settings = Settings.from_env({}, data_dir=workdir / "var", database_url=url, secret_key="bench")  # noqa: S106
        settings.ensure_dirs()
        return settings, Database(url)

    settings, db = database("transaction-only.db")
    started = time.perf_counter()
    for head, data in zip(headers, datas, strict=True):
        digest = hashlib.sha256(data).hexdigest()
        with db.session() as session:
            _record(session, settings, head, StoredFile(workdir / digest, digest, len(data), created=True),
                    source="dicom", calling_ae="BENCH", peer_address="127.0.0.1", uploaded_by_id=None,
                    original_filename=None)
    transaction_ms = (time.perf_counter() - started) / len(datas) * 1000
    db.dispose()
    settings, db = database("breakdown.db")
    started = time.perf_counter()
    for data in datas:
        ingest(db, settings, data)
    ingest_ms = (time.perf_counter() - started) / len(datas) * 1000
    db.dispose()
    return (f"in-process per image: header {header_ms:.1f} ms, store+fsync {store_ms:.1f} ms, database "
            f"transaction alone {transaction_ms:.1f} ms; whole ingest {ingest_ms:.1f} ms (the statements run "
            "while the file is fsynced, the commit after it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=200, help="number of 512 px images")
    parser.add_argument("--large", type=int, default=40, help="number of 2048 px images")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="40 small, 8 large, 1 run")
    parser.add_argument("--database-url", default=None, help="default: SQLite in the node's temporary data dir")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fn-bench-inputs")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the two reference receivers (pynetdicom with an empty / a store-only handler)")
    args = parser.parse_args()
    if args.quick:
        args.small, args.large, args.runs = 40, 8, 1
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install dcmtk)")
    header("ingest throughput: storescu -> storescp vs storescu -> FractureNode listener")
    print(f"database: {args.database_url or 'SQLite (default)'}")
    workdir = Path(tempfile.mkdtemp(prefix="fn-bench-ingest-"))
    try:
        ratios = {}
        for label, count, side in (("small 512 px", args.small, 512), ("large 2048 px", args.large, 2048)):
            if count <= 0:
                continue
            files = synth_dicoms(args.cache, count, side)
            ratios[label] = bench_set(label, files, args.runs, workdir, args.database_url,
                                      reference=not args.no_reference)
            print("  " + breakdown(files, workdir, label))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    worst = min(ratios.values())
    print(f"load average at end: {load_average()}")
    print("SUMMARY ingest: " + ", ".join(f"{k} {v:.2f}x storescp" for k, v in ratios.items())
          + f"; goal >= {GOAL}x {'met' if worst >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
