"""Images that are *not* bone radiographs, for training and testing the radiograph-validity stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

NEGATIVE_KINDS: tuple[str, ...] = (
    "photo",
    "document",
    "screenshot",
    "colour",
    "noise",
    "blank",
    "ct_slice",
    "mr_slice",
    "ultrasound",
)
#: kinds whose image is RGB (HxWx3); the others are single-channel
RGB_KINDS = frozenset({"photo", "screenshot", "colour"})

_WORDS = ("patient", "report", "the", "and", "of", "invoice", "total", "date", "name", "clinic", "result",
          "normal", "page", "signed", "value", "ref", "dose", "mg", "daily", "review", "scan", "left", "right")


@dataclass
class Negative:
    image: np.ndarray  # uint8, HxW or HxWx3 (RGB)
    kind: str
    seed: int = 0


def _size(rng: np.random.Generator, long_side: int | None) -> tuple[int, int]:
    ls = int(long_side) if long_side is not None else int(rng.integers(512, 2049))
    aspect = rng.uniform(0.56, 1.0)
    short = max(int(ls * aspect), 32)
    return (ls, short) if rng.random() < 0.5 else (short, ls)


def _text_lines(img: np.ndarray, rng: np.random.Generator, color, x0: int, y0: int, x1: int, y1: int,
                scale: float) -> None:
    y = y0
    lh = max(int(30 * scale), 6)
    while y + lh < y1:
        x = x0
        while True:
            w = _WORDS[int(rng.integers(len(_WORDS)))]
            (tw, _), _ = cv2.getTextSize(w, cv2.FONT_HERSHEY_SIMPLEX, scale, max(int(scale * 1.5), 1))
            if x + tw > x1:
                break
            cv2.putText(img, w, (x, y + lh), cv2.FONT_HERSHEY_SIMPLEX, scale, color, max(int(scale * 1.5), 1),
                        cv2.LINE_AA)
            x += tw + int(12 * scale)
            if rng.random() < 0.05:
                break
        y += int(lh * rng.uniform(1.3, 1.8))


def _photo(rng, h, w):
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = np.array(rng.uniform(0.4, 1.0, 3), np.float32)
    ground = np.array(rng.uniform(0.1, 0.6, 3), np.float32)
    horizon = rng.uniform(0.3, 0.7)
    img = np.where(yy < horizon, sky * (0.7 + 0.3 * yy / horizon), ground * (0.6 + 0.4 * yy))
    img = np.broadcast_to(img, (h, w, 3)).copy()
    for _ in range(int(rng.integers(6, 25))):
        c = tuple(float(v) for v in rng.uniform(0, 1, 3))
        cx, cy = int(rng.integers(w)), int(rng.integers(h))
        r = int(rng.uniform(0.02, 0.2) * min(h, w))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, c, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + int(r * rng.uniform(0.5, 3))), c, -1)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(1, 4))
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _document(rng, h, w):
    img = np.full((h, w), int(rng.integers(225, 256)), np.uint8)
    m = int(0.08 * w)
    _text_lines(img, rng, int(rng.integers(0, 60)), m, m, w - m, h - m, rng.uniform(0.4, 1.0) * w / 1000)
    if rng.random() < 0.5:  # a table
        for k in range(int(rng.integers(3, 10))):
            y = int(h * (0.5 + 0.04 * k))
            if y < h:
                cv2.line(img, (m, y), (w - m, y), 0, 1)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0))
    noise = rng.normal(0, rng.uniform(1, 6), img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _screenshot(rng, h, w):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(200, 256, 3)
    bar = int(rng.uniform(0.04, 0.08) * h)
    img[:bar] = rng.integers(20, 120, 3)
    side = int(rng.uniform(0.1, 0.25) * w)
    img[bar:, :side] = rng.integers(150, 235, 3)
    for _ in range(int(rng.integers(3, 10))):
        x0 = int(rng.integers(side, max(side + 1, w - w // 8)))
        y0 = int(rng.integers(bar, max(bar + 1, h - h // 8)))
        x1 = min(w - 2, x0 + int(rng.integers(w // 10 + 1, max(w // 10 + 2, w // 2))))
        y1 = min(h - 2, y0 + int(rng.integers(h // 20 + 1, max(h // 20 + 2, h // 4))))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.rectangle(img, (x0, y0), (x1, y1), col, -1 if rng.random() < 0.5 else 2)
    _text_lines(img, rng, (30, 30, 30), side + 20, bar + 10, w - 20, h - 20, rng.uniform(0.35, 0.7) * w / 1000 + 0.2)
    return img


def _colour(rng, h, w):
    small = rng.uniform(0, 1, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 1)
    return (img * 255).astype(np.uint8)


def _noise(rng, h, w):
    if rng.random() < 0.5:
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    else:
        img = np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 70), (h, w)), 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 3))
    return img


def _blank(rng, h, w):
    v = int(rng.choice([0, 255, int(rng.integers(0, 256))]))
    img = np.full((h, w), v, np.uint8)
    if rng.random() < 0.5:
        img = np.clip(img.astype(np.int16) + rng.integers(-2, 3, (h, w)), 0, 255).astype(np.uint8)
    return img


def _ct(rng, h, w):
    img = np.zeros((h, w), np.float32)
    cy, cx = h / 2 + rng.normal(0, 0.03) * h, w / 2 + rng.normal(0, 0.03) * w
    R = 0.4 * min(h, w)
    ax, ay = R * rng.uniform(1.0, 1.3), R * rng.uniform(0.65, 0.85)
    cv2.ellipse(img, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 0.35, -1, cv2.LINE_AA)  # fat
    cv2.ellipse(img, (int(cx), int(cy)), (int(ax * 0.92), int(ay * 0.9)), 0, 0, 360, 0.5, -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(3, 7))):  # organs
        ox, oy = cx + rng.uniform(-0.5, 0.5) * ax, cy + rng.uniform(-0.4, 0.3) * ay
        cv2.ellipse(img, (int(ox), int(oy)), (int(rng.uniform(0.1, 0.3) * ax), int(rng.uniform(0.1, 0.3) * ay)),
                    float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.45, 0.6)), -1, cv2.LINE_AA)
    if rng.random() < 0.5:  # lungs
        for sgn in (-1, 1):
            cv2.ellipse(img, (int(cx + sgn * 0.45 * ax), int(cy - 0.1 * ay)), (int(0.3 * ax), int(0.55 * ay)), 0, 0,
                        360, 0.05, -1, cv2.LINE_AA)
    vy = int(cy + 0.55 * ay)
    cv2.circle(img, (int(cx), vy), int(0.12 * ay), 0.95, -1, cv2.LINE_AA)  # vertebra
    cv2.circle(img, (int(cx), vy), int(0.08 * ay), 0.7, -1, cv2.LINE_AA)
    cv2.rectangle(img, (0, int(cy + ay * 1.05)), (w, int(cy + ay * 1.1)), 0.4, -1)  # table
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _mr(rng, h, w):
    img = np.zeros((h, w), np.float32)
    cy, cx = h / 2, w / 2
    R = 0.38 * min(h, w)
    ax, ay = R * rng.uniform(0.8, 0.95), R
    cv2.ellipse(img, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 0.8, -1, cv2.LINE_AA)  # scalp
    cv2.ellipse(img, (int(cx), int(cy)), (int(ax * 0.93), int(ay * 0.93)), 0, 0, 360, 0.1, -1, cv2.LINE_AA)  # skull
    cv2.ellipse(img, (int(cx), int(cy)), (int(ax * 0.88), int(ay * 0.88)), 0, 0, 360, 0.55, -1, cv2.LINE_AA)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot((yy - cy) / ay, (xx - cx) / ax)
    gyri = 0.5 + 0.5 * np.sin(ang * rng.integers(20, 40) + np.sin(ang * 7) * 2 + rad * 25)
    inside = rad < 0.86
    img = np.where(inside, img + 0.25 * gyri * (rad > 0.45), img)
    for sgn in (-1, 1):  # ventricles
        cv2.ellipse(img, (int(cx + sgn * 0.12 * ax), int(cy)), (int(0.08 * ax), int(0.25 * ay)), float(sgn * 10),
                    0, 360, 0.15, -1, cv2.LINE_AA)
    img = img + rng.rayleigh(0.04, img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _ultrasound(rng, h, w):
    img = np.zeros((h, w), np.float32)
    apex = (w / 2, 0.05 * h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(xx - apex[0], yy - apex[1])
    th = np.arctan2(xx - apex[0], yy - apex[1])
    half = rng.uniform(0.5, 0.8)
    rmax = 0.9 * h
    sector = (np.abs(th) < half) & (r < rmax) & (r > 0.05 * h)
    speckle = rng.rayleigh(0.35, (h // 4 + 1, w // 4 + 1)).astype(np.float32)
    speckle = cv2.resize(speckle, (w, h), interpolation=cv2.INTER_LINEAR)[:h, :w]
    layers = 0.6 + 0.4 * np.sin(r / h * rng.uniform(10, 30)) * np.exp(-r / rmax)
    img = np.where(sector, speckle * layers * np.exp(-r / (1.5 * rmax)), 0.0)
    for _ in range(int(rng.integers(1, 4))):  # anechoic structure
        c = (int(w / 2 + rng.uniform(-0.2, 0.2) * w), int(rng.uniform(0.3, 0.7) * h))
        cv2.ellipse(img, c, (int(rng.uniform(0.04, 0.12) * w), int(rng.uniform(0.03, 0.08) * h)), 0, 0, 360,
                    0.02, -1)
    img = np.clip(img, 0, 1)
    out = (img * 255).astype(np.uint8)
    cv2.putText(out, f"{rng.uniform(2, 12):.1f} MHz", (int(0.03 * w), int(0.06 * h)), cv2.FONT_HERSHEY_SIMPLEX,
                0.0012 * w, 200, 1)
    return out


_MAKERS = {
    "photo": _photo,
    "document": _document,
    "screenshot": _screenshot,
    "colour": _colour,
    "noise": _noise,
    "blank": _blank,
    "ct_slice": _ct,
    "mr_slice": _mr,
    "ultrasound": _ultrasound,
}


def render_negative(seed: int, kind: str | None = None, long_side: int | None = None) -> Negative:
    """A deterministic non-radiograph image of ``kind`` (random kind when ``None``)."""
    from .render import stream

    rng = stream(int(seed), "negative")
    k = int(rng.integers(len(NEGATIVE_KINDS)))
    if kind is None:
        kind = NEGATIVE_KINDS[k]
    elif kind not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; expected one of {', '.join(NEGATIVE_KINDS)}")
    h, w = _size(rng, long_side)
    img = _MAKERS[kind](rng, h, w)
    if math.isnan(float(img.mean())):
        raise RuntimeError("bad negative")
    return Negative(np.ascontiguousarray(img), kind, int(seed))
