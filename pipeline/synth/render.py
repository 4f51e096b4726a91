"""Render one synthetic radiograph: anatomy -> fracture -> confounders -> projection -> acquisition."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.taxonomy import FRACTURE_TYPES

from .anatomy import FIELD_MM, REGIONS, Scene, build_scene
from .fractures import FractureInfo, build_fracture
from .project import (
    MU_CORTEX,
    MU_METAL,
    MU_SOFT,
    MU_TRAB,
    Canvas,
    coarse_canvas,
    make_texture,
    render_blob,
    render_bone,
    render_envelope,
    upsample,
)

CONFOUNDERS: tuple[str, ...] = (
    "growth_plate",
    "nutrient_canal",
    "overlapping_bones",
    "cast",
    "splint",
    "plate_screws",
    "skin_fold",
    "marker",
    "collimation",
)

LONG_SIDE_RANGE = (1024, 3000)
#: probability of a child (open growth plates) for normal studies; fractured studies match it overall
P_CHILD = 0.3


@dataclass
class Sample:
    """One synthetic radiograph with its ground truth.

    ``image`` holds raw detector values (``bits_stored`` significant bits) in the sample's
    ``photometric`` interpretation; use :func:`display_image` for a bone-bright float image.
    """

    image: np.ndarray
    photometric: str
    bits_stored: int
    pixel_spacing_mm: tuple[float, float]
    window_center: float
    window_width: float
    mask: np.ndarray
    fracture: bool
    fracture_type: str | None
    region: str
    laterality: str
    box: tuple[int, int, int, int] | None
    seed: int
    confounders: list[str] = field(default_factory=list)
    child: bool = False
    view_deg: float = 0.0
    kvp: float = 60.0
    magnification: float = 1.1
    imager_pixel_spacing_mm: tuple[float, float] = (0.1, 0.1)
    fractured_bone: str | None = None
    params: dict = field(default_factory=dict)

    @property
    def max_value(self) -> int:
        return (1 << self.bits_stored) - 1


def display_image(sample: Sample) -> np.ndarray:
    """Window the raw values (DICOM linear VOI) and invert MONOCHROME1: float32 in [0, 1], bone bright."""
    c, w = float(sample.window_center), max(float(sample.window_width), 1.0)
    x = (sample.image.astype(np.float32) - np.float32(c - 0.5)) / np.float32(w - 1.0) + np.float32(0.5)
    np.clip(x, 0.0, 1.0, out=x)
    if sample.photometric == "MONOCHROME1":
        x = np.float32(1.0) - x
    return x


def stream(seed: int, name: str) -> np.random.Generator:
    """Independent random stream per aspect, so fixing e.g. the label leaves the anatomy unchanged."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), h]))


# --------------------------------------------------------------------------------------------------------
# confounders


def _transform_group(scene: Scene, groups: list[str], pivot: np.ndarray, rot: float, shift: np.ndarray) -> None:
    cr, sr = math.cos(rot), math.sin(rot)
    R = np.array([[cr, -sr], [sr, cr]])
    for b in scene.bones:
        if b.group in groups:
            b.p0 = pivot + R @ (b.p0 - pivot) + shift
            b.u = R @ b.u
    for bl in scene.blobs:
        if bl.group in groups:
            bl.c = pivot + R @ (bl.c - pivot) + shift
            bl.angle += rot


def _limb_coords(scene: Scene, xs: np.ndarray, ys: np.ndarray):
    dx, dy = xs - np.float32(scene.limb_p0[0]), ys - np.float32(scene.limb_p0[1])
    ux, uy = np.float32(scene.limb_u[0]), np.float32(scene.limb_u[1])
    return dx * ux + dy * uy, -dx * uy + dy * ux


def _field_t_range(scene: Scene) -> tuple[float, float]:
    corners = np.array([[0, 0], [scene.width_mm, 0], [0, scene.height_mm], [scene.width_mm, scene.height_mm]])
    d = corners - scene.limb_p0
    t = d @ scene.limb_u
    return float(t.min()), float(t.max())


