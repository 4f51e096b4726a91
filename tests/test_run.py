"""The wired pipeline: load_models, analyze, analyze_batch and the analyze command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli_analyze import analyze as analyze_cmd
from pipeline.explain import grad_cam, heatmap_to_original, peak_point
from pipeline.models.bundle import BundleError, read_card, update_card
from pipeline.models.nets import SEG_STRIDE, TypeReader
from pipeline.models.numpy_nets import ReaderPass
from pipeline.models.preprocess import (
    Geometry,
    Patch,
    cut_patch,
    patch_to_original,
    prepare_fracture_input,
    seg_peak,
    seg_peaks,
    standardise_patch,
)
from pipeline.run import (
    BUNDLED_MODEL_DIR,
    ModelSet,
    TypeSite,
    analyze,
    analyze_batch,
    choose_site,
    detection_call,
    load_models,
    run_fracture_models,
)
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.toydata import toy_radiograph, write_untrained_bundles
from pipeline.types import Radiograph

DISCLAIMER = "Research use only. Not for diagnostic use."


@pytest.fixture(scope="module", params=["shared", "reader"])
def model_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The classifier either shares the detector's network or is a second-stage type reader."""
    return write_untrained_bundles(tmp_path_factory.mktemp("bundles"), reader=request.param == "reader")


@pytest.fixture(scope="module")
def models(model_dir: Path) -> ModelSet:
    return load_models(model_dir, runtime="torch")  # the reference runtime: these tests read its tensors


def _image(h: int = 300, w: int = 200) -> np.ndarray:
    img, _m, _b = toy_radiograph(np.random.default_rng(0), True, 1, h=h, w=w)
    return img


def test_analyze_radiograph(models: ModelSet) -> None:
    img = _image()
    a = analyze(Radiograph(pixels=img), models)
    assert a.validity.is_radiograph, a.validity.reason
    assert a.detection is not None and 0.0 <= a.detection.probability <= 1.0
    assert a.detection.model.name == "toy-detector" and len(a.detection.model.sha256) == 64
    assert a.explanation is not None
    assert a.explanation.heatmap.shape == img.shape
    assert a.explanation.edges.shape == img.shape
    assert a.explanation.hybrid.shape == (*img.shape, 3)
    assert a.disclaimer == DISCLAIMER
    assert {m.task for m in a.models} == {"validity", "detect", "classify"}
    if a.classification is not None:
        assert list(a.classification.distribution) == list(FRACTURE_TYPES)
        assert sum(a.classification.distribution.values()) == pytest.approx(1.0, abs=1e-4)


def test_type_is_read_where_the_detector_points(models: ModelSet) -> None:
    img = _image()
    outs = run_fracture_models(Radiograph(pixels=img), models, cams=True)
    assert outs.type_probs.shape == (len(FRACTURE_TYPES),) and outs.type_probs.sum() == pytest.approx(1.0)
    assert outs.type_heatmap is not None and outs.type_heatmap.shape == img.shape
    if not isinstance(models.classifier.model, TypeReader):
        assert outs.type_centre is None
        return
    # The patch is centred on the detector's segmentation peak, and the type map lies inside the patch.
    x, geom = prepare_fracture_input(img, int(models.detector.input_spec["long_side"]))
    with torch.no_grad():
        seg = models.detector.model(x).seg[0, 0].numpy()
    assert outs.type_centre == pytest.approx(seg_peak(seg, geom, SEG_STRIDE))
    _patch, where = cut_patch(img, outs.type_centre, int(models.classifier.input_spec["long_side"]),
                              int(models.classifier.input_spec["patch"]))
    inside = np.zeros(img.shape, bool)
    inside[max(0, where.top):where.top + where.side, max(0, where.left):where.left + where.side] = True
    assert outs.type_heatmap[inside].any() and not outs.type_heatmap[~inside].any()
    assert run_fracture_models(Radiograph(pixels=img), models, cams=False).type_probs == pytest.approx(
        outs.type_probs)


