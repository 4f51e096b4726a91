"""Synthetic radiograph generator (pipeline.synth): determinism, labels, masks, I/O, negatives, honesty."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from pipeline.synth import (
    NEGATIVE_KINDS,
    REGIONS,
    Negative,
    Sample,
    display_image,
    generate_dataset,
    item_seed,
    render_negative,
    render_sample,
)
from pipeline.synth.cli import synth
from pipeline.synth.dataset import png16
from pipeline.synth.render import draw_labels
from pipeline.taxonomy import FRACTURE_TYPES

SMALL = 320


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _check_sample(s: Sample) -> None:
    assert s.image.dtype == np.uint16 and s.image.ndim == 2
    assert s.mask.dtype == np.uint8 and s.mask.shape == s.image.shape
    assert set(np.unique(s.mask).tolist()) <= {0, 255}
    assert 12 <= s.bits_stored <= 16
    assert int(s.image.max()) <= (1 << s.bits_stored) - 1
    assert s.photometric in ("MONOCHROME1", "MONOCHROME2")
    assert s.laterality in ("L", "R")
    assert s.region in REGIONS
    assert s.pixel_spacing_mm[0] > 0 and s.pixel_spacing_mm[1] > 0
    assert s.window_width > 0
    if s.fracture:
        assert s.fracture_type in FRACTURE_TYPES
        assert s.box is not None and s.box == _bbox(s.mask)
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= s.image.shape[1] and 0 <= y0 < y1 <= s.image.shape[0]
    else:
        assert s.fracture_type is None and s.box is None and not s.mask.any()


def test_determinism_same_seed_same_pixels():
    a = render_sample(1234, long_side=SMALL)
    b = render_sample(1234, long_side=SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.fracture, a.fracture_type, a.region, a.box, a.window_center) == (
        b.fracture, b.fracture_type, b.region, b.box, b.window_center)
    c = render_sample(1235, long_side=SMALL)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_default_size_range_and_long_side():
    s = render_sample(7)
    assert 1024 <= max(s.image.shape) <= 3000
    t = render_sample(7, long_side=300)
    assert max(t.image.shape) == 300


@pytest.mark.parametrize("ftype", FRACTURE_TYPES)
def test_every_type_is_drawn_with_mask_and_box(ftype):
    regions = [REGIONS[(FRACTURE_TYPES.index(ftype) + k) % len(REGIONS)] for k in range(2)]
    for k, region in enumerate(regions):
        s = render_sample(100 + k, fracture_type=ftype, region=region, long_side=SMALL)
        _check_sample(s)
        assert s.fracture and s.fracture_type == ftype and s.region == region
        # the fracture region is a localised part of the image, not the whole frame
        assert 0 < (s.mask > 0).mean() < 0.25


def test_random_labels_cover_all_types_and_regions():
    types, regions, fr = set(), set(), []
    for seed in range(600):
        f, t, r, lat, _child = draw_labels(seed)
        fr.append(f)
        regions.add(r)
        if f:
            types.add(t)
        assert lat in ("L", "R")
    assert types == set(FRACTURE_TYPES)
    assert regions == set(REGIONS)
    assert 0.4 < np.mean(fr) < 0.6


def test_normal_studies_and_fixed_labels():
    for seed in range(3):
        s = render_sample(seed, fracture=False, long_side=SMALL)
        _check_sample(s)
        assert not s.fracture
    for reg in REGIONS:
        s = render_sample(11, region=reg, long_side=SMALL)
        _check_sample(s)
        assert s.region == reg


def test_display_image_is_bone_bright_for_both_photometrics():
    seen = set()
    for seed in range(40):
        s = render_sample(seed, fracture=True, long_side=SMALL)
        seen.add(s.photometric)
        d = display_image(s)
        assert d.dtype == np.float32 and d.shape == s.image.shape
        assert float(d.min()) >= 0.0 and float(d.max()) <= 1.0
        x0, y0, x1, y1 = s.box
        # the fracture sits in bone, which is brighter than the frame as a whole
        assert float(np.percentile(d[y0:y1, x0:x1], 90)) > float(np.median(d))
        if len(seen) == 2 and seed > 8:
            break
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _logreg_cv_auc(X: np.ndarray, y: np.ndarray, folds: int = 5) -> float:
    idx = np.random.default_rng(0).permutation(len(y))
    scores = np.zeros(len(y))
    for k in range(folds):
        te = idx[k::folds]
        tr = np.setdiff1d(idx, te)
        mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-9
        A, B = (X[tr] - mu) / sd, (X[te] - mu) / sd
        w, b = np.zeros(X.shape[1]), 0.0
        for _ in range(400):
            p = 1 / (1 + np.exp(-(A @ w + b)))
            w -= 0.5 * (A.T @ (p - y[tr]) / len(tr) + 0.01 * w)
            b -= 0.5 * float(np.mean(p - y[tr]))
        scores[te] = B @ w + b
    return _auc(scores, y)


def test_no_global_statistic_shortcut():
    """A logistic regression on global image statistics must not predict fracture presence (AUC < 0.65)."""
    feats, labels = [], []
    for seed in range(220):
        ls = 192 + (item_seed(99, seed) % 96)  # size varies, independently of the label
        s = render_sample(50_000 + seed, long_side=ls)
        d = display_image(s)
        raw = s.image.astype(np.float64) / s.max_value
        hist = np.histogram(d, bins=16, range=(0, 1))[0] / d.size
        feats.append([d.mean(), d.std(), raw.mean(), raw.std(), *s.image.shape, s.image.shape[0] / s.image.shape[1],
                      s.bits_stored, s.pixel_spacing_mm[0], s.window_center / s.max_value,
                      s.window_width / s.max_value, *hist])
        labels.append(int(s.fracture))
    X, y = np.array(feats, float), np.array(labels, float)
    assert 0.3 < y.mean() < 0.7
    auc = _logreg_cv_auc(X, y)
    assert auc < 0.65, f"global statistics predict the label: AUC={auc:.3f}"


@pytest.mark.parametrize("ftype", [t for t in FRACTURE_TYPES if t != "greenstick"])
def test_same_seed_normal_and_fractured_differ_only_at_the_fracture(ftype):
    """Anatomy, positioning, confounders and exposure come from label-independent streams."""
    k = FRACTURE_TYPES.index(ftype)
    f = render_sample(900 + k, fracture_type=ftype, long_side=SMALL)
    n = render_sample(900 + k, fracture=False, long_side=SMALL)
    assert (f.image.shape, f.region, f.laterality, f.confounders, f.photometric, f.bits_stored) == (
        n.image.shape, n.region, n.laterality, n.confounders, n.photometric, n.bits_stored)
    far = cv2.dilate(f.mask, np.ones((25, 25), np.uint8)) == 0
    diff = np.abs(display_image(f) - display_image(n))
    assert float(diff[far].mean()) < 0.02
    assert float(diff[~far].mean()) > float(diff[far].mean())


def test_confounders_independent_of_label():
    counts = {True: {}, False: {}}
    n = {True: 0, False: 0}
    for seed in range(160):
        f, *_ = draw_labels(seed)
        s = render_sample(seed, long_side=160)
        n[f] += 1
        for c in s.confounders:
            counts[f][c] = counts[f].get(c, 0) + 1
    for c in ("marker", "collimation", "skin_fold", "nutrient_canal"):
        p1 = counts[True].get(c, 0) / n[True]
        p0 = counts[False].get(c, 0) / n[False]
        assert abs(p1 - p0) < 0.2, (c, p1, p0)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dataset_layout_png_dicom_and_byte_identical(tmp_path):
    a = generate_dataset(tmp_path / "a", 6, seed=5, fmt="both", long_side=256, negatives=4, progress=False,
                         compress=True)
    with open(a / "labels.csv", newline="") as fh:
        header = fh.readline().strip()
    assert header.startswith("file,fracture,type,region,laterality,x0,y0,x1,y1")
    rows = _read_csv(a / "labels.csv")
    assert len(rows) == 6
    study_uids, sop_uids = set(), set()
    for i, row in enumerate(rows):
        img = cv2.imread(str(a / row["file"]), cv2.IMREAD_UNCHANGED)
        assert row["file"].startswith("images/") and img.dtype == np.uint16
        mask = cv2.imread(str(a / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == img.shape
        s = render_sample(int(row["seed"]), fracture=row["fracture"] == "1", long_side=256)
        assert s.seed == item_seed(5, i)
        assert np.array_equal(img, png16(s)) and np.array_equal(mask, s.mask)
        if row["fracture"] == "1":
            assert row["type"] in FRACTURE_TYPES
            box = tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))
            assert box == _bbox(mask) == s.box
        else:
            assert row["type"] == "" and row["x0"] == "" and not mask.any()
        ds = pydicom.dcmread(a / row["dicom"])
        assert ds.Modality in ("DX", "CR")
        assert ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert (ds.Rows, ds.Columns) == img.shape
        assert ds.PhotometricInterpretation == s.photometric == row["photometric"]
        assert ds.BitsStored == s.bits_stored and ds.HighBit == s.bits_stored - 1 and ds.BitsAllocated == 16
        assert float(ds.PixelSpacing[0]) == pytest.approx(float(row["spacing"]), rel=1e-5)
        assert ds.Laterality == row["laterality"]
        assert ds.BodyPartExamined in ("FOREARM", "LEG", "FEMUR", "HUMERUS", "HAND")
        assert np.array_equal(ds.pixel_array, s.image)
        assert float(ds.WindowCenter) == pytest.approx(s.window_center, abs=0.06)
        study_uids.add(ds.StudyInstanceUID)
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.SeriesInstanceUID not in (ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert len(sop_uids) == 6 and len(study_uids) == 6
    negs = _read_csv(a / "negatives.csv")
    assert len(negs) == 4 and all(r["kind"] in NEGATIVE_KINDS for r in negs)
    assert all((a / r["file"]).exists() for r in negs)

    b = generate_dataset(tmp_path / "b", 6, seed=5, fmt="both", long_side=256, negatives=4, progress=False,
                         compress=True, workers=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert _sha(a / rel) == _sha(b / rel), rel


def test_dicom_window_matches_display_image():
    """A DICOM viewer's VOI LUT (+ MONOCHROME1 inversion) shows exactly what display_image returns."""
    from pydicom.pixels import apply_voi_lut

    from pipeline.synth import sample_to_dicom

    seen = set()
    for seed in range(8):
        s = render_sample(seed, long_side=200)
        ds = sample_to_dicom(s)
        seen.add(ds.PhotometricInterpretation)
        y = apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / ((1 << ds.BitsStored) - 1)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            y = 1.0 - y
        assert np.abs(y - display_image(s)).max() < 1e-4
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_cli_writes_dicom_only(tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(synth, ["--out", str(out), "--count", "3", "--seed", "9", "--format", "dicom",
                                     "--long-side", "200", "--fracture-rate", "1.0", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = _read_csv(out / "labels.csv")
    assert len(rows) == 3 and all(r["fracture"] == "1" for r in rows)
    assert all(r["file"].endswith(".dcm") and (out / r["file"]).exists() for r in rows)
    assert not (out / "images").exists()
    assert all((out / r["mask"]).exists() for r in rows)


def _colourfulness(img: np.ndarray) -> float:
    f = img.astype(np.float32)
    return float(np.mean(np.abs(f[..., 0] - f[..., 1]) + np.abs(f[..., 1] - f[..., 2])))


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
def test_negative_kinds(kind):
    n = render_negative(3, kind=kind, long_side=256)
    assert isinstance(n, Negative) and n.kind == kind
    assert n.image.dtype == np.uint8 and max(n.image.shape[:2]) == 256
    again = render_negative(3, kind=kind, long_side=256)
    assert np.array_equal(n.image, again.image)
    img = n.image
    if kind in ("photo", "screenshot", "colour"):
        assert img.ndim == 3 and img.shape[2] == 3 and _colourfulness(img) > 5
    else:
        assert img.ndim == 2
    g = img if img.ndim == 2 else img.mean(axis=2)
    if kind == "blank":
        assert g.std() < 2
    elif kind == "noise":
        assert g.std() > 8 and np.abs(np.diff(g.astype(float), axis=1)).mean() > 3
    elif kind == "document":
        assert np.median(g) > 200 and (g < 128).mean() > 0.002
    elif kind in ("ct_slice", "mr_slice", "ultrasound"):
        h, w = g.shape
        corners = np.concatenate([g[:8, :8].ravel(), g[-8:, -8:].ravel(), g[:8, -8:].ravel()])
        assert corners.mean() < 30 and g[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean() > 25


def test_negative_random_kind_and_unknown_kind():
    kinds = {render_negative(s, long_side=64).kind for s in range(60)}
    assert kinds == set(NEGATIVE_KINDS)
    with pytest.raises(ValueError):
        render_negative(0, kind="xray")
    with pytest.raises(ValueError):
        render_sample(0, fracture_type="broken")


def _visibility():  # type: ignore[no-untyped-def]
    from tests import bench_scripts

    return bench_scripts.load("visibility")


def test_the_intact_twin_differs_only_at_the_fracture_and_the_noise_draws_only_in_noise() -> None:
    """bench/visibility.py: the twin is the same radiograph with the fracture undone (every other draw kept), so
    a hairline's twin differs from it only near the fracture's mask; another noise draw changes the noise and
    nothing else; and the matched filter's d' comes out finite and positive."""
    vis = _visibility()
    seed = item_seed(4242, 0)
    frac = render_sample(seed, fracture_type="hairline", long_side=512)
    with vis.intact_twin():
        twin = render_sample(seed, fracture_type="hairline", long_side=512)
    assert frac.mask.any() and not twin.mask.any()  # no cut surface is drawn in the whole bone
    a, b = display_image(frac), display_image(twin)
    near = cv2.dilate((frac.mask > 0).astype(np.uint8), np.ones((13, 13), np.uint8)) > 0
    assert np.abs(a - b)[near].max() > 0.01  # the line is there in one and not the other
    assert np.abs(a - b)[~near].max() < 0.01  # and nothing else differs beyond the window's tiny shift
    with vis.intact_twin(), vis.other_noise(1):
        other = display_image(render_sample(seed, fracture_type="hairline", long_side=512))
    assert 0.002 < float(np.std(other - b)) < 0.2 and abs(float(np.mean(other - b))) < 0.01
    assert render_sample(seed, fracture_type="hairline", long_side=512).params == frac.params  # nothing leaked out
    row = vis.measure((seed, "hairline", 512, 4, 6))
    assert row["type"] == "hairline" and 0 < row["d_prime"] < float("inf") and row["signal_energy"] > 0
    summary = vis.summarise([row, {**row, "d_prime": 0.5}])
    assert summary["by_type"]["hairline"]["share_d_below_1"] == 0.5
    assert summary["by_type"]["hairline"]["known_location_auc"] == pytest.approx(
        (vis.phi(row["d_prime"] / 2 ** 0.5) + vis.phi(0.5 / 2 ** 0.5)) / 2, abs=1e-4)
