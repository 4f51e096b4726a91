"""What the benchmarks share: a FractureNode started as real subprocesses on a temporary data dir, synthetic
radiographs from ``pipeline.synth``, a resident-memory sampler over /proc, and small timing helpers.

Not a benchmark itself; ``bench_*.py`` import it (they put ``bench/`` on ``sys.path`` by being run from it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> str:
    """The CPU as the figures depend on it: model, clock and the widest vector instructions it offers (hosts sold
    under one model name, "AMD EPYC" say, have differed two-fold in the networks' speed between sessions)."""
    cpu, mhz, flags = "unknown CPU", "", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and cpu == "unknown CPU":
                cpu = value.strip()
            elif name == "cpu MHz" and not mhz:
                with contextlib.suppress(ValueError):
                    mhz = f" at {float(value):.0f} MHz"
            elif name == "flags" and not flags:
                flags = set(value.split())
    vector = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2") if flags else ""
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as info:
        mem = f", {int(info.readline().split()[1]) / 1024 / 1024:.0f} GiB RAM"
    detail = ", ".join(x for x in (cpu + mhz, vector) if x)
    return f"{os.cpu_count()} CPU ({detail}){mem}, Python {sys.version.split()[0]}"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def header(title: str) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"load average at start: {load_average()}  ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})")


# --------------------------------------------------------------------------------------------- inputs


def synth_dicoms(out: Path, count: int, long_side: int, seed: int = 7) -> list[Path]:
    """``count`` synthetic DX radiographs (one study each), long side ``long_side`` px; cached by arguments."""
    from pipeline.synth.dataset import generate_dataset

    folder = out / f"synth-{long_side}-{count}-{seed}"
    files = sorted((folder / "dicom").glob("*.dcm")) if folder.exists() else []
    if len(files) != count:
        shutil.rmtree(folder, ignore_errors=True)
        generate_dataset(folder, count, seed, fmt="dicom", long_side=long_side, workers=os.cpu_count() or 1,
                         progress=False)
        files = sorted((folder / "dicom").glob("*.dcm"))
    return files