def test_seg_peaks_are_strongest_first_apart_and_off_the_padding() -> None:
    geom = Geometry(160, 144, 80, 72, 80, 80)  # scale 0.5; at 1/8 the last column of cells is padding
    seg = np.zeros((10, 10), np.float32)
    seg[2, 2], seg[2, 3], seg[7, 7], seg[5, 9] = 5.0, 4.0, 3.0, 10.0
    # 16 original px is one cell at this scale: the neighbour of the first peak is cleared.
    assert seg_peaks(seg, geom, SEG_STRIDE, 2, 16.0) == [(40.0, 40.0, 5.0), (120.0, 120.0, 3.0)]
    assert seg_peaks(seg, geom, SEG_STRIDE, 2, 0.0) == [(40.0, 40.0, 5.0), (56.0, 40.0, 4.0)]
    assert seg_peak(seg, geom, SEG_STRIDE) == (40.0, 40.0)
    many = seg_peaks(seg, geom, SEG_STRIDE, 500, 16.0)  # stops when every cell is taken or cleared
    assert 9 <= len(many) < 10 * 9 and all(x < 144 for x, _y, _v in many)
    cells = [(round(y / 16 - 0.5), round(x / 16 - 0.5)) for x, y, _v in many]
    assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 1 for i, a in enumerate(cells) for b in cells[:i])


def test_choose_site_sums_both_networks_evidence() -> None:
    def site(detector: float, reader: float) -> TypeSite:
        return TypeSite((1.0, 1.0), detector, Patch(0, 0, 8), ReaderPass(np.zeros(len(FRACTURE_TYPES)), reader))

    first, second = site(3.0, -2.0), site(2.0, 0.5)
    assert choose_site([first, second]) is second
    assert choose_site([first, site(0.0, 1.0)]) is first  # a tie keeps the stronger peak


def test_with_sites_the_type_is_read_where_both_networks_see_most(tmp_path: Path) -> None:
    """A reader card with ``sites: 3``: the reader reads the detector's three strongest peaks and the type comes
    from the one where detector and reader logits sum highest (recomputed here with the torch modules)."""
    root = write_untrained_bundles(tmp_path, reader=True)
    card = read_card(root / "classifier")
    update_card(root / "classifier", input={**card["input"], "sites": 3})
    models = load_models(root, runtime="torch")
    spec = models.classifier.input_spec
    long_side, size = int(spec["long_side"]), int(spec["patch"])
    moved = 0
    for seed in range(6):
        img, _m, _b = toy_radiograph(np.random.default_rng(seed), True, 1, h=300, w=200)
        outs = run_fracture_models(Radiograph(pixels=img), models, cams=True)
        x, geom = prepare_fracture_input(img, int(models.detector.input_spec["long_side"]))
        with torch.no_grad():
            seg = models.detector.model(x).seg[0, 0].numpy()
        reads = []
        for px, py, value in seg_peaks(seg, geom, SEG_STRIDE, 3, size * max(img.shape) / long_side / 2):
            patch, _where = cut_patch(img, (px, py), long_side, size)
            with torch.no_grad():
                out = models.classifier.model(standardise_patch(patch))
            reads.append((value + float(out.seg.max()), (px, py), out.types[0].numpy()))
        assert len(reads) == 3
        best = max(reads, key=lambda r: r[0])
        moved += best is not reads[0]
        assert outs.type_centre == pytest.approx(best[1])
        z = best[2] / models.classifier.temperature
        assert outs.type_probs == pytest.approx(np.exp(z - z.max()) / np.exp(z - z.max()).sum(), abs=1e-5)
        _patch, where = cut_patch(img, outs.type_centre, long_side, size)
        assert outs.type_heatmap is not None
        inside = np.zeros(img.shape, bool)
        inside[max(0, where.top):where.top + where.side, max(0, where.left):where.left + where.side] = True
        assert not outs.type_heatmap[~inside].any()
    assert moved > 0  # at least one image is read away from the detector's strongest peak


