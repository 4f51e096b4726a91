"""Each look of the detection call, and what each combination of looks would score, on a labelled folder.

    .venv/bin/python bench/looks.py measure --data var/data/o1 --rows var/looks-o1.jsonl \
        [--models DIR] [--factors 1.5 2.0 2.5] [--sites 3]
    .venv/bin/python bench/looks.py report var/looks-o1.jsonl [MORE.jsonl ...] [--margins 0 0.5 1 1.5 2] [--json OUT]

Not a speed benchmark: the analysis behind docs/MODELS.md, "A second, coarser look" and "A coarser second look,
and the type read there", and the tables of ``bench/results/session19/protocol.md``. One pass over the images
measures every variant, so choosing among them costs no further inference.

``measure`` runs the detector and the type reader of ``--models`` (default: the bundled ones; the reader's card
must carry a detection fusion) on every radiograph of the folder: the native look as inference makes it (the
reader at the card's sites), and a coarser look at each ``--factors`` (:func:`pipeline.run.coarse_look`, the
reader at ``--sites`` of that look's peaks). Per look it writes the detection logit and, per site, the detector's
segmentation logit there, the reader's evidence, its top type and whether the site lies in the true box, and which
site :func:`pipeline.run.choose_site` picks among the first k (k = 1 and every site: where the type is read); for each
fractured image with a box, whether the call's map (:func:`pipeline.run.call_heatmap`: the native detector's
Grad-CAM with the reader's half from a look's strongest-evidence site among its first k) peaks inside the box.
One JSON line per image, after a first line that records the data, the models and their fusion.

``report`` scores the rows with the card's fusion weights (as ``measure`` recorded them):

* ``detection``: the AUC and the sensitivity at specificity 0.90 of the native fused logit, of its two inputs alone
  (``native detector alone``, ``native reader alone``: the reader's evidence over the card's sites), of each coarser
  look alone (k = 1) and its reader's evidence alone, and of the mean of the native and each coarser look's fused
  logits with k = 1 and with every site measured (``mean 1.5 s1`` ...). A card's Platt scaling of that mean is
  monotone, so the mean's AUC is the card's (``fracture-node evaluate`` gives the same figure);
* ``type``: the macro-F1 and the pointing game with the type and the reader's half of the map read at the
  native look, and, for each coarser look, k and ``--margins`` m, read at the coarser look when its fused logit
  exceeds the native one's by more than m (``1.5 s1 m1``: the card entry ``second_scale.type_margin``), with the
  share of images read there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import confusion_matrix, macro_f1, roc_auc, sensitivity_at_specificity  # noqa: E402
from pipeline.explain import heatmap_to_original, peak_point  # noqa: E402
from pipeline.models.imageio import load_file  # noqa: E402
from pipeline.models.preprocess import fracture_input  # noqa: E402
from pipeline.run import (  # noqa: E402
    TypeSite,
    call_heatmap,
    choose_site,
    coarse_look,
    evidence_site,
    fused_detection_logit,
    load_models,
    read_type_sites,
    type_sites,
)
from pipeline.taxonomy import FRACTURE_TYPES  # noqa: E402
from pipeline.training.datasets import read_generator_layout  # noqa: E402

NATIVE = "1"


def _inside(point: tuple[float, float], box: tuple[int, int, int, int] | None) -> int | None:
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return int(x0 <= point[0] < x1 and y0 <= point[1] < y1)


def _look(logit: float, found: list[TypeSite], box: tuple[int, int, int, int] | None) -> dict[str, Any]:
    chosen = {}
    for k in sorted({1, len(found)}):
        pick = choose_site(found[:k])
        chosen[str(k)] = next(i for i, site in enumerate(found) if site is pick)
    return {"logit": logit, "chosen": chosen,
            "sites": [{"detector": s.detector_evidence, "reader": s.read.evidence,
                       "type": int(np.argmax(s.type_logits)), "inside": _inside(s.centre, box)} for s in found]}


def measure(data: Path, rows: Path, models_dir: str | None, factors: list[float], sites: int) -> int:
    models = load_models(models_dir)
    if not models.fusion or models.classifier.architecture != "TypeReader":
        raise SystemExit("the models' type reader card carries no detection fusion for this detector")
    det, reader = models.detector.engine, models.classifier.engine
    det_long = int(models.detector.input_spec["long_side"])
    spec = models.classifier.input_spec
    reader_long, patch = int(spec["long_side"]), int(spec["patch"])
    records = [r for r in read_generator_layout(data) if r.is_radiograph and r.fracture is not None]
    rows.parent.mkdir(parents=True, exist_ok=True)
    with open(rows, "w") as out:
        out.write(json.dumps({"data": str(data), "fusion": models.fusion, "factors": factors, "sites": sites,
                              "models": [f"{i.label} {i.sha256[:12]}" for i in models.identities]}) + "\n")
        for index, rec in enumerate(records):
            pixels = load_file(rec.path).pixels
            x, geom = fracture_input(pixels, det_long)
            fp = det.forward(x)
            native = read_type_sites(pixels, fp.seg, geom, reader, reader_long, patch, type_sites(models.classifier))
            looks = {NATIVE: _look(fp.detect_logit, native, rec.box)}
            found = {NATIVE: native}
            for f in factors:
                logit, found[f"{f:g}"] = coarse_look(pixels, det, det_long, reader, reader_long, patch, sites, f)
                looks[f"{f:g}"] = _look(logit, found[f"{f:g}"], rec.box)
            row: dict[str, Any] = {
                "file": rec.path.name, "fracture": int(bool(rec.fracture)), "region": rec.region,
                "type": FRACTURE_TYPES.index(rec.type) if rec.fracture and rec.type in FRACTURE_TYPES else None,
                "looks": looks}
            if rec.fracture and rec.box is not None:
                det_map = heatmap_to_original(det.cam(fp), geom)
                row["map_inside"] = {
                    f"{name} s{k}": _inside(peak_point(call_heatmap(det_map.copy(), evidence_site(sites_[:k]))),
                                            rec.box)
                    for name, sites_ in found.items() for k in sorted({1, len(sites_)})}
            out.write(json.dumps(row) + "\n")
            if (index + 1) % 100 == 0:
                print(f"looks: {index + 1}/{len(records)} images", file=sys.stderr, flush=True)
    return len(records)


def _evidence(look: dict[str, Any], k: int | None) -> float:
    """The reader's evidence over a look's first ``k`` sites (all with None): the fusion's second input."""
    return max(s["reader"] for s in look["sites"][:k])


