"""Augmentation with numpy/cv2: geometry (scale, rotation, flips, crops) and acquisition (windowing, gamma,
noise, blur, sharpening, JPEG-like 8-bit degradation), so the models see many plausible acquisitions of
each generated image. Every function takes an explicit ``numpy.random.Generator`` (reproducible)."""

from __future__ import annotations

import cv2
import numpy as np


def random_geometry(img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *,
                    max_rotation: float = 15.0, p_hflip: float = 0.5, p_vflip: float = 0.2,
                    p_rot90: float = 0.15) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip / rotate image and mask together (rotation about the centre, canvas kept, zero fill)."""
    if rng.random() < p_hflip:
        img = img[:, ::-1]
        mask = mask[:, ::-1] if mask is not None else None
    if rng.random() < p_vflip:
        img = img[::-1]
        mask = mask[::-1] if mask is not None else None
    if rng.random() < p_rot90:
        k = int(rng.integers(1, 4))
        img = np.rot90(img, k)
        mask = np.rot90(mask, k) if mask is not None else None
    img = np.ascontiguousarray(img)
    mask = np.ascontiguousarray(mask) if mask is not None else None
    angle = float(rng.uniform(-max_rotation, max_rotation))
    if abs(angle) > 0.5:
        h, w = img.shape
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if mask is not None:
            mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    return img, mask


def acquisition_params(rng: np.random.Generator, strength: float, sample: np.ndarray) -> dict[str, float]:
    """Draw the point-wise intensity transform (window, gamma, contrast) once per image; ``sample`` is a
    subsampled view of the image used for the window percentiles."""
    params: dict[str, float] = {"lo": 0.0, "hi": 1.0, "gamma": 1.0, "gain": 1.0, "offset": 0.0}
    if rng.random() < 0.7 * strength:
        lo, hi = np.percentile(sample, [rng.uniform(0, 8), rng.uniform(92, 100)])
        if hi - lo > 1e-3:
            params["lo"], params["hi"] = float(lo), float(hi)
    if rng.random() < 0.8 * strength:
        params["gamma"] = float(np.exp(rng.uniform(-0.5, 0.5)))
    if rng.random() < 0.5 * strength:
        params["gain"], params["offset"] = float(rng.uniform(0.7, 1.2)), float(rng.uniform(-0.1, 0.1))
    return params


def apply_pointwise(img: np.ndarray, p: dict[str, float]) -> np.ndarray:
    out = np.clip((img - p["lo"]) / (p["hi"] - p["lo"]), 0, 1)
    if p["gamma"] != 1.0:
        out = np.power(out, p["gamma"])
    if p["gain"] != 1.0 or p["offset"] != 0.0:
        out = out * p["gain"] + p["offset"]
    return np.clip(out, 0, 1).astype(np.float32)


def apply_local(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
                noise_max: float = 0.03) -> np.ndarray:
    """Blur or sharpening, signal-dependent noise (sigma up to ``noise_max`` at full brightness) and 8-bit
    JPEG-like degradation."""
    out: np.ndarray = img.astype(np.float32, copy=False)
    r = rng.random()
    if r < 0.25 * strength:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.0)))
    elif r < 0.45 * strength:
        blur = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(1.0, 3.0)))
        out = out + float(rng.uniform(0.2, 0.8)) * (out - blur)
    if rng.random() < 0.7 * strength:
        sigma = float(rng.uniform(0.002, noise_max))
        noise = rng.standard_normal(out.shape, dtype=np.float32)
        out = out + sigma * noise * np.sqrt(np.clip(out, 0.05, 1.0))
    out = np.clip(out, 0, 1)
    if rng.random() < 0.2 * strength:
        q = int(rng.integers(40, 95))
        ok, enc = cv2.imencode(".jpg", (out * 255 + 0.5).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
        dec = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE) if ok else None
        if dec is not None:
            out = dec.astype(np.float32) / 255.0
    return out.astype(np.float32)


def random_acquisition(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0,
                       noise_max: float = 0.03) -> np.ndarray:
    """Intensity augmentation on a float32 [0, 1] bone-bright image (never inverts)."""
    params = acquisition_params(rng, strength, img[::4, ::4])
    return apply_local(apply_pointwise(img, params), rng, strength, noise_max)


WIDER_FIELD = (1.1, 1.8)  # range of the canvas factor of wider_field (each side), drawn log-uniformly


def wider_field_factor(rng: np.random.Generator) -> float:
    """How much wider than the image the field of view is (each side), log-uniform over ``WIDER_FIELD``."""
    return float(np.exp(rng.uniform(np.log(WIDER_FIELD[0]), np.log(WIDER_FIELD[1]))))


def wider_field(img: np.ndarray, mask: np.ndarray | None, factor: float, rng: np.random.Generator | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """The image inside a canvas ``factor`` times its size, the margin unexposed (air, 0): a wider field of view
    or a limb that fills less of the detector. Placed at random with ``rng``, else centred; the mask moves with
    the image. Also returns where the image's top-left corner landed (top, left)."""
    h, w = img.shape
    nh, nw = max(h, int(round(h * factor))), max(w, int(round(w * factor)))
    if rng is None:
        top, left = (nh - h) // 2, (nw - w) // 2
    else:
        top, left = int(rng.integers(0, nh - h + 1)), int(rng.integers(0, nw - w + 1))
    out = np.zeros((nh, nw), dtype=img.dtype)
    out[top:top + h, left:left + w] = img
    placed = None
    if mask is not None:
        placed = np.zeros((nh, nw), dtype=mask.dtype)
        placed[top:top + h, left:left + w] = mask
    return out, placed, (top, left)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box (x0, y0, x1, y1; end exclusive) of a mask's nonzero pixels, None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


