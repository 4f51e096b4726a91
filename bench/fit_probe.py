"""Can the networks see each kind of fracture where it is, on images they were trained on and on images they were
not? A diagnostic, not a speed benchmark.

    .venv/bin/python bench/fit_probe.py --data var/data/tr1s --data var/data/cal [--models DIR] [--limit N]

For every radiograph of each labelled folder (the generator's layout) it runs the detector (one plain reading, the
PyTorch runtime) and the type reader as inference places them, and also places the reader's patch at the true
fracture box's centre. Each score below is set against every intact image of the same folder, as an AUC per kind
of fracture:

* ``detector``: the detector's image logit (what the card's "detector alone" scores);
* ``map_in_box``: the strongest cell of the detector's segmentation map inside the true box (dilated by one cell),
  against each intact image's strongest cell anywhere: whether the map answers at the fracture more strongly than
  at an intact image's strongest look-alike, given the place;
* ``map_anywhere``: each image's strongest cell anywhere (the search as inference makes it);
* ``reader_at_sites``: the reader's evidence (the strongest cell of its own map) over the detector's three
  strongest peaks, as inference weighs it;
* ``reader_at_truth``: the reader's evidence with its patch at the true centre, against the intact images' evidence
  at their three sites.

A folder the networks were trained on and one they were not, side by side, separate what they cannot fit from what
does not carry to new images. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import roc_auc  # noqa: E402
from pipeline.models.architecture import SEG_STRIDE  # noqa: E402
from pipeline.models.bundle import load_bundle  # noqa: E402
from pipeline.models.imageio import read_gray  # noqa: E402
from pipeline.models.preprocess import cut_patch, fracture_input, seg_peaks, standardise_patch  # noqa: E402
from pipeline.models.runtime import TorchFractureNet  # noqa: E402
from pipeline.run import TYPE_SITES  # noqa: E402
from pipeline.training.datasets import load_records  # noqa: E402
from pipeline.training.type_reader import _box_centre  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "pipeline" / "models" / "bundled"
SCORES = ("detector", "map_in_box", "map_anywhere", "reader_at_sites", "reader_at_truth")


def map_in_box(seg: np.ndarray, scale: float, box: tuple[int, int, int, int]) -> float:
    """The strongest cell of a 1/SEG_STRIDE map whose centre lies in ``box`` (original pixels) grown by a cell."""
    x0, y0, x1, y1 = box
    cell = SEG_STRIDE / scale  # one cell in original pixels
    ys = (np.arange(seg.shape[0]) + 0.5) * cell
    xs = (np.arange(seg.shape[1]) + 0.5) * cell
    rows = (ys >= y0 - cell) & (ys < y1 + cell)
    cols = (xs >= x0 - cell) & (xs < x1 + cell)
    return float(seg[np.ix_(rows, cols)].max()) if rows.any() and cols.any() else float("-inf")


def measure(data: str, models: Path, limit: int | None) -> dict:
    det = load_bundle(models / "detector", expected_task="detect")
    cls = load_bundle(models / "classifier", expected_task="classify")
    engine, reader = TorchFractureNet(det.model), cls.model.eval()
    det_long = int(det.input_spec["long_side"])
    long_side, patch = int(cls.input_spec["long_side"]), int(cls.input_spec["patch"])
    rads = [r for r in load_records(data) if r.is_radiograph]
    rads = rads[:limit] if limit else rads
    rows: list[dict] = []
    with torch.inference_mode():
        for rec in tqdm(rads, desc=Path(data).name, leave=False):
            pixels = read_gray(rec.path)
            x, geom = fracture_input(pixels, det_long)
            fp = engine.forward(x)
            ch = -(-geom.scaled_h // SEG_STRIDE)
            cw = -(-geom.scaled_w // SEG_STRIDE)
            seg = np.asarray(fp.seg, dtype=np.float64)[:ch, :cw]
            side = patch * max(pixels.shape) / long_side

            def evidence(centre: tuple[float, float], pixels: np.ndarray = pixels) -> float:
                region, _where = cut_patch(pixels, centre, long_side, patch)
                return float(reader(standardise_patch(region)).seg.max())

            sites = seg_peaks(fp.seg, geom, SEG_STRIDE, TYPE_SITES, side / 2)
            row = {"fracture": bool(rec.fracture), "type": rec.type or "", "detector": float(fp.detect_logit),
                   "map_anywhere": float(seg.max()),
                   "reader_at_sites": max(evidence((px, py)) for px, py, _v in sites)}
            if rec.fracture and rec.box is not None:
                row["map_in_box"] = map_in_box(seg, geom.scale, rec.box)
                row["reader_at_truth"] = evidence(_box_centre(rec, pixels))
            rows.append(row)
    intact = [r for r in rows if not r["fracture"]]
    against = {"detector": "detector", "map_in_box": "map_anywhere", "map_anywhere": "map_anywhere",
               "reader_at_sites": "reader_at_sites", "reader_at_truth": "reader_at_sites"}

    def auc(group: list[dict], score: str) -> float | None:
        pos = [r[score] for r in group if score in r]
        neg = [r[against[score]] for r in intact]
        if not pos or not neg:
            return None
        labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        return round(roc_auc(np.r_[pos, neg], labels), 4)

    fractured = [r for r in rows if r["fracture"]]
    kinds = sorted({r["type"] for r in fractured if r["type"]})
    return {
        "data": data, "images": len(rows), "intact": len(intact),
        "all_fractured": {"images": len(fractured), **{s: auc(fractured, s) for s in SCORES}},
        "by_type": {k: {"images": sum(r["type"] == k for r in fractured),
                        **{s: auc([r for r in fractured if r["type"] == k], s) for s in SCORES}} for k in kinds},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True, help="a labelled folder (repeatable)")
    ap.add_argument("--models", type=Path, default=BUNDLED)
    ap.add_argument("--limit", type=int, default=None, help="the first N radiographs of each folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"models": str(args.models), "sets": [measure(d, args.models, args.limit) for d in args.data]},
                     indent=2))


if __name__ == "__main__":
    main()