def _fused(look: dict[str, Any], k: int | None, fusion: dict[str, Any]) -> float:
    """A look's fused logit with its first ``k`` sites (all with None), as inference fuses it."""
    return fused_detection_logit(look["logit"], _evidence(look, k), fusion)


def _chosen_type(look: dict[str, Any], k: int | None) -> int:
    """The type at the site :func:`pipeline.run.choose_site` picked among a look's first ``k`` sites (all with
    None), as ``measure`` recorded it."""
    return int(look["sites"][look["chosen"][str(k or len(look["sites"]))]]["type"])


def _detection(z: list[float], y: np.ndarray) -> dict[str, float]:
    p = np.asarray(z, dtype=np.float64)
    return {"auc": round(float(roc_auc(p, y)), 4),
            "sensitivity_at_specificity_0.90": round(float(sensitivity_at_specificity(p, y, 0.90)), 4)}


def report(rows_path: Path, margins: list[float]) -> dict[str, Any]:
    with open(rows_path) as handle:
        header, *rows = [json.loads(line) for line in handle]
    fusion = header["fusion"]
    y = np.array([r["fracture"] for r in rows])
    coarse = [name for name in rows[0]["looks"] if name != NATIVE]
    measured = len(rows[0]["looks"][coarse[0]]["sites"]) if coarse else 1
    ks = sorted({1, measured})
    native = [_fused(r["looks"][NATIVE], None, fusion) for r in rows]
    detection = {"native": _detection(native, y),
                 "native detector alone": _detection([r["looks"][NATIVE]["logit"] for r in rows], y),
                 "native reader alone": _detection([_evidence(r["looks"][NATIVE], None) for r in rows], y)}
    for name in coarse:
        detection[f"{name} alone s1"] = _detection([_fused(r["looks"][name], 1, fusion) for r in rows], y)
        detection[f"{name} reader alone s1"] = _detection([_evidence(r["looks"][name], 1) for r in rows], y)
        for k in ks:
            detection[f"mean {name} s{k}"] = _detection(
                [0.5 * (n + _fused(r["looks"][name], k, fusion)) for n, r in zip(native, rows, strict=True)], y)
    typed = [r for r in rows if r["fracture"] and r["type"] is not None and "map_inside" in r]
    truth = np.array([r["type"] for r in typed], dtype=int)
    native_k = len(rows[0]["looks"][NATIVE]["sites"])

    def scores(pred: list[int], inside: list[int]) -> dict[str, float | None]:
        return {"macro_f1": round(float(macro_f1(confusion_matrix(truth, np.array(pred, dtype=int),
                                                                  len(FRACTURE_TYPES)))), 4) if typed else None,
                "pointing_game": round(float(np.mean(inside)), 4) if typed else None}

    base_pred = [_chosen_type(r["looks"][NATIVE], None) for r in typed]
    base_in = [r["map_inside"][f"{NATIVE} s{native_k}"] for r in typed]
    types: dict[str, Any] = {"native": scores(base_pred, base_in)}
    for name in coarse:
        for k in ks:
            for m in margins:
                moved = [_fused(r["looks"][name], k, fusion) > _fused(r["looks"][NATIVE], None, fusion) + m
                         for r in typed]
                pred = [_chosen_type(r["looks"][name], k) if mv else b
                        for r, mv, b in zip(typed, moved, base_pred, strict=True)]
                inside = [r["map_inside"][f"{name} s{k}"] if mv else b
                          for r, mv, b in zip(typed, moved, base_in, strict=True)]
                types[f"{name} s{k} m{m:g}"] = {**scores(pred, inside),
                                                "read_there": round(float(np.mean(moved)), 4) if typed else None}
    return {"rows": str(rows_path), "data": header["data"], "models": header["models"], "images": len(rows),
            "fractured": int(y.sum()), "typed": len(typed),
            "detection": detection, "type": types}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="one pass over the images: every look, every site")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--rows", type=Path, required=True, help="where to write the rows (JSON lines)")
    m.add_argument("--models", default=None, help="a models folder (default: the bundled models)")
    m.add_argument("--factors", type=float, nargs="+", default=[1.5, 2.0, 2.5])
    m.add_argument("--sites", type=int, default=3, help="reader sites measured in each coarser look")
    r = sub.add_parser("report", help="score every combination from the rows")
    r.add_argument("rows", type=Path, nargs="+")
    r.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    r.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.command == "measure":
        if any(not f > 1.0 for f in args.factors):
            ap.error("each factor is above 1 (the image shown that many times smaller)")
        n = measure(args.data, args.rows, args.models, args.factors, args.sites)
        print(json.dumps({"rows": str(args.rows), "images": n}))
        return
    result = [report(path, args.margins) for path in args.rows]
    text = json.dumps(result if len(result) > 1 else result[0], indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
