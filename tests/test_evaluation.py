"""Evaluation: metric functions on known cases, and the evaluate command end to end on a toy folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.evaluation.cli import evaluate
from pipeline.evaluation.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    roc_auc,
    sens_spec,
    sensitivity_at_specificity,
)
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.toydata import write_toy_dataset, write_untrained_bundles
from tests import bench_scripts

per_image_breakdown = bench_scripts.load("per_image_breakdown")
looks = bench_scripts.load("looks")
paired = bench_scripts.load("paired")


def test_auc_known_values() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_sens_spec_and_sens_at_spec() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    y = np.array([0, 0, 1, 0, 1, 1])
    assert sens_spec(p, y, 0.5) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert sensitivity_at_specificity(p, y, 0.66) == pytest.approx(1.0)
    assert sensitivity_at_specificity(p, y, 0.9) == pytest.approx(2 / 3)


def test_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = rng.random(20000) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.full(1000, 0.9), np.zeros(1000)) == pytest.approx(0.9)


def test_confusion_and_f1() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert accuracy(cm) == pytest.approx(0.75)
    assert macro_f1(cm) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def _per_image_rows(path: Path, labels: np.ndarray, call: np.ndarray, alone: np.ndarray) -> Path:
    with open(path, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["file", "kind", "fracture", "probability", "detector_probability"])
        out.writerow(["neg.png", "photo", "", "0.99", "0.99"])  # a negative: not scored
        for i, (y, p, q) in enumerate(zip(labels, call, alone, strict=True)):
            out.writerow([f"{i}.png", "radiograph", int(y), f"{p:.5f}", f"{q:.5f}"])
    return path


def test_paired_bootstrap_scores_the_difference_on_the_same_images(tmp_path: Path) -> None:
    """bench/paired.py: each set's AUC as evaluate scores it, the difference and its paired interval; the same
    rows twice differ by exactly 0; rows that label an image differently are not the same data."""
    rng = np.random.default_rng(4)
    y = rng.random(300) < 0.5
    noise = rng.normal(0, 1, 300)
    base = _per_image_rows(tmp_path / "a.csv", y, 1 / (1 + np.exp(-(noise + 0.8 * y))), rng.random(300))
    new = _per_image_rows(tmp_path / "b.csv", y, 1 / (1 + np.exp(-(noise + 1.6 * y))), rng.random(300))
    got = paired.paired(base, new, boot=300, seed=2)
    assert got["images"] == 300 and got["fractured"] == int(y.sum())
    call = got["probability"]
    expected = roc_auc(1 / (1 + np.exp(-(noise + 1.6 * y))), y.astype(int))
    assert call["new_auc"] == pytest.approx(expected, abs=1e-4)
    assert call["difference"] == pytest.approx(call["new_auc"] - call["base_auc"], abs=2e-4)
    assert call["difference"] > 0.05
    lo, hi = call["interval_95"]
    assert 0 < lo < call["difference"] < hi and call["new_ahead_share"] == 1.0
    same = paired.paired(base, base, boot=50)["detector_probability"]
    assert same["difference"] == 0 and same["interval_95"] == [0, 0] and same["new_ahead_share"] == 0
    _per_image_rows(tmp_path / "c.csv", ~y, rng.random(300), rng.random(300))
    with pytest.raises(ValueError, match="label the same image differently"):
        paired.paired(base, tmp_path / "c.csv", boot=10)
    assert "type_macro_f1" not in got and "pointing_game" not in got  # rows without those columns


def test_paired_scores_several_new_sets_as_the_mean_of_their_calls(tmp_path: Path) -> None:
    """bench/paired.py with several --new files: one set whose call is the sigmoid of the sets' mean logit, image
    by image (a set averaged with itself is itself); no type or map statistics for a mean of calls."""
    rng = np.random.default_rng(9)
    y = rng.random(300) < 0.5
    pa = 1 / (1 + np.exp(-(rng.normal(0, 1, 300) + 0.8 * y)))
    pb = 1 / (1 + np.exp(-(rng.normal(0, 1, 300) + 0.8 * y)))
    a = _per_image_rows(tmp_path / "a.csv", y, pa, pa)
    b = _per_image_rows(tmp_path / "b.csv", y, pb, pb)
    got = paired.paired(a, [a, b], boot=100, seed=1)
    logit = lambda p: np.log(np.round(p, 5) / (1 - np.round(p, 5)))  # noqa: E731 - the rows hold 5 decimals
    mean = 1 / (1 + np.exp(-(logit(pa) + logit(pb)) / 2))
    assert got["probability"]["new_auc"] == pytest.approx(roc_auc(mean, y.astype(int)), abs=1e-4)
    assert got["probability"]["new_auc"] != pytest.approx(got["probability"]["base_auc"], abs=1e-4)
    itself = paired.paired(a, [a, a], boot=50)["probability"]
    assert itself["difference"] == 0 and itself["interval_95"] == [0, 0]
    assert "type_macro_f1" not in got and "pointing_game" not in got
    _per_image_rows(tmp_path / "c.csv", ~y, pb, pb)
    with pytest.raises(ValueError, match="new files label the same image differently"):
        paired.paired(a, [b, tmp_path / "c.csv"], boot=10)


def _typed_rows(path: Path, labels: np.ndarray, truth: np.ndarray, predicted: np.ndarray, hits: np.ndarray) -> Path:
    with open(path, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["file", "kind", "fracture", "type", "probability", "detector_probability", "predicted_type",
                      "peak_in_box"])
        for i, (y, t, p, h) in enumerate(zip(labels, truth, predicted, hits, strict=True)):
            out.writerow([f"{i}.png", "radiograph", int(y), FRACTURE_TYPES[t] if y else "", "0.5", "0.5",
                          FRACTURE_TYPES[p], int(h) if y else ""])
    return path


def test_paired_bootstrap_scores_the_type_and_the_map_on_the_same_images(tmp_path: Path) -> None:
    """bench/paired.py on rows with types and map hits: the macro-F1 and pointing game of each set over the
    fractured images (intact ones do not count), the difference and its paired interval."""
    rng = np.random.default_rng(7)
    y = rng.random(400) < 0.5
    truth = rng.integers(0, len(FRACTURE_TYPES), 400)
    guess = rng.integers(0, len(FRACTURE_TYPES), 400)
    better = np.where(rng.random(400) < 0.8, truth, guess)
    hits_a, hits_b = rng.random(400) < 0.5, rng.random(400) < 0.9
    base = _typed_rows(tmp_path / "a.csv", y, truth, guess, hits_a)
    new = _typed_rows(tmp_path / "b.csv", y, truth, better, hits_b)
    got = paired.paired(base, new, boot=200, seed=3)
    f1 = got["type_macro_f1"]
    assert f1["images"] == int(y.sum())
    cm = confusion_matrix(truth[y], better[y], len(FRACTURE_TYPES))
    assert f1["new"] == pytest.approx(macro_f1(cm), abs=1e-4)
    assert f1["interval_95"][0] > 0.3 and f1["new_ahead_share"] == 1.0
    point = got["pointing_game"]
    assert point["base"] == pytest.approx(hits_a[y].mean(), abs=1e-4)
    assert point["new"] == pytest.approx(hits_b[y].mean(), abs=1e-4)
    lo, hi = point["interval_95"]
    assert 0 < lo < point["difference"] < hi
    same = paired.paired(new, new, boot=20)["type_macro_f1"]
    assert same["difference"] == 0 and same["interval_95"] == [0, 0]


def test_evaluate_command(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "data", count=12, seed=5, negatives=6)
    models = write_untrained_bundles(tmp_path / "models")
    out = tmp_path / "report" / "eval.json"
    rows_csv = tmp_path / "report" / "images.csv"
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out),
                                           "--quiet", "--update-cards", "--per-image", str(rows_csv)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    with open(rows_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(data / "labels.csv", newline="") as handle:
        labels = {str(data / r["file"]): r for r in csv.DictReader(handle)}
    radiographs = [r for r in rows if r["kind"] == "radiograph"]
    assert len(radiographs) == 12 and len(rows) == 18  # one row per image, negatives included
    for row in radiographs:
        assert row["fracture"] == str(int(labels[row["file"]]["fracture"]))  # the image's own label
        assert 0.0 <= float(row["probability"]) <= 1.0 and row["predicted_type"] in FRACTURE_TYPES
        assert row["accepted"] in ("0", "1") and row["check_reason"]
        if row["fracture"] == "1":
            assert row["peak_in_box"] in ("0", "1")
    hits = [int(r["peak_in_box"]) for r in radiographs if r["fracture"] == "1" and r["peak_in_box"]]
    assert report["localization"]["pointing_game"] == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    auc = roc_auc(np.array([float(r["probability"]) for r in radiographs]),
                  np.array([int(r["fracture"]) for r in radiographs]))
    assert report["detection"]["auc"] == pytest.approx(auc, abs=1e-3)  # the rows are what the figures score
    by_region = per_image_breakdown.breakdown(rows_csv, data, ["region", "fracture"])
    assert by_region["all"]["images"] == 12 and by_region["all"]["auc"] == pytest.approx(auc, abs=1e-3)
    assert sum(g["images"] for g in by_region["region"].values()) == 12
    assert set(by_region["fracture"]) == {"0", "1"} and by_region["fracture"]["0"]["auc"] is None  # one class
    assert by_region["fracture"]["1"]["pointing_game"] == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    # a group of fractured images only is scored against every intact image: here, all of them, the overall AUC
    assert by_region["fracture"]["1"]["auc_vs_all_intact"] == pytest.approx(auc, abs=1e-3)
    assert "auc_vs_all_intact" not in by_region["fracture"]["0"]
    for section, key in [("detection", "auc"), ("detection", "sensitivity"), ("detection", "specificity"),
                         ("classification", "accuracy"), ("classification", "macro_f1"), ("calibration", "ece"),
                         ("localization", "pointing_game"), ("validity", "accuracy")]:
        assert key in report[section], (section, key)
    assert np.array(report["classification"]["confusion"]).shape == (11, 11)
    assert report["images"] == 12 and report["negatives"] == 6
    assert report["images_per_second"] > 0
    assert (tmp_path / "report" / "reliability.png").is_file() and (tmp_path / "report" / "confusion.png").is_file()
    assert "detection.auc" in report["targets"]
    card = json.loads((models / "detector" / "model.json").read_text())
    assert card["metrics"]["test"]["images"] == 12


def test_evaluate_scores_the_fused_call_and_keeps_the_detector_alone_apart(tmp_path: Path) -> None:
    """With a reader whose card carries a detection fusion for this detector, the report scores the fused
    probability and, apart, the detector alone; each card gets its own figures."""
    from pipeline.models.bundle import load_bundle, update_card

    data = write_toy_dataset(tmp_path / "data", count=12, seed=5, negatives=2)
    models = write_untrained_bundles(tmp_path / "models", reader=True)
    detector = load_bundle(models / "detector", expected_task="detect")
    fusion = {"detector_sha256": detector.identity.sha256, "weights": {"detector_logit": 0.0, "reader_evidence": 0.0},
              "bias": 0.0, "operating_point": {"threshold": 0.5, "indeterminate_band": [0.45, 0.55]}}
    update_card(models / "classifier", detection_fusion=fusion)  # every fused probability is exactly 0.5
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out),
                                           "--quiet", "--update-cards"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    det = report["detection"]
    assert det["auc"] == 0.5 and det["indeterminate_share"] == 1.0 and det["operating_point"] == 0.5
    assert "fused" in det["probability"]
    alone = det["detector_alone"]
    assert alone["operating_point"] == detector.operating_point and set(alone) >= {"auc", "ece", "indeterminate_share"}
    assert alone["indeterminate_band"] == list(detector.indeterminate_band)
    loc = report["localization"]
    assert "type reader" in loc["rule"] and loc["images"] > 0
    assert loc["pointing_game"] is not None and loc["detector_alone"]["pointing_game"] is not None
    det_card = json.loads((models / "detector" / "model.json").read_text())["metrics"]["test"]
    assert det_card["auc"] == alone["auc"] and "detector_alone" not in det_card and "probability" not in det_card
    assert det_card["pointing_game"] == loc["detector_alone"]["pointing_game"]
    reader_card = json.loads((models / "classifier" / "model.json").read_text())["metrics"]["test"]
    assert reader_card["detection_fusion"]["auc"] == 0.5 and reader_card["macro_f1"] is not None
    assert reader_card["detection_fusion"]["pointing_game"] == loc["pointing_game"]


def test_looks_bench_scores_what_evaluate_scores(tmp_path: Path) -> None:
    """bench/looks.py measures every look in one pass; the combination a card asks for (a second look at 2.0 with
    one site, the type read there past a margin of 0) scores what `fracture-node evaluate` scores with that card."""
    from pipeline.models.bundle import load_bundle, update_card

    data = write_toy_dataset(tmp_path / "data", count=16, seed=7, negatives=0)
    models = write_untrained_bundles(tmp_path / "models", reader=True)
    detector = load_bundle(models / "detector", expected_task="detect")
    update_card(models / "classifier", input={"long_side": 256, "patch": 64, "sites": 3})
    fusion = {"detector_sha256": detector.identity.sha256, "weights": {"detector_logit": 1.0, "reader_evidence": 0.5},
              "bias": 0.0, "operating_point": {"threshold": 0.5, "indeterminate_band": [0.4, 0.6]},
              "second_scale": {"factor": 2.0, "sites": 1, "platt": {"scale": 1.0, "bias": 0.0}, "type_margin": 0.0,
                               "rule": "the image shown 2 times smaller; the type read there past 0"}}
    update_card(models / "classifier", detection_fusion=fusion)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    scored = json.loads(out.read_text())
    assert scored["detection"]["probability"].endswith("second look (second_scale): the image shown 2 times smaller; "
                                                       "the type read there past 0")  # the card's own words
    rows = tmp_path / "looks.jsonl"
    assert looks.measure(data, rows, str(models), [1.5, 2.0], 3) == 16
    figures = looks.report(rows, [0.0, 1.0])
    assert figures["images"] == 16 and figures["fractured"] == scored["fractured"]
    assert set(figures["detection"]) >= {"native", "mean 1.5 s1", "mean 1.5 s3", "mean 2 s1", "1.5 alone s1"}
    assert figures["detection"]["mean 2 s1"]["auc"] == pytest.approx(scored["detection"]["auc"], abs=1e-4)
    assert figures["detection"]["native detector alone"]["auc"] == pytest.approx(
        scored["detection"]["detector_alone"]["auc"], abs=1e-4)  # the fusion's first input, scored by evaluate too
    card_combination = figures["type"]["2 s1 m0"]
    assert card_combination["read_there"] > 0  # the toy set reads some types at the coarser look
    assert card_combination["macro_f1"] == pytest.approx(scored["classification"]["macro_f1"], abs=1e-4)
    assert card_combination["pointing_game"] == pytest.approx(scored["localization"]["pointing_game"], abs=1e-4)
    assert card_combination["read_there"] == pytest.approx(scored["classification"]["read_at_second_look"], abs=1e-4)
    # Without the margin entry evaluate reads the type at the native look: the report's "native" row.
    update_card(models / "classifier", detection_fusion={**fusion, "second_scale": {
        k: v for k, v in fusion["second_scale"].items() if k != "type_margin"}})
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    native = json.loads(out.read_text())
    assert native["classification"]["read_at_second_look"] == 0.0
    assert figures["type"]["native"]["macro_f1"] == pytest.approx(native["classification"]["macro_f1"], abs=1e-4)
    # A mirrored look (session 25): evaluate scores what inference then makes, and says so.
    update_card(models / "classifier", detection_fusion={**fusion, "mirror": True})
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    mirrored = json.loads(out.read_text())
    assert mirrored["detection"]["probability"].endswith("on the image and on its left-right mirror, and averaged "
                                                         "(mirror)")
    assert mirrored["detection"]["auc"] != pytest.approx(scored["detection"]["auc"], abs=1e-6)
    # The detector alone is its one reading of the image as it is, as its card's metrics describe it.
    assert mirrored["detection"]["detector_alone"] == scored["detection"]["detector_alone"]
    # --one-reading (FRACTURE_MIRROR_LOOK=off): the card's one-reading fit, here the plain card's own, scores as
    # the plain card does; without that fit the card is refused, and the cards are not updated from such a run.
    refused = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet",
                                            "--one-reading"])
    assert refused.exit_code != 0 and "single_reading" in refused.output
    update_card(models / "classifier", detection_fusion={**fusion, "mirror": True, "single_reading": {
        "weights": fusion["weights"], "bias": fusion["bias"], "platt": fusion["second_scale"]["platt"],
        "operating_point": fusion["operating_point"]}})
    result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet",
                                           "--one-reading"])
    assert result.exit_code == 0, result.output
    once = json.loads(out.read_text())
    assert once["detection"]["auc"] == scored["detection"]["auc"]
    assert once["classification"]["macro_f1"] == scored["classification"]["macro_f1"]
    assert not once["detection"]["probability"].endswith("(mirror)")
    refused = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out), "--quiet",
                                            "--one-reading", "--update-cards"])
    assert refused.exit_code != 0 and "not with --one-reading" in refused.output
    assert figures["type"]["native"]["pointing_game"] == pytest.approx(native["localization"]["pointing_game"],
                                                                       abs=1e-4)


def test_evaluate_under_a_shift_moves_the_boxes_and_refuses_to_write_cards(tmp_path: Path) -> None:
    """``--shift`` changes every radiograph before the models see it (the report says which shift); zooming out
    moves every fracture box, so the pointing game is scored against the moved boxes, not the stored ones."""
    data = write_toy_dataset(tmp_path / "data", count=10, seed=6, negatives=2)
    models = write_untrained_bundles(tmp_path / "models")
    runs = {}
    for shift in ("none", "zoom_out"):
        out = tmp_path / f"{shift}.json"
        result = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json", str(out),
                                               "--quiet", "--shift", shift])
        assert result.exit_code == 0, result.output
        runs[shift] = json.loads(out.read_text())
    assert runs["none"]["shift"]["name"] == "none" and runs["zoom_out"]["shift"]["name"] == "zoom_out"
    assert runs["zoom_out"]["negatives"] == 2 and runs["zoom_out"]["localization"]["images"] > 0
    assert runs["none"]["detection"]["auc"] is not None
    refused = CliRunner().invoke(evaluate, ["--models", str(models), "--data", str(data), "--json",
                                            str(tmp_path / "x.json"), "--quiet", "--shift", "noise", "--update-cards"])
    assert refused.exit_code != 0 and "not under a --shift" in refused.output


def test_evaluate_folder_scores_the_pointing_game_against_the_box_the_shift_returns(tmp_path: Path) -> None:
    """Two shifts that leave the pixels alone: one returns a box over the whole image (every peak inside), the
    other an empty box (none inside). The pointing game follows the box the shift returns, not the stored one."""
    from pipeline.evaluation.evaluate import evaluate_folder
    from pipeline.evaluation.shifts import Shift
    from pipeline.run import load_models

    data = write_toy_dataset(tmp_path / "data", count=10, seed=7, negatives=0)
    models = load_models(write_untrained_bundles(tmp_path / "models"))
    whole = Shift("whole", "box = image", lambda px, box, rng: (px, (0, 0, px.shape[1], px.shape[0])))
    empty = Shift("empty", "box = nothing", lambda px, box, rng: (px, (0, 0, 0, 0)))
    hit_all = evaluate_folder(models, data, show=False, shift=whole)
    hit_none = evaluate_folder(models, data, show=False, shift=empty)
    assert hit_all["localization"]["images"] == hit_none["localization"]["images"] > 0
    assert hit_all["localization"]["pointing_game"] == 1.0 and hit_none["localization"]["pointing_game"] == 0.0
    assert hit_all["detection"]["auc"] == hit_none["detection"]["auc"]  # the same pixels
