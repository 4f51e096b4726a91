"""bench/fit_probe.py, the diagnostic behind docs/MODELS.md "Can the networks see the faint kinds where they are?
(session 32)": its box lookup on a hand-made map, and on a toy folder its detector scores ranking images as
`fracture-node evaluate` ranks them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.evaluation.cli import evaluate
from pipeline.training.toydata import write_toy_dataset, write_untrained_bundles
from tests import bench_scripts

fit_probe = bench_scripts.load("fit_probe")


def test_map_in_box_reads_the_cells_over_the_box_grown_by_one_cell() -> None:
    seg = np.zeros((10, 10))
    seg[2, 3] = 5.0  # a cell centred at (28, 20) original px at scale 1 (stride 8)
    seg[8, 8] = 9.0  # far from the box
    assert fit_probe.map_in_box(seg, 1.0, (24, 16, 33, 25)) == 5.0  # the box holds the first cell's centre
    assert fit_probe.map_in_box(seg, 1.0, (33, 25, 40, 30)) == 5.0  # one cell away: inside the grown box
    assert fit_probe.map_in_box(seg, 1.0, (48, 40, 56, 48)) == 0.0  # neither strong cell near
    assert fit_probe.map_in_box(seg, 0.5, (48, 32, 64, 48)) == 5.0  # at half scale a cell spans 16 original px


def test_probe_ranks_images_as_evaluate_ranks_them(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "data", count=16, seed=5, negatives=0)
    models = write_untrained_bundles(tmp_path / "models", reader=True)
    probe = fit_probe.measure(str(data), models, None)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    det = json.loads(out.read_text())["detection"]
    alone = det.get("detector_alone", det)
    assert probe["images"] == 16 and 0 < probe["intact"] < 16
    fractured = probe["all_fractured"]
    assert fractured["detector"] == pytest.approx(alone["auc"], abs=1e-3)
    for score in fit_probe.SCORES:
        assert 0.0 <= fractured[score] <= 1.0, score
    assert sum(kind["images"] for kind in probe["by_type"].values()) == fractured["images"]