def test_the_fused_call_s_map_averages_the_detector_s_and_the_reader_s_grad_cam(tmp_path: Path) -> None:
    """Where the reader's evidence is fused into the call, the call's map is the mean of the detector's Grad-CAM
    and the reader's Grad-CAM of its evidence over the patch that holds it (recomputed with the torch modules and
    autograd); behind another detector the fusion and the reader's map both drop out."""
    root = write_untrained_bundles(tmp_path, reader=True)
    update_card(root / "classifier", input={**read_card(root / "classifier")["input"], "sites": 3})
    sha = read_card(root / "detector")["weights"]["sha256"]
    fusion = {"detector_sha256": sha, "weights": {"detector_logit": 1.0, "reader_evidence": 1.0}, "bias": 0.0,
              "operating_point": {"threshold": 0.5, "indeterminate_band": [0.5, 0.5]}}
    update_card(root / "classifier", detection_fusion=fusion)
    fused = load_models(root, runtime="torch")
    update_card(root / "classifier", detection_fusion={**fusion, "detector_sha256": "0" * 64})
    alone = load_models(root, runtime="torch")
    assert fused.fusion is not None and alone.fusion is None
    spec = fused.classifier.input_spec
    long_side, size = int(spec["long_side"]), int(spec["patch"])
    for seed in range(3):
        img, _m, _b = toy_radiograph(np.random.default_rng(seed), True, 1, h=300, w=200)
        x, geom = prepare_fracture_input(img, int(fused.detector.input_spec["long_side"]))
        with torch.no_grad():
            feats = fused.detector.model.backbone(x)
        feats.requires_grad_(True)
        out = fused.detector.model.heads(feats)
        det_map = heatmap_to_original(grad_cam(feats, out.detect[0], retain_graph=True), geom)
        seg = out.seg[0, 0].detach().numpy()
        strongest = None
        for px, py, _value in seg_peaks(seg, geom, SEG_STRIDE, 3, size * max(img.shape) / long_side / 2):
            patch, where = cut_patch(img, (px, py), long_side, size)
            rf = fused.classifier.model.features(standardise_patch(patch)).detach().requires_grad_(True)
            evidence = fused.classifier.model.heads(rf).seg.max()
            if strongest is None or float(evidence.detach()) > strongest[0]:
                strongest = (float(evidence.detach()), patch_to_original(grad_cam(rf, evidence), where, img.shape))
        assert strongest is not None
        expected = 0.5 * det_map + 0.5 * strongest[1]
        got = run_fracture_models(Radiograph(pixels=img), fused, cams=True)
        assert got.fused and got.heatmap is not None
        np.testing.assert_allclose(got.heatmap, expected, atol=1e-5)
        assert got.detector_peak == peak_point(det_map)
        assert 0.0 <= got.heatmap.min() and got.heatmap.max() <= 1.0 + 1e-6
        plain = run_fracture_models(Radiograph(pixels=img), alone, cams=True)
        assert not plain.fused and plain.heatmap is not None
        np.testing.assert_allclose(plain.heatmap, det_map, atol=1e-5)
        assert not np.allclose(plain.heatmap, got.heatmap, atol=1e-3)


