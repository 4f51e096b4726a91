"""Inference benchmark on two CPU threads: decode a 2000 px image, then validity + detection +
classification + Grad-CAM (maps at the original geometry). Explanation images (edges, hybrid) are timed
separately.

    .venv/bin/python bench/bench_inference.py [--models DIR] [--runs 20] [--size 2000] [--runtime onnx|numpy|torch]
                                              [--one-reading]
                                              [--format png|dicom]

``--runtime onnx`` (convolutions in ONNX Runtime, the rest in NumPy: the command line's default) and
``--runtime numpy`` (the job workers' default) make the detector's Grad-CAM only: their type reader has none,
and a worker's results carry none. ``--runtime torch`` makes the type reader's map too, as ``fracture-node
analyze`` does. ``--threads`` sets PyTorch's threads or each ONNX Runtime session's; NumPy's BLAS uses every
core unless ``OPENBLAS_NUM_THREADS`` says otherwise. ``--format dicom`` decodes an uncompressed DX DICOM (what
a modality pushes) instead of a 16-bit PNG (an upload).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.explain import edge_view, hybrid_overlay  # noqa: E402
from pipeline.models.imageio import load_file  # noqa: E402
from pipeline.run import load_models, run_fracture_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_harness import machine, percentile  # noqa: E402


def make_image(path: Path, size: int) -> None:
    """A 16-bit PNG (``path`` ending .png) or an uncompressed DX DICOM (.dcm) of a generated fractured radiograph
    with a long side of ``size`` px."""
    from pipeline.synth import display_image, render_sample

    sample = render_sample(4242, fracture=True, long_side=size)
    if path.suffix == ".dcm":
        from pipeline.synth.dataset import sample_to_dicom

        sample_to_dicom(sample, modality="DX").save_as(path, enforce_file_format=True)
        return
    cv2.imwrite(str(path), (np.clip(display_image(sample), 0, 1) * 65535).astype(np.uint16))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=None)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtime", choices=("onnx", "numpy", "torch"), default="onnx")
    ap.add_argument("--one-reading", action="store_true",
                    help="read each image once even where the reader's card reads it mirrored too "
                         "(FRACTURE_MIRROR_LOOK=off)")
    ap.add_argument("--format", choices=("png", "dicom"), default="png",
                    help="the file decoded: a 16-bit PNG (an upload) or an uncompressed DX DICOM (what a modality "
                         "pushes)")
    args = ap.parse_args()
    models = load_models(args.models, num_threads=args.threads, runtime=args.runtime, mirror=not args.one_reading)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("bench.png" if args.format == "png" else "bench.dcm")
        make_image(path, args.size)
        core, explain = [], []
        stages: dict[str, list[float]] = {"decode": [], "radiograph_check": [], "fracture_models": []}
        for i in range(args.runs + 3):
            t0 = time.perf_counter()
            rad = load_file(path)
            ta = time.perf_counter()
            models.validity(rad)
            tb = time.perf_counter()
            outs = run_fracture_models(rad, models, cams=True)
            t1 = time.perf_counter()
            assert outs.heatmap is not None
            edges = edge_view(rad.pixels)
            hybrid_overlay(rad.pixels, outs.heatmap, edges)
            t2 = time.perf_counter()
            if i >= 3:  # warm-up
                core.append(1000 * (t1 - t0))
                explain.append(1000 * (t2 - t1))
                for name, ms in zip(stages, (ta - t0, tb - ta, t1 - tb), strict=True):
                    stages[name].append(1000 * ms)
        h, w = rad.pixels.shape
    result = {
        "image": f"{w}x{h} " + ("16-bit PNG" if args.format == "png" else "uncompressed DX DICOM"),
        "runtime": args.runtime,
        "readings": 2 if models.fusion and models.fusion.get("mirror") else 1,
        "threads": args.threads if args.runtime != "numpy" else "BLAS default",
        "runs": args.runs,
        "core_ms_median": round(statistics.median(core), 1),
        "core_ms_p90": round(percentile(core, 0.9), 1),
        "core": "decode + validity (rules + CNN) + detection + classification + Grad-CAM of the detector"
                + (" and of the type reader" if outs.type_heatmap is not None else ""),
        "stages_ms_median": {name: round(statistics.median(v), 1) for name, v in stages.items()},
        "stages": "decode: file to pixels; radiograph_check: rules + CNN; fracture_models: detector, type reader "
                  "and Grad-CAM",
        "explanation_images_ms_median": round(statistics.median(explain), 1),
        "target_ms": 150,
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
