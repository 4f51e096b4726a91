"""``bench/bench_ingest.py`` on a handful of images: the four receivers (storescp, the two pynetdicom
references, FractureNode) each receive every image, the script checks that and prints a figure for each, and
the SUMMARY line comes last. Figures are printed, never asserted (benchmarks, not timed tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK not installed (.ci/run installs it)")


def test_bench_ingest_runs_every_receiver_on_every_image(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ingest.py"), "--small", "4", "--large", "0",
                           "--runs", "1", "--cache", str(tmp_path / "inputs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for label in ("DCMTK storescp", "pynetdicom AE, empty handler", "+ durable store, no database",
                  "FractureNode listener"):
        line = next((line for line in out.splitlines() if label in line and "images/s" in line), None)
        assert line is not None, f"no figure for {label!r}:\n{out}"
        assert re.search(r"\d+\.\d images/s .* \d+\.\d\dx storescp", line), line
    assert out.strip().splitlines()[-1].startswith("SUMMARY ingest: small 512 px ")


def test_reference_receiver_refuses_an_unknown_mode(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "reference_scp.py"), "0", "fast", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "mode must be one of" in done.stderr
