"""Tests for the independent synthetic radiograph simulator (pipeline.altsim)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.altsim import VERSION, generate, render
from pipeline.altsim.anatomy import REGIONS
from pipeline.altsim.cli import altsim
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.datasets import read_generator_layout

SMALL = 320


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("altsim") / "one"
    generate(out, 8, seed=11, fracture_rate=0.5, workers=1, long_side=256, progress=False)
    return out


def test_render_is_deterministic_per_seed_and_index() -> None:
    a = render(7, 3, long_side=256)
    b = render(7, 3, long_side=256)
    c = render(7, 4, long_side=256)
    assert np.array_equal(a["image"], b["image"])
    assert np.array_equal(a["mask"], b["mask"])
    assert (a["box"], a["type"], a["region"]) == (b["box"], b["type"], b["region"])
    assert a["image"].shape != c["image"].shape or not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("kind", FRACTURE_TYPES)
def test_every_type_has_a_mask_whose_box_matches(kind: str) -> None:
    for index in range(2):
        out = render(3, index, fracture_type=kind, long_side=SMALL)
        assert out["fracture"] is True and out["type"] == kind
        mask = out["mask"]
        assert mask.dtype == np.uint8 and mask.shape == out["image"].shape
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert out["box"] == _bbox(mask)
        # a band around the fracture, not the whole bone or image
        assert (mask > 0).mean() < 0.2
        if kind == "greenstick":
            assert out["child"] is True


def test_intact_images_have_empty_masks_and_no_box() -> None:
    for index in range(6):
        out = render(5, index, fracture=False, long_side=256)
        assert out["fracture"] is False and out["type"] is None and out["box"] is None
        assert not out["mask"].any()


@pytest.mark.parametrize("index", range(6))
def test_image_dtype_size_and_range(index: int) -> None:
    out = render(21, index, long_side=288)
    img = out["image"]
    assert img.ndim == 2 and max(img.shape) == 288 and min(img.shape) >= 0.7 * 288
    assert img.dtype == (np.uint16 if out["bits"] == 16 else np.uint8)
    top = np.iinfo(img.dtype).max
    assert int(img.max()) - int(img.min()) > 0.4 * top  # windowed to use the display range
    assert out["region"] in REGIONS and isinstance(out["child"], bool)


def test_default_size_is_drawn_between_700_and_1400() -> None:
    sizes = {max(render(2, i)["image"].shape) for i in range(3)}
    assert all(700 <= s <= 1400 for s in sizes) and len(sizes) > 1


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fracture type"):
        render(1, 0, fracture_type="broken")
    with pytest.raises(ValueError, match="intact"):
        render(1, 0, fracture=False, fracture_type="spiral")
    with pytest.raises(ValueError):
        generate("/nonexistent-never-written", 1, seed=0, workers=0)


def test_importer_reads_the_layout_with_masks_and_boxes(dataset: Path) -> None:
    records = read_generator_layout(dataset)
    assert len(records) == 8
    with open(dataset / "labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames[:9] == ["file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1"]
        rows = list(reader)
    assert {r["fracture"] for r in rows} == {"0", "1"}
    for rec, row in zip(records, rows, strict=True):
        assert rec.path == dataset / row["file"] and rec.path.is_file()
        assert rec.mask is not None and rec.mask.name == rec.path.name
        mask = cv2.imread(str(rec.mask), cv2.IMREAD_UNCHANGED)
        img = cv2.imread(str(rec.path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == img.shape
        assert img.dtype == (np.uint16 if row["bits"] == "16" else np.uint8)
        assert rec.region == row["region"]
        if rec.fracture:
            assert rec.type in FRACTURE_TYPES
            assert rec.box == _bbox(mask)
        else:
            assert rec.type is None and rec.box is None and not mask.any()
            assert row["type"] == "" and row["x0"] == ""
    meta = json.loads((dataset / "altsim.json").read_text())
    assert meta["version"] == VERSION and meta["seed"] == 11 and meta["count"] == 8
    assert meta["args"]["fracture_rate"] == 0.5


def test_two_workers_write_byte_identical_files(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "two"
    generate(other, 8, seed=11, fracture_rate=0.5, workers=2, long_side=256, progress=False)
    assert (other / "labels.csv").read_bytes() == (dataset / "labels.csv").read_bytes()
    for folder in ("images", "masks"):
        names = sorted(p.name for p in (dataset / folder).iterdir())
        assert names == sorted(p.name for p in (other / folder).iterdir())
        for name in names:
            assert (other / folder / name).read_bytes() == (dataset / folder / name).read_bytes()


@pytest.mark.parametrize("rate,expected", [(0.0, {"0"}), (1.0, {"1"})])
def test_fracture_rate_extremes(tmp_path: Path, rate: float, expected: set[str]) -> None:
    generate(tmp_path, 4, seed=3, fracture_rate=rate, long_side=192, progress=False)
    with open(tmp_path / "labels.csv", newline="") as handle:
        assert {row["fracture"] for row in csv.DictReader(handle)} == expected


def test_cli_writes_the_layout(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(altsim, ["--out", str(out), "--count", "3", "--seed", "4", "--fracture-rate", "1",
                                         "--long-side", "256", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    records = read_generator_layout(out)
    assert all(r.fracture and r.box is not None and r.type in FRACTURE_TYPES for r in records)
    meta = json.loads((out / "altsim.json").read_text())
    assert meta["args"]["long_side"] == 256 and meta["count"] == 3


def test_cli_rejects_bad_rate(tmp_path: Path) -> None:
    result = CliRunner().invoke(altsim, ["--out", str(tmp_path / "x"), "--fracture-rate", "1.5"])
    assert result.exit_code != 0


def test_interleaved_monitoring_set_alternates_sources_and_keeps_masks(dataset: Path, tmp_path: Path) -> None:
    """bench/interleave_sets.py: the first rows of a generator folder and an altsim folder, alternating, read by
    the importer with each image's own mask and box."""
    from pipeline.training.toydata import write_toy_dataset
    from tests import bench_scripts

    module = bench_scripts.load("interleave_sets")
    toy = write_toy_dataset(tmp_path / "toy", count=6, seed=5)
    out = tmp_path / "mixed"
    assert module.interleave(out, 4, [toy, dataset]) == 8
    mixed = read_generator_layout(out)
    sources = [read_generator_layout(toy)[:4], read_generator_layout(dataset)[:4]]
    assert [r.path.name.split("_")[0] for r in mixed] == [toy.name, dataset.name] * 4
    for i, rec in enumerate(mixed):
        src = sources[i % 2][i // 2]
        assert (rec.fracture, rec.type, rec.box) == (src.fracture, src.type, src.box)
        assert rec.path.resolve() == src.path.resolve()
        assert (rec.mask is None) == (src.mask is None)
        if rec.mask is not None and src.mask is not None:
            assert rec.mask.resolve() == src.mask.resolve()


def test_spiral_fractures_render_without_numeric_warnings() -> None:
    """The spiral's surface slope once overflowed (cosh of a far-off coordinate); warnings are errors here."""
    for index in range(24):
        out = render(1701, index, fracture_type="spiral", long_side=256)
        assert out["box"] is not None and np.isfinite(out["image"].astype(np.float64)).all()
