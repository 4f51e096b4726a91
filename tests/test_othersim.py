"""Tests for bench/othersim.py, the independent synthetic radiograph simulator used for out-of-family evaluation.

The simulator is loaded from its file (it is a bench script, not a package); only the project's importer
(``pipeline.training.datasets.read_generator_layout``) is used to read its output back.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.training.datasets import read_generator_layout
from tests import bench_scripts

othersim = bench_scripts.load("othersim", register=True)  # its workers pickle its functions by name
N = 8


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("othersim") / "one"
    assert othersim.main(["--out", str(out), "--count", str(N), "--seed", "7", "--workers", "1"]) == 0
    return out


def _rows(root):
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_layout_is_read_by_the_project_importer(generated):
    header = (generated / "labels.csv").read_text().splitlines()[0].split(",")
    assert header[:9] == ["file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1"]
    records = read_generator_layout(generated)
    assert len(records) == N
    assert all(r.path.is_file() and r.mask is not None for r in records)
    assert (generated / "othersim.json").is_file()


def test_labels_boxes_and_masks_agree(generated):
    rows = _rows(generated)
    assert any(r["fracture"] == "1" for r in rows) and any(r["fracture"] == "0" for r in rows)
    for r in rows:
        img = cv2.imread(str(generated / r["file"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(generated / "masks" / Path(r["file"]).name), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 2 and img.dtype in (np.uint8, np.uint16)
        assert mask.shape == img.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert 700 <= max(img.shape) <= 2500
        assert r["laterality"] in ("left", "right") and r["region"]
        if r["fracture"] == "1":
            assert r["type"] in othersim.TYPES
            x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
            assert 0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0]
            inside = mask[y0:y1, x0:x1]
            assert inside.any()
            assert mask.sum() == inside.sum(), "mask nonzero outside its box"
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        else:
            assert r["type"] == "" and all(r[k] == "" for k in ("x0", "y0", "x1", "y1"))
            assert not mask.any()


def test_same_seed_same_bytes_whatever_the_workers(generated, tmp_path):
    other = tmp_path / "two"
    assert othersim.main(["--out", str(other), "--count", "4", "--seed", "7", "--workers", "2"]) == 0
    for r in _rows(other):
        name = Path(r["file"]).name
        assert (other / r["file"]).read_bytes() == (generated / r["file"]).read_bytes()
        assert (other / "masks" / name).read_bytes() == (generated / "masks" / name).read_bytes()
    assert _rows(other) == _rows(generated)[:4]


@pytest.mark.parametrize("ftype", othersim.TYPES)
def test_every_type_can_be_produced(ftype):
    r = othersim.render(11, 3, fracture_type=ftype, size_range=(700, 900))
    assert r["fracture"] and r["type"] == ftype
    x0, y0, x1, y1 = r["box"]
    m = r["mask"]
    assert m[y0:y1, x0:x1].any() and m.sum() == m[y0:y1, x0:x1].sum()
    assert 700 <= max(m.shape) <= 900 and r["image"].shape == m.shape
    if ftype == "greenstick":
        assert r["child"]


def test_forced_normal():
    r = othersim.render(11, 3, fracture=False, size_range=(700, 900))
    assert not r["fracture"] and r["type"] == "" and r["box"] is None and not r["mask"].any()
