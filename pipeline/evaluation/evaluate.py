"""Run the full inference stack over a labelled folder (generator layout) and compute every metric."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.evaluation.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    f1_scores,
    macro_f1,
    reliability_bins,
    roc_auc,
    sens_spec,
    sensitivity_at_specificity,
)
from pipeline.evaluation.plots import confusion_image, reliability_diagram
from pipeline.evaluation.shifts import Shift, shift_rng
from pipeline.explain import peak_point
from pipeline.models.imageio import load_file
from pipeline.run import (
    ModelSet,
    calibrated_probability,
    detection_call,
    mirror_look,
    run_fracture_models,
    second_scale,
)
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.datasets import Record, read_generator_layout

POINTING_TOLERANCE_PX = 15


def _rnd(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def _detection_figures(p: np.ndarray, y: np.ndarray, threshold: float, band: tuple[float, float]) -> dict[str, Any]:
    """Detection figures of probabilities ``p`` for labels ``y`` called at ``threshold`` with ``band``."""
    sens, spec = sens_spec(p, y, threshold)
    calls = np.array([detection_call(float(v), threshold, band) for v in p])
    return {
        "auc": _rnd(roc_auc(p, y)),
        "sensitivity": _rnd(sens),
        "specificity": _rnd(spec),
        "operating_point": threshold,
        "indeterminate_band": list(band),
        "indeterminate_share": _rnd(float((calls == "indeterminate").mean())) if len(p) else None,
        "sensitivity_at_specificity_0.90": _rnd(sensitivity_at_specificity(p, y, 0.90)),
    }


def _probability_note(models: ModelSet) -> str:
    """What the scored probability is, in words (the call's, as inference makes it): for a second look, the rule
    its card entry states."""
    if not models.fusion:
        return "the detector's calibrated probability"
    note = "the detector's logit fused with the type reader's evidence (the reader card's detection_fusion)"
    second = second_scale(models.fusion)
    if second is not None:
        rule = second.get("rule") or f"factor {float(second['factor']):g}"
        note += f"; a second look (second_scale): {rule}"
    if mirror_look(models.fusion):
        note += "; each look made on the image and on its left-right mirror, and averaged (mirror)"
    return note


def evaluate_folder(models: ModelSet, data: str | Path, limit: int | None = None, show: bool = True,
                    figures: Path | None = None, shift: Shift | None = None,
                    include_negatives: bool = True, per_image: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every metric of the models on a labelled folder. With ``shift``, each radiograph (not the negatives) is
    changed by that acquisition shift before the models see it, and its fracture box with it. With
    ``per_image`` (a list), one row per image is appended to it (:data:`PER_IMAGE_FIELDS`), for finding which
    images a model fails on."""
    records = read_generator_layout(data)
    radiographs = [r for r in records if r.is_radiograph]
    negatives = [r for r in records if not r.is_radiograph]
    if limit:
        radiographs, negatives = radiographs[:limit], negatives[:limit]
    if not include_negatives:
        negatives = []
    thr = models.operating_point
    band = models.indeterminate_band
    probs, alone, labels = [], [], []
    type_true, type_pred = [], []
    type_at_second: list[bool] = []  # per typed fractured image: the type read at the second, coarser look
    pointing_hits, pointing_total, pointing_tol, detector_hits = 0, 0, 0, 0
    validity_ok: dict[str, list[bool]] = {}
    t_inference = 0.0
    for index, rec in enumerate(tqdm(radiographs, desc="evaluate radiographs", disable=not show)):
        t0 = time.perf_counter()
        rad = load_file(rec.path)
        box = rec.box
        if shift is not None:
            pixels, box = shift.apply(rad.pixels, box, shift_rng(index, shift.name))
            rad = replace(rad, pixels=pixels)
        verdict = models.validity(rad)
        outs = run_fracture_models(rad, models, cams=True, type_cam=False)  # the pointing game uses the call's map
        t_inference += time.perf_counter() - t0
        validity_ok.setdefault("radiograph", []).append(verdict.is_radiograph)
        probs.append(outs.probability)
        # the detector on its own: one reading, as it runs without the fusion (a mirrored look averages two)
        plain = outs.detect_logit if outs.plain_detect_logit is None else outs.plain_detect_logit
        alone.append(calibrated_probability(plain, models.detector.temperature))
        labels.append(bool(rec.fracture))
        if rec.fracture and rec.type:
            type_true.append(FRACTURE_TYPES.index(rec.type))
            type_pred.append(int(np.argmax(outs.type_probs)))
            type_at_second.append(outs.type_scale != 1.0)
        if rec.fracture and box is not None and outs.heatmap is not None and outs.detector_peak is not None:
            px, py = peak_point(outs.heatmap)
            x0, y0, x1, y1 = box
            pointing_total += 1
            pointing_hits += int(x0 <= px < x1 and y0 <= py < y1)
            t = POINTING_TOLERANCE_PX
            pointing_tol += int(x0 - t <= px < x1 + t and y0 - t <= py < y1 + t)
            dx, dy = outs.detector_peak
            detector_hits += int(x0 <= dx < x1 and y0 <= dy < y1)
        if per_image is not None:
            per_image.append(_image_row(rec, box, verdict, outs, alone[-1]))
    for rec in tqdm(negatives, desc="evaluate negatives", disable=not show):
        rad = load_file(rec.path)
        verdict = models.validity(rad)
        validity_ok.setdefault(rec.kind or "negative", []).append(not verdict.is_radiograph)
        if per_image is not None:
            per_image.append({"file": str(rec.path), "kind": rec.kind or "negative",
                              "accepted": int(verdict.is_radiograph), "check_score": round(verdict.score, 4),
                              "check_reason": verdict.reason})
    p = np.array(probs)
    y = np.array(labels)
    cm = confusion_matrix(np.array(type_true, dtype=int), np.array(type_pred, dtype=int), len(FRACTURE_TYPES))
    f1 = f1_scores(cm)
    bins = reliability_bins(p, y)
    ece = expected_calibration_error(p, y)
    all_valid = [v for vs in validity_ok.values() for v in vs]
    n_images = len(radiographs)
    result: dict[str, Any] = {
        "data": str(data),
        "shift": None if shift is None else {"name": shift.name, "description": shift.description},
        "images": n_images,
        "fractured": int(y.sum()),
        "negatives": len(negatives),
        "models": [{"name": i.name, "version": i.version, "sha256": i.sha256, "task": i.task}
                   for i in models.identities],
        "detection": {
            **_detection_figures(p, y, thr, band),
            "probability": _probability_note(models),
        },
        "classification": {
            "images": int(cm.sum()),
            "accuracy": _rnd(accuracy(cm)),
            "macro_f1": _rnd(macro_f1(cm)),
            "per_class_f1": {name: _rnd(v) for name, v in zip(FRACTURE_TYPES, f1, strict=True)},
            "labels": list(FRACTURE_TYPES),
            "confusion": cm.tolist(),
            "note": "over every fractured test image with a type label (rows: truth, columns: prediction)",
            "read_at_second_look": _rnd(float(np.mean(type_at_second))) if type_at_second else None,
        },
        "calibration": {"ece": _rnd(ece), "bins": 15, "reliability": bins},
        "localization": {
            "pointing_game": _rnd(pointing_hits / pointing_total) if pointing_total else None,
            "images": pointing_total,
            "rule": ("maximum of the call's Grad-CAM map (" + (
                "the average of the detector's and the type reader's, each scaled to its peak: "
                "pipeline.run.call_heatmap" if models.fusion else "the detector's") +
                ") strictly inside the true fracture box, original coordinates"),
            f"pointing_game_tolerance_{POINTING_TOLERANCE_PX}px": (
                _rnd(pointing_tol / pointing_total) if pointing_total else None),
            "tolerance_note": "the usual pointing-game protocol (Zhang et al., 2016) allows 15 px; reported "
                              "alongside, the strict figure is the headline",
        },
        "validity": {
            "accuracy": _rnd(float(np.mean(all_valid))) if all_valid else None,
            "per_kind": {k: _rnd(float(np.mean(v))) for k, v in sorted(validity_ok.items())},
            "counts": {k: len(v) for k, v in sorted(validity_ok.items())},
        },
        "images_per_second": _rnd(n_images / t_inference) if t_inference > 0 else None,
        "ms_per_image": _rnd(1000 * t_inference / n_images) if n_images else None,
        "timing_note": "decode + radiograph check + detection + classification + the detector's Grad-CAM map (the "
                       "pointing game's; bench/bench_inference.py times both maps), one process",
    }
    if models.fusion:
        # The detector on its own, on the same images (what its card's test metrics describe).
        pa = np.array(alone)
        det_b = models.detector
        result["detection"]["detector_alone"] = {
            **_detection_figures(pa, y, det_b.operating_point, det_b.indeterminate_band),
            "ece": _rnd(expected_calibration_error(pa, y)),
        }
        result["localization"]["detector_alone"] = {
            "pointing_game": _rnd(detector_hits / pointing_total) if pointing_total else None,
            "rule": "the detector's own Grad-CAM maximum strictly inside the true fracture box",
        }
    if figures is not None:
        result["figures"] = {
            "reliability": str(reliability_diagram(bins, ece, figures / "reliability.png")),
            "confusion": str(confusion_image(cm, FRACTURE_TYPES, figures / "confusion.png")),
        }
    return result


PER_IMAGE_FIELDS = ("file", "kind", "accepted", "check_score", "check_reason", "fracture", "type", "probability",
                    "detector_probability", "predicted_type", "type_probability", "peak_x", "peak_y",
                    "peak_in_box", "type_scale")


def _image_row(rec: Record, box: tuple[int, int, int, int] | None, verdict: Any, outs: Any,
               detector_probability: float) -> dict[str, Any]:
    peak = peak_point(outs.heatmap) if outs.heatmap is not None else None
    top = int(np.argmax(outs.type_probs))
    return {
        "file": str(rec.path), "kind": "radiograph", "accepted": int(verdict.is_radiograph),
        "check_score": round(verdict.score, 4), "check_reason": verdict.reason,
        "fracture": int(bool(rec.fracture)), "type": rec.type or "",
        "probability": round(float(outs.probability), 5), "detector_probability": round(detector_probability, 5),
        "predicted_type": FRACTURE_TYPES[top], "type_probability": round(float(outs.type_probs[top]), 4),
        "peak_x": "" if peak is None else int(peak[0]), "peak_y": "" if peak is None else int(peak[1]),
        "peak_in_box": "" if peak is None or box is None else int(
            box[0] <= peak[0] < box[2] and box[1] <= peak[1] < box[3]),
        "type_scale": outs.type_scale,
    }


def records_summary(records: list[Record]) -> dict[str, int]:
    return {"images": sum(r.is_radiograph for r in records), "negatives": sum(not r.is_radiograph for r in records)}