CLOSER_FIELD = (1.2, 2.5)  # range of the magnification of closer_field (each side), drawn log-uniformly
WIDE_ROTATION = 45.0  # degrees: the rotation range of a share of images (with the flips, every angle occurs)


def closer_field_factor(rng: np.random.Generator) -> float:
    """How much closer than the image the view is (each side), log-uniform over ``CLOSER_FIELD``."""
    return float(np.exp(rng.uniform(np.log(CLOSER_FIELD[0]), np.log(CLOSER_FIELD[1]))))


def closer_field(img: np.ndarray, mask: np.ndarray | None, factor: float, rng: np.random.Generator,
                 focus: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A closer view: the window ``1 / factor`` of each side, which the caller then shows at the whole image's
    size, so the bone is larger by ``factor`` and part of the limb leaves the field (a wrist or finger study
    collimated tight, a detector close to the part). The window is placed at random; with a ``focus`` box
    (x0, y0, x1, y1; a fracture) it holds the box where the box fits, else is centred on it. The mask is cut
    with the image."""
    h, w = img.shape
    wh, ww = max(8, min(h, int(round(h / factor)))), max(8, min(w, int(round(w / factor))))

    def place(lo: int, hi: int, side: int, full: int) -> int:
        # the window [start, start + side) inside [0, full), holding [lo, hi) if it can
        top = full - side
        if hi - lo <= side:
            a, b = max(0, hi - side), min(top, lo)
            if a <= b:
                return int(rng.integers(a, b + 1))
        return int(np.clip((lo + hi) // 2 - side // 2, 0, top))

    if focus is None:
        y, x = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    else:
        x0, y0, x1, y1 = focus
        y, x = place(y0, y1, wh, h), place(x0, x1, ww, w)
    out = np.ascontiguousarray(img[y:y + wh, x:x + ww])
    cut = np.ascontiguousarray(mask[y:y + wh, x:x + ww]) if mask is not None else None
    return out, cut


def pick_crop(h: int, w: int, size: int, rng: np.random.Generator,
              focus: tuple[int, int, int, int] | None) -> tuple[int, int]:
    """Top-left corner of a ``size`` square crop (may extend past the image: caller pads). With a focus box,
    the crop contains the box (or is centred on it when the box is larger) with random jitter."""
    if focus is not None:
        x0, y0, x1, y1 = focus
        lo_x, hi_x = x1 - size, x0
        lo_y, hi_y = y1 - size, y0
        cx = int(rng.integers(lo_x, hi_x + 1)) if hi_x >= lo_x else (x0 + x1) // 2 - size // 2
        cy = int(rng.integers(lo_y, hi_y + 1)) if hi_y >= lo_y else (y0 + y1) // 2 - size // 2
    else:
        cx = int(rng.integers(min(0, w - size), max(0, w - size) + 1))
        cy = int(rng.integers(min(0, h - size), max(0, h - size) + 1))
    return cy, cx


def crop_padded(arr: np.ndarray, top: int, left: int, size: int, fill: float) -> np.ndarray:
    out = np.full((size, size), fill, dtype=arr.dtype)
    h, w = arr.shape
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(h, top + size), min(w, left + size)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = arr[y0:y1, x0:x1]
    return out


FAST_BLUR_SIGMA = 8.0  # smooth(fast=True): a larger sigma is applied on a copy downsampled to about this sigma


def smooth(img: np.ndarray, sigma: float, fast: bool = False) -> np.ndarray:
    """Gaussian blur of ``sigma`` px. With ``fast`` and a sigma above :data:`FAST_BLUR_SIGMA`, the image is
    area-downsampled by ``sigma / FAST_BLUR_SIGMA``, blurred there and resized back: a wide blur is smooth, so
    little is lost, at a fraction of the cost (a sigma of 100 px on 384 x 384 takes about 40 ms directly)."""
    if not fast or sigma <= FAST_BLUR_SIGMA:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    k = sigma / FAST_BLUR_SIGMA
    h, w = img.shape
    small = cv2.resize(img, (max(1, round(w / k)), max(1, round(h / k))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma * small.shape[1] / w)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def multiscale_equalise(img: np.ndarray, coarse_sigma: float, keep: float, detail: float, mid_sigma: float,
                        mid_gain: float, fast: bool = False) -> np.ndarray:
    """Multi-scale processing as DR consoles do it: keep ``keep`` of the large-scale density (blur of
    ``coarse_sigma`` px: soft tissue, the limb's thickness), boost the detail above it by ``detail`` and the
    mid-scale detail (above a blur of ``mid_sigma`` px) by ``mid_gain`` more, then stretch to [0, 1] between the
    0.1 and 99.9 percentiles (a display's auto-window). ``fast``: the blurs through :func:`smooth`'s shortcut."""
    coarse = smooth(img, coarse_sigma, fast)
    out = keep * coarse + detail * (img - coarse)
    if mid_gain > 0:
        out = out + mid_gain * (img - smooth(img, mid_sigma, fast))
    lo, hi = np.percentile(out[::2, ::2], [0.1, 99.9])
    return np.clip((out - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


def clahe(img: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image, at 16 bits."""
    img16 = (np.clip(img, 0, 1) * 65535 + 0.5).astype(np.uint16)
    out: np.ndarray = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img16)
    return out.astype(np.float32) / 65535.0


PROCESSED_SHARE = 0.6  # at strength 1, the share of images that get a post-processing (random_processing)


def random_processing(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A vendor's post-processing, drawn at random, on a whole float32 [0, 1] bone-bright image: a wide tone
    curve, contrast-limited adaptive histogram equalisation, multi-scale equalisation (large-scale density
    flattened, detail boosted) or strong edge enhancement. Scales are fractions of the image's long side, so the
    same draw means the same processing at any resolution. With probability ``1 - PROCESSED_SHARE * strength``
    the image is returned as it is."""
    if rng.random() >= PROCESSED_SHARE * strength:
        return img.astype(np.float32, copy=False)
    return processing(img, rng)


def processing(img: np.ndarray, rng: np.random.Generator, *, long_side: float | None = None,
               fast: bool = False) -> np.ndarray:
    """One post-processing of :func:`random_processing`, always applied. ``long_side``: the long side, in this
    array's pixels, of the whole image it was cut from (default: its own), so that a window of an image is
    processed at the image's scales (blur widths, and CLAHE tiles of the same size: fewer on the window); the
    auto-window percentiles are then the window's own. ``fast``: large blurs on a downsampled copy."""
    x = np.clip(img, 0, 1).astype(np.float32)
    own = max(x.shape)
    long_side = float(own) if long_side is None else float(long_side)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        x = np.power(x, float(np.exp(rng.uniform(-1.1, 1.1))))
    elif kind == 1:
        tiles = int(rng.choice([4, 8, 16]))
        x = clahe(x, float(rng.uniform(1.5, 4.0)), max(1, int(round(tiles * own / long_side))))
    elif kind == 2:
        x = multiscale_equalise(x, max(1.0, long_side * float(rng.uniform(1 / 20, 1 / 6))),
                                float(rng.uniform(0.2, 0.7)), float(rng.uniform(1.2, 2.5)),
                                max(1.0, long_side * float(rng.uniform(1 / 200, 1 / 60))), float(rng.uniform(0.0, 1.2)),
                                fast=fast)
    else:
        blur = smooth(x, max(0.5, long_side * float(rng.uniform(1 / 800, 1 / 150))), fast)
        x = x + float(rng.uniform(0.5, 2.5)) * (x - blur)
    return np.clip(x, 0, 1).astype(np.float32)