def test_a_mirrored_look_averages_the_image_s_and_its_mirror_s_passes(tmp_path: Path) -> None:
    """A detection fusion with ``mirror`` runs the whole pass (both scales) on the image and on its left-right
    mirror and averages: the call's logit, the detector's logit, the reader's evidence, the coarse look's logit,
    the type distribution and the call's map (the mirrored pass's flipped back), so an image and its mirror
    get the same result; behind another detector (no fusion) there is one look, as before."""
    root = write_untrained_bundles(tmp_path, reader=True)
    update_card(root / "classifier", input={**read_card(root / "classifier")["input"], "sites": 3})
    sha = read_card(root / "detector")["weights"]["sha256"]
    fusion = {"detector_sha256": sha, "weights": {"detector_logit": 0.7, "reader_evidence": 0.4}, "bias": -0.2,
              "operating_point": {"threshold": 0.5, "indeterminate_band": [0.4, 0.6]},
              "second_scale": {"factor": 2.0, "sites": 1, "platt": {"scale": 1.3, "bias": 0.1}}}
    update_card(root / "classifier", detection_fusion=fusion)
    once = load_models(root)
    update_card(root / "classifier", detection_fusion={**fusion, "mirror": True})
    twice = load_models(root)
    update_card(root / "classifier", detection_fusion={**fusion, "mirror": True, "detector_sha256": "0" * 64})
    alone = load_models(root)
    assert once.fusion is not None and twice.fusion is not None and alone.fusion is None

    def logit(p: float) -> float:
        return float(np.log(p / (1 - p)))

    for seed in range(3):
        img, _m, _b = toy_radiograph(np.random.default_rng(seed), True, 1, h=300, w=200)
        flipped = np.ascontiguousarray(img[:, ::-1])
        a = run_fracture_models(Radiograph(pixels=img), once, cams=True)
        b = run_fracture_models(Radiograph(pixels=flipped), once, cams=True)
        assert abs(a.probability - b.probability) > 1e-4  # one look: the networks are not mirror-symmetric
        got = run_fracture_models(Radiograph(pixels=img), twice, cams=True)
        assert got.fused and got.heatmap is not None and a.heatmap is not None and b.heatmap is not None
        assert logit(got.probability) == pytest.approx(0.5 * (logit(a.probability) + logit(b.probability)), abs=1e-5)
        for name in ("detect_logit", "reader_evidence", "coarse_logit"):
            assert getattr(got, name) == pytest.approx(0.5 * (getattr(a, name) + getattr(b, name)), abs=1e-5)
        np.testing.assert_allclose(got.type_probs, 0.5 * (a.type_probs + b.type_probs), atol=1e-6)
        np.testing.assert_allclose(got.heatmap, 0.5 * (a.heatmap + b.heatmap[:, ::-1]), atol=1e-6)
        assert got.detector_peak == a.detector_peak and got.type_centre == a.type_centre  # the plain look's
        assert got.plain_detect_logit == pytest.approx(a.detect_logit, abs=1e-6) != got.detect_logit
        # The mirror of the image gets the same call, type and (mirrored) map.
        mirror = run_fracture_models(Radiograph(pixels=flipped), twice, cams=True)
        assert mirror.probability == pytest.approx(got.probability, abs=1e-6)
        np.testing.assert_allclose(mirror.type_probs, got.type_probs, atol=1e-6)
        assert mirror.heatmap is not None
        np.testing.assert_allclose(mirror.heatmap[:, ::-1], got.heatmap, atol=1e-6)
        # No fusion behind another detector: one look, the detector's own probability.
        single = run_fracture_models(Radiograph(pixels=img), alone, cams=False)
        assert not single.fused and single.detect_logit == pytest.approx(a.detect_logit, abs=1e-6)
    # FRACTURE_MIRROR_LOOK=off (load_models(mirror=False)): one reading, with the card's one-reading fit.
    update_card(root / "classifier", detection_fusion={**fusion, "mirror": True})
    with pytest.raises(BundleError, match="no single_reading fit"):
        load_models(root, mirror=False)  # a mirrored card without it is refused when the models load
    single_fit = {"weights": {"detector_logit": 1.1, "reader_evidence": 0.2}, "bias": 0.4,
                  "platt": {"scale": 0.9, "bias": -0.3}, "operating_point": {"threshold": 0.3,
                                                                             "indeterminate_band": [0.2, 0.5]}}
    update_card(root / "classifier", detection_fusion={**fusion, "mirror": True, "single_reading": single_fit})
    read_once = load_models(root, mirror=False)
    assert read_once.operating_point == 0.3 and read_once.indeterminate_band == (0.2, 0.5)
    assert load_models(root).operating_point == 0.5  # on: the mirrored fit's
    img, _m, _b = toy_radiograph(np.random.default_rng(0), True, 1, h=300, w=200)
    got = run_fracture_models(Radiograph(pixels=img), read_once, cams=True)
    assert got.plain_detect_logit == got.detect_logit  # one reading
    native = 1.1 * got.detect_logit + 0.2 * got.reader_evidence + 0.4
    assert got.coarse_logit is not None
    z = 0.9 * 0.5 * (native + got.coarse_logit) - 0.3
    assert got.probability == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-6)


def test_without_the_type_map_the_numbers_and_the_detector_map_are_unchanged(models: ModelSet) -> None:
    """What a worker runs (its results carry no type map): the same outputs, one full-size map less."""
    img = _image()
    full = run_fracture_models(Radiograph(pixels=img), models, cams=True)
    lean = run_fracture_models(Radiograph(pixels=img), models, cams=True, type_cam=False)
    assert lean.type_heatmap is None and full.type_heatmap is not None
    assert lean.heatmap is not None and full.heatmap is not None
    np.testing.assert_allclose(lean.heatmap, full.heatmap, atol=1e-6)
    assert lean.probability == pytest.approx(full.probability) and lean.type_probs == pytest.approx(full.type_probs)
    assert lean.type_centre == full.type_centre


def test_separate_classifier_maps_its_heatmap_with_its_own_geometry(tmp_path: Path) -> None:
    models = load_models(write_untrained_bundles(tmp_path, classifier_long_side=200), runtime="torch")
    assert not models.shared_backbone
    img = _image(300, 170)
    outs = run_fracture_models(Radiograph(pixels=img), models)
    net = models.classifier.model
    x, geom = prepare_fracture_input(img, 200)
    with torch.no_grad():
        feats = net.backbone(x)
    feats.requires_grad_(True)
    out = net.heads(feats)
    expected = heatmap_to_original(grad_cam(feats, out.types[0, int(np.argmax(outs.type_probs))]), geom)
    assert outs.type_heatmap is not None and np.allclose(outs.type_heatmap, expected, atol=1e-5)