def copies_with_new_uids(sources: Sequence[Path], out: Path, count: int, *, prefix: str = "c",
                         one_study: bool = False) -> list[Path]:
    """``count`` files cycling over ``sources`` with fresh SOP Instance (and Study/Series) UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(count):
        ds = dcmread(sources[i % len(sources)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study if one_study else generate_uid()
        ds.SeriesInstanceUID = series if one_study else generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def storescu(port: int, files: Sequence[Path], *, called: str = "FRACTURENODE", calling: str = "BENCH",
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, one association for all ``files``, with TCP_NODELAY=1."""
    return subprocess.run(["storescu", "-aec", called, "-aet", calling, "-to", "60", "-ta", "60", "-td", "120",
                           "127.0.0.1", str(port), *map(str, files)],
                          env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ the node


@dataclass
class Node:
    """FractureNode parts (``web``, ``listen``, ``work`` ×N) as subprocesses on a temporary data dir.

    With ``supervised``, the node is started as a user starts it, ``fracture-node run`` (its supervisor
    starts the parts), and :meth:`pids` counts the supervisor too."""

    workdir: Path
    parts: Sequence[str] = ("web", "listen", "work")
    supervised: bool = False
    database_url: str | None = None
    model_dir: Path | None = None
    destinations: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_args: Sequence[str] = ()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = self.workdir / "var"
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = self.database_url or f"sqlite:///{self.data_dir / 'fracture.db'}"

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "FRACTURE_DATA_DIR": str(self.data_dir), "FRACTURE_DATABASE_URL": self.url,
               "FRACTURE_HTTP_PORT": str(self.http_port), "FRACTURE_DICOM_PORT": str(self.dicom_port),
               "FRACTURE_STUDY_QUIET_SECONDS": "0", "FRACTURE_LOG_LEVEL": "INFO",
               "FRACTURE_DESTINATIONS": self.destinations, "FRACTURE_ADMIN_PASSWORD": "bench admin password",
               "PYTHONPATH": str(ROOT)}
        if self.model_dir is not None:
            env["FRACTURE_MODEL_DIR"] = str(self.model_dir)
        env.update(self.extra_env)
        return env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "service.cli", *args], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    def start(self, timeout: float = 180) -> Node:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.supervised:
            self._start_supervised()
        else:
            self._start_parts()
        deadline = time.monotonic() + timeout
        if "listen" in self.parts:
            self._wait(lambda: _port_open(self.dicom_port), deadline, "the DICOM listener")
        if "web" in self.parts:
            self._wait(lambda: _http_ok(f"http://127.0.0.1:{self.http_port}/healthz"), deadline, "the web server")
        return self

    def _start_supervised(self) -> None:
        if self.worker_args:
            raise ValueError("worker_args need the parts started one by one (supervised=False)")
        args = ["run", "--workers", str(sum(1 for part in self.parts if part == "work")),
                *([] if "web" in self.parts else ["--no-web"]), *([] if "listen" in self.parts else ["--no-listen"])]
        log = open(self.workdir / "run-0.log", "ab")  # noqa: SIM115 - kept by the child
        self.procs.append(("run", subprocess.Popen([PYTHON, "-m", "service.cli", *args], env=self.env, cwd=ROOT,
                                                   stdout=log, stderr=subprocess.STDOUT)))
        log.close()

    def _start_parts(self) -> None:
        done = self.cli("db", "upgrade")
        if done.returncode != 0:
            raise RuntimeError(f"migration failed: {done.stderr[-2000:]}")
        for part in self.parts:
            args = [part, *(self.worker_args if part == "work" else ())]
            log = open(self.workdir / f"{part}-{len(self.procs)}.log", "ab")  # noqa: SIM115 - kept by the child
            self.procs.append((part, subprocess.Popen([PYTHON, "-m", "service.cli", *args], env=self.env, cwd=ROOT,
                                                      stdout=log, stderr=subprocess.STDOUT)))
            log.close()

    def wait_workers_ready(self, timeout: float = 300) -> None:
        """Wait until every worker has logged that its models are loaded."""
        deadline = time.monotonic() + timeout
        count = sum(1 for part in self.parts if part == "work")

        def ready() -> bool:
            text = "".join(p.read_text(errors="replace") for p in self.workdir.glob("*.log"))
            return text.count("loaded models") >= count

        self._wait(ready, deadline, "the workers' models")

    def _wait(self, ready: object, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not start; see {self.workdir}")

    def check_alive(self) -> None:
        for part, proc in self.procs:
            if proc.poll() is not None:
                logs = sorted(self.workdir.glob(f"{part}-*.log"))
                tail = logs[-1].read_text()[-3000:] if logs else ""
                raise RuntimeError(f"{part} exited with status {proc.returncode}:\n{tail}")

    def pids(self) -> dict[str, list[int]]:
        """Each part's process and its descendants (gunicorn forks its worker); supervised, the supervisor
        (``run``) alone and each part it started, named by its command line."""
        children = _children_map()

        def tree(root: int) -> list[int]:
            pids, todo = [], [root]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo.extend(children.get(pid, []))
            return pids

        if not self.supervised:
            return {f"{part}#{index}": tree(proc.pid) for index, (part, proc) in enumerate(self.procs)}
        (_, supervisor), = self.procs
        out = {"run": [supervisor.pid]}
        for index, child in enumerate(sorted(children.get(supervisor.pid, []))):
            out[f"{_part_name(child)}#{index}"] = tree(child)
        return out

    def database(self):  # type: ignore[no-untyped-def]
        from service.db import Database

        return Database(self.url)

    def stop(self) -> None:
        for _part, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _part, proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextlib.contextmanager
def running_node(**kwargs: object) -> Iterator[Node]:
    workdir = Path(tempfile.mkdtemp(prefix="fn-bench-"))
    node = Node(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield node.start()
    finally:
        node.stop()
        if not os.environ.get("FRACTURE_BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"(kept {workdir})")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _part_name(pid: int) -> str:
    """The node part a process runs (the last word of ``python -m service.cli PART``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().split(b"\0")
    except OSError:
        return "gone"
    words = [w.decode(errors="replace") for w in words if w]
    return words[-1] if words else "?"


def _proc_number(pid: int, name: str, key: str) -> int:
    """The first number on the ``key`` line of ``/proc/<pid>/<name>``, 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/{name}") as table:
            for line in table:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return _proc_number(pid, "status", "VmRSS:")


def pss_kib(pid: int) -> int:
    return _proc_number(pid, "smaps_rollup", "Pss:")


def written_bytes(pid: int) -> int:
    """Bytes the process has passed to write(2) and its kin so far (``wchar`` of ``/proc/<pid>/io``: files,
    sockets and pipes alike), 0 where it cannot be read."""
    return _proc_number(pid, "io", "wchar:")


def written_by_part(node: Node) -> dict[str, int]:
    """:func:`written_bytes` of each part of ``node`` now (the parts' pids summed)."""
    return {part: sum(written_bytes(pid) for pid in pids) for part, pids in node.pids().items()}


def rss_by_part(node: Node) -> dict[str, int]:
    """The resident set size of each part of ``node`` now, KiB (the parts' pids summed, as the sampler does)."""
    return {part: sum(rss_kib(pid) for pid in pids) for part, pids in node.pids().items()}


def format_parts(kib_by_part: dict[str, int]) -> str:
    return ", ".join(f"{part} {kib / 1024:.0f}" for part, kib in sorted(kib_by_part.items()))


class MemorySampler:
    """Samples the RSS and PSS of every process of a node every ``interval`` seconds; keeps the peaks."""

    def __init__(self, node: Node, interval: float = 0.25) -> None:
        self.node, self.interval = node, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_by_part: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total_rss = total_pss = 0
            for part, pids in self.node.pids().items():
                rss = sum(rss_kib(pid) for pid in pids)
                total_rss += rss
                total_pss += sum(pss_kib(pid) for pid in pids)
                self.peak_by_part[part] = max(self.peak_by_part.get(part, 0), rss)
            self.peak_rss = max(self.peak_rss, total_rss)
            self.peak_pss = max(self.peak_pss, total_pss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        parts = format_parts(self.peak_by_part)
        return (f"peak total RSS {self.peak_rss / 1024:.0f} MiB (PSS {self.peak_pss / 1024:.0f} MiB) over "
                f"{self.samples} samples; per part peak RSS MiB: {parts}")


def job_counts(db) -> dict[str, int]:  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from service.models import Job

    with db.session() as session:
        return dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())


def wait_until(condition: object, timeout: float, what: str, node: Node | None = None, poll: float = 0.2) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if node is not None:
            node.check_alive()
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
