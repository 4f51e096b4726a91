"""How often each way of pointing at the fracture lands inside the true box, on a labelled folder.

    .venv/bin/python bench/pointing_rules.py --data var/data/cal [--models DIR ...] [--limit N]

Not a speed benchmark: the analysis behind docs/MODELS.md, "The call's heatmap". For every fractured image with
a box, and for each model directory (default: the bundled models; NumPy runtime), it takes the point each rule
names and counts it a hit when it lies strictly inside the box (as ``fracture-node evaluate``'s pointing game):

* ``detector_gradcam``: the maximum of the detector's own Grad-CAM (the map until session 11);
* ``detector_seg_peak``: the detector's strongest segmentation peak;
* ``type_site``: the site where the type is read (``pipeline.run.choose_site``);
* ``reader_strongest_cell``: the strongest cell of the reader's map in the patch holding its strongest evidence;
* ``fused_logit_gradcam_unscaled``: the Grad-CAM of the fused logit over both networks' layers, each in logit
  units (``w_detector x`` the detector's unnormalised map ``+ w_reader x`` the reader's), without scaling either
  to its peak (only where the card's detection fusion applies);
* ``call_heatmap``: the maximum of the map the pipeline ships (``pipeline.run.call_heatmap``).

With two or more model directories it also counts the images on which the call's heatmap peak differs between
the first two. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.explain import peak_point  # noqa: E402
from pipeline.models.imageio import load_file  # noqa: E402
from pipeline.models.numpy_nets import relu  # noqa: E402
from pipeline.models.preprocess import add_patch_map, fracture_input, map_to_original  # noqa: E402
from pipeline.run import (  # noqa: E402
    ModelSet,
    evidence_site,
    load_models,
    read_type_sites,
    run_fracture_models,
    type_sites,
)
from pipeline.training.datasets import Record, read_generator_layout  # noqa: E402


def _inside(box: tuple[int, int, int, int], point: tuple[float, float]) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= point[0] < x1 and y0 <= point[1] < y1


def points(rec: Record, models: ModelSet) -> dict[str, tuple[float, float]]:
    """The point each rule names on one image."""
    rad = load_file(rec.path)
    outs = run_fracture_models(rad, models, cams=True, type_cam=False)
    assert outs.heatmap is not None and outs.detector_peak is not None and outs.type_centre is not None
    found_points: dict[str, tuple[float, float]] = {
        "detector_gradcam": outs.detector_peak, "type_site": outs.type_centre, "call_heatmap": peak_point(outs.heatmap),
    }
    # The detector's pass again, for what FractureOutputs does not keep (this is an analysis, not the hot path).
    det, reader = models.detector.engine, models.classifier.engine
    x, geom = fracture_input(rad.pixels, int(models.detector.input_spec.get("long_side", 512)))
    fp = det.forward(x)
    spec = models.classifier.input_spec
    found = read_type_sites(rad.pixels, fp.seg, geom, reader, int(spec["long_side"]), int(spec["patch"]),
                            type_sites(models.classifier))
    found_points["detector_seg_peak"] = found[0].centre
    strongest = evidence_site(found)
    cam = strongest.read.evidence_cam
    assert cam is not None
    iy, ix = np.unravel_index(int(np.argmax(cam)), cam.shape)
    cell = strongest.patch.side / cam.shape[0]
    found_points["reader_strongest_cell"] = (strongest.patch.left + (ix + 0.5) * cell,
                                             strongest.patch.top + (iy + 0.5) * cell)
    fusion = models.fusion
    if fusion is not None:
        c, h, w = fp.features.shape
        raw = relu(det.cam_weights(fp).astype(np.float32) @ fp.features.reshape(c, h * w)).reshape(h, w)
        weights = fusion["weights"]
        fused = np.maximum(map_to_original(raw, geom), 0.0) * float(weights["detector_logit"])
        # The reader's unnormalised Grad-CAM: relu(seg - bias) / cells = its scaled map x its peak / cells.
        peak = max(strongest.read.evidence - float(reader.seg_b), 0.0)
        add_patch_map(fused, cam * (peak / cam.size), strongest.patch, float(weights["reader_evidence"]))
        found_points["fused_logit_gradcam_unscaled"] = peak_point(fused)
    return found_points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, action="append", default=None,
                        help="A model directory (validity/, detector/, classifier/); repeat to compare.")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    records = [r for r in read_generator_layout(args.data, include_negatives=False) if r.fracture and r.box]
    records = records[: args.limit] if args.limit else records
    model_dirs = args.models or [None]
    results, call_peaks = [], []
    for model_dir in model_dirs:
        models = load_models(model_dir)
        if models.classifier.architecture != "TypeReader":
            raise SystemExit(f"{models.model_dir}: the classifier is not a type reader")
        hits: dict[str, list[bool]] = {}
        peaks = []
        for rec in records:
            assert rec.box is not None
            named = points(rec, models)
            for rule, point in named.items():
                hits.setdefault(rule, []).append(_inside(rec.box, point))
            peaks.append(named["call_heatmap"])
        results.append({"models": [f"{m.name} {m.version} {m.sha256[:12]}" for m in models.identities],
                        "images": len(records),
                        "inside_box": {rule: round(float(np.mean(v)), 4) for rule, v in hits.items()}})
        call_peaks.append(peaks)
    out: dict[str, object] = {"data": str(args.data), "results": results}
    if len(call_peaks) >= 2:
        out["call_peak_differs_first_two"] = sum(a != b for a, b in zip(call_peaks[0], call_peaks[1], strict=True))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
