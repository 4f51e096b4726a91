"""Training loops for the multi-head fracture network and the radiograph check.

Reproducible: every random choice comes from a generator seeded by ``(seed, epoch, index)``, batches come
from a seeded permutation per epoch, and a checkpoint (model, optimiser, position) is written every
``checkpoint_every`` steps and at each epoch end, so ``resume=True`` continues exactly where it stopped.
A time budget (``max_minutes``) stops early but always finishes with calibration and a bundle.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.evaluation.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    roc_auc,
    sens_spec,
)
from pipeline.models.bundle import load_bundle, make_card, save_bundle
from pipeline.models.imageio import image_size, read_gray
from pipeline.models.nets import SEG_STRIDE, FractureNet, ValidityNet, count_parameters
from pipeline.models.preprocess import STRIDE, letterbox, prepare_fracture_input, resize_long_side
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.augment import (
    CLOSER_FIELD,
    WIDE_ROTATION,
    acquisition_params,
    apply_local,
    apply_pointwise,
    closer_field,
    closer_field_factor,
    crop_padded,
    mask_box,
    pick_crop,
    random_acquisition,
    random_geometry,
    random_processing,
    wider_field,
    wider_field_factor,
)
from pipeline.training.calibration import fit_platt, fit_temperature, operating_point, sigmoid
from pipeline.training.datasets import Record
from pipeline.training.device import describe_device, model_device, prepare, to_device
from pipeline.training.peaks import detector_peaks, file_key, inside_box, read_peak_cache, write_peak_cache
from pipeline.training.widen import fracture_net_width, widen_fracture_state

ProgressFn = Callable[[dict[str, Any]], None]
SCHEDULE_PROBE_STEPS = 60
PROBE_START = 10


@dataclass
class TrainConfig:
    task: str = "fracture"  # fracture (detect + classify), detect, classify, validity
    epochs: int = 10
    seed: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    long_side: int = 512
    crop: int = 320
    patch: int = 192  # type reader: side of the patch it reads (px at long_side scale)
    width: int = 16
    validity_size: int = 160
    max_minutes: float | None = None
    max_steps: int | None = None
    checkpoint_every: int = 100
    val_limit: int = 400
    num_workers: int = 1
    cache_mb: int = 3500
    bank_per_image: int = 3  # crops drawn per image and round (0: draw every crop on the fly)
    bank_epochs: int = 2  # epochs served by one round of drawn crops
    head_images: int = 0  # after crop training, refit the detection/type heads on this many whole images
    augment: float = 1.0
    processing: float = 0.0  # validity and fracture tasks: strength of random_processing (post-processing)
    zoom_out: float = 0.0  # validity and fracture tasks: share of images placed in a wider field (air margin)
    zoom_in: float = 0.0  # validity and fracture tasks: share of images cut to a closer field (larger bone)
    rotate: float = 0.0  # validity and fracture tasks: share of images rotated up to 45 degrees (else 15)
    noise_max: float = 0.03  # largest quantum-noise sigma of the acquisition augmentation (at full brightness)
    type_loss_weight: float = 1.0  # fracture task: weight of the shared network's type loss
    site_share: float = 0.0  # classify task: share of patches centred on the detector's peaks off the fracture
    # fracture type -> times each fractured image of it is drawn (classify: patches an epoch; fracture: crops a round)
    type_boost: dict[str, int] = field(default_factory=dict)
    weights_dtype: str = "float16"
    device: str = "cpu"  # where the optimisation loop runs: cpu, cuda or cuda:N (see pipeline.training.device)
    data_description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def keyed_rng(*keys: int) -> np.random.Generator:
    """A generator that is a pure function of its integer keys (seed, epoch, image, purpose), so that forked
    workers and resumed runs draw exactly what one uninterrupted process would."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


# --------------------------------------------------------------------------------------------- datasets


class _Cache:
    """Bounded in-process cache of decoded, resized training images (uint16) and masks (uint8)."""

    def __init__(self, limit_mb: int) -> None:
        self.limit = limit_mb * 1024 * 1024
        self.used = 0
        self.items: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        return self.items.get(i)

    def put(self, i: int, img: np.ndarray, mask: np.ndarray | None) -> None:
        size = img.nbytes + (mask.nbytes if mask is not None else 0)
        if self.used + size <= self.limit:
            self.items[i] = (img, mask)
            self.used += size


