"""A tiny hand-made dataset in the generator's on-disk layout, for fast tests and smoke runs.

A bright vertical bar stands for a bone; a fracture is a dark line across it (its angle depends on the
type index) with the line's neighbourhood as mask. Negatives are colour noise, flat grey and "text".
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.augment import mask_box

Box4 = tuple[int, int, int, int]


def toy_radiograph(rng: np.random.Generator, fracture: bool, type_idx: int, h: int = 128, w: int = 96,
                   at: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, Box4 | None]:
    """(image float32 [0,1], mask uint8, box) of one toy radiograph."""
    img = np.full((h, w), 0.12, np.float32)
    x0 = int(w * 0.3)
    x1 = int(w * 0.7)
    img[:, x0:x1] = 0.75
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    mask: np.ndarray = np.zeros((h, w), np.uint8)
    box = None
    if fracture:
        cy, cx = at if at is not None else (int(rng.integers(h // 4, 3 * h // 4)), (x0 + x1) // 2)
        angle = np.deg2rad(type_idx * 15)
        dx, dy = int(np.cos(angle) * (x1 - x0) * 0.6), int(np.sin(angle) * (x1 - x0) * 0.6)
        line = np.zeros((h, w), np.uint8)
        cv2.line(line, (cx - dx, cy - dy), (cx + dx, cy + dy), 255, 2)
        img[line > 0] = 0.2
        mask = cv2.dilate(line, np.ones((5, 5), np.uint8))
        box = mask_box(mask)
    return np.clip(img, 0, 1), mask, box


def write_toy_dataset(root: str | Path, count: int = 24, seed: int = 0, negatives: int = 6,
                      h: int = 128, w: int = 96) -> Path:
    """Write ``count`` radiographs (half fractured) and ``negatives`` non-radiographs in the generator's layout."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "negatives").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1"])
        for i in range(count):
            fracture = i % 2 == 1
            t = int(rng.integers(0, len(FRACTURE_TYPES)))
            img, mask, box = toy_radiograph(rng, fracture, t, h, w)
            name = f"images/{i:06d}.png"
            cv2.imwrite(str(root / name), (img * 65535).astype(np.uint16))
            cv2.imwrite(str(root / "masks" / f"{i:06d}.png"), mask)
            writer.writerow([name, int(fracture), FRACTURE_TYPES[t] if fracture else "", "femur", "L",
                             *(box if box else ("", "", "", ""))])
    with open(root / "negatives.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "kind"])
        kinds = ("photo", "flat", "text")
        for i in range(negatives):
            kind = kinds[i % 3]
            if kind == "photo":
                neg = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                neg[..., 2] = 255
            elif kind == "flat":
                neg = np.full((h, w), 128, np.uint8)
            else:
                neg = np.full((h, w), 255, np.uint8)
                for y in range(10, h - 10, 12):
                    cv2.putText(neg, "lorem ipsum", (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 0, 1)
            name = f"negatives/{i:06d}.png"
            cv2.imwrite(str(root / name), neg)
            writer.writerow([name, kind])
    return root


def write_untrained_bundles(root: str | Path, width: int = 8, long_side: int = 128, seed: int = 0,
                            reader: bool = False, classifier_long_side: int | None = None) -> Path:
    """Randomly initialised validity/detector/classifier bundles (structure tests, no training); with ``reader``
    the classifier is a second-stage :class:`~pipeline.models.nets.TypeReader` instead of the detector's net,
    with ``classifier_long_side`` a separate FractureNet of its own that reads the image at that size."""
    import torch

    from pipeline.models.bundle import make_card, save_bundle
    from pipeline.models.nets import FractureNet, TypeReader, ValidityNet

    root = Path(root)
    torch.manual_seed(seed)
    net = FractureNet(width=width).eval()
    spec = {"long_side": long_side}
    op = {"threshold": 0.5, "indeterminate_band": [0.4, 0.6]}
    save_bundle(net, make_card(name="toy-detector", task="detect", architecture="FractureNet",
                               config=dict(net.config), input_spec=spec, operating_point=op), root / "detector")
    if reader:
        rnet = TypeReader(width=width).eval()
        save_bundle(rnet, make_card(name="toy-type-reader", task="classify", architecture="TypeReader",
                                    config=dict(rnet.config), input_spec={"long_side": 2 * long_side, "patch": 64}),
                    root / "classifier")
    else:
        cnet = FractureNet(width=width).eval() if classifier_long_side else net
        save_bundle(cnet, make_card(name="toy-classifier", task="classify", architecture="FractureNet",
                                    config=dict(cnet.config),
                                    input_spec={"long_side": classifier_long_side or long_side}),
                    root / "classifier")
    vnet = ValidityNet(width=8).eval()
    save_bundle(vnet, make_card(name="toy-validity", task="validity", architecture="ValidityNet",
                                config=dict(vnet.config), input_spec={"size": 64},
                                operating_point={"threshold": 0.0}), root / "validity")
    return root