def _env_radius(scene: Scene, t: np.ndarray) -> np.ndarray:
    env = scene.envelopes[0]
    return np.interp(t, env.t, env.r, left=0.0, right=0.0).astype(np.float32)


def _add_cast(P: np.ndarray, cv: Canvas, scene: Scene, rng: np.random.Generator, splint: bool) -> None:
    xs, ys = cv.grid((0, 0, cv.w, cv.h))
    t, d = _limb_coords(scene, xs, ys)
    ta, tb = _field_t_range(scene)
    span = tb - ta
    c0 = rng.uniform(ta + 0.2 * span, tb - 0.2 * span)
    half = rng.uniform(0.25, 0.6) * span
    edge = np.clip(np.minimum(t - (c0 - half), (c0 + half) - t) / 3.0, 0.0, 1.0)
    Re = _env_radius(scene, np.clip(t, c0 - half, c0 + half))
    fq = rng.uniform(1.2, 2.4)
    tex = 1.0 + rng.uniform(0.02, 0.08) * np.sin(t * fq + d * fq) * np.sin(t * fq - d * fq)
    if not splint:
        ri = Re + rng.uniform(2, 6)
        ro = ri + rng.uniform(4, 9)
        flat = scene.envelopes[0].flat
        ch = 2 * flat * (np.sqrt(np.maximum(ro * ro - d * d, 0)) - np.sqrt(np.maximum(ri * ri - d * d, 0)))
        mu = rng.uniform(0.018, 0.04)
    else:
        w = rng.uniform(30, 70)
        dc = rng.uniform(-0.6, 0.6) * float(np.max(Re))
        thick = rng.uniform(4, 9)
        ch = thick * np.clip((w / 2 - np.abs(d - dc)) / 1.0, 0, 1)
        mu = rng.uniform(0.02, 0.05)
    P += (mu * ch * tex * edge).astype(np.float32)


def _add_skin_fold(P: np.ndarray, cv: Canvas, scene: Scene, tissue: np.ndarray, rng: np.random.Generator) -> None:
    xs, ys = cv.grid((0, 0, cv.w, cv.h))
    t, d = _limb_coords(scene, xs, ys)
    ta, tb = _field_t_range(scene)
    t0 = rng.uniform(ta + 0.2 * (tb - ta), tb - 0.2 * (tb - ta))
    ang = rng.uniform(-1.0, 1.0)
    curv = rng.uniform(-0.004, 0.004)
    s = (t - t0) * math.cos(ang) + d * math.sin(ang) + curv * d * d
    s = s * (1.0 if rng.random() < 0.5 else -1.0)
    lam = rng.uniform(3, 12)
    tau = rng.uniform(4, 14)
    edge = max(cv.s, 0.4)  # sub-pixel ramp on the (coarse) canvas: no staircase after upsampling
    prof = np.exp(-np.maximum(s, 0.0) / lam) * np.clip(s / edge + 0.5, 0, 1)
    inside = np.clip(tissue / (MU_SOFT * 8.0), 0, 1)
    P += (MU_SOFT * tau * prof * inside).astype(np.float32)


