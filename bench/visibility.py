#!/usr/bin/env python3
"""How visible is each generated fracture at all? A matched filter that knows the fracture and where it is.

For each drawn radiograph the generator is run three ways on the same seed (``pipeline.synth.render``):

* as written to a data set (the fracture in place);
* its **intact twin**: the same anatomy, acquisition, noise and confounders, with the fractured bone left whole
  (the fracture is built, so every random stream is consumed as before, and then undone: the bone's fragments
  and any dislocation are dropped before projection);
* the intact twin again under ``--noise-draws`` other realisations of the detector noise (the same draws of
  every other parameter).

The fracture's signal ``s`` is the fractured image minus its twin (the displayed image, bone bright, in [0, 1]),
kept within ``--margin`` px of the fracture's mask. A non-prewhitening matched filter ``t = sum(s * x)`` at the
known place then separates fractured from intact by ``d' = sum(s^2) / std_k(sum(s * twin_k))``: the noise's own
spread, measured through the generator's whole acquisition chain (blur, log, unsharp mask, tone curve). Its
per-image AUC is ``Phi(d' / sqrt 2)``.

This observer is told what the fracture looks like and where it is, and the background is identical in both
images: a detector that must search the whole image among look-alikes and tell an unknown fracture from
anatomy does worse. So the mean of ``Phi(d' / sqrt 2)`` over a kind of fracture is an estimate of the best AUC
any detector could reach on that kind against intact images *if the noise were the only obstacle* (not a strict
bound: the noise is correlated and a prewhitening filter could do somewhat better than this one; the
background, which the filter here is given, is the larger obstacle in practice).

    .venv/bin/python bench/visibility.py --per-type 30 --extra hairline=30 --extra avulsion=30 \\
        --json bench/results/session26/visibility.json --sheet bench/results/session26/visibility-hairline.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.synth import render  # noqa: E402
from pipeline.synth.dataset import item_seed  # noqa: E402
from pipeline.taxonomy import FRACTURE_TYPES  # noqa: E402


@contextlib.contextmanager
def intact_twin() -> Iterator[None]:
    """Within the block, :func:`render.render_sample` builds the fracture (consuming its random streams as
    always) and then leaves the bone whole and undislocated."""
    original = render.build_fracture

    def build_then_undo(kind, scene, rng):  # type: ignore[no-untyped-def]
        info = original(kind, scene, rng)
        if info is not None:
            for bone in scene.bones:
                if bone.name == info.bone:
                    bone.fragments = None
            info.dislocation = None
        return info

    render.build_fracture = build_then_undo
    try:
        yield
    finally:
        render.build_fracture = original


@contextlib.contextmanager
def other_noise(draw: int) -> Iterator[None]:
    """Within the block the detector noise is another realisation (seeded by ``draw``), every random number
    the generator consumes staying the same."""
    original = render.cached_noise

    def noise(rng, shape):  # type: ignore[no-untyped-def]
        original(rng, shape)  # consume what it consumes
        return render.fast_noise(np.random.default_rng([0xD0A5E, draw]), shape)

    render.cached_noise = noise
    try:
        yield
    finally:
        render.cached_noise = original


def measure(job: tuple[int, str, int, int, int]) -> dict:
    seed, kind, long_side, draws, margin = job
    frac = render.render_sample(seed, fracture_type=kind, long_side=long_side)
    with intact_twin():
        twin = render.render_sample(seed, fracture_type=kind, long_side=long_side)
        others = []
        for k in range(draws):
            with other_noise(k):
                others.append(render.display_image(render.render_sample(seed, fracture_type=kind,
                                                                        long_side=long_side)))
    a, b = render.display_image(frac), render.display_image(twin)
    region = cv2.dilate((frac.mask > 0).astype(np.uint8),
                        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))) > 0
    s = np.where(region, a - b, 0).astype(np.float64)
    energy = float((s * s).sum())
    t = np.array([float((s * o).sum()) for o in others])
    spread = float(t.std(ddof=1)) if draws > 1 else float("nan")
    d = energy / spread if spread > 0 else (float("inf") if energy > 0 else 0.0)
    return {"seed": seed, "type": kind, "region": frac.region, "d_prime": d, "signal_energy": energy,
            "peak_signal": float(np.abs(s).max()), "noise_sd_at_fracture": float(np.std(
                np.stack(others)[:, region], axis=0).mean()) if region.any() else None,
            "params": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in frac.params.items()},
            "box": list(frac.box) if frac.box else None}


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def summarise(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for kind in FRACTURE_TYPES:
        ds = np.array([r["d_prime"] for r in rows if r["type"] == kind])
        if not len(ds):
            continue
        out[kind] = {"images": int(len(ds)), "median_d_prime": round(float(np.median(ds)), 2),
                     "share_d_below_1": round(float(np.mean(ds < 1)), 3),
                     "share_d_below_2": round(float(np.mean(ds < 2)), 3),
                     "share_d_below_3": round(float(np.mean(ds < 3)), 3),
                     "known_location_auc": round(float(np.mean([phi(d / math.sqrt(2)) for d in ds])), 4)}
    kinds = list(out)
    # the generator draws the eleven kinds equally often: the whole set's figure is the kinds' mean
    whole = float(np.mean([out[k]["known_location_auc"] for k in kinds])) if kinds else float("nan")
    return {"by_type": out, "known_location_auc_all_kinds_equal": round(whole, 4)}


def sheet(rows: list[dict], kind: str, long_side: int, path: Path, n: int = 8) -> None:
    """Crops of ``kind`` fractures at evenly spaced d' (lowest first): the fractured image over its twin."""
    chosen = sorted((r for r in rows if r["type"] == kind and r["box"]), key=lambda r: r["d_prime"])
    if not chosen:
        return
    picks = [chosen[round(i * (len(chosen) - 1) / max(n - 1, 1))] for i in range(min(n, len(chosen)))]
    tiles = []
    for r in picks:
        frac = render.display_image(render.render_sample(r["seed"], fracture_type=kind, long_side=long_side))
        with intact_twin():
            twin = render.display_image(render.render_sample(r["seed"], fracture_type=kind, long_side=long_side))
        x0, y0, x1, y1 = r["box"]
        cx, cy, half = (x0 + x1) // 2, (y0 + y1) // 2, 64
        h, w = frac.shape
        top, left = min(max(cy - half, 0), h - 2 * half), min(max(cx - half, 0), w - 2 * half)
        pair = [np.clip(im[top:top + 2 * half, left:left + 2 * half] * 255, 0, 255).astype(np.uint8)
                for im in (frac, twin)]
        tile = cv2.resize(np.vstack(pair), (256, 512), interpolation=cv2.INTER_NEAREST)
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
        cv2.putText(tile, f"d'={r['d_prime']:.1f}", (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 255), 2)
        cv2.putText(tile, "intact twin", (6, 278), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 1)
        tiles.append(tile)
    cv2.imwrite(str(path), np.hstack(tiles))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-type", type=int, default=20, help="radiographs drawn per kind of fracture")
    ap.add_argument("--extra", action="append", default=[], metavar="TYPE=N", help="more of one kind")
    ap.add_argument("--seed", type=int, default=7777, help="data set seed the images' seeds come from")
    ap.add_argument("--long-side", type=int, default=1024)
    ap.add_argument("--noise-draws", type=int, default=8)
    ap.add_argument("--margin", type=int, default=6, help="px around the fracture's mask where the signal counts")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--sheet", type=Path, default=None, help="a PNG of hairline crops at rising d'")
    args = ap.parse_args()
    counts = dict.fromkeys(FRACTURE_TYPES, args.per_type)
    for item in args.extra:
        name, _, n = item.partition("=")
        counts[name] += int(n)
    jobs, index = [], 0
    for kind in FRACTURE_TYPES:
        for _ in range(counts[kind]):
            jobs.append((item_seed(args.seed, index), kind, args.long_side, args.noise_draws, args.margin))
            index += 1
    t0 = time.time()
    with mp.get_context("fork").Pool(args.workers) as pool:
        rows = []
        for k, row in enumerate(pool.imap_unordered(measure, jobs, chunksize=2), 1):
            rows.append(row)
            if k % 25 == 0:
                print(f"{k}/{len(jobs)} images, {time.time() - t0:.0f} s", file=sys.stderr)
    rows.sort(key=lambda r: (FRACTURE_TYPES.index(r["type"]), r["seed"]))
    report = {"command": " ".join(sys.argv), "seed": args.seed, "long_side": args.long_side,
              "noise_draws": args.noise_draws, "margin_px": args.margin, "elapsed_s": round(time.time() - t0, 1),
              **summarise(rows), "images": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    for kind, v in report["by_type"].items():
        print(f"{kind:22s} n={v['images']:3d} median d'={v['median_d_prime']:6.2f}  d'<2 {v['share_d_below_2']:.2f}"
              f"  d'<3 {v['share_d_below_3']:.2f}  known-location AUC {v['known_location_auc']:.4f}")
    print(f"all kinds, equal shares: known-location AUC {report['known_location_auc_all_kinds_equal']:.4f}")
    if args.sheet is not None:
        sheet(rows, "hairline", args.long_side, args.sheet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
