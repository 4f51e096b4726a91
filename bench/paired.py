"""Two model sets on the same images: each one's AUC and the difference, with a paired bootstrap interval.

    .venv/bin/python bench/paired.py --base BASE.csv --new NEW.csv [MORE.csv ...] [--boot 2000] [--seed 1]

``BASE.csv`` and ``NEW.csv`` are ``fracture-node evaluate --per-image`` rows of the same labelled folder. Over
the radiographs of both (matched by file), prints JSON: for the call's probability (``probability``) and the
detector's alone (``detector_probability``), each set's AUC, the difference (new - base) and its 95 % interval
from resampling the images with replacement (the same draw for both sets, so the interval is that of the
difference on these images, narrower than either AUC's own), and the share of draws where the new set is ahead.
Session 21 added it to say how far a rule's margin stands from what 1 000 images resolve.

Where both files carry the type columns (``type``, ``predicted_type``) and the map's (``peak_in_box``), the same
draws also give the type's macro-F1 over the fractured images with a type (``type_macro_f1``) and the pointing
game over the fractured images with a box (``pointing_game``), each with the same fields (session 25).

Several ``--new`` files are scored as one set whose call, image by image, is the mean of theirs in logits (the
sigmoid of the mean logit of each probability column): what running those stacks together and averaging their
calls would give, read from their rows without running them (session 28). A mean of calls has no one type or map,
so the type and map statistics are left out then.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import confusion_matrix, macro_f1, roc_auc  # noqa: E402
from pipeline.taxonomy import FRACTURE_TYPES  # noqa: E402

COLUMNS = ("probability", "detector_probability")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {r["file"]: r for r in csv.DictReader(handle) if r["kind"] == "radiograph"}


def _mean_rows(paths: Sequence[Path]) -> dict[str, dict[str, str]]:
    """Several sets' rows of the same images as one set: per image, each probability column the sigmoid of the
    mean of the sets' logits; the label kept (it must agree), the type and map columns left out."""
    sets = [_rows(p) for p in paths]
    out: dict[str, dict[str, str]] = {}
    for f in sorted(set.intersection(*(set(s) for s in sets))):
        labels = {s[f]["fracture"] for s in sets}
        if len(labels) != 1:
            raise ValueError("the new files label the same image differently: not the same data")
        row = {"file": f, "kind": "radiograph", "fracture": labels.pop()}
        for column in COLUMNS:
            p = np.clip([float(s[f][column]) for s in sets], 1e-6, 1 - 1e-6)
            row[column] = repr(float(1 / (1 + np.exp(-np.mean(np.log(p / (1 - p)))))))
        out[f] = row
    return out


def paired(base: Path, new: Path | Sequence[Path], boot: int = 2000, seed: int = 1) -> dict[str, Any]:
    """``new``: one file, or several scored as the mean of their calls (:func:`_mean_rows`)."""
    news = [new] if isinstance(new, Path) else list(new)
    a, b = _rows(base), (_rows(news[0]) if len(news) == 1 else _mean_rows(news))
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
    out.update(_paired_statistics(a, b, files, draws))
    return out


def _macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return macro_f1(confusion_matrix(truth, predicted, len(FRACTURE_TYPES)))


def _paired_statistics(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]], files: list[str],
                       draws: list[np.ndarray]) -> dict[str, Any]:
    """The type's macro-F1 and the pointing game of both sets on the same draws (where both files have them)."""
    out: dict[str, Any] = {}
    index = {f: i for i, f in enumerate(files)}
    for name, keep, value in (
            ("type_macro_f1", lambda r: r.get("fracture") == "1" and r.get("type") in FRACTURE_TYPES
             and r.get("predicted_type") in FRACTURE_TYPES, lambda r: FRACTURE_TYPES.index(r["predicted_type"])),
            ("pointing_game", lambda r: r.get("fracture") == "1" and r.get("peak_in_box") in ("0", "1"),
             lambda r: int(r["peak_in_box"]))):
        rows = [f for f in files if keep(a[f]) and keep(b[f])]
        if not rows:
            continue
        pa = np.array([value(a[f]) for f in rows])
        pb = np.array([value(b[f]) for f in rows])
        truth = np.array([FRACTURE_TYPES.index(a[f]["type"]) if name == "type_macro_f1" else 1 for f in rows])
        score = (lambda t, p: _macro_f1(t, p)) if name == "type_macro_f1" else (lambda t, p: float(np.mean(p)))
        # the same image draws as the AUCs, restricted to these images
        where = np.full(len(files), -1)
        where[[index[f] for f in rows]] = np.arange(len(rows))
        diffs = []
        for idx in draws:
            sub = where[idx]
            sub = sub[sub >= 0]
            if len(sub):
                diffs.append(score(truth[sub], pb[sub]) - score(truth[sub], pa[sub]))
        d = np.array(diffs)
        base, new = score(truth, pa), score(truth, pb)
        out[name] = {"images": len(rows), "base": round(float(base), 4), "new": round(float(new), 4),
                     "difference": round(float(new - base), 4),
                     "interval_95": [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)],
                     "new_ahead_share": round(float(np.mean(d > 0)), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--new", type=Path, nargs="+", required=True,
                        help="one file, or several: scored as the mean of their calls in logits")
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(paired(args.base, args.new, args.boot, args.seed), indent=2))


if __name__ == "__main__":
    main()
