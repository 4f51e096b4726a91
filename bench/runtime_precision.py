"""How exact the two runtimes are: each one's detection logit against a float64 PyTorch pass of the same bundled
weights, and the fused probability of the whole analysis in NumPy against PyTorch, on generated radiographs.

    .venv/bin/python bench/runtime_precision.py [--images 7]

Prints one line per image and the worst of each figure (docs/MODELS.md, "Two runtimes").
"""

from __future__ import annotations

import argparse
import copy

import torch

import pipeline.synth as synth
from pipeline.models.preprocess import fracture_input
from pipeline.run import analyze, load_models
from pipeline.types import Radiograph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=7, help="generated radiographs (seeds 11, 12, ...)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch_models, numpy_models = load_models(runtime="torch"), load_models(runtime="numpy")
    net32 = torch_models.detector.model.eval()
    net64 = copy.deepcopy(net32).double().eval()
    long_side = int(torch_models.detector.card["input"]["long_side"])
    worst = {"numpy_logit": 0.0, "torch_logit": 0.0, "probability": 0.0}
    for k in range(args.images):
        seed, fracture = 11 + k, k % 3 != 1
        pixels = synth.display_image(synth.render_sample(seed, fracture=fracture, long_side=900))
        x, _geom = fracture_input(pixels, long_side)
        with torch.inference_mode():
            ref = float(net64(torch.from_numpy(x)[None, None].double()).detect[0])
            t32 = float(net32(torch.from_numpy(x)[None, None]).detect[0])
        n32 = numpy_models.detector.engine.forward(x).detect_logit
        a, b = analyze(Radiograph(pixels=pixels), torch_models), analyze(Radiograph(pixels=pixels), numpy_models)
        assert a.detection is not None and b.detection is not None
        errs = {"numpy_logit": abs(n32 - ref), "torch_logit": abs(t32 - ref),
                "probability": abs(a.detection.probability - b.detection.probability)}
        worst = {key: max(worst[key], value) for key, value in errs.items()}
        print(f"seed {seed} fracture={fracture!s:5} logit64 {ref:+.4f}  numpy {errs['numpy_logit']:.1e}  "
              f"torch {errs['torch_logit']:.1e}  probability numpy-torch {errs['probability']:.1e}")
    print("WORST " + "  ".join(f"{key} {value:.1e}" for key, value in worst.items()))


if __name__ == "__main__":
    main()
