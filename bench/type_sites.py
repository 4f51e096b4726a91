"""Where the type reader is read, and how it fares there, on a labelled folder (the generator's layout).

    .venv/bin/python bench/type_sites.py --data var/data/cal [--classifier DIR] [--detector DIR]

Not a speed benchmark: the analysis behind docs/MODELS.md, "The reader itself had room (session 10)" and
"Where the type is read". For every fractured image it reads the reader's patch at the true box centre, at
the true centre moved by 1/8 .. 1/2 of the patch side (one random direction per image and distance, seeded),
and at each of the detector's five strongest segmentation peaks (``seg_peaks``, as inference finds them),
once centred on the peak and once re-centred on the reader's own segmentation peak inside that patch. It
prints, as JSON:

* ``at_offset_macro_f1``: macro-F1 with the patch at the true centre moved by each distance;
* ``rules``: macro-F1, share of chosen sites inside the true box and type accuracy when the site is chosen
  among the first ``k`` peaks by ``detector logit + weight x reader evidence`` (``k = 3``, ``weight = 1`` is
  ``pipeline.run.choose_site`` with the bundled card); ``recentred``: the same after re-centring;
* ``chosen_site``: for the shipped rule, type accuracy by the chosen site's distance from the box centre
  (in patch sides), and inside/outside the box;
* ``any_of_k_inside``: the share of images with any of the first ``k`` peaks inside the box (the oracle).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import confusion_matrix, macro_f1  # noqa: E402
from pipeline.models.architecture import SEG_STRIDE  # noqa: E402
from pipeline.models.bundle import load_bundle  # noqa: E402
from pipeline.models.imageio import read_gray  # noqa: E402
from pipeline.models.preprocess import cut_patch, fracture_input, seg_peaks, standardise_patch  # noqa: E402
from pipeline.models.runtime import TorchFractureNet  # noqa: E402
from pipeline.run import TYPE_SITES  # noqa: E402
from pipeline.taxonomy import FRACTURE_TYPES  # noqa: E402
from pipeline.training.datasets import load_records  # noqa: E402
from pipeline.training.peaks import inside_box  # noqa: E402
from pipeline.training.type_reader import _box_centre, _patch_at, typed_fractures  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "pipeline" / "models" / "bundled"
OFFSETS = (0.0, 0.125, 0.25, 0.375, 0.5)
PEAKS = 5
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
DISTANCE_BINS = (0.0, 0.125, 0.25, 0.5, 1.0, np.inf)


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    return round(macro_f1(confusion_matrix(truth, pred, len(FRACTURE_TYPES))), 4)


def collect(data: str, detector_dir: Path, reader_dir: Path) -> dict[str, np.ndarray]:
    det = load_bundle(detector_dir, expected_task="detect")
    cls = load_bundle(reader_dir, expected_task="classify")
    reader = cls.model.eval()
    long_side, patch = int(cls.input_spec["long_side"]), int(cls.input_spec["patch"])
    engine = TorchFractureNet(det.model)
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {k: [] for k in ("truth", "at_offset", "det", "rev", "pred", "inside", "distance",
                                             "rc_pred", "rc_inside")}
    with torch.inference_mode():
        for rec in typed_fractures(load_records(data)):
            pixels = read_gray(rec.path)
            cx, cy = _box_centre(rec, pixels)
            side = patch * max(pixels.shape) / long_side
            rows["truth"].append(FRACTURE_TYPES.index(rec.type or ""))
            moved = []
            for d in OFFSETS:
                a = rng.uniform(0, 2 * np.pi)
                centre = (cx + d * side * np.cos(a), cy + d * side * np.sin(a))
                moved.append(int(reader(_patch_at(pixels, centre, long_side, patch)).types[0].argmax()))
            rows["at_offset"].append(moved)
            x, geom = fracture_input(pixels, int(det.input_spec["long_side"]))
            peaks = seg_peaks(engine.forward(x).seg, geom, SEG_STRIDE, PEAKS, side / 2)
            peaks += [peaks[-1]] * (PEAKS - len(peaks))  # too few separate peaks: repeat the last
            site: dict[str, list] = {k: [] for k in ("det", "rev", "pred", "inside", "distance", "rc_pred",
                                                     "rc_inside")}
            for px, py, value in peaks:
                region, where = cut_patch(pixels, (px, py), long_side, patch)
                out = reader(standardise_patch(region))
                seg = out.seg[0, 0].numpy()
                iy, ix = np.unravel_index(int(seg.argmax()), seg.shape)
                rx = where.left + (ix + 0.5) / seg.shape[1] * where.side
                ry = where.top + (iy + 0.5) / seg.shape[0] * where.side
                again = reader(_patch_at(pixels, (rx, ry), long_side, patch))
                site["det"].append(value)
                site["rev"].append(float(seg.max()))
                site["pred"].append(int(out.types[0].argmax()))
                site["inside"].append(inside_box(rec, (px, py)))
                site["distance"].append(float(np.hypot(px - cx, py - cy) / side))
                site["rc_pred"].append(int(again.types[0].argmax()))
                site["rc_inside"].append(inside_box(rec, (rx, ry)))
            for k, v in site.items():
                rows[k].append(v)
    return {k: np.array(v) for k, v in rows.items()}


def analyse(z: dict[str, np.ndarray]) -> dict:
    truth, n = z["truth"], np.arange(len(z["truth"]))

    def chosen(k: int, weight: float) -> np.ndarray:
        return (z["det"][:, :k] + weight * z["rev"][:, :k]).argmax(1)

    def rule(k: int, weight: float, prefix: str = "") -> tuple[float, float, float]:
        c = chosen(k, weight)
        pred, inside = z[prefix + "pred"][n, c], z[prefix + "inside"][n, c]
        return _f1(truth, pred), round(float(inside.mean()), 4), round(float((pred == truth).mean()), 4)

    c = chosen(TYPE_SITES, 1.0)
    right, dist, inside = z["pred"][n, c] == truth, z["distance"][n, c], z["inside"][n, c]
    by_distance = {}
    for lo, hi in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:], strict=True):
        sel = (dist >= lo) & (dist < hi)
        by_distance[f"{lo}-{hi}"] = {"images": int(sel.sum()),
                                     "type_accuracy": round(float(right[sel].mean()), 3) if sel.any() else None}
    return {
        "fractured_images": len(truth),
        "at_offset_macro_f1": {str(d): _f1(truth, z["at_offset"][:, i]) for i, d in enumerate(OFFSETS)},
        "rules": {f"k={k}": {f"weight={w}": rule(k, w) for w in WEIGHTS} for k in range(1, PEAKS + 1)},
        "rules_columns": ["macro_f1", "chosen_inside_box", "type_accuracy"],
        "recentred": {f"k={k}": rule(k, 1.0, "rc_") for k in (1, TYPE_SITES)},
        "chosen_site": {"rule": f"k={TYPE_SITES}, weight=1", "by_distance_in_patch_sides": by_distance,
                        "inside_box": round(float(inside.mean()), 3),
                        "type_accuracy_inside": round(float(right[inside].mean()), 3),
                        "type_accuracy_outside": round(float(right[~inside].mean()), 3)},
        "any_of_k_inside": {f"k={k}": round(float(z["inside"][:, :k].any(1).mean()), 3)
                            for k in range(1, PEAKS + 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="labelled folder (labels.csv, masks/)")
    ap.add_argument("--detector", type=Path, default=BUNDLED / "detector")
    ap.add_argument("--classifier", type=Path, default=BUNDLED / "classifier")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(analyse(collect(args.data, args.detector, args.classifier)), indent=1))


if __name__ == "__main__":
    main()