def _add_hardware(P: np.ndarray, cv: Canvas, scene: Scene, rng: np.random.Generator) -> bool:
    from .fractures import visible_range

    bones = [b for b in scene.bones if b.fracturable]
    rng.shuffle(bones)
    for bone in bones:
        vr = visible_range(bone, scene)
        if vr is None:
            continue
        L = bone.length
        r = bone.prof.at(L / 2) * bone.kw
        D = 2 * r
        plen = min(rng.uniform(4.5, 9) * D, (vr[1] - vr[0]) * 0.9)
        if plen < 2.5 * D:
            continue
        tc = rng.uniform(vr[0] + plen / 2, vr[1] - plen / 2)
        psi = rng.uniform(-math.pi / 2, math.pi / 2)
        pw = max(0.8 * D, 8.0) if D > 10 else 0.9 * D
        thick = 3.5 if D > 10 else 1.6
        wproj = max(pw * abs(math.cos(psi)) + thick * abs(math.sin(psi)), thick)
        path = min(thick / max(abs(math.cos(psi)), 0.2), pw)
        dc = (r + thick / 2) * math.sin(psi)
        pts = np.array([bone.world(tc - plen / 2, 0), bone.world(tc + plen / 2, 0)])
        bx = cv.box(pts, D + 6)
        if bx is None:
            continue
        x0, y0, x1, y1 = bx
        xs, ys = cv.grid(bx)
        dx, dy = xs - bone.p0[0], ys - bone.p0[1]
        t = dx * bone.u[0] + dy * bone.u[1]
        d = -dx * bone.u[1] + dy * bone.u[0]
        inplate = np.clip((plen / 2 - np.abs(t - tc)) / 0.6, 0, 1) * np.clip((wproj / 2 - np.abs(d - dc)) / 0.4, 0, 1)
        val = MU_METAL * path * inplate
        nscrew = max(2, int(plen / rng.uniform(11, 16)))
        sl = (D + 4) * abs(math.sin(psi)) + 3.5 if D > 10 else (D + 2) * abs(math.sin(psi)) + 2.0
        rs = 1.75 if D > 10 else 0.9
        for k in range(nscrew):
            if rng.random() < 0.2:
                continue
            ts = tc - plen / 2 + (k + 0.5) * plen / nscrew
            dcs = dc - 0.5 * (sl - 2 * rs) * math.copysign(1.0, math.sin(psi) if psi else 1.0)
            dd = d - dcs
            along = np.abs(dd)
            thread = 1.0 + 0.18 * np.sin(dd * 2 * math.pi / 1.2)
            radial = np.abs(t - ts)
            inside = (radial < rs * thread) & (along < sl / 2)
            chord = 2 * np.sqrt(np.maximum((rs * thread) ** 2 - radial**2, 0)) / max(abs(math.sin(psi)), 0.25)
            val = val + MU_METAL * np.minimum(chord, sl) * inside
        P[y0:y1, x0:x1] += val.astype(np.float32)
        return True
    return False


