"""bench/device_train.sh, the one-call recipe for training the detector on a lent GPU machine, run here on the
CPU with tiny sets (FN_DEVICE=cpu): every step it takes there (the generator on every core, training, the head
refit, Platt on cal + sel, the bundle and logs in $OUT) runs, so the script does not rot between GPU loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_train.sh"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def test_usage_and_out_are_required(tmp_path: Path) -> None:
    bare = _run([], {})
    assert bare.returncode == 2 and "usage: bash bench/device_train.sh prepare|run" in bare.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    no_out = subprocess.run(["bash", str(SCRIPT), "run"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert no_out.returncode != 0 and "run this through the device tool" in no_out.stderr


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = _run(["run"], {
        "OUT": str(out), "PYTHON": sys.executable, "FN_DEVICE": "cpu", "FN_SKIP_TESTS": "1",
        "FN_TRAIN": "61:24 62:16", "FN_HELD": "va:12:63 cal:12:64 sel:12:65", "FN_MINUTES": "0.15",
        "FN_INIT": "none", "FN_WIDTH": "8", "FN_SEED": "7", "TMPDIR": str(tmp_path),
        "FN_EXTRA": "--long-side 192 --crop 96 --batch-size 8 --head-images 40 --epochs 2",
    })
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "device_train.log").read_text()
    for step in ("synth: 24 radiographs, seed 61", "synth: 16 radiographs, seed 62", "synth: cal, 12 radiographs",
                 "train: 0.15 minutes on cpu", "done:"):
        assert step in log, log
    det = load_bundle(out / "detector", expected_task="detect")
    training = det.card["training"]
    assert training["device"]["type"] == "cpu" and training["seed"] == 7 and training["train_images"] == 40
    assert training["calibration_images"] == 24 and "Platt scaling" in training["calibration"]
    assert det.card["architecture"]["config"]["width"] == 8
    history = [json.loads(line) for line in (out / "checkpoint" / "train_log.jsonl").read_text().splitlines()]
    assert history and "val_auc" in history[-1]
    assert not (out / "checkpoint" / "checkpoint.pt").exists()  # the bundle comes back, not the checkpoint
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("fn-device.")] == []  # its work folder went
