"""``bench/bench_inference.py`` on a few small images: it runs the bundled models as inference does and prints
one JSON object with the figures and the machine they were measured on. Figures are printed, never asserted
(benchmarks, not timed tests): what is asserted is that each is there, positive, and labelled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("flags", "readings", "image"), [
    ([], 2, "16-bit PNG"),
    (["--one-reading", "--format", "dicom"], 1, "uncompressed DX DICOM"),
])
def test_bench_inference_prints_its_figures_and_the_machine(flags: list[str], readings: int, image: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_inference.py"), "--runs", "2", "--size", "600",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["image"].endswith(image) and result["readings"] == readings and result["runs"] == 2
    assert max(int(side) for side in result["image"].split()[0].split("x")) == 600
    assert set(result["stages_ms_median"]) == {"decode", "radiograph_check", "fracture_models"}
    assert all(ms > 0 for ms in result["stages_ms_median"].values())
    assert result["core_ms_median"] > 0 and result["core_ms_p90"] >= result["core_ms_median"] > 0
    assert result["machine"].split()[1] == "CPU" and "Python 3." in result["machine"]
