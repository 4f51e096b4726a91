"""Training the second-stage type classifier (:class:`~pipeline.models.nets.TypeReader`).

At inference the type is read from a patch centred on one of the detector's strongest segmentation peaks (the
one where the detector's and the reader's evidence together is largest: :func:`pipeline.run.read_type_sites`),
cut at ``long_side`` scale (twice the detector's by default). Training draws such patches around the fracture itself:
the centre is a random pixel of the fracture mask plus a few pixels of jitter (so the reader does not rely on
the fracture sitting exactly in the middle), with random scale, any rotation (the types are defined relative to
the bone, not to the image), flips and the same acquisition augmentation as the detector.

Each fractured image is decoded once, into a context window around its fracture kept in memory; every patch is
then one affine warp of that window, cheap enough for the data-loader worker on two cores. The temperature is
fitted, and the card's metrics measured, on patches placed by a real detector bundle, as at inference.

With a ``site_share`` above 0 (``train --site-share``), that share of the patches is centred instead on the
detector's own strongest segmentation peaks away from the fracture, in fractured and intact training images
alike (:data:`SITE_PEAKS` per image, found once by running the detector bundle over every training image).
Those are the places inference weighs as candidate sites and where a false call starts; there the reader's
segmentation target is the fracture mask as it falls in the patch (usually empty), and the type is learnt only
where the fracture reaches the patch's central half. So the reader's own evidence (the strongest cell of its
segmentation map) learns to say "no fracture here" at the detector's false peaks, which is what
:func:`pipeline.run.choose_site` weighs and what :func:`pipeline.run.fused_detection_logit` adds to the
detector's call.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.evaluation.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    roc_auc,
    sensitivity_at_specificity,
)
from pipeline.models.bundle import Bundle, card_time, load_bundle, make_card, read_card, save_bundle, update_card
from pipeline.models.imageio import read_gray
from pipeline.models.nets import FractureNet, TypeOutput, TypeReader, count_parameters
from pipeline.models.preprocess import cut_patch, fracture_input, resize_long_side, standardise_patch
from pipeline.models.runtime import TorchFractureNet, TorchTypeReader
from pipeline.run import (
    FUSION_FEATURES,
    TYPE_SITES,
    calibrated_probability,
    choose_site,
    coarse_inputs,
    read_type_sites,
    reader_evidence,
    type_sites,
)
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.training.augment import (
    PROCESSED_SHARE,
    acquisition_params,
    apply_local,
    apply_pointwise,
    closer_field_factor,
    crop_padded,
    processing,
    wider_field_factor,
)
from pipeline.training.calibration import fit_logistic, fit_temperature, operating_point, sigmoid
from pipeline.training.datasets import Record
from pipeline.training.device import model_device
from pipeline.training.loop import (
    TrainConfig,
    augmentation_record,
    boost_draws,
    check_type_boost,
    fork_map,
    init_from_bundle,
    keyed_rng,
    run_training_loop,
)
from pipeline.training.peaks import detector_peaks, file_key, inside_box, read_peak_cache, write_peak_cache

READER_STRIDE = 16  # the reader's segmentation map is at 1/16 of the patch
SINGLE_SITE_RULE = "the strongest cell of the detector's segmentation map (pipeline.models.preprocess.seg_peak)"
SITES_RULE = ("of the detector's `sites` strongest segmentation peaks (at least half a patch apart), the one where "
              "the detector's segmentation logit plus the strongest cell of this reader's own segmentation map over "
              "the patch is largest (pipeline.run.read_type_sites and choose_site)")
CENTRE_JITTER = 1 / 12  # standard deviation of the patch centre around the chosen mask pixel, in patch sides
SITE_PEAKS = 2  # detector peaks away from the fracture kept per training image as site patches (site_share > 0)
PEAK_CACHE = "site_peaks.json"  # in the checkpoint folder (train_type_reader)
HALF_DIAGONAL = 0.5 * 2 ** 0.5  # half a square's diagonal over its side: the reach of a patch at any rotation
NO_TYPE = -100  # type label of a site patch the fracture does not reach: ignored by the type loss


def boost_log_prior(boost: dict[str, int]) -> np.ndarray:
    """The log of each type's sampling factor (taxonomy order): what a reader trained with ``boost``
    (``train --type-boost``) over-states each type's logit by, against the data's own type frequencies.

    A type drawn b times as often as the data hold it raises its training prior by the factor b (over the other
    types, whose factor is 1), so the Bayes posterior under the data's prior is the trained one with log b taken
    off that type's logit (the logit adjustment of Menon et al., 2021, done once, after training)."""
    check_type_boost(boost)
    return np.log(np.array([float(boost.get(t, 1)) for t in FRACTURE_TYPES], dtype=np.float64))


def adjust_type_prior(model: TypeReader, boost: dict[str, int]) -> list[float]:
    """Take the boosted types' sampling factors back out of ``model``'s type logits, in the bias of its last
    layer (see :func:`boost_log_prior`); returns the amounts taken off, in taxonomy order."""
    shift = boost_log_prior(boost)
    if shift.any():
        head = model.reader_fc[-1]
        assert isinstance(head, torch.nn.Linear)
        with torch.no_grad():
            head.bias.sub_(torch.as_tensor(shift, dtype=head.bias.dtype))
    return [float(v) for v in shift]


