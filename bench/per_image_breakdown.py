"""Where a model set fails: the rows of ``fracture-node evaluate --per-image CSV`` broken down by a column of the
data's ``labels.csv`` (region, child, bits, type...).

    .venv/bin/python bench/per_image_breakdown.py --per-image ROWS.csv --data DIR [--by region --by child]

Prints JSON: over all radiographs the fused and detector-alone AUC, the mean call probability of intact
images and the check's reasons; then for each value of each ``--by`` column the images, the share the
radiograph check accepted, the fused and detector-alone AUC (where both classes occur) and the pointing game.
A group with fractured images only (``--by type``) gets its AUC against every intact image of the set instead
(``auc_vs_all_intact``, ``auc_detector_alone_vs_all_intact``): how well that kind of fracture is told from intact
bone. The analysis behind docs/MODELS.md, "Out of family".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import roc_auc  # noqa: E402


def _auc(rows: list[dict[str, str]], key: str) -> float | None:
    y = np.array([int(r["fracture"]) for r in rows])
    if not 0 < y.sum() < len(y):
        return None
    return round(float(roc_auc(np.array([float(r[key]) for r in rows]), y)), 4)


def _summary(rows: list[dict[str, str]]) -> dict[str, Any]:
    hits = [int(r["peak_in_box"]) for r in rows if r["fracture"] == "1" and r["peak_in_box"] != ""]
    return {"images": len(rows), "accepted": round(float(np.mean([int(r["accepted"]) for r in rows])), 4),
            "auc": _auc(rows, "probability"), "auc_detector_alone": _auc(rows, "detector_probability"),
            "pointing_game": round(float(np.mean(hits)), 4) if hits else None}


def breakdown(per_image: Path, data: Path, by: list[str]) -> dict[str, Any]:
    with open(per_image, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["kind"] == "radiograph"]
    with open(data / "labels.csv", newline="") as handle:
        labels = {(data / r["file"]).resolve(): r for r in csv.DictReader(handle)}
    for row in rows:  # the CSV names files as evaluate was given them: run from the same folder
        label = labels[Path(row["file"]).resolve()]
        row.update({f"label:{k}": v for k, v in label.items()})
    intact = [float(r["probability"]) for r in rows if r["fracture"] == "0"]
    out: dict[str, Any] = {
        "all": _summary(rows),
        "intact_mean_probability": round(float(np.mean(intact)), 4) if intact else None,
        "check_reasons": dict(Counter(r["check_reason"].split(" (")[0] for r in rows).most_common()),
    }
    for column in by:
        groups: dict[str, list[dict[str, str]]] = defaultdict(list)
        for row in rows:
            groups[row.get(f"label:{column}", "")].append(row)
        intact_rows = [r for r in rows if r["fracture"] == "0"]
        out[column] = {}
        for value, group in sorted(groups.items()):
            summary = _summary(group)
            if intact_rows and all(r["fracture"] == "1" for r in group):
                summary["auc_vs_all_intact"] = _auc(group + intact_rows, "probability")
                summary["auc_detector_alone_vs_all_intact"] = _auc(group + intact_rows, "detector_probability")
            out[column][value] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-image", type=Path, required=True, help="the CSV of fracture-node evaluate --per-image")
    ap.add_argument("--data", type=Path, required=True, help="the labelled folder that was evaluated")
    ap.add_argument("--by", action="append", default=None, help="labels.csv column (repeatable; default: region)")
    args = ap.parse_args(argv)
    print(json.dumps(breakdown(args.per_image, args.data, args.by or ["region"]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
