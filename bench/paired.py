"""Two model sets on the same images: each one's AUC and the difference, with a paired bootstrap interval.

    .venv/bin/python bench/paired.py --base BASE.csv --new NEW.csv [--boot 2000] [--seed 1]

``BASE.csv`` and ``NEW.csv`` are ``fracture-node evaluate --per-image`` rows of the same labelled folder. Over
the radiographs of both (matched by file), prints JSON: for the call's probability (``probability``) and the
detector's alone (``detector_probability``), each set's AUC, the difference (new - base) and its 95 % interval
from resampling the images with replacement (the same draw for both sets, so the interval is that of the
difference on these images, narrower than either AUC's own), and the share of draws where the new set is ahead.
Session 21 added it to say how far a rule's margin stands from what 1 000 images resolve.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import roc_auc  # noqa: E402

COLUMNS = ("probability", "detector_probability")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {r["file"]: r for r in csv.DictReader(handle) if r["kind"] == "radiograph"}


def paired(base: Path, new: Path, boot: int = 2000, seed: int = 1) -> dict[str, Any]:
    a, b = _rows(base), _rows(new)
    files = sorted(set(a) & set(b))
    if not files:
        raise ValueError("the two files share no radiograph")
    labels = np.array([int(a[f]["fracture"]) for f in files])
    if any(int(b[f]["fracture"]) != y for f, y in zip(files, labels, strict=True)):
        raise ValueError("the two files label the same image differently: not the same data")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(files), len(files)) for _ in range(boot)]
    out: dict[str, Any] = {"images": len(files), "fractured": int(labels.sum()), "boot": boot, "seed": seed}
    for column in COLUMNS:
        sa = np.array([float(a[f][column]) for f in files])
        sb = np.array([float(b[f][column]) for f in files])
        diffs = []
        for idx in draws:
            y = labels[idx]
            if 0 < y.sum() < len(y):
                diffs.append(roc_auc(sb[idx], y) - roc_auc(sa[idx], y))
        d = np.array(diffs)
        base_auc, new_auc = roc_auc(sa, labels), roc_auc(sb, labels)
        out[column] = {"base_auc": round(float(base_auc), 4), "new_auc": round(float(new_auc), 4),
                       "difference": round(float(new_auc - base_auc), 4),
                       "interval_95": [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)],
                       "new_ahead_share": round(float(np.mean(d > 0)), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(paired(args.base, args.new, args.boot, args.seed), indent=2))


if __name__ == "__main__":
    main()