def _bone_point(small: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random (y, x) among the brightest quarter of a (subsampled) bone-bright image."""
    thr = float(np.percentile(small, 75))
    ys, xs = np.nonzero(small >= thr)
    if len(ys) == 0:
        return small.shape[0] // 2, small.shape[1] // 2
    k = int(rng.integers(0, len(ys)))
    return int(ys[k]), int(xs[k])


def _focus_box(img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
               ) -> tuple[int, int, int, int]:
    """What a closer field must hold: the fracture's box, or for an intact image a random point on bone."""
    box = mask_box(mask) if mask is not None else None
    if box is not None:
        return box
    sy, sx = _bone_point(img[::8, ::8], rng)
    return sx * 8, sy * 8, sx * 8 + 1, sy * 8 + 1


def _rotation_range(cfg: TrainConfig, rng: np.random.Generator, usual: float = 15.0) -> float:
    """The rotation range for one image: ``WIDE_ROTATION`` for a share ``cfg.rotate`` of images (drawn only when
    that share is set, so runs without it draw exactly as before), else ``usual``."""
    return WIDE_ROTATION if cfg.rotate and rng.random() < cfg.rotate else usual


GeometricStep = Callable[[np.ndarray, np.ndarray | None, np.random.Generator], tuple[np.ndarray, np.ndarray | None]]


def _with_sites(step: GeometricStep, img: np.ndarray, mask: np.ndarray | None, smap: np.ndarray | None,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One geometric ``step`` of the image and its mask, and the same step on the site map ``smap`` (if any),
    drawn from a copy of ``rng`` taken before the image's draw: the same draws, and the image's stream unchanged."""
    twin = copy.deepcopy(rng) if smap is not None else None
    img, mask = step(img, mask, rng)
    if smap is not None and twin is not None:
        smap = step(smap, None, twin)[0]
    return img, mask, smap


def boost_draws(boost: dict[str, int], rec: Record) -> int:
    """How many times ``rec`` is drawn where one draw is the rule (``train --type-boost``, both the type reader's
    patches and the detector's crops): its type's factor for a fractured image, 1 otherwise. The boost is checked
    once beforehand (:func:`check_type_boost`)."""
    return int(boost.get(rec.type or "", 1)) if rec.fracture else 1


def check_type_boost(boost: dict[str, int]) -> None:
    """Raise ``ValueError`` naming what is wrong with a type boost: a type the taxonomy lacks, a factor that is not
    a whole number of 1 or more."""
    unknown = sorted(set(boost) - set(FRACTURE_TYPES))
    if unknown:
        raise ValueError(f"unknown fracture type(s) {', '.join(unknown)}; the taxonomy's are "
                         f"{', '.join(FRACTURE_TYPES)}")
    bad = {k: v for k, v in boost.items() if int(v) != v or v < 1}
    if bad:
        raise ValueError(f"a type boost is a whole number of draws per image, 1 or more (got {bad})")


SITE_PEAKS = 2  # fracture task with site_share > 0: the detector's peaks away from the fracture kept per image
PEAK_CACHE = "crop_site_peaks.json"  # in the checkpoint folder (train_fracture)


class FractureCrops(Dataset[dict[str, Any]]):
    """Augmented square crops with detection label, type label and a 1/16 segmentation target.

    With ``cfg.site_share`` > 0 and :meth:`find_sites` called, that share of the crops that are not centred on
    the fracture is centred instead on one of the detector's own strongest segmentation peaks away from the
    fracture (:data:`SITE_PEAKS` per image, fractured and intact images alike): the look-alikes that the
    detector's call and its heatmap pick up, its hardest negatives. The labels there are the usual ones (the
    segmentation target is the fracture mask as it falls in the crop, usually empty)."""

    def __init__(self, records: list[Record], cfg: TrainConfig) -> None:
        self.records = records
        self.cfg = cfg
        # A closer field magnifies a window of the image: keep the decoded image's detail for it (no resize).
        self.cache_long = int(round(cfg.long_side * 1.2 * (CLOSER_FIELD[1] if cfg.zoom_in else 1.0)))
        self.cache = _Cache(cfg.cache_mb)
        self.has_masks = any(r.mask is not None for r in records)
        self.sites: dict[int, list[tuple[float, float]]] = {}  # image -> peaks as fractions of (width, height)
        self.peaks_reused = 0

    def find_sites(self, detector: Path, cache: Path | None, workers: int, show: bool) -> dict[str, Any]:
        """Run ``detector`` once over every training image (or read its peaks from ``cache``) and keep up to
        :data:`SITE_PEAKS` of its strongest segmentation peaks outside the fracture's box per image; peaks at
        least half a crop apart. Returns what the card records."""
        bundle = load_bundle(detector, expected_task="detect", runtime="numpy")
        header = {"detector_sha256": bundle.identity.sha256, "long_side": self.cfg.long_side,
                  "crop": self.cfg.crop, "peaks": SITE_PEAKS + 1}
        known = read_peak_cache(cache, header) if cache is not None else {}
        self.peaks_reused = sum(file_key(r.path) in known for r in self.records)

        def peaks_of(i: int) -> tuple[str, list[list[float]], tuple[int, int]]:
            rec = self.records[i]
            key = file_key(rec.path)
            found = known.get(key)
            if found is not None:  # only the size is needed: from the file's header, no decoding
                return key, found, image_size(rec.path)
            img = read_gray(rec.path)
            spacing = self.cfg.crop / 2 * max(img.shape) / self.cfg.long_side
            return key, detector_peaks(bundle, img, SITE_PEAKS + 1, spacing), (img.shape[1], img.shape[0])

        got = list(fork_map(peaks_of, list(range(len(self.records))), max(1, workers), "crop sites: peaks", show,
                            chunksize=8))
        self.sites = {}
        for i, (_key, found, (w, h)) in enumerate(got):
            rec = self.records[i]
            off = [(px / w, py / h) for px, py in found
                   if not (rec.fracture and (rec.box is None or inside_box(rec, (px, py))))][:SITE_PEAKS]
            if off:
                self.sites[i] = off
        if cache is not None:
            write_peak_cache(cache, header, {key: found for key, found, _size in got})
        return {"share": self.cfg.site_share, "peaks_per_image": SITE_PEAKS,
                "images_with_sites": len(self.sites), "sites": sum(len(v) for v in self.sites.values()),
                "detector_sha256": bundle.identity.sha256, "peaks_from_cache": self.peaks_reused,
                "rule": "a share of the crops not centred on the fracture is centred on one of the detector's "
                        "strongest segmentation peaks outside the fracture's box (at least half a crop apart, "
                        "found once at inference geometry), the peak inside the crop's central half"}

    def _site_map(self, i: int, shape: tuple[int, int]) -> np.ndarray | None:
        """The image's sites as small discs (uint8) at the decoded image's size, to follow its augmentation."""
        peaks = self.sites.get(i) if self.cfg.site_share else None
        if not peaks:
            return None
        h, w = shape
        smap = np.zeros((h, w), np.uint8)
        radius = max(2, int(round(0.01 * max(h, w))))
        for fx, fy in peaks:
            cv2.circle(smap, (int(fx * w), int(fy * h)), radius, 255, -1)
        return smap

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        hit = self.cache.get(i)
        if hit is not None:
            return hit
        rec = self.records[i]
        img = read_gray(rec.path)
        h, w = img.shape
        img = resize_long_side(img, self.cache_long) if max(h, w) > self.cache_long else img
        img16 = (np.clip(img, 0, 1) * 65535 + 0.5).astype(np.uint16)
        mask = None
        if rec.mask is not None:
            m = cv2.imread(str(rec.mask), cv2.IMREAD_GRAYSCALE)
            if m is not None:
                mask = cv2.resize(m, (img16.shape[1], img16.shape[0]), interpolation=cv2.INTER_AREA)
                mask = (mask > 0).astype(np.uint8) * 255
        self.cache.put(i, img16, mask)
        return img16, mask

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        return self.sample(i, keyed_rng(self.cfg.seed, epoch, i, 7))

    def sample(self, i: int, rng: np.random.Generator,
               loaded: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, Any]:
        """One augmented crop of image ``i`` (``loaded``: its decoded image and mask, to draw several)."""
        cfg = self.cfg
        rec = self.records[i]
        img16, mask0 = loaded if loaded is not None else self._load(i)
        img: np.ndarray = img16.astype(np.float32) / 65535.0
        mask: np.ndarray | None = mask0
        # The detector's peaks (site_share > 0) follow every geometric step of the image: each step is repeated
        # on their map with a copy of the generator, so the main stream draws exactly what it draws without them.
        smap = self._site_map(i, img.shape)
        closer = bool(cfg.zoom_in) and rng.random() < cfg.zoom_in
        if closer:
            # A closer field of view: a window holding the fracture (or, for an intact image, some bone) becomes
            # the whole image, so at the network's scale the bone is larger and the statistics are the window's.
            # Rotated first, so that the window rarely reaches the corners the rotation leaves empty.
            if cfg.augment:
                rotation = _rotation_range(cfg, rng)
                img, mask, smap = _with_sites(
                    lambda a, m, r: random_geometry(a, m, r, max_rotation=rotation), img, mask, smap, rng)
            factor = closer_field_factor(rng)
            focus_box = _focus_box(img, mask, rng)
            img, mask, smap = _with_sites(lambda a, m, r: closer_field(a, m, factor, r, focus_box), img, mask, smap,
                                          rng)
        h, w = img.shape
        crop = cfg.crop if self.has_masks else cfg.long_side
        scale = cfg.long_side / max(h, w) * (float(np.exp(rng.uniform(np.log(0.8), np.log(1.2))))
                                             if cfg.augment else 1.0)
        # A wider field of view: the image shrinks by the canvas factor and sits in an air margin, so that at
        # the network's scale the bone is smaller and the whole image's statistics include the margin.
        field = wider_field_factor(rng) if not closer and cfg.zoom_out and rng.random() < cfg.zoom_out else 1.0
        scale /= field
        nh, nw = max(8, round(h * scale)), max(8, round(w * scale))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if mask is not None:
            mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_AREA)
            mask = (mask > 0).astype(np.uint8)
        if smap is not None:
            smap = cv2.resize(smap, (nw, nh), interpolation=cv2.INTER_AREA)
        if field > 1.0:
            img, mask, (top, left) = wider_field(img, mask, field, rng)
            if smap is not None:
                placed = np.zeros(img.shape, np.uint8)
                placed[top:top + smap.shape[0], left:left + smap.shape[1]] = smap
                smap = placed
        if cfg.augment and not closer:
            rotation = _rotation_range(cfg, rng)
            img, mask, smap = _with_sites(lambda a, m, r: random_geometry(a, m, r, max_rotation=rotation), img,
                                          mask, smap, rng)
        if cfg.processing:  # a vendor's post-processing of the whole image, before the statistics are taken
            img = random_processing(img, rng, cfg.processing)
        # Intensity: the point-wise transform is drawn once for the image; the statistics used for the
        # per-image standardisation come from a subsampled copy of the whole transformed image (as at
        # inference), while the costly local operations only touch the crop.
        small = img[::4, ::4]
        params = acquisition_params(rng, cfg.augment, small) if cfg.augment else None
        if params is not None:
            small = apply_pointwise(small, params)
        mean, std = float(small.mean()), max(float(small.std()), 1e-3)
        frac_total = int(mask.sum()) if mask is not None else 0
        focus = None
        if mask is not None and frac_total > 0 and rng.random() < 0.7:
            focus = mask_box(mask)
        if focus is None and smap is not None and rng.random() < cfg.site_share:
            # One of the detector's own peaks away from the fracture, inside the crop's central half.
            ys, xs = np.nonzero(smap)
            if len(ys):
                k = int(rng.integers(0, len(ys)))
                focus = (int(xs[k]) - crop // 4, int(ys[k]) - crop // 4, int(xs[k]) + crop // 4,
                         int(ys[k]) + crop // 4)
        if focus is None and rng.random() < 0.85:
            # Centre the crop on bone for normals too, so "bone in view" is no shortcut for "fracture".
            sy, sx = _bone_point(small, rng)
            cy, cx = sy * 4 + int(rng.integers(-crop // 4, crop // 4 + 1)), sx * 4 + int(
                rng.integers(-crop // 4, crop // 4 + 1))
            focus = (cx, cy, cx + 1, cy + 1)
        top, left = pick_crop(img.shape[0], img.shape[1], crop, rng, focus)
        patch = crop_padded(img, top, left, crop, -1.0)
        outside = patch < 0
        if params is not None:
            patch = apply_local(apply_pointwise(patch, params), rng, cfg.augment, cfg.noise_max)
        patch[outside] = 0.0
        x = (patch - mean) / std
        det_w = 1.0
        seg_w = 0.0
        seg = np.zeros((crop // SEG_STRIDE, crop // SEG_STRIDE), dtype=np.float32)
        if rec.fracture is None:
            det_label, det_w = 0.0, 0.0
        elif not rec.fracture:
            det_label = 0.0
            seg_w = 1.0 if self.has_masks else 0.0
        elif mask is not None and frac_total > 0:
            mcrop = crop_padded(mask, top, left, crop, 0)
            inside = int(mcrop.sum()) / frac_total
            det_label = 1.0 if inside >= 0.5 else 0.0
            det_w = 0.0 if 0.0 < inside < 0.5 else 1.0
            n = crop // SEG_STRIDE
            seg = mcrop.reshape(n, SEG_STRIDE, n, SEG_STRIDE).max(axis=(1, 3)).astype(np.float32)
            seg_w = 1.0
        else:
            det_label = 1.0
        type_idx = FRACTURE_TYPES.index(rec.type) if (rec.type and det_label == 1.0 and det_w > 0) else -1
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None],
            "det": torch.tensor(det_label), "det_w": torch.tensor(det_w),
            "seg": torch.from_numpy(seg)[None], "seg_w": torch.tensor(seg_w),
            "type": torch.tensor(type_idx),
        }


_FORKED: Callable[[Any], Any] | None = None


def _call_forked(job: Any) -> Any:
    assert _FORKED is not None
    return _FORKED(job)


def fork_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int, desc: str, show: bool,
             chunksize: int = 4) -> Iterator[Any]:
    """``fn(job)`` for each job, in order, in ``workers`` forked processes (in this one when ``workers <= 1``).

    ``fn`` may be a bound method of an object holding large data: forked workers inherit it through a module
    global instead of receiving a pickled copy with every chunk of jobs."""
    global _FORKED
    bar = tqdm(total=len(jobs), desc=desc, disable=not show, leave=False)
    _FORKED = fn
    try:
        if workers > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(workers) as pool:
                for got in pool.imap(_call_forked, jobs, chunksize=chunksize):
                    bar.update(1)
                    yield got
        else:
            for job in jobs:
                bar.update(1)
                yield fn(job)
    finally:
        _FORKED = None
        bar.close()


def _bank_item(source: FractureCrops, rnd: int, counts: list[int], i: int) -> list[dict[str, Any]]:
    """Worker side of :class:`CropBank`: decode image ``i`` once and draw ``counts[i]`` crops from it."""
    loaded = source._load(i)
    # numpy, not tensors: tensors would travel between processes as shared-memory file descriptors, one per
    # tensor, and thousands of them exhaust the descriptor table. The image is kept as float16 (as the bank
    # stores it) from here on: half the bytes through the pipe and in flight.
    return [{k: v.numpy().astype(np.float16) if k == "x" else v.numpy()
             for k, v in source.sample(i, keyed_rng(source.cfg.seed, rnd, i, j, 17), loaded).items()}
            for j in range(counts[i])]


class CropBank(Dataset[dict[str, Any]]):
    """Augmented crops drawn in bulk ("rounds") and replayed for a few epochs with cheap dihedral flips.

    Drawing a crop means decoding a large image, resizing and rotating it: done per sample, on two cores,
    that starves the network. A round decodes each image once, draws ``per_image`` crops from it (each with
    its own scale, rotation, acquisition and crop position) in ``workers`` processes, and keeps them in
    memory as float16; round ``r`` serves epochs ``r * epochs_per_round ...`` and is a pure function of
    ``(seed, r)``, so resuming rebuilds exactly the same crops.

    With a type boost (``cfg.type_boost``, ``train --type-boost``), each fractured image of a boosted type gives
    that many times ``per_image`` crops a round, all drawn afresh; the first ``per_image`` are the crops it would
    give without the boost.
    """

    def __init__(self, source: FractureCrops, per_image: int, epochs_per_round: int, workers: int,
                 show: bool = False) -> None:
        self.source, self.per_image = source, per_image
        check_type_boost(source.cfg.type_boost)
        self.counts = [per_image * boost_draws(source.cfg.type_boost, r) for r in source.records]
        self.epochs_per_round, self.workers, self.show = max(1, epochs_per_round), max(1, workers), show
        self.round = -1
        self.build_seconds = 0.0  # the last round's drawing time
        self.drawing_seconds = 0.0  # all rounds drawn by this process
        self.items: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return sum(self.counts)

    def overhead_per_step(self, steps_per_epoch: int) -> float:
        """Seconds of crop drawing per optimiser step, averaged over a round (for the time budget)."""
        return self.build_seconds / max(1, steps_per_epoch * self.epochs_per_round)

    def build(self, rnd: int) -> None:
        """Draw round ``rnd``. Peak memory is about one round's crops: the previous round is dropped first and
        each crop goes straight into arrays allocated once (stacking a list of float32 crops, as before, held
        the round three times over, and with 6 600 images at 3 crops the kernel killed the trainer)."""
        t0 = time.time()
        self.items, self.round = {}, -1
        draw = functools.partial(_bank_item, self.source, rnd, self.counts)
        total = len(self)
        items: dict[str, np.ndarray] = {}
        k = 0
        for got in fork_map(draw, list(range(len(self.source))), self.workers, f"crops (round {rnd})", self.show):
            for sample in got:
                if not items:
                    items = {name: np.empty((total, *v.shape), dtype=v.dtype) for name, v in sample.items()}
                for name, v in sample.items():
                    items[name][k] = v
                k += 1
        self.items = items
        self.round = rnd
        self.build_seconds = time.time() - t0
        self.drawing_seconds += self.build_seconds

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, j = key
        rnd = epoch // self.epochs_per_round
        if rnd != self.round:
            self.build(rnd)
        rng = keyed_rng(self.source.cfg.seed, epoch, j, 13)
        x = self.items["x"][j].astype(np.float32)
        seg = self.items["seg"][j]
        if rng.random() < 0.5:
            x, seg = x[..., ::-1], seg[..., ::-1]
        if rng.random() < 0.5:
            x, seg = x[..., ::-1, :], seg[..., ::-1, :]
        if rng.random() < 0.5:
            x, seg = x.swapaxes(-1, -2), seg.swapaxes(-1, -2)
        out = {k: torch.as_tensor(v[j]) for k, v in self.items.items() if k not in ("x", "seg")}
        out["x"] = torch.from_numpy(np.ascontiguousarray(x))
        out["seg"] = torch.from_numpy(np.ascontiguousarray(seg))
        return out


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) over several epochs from a seeded permutation per epoch, starting at a
    given (epoch, batch) so that resuming replays nothing and skips nothing."""

    def __init__(self, n: int, batch: int, seed: int, start_epoch: int, start_batch: int, epochs: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.start_epoch, self.start_batch, self.epochs = start_epoch, start_batch, epochs

    def batches_per_epoch(self) -> int:
        return self.n // self.batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.start_epoch, self.epochs):
            perm = keyed_rng(self.seed, epoch, 1).permutation(self.n)
            first = self.start_batch if epoch == self.start_epoch else 0
            for b in range(first, self.batches_per_epoch()):
                yield [(epoch, int(i)) for i in perm[b * self.batch:(b + 1) * self.batch]]

    def __len__(self) -> int:
        return max(0, (self.epochs - self.start_epoch) * self.batches_per_epoch() - self.start_batch)


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# --------------------------------------------------------------------------------------------- losses


def fracture_loss(out: Any, batch: dict[str, torch.Tensor],
                  type_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Detection + segmentation + ``type_weight`` x type loss; the parts are reported unweighted."""
    det_w = batch["det_w"]
    det = F.binary_cross_entropy_with_logits(out.detect, batch["det"], reduction="none")
    det_loss = (det * det_w).sum() / det_w.sum().clamp(min=1.0)
    seg_w = batch["seg_w"]
    seg_loss = det_loss.new_zeros(())
    if float(seg_w.sum()) > 0:
        target = batch["seg"]
        logits = out.seg
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        sel = seg_w > 0
        seg_loss = F.binary_cross_entropy_with_logits(logits[sel], target[sel],
                                                      pos_weight=logits.new_tensor(4.0))
    tsel = batch["type"] >= 0
    type_loss = det_loss.new_zeros(())
    if bool(tsel.any()):
        type_loss = F.cross_entropy(out.types[tsel], batch["type"][tsel], label_smoothing=0.05)
    total = det_loss + seg_loss + type_weight * type_loss
    parts = {"loss": total, "det": det_loss, "seg": seg_loss, "type": type_loss}
    return total, {k: float(v.detach()) for k, v in parts.items()}


# --------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict_fracture(model: FractureNet, records: list[Record], long_side: int,
                     show: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Detection logits (N,) and type logits (N, 11) on whole images, as at inference."""
    model.eval()
    device = model_device(model)
    det, types = [], []
    for rec in tqdm(records, desc="validate", leave=False, disable=not show):
        x, _g = prepare_fracture_input(read_gray(rec.path), long_side)
        out = model(x.to(device))
        det.append(float(out.detect[0]))
        types.append(out.types[0].cpu().numpy())
    return np.array(det), (np.stack(types) if types else np.zeros((0, len(FRACTURE_TYPES))))


def fracture_metrics(det_logits: np.ndarray, type_logits: np.ndarray, records: list[Record],
                     det_t: float = 1.0, threshold: float = 0.5) -> dict[str, float]:
    labels = np.array([bool(r.fracture) for r in records])
    probs = sigmoid(det_logits / det_t)
    sens, spec = sens_spec(probs, labels, threshold)
    metrics = {"auc": roc_auc(det_logits, labels), "sensitivity": sens, "specificity": spec,
               "ece": expected_calibration_error(probs, labels)}
    typed = [i for i, r in enumerate(records) if r.fracture and r.type]
    if typed:
        true = np.array([FRACTURE_TYPES.index(records[i].type or "") for i in typed])
        pred = type_logits[typed].argmax(axis=1)
        cm = confusion_matrix(true, pred, len(FRACTURE_TYPES))
        metrics.update({"type_accuracy": accuracy(cm), "type_macro_f1": macro_f1(cm)})
    return metrics


# --------------------------------------------------------------------------------------------- loop


def _lr_at(step: int, total: int, base: float) -> float:
    warmup = max(1, min(100, total // 10))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def steps_that_fit(step: int, elapsed_s: float, seconds_per_step: float, budget_s: float) -> int:
    """The step count the cosine schedule should end at so that it ends within 95 % of ``budget_s``."""
    remaining = budget_s * 0.95 - elapsed_s
    return step + int(max(0.0, remaining) / max(seconds_per_step, 1e-9))


def replanned_total(total: int, cap: int, step: int, elapsed_s: float, seconds_per_step: float,
                    budget_s: float) -> int | None:
    """A longer schedule when the first speed probe was too pessimistic, else None.

    The probe times 50 steps once; if another process held the CPU then, the plan is short and the run ends
    well inside its budget (session 16's run 16 planned 2 931 steps and ended in 37 of 50 minutes). At each
    epoch end the speed since the plan is measured as the probe measures it (optimiser steps and validation,
    with crop drawing spread evenly over the steps); while the schedule is less than half done, and the budget
    fits at least 10 % more steps, the schedule is stretched (never shortened: the time budget stops a slow
    run) up to ``cap`` (epochs or ``--max-steps``). Stretching in the first half keeps the learning-rate change
    small."""
    if seconds_per_step <= 0 or step * 2 >= total or total >= cap:
        return None
    fits = min(cap, steps_that_fit(step, elapsed_s, seconds_per_step, budget_s))
    return fits if fits > total * 1.1 else None


def _drawing_per_step(dataset: object, per_epoch: int) -> float:
    """Crop drawing spread evenly over the optimiser steps (0 for datasets that draw per sample)."""
    overhead = getattr(dataset, "overhead_per_step", None)
    return float(overhead(per_epoch)) if callable(overhead) else 0.0


def _drawing_seconds(dataset: object) -> float:
    """Seconds this process has spent drawing crop rounds (0 for datasets that draw per sample)."""
    return float(getattr(dataset, "drawing_seconds", 0.0))


def _save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, tmp)
    tmp.replace(path)


def _log(log_path: Path, entry: dict[str, Any]) -> None:
    with open(log_path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def run_training_loop(model: torch.nn.Module, dataset: Dataset[Any], n: int, cfg: TrainConfig, ckpt_dir: Path,
                      loss_fn: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
                      validate: Callable[[], dict[str, float]], resume: bool, show: bool,
                      loader_workers: int | None = None) -> dict[str, Any]:
    """Shared optimisation loop: checkpoints, resume, time budget, per-epoch validation.

    Runs on ``cfg.device`` (``validate`` is called with the model there) and leaves the model on the CPU."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "checkpoint.pt"
    log_path = ckpt_dir / "train_log.jsonl"
    device = torch.device(cfg.device)
    prepare(device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": [], "elapsed_s": 0.0}
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])  # its state follows the parameters onto this run's device
        state = saved["state"]
        if show:
            print(f"resuming from {ckpt} at epoch {state['epoch']} batch {state['batch']} (step {state['step']})")
    per_epoch = n // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"only {n} training images: fewer than one batch of {cfg.batch_size}")
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:  # 0: no optimiser step (a reader re-carded and calibrated as it starts)
        total = min(total, cfg.max_steps)
    cap = total
    # where the speed is measured from for a re-plan: the probe, or on resume the point resumed from
    plan_mark: tuple[int, float, float] | None = None
    if state.get("total"):
        total = int(state["total"])
        plan_mark = (state["step"], float(state["elapsed_s"]), 0.0)
    sampler = EpochBatches(n, cfg.batch_size, cfg.seed, state["epoch"], state["batch"], cfg.epochs)
    loader: DataLoader[Any] = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate,
                                         num_workers=cfg.num_workers if loader_workers is None else loader_workers,
                                         persistent_workers=False, pin_memory=device.type == "cuda")
    started = time.time() - float(state["elapsed_s"])
    bar = tqdm(total=total, initial=min(state["step"], total), desc=f"train {cfg.task}", disable=not show,
               dynamic_ncols=True)
    stopped = "completed"
    model.train()
    running: dict[str, float] = {}
    epoch_sum = (0.0, 0)
    last_val: dict[str, float] = {}
    probe_t0 = time.time()
    for batch in loader:
        if state["step"] >= total:
            stopped = "max_steps"
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(state["step"], total, cfg.lr)
        batch = to_device(batch, device)
        out = model(batch["x"])
        loss, parts = loss_fn(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        for k, v in parts.items():
            running[k] = 0.95 * running.get(k, v) + 0.05 * v
        epoch_sum = (epoch_sum[0] + parts["loss"], epoch_sum[1] + 1)
        state["step"] += 1
        state["batch"] += 1
        if state["batch"] >= per_epoch:
            state["epoch"] += 1
            state["batch"] = 0
        state["elapsed_s"] = time.time() - started
        if state["step"] == PROBE_START:
            probe_t0 = time.time()
        if cfg.max_minutes is not None and not state.get("total") and state["step"] == SCHEDULE_PROBE_STEPS:
            # Fix the schedule length once from the measured speed (steps PROBE_START.. only, so one-off costs
            # such as drawing the first round of crops do not count), plus the dataset's own periodic cost, so
            # the cosine ends within the budget.
            rate = (time.time() - probe_t0) / (SCHEDULE_PROBE_STEPS - PROBE_START)
            rate += _drawing_per_step(dataset, per_epoch)
            total = max(state["step"] + 1, min(total, steps_that_fit(state["step"], state["elapsed_s"], rate,
                                                                      cfg.max_minutes * 60)))
            state["total"] = total
            plan_mark = (state["step"], state["elapsed_s"], _drawing_seconds(dataset))
            bar.total = total
            bar.refresh()
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {k: f"{v:.3f}" for k, v in last_val.items()})
        epoch_end = state["batch"] == 0
        if epoch_end or state["step"] % cfg.checkpoint_every == 0:
            if epoch_end and cfg.max_minutes is not None and plan_mark is not None and state["step"] > plan_mark[0]:
                drawing = _drawing_seconds(dataset) - plan_mark[2]
                per_step = (state["elapsed_s"] - plan_mark[1] - drawing) / (state["step"] - plan_mark[0])
                per_step += _drawing_per_step(dataset, per_epoch)
                longer = replanned_total(total, cap, state["step"], state["elapsed_s"], per_step,
                                         cfg.max_minutes * 60)
                if longer is not None:
                    message = (f"re-planned the schedule from {total} to {longer} steps: the speed measured since "
                               f"step {plan_mark[0]} fits more into the {cfg.max_minutes:g}-minute budget "
                               "than the first probe did (it probably ran while something else used the CPU)")
                    _log(log_path, {"step": state["step"], "replanned_from": total, "replanned_to": longer})
                    if show:
                        tqdm.write(message)
                    total = state["total"] = longer
                    bar.total = total
                    bar.refresh()
            if epoch_end:
                last_val = validate()
                model.train()
                entry = {"epoch": state["epoch"], "step": state["step"], "elapsed_s": round(state["elapsed_s"], 1),
                         "lr": opt.param_groups[0]["lr"],
                         "epoch_loss": round(epoch_sum[0] / max(1, epoch_sum[1]), 4),
                         **{k: round(v, 4) for k, v in running.items()},
                         **{f"val_{k}": round(v, 4) for k, v in last_val.items()}}
                state["history"].append(entry)
                epoch_sum = (0.0, 0)
                _log(log_path, entry)
                if show:
                    tqdm.write(json.dumps(entry))
            _save_checkpoint(ckpt, model, opt, state)
        if cfg.max_minutes is not None and state["elapsed_s"] > cfg.max_minutes * 60:
            stopped = "time_budget"
            break
    else:
        if state["step"] < total and state["epoch"] < cfg.epochs:
            stopped = "data_exhausted"
    bar.close()
    _save_checkpoint(ckpt, model, opt, state)
    model.cpu()
    model.eval()
    return {"steps": state["step"], "planned_steps": total, "epochs_completed": state["epoch"],
            "stopped": stopped, "elapsed_s": round(float(state["elapsed_s"]), 1), "history": state["history"],
            "log": str(log_path), "device": describe_device(device)}


def init_from_bundle(model: torch.nn.Module, source: Path, show: bool, seed: int = 0) -> dict[str, Any] | None:
    """Start from a bundle or a training checkpoint; parameters whose shape differs are left as initialised
    (e.g. a head that changed), and reported. A :class:`FractureNet` narrower than ``model`` is widened first,
    function-preserving (:mod:`pipeline.training.widen`, its random split seeded by ``seed``); the widening's
    record is returned for the card (None when there was none). A backbone of any other width is refused rather
    than dropped (every one of its tensors would keep the fresh initialisation)."""
    if source.is_dir():
        state = load_bundle(source).model.state_dict()
    else:
        state = torch.load(source, map_location="cpu", weights_only=False)["model"]
    widened: dict[str, Any] | None = None
    own = model.state_dict()
    if "stem.0.weight" in state and "stem.0.weight" in own:  # a detector's or type reader's backbone
        width, own_width = fracture_net_width(state), fracture_net_width(own)
        if width < own_width and isinstance(model, FractureNet):
            state = widen_fracture_state(state, own_width, seed=seed)
            widened = {"from_width": width, "to_width": own_width, "seed": seed,
                       "rule": "function-preserving (Net2WiderNet): each new channel copies an old one, and the "
                               "layers reading a copied channel split its weights at random among the copies"}
            if show:
                print(f"--init {source}: widened from width {width} to {own_width}, computing what it computed")
        elif width != own_width:
            raise ValueError(f"{source} is a width-{width} network and this one is width {own_width}: starting from "
                             f"it would throw its training away (give --width {width}"
                             f"{'; only a detector is widened' if width < own_width else ''})")
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    if show and skipped:
        print(f"--init {source}: kept the fresh initialisation of {', '.join(skipped)}")
    return widened


@torch.no_grad()
def _pooled(model: FractureNet, records: list[Record], long_side: int, desc: str,
            show: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per whole image: the heads' pooled feature vector and the segmentation top-k evidence."""
    model.eval()
    pooled, tops = [], []
    for rec in tqdm(records, desc=desc, leave=False, disable=not show):
        x, _g = prepare_fracture_input(read_gray(rec.path), long_side)
        _seg, vec, top = model.evidence(model.backbone(x))
        pooled.append(vec[0])
        tops.append(top[0])
    return torch.stack(pooled), torch.stack(tops)


def fit_whole_image_heads(model: FractureNet, train: list[Record], val: list[Record], cfg: TrainConfig,
                          show: bool) -> dict[str, Any]:
    """Second stage: refit the detection and type heads on whole images with the backbone frozen.

    The backbone and segmentation head learn on crops, where a fracture fills a good part of the view; on a
    whole radiograph the same pooled evidence is drawn from ~50 times more cells, among them look-alikes
    (growth plates, nutrient canals, overlapping cortices). Refitting the two small heads (a linear layer and
    an MLP, ~7 k parameters) on the pooled vectors of whole training images, with early stopping on the
    validation images, adapts them to the statistics they meet at inference. Costs one forward pass per image.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    pool = [r for r in train if r.fracture is not None]
    chosen = [pool[i] for i in sorted(rng.permutation(len(pool))[: cfg.head_images])]
    t0 = time.time()
    xt, st = _pooled(model, chosen, cfg.long_side, "whole-image features (train)", show)
    xv, sv = _pooled(model, val, cfg.long_side, "whole-image features (validation)", show)
    yt = torch.tensor([float(bool(r.fracture)) for r in chosen])
    yv = np.array([bool(r.fracture) for r in val])
    tt = torch.tensor([FRACTURE_TYPES.index(r.type) if r.fracture and r.type else -1 for r in chosen])
    tv = np.array([FRACTURE_TYPES.index(r.type) if r.fracture and r.type else -1 for r in val])
    summary: dict[str, Any] = {"images": len(chosen), "validation_images": len(val)}

    def det_auc() -> float:
        with torch.no_grad():
            return roc_auc((model.det_fc(xv).squeeze(1) + sv).numpy(), yv)

    def type_f1() -> float:
        sel = tv >= 0
        if not sel.any():
            return 0.0
        model.type_fc.eval()
        with torch.no_grad():
            pred = model.type_fc(xv[torch.from_numpy(sel)]).argmax(1).numpy()
        return macro_f1(confusion_matrix(tv[sel], pred, len(FRACTURE_TYPES)))

    for name, head, score, loss_of in (
        ("detect", model.det_fc, det_auc,
         lambda: F.binary_cross_entropy_with_logits(model.det_fc(xt).squeeze(1) + st, yt)),
        ("types", model.type_fc, type_f1,
         lambda: F.cross_entropy(model.type_fc(xt[tt >= 0]), tt[tt >= 0], label_smoothing=0.05)),
    ):
        if name == "types" and not bool((tt >= 0).any()):
            continue
        before = score()
        best, best_state = before, {k: v.clone() for k, v in head.state_dict().items()}
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-3)
        for it in range(400):
            head.train()
            with torch.enable_grad():
                loss = loss_of()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if (it + 1) % 20 == 0:
                now = score()
                if now > best:
                    best, best_state = now, {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(best_state)
        summary[name] = {"validation_before": round(before, 4), "validation_after": round(best, 4)}
    model.eval()
    summary["elapsed_s"] = round(time.time() - t0, 1)
    if show:
        tqdm.write("whole-image heads: " + json.dumps(summary))
    return summary


def train_fracture(train: list[Record], val: list[Record], cfg: TrainConfig, out: Path, ckpt_dir: Path,
                   resume: bool = False, init: Path | None = None, show: bool = True,
                   calibration: list[Record] | None = None, detector: Path | None = None) -> dict[str, Path]:
    """Train the multi-head network; write the detector and/or classifier bundle(s).

    ``cfg.task`` "fracture" writes ``out/detector`` and ``out/classifier``; "detect"/"classify" write ``out``.
    ``val`` is monitored each epoch; temperature and operating point are fitted on ``calibration`` (default:
    ``val``). With ``cfg.site_share`` > 0, ``detector`` (a detector bundle) finds the crop sites at its peaks
    away from the fracture (see :class:`FractureCrops`); its peaks are cached in ``ckpt_dir``.
    """
    torch.manual_seed(cfg.seed)
    model = FractureNet(width=cfg.width)
    widened = None
    if init is not None:
        widened = init_from_bundle(model, init, show, seed=cfg.seed)
    train = [r for r in train if r.is_radiograph and r.fracture is not None]
    val = [r for r in val if r.is_radiograph and r.fracture is not None]
    crops = FractureCrops(train, cfg)
    site_record: dict[str, Any] | None = None
    if cfg.site_share > 0:
        if detector is None:
            raise ValueError("crops at the detector's peaks (site share above 0) need a detector bundle")
        if not crops.has_masks:
            raise ValueError("crops at the detector's peaks (site share above 0) need training images with masks")
        site_record = crops.find_sites(detector, ckpt_dir / PEAK_CACHE, max(2, cfg.num_workers), show)
    dataset: FractureCrops | CropBank = crops
    if cfg.type_boost:
        check_type_boost(cfg.type_boost)
        if not (crops.has_masks and cfg.bank_per_image > 0):
            raise ValueError("a type boost for the detector draws more crops a round from the boosted images: it "
                             "needs training images with masks and --crops-per-image above 0")
    if crops.has_masks and cfg.bank_per_image > 0:
        crops.cache = _Cache(0)  # each round decodes every image once anyway
        dataset = CropBank(crops, cfg.bank_per_image, cfg.bank_epochs, cfg.num_workers, show)
    val_quick = val[: cfg.val_limit]

    def validate() -> dict[str, float]:
        d, t = predict_fracture(model, val_quick, cfg.long_side)
        m = fracture_metrics(d, t, val_quick)
        return {k: m[k] for k in ("auc", "type_accuracy", "type_macro_f1") if k in m}

    loader_workers = 0 if isinstance(dataset, CropBank) else cfg.num_workers
    if cfg.max_steps == 0:
        summary: dict[str, Any] = {"steps": 0, "stopped": "max_steps 0: crop training skipped", "history": []}
    else:
        loss_fn = functools.partial(fracture_loss, type_weight=cfg.type_loss_weight)
        summary = run_training_loop(model, dataset, len(dataset), cfg, ckpt_dir, loss_fn, validate, resume,
                                    show, loader_workers=loader_workers)
    if cfg.head_images > 0:
        summary["whole_image_heads"] = fit_whole_image_heads(model, train, val_quick, cfg, show)
    # Calibration and operating point on the whole validation (or calibration) split.
    monitor_count = len(val)
    if calibration:
        val = [r for r in calibration if r.is_radiograph and r.fracture is not None]
    det_logits, type_logits = predict_fracture(model, val, cfg.long_side, show=show)
    labels = np.array([bool(r.fracture) for r in val])
    det_t, det_shift = fit_platt(det_logits, labels)
    if det_shift:
        # Fold the Platt shift into the detection head's bias, so the bundle stays "logit / temperature".
        with torch.no_grad():
            model.det_fc.bias.add_(det_shift)
        det_logits = det_logits + det_shift
    probs = sigmoid(det_logits / det_t)
    op = operating_point(probs, labels)
    typed = [i for i, r in enumerate(val) if r.fracture and r.type]
    type_t = 1.0
    if typed:
        type_t = fit_temperature(type_logits[typed], np.array([FRACTURE_TYPES.index(val[i].type or "")
                                                               for i in typed]))
    val_metrics = fracture_metrics(det_logits, type_logits, val, det_t, float(op["threshold"]))  # type: ignore[arg-type]
    input_spec = {
        "modality": "bone radiograph (projection X-ray), any body region",
        "pixels": "float32 in [0, 1], bone bright (MONOCHROME2 after Modality LUT, VOI LUT and MONOCHROME1 "
                  "inversion)",
        "long_side": cfg.long_side,
        "resize": "cv2.INTER_AREA to long_side, aspect kept",
        "padding": f"right/bottom with zeros (air) to a multiple of {STRIDE}",
        "normalisation": "per image: (x - mean) / std over the resized, unpadded image",
        "channels": 1,
    }
    training = {
        "data": cfg.data_description,
        "train_images": len(train), "monitor_validation_images": monitor_count,
        "calibration_images": len(val), "calibration_data": cfg.extra.get("calibration_data", "validation split"),
        "calibration": f"Platt scaling on the calibration images: shift {det_shift:+.4f} folded into the detection "
                       f"head's bias, temperature {det_t:.4f} in the card",
        "initialised_from": str(init) if init is not None else None,
        **({"widened": widened} if widened is not None else {}),
        "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "crop": cfg.crop,
        "learning_rate": cfg.lr, **augmentation_record(cfg),
        "losses": "BCE detection (crop-level label from the mask) + BCE segmentation of the fracture mask at 1/8 "
                  "(pos_weight 4; training-only supervision) + cross-entropy over the 11 types (label smoothing "
                  f"0.05) weighted {cfg.type_loss_weight:g}",
        "crops_per_image_and_round": cfg.bank_per_image, "epochs_per_round": cfg.bank_epochs,
        **({"site_crops": site_record} if site_record is not None else {}),
        **({"type_boost": {
            "crops_per_image_and_round": {t: n * cfg.bank_per_image for t, n in cfg.type_boost.items()},
            "crops_per_round": len(dataset),
            "rule": "each fractured training image of a boosted type gives that many times the usual crops a round "
                    "(all drawn afresh); the detection logit is recalibrated on the calibration images as always"}}
           if cfg.type_boost and isinstance(dataset, CropBank) else {}),
        **{k: v for k, v in summary.items() if k != "history"},
        "history": summary["history"],
        "parameters": count_parameters(model),
        **cfg.extra,
    }
    arch: dict[str, Any] = {"architecture": "FractureNet", "config": dict(model.config)}
    written: dict[str, Path] = {}
    tasks = ("detect", "classify") if cfg.task == "fracture" else (cfg.task,)
    for task in tasks:
        target = out / ("detector" if task == "detect" else "classifier") if cfg.task == "fracture" else out
        if task == "detect":
            card = make_card(name="fracturenode-detector", task="detect", **arch, input_spec=input_spec,
                             training=training, temperature=det_t, operating_point=op,
                             metrics={"validation": {k: val_metrics[k] for k in
                                                     ("auc", "sensitivity", "specificity", "ece")}})
        else:
            card = make_card(name="fracturenode-classifier", task="classify", **arch, input_spec=input_spec,
                             training=training, temperature=type_t,
                             metrics={"validation": {k: val_metrics[k] for k in
                                                     ("type_accuracy", "type_macro_f1") if k in val_metrics}},
                             extra={"asked_when": "the detector's call is 'fracture' or 'indeterminate'"})
        written[task] = save_bundle(model, card, target, dtype=cfg.weights_dtype)
    return written


# --------------------------------------------------------------------------------------------- validity


class ValiditySet(Dataset[dict[str, Any]]):
    """Radiographs (label 1) and negatives (label 0), augmented, letterboxed to ``size``."""

    def __init__(self, records: list[Record], cfg: TrainConfig, augment: bool = True) -> None:
        self.records = records
        self.cfg = cfg
        self.augment = augment
        self.cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        if i not in self.cache:
            img = read_gray(self.records[i].path)
            self.cache[i] = resize_long_side(img, self.cfg.validity_size * 2) if max(img.shape) > \
                self.cfg.validity_size * 2 else img
        return self.cache[i]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        rng = keyed_rng(self.cfg.seed, epoch, i, 11)
        img = self.image(i)
        if self.augment:
            h, w = img.shape
            if rng.random() < 0.5:  # random crop of 70-100 % of each side
                ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
                y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                img = img[y0:y0 + ch, x0:x0 + cw]
            rotation = _rotation_range(self.cfg, rng, usual=10.0)
            if self.cfg.zoom_out and rng.random() < self.cfg.zoom_out:
                img, _, _ = wider_field(img, None, wider_field_factor(rng), rng)
                img, _ = random_geometry(img, None, rng, max_rotation=rotation)
            elif self.cfg.zoom_in and rng.random() < self.cfg.zoom_in:
                # rotated first, so that the closer window rarely reaches the corners the rotation leaves empty
                img, _ = random_geometry(img, None, rng, max_rotation=rotation)
                img, _ = closer_field(img, None, closer_field_factor(rng), rng)
            else:
                img, _ = random_geometry(img, None, rng, max_rotation=rotation)
            if self.cfg.processing:
                img = random_processing(img, rng, self.cfg.processing)
            img = random_acquisition(img, rng, self.cfg.augment, self.cfg.noise_max)
        x = (letterbox(img, self.cfg.validity_size) - 0.5) / 0.25
        return {"x": torch.from_numpy(x.astype(np.float32))[None],
                "y": torch.tensor(1.0 if self.records[i].is_radiograph else 0.0)}


def validity_loss(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    loss = F.binary_cross_entropy_with_logits(out, batch["y"])
    return loss, {"loss": float(loss.detach())}


@torch.inference_mode()
def predict_validity(model: ValidityNet, records: list[Record], size: int) -> np.ndarray:
    model.eval()
    device = model_device(model)
    out = []
    for rec in records:
        x = torch.from_numpy(((letterbox(read_gray(rec.path), size) - 0.5) / 0.25).astype(np.float32))[None, None]
        out.append(float(model(x.to(device))[0]))
    return np.array(out)


def validity_breakdown(logits: np.ndarray, records: list[Record], threshold_logit: float = 0.0) -> dict[str, Any]:
    pred = logits >= threshold_logit
    truth = np.array([r.is_radiograph for r in records])
    per_kind: dict[str, float] = {}
    kinds = sorted({r.kind or "radiograph" for r in records})
    for kind in kinds:
        sel = np.array([(r.kind or "radiograph") == kind for r in records])
        per_kind[kind] = float((pred[sel] == truth[sel]).mean())
    return {"accuracy": float((pred == truth).mean()), "per_kind": per_kind}


def train_validity(train: list[Record], val: list[Record], cfg: TrainConfig, out: Path, ckpt_dir: Path,
                   resume: bool = False, show: bool = True) -> dict[str, Path]:
    torch.manual_seed(cfg.seed)
    model = ValidityNet()
    if not any(not r.is_radiograph for r in train):
        raise ValueError("the validity check needs negatives (negatives.csv in the generator's layout)")
    dataset = ValiditySet(train, cfg)

    def validate() -> dict[str, float]:
        logits = predict_validity(model, val[: cfg.val_limit], cfg.validity_size)
        return {"accuracy": validity_breakdown(logits, val[: cfg.val_limit])["accuracy"]}

    summary = run_training_loop(model, dataset, len(train), cfg, ckpt_dir, validity_loss, validate, resume, show)
    logits = predict_validity(model, val, cfg.validity_size)
    labels = np.array([r.is_radiograph for r in val])
    t = fit_temperature(logits, labels) if labels.any() and (~labels).any() else 1.0
    breakdown = validity_breakdown(logits, val)
    card = make_card(
        name="fracturenode-radiograph-check", task="validity", architecture="ValidityNet",
        config=dict(model.config),
        input_spec={"size": cfg.validity_size, "pixels": "float32 [0, 1] greyscale (colour converted to grey)",
                    "resize": "letterbox: cv2.INTER_AREA to the long side, zero padding to a square",
                    "normalisation": "(x - 0.5) / 0.25", "rules_first": "see pipeline/validation.py"},
        training={"data": cfg.data_description, "train_images": len(train), "validation_images": len(val),
                  "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                  **augmentation_record(cfg), **{k: v for k, v in summary.items()},
                  "parameters": count_parameters(model), **cfg.extra},
        temperature=t,
        operating_point={"threshold": 0.5, "rule": "calibrated probability of 'radiograph' >= 0.5"},
        metrics={"validation": breakdown},
    )
    return {"validity": save_bundle(model, card, out, dtype=cfg.weights_dtype)}


def augmentation_record(cfg: TrainConfig) -> dict[str, float]:
    """The augmentation settings a card's ``training`` block records (validity, fracture and classify tasks)."""
    return {"augmentation_strength": cfg.augment, "processing_augmentation": cfg.processing,
            "zoom_out_augmentation": cfg.zoom_out, "noise_max": cfg.noise_max,
            **({"zoom_in_augmentation": cfg.zoom_in} if cfg.zoom_in else {}),
            **({"wide_rotation_augmentation": cfg.rotate} if cfg.rotate else {})}


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