def test_non_radiograph_stops_after_validity(models: ModelSet) -> None:
    a = analyze(Radiograph(pixels=np.full((200, 200), 0.3, np.float32)), models)
    assert a.validity.verdict == "not_radiograph" and a.detection is None and a.explanation is None
    assert a.disclaimer == DISCLAIMER


def test_analyze_batch(models: ModelSet) -> None:
    results = analyze_batch([Radiograph(pixels=_image()), Radiograph(pixels=_image(180, 240))], models)
    assert len(results) == 2 and all(r.detection is not None for r in results)


def test_detection_call_band() -> None:
    assert detection_call(0.9, 0.3, (0.2, 0.5)) == "fracture"
    assert detection_call(0.35, 0.3, (0.2, 0.5)) == "indeterminate"
    assert detection_call(0.1, 0.3, (0.2, 0.5)) == "no_fracture"
    assert detection_call(0.3, 0.3, (0.3, 0.3)) == "fracture"


def test_corrupted_model_dir_refused(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "models"
    shutil.copytree(model_dir, bad)
    weights = bad / "detector" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="does not match"):
        load_models(bad)
    with pytest.raises(BundleError, match="does not exist"):
        load_models(tmp_path / "missing")


def test_analyze_command_writes_json_and_images(model_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "in" / "knee.png"
    png.parent.mkdir()
    cv2.imwrite(str(png), (_image() * 65535).astype(np.uint16))
    jpg = tmp_path / "in" / "photo.jpg"
    cv2.imwrite(str(jpg), np.dstack([np.full((200, 200), c, np.uint8) for c in (20, 60, 230)]))
    result = CliRunner().invoke(analyze_cmd, [str(png), str(jpg), "--models", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out[0]["validity"]["verdict"] == "radiograph"
    assert out[0]["disclaimer"] == DISCLAIMER
    for name in ("knee.result.json", "knee.heatmap.png", "knee.edges.png", "knee.hybrid.png"):
        assert (png.parent / name).is_file(), name
    assert out[1]["validity"]["verdict"] == "not_radiograph" and "colour" in out[1]["validity"]["reason"]
    text = CliRunner().invoke(analyze_cmd, [str(png), "--models", str(model_dir), "--out", str(tmp_path / "o")])
    assert text.exit_code == 0 and DISCLAIMER in text.output
    assert (tmp_path / "o" / "knee.result.json").is_file()


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "detector" / "model.json").exists(), reason="no bundled models")
def test_default_is_bundled_models() -> None:
    models = load_models()
    assert models.model_dir == BUNDLED_MODEL_DIR and not models.shared_backbone
    assert models.classifier.architecture == "TypeReader"  # the second-stage type reader
    assert models.detector.runtime == "onnx"  # the library's and the command line's default
    synth = pytest.importorskip("pipeline.synth")
    pixels = synth.display_image(synth.render_sample(77, fracture=True, long_side=600))
    a = analyze(Radiograph(pixels=pixels), models)
    assert a.validity.is_radiograph, a.validity.reason
    assert a.detection is not None and a.detection.model.name == "fracturenode-detector"
    assert a.explanation is not None and a.explanation.heatmap.shape == pixels.shape
    assert a.classification is not None and a.classification.model.name == "fracturenode-type-reader"
    # The shipped reader card reads every image as it is and mirrored (session 25): the two get the same result.
    assert models.fusion is not None and models.fusion.get("mirror") is True
    m = analyze(Radiograph(pixels=np.ascontiguousarray(pixels[:, ::-1])), models)
    assert m.detection is not None and m.classification is not None
    assert m.detection.probability == pytest.approx(a.detection.probability, abs=1e-6)
    assert m.classification.top_type == a.classification.top_type
    assert m.explanation is not None
    np.testing.assert_allclose(m.explanation.heatmap[:, ::-1], a.explanation.heatmap, atol=1e-5)


def test_analyze_command_reads_dicom(model_dir: Path, tmp_path: Path) -> None:
    synth = pytest.importorskip("pipeline.synth")
    sample = synth.render_sample(5, fracture=True, long_side=320)
    path = tmp_path / "study.dcm"
    synth.sample_to_dicom(sample).save_as(path, enforce_file_format=True)
    result = CliRunner().invoke(analyze_cmd, [str(path), "--models", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["disclaimer"] == DISCLAIMER
    assert (tmp_path / "study.result.json").is_file()
