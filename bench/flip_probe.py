"""Does a mirrored second look raise the call's AUC? A probe before any change to inference.

    .venv/bin/python bench/flip_probe.py --data var/data/cal --out DIR [--models DIR] [--limit N]

Not a speed benchmark: the probe behind docs/MODELS.md, "A mirrored look (session 25)". For every radiograph of
a labelled folder (the generator's layout) it runs the fracture models as inference does (``run_fracture_models``,
no maps) on the image and on its left-right mirror, and writes three ``fracture-node evaluate --per-image``-style
CSVs into ``--out`` (``plain.csv``, ``mirror.csv``, ``mean.csv``: the call's and the detector's logits of the
mirror, and the mean of the two looks' logits), which ``bench/paired.py`` compares. A mirror changes nothing
the types are defined by, and the networks were trained on flipped crops, so the two looks differ only by what
the networks have not learned to be symmetric about: averaging them removes part of that noise. ``--axis
vertical`` mirrors up-down instead; behind a card that already reads the image and its left-right mirror
(``mirror``, reader 1.7.0) the mean is then of four readings.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import confusion_matrix, macro_f1  # noqa: E402
from pipeline.explain import peak_point  # noqa: E402
from pipeline.models.imageio import load_file  # noqa: E402
from pipeline.run import (  # noqa: E402
    fused_detection_logit,
    load_models,
    mirror_look,
    run_fracture_models,
    second_scale,
)
from pipeline.taxonomy import FRACTURE_TYPES  # noqa: E402
from pipeline.training.datasets import read_generator_layout  # noqa: E402

FIELDS = ("file", "kind", "fracture", "type", "probability", "detector_probability")
LOOKS = ("native", "coarse")


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=None, help="model folder (default: the bundled models)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--axis", choices=("horizontal", "vertical"), default="horizontal",
                    help="the second reading's mirror: left-right (default) or up-down; up-down behind a card that "
                         "already reads each image and its left-right mirror gives four readings in all")
    args = ap.parse_args(argv)
    vertical = args.axis == "vertical"
    models = load_models(args.models, num_threads=args.threads)
    temp = models.detector.temperature
    records = [r for r in read_generator_layout(args.data) if r.is_radiograph]
    if args.limit:
        records = records[:args.limit]
    fusion = models.fusion
    second = second_scale(fusion)
    if fusion is None or second is None:
        raise SystemExit("the probe expects a reader card with a two-scale detection fusion")
    if mirror_look(fusion) and not vertical:
        raise SystemExit("the probe makes the mirrored reading itself: give --models a folder whose reader card "
                         "has no mirror (session 25 probed reader 1.6.1's: git show "
                         "f1414cb:pipeline/models/bundled/classifier/model.json)")
    platt = second["platt"]
    rows: dict[str, list[dict[str, object]]] = {name: [] for name in ("plain", "mirror", "mean", "mean_native")}
    truth: list[int] = []
    predicted: dict[str, list[int]] = {"plain": [], "mirror": [], "mean": []}  # the type, per look and averaged
    hits: dict[str, list[int]] = {"plain": [], "mirror": [], "mean": []}  # the call's map peak inside the box
    parts: list[dict[str, object]] = []  # each look's inputs to the call, for finding where they differ
    for rec in tqdm(records, desc="flip probe"):
        rad = load_file(rec.path)
        looks, maps, type_probs = [], [], []
        flipped = rad.pixels[::-1, :] if vertical else rad.pixels[:, ::-1]
        for pixels in (rad.pixels, np.ascontiguousarray(flipped)):
            outs = run_fracture_models(replace(rad, pixels=pixels), models, cams=True, type_cam=False)
            native = fused_detection_logit(outs.detect_logit, outs.reader_evidence, fusion)
            looks.append({"native": native, "coarse": float(outs.coarse_logit), "detector": outs.detect_logit / temp,
                          "evidence": float(outs.reader_evidence), "call": _logit(float(outs.probability))})
            maps.append(outs.heatmap)
            type_probs.append(outs.type_probs)
        plain, mirror = looks
        maps[1] = maps[1][::-1, :] if vertical else maps[1][:, ::-1]  # back to the image's own geometry
        if rec.fracture and rec.type:
            truth.append(FRACTURE_TYPES.index(rec.type))
            for name, probs in (("plain", type_probs[0]), ("mirror", type_probs[1]),
                                ("mean", 0.5 * (type_probs[0] + type_probs[1]))):
                predicted[name].append(int(np.argmax(probs)))
        if rec.fracture and rec.box is not None:
            x0, y0, x1, y1 = rec.box
            for name, heat in (("plain", maps[0]), ("mirror", maps[1]), ("mean", maps[0] + maps[1])):
                px, py = peak_point(heat)
                hits[name].append(int(x0 <= px < x1 and y0 <= py < y1))
        parts.append({"file": str(rec.path), "fracture": int(bool(rec.fracture)), "type": rec.type or "",
                      **{f"{look}_{key}": round(value, 5) for look, values in (("plain", plain), ("mirror", mirror))
                         for key, value in values.items()}})
        base = {"file": str(rec.path), "kind": "radiograph", "fracture": int(bool(rec.fracture)),
                "type": rec.type or ""}

        def call(native: float, coarse: float) -> float:
            return platt["scale"] * 0.5 * (native + coarse) + platt["bias"]

        variants = {
            "plain": (plain["call"], plain["detector"]),
            "mirror": (mirror["call"], mirror["detector"]),
            # both looks of both images averaged
            "mean": (call(0.5 * (plain["native"] + mirror["native"]), 0.5 * (plain["coarse"] + mirror["coarse"])),
                     0.5 * (plain["detector"] + mirror["detector"])),
            # the native look mirrored too, the coarse look once (about half the added cost)
            "mean_native": (call(0.5 * (plain["native"] + mirror["native"]), plain["coarse"]),
                            0.5 * (plain["detector"] + mirror["detector"])),
        }
        for name, (z, d) in variants.items():
            rows[name].append({**base, "probability": round(_sigmoid(z), 6),
                               "detector_probability": round(_sigmoid(d), 6)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in rows.items():
        with open(out / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(table)
    with open(out / "components.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(parts[0]))
        writer.writeheader()
        writer.writerows(parts)
    summary = {
        "images": len(records),
        "type_macro_f1": {name: round(macro_f1(confusion_matrix(np.array(truth), np.array(pred),
                                                                   len(FRACTURE_TYPES))), 4)
                          for name, pred in predicted.items()},
        "pointing_game": {name: round(float(np.mean(h)), 4) for name, h in hits.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    print(f"wrote {len(records)} rows to each of {', '.join(str(out / f'{n}.csv') for n in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
