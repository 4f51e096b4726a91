"""How the models' figures hold up under acquisition shifts they were not trained on.

    .venv/bin/python bench/robustness.py --data var/data/sel [--models DIR] [--limit N] [--shifts a,b] [--json OUT]

Not a speed benchmark: for each shift of ``pipeline.evaluation.shifts`` (default: all of them) it runs
``fracture-node evaluate``'s stack (``evaluate_folder``, in the onnx runtime by default, as the command) over
the radiographs of a labelled folder with that shift applied, and prints one row per shift: the share of
radiographs the radiograph check still accepts, detection AUC, sensitivity at specificity 0.90, sensitivity and
specificity at the bundled operating point, ECE, the type's macro-F1 and the pointing game. The negatives are not
shifted and not scored here (``evaluate`` scores them). Writes the full results as JSON with ``--json``.

``--validity-only`` runs the radiograph check alone (a few ms an image), on the radiographs and on the
negatives, both shifted: the share of radiographs it accepts and of negatives it still refuses, per shift and
per negative kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.evaluate import evaluate_folder  # noqa: E402
from pipeline.evaluation.shifts import SHIFTS, Shift, get_shift, shift_rng  # noqa: E402
from pipeline.models.bundle import RUNTIMES  # noqa: E402
from pipeline.models.imageio import load_file  # noqa: E402
from pipeline.run import DEFAULT_RUNTIME, ModelSet, load_models  # noqa: E402
from pipeline.training.datasets import read_generator_layout  # noqa: E402

COLUMNS = (
    ("accepted", lambda r: r["validity"]["per_kind"].get("radiograph")),
    ("auc", lambda r: r["detection"]["auc"]),
    ("sens@spec0.9", lambda r: r["detection"]["sensitivity_at_specificity_0.90"]),
    ("sens@op", lambda r: r["detection"]["sensitivity"]),
    ("spec@op", lambda r: r["detection"]["specificity"]),
    ("ece", lambda r: r["calibration"]["ece"]),
    ("macro_f1", lambda r: r["classification"]["macro_f1"]),
    ("pointing", lambda r: r["localization"]["pointing_game"]),
)


def row(result: dict) -> dict[str, float | None]:
    return {name: get(result) for name, get in COLUMNS}


def validity_under_shifts(models: ModelSet, data: Path, shifts: list[Shift], limit: int | None) -> dict[str, dict]:
    """Per shift: the share of radiographs the radiograph check accepts and of negatives it refuses (by kind)."""
    records = read_generator_layout(data)
    if limit:
        records = [r for r in records if r.is_radiograph][:limit] + [r for r in records if not r.is_radiograph][:limit]
    right: dict[str, dict[str, list[bool]]] = {shift.name: {} for shift in shifts}
    for index, rec in enumerate(records):  # each image decoded once, then shifted every way
        rad = load_file(rec.path)
        kind = "radiograph" if rec.is_radiograph else (rec.kind or "negative")
        for shift in shifts:
            pixels, _ = shift.apply(rad.pixels, rec.box, shift_rng(index, shift.name))
            verdict = models.validity(replace(rad, pixels=pixels))
            right[shift.name].setdefault(kind, []).append(verdict.is_radiograph == rec.is_radiograph)
    out: dict[str, dict] = {}
    for shift in shifts:
        per_kind = {k: round(float(np.mean(v)), 4) for k, v in sorted(right[shift.name].items())}
        negatives = [x for k, v in right[shift.name].items() if k != "radiograph" for x in v]
        out[shift.name] = {"description": shift.description, "radiographs_accepted": per_kind.get("radiograph"),
                           "negatives_refused": round(float(np.mean(negatives)), 4) if negatives else None,
                           "worst_negative_kind": min((v for k, v in per_kind.items() if k != "radiograph"),
                                                      default=None),
                           "per_kind": per_kind, "counts": {k: len(v) for k, v in sorted(right[shift.name].items())}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="labelled folder in the generator's layout")
    ap.add_argument("--models", type=Path, default=None, help="model folder (default: the bundled models)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N radiographs")
    ap.add_argument("--shifts", default=",".join(SHIFTS), help="comma-separated shift names (default: all)")
    ap.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME)
    ap.add_argument("--json", type=Path, default=None, help="write every shift's full evaluation here")
    ap.add_argument("--validity-only", action="store_true",
                    help="the radiograph check alone, on radiographs and negatives, both shifted")
    args = ap.parse_args(argv)
    shifts = [get_shift(n.strip()) for n in args.shifts.split(",") if n.strip()]
    models = load_models(args.models, runtime=args.runtime)
    print("models: " + ", ".join(f"{i.name} {i.version} ({i.sha256[:12]})" for i in models.identities))
    print(f"data: {args.data}  limit: {args.limit}  runtime: {args.runtime}")
    if args.validity_only:
        found = validity_under_shifts(models, args.data, shifts, args.limit)
        print(f"{'shift':<12}{'radiographs accepted':>22}{'negatives refused':>19}{'worst kind':>12}")
        for name, v in found.items():
            cells = [v["radiographs_accepted"], v["negatives_refused"], v["worst_negative_kind"]]
            print(f"{name:<12}" + "".join(f"{'-' if c is None else f'{c:.4f}':>{w}}"
                                          for c, w in zip(cells, (22, 19, 12), strict=True)))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"data": str(args.data), "limit": args.limit, "models": [
                {"name": i.name, "version": i.version, "sha256": i.sha256} for i in models.identities],
                "validity": found}, indent=2) + "\n")
        worst = min((v["radiographs_accepted"] for v in found.values() if v["radiographs_accepted"] is not None),
                    default=None)
        print(f"SUMMARY shifts={len(found)} worst_radiographs_accepted={worst}")
        return 0
    print(f"{'shift':<12}" + "".join(f"{name:>13}" for name, _ in COLUMNS) + f"{'s':>7}")
    out: dict[str, dict] = {}
    for shift in shifts:
        t0 = time.perf_counter()
        result = evaluate_folder(models, args.data, limit=args.limit, show=False, shift=shift,
                                 include_negatives=False)
        figures = row(result)
        out[shift.name] = {"description": shift.description, "summary": figures, "evaluation": result}
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>13}" for v in figures.values())
        print(f"{shift.name:<12}{cells}{time.perf_counter() - t0:>7.0f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {name: v["summary"] for name, v in out.items()}
        args.json.write_text(json.dumps({"data": str(args.data), "limit": args.limit, "runtime": args.runtime,
                                         "models": [{"name": i.name, "version": i.version, "sha256": i.sha256}
                                                    for i in models.identities],
                                         "summary": summary, "shifts": out}, indent=2) + "\n")
    worst = min((v["summary"]["auc"] for v in out.values() if v["summary"]["auc"] is not None), default=None)
    print(f"SUMMARY shifts={len(out)} worst_auc={worst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