def typed_fractures(records: list[Record]) -> list[Record]:
    """Radiographs with a fracture, a type and a location (mask or box): what the type reader learns from."""
    return [r for r in records if r.is_radiograph and r.fracture and r.type and (r.mask is not None or r.box)]


def _fracture_pixels(rec: Record, img_shape: tuple[int, int], scale: float) -> np.ndarray:
    """The fracture's mask (uint8) at the scaled image's size; the box filled in when there is no mask."""
    h, w = img_shape
    if rec.mask is not None:
        m = cv2.imread(str(rec.mask), cv2.IMREAD_GRAYSCALE)
        if m is not None and m.any():
            return (cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    if rec.box is not None:
        x0, y0, x1, y1 = (int(round(v * scale)) for v in rec.box)
        mask[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)] = 1
    return mask


def _window16(img: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """A ``size`` square of ``img`` (float in [0, 1]) at (``top``, ``left``), air beyond its edges, as uint16."""
    return (np.clip(crop_padded(img.astype(np.float32), top, left, size, 0.0), 0, 1) * 65535 + 0.5).astype(np.uint16)


class TypePatches(Dataset[dict[str, Any]]):
    """Augmented patches around each fracture, with its type label; with ``cfg.site_share`` > 0 and a
    ``detector``, also patches at the detector's peaks away from the fracture (see the module's docstring)."""

    def __init__(self, records: list[Record], cfg: TrainConfig, show: bool = False,
                 detector: Path | None = None, peak_cache: Path | None = None) -> None:
        self.records = typed_fractures(records)
        if not self.records:
            raise ValueError("no fractured images with a type and a mask or box to train the type reader on")
        self.cfg = cfg
        self.patch = cfg.patch
        # With a type boost, each image of a boosted type is drawn that many times an epoch (with fresh draws).
        check_type_boost(cfg.type_boost)
        self.order = [i for i, r in enumerate(self.records) for _ in range(boost_draws(cfg.type_boost, r))]
        # Room for any rotation at the smallest zoom, around any mask pixel of a large fracture.
        self.window = 2 * int(self.patch * 0.75 * 1.42 + 0.5) + 256
        self.contexts: list[tuple[np.ndarray, np.ndarray]] = list(
            fork_map(self.context, list(range(len(self.records))), cfg.num_workers, "type patches: decode", show,
                     chunksize=8))
        # Site patches: room for any rotation at the smallest zoom around the peak, plus 3 sigma of jitter.
        self.site_window = 2 * int(self.patch * (0.625 * 1.42 + 3 * CENTRE_JITTER) + 0.5)
        self.sites: list[tuple[np.ndarray, np.ndarray | None, int]] = []
        self.site_images = 0
        self.peaks_reused = 0
        if cfg.site_share > 0:
            if detector is None:
                raise ValueError("site patches need a detector bundle to find its peaks")
            if not 0 < cfg.site_share < 1:
                raise ValueError(f"site share {cfg.site_share} must lie in (0, 1)")
            self._detector = load_bundle(detector, expected_task="detect", runtime="numpy")
            rads = [r for r in records if r.is_radiograph and r.fracture is not None]
            self._site_records = rads
            header = self._peak_cache_header()
            self._known = read_peak_cache(peak_cache, header) if peak_cache is not None else {}
            self.peaks_reused = sum(file_key(r.path) in self._known for r in rads)
            found = list(fork_map(self.peak_windows, list(range(len(rads))), max(2, cfg.num_workers),
                                  "type patches: peaks", show, chunksize=8))
            self.sites = [w for _key, _peaks, ws in found for w in ws]
            self.site_images = len(rads)
            if peak_cache is not None:
                write_peak_cache(peak_cache, header, {key: peaks for key, peaks, _ws in found})
            del self._detector, self._site_records, self._known
        share = cfg.site_share if self.sites else 0.0
        self.n_sites = int(round(len(self.order) * share / (1 - share))) if share else 0

    def _peak_cache_header(self) -> dict[str, Any]:
        """What the cached peaks depend on besides the image: the detector's weights, the reader's scale and patch
        (which set the peaks' spacing) and how many peaks are kept."""
        return {"detector_sha256": self._detector.identity.sha256, "long_side": self.cfg.long_side,
                "patch": self.patch, "peaks": SITE_PEAKS + 1}

    def __len__(self) -> int:
        return len(self.order) + self.n_sites

    def context(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The image at ``long_side`` scale (uint16) and its fracture mask, in a window around the fracture."""
        rec = self.records[i]
        img = read_gray(rec.path)
        small = resize_long_side(img, self.cfg.long_side)
        mask = _fracture_pixels(rec, small.shape, small.shape[0] / img.shape[0])
        ys, xs = np.nonzero(mask)
        cy, cx = ((int(ys.min()) + int(ys.max())) // 2, (int(xs.min()) + int(xs.max())) // 2) if len(ys) else (
            small.shape[0] // 2, small.shape[1] // 2)
        top, left = cy - self.window // 2, cx - self.window // 2
        return _window16(small, top, left, self.window), crop_padded(mask, top, left, self.window, 0)

    def peak_windows(self, i: int) -> tuple[str, list[list[float]], list[tuple[np.ndarray, np.ndarray | None, int]]]:
        """Windows (uint16 image, fracture mask or None, type index or -1) around the detector's
        :data:`SITE_PEAKS` strongest segmentation peaks outside the fracture's box in training image ``i``;
        peaks at least half a patch apart, as at inference. Also the image's cache key and the peaks found (taken
        from the peak cache instead when it holds this image: the detector's pass is most of the cost)."""
        rec = self._site_records[i]
        img = read_gray(rec.path)
        key = file_key(rec.path)
        peaks = self._known.get(key)
        if peaks is None:
            side = self.patch * max(img.shape) / self.cfg.long_side
            peaks = detector_peaks(self._detector, img, SITE_PEAKS + 1, side / 2)
        small = resize_long_side(img, self.cfg.long_side)
        scale = small.shape[0] / img.shape[0]
        mask = _fracture_pixels(rec, small.shape, scale) if rec.fracture else None
        kind = FRACTURE_TYPES.index(rec.type) if rec.fracture and rec.type else -1
        out: list[tuple[np.ndarray, np.ndarray | None, int]] = []
        for px, py in peaks:
            if rec.fracture and (rec.box is None or inside_box(rec, (px, py))):
                continue  # the fracture's own patches come from the main stream
            w = self.site_window
            top, left = int(round(py * scale)) - w // 2, int(round(px * scale)) - w // 2
            mwin = crop_padded(mask, top, left, w, 0) if mask is not None else None
            out.append((_window16(small, top, left, w), mwin if mwin is not None and mwin.any() else None, kind))
            if len(out) == SITE_PEAKS:
                break
        return key, peaks, out

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        if i < len(self.order):
            return self.sample(self.order[i], keyed_rng(self.cfg.seed, epoch, i, 23))
        rng = keyed_rng(self.cfg.seed, epoch, i, 29)
        return self.sample_site(int(rng.integers(0, len(self.sites))), rng)

    def sample(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        img16, mask = self.contexts[i]
        ys, xs = np.nonzero(mask)
        if len(ys):
            k = int(rng.integers(0, len(ys)))
            cy, cx = float(ys[k]), float(xs[k])
        else:
            cy = cx = self.window / 2
        rec = self.records[i]
        return self._warp(img16, mask, cx, cy, FRACTURE_TYPES.index(rec.type or ""), rng)[0]

    def sample_site(self, j: int, rng: np.random.Generator) -> dict[str, Any]:
        """A patch at a detector peak away from the fracture (site ``j``); its type is learnt only if the fracture
        reaches the patch's central half."""
        img16, mask, kind = self.sites[j]
        if mask is None:
            mask = np.zeros(img16.shape, np.uint8)
        item, mpatch = self._warp(img16, mask, self.site_window / 2, self.site_window / 2, kind, rng)
        q = self.patch // 4
        if kind < 0 or not mpatch[q:-q, q:-q].any():
            item["type"] = torch.tensor(NO_TYPE)
        return item

    def _warp(self, img16: np.ndarray, mask: np.ndarray, cx: float, cy: float, kind: int,
              rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
        cfg = self.cfg
        p, aug = self.patch, cfg.augment
        jitter = CENTRE_JITTER * p * (1.0 if aug else 0.0)
        cx += float(rng.normal(0, jitter)) if jitter else 0.0
        cy += float(rng.normal(0, jitter)) if jitter else 0.0
        zoom = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))) if aug else 1.0
        angle = float(rng.uniform(0, 360)) if aug else 0.0
        image_side = cfg.long_side * zoom  # the whole image's long side in patch pixels (for the processing)
        if aug and cfg.zoom_out and rng.random() < cfg.zoom_out:
            # A wider field of view: at inference the image (limb and air margin) is resized to long_side as a
            # whole, so the bone is smaller by the field's factor; as far as the window holds the rotated patch.
            room = max(1.0, min(cx, cy, img16.shape[1] - cx, img16.shape[0] - cy))
            zoom = max(zoom / wider_field_factor(rng), min(zoom, p * HALF_DIAGONAL / room))
        elif aug and cfg.zoom_in and rng.random() < cfg.zoom_in:
            # A closer field (a study collimated to a wrist or a finger): resized to long_side as a whole, the bone
            # is larger by the field's factor, so the patch reads a window that much smaller around the fracture.
            zoom *= closer_field_factor(rng)
        # A vendor's post-processing is drawn on a window twice the patch's side around it (its blurs and
        # auto-window see the neighbourhood), at the whole image's scales; the patch is that window's centre.
        process = bool(aug and cfg.processing and rng.random() < PROCESSED_SHARE * cfg.processing)
        size = 2 * p if process else p
        m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
        m[:, 2] += np.array([p / 2 - cx, p / 2 - cy])
        # Only the part of the window the warp reads is converted to float.
        reach = int(np.ceil(size * HALF_DIAGONAL / zoom)) + 2
        y0, x0 = max(0, int(cy) - reach), max(0, int(cx) - reach)
        src = img16[y0:int(cy) + reach + 1, x0:int(cx) + reach + 1].astype(np.float32) / 65535.0
        ms = m.astype(np.float64)
        ms[:, 2] = ms[:, 2] + ms[:, :2] @ np.array([x0, y0], dtype=np.float64) + (size - p) / 2
        if process:
            window = cv2.warpAffine(src, ms, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            patch = processing(window, rng, long_side=image_side, fast=True)[p // 2:p // 2 + p, p // 2:p // 2 + p]
        else:
            patch = cv2.warpAffine(src, ms, (p, p), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=0)
        mpatch = cv2.warpAffine(mask, m, (p, p), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
        if aug and rng.random() < 0.5:
            patch, mpatch = patch[:, ::-1], mpatch[:, ::-1]
        n = p // READER_STRIDE
        seg = mpatch[: n * READER_STRIDE, : n * READER_STRIDE].reshape(n, READER_STRIDE, n, READER_STRIDE).max(
            axis=(1, 3)).astype(np.float32)
        if aug:
            params = acquisition_params(rng, aug, patch[::4, ::4])
            patch = apply_local(apply_pointwise(patch, params), rng, aug, cfg.noise_max)
        return {"x": standardise_patch(patch)[0], "type": torch.tensor(kind),
                "seg": torch.from_numpy(np.ascontiguousarray(seg))[None]}, mpatch


def type_loss(out: TypeOutput, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    labelled = batch["type"] != NO_TYPE  # site patches the fracture does not reach teach the map only
    cls_loss = (F.cross_entropy(out.types[labelled], batch["type"][labelled], label_smoothing=0.05)
                if bool(labelled.any()) else out.types.sum() * 0.0)
    target = batch["seg"]
    logits = out.seg
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    seg_loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor(4.0))
    loss = cls_loss + seg_loss
    return loss, {"loss": float(loss.detach()), "type": float(cls_loss.detach()), "seg": float(seg_loss.detach())}


def _box_centre(rec: Record, pixels: np.ndarray) -> tuple[float, float]:
    if rec.box is not None:
        x0, y0, x1, y1 = rec.box
        return (x0 + x1) / 2, (y0 + y1) / 2
    ys, xs = np.nonzero(_fracture_pixels(rec, pixels.shape, 1.0))
    return (float(xs.mean()), float(ys.mean())) if len(ys) else (pixels.shape[1] / 2, pixels.shape[0] / 2)


def _patch_at(pixels: np.ndarray, centre: tuple[float, float], long_side: int, patch: int) -> torch.Tensor:
    """The reader's input (1, 1, patch, patch) around ``centre``, exactly as at inference."""
    return standardise_patch(cut_patch(pixels, centre, long_side, patch)[0])


def _placed(pixels: np.ndarray, det_engine: TorchFractureNet, det_long: int, reader_engine: TorchTypeReader,
            long_side: int, patch: int, sites: int) -> tuple[float, list[Any]]:
    """The detector's logit on one image and the reader's passes at its ``sites`` candidate sites, as inference
    makes them."""
    xd, geom = fracture_input(pixels, det_long)
    fp = det_engine.forward(xd)
    return fp.detect_logit, read_type_sites(pixels, fp.seg, geom, reader_engine, long_side, patch, sites)


@torch.inference_mode()
def read_types(reader: TypeReader, records: list[Record], long_side: int, patch: int,
               detector: Bundle | None, sites: int = TYPE_SITES, show: bool = False) -> dict[str, Any]:
    """Type logits of each record read at its true fracture centre and, with a ``detector``, where inference
    reads it (the best of the detector's ``sites`` strongest segmentation peaks); plus whether that site fell
    inside the true box; and, per image path, the detection fusion's inputs there (detector logit, reader
    evidence)."""
    reader.eval()
    truth, at_truth, at_peak, hits = [], [], [], []
    features: dict[Path, tuple[float, float]] = {}
    det_net = detector.model if detector is not None else None
    det_long = int(detector.input_spec.get("long_side", 512)) if detector is not None else 0
    reader_engine = TorchTypeReader(reader)
    det_engine = TorchFractureNet(det_net) if isinstance(det_net, FractureNet) else None
    for rec in tqdm(records, desc="read types", leave=False, disable=not show):
        pixels = read_gray(rec.path)
        truth.append(FRACTURE_TYPES.index(rec.type or ""))
        at_truth.append(reader(_patch_at(pixels, _box_centre(rec, pixels), long_side, patch)).types[0].numpy())
        if det_engine is not None:
            logit, found = _placed(pixels, det_engine, det_long, reader_engine, long_side, patch, sites)
            features[rec.path] = (logit, reader_evidence(found))
            site = choose_site(found)
            hits.append(inside_box(rec, site.centre))
            at_peak.append(site.type_logits.astype(np.float32))
    empty = np.zeros((0, len(FRACTURE_TYPES)), np.float32)
    return {"truth": np.array(truth, dtype=int), "at_truth": np.stack(at_truth) if at_truth else empty,
            "at_peak": np.stack(at_peak) if at_peak else None, "peak_inside_box": hits, "features": features}


def _scores(truth: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    cm = confusion_matrix(truth, logits.argmax(axis=1), len(FRACTURE_TYPES))
    return {"type_accuracy": accuracy(cm), "type_macro_f1": macro_f1(cm)}


def train_type_reader(train: list[Record], val: list[Record], cfg: TrainConfig, out: Path, ckpt_dir: Path,
                      detector_dir: Path | None, resume: bool = False, init: Path | None = None, show: bool = True,
                      calibration: list[Record] | None = None) -> dict[str, Path]:
    """Train a :class:`TypeReader` on patches around the fractures; write the ``classify`` bundle to ``out``.

    The backbone starts from ``init`` or else from the detector's (same shapes at the same width).
    ``val`` is monitored each epoch with patches at the true fracture centre. The temperature and the card's
    metrics come from ``calibration`` (default ``val``) with patches placed by the ``detector_dir`` bundle.
    """
    torch.manual_seed(cfg.seed)
    model = TypeReader(width=cfg.width)
    start = init if init is not None else detector_dir  # the detector's backbone has the reader's shape
    if start is not None:
        init_from_bundle(model, start, show)
    patch = cfg.patch
    # The detector's peaks for the site patches are kept in the checkpoint folder: a resumed run (or another run
    # with the same detector, scale and images) reads them instead of running the detector again.
    dataset = TypePatches(train, cfg, show=show, detector=detector_dir, peak_cache=ckpt_dir / PEAK_CACHE)
    val_typed = typed_fractures(val)[: cfg.val_limit]
    val_patches = []  # decoded once: the monitoring images are read at their true fracture centre every epoch
    for rec in val_typed:
        pixels = read_gray(rec.path)
        val_patches.append(_patch_at(pixels, _box_centre(rec, pixels), cfg.long_side, patch))
    val_x = torch.cat(val_patches) if val_patches else None
    val_truth = np.array([FRACTURE_TYPES.index(r.type or "") for r in val_typed], dtype=int)

    def validate() -> dict[str, float]:
        if val_x is None:
            return {}
        model.eval()
        device = model_device(model)
        with torch.inference_mode():
            logits = torch.cat([model(val_x[k:k + 64].to(device)).types.cpu()
                                for k in range(0, len(val_x), 64)]).numpy()
        return _scores(val_truth, logits - log_prior)  # as the reader will ship: its sampling factors taken out

    log_prior = boost_log_prior(cfg.type_boost).astype(np.float32)
    summary = run_training_loop(model, dataset, len(dataset), cfg, ckpt_dir, type_loss, validate, resume, show)
    prior_shift = adjust_type_prior(model, cfg.type_boost)
    detector = load_bundle(detector_dir, expected_task="detect") if detector_dir is not None else None
    held = typed_fractures(calibration if calibration else val)
    temperature, metrics, how, _seen = calibrate_reader(model, held, cfg.long_side, patch, detector, TYPE_SITES,
                                                        show)
    input_spec = {
        "pixels": "float32 in [0, 1], bone bright (as for the detector)",
        "long_side": cfg.long_side,
        "patch": patch,
        "centre": SITES_RULE, "sites": TYPE_SITES,
        "resize": "the square of patch * max(h, w) / long_side original pixels around the centre, air (0) "
                  "beyond the image, cv2.INTER_AREA to patch x patch",
        "normalisation": "per patch: (x - mean) / std",
        "channels": 1,
    }
    training = {
        "data": cfg.data_description, "train_images": len(dataset.records),
        "monitor_validation_images": len(val_typed),
        "calibration_images": len(held),
        "calibration_data": cfg.extra.get("calibration_data", "validation split"),
        "calibration": how,
        "initialised_from": str(start) if start is not None else None,
        "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "learning_rate": cfg.lr,
        **augmentation_record(cfg),
        **({"site_patches": {
            "share": cfg.site_share, "peaks_per_image": SITE_PEAKS, "windows": len(dataset.sites),
            "images": dataset.site_images, "per_epoch": dataset.n_sites,
            "peaks_from_cache": dataset.peaks_reused,
            "rule": "centred on the detector's strongest segmentation peaks outside the fracture's box (at least "
                    "half a patch apart), in fractured and intact training images; segmentation target: the "
                    "fracture mask in the patch; type learnt only where the fracture reaches the central half",
            "detector": str(detector_dir)}} if dataset.n_sites else {}),
        **({"type_boost": {
            "patches_per_image": dict(cfg.type_boost), "patches_per_epoch": len(dataset.order),
            "prior_correction": dict(zip(FRACTURE_TYPES, prior_shift, strict=True)),
            "rule": "each fractured image of a boosted type is drawn that many times an epoch (fresh augmentation "
                    "each time); after training, log(factor) was taken off that type's logit (the bias of the "
                    "type head), so the shipped logits answer to the data's own type frequencies"}}
           if any(prior_shift) else {}),
        "augmentation": f"centre: a random fracture-mask pixel + N(0, {CENTRE_JITTER:.3f} patch); zoom 0.8-1.25; "
                        "any rotation; horizontal flip; window, gamma, contrast, blur/sharpen, noise, JPEG"
                        + ("; a share zoom_out_augmentation further shrunk by a wider field's factor (1.1-1.8)"
                           if cfg.zoom_out else "")
                        + ("; a share zoom_in_augmentation of the rest enlarged by a closer field's factor (1.2-2.5)"
                           if cfg.zoom_in else "")
                        + ("; post-processing (tone curve, CLAHE, multi-scale equalisation, edge enhancement) drawn "
                           "on a window twice the patch at the whole image's scales" if cfg.processing else ""),
        "losses": "cross-entropy over the 11 types (label smoothing 0.05) + BCE segmentation of the fracture mask "
                  "at 1/16 (pos_weight 4; training-only supervision, its map weights the pooling)",
        **{k: v for k, v in summary.items() if k != "history"},
        "history": summary["history"],
        "parameters": count_parameters(model),
        **cfg.extra,
    }
    card = make_card(name="fracturenode-type-reader", task="classify", architecture="TypeReader",
                     config=dict(model.config), input_spec=input_spec, training=training, temperature=temperature,
                     metrics={"validation": metrics},
                     extra={"asked_when": "the detector's call is 'fracture' or 'indeterminate'",
                            "needs": "a FractureNet detector bundle (its segmentation map places the patch)"})
    return {"classify": save_bundle(model, card, out, dtype=cfg.weights_dtype)}


def calibrate_reader(model: TypeReader, held: list[Record], long_side: int, patch: int, detector: Bundle | None,
                     sites: int, show: bool) -> tuple[float, dict[str, Any], str, dict[Path, tuple[float, float]]]:
    """The temperature and the card's metrics of a reader on ``held``, with its patches placed as at inference
    by ``detector`` (the best of its ``sites`` strongest segmentation peaks; else at the true fracture centre);
    how it was calibrated, in words; and the detection fusion's inputs it met on the way (see
    :func:`read_types`)."""
    read = read_types(model, held, long_side, patch, detector, sites, show=show)
    placed = read["at_peak"] if read["at_peak"] is not None else read["at_truth"]
    temperature = fit_temperature(placed, read["truth"]) if len(held) else 1.0
    metrics: dict[str, Any] = {"at_true_centre": _scores(read["truth"], read["at_truth"]), "images": len(held)}
    if read["at_peak"] is not None:
        metrics["at_detector_peak"] = _scores(read["truth"], read["at_peak"])
        metrics["detector_peak_inside_box"] = float(np.mean(read["peak_inside_box"])) if held else None
        metrics["sites"] = sites
    how = ("temperature scaling of the type logits on patches placed by the detector "
           f"{detector.identity.name} {detector.identity.sha256[:12]} as at inference (the best of its {sites} "
           "strongest segmentation peaks)" if detector is not None
           else "temperature scaling on patches at the true fracture centre")
    return temperature, metrics, how, read["features"]


@torch.inference_mode()
def fit_detection_fusion(reader: TypeReader, long_side: int, patch: int, sites: int, detector: Bundle,
                         records: list[Record], data: str, show: bool = False,
                         known: dict[Path, tuple[float, float]] | None = None,
                         second_scale: float | None = None, second_sites: int | None = None,
                         type_margin: float | None = None, mirror: bool = False) -> dict[str, Any]:
    """Fit the detection fusion (:func:`pipeline.run.fused_detection_logit`) of this reader behind
    ``detector`` on labelled radiographs ``records`` (fractured and intact): a logistic regression of the label
    on the detector's logit and the reader's strongest evidence over its ``sites``, then the operating point and
    indeterminate band on the fused probability by the detector's own rule. The card entry it returns records
    the fit and, on the same images, the detector alone against the fusion. ``known``: inputs already measured
    for some images (by :func:`read_types` with the same detector, reader and sites), not measured again.
    With ``second_scale`` (a factor above 1) the call also takes a second, coarser look
    (:func:`pipeline.run.coarse_inputs`, the reader at ``second_sites`` there, default ``sites``): the same
    weights, a Platt scaling of the two fused logits' mean fitted on the same images, and the operating point
    refitted on that probability. ``type_margin`` (no fitted value depends on it) is stored with the second look:
    the type is read there when its fused logit exceeds the native look's by more than it
    (:func:`pipeline.run.type_margin`). With ``mirror`` every input is the mean of the image's and its left-right
    mirror's, as inference then makes them (:func:`pipeline.run.mirror_look`), and the entry says ``mirror``."""
    labelled = [r for r in records if r.is_radiograph and r.fracture is not None]
    truth = np.array([bool(r.fracture) for r in labelled])
    if len(labelled) < 20 or truth.all() or not truth.any():
        raise ValueError("the detection fusion needs labelled radiographs, fractured and intact (20 at least)")
    reader.eval()
    det_net = detector.model
    if not isinstance(det_net, FractureNet):
        raise ValueError(f"{detector.path} is not a FractureNet detector bundle")
    det_engine, reader_engine = TorchFractureNet(det_net), TorchTypeReader(reader)
    det_long = int(detector.input_spec.get("long_side", 512))
    if second_scale is not None and not second_scale > 1.0:
        raise ValueError("the second scale is a factor above 1 (the image shown that many times smaller)")
    if type_margin is not None and (second_scale is None or not type_margin >= 0):
        raise ValueError("the type margin is a logit margin of 0 or more, and belongs to a second look")
    n_second = second_sites or sites
    known = known or {}
    plain_feats, mirror_feats, plain_coarse, mirror_coarse = [], [], [], []
    for rec in tqdm(labelled, desc="detection fusion", leave=False, disable=not show):
        pixels = None if rec.path in known else read_gray(rec.path)
        if pixels is not None:
            logit, found = _placed(pixels, det_engine, det_long, reader_engine, long_side, patch, sites)
            known[rec.path] = (logit, reader_evidence(found))
        plain_feats.append(known[rec.path])
        views = []
        if second_scale is not None or mirror:
            pixels = read_gray(rec.path) if pixels is None else pixels
            views = [pixels, np.ascontiguousarray(pixels[:, ::-1])] if mirror else [pixels]
        if mirror:  # the plain look's inputs are known; measure the mirror's
            logit, found = _placed(views[1], det_engine, det_long, reader_engine, long_side, patch, sites)
            mirror_feats.append((logit, reader_evidence(found)))
        if second_scale is not None:  # the same image, decoded once, shown second_scale times smaller
            looks = [coarse_inputs(view, det_engine, det_long, reader_engine, long_side, patch, n_second,
                                   second_scale) for view in views]
            plain_coarse.append(looks[0])
            if mirror:
                mirror_coarse.append(looks[1])
    plain_x = np.array(plain_feats, dtype=np.float64)
    x = 0.5 * (plain_x + np.array(mirror_feats, dtype=np.float64)) if mirror else plain_x
    coarse_x: np.ndarray | None = None
    if second_scale is not None:
        coarse_x = np.array(plain_coarse, dtype=np.float64)
        if mirror:
            coarse_x = 0.5 * (coarse_x + np.array(mirror_coarse, dtype=np.float64))
    w, b, fused, one_scale, platt = _fit_fusion(x, coarse_x, truth)
    second: dict[str, Any] | None = None
    if second_scale is not None:
        second = {"factor": float(second_scale), "sites": n_second, "platt": platt,
                  "rule": f"a second pass with the image shown {second_scale:g} times smaller to both networks "
                          "(each long side divided by the factor), fused with the same weights; probability = "
                          "sigmoid(platt.scale * the mean of the two fused logits + platt.bias)"}
        if type_margin is not None:
            second["type_margin"] = float(type_margin)
            second["rule"] += ("; the type, its site and the reader's part of the call's map come from the second "
                               f"look when its fused logit exceeds the native look's by more than {type_margin:g}")
    alone = np.array([calibrated_probability(v, detector.temperature) for v in x[:, 0]])

    def figures(p: np.ndarray) -> dict[str, float]:
        return {"auc": roc_auc(p, truth), "sensitivity_at_specificity_0.90": sensitivity_at_specificity(p, truth, 0.9),
                "ece": expected_calibration_error(p, truth)}

    return {
        "detector_sha256": detector.identity.sha256, "detector": detector.identity.label,
        "features": list(FUSION_FEATURES),
        "weights": {name: float(v) for name, v in zip(FUSION_FEATURES, w, strict=True)}, "bias": b,
        "rule": "probability = sigmoid(w_detector_logit * the detector's raw detection logit + w_reader_evidence * "
                "the strongest cell of this reader's segmentation map over its candidate sites + bias); used only "
                "behind the detector with this SHA-256, else the detector's own calibrated probability stands",
        "fitted_on": {"data": data, "images": len(labelled), "fractured": int(truth.sum()), "sites": sites,
                      "method": "logistic regression (Newton, Platt's smoothed targets, ridge 1e-4)"},
        "operating_point": operating_point(fused, truth),
        "metrics_on_fit_images": {"detector_alone": figures(alone), "fused": figures(fused),
                                  **({"fused_one_scale": figures(one_scale)} if second else {})},
        "second_scale": second,
        **({"mirror": True, "mirror_rule": "every input above is the mean of two looks, at the image and at its "
                                           "left-right mirror; the type distribution and the call's map are "
                                           "averaged the same way",
            "single_reading": _single_reading(plain_x, None if second_scale is None else
                                              np.array(plain_coarse, dtype=np.float64), truth, figures)}
           if mirror else {}),
        "date": card_time(),
    }


def _fit_fusion(x: np.ndarray, coarse: np.ndarray | None, truth: np.ndarray) -> tuple[
        np.ndarray, float, np.ndarray, np.ndarray, dict[str, float] | None]:
    """The fusion's logistic fit on its inputs ``x`` (detector logit, reader evidence per image) and, with the
    coarser look's inputs, the Platt scaling of the two fused logits' mean: the weights, the bias, the call's
    probabilities on these images, the one-scale probabilities, and the Platt scaling (None without a second
    look)."""
    w, b = fit_logistic(x, truth)
    fused = one_scale = sigmoid(x @ w + b)
    if coarse is None:
        return w, b, fused, one_scale, None
    mean = 0.5 * (x @ w + b + coarse @ w + b)
    (scale,), bias = fit_logistic(mean[:, None], truth)
    return w, b, sigmoid(scale * mean + bias), one_scale, {"scale": float(scale), "bias": float(bias)}


def _single_reading(x: np.ndarray, coarse: np.ndarray | None, truth: np.ndarray,
                    figures: Any) -> dict[str, Any]:
    """The same fusion fitted on the plain reading alone (the image as it is), on the same images: what
    inference uses when the mirrored look is switched off (``FRACTURE_MIRROR_LOOK=off``,
    :func:`pipeline.run.load_models` ``mirror=False``), so that a slower host reads once and stays calibrated."""
    w, b, fused, _one, platt = _fit_fusion(x, coarse, truth)
    return {"weights": {name: float(v) for name, v in zip(FUSION_FEATURES, w, strict=True)}, "bias": b,
            **({"platt": platt} if platt is not None else {}),
            "operating_point": operating_point(fused, truth),
            "metrics_on_fit_images": {"fused": figures(fused)},
            "rule": "the fusion fitted on the image as it is, read once: weights, bias, the second look's Platt "
                    "scaling and the operating point that replace the ones above when the mirrored look is off"}


def recalibrate_type_reader(reader_dir: Path, detector_dir: Path, calibration: list[Record], out: Path,
                            calibration_data: str, show: bool = True, sites: int | None = None,
                            fuse_detection: bool = False, second_scale: float | None = None,
                            second_sites: int | None = None, type_margin: float | None = None,
                            mirror: bool = False) -> Path:
    """A trained reader behind another detector: its patches move with that detector's peaks, so refit the
    temperature and the card's metrics there. The weights are the same file (same SHA-256); the card keeps
    its training record and lists the recalibration with the values it replaced. ``sites`` sets how many of the
    detector's peaks inference weighs (default: as the card says); with ``fuse_detection``, ``second_scale``
    adds the coarser pass to the fusion, reading ``second_sites`` there and the type there past ``type_margin``,
    and ``mirror`` the mirrored look (:func:`fit_detection_fusion`). Written
    to ``out`` (may be ``reader_dir`` itself)."""
    reader = load_bundle(reader_dir, expected_task="classify")
    if not isinstance(reader.model, TypeReader):
        raise ValueError(f"{reader_dir} is not a TypeReader bundle (a FractureNet classifier shares the "
                         "detector's network: retrain it instead)")
    detector = load_bundle(detector_dir, expected_task="detect")
    held = typed_fractures(calibration)
    if not held:
        raise ValueError("the calibration data has no fractured radiograph with a type and a box")
    spec = dict(reader.input_spec)
    n_sites = sites if sites is not None else type_sites(reader)
    temperature, metrics, how, seen = calibrate_reader(reader.model, held, int(spec["long_side"]),
                                                       int(spec["patch"]), detector, n_sites, show)
    card = read_card(reader_dir)
    training = dict(card.get("training", {}))
    training["recalibrations"] = [*training.get("recalibrations", []), {
        "date": card_time(),
        "previous_calibration": training.get("calibration"), "previous_temperature": card.get("temperature"),
        "previous_metrics": card.get("metrics"), "previous_sites": type_sites(reader)}]
    training.update(calibration=how, calibration_images=len(held), calibration_data=calibration_data)
    spec.update(centre=SITES_RULE if n_sites > 1 else SINGLE_SITE_RULE, sites=n_sites)
    fields: dict[str, Any] = {}
    previous = card.get("detection_fusion")
    if fuse_detection:
        fields["detection_fusion"] = fit_detection_fusion(reader.model, int(spec["long_side"]), int(spec["patch"]),
                                                          n_sites, detector, calibration, calibration_data, show,
                                                          known=seen, second_scale=second_scale,
                                                          second_sites=second_sites, type_margin=type_margin,
                                                          mirror=mirror)
    elif isinstance(previous, dict) and (previous.get("detector_sha256") != detector.identity.sha256
                                         or previous.get("fitted_on", {}).get("sites") != n_sites):
        fields["detection_fusion"] = None  # fitted for another pairing: the detector's own probability stands
    if previous and "detection_fusion" in fields:
        training["recalibrations"][-1]["previous_detection_fusion"] = previous
    if Path(out).resolve() != Path(reader_dir).resolve():
        shutil.copytree(reader_dir, out, dirs_exist_ok=True)
    # Metrics measured behind the previous detector (a held-out test's too) no longer describe this pairing.
    update_card(out, temperature=temperature, training=training, metrics={"validation": metrics}, input=spec,
                **fields)
    return Path(out)
