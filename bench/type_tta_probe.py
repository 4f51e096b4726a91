"""Does reading the type patch in more orientations raise the type's macro-F1? A probe before any change.

    .venv/bin/python bench/type_tta_probe.py --data var/data/cal [--models DIR] [--limit N]

Not a speed benchmark: the probe behind docs/MODELS.md, "A mirrored look (session 25)", its last part. For every
fractured radiograph with a type of a labelled folder it runs the models as inference does
(``run_fracture_models``, no maps), then reads the type reader's patch at the site the type was read
(``FractureOutputs.type_centre``, at the scale it was read) again in each of the eight orientations of the square
(four turns, each also mirrored): the reader was trained on patches at any rotation and flipped, so each is an
equally valid reading. It prints, as JSON, the macro-F1 of the type as inference gives it, of the patch alone
in 1, 2 (mirrored), 4 (the turns) and 8 orientations, and of inference's distribution averaged with the eight.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.metrics import confusion_matrix, macro_f1  # noqa: E402
from pipeline.models.imageio import load_file  # noqa: E402
from pipeline.models.preprocess import cut_patch, standardise  # noqa: E402
from pipeline.run import load_models, run_fracture_models, scaled_long_side, tempered_softmax  # noqa: E402
from pipeline.taxonomy import FRACTURE_TYPES  # noqa: E402
from pipeline.training.datasets import read_generator_layout  # noqa: E402


def orientations(patch: np.ndarray) -> list[np.ndarray]:
    """The eight orientations of a square: the four quarter turns, then each mirrored."""
    turns = [np.rot90(patch, k) for k in range(4)]
    return [np.ascontiguousarray(p) for p in turns + [t[:, ::-1] for t in turns]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", default=None, help="model folder (default: the bundled models)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    models = load_models(args.models, num_threads=args.threads)
    reader = models.classifier
    long_side, size = int(reader.input_spec["long_side"]), int(reader.input_spec["patch"])
    records = [r for r in read_generator_layout(args.data) if r.is_radiograph and r.fracture and r.type]
    if args.limit:
        records = records[:args.limit]
    truth: list[int] = []
    predicted: dict[str, list[int]] = {name: [] for name in ("inference", "1", "2", "4", "8", "inference+8")}
    for rec in tqdm(records, desc="type orientations"):
        rad = load_file(rec.path)
        outs = run_fracture_models(rad, models, cams=False)
        assert outs.type_centre is not None
        side = scaled_long_side(long_side, outs.type_scale)
        patch, _where = cut_patch(rad.pixels, outs.type_centre, side, size)
        probs = [tempered_softmax(reader.engine.classify(standardise(p)).type_logits, reader.temperature)
                 for p in orientations(patch)]
        truth.append(FRACTURE_TYPES.index(rec.type))
        eight = np.mean(probs, axis=0)
        readings = {"inference": outs.type_probs, "1": probs[0], "2": np.mean([probs[0], probs[4]], 0),
                    "4": np.mean(probs[:4], 0), "8": eight, "inference+8": 0.5 * (outs.type_probs + eight)}
        for name, dist in readings.items():
            predicted[name].append(int(np.argmax(dist)))
    t = np.array(truth)
    figures = {"data": args.data, "images": len(records),
               "type_macro_f1": {name: round(macro_f1(confusion_matrix(t, np.array(p), len(FRACTURE_TYPES))), 4)
                                 for name, p in predicted.items()}}
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
