"""Write rendered radiographs in the generator layout that :func:`pipeline.training.datasets.read_generator_layout`
reads: ``labels.csv``, ``images/NNNNNN.png``, ``masks/NNNNNN.png`` and ``altsim.json``."""

from __future__ import annotations

import csv
import ctypes
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.altsim.render import render

VERSION = "1.0"
HEADER = ["file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1",
          "child", "projection", "bone", "bits", "px_per_mm", "extras"]


def label_for(seed: int, index: int, fracture_rate: float) -> bool:
    """Whether sample ``index`` is fractured: its own stream, so the label never depends on the worker count."""
    return bool(np.random.default_rng([seed, index, 0xF4AC]).random() < fracture_rate)


def _tune_allocator() -> None:
    """Keep freed image buffers in the heap instead of returning them to the kernel after every array.

    Rendering allocates and frees dozens of multi-megabyte temporaries per image; with glibc's default mmap
    threshold each one is a fresh mmap with page faults, which cost about a third of the CPU time. No-op where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would only contend
    _tune_allocator()


def _write_one(job: tuple[str, int, int, float, int | None]) -> list[str]:
    out_dir, seed, index, rate, long_side = job
    root = Path(out_dir)
    sample = render(seed, index, fracture=label_for(seed, index, rate), long_side=long_side)
    name = f"{index:06d}.png"
    for folder, array in (("images", sample["image"]), ("masks", sample["mask"])):
        if not cv2.imwrite(str(root / folder / name), array, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write {root / folder / name}")
    box = sample["box"] if sample["fracture"] else None
    return [f"images/{name}", "1" if sample["fracture"] else "0", sample["type"] or "", sample["region"],
            sample["laterality"], *([str(v) for v in box] if box else ["", "", "", ""]),
            "1" if sample["child"] else "0", sample["projection"], sample["bone"], str(sample["bits"]),
            f"{sample['px_per_mm']:.3f}", ";".join(sample["extras"])]


def generate(out_dir: str | Path, count: int, seed: int, fracture_rate: float = 0.5, workers: int = 1,
             long_side: int | None = None, progress: bool = True) -> Path:
    """Render ``count`` images into ``out_dir``; byte-identical whatever ``workers`` is. Returns labels.csv."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 0.0 <= fracture_rate <= 1.0:
        raise ValueError("fracture_rate must be within [0, 1]")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), int(seed), i, float(fracture_rate), long_side) for i in range(count)]
    started = time.monotonic()
    rows: list[list[str]] = []

    def report(n: int) -> None:
        if progress and (n % 50 == 0 or n == count):
            rate = n / max(time.monotonic() - started, 1e-6)
            print(f"altsim: {n}/{count} images ({rate:.1f}/s)", file=sys.stderr, flush=True)

    if workers == 1 or count < 2:
        _tune_allocator()
        for job in jobs:
            rows.append(_write_one(job))
            report(len(rows))
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for row in pool.imap(_write_one, jobs, chunksize=4):
                rows.append(row)
                report(len(rows))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    meta = {"generator": "pipeline.altsim", "version": VERSION, "seed": int(seed), "count": int(count),
            "args": {"fracture_rate": float(fracture_rate), "workers": int(workers), "long_side": long_side}}
    (root / "altsim.json").write_text(json.dumps(meta, indent=2) + "\n")
    return labels