def _add_marker(P: np.ndarray, cv: Canvas, letter: str, rng: np.random.Generator) -> None:
    hmm = rng.uniform(8, 15)
    hpx = max(int(round(hmm / cv.s)), 8)
    scale = hpx / 22.0
    thick = max(int(round(scale * rng.uniform(2.0, 3.5))), 1)
    (tw, th), base = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(int(hpx * 0.35), 2)
    ph, pw = th + base + 2 * pad, tw + 2 * pad
    if ph >= cv.h // 3 or pw >= cv.w // 3:
        return
    patch = np.zeros((ph, pw), np.uint8)
    cv2.putText(patch, letter, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    corner = int(rng.integers(4))
    mx = int(rng.uniform(0.03, 0.12) * cv.w)
    my = int(rng.uniform(0.03, 0.12) * cv.h)
    x0 = mx if corner in (0, 2) else cv.w - mx - pw
    y0 = my if corner in (0, 1) else cv.h - my - ph
    lead = patch.astype(np.float32) / 255.0 * rng.uniform(0.8, 1.6)
    holder = rng.uniform(0.03, 0.12)
    P[y0:y0 + ph, x0:x0 + pw] += lead + holder


def _collimation(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    xs, ys = cv.grid((0, 0, cv.w, cv.h))
    W, H = cv.w * cv.s, cv.h * cv.s
    ang = rng.normal(0, 0.025)
    cx, cy = W / 2, H / 2
    u = (xs - cx) * math.cos(ang) + (ys - cy) * math.sin(ang)
    v = -(xs - cx) * math.sin(ang) + (ys - cy) * math.cos(ang)
    ins = rng.uniform(0.0, 0.075, 4) * np.array([W, W, H, H])
    ins[rng.random(4) < 0.35] = -5.0
    pen = rng.uniform(0.5, 2.5)
    f = np.clip((u - (-W / 2 + ins[0])) / pen, 0, 1) * np.clip(((W / 2 - ins[1]) - u) / pen, 0, 1)
    f = f * np.clip((v - (-H / 2 + ins[2])) / pen, 0, 1) * np.clip(((H / 2 - ins[3]) - v) / pen, 0, 1)
    out = rng.uniform(0.01, 0.1)
    return (out + (1 - out) * f).astype(np.float32)


# --------------------------------------------------------------------------------------------------------


def fast_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-variance noise (sum of four uniform bytes; ~5x faster than standard_normal)."""
    n = shape[0] * shape[1]
    b = np.frombuffer(rng.bytes(4 * n), dtype=np.uint8).reshape(4, n)
    s = (b[0].astype(np.int16) + b[1]) + (b[2].astype(np.int16) + b[3])
    return ((s.astype(np.float32) - np.float32(510.0)) * np.float32(1.0 / 147.8)).reshape(shape)


_NOISE_CACHE: dict[int, np.ndarray] = {}


def cached_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance noise: a random window (offset, flips) into a fixed per-process noise field.

    The field is generated once from a constant seed, so output stays deterministic; images larger than
    the field get fresh noise.
    """
    h, w = shape
    n = 2048
    oy, ox, flip = int(rng.integers(0, 1 << 30)), int(rng.integers(0, 1 << 30)), int(rng.integers(0, 4))
    if h > n or w > n:
        return fast_noise(rng, shape)
    field = _NOISE_CACHE.get(n)
    if field is None:
        field = fast_noise(np.random.default_rng(0x0015E), (n, n))
        _NOISE_CACHE[n] = field
    oy, ox = oy % (n - h + 1), ox % (n - w + 1)
    win = field[oy:oy + h, ox:ox + w]
    if flip & 1:
        win = win[::-1]
    if flip & 2:
        win = win[:, ::-1]
    return win


def _blur_small(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Wide Gaussian blur computed on a decimated copy (scatter, unsharp masks)."""
    h, w = img.shape
    f = max(1, int(sigma_px / 3))
    if f > 1:
        small = cv2.resize(img, (max(w // f, 1), max(h // f, 1)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigma_px / f, borderType=cv2.BORDER_REFLECT)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(img, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)


def draw_labels(seed: int, fracture: bool | None = None, fracture_type: str | None = None,
                region: str | None = None) -> tuple[bool, str | None, str, str, bool]:
    """The label-level draws of :func:`render_sample` (cheap): fracture, type, region, laterality, child.

    Always consumes the same random numbers, so fixing one of them does not change the others.
    """
    lab = stream(int(seed), "label")
    u_frac, u_type, u_region, u_lat, u_child = lab.random(5)
    if fracture_type is not None:
        if fracture_type not in FRACTURE_TYPES:
            raise ValueError(f"unknown fracture type {fracture_type!r}")
        if fracture is False:
            raise ValueError("fracture_type given with fracture=False")
        fracture = True
    if fracture is None:
        fracture = bool(u_frac < 0.5)
    if fracture and fracture_type is None:
        fracture_type = FRACTURE_TYPES[min(int(u_type * len(FRACTURE_TYPES)), len(FRACTURE_TYPES) - 1)]
    if not fracture:
        fracture_type = None
    if region is None:
        region = REGIONS[min(int(u_region * len(REGIONS)), len(REGIONS) - 1)]
    elif region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    laterality = "L" if u_lat < 0.5 else "R"
    if fracture_type == "greenstick":
        child = True  # greenstick fractures are paediatric
    elif fracture:
        # keep P(child | fracture) == P(child | normal) when types are uniform
        n = len(FRACTURE_TYPES)
        child = bool(u_child < (P_CHILD - 1.0 / n) / (1.0 - 1.0 / n))
    else:
        child = bool(u_child < P_CHILD)
    return bool(fracture), fracture_type, region, laterality, child


def render_sample(
    seed: int,
    *,
    fracture: bool | None = None,
    fracture_type: str | None = None,
    region: str | None = None,
    long_side: int | None = None,
) -> Sample:
    """Render the synthetic radiograph identified by ``seed`` (see module docs)."""
    seed = int(seed)
    fracture, fracture_type, region, laterality, child = draw_labels(seed, fracture, fracture_type, region)

    acq = stream(seed, "acquisition")
    if long_side is None:
        long_side = int(acq.integers(LONG_SIDE_RANGE[0], LONG_SIDE_RANGE[1] + 1))
    else:
        acq.integers(0, 2)
    long_side = int(long_side)
    if long_side < 64:
        raise ValueError("long_side must be >= 64")
    aspect = acq.uniform(0.68, 0.86)
    landscape = acq.random() < 0.2
    field_long = FIELD_MM[region] * acq.uniform(0.88, 1.12) * (0.78 if child else 1.0)
    mag = float(acq.uniform(1.03, 1.2))
    s = field_long / long_side
    short = max(int(round(long_side * aspect)), 32)
    H, W = (short, long_side) if landscape else (long_side, short)
    cv = Canvas(H, W, s)

    scene = build_scene(stream(seed, "anatomy"), region, laterality, child, W * s, H * s)
    scene.extras["spacing"] = s

    conf = stream(seed, "confounders")
    flags = {
        "nutrient": conf.random() < 0.45,
        "cast": conf.random() < 0.12,
        "splint": conf.random() < 0.08,
        "plate": conf.random() < 0.12,
        "fold": conf.random() < 0.25,
        "marker": conf.random() < 0.65,
        "collimation": conf.random() < 0.55,
    }
    confounders: list[str] = []
    if child and any(b.growth_plates for b in scene.bones):
        confounders.append("growth_plate")
    if flags["nutrient"]:
        for b in scene.bones:
            if b.fracturable and conf.random() < 0.7:
                sgn = 1.0 if conf.random() < 0.5 else -1.0
                b.nutrient = (conf.uniform(0.35, 0.65) * b.length, sgn, conf.uniform(0.8, 2.2) * sgn)
        confounders.append("nutrient_canal")
    if (region in ("forearm", "lower_leg") and abs(scene.view) > 0.55) or region in ("femur", "hand"):
        confounders.append("overlapping_bones")

    info: FractureInfo | None = None
    if fracture:
        assert fracture_type is not None
        for attempt in range(8):
            info = build_fracture(fracture_type, scene, stream(seed, f"fracture{attempt}"))
            if info is not None:
                break
        if info is None:
            raise RuntimeError(f"could not place a {fracture_type} fracture (seed {seed}, region {region})")
        if info.dislocation is not None:
            groups, pivot, rot, shift = info.dislocation
            _transform_group(scene, groups, pivot, rot, shift)

    # ---- projection (line integrals) ----
    jit = stream(seed, "jitter")
    tex = make_texture(stream(seed, "texture"))
    cc, fc = coarse_canvas(cv, 0.9)
    tissue_c = np.zeros((cc.h, cc.w), np.float32)
    for env in scene.envelopes:
        render_envelope(tissue_c, cc, env, tissue_c)
    smooth_c = np.zeros((cc.h, cc.w), np.float32)
    if flags["cast"]:
        _add_cast(smooth_c, cc, scene, conf, splint=False)
        confounders.append("cast")
    if flags["splint"]:
        _add_cast(smooth_c, cc, scene, conf, splint=True)
        confounders.append("splint")
    if flags["fold"]:
        _add_skin_fold(smooth_c, cc, scene, tissue_c, conf)
        confounders.append("skin_fold")
    expo = None
    if flags["collimation"]:
        expo = upsample(_collimation(cc, conf), fc, H, W)
        confounders.append("collimation")
    tissue = upsample(tissue_c, fc, H, W)
    other = upsample(smooth_c, fc, H, W) if (flags["cast"] or flags["splint"] or flags["fold"]) else \
        np.zeros((H, W), np.float32)
    bone = np.zeros((H, W), np.float32)
    fmask = np.zeros((H, W), bool)
    for b in scene.bones:
        render_bone(bone, fmask, cv, b, tex, jit, MU_CORTEX, MU_TRAB)
    for bl in scene.blobs:
        render_blob(bone, cv, bl, tex, MU_CORTEX, MU_TRAB)
    if flags["plate"] and _add_hardware(other, cv, scene, conf):
        confounders.append("plate_screws")
    if flags["marker"]:
        letter = laterality if conf.random() < 0.92 else ("L" if laterality == "R" else "R")
        _add_marker(other, cv, letter, conf)
        confounders.append("marker")

    # ---- mask / box ----
    mask = np.zeros((H, W), np.uint8)
    box = None
    if info is not None:
        m = fmask.view(np.uint8)
        for c, rad in info.extra_mask:
            cv2.circle(m, (int(c[0] / s), int(c[1] / s)), max(int(rad / s), 1), 1, -1)
        bx, by, bw, bh = cv2.boundingRect(m)
        if bw > 0 and bh > 0:
            k = max(int(round(2.5 / s)), 2)
            k2 = max(int(round(1.2 / s)), 1)
            g = k + k2 + 2
            rx0, ry0 = max(bx - g, 0), max(by - g, 0)
            rx1, ry1 = min(bx + bw + g, W), min(by + bh + g, H)
            roi: np.ndarray = m[ry0:ry1, rx0:rx1]
            roi = cv2.morphologyEx(roi, cv2.MORPH_CLOSE,
                                   cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
            roi = cv2.dilate(roi, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k2 + 1, 2 * k2 + 1)))
            mask[ry0:ry1, rx0:rx1] = (roi > 0).astype(np.uint8) * 255
            x_, y_, w_, h_ = cv2.boundingRect(mask[ry0:ry1, rx0:rx1])
            if w_ > 0:
                box = (rx0 + x_, ry0 + y_, rx0 + x_ + w_, ry0 + y_ + h_)

    # ---- acquisition ----
    img, bits, photometric, wc, ww, kvp = _acquire(acq, cv, tissue, bone, other, expo)
    return Sample(
        image=img,
        photometric=photometric,
        bits_stored=bits,
        pixel_spacing_mm=(float(s), float(s)),
        window_center=wc,
        window_width=ww,
        mask=mask,
        fracture=bool(fracture),
        fracture_type=fracture_type,
        region=region,
        laterality=laterality,
        box=box,
        seed=seed,
        confounders=confounders,
        child=child,
        view_deg=float(math.degrees(scene.view)),
        kvp=kvp,
        magnification=mag,
        imager_pixel_spacing_mm=(float(s * mag), float(s * mag)),
        fractured_bone=info.bone if info else None,
        params=dict(info.params) if info else {},
    )


def _acquire(rng: np.random.Generator, cv: Canvas, tissue: np.ndarray, bone: np.ndarray, other: np.ndarray,
             expo: np.ndarray | None):
    """Exposure, scatter, detector blur, quantum + electronic noise, log and console processing -> raw."""
    H, W, s = cv.h, cv.w, cv.s
    kvp = float(rng.uniform(48, 75))
    k = (kvp - 48) / 27
    kb = 1.35 - 0.55 * k  # bone contrast falls with kVp
    ks = 1.12 - 0.25 * k
    # fused float32 passes (cv2.addWeighted) keep the acquisition cheap
    P = cv2.addWeighted(tissue, -ks, bone, -kb, 0.0)
    P = cv2.subtract(P, other)
    inten: np.ndarray = cv2.exp(P)
    heel = rng.uniform(-0.12, 0.12)
    ramp = (1.0 + heel * (np.arange(H, dtype=np.float32) / H - 0.5))[:, None]
    inten *= ramp if expo is None else expo * ramp
    spr = rng.uniform(0.05, 0.45)
    inten = cv2.addWeighted(inten, 1.0, _blur_small(inten, rng.uniform(12, 30) / s), spr, 0.0)
    mtf = rng.uniform(0.35, 0.9)
    inten = np.asarray(cv2.GaussianBlur(inten, (0, 0), mtf), dtype=np.float32)
    n0 = 10 ** rng.uniform(2.7, 3.9) * (s / 0.15) ** 2
    sig_e = rng.uniform(0.3, 3.0) / n0
    noise = cached_noise(rng, (H, W))
    sd = cv2.addWeighted(inten, 1.0 / (n0 * (1 + spr)), inten, 0.0, sig_e * sig_e)
    np.sqrt(sd, out=sd)
    sd *= noise
    inten += sd
    np.maximum(inten, np.float32(1e-4), out=inten)
    lg: np.ndarray = cv2.log(inten)  # v = -lg is the attenuation line integral as measured
    # image processing as done by CR/DX consoles: range normalisation, unsharp masking, tone curve
    st = (max(H // 256, 1), max(W // 256, 1))
    sub = lg[:: st[0], :: st[1]]
    if expo is not None:
        esub = expo[:: st[0], :: st[1]] > 0.5
        sub = sub[esub] if esub.sum() > 100 else sub.ravel()
    q_lo, q_hi = rng.uniform(0.2, 2.0), rng.uniform(99.0, 99.9)
    n_hi, n_lo = np.percentile(sub, [100.0 - q_hi, 100.0 - q_lo])
    lo, hi = -float(n_lo), -float(n_hi)
    hi = max(hi, lo + 0.05)
    kx = 1.0 / (hi - lo)
    x = cv2.addWeighted(lg, -kx, lg, 0.0, -lo * kx)  # (v - lo) / (hi - lo)
    amt = rng.uniform(0.0, 0.9)
    gain = rng.uniform(1.2, 3.0)
    mid = rng.uniform(0.4, 0.6)
    if amt > 0.05:
        bl = _blur_small(x, rng.uniform(2.0, 6.0) / s)
        x = cv2.addWeighted(x, gain * (1 + amt), bl, -gain * amt, -gain * mid)
    else:
        x = cv2.addWeighted(x, gain, x, 0.0, -gain * mid)
    np.tanh(x, out=x)
    bits = int(rng.choice([12, 12, 14, 15, 16]))
    maxv = (1 << bits) - 1
    span = rng.uniform(0.6, 0.95) * maxv
    off = rng.uniform(0.0, maxv - span)
    # raw = off + span * (0.5 + 0.5 * tanh(..) / tanh(0.6 gain)), rounded and clipped
    a_ = 0.5 * span / math.tanh(gain * 0.6)
    x = cv2.addWeighted(x, a_, x, 0.0, off + 0.5 * span + 0.5)
    np.clip(x, np.float32(0.0), np.float32(maxv), out=x)
    raw = x.astype(np.uint16)
    photometric = "MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2"
    rs = raw[:: st[0], :: st[1]]
    p_lo, p_hi = np.percentile(rs, [rng.uniform(0.5, 3.0), rng.uniform(97.0, 99.8)])
    wc = float(round(0.5 * (p_lo + p_hi) + rng.normal(0, 0.02) * (p_hi - p_lo), 1))
    ww = float(round(max((p_hi - p_lo) * rng.uniform(0.95, 1.25), 16.0), 1))
    if photometric == "MONOCHROME1":
        np.subtract(np.uint16(maxv), raw, out=raw)
        wc = float(maxv) - wc
    return raw, bits, photometric, wc, ww, round(kvp, 1)
