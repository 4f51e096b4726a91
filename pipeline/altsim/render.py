"""Render one synthetic radiograph: attenuation line integrals -> detector physics -> display processing.

The scene is summed as a map ``A`` of line integrals of (excess) linear attenuation, in mm x 1/mm: soft tissue
(muscle and subcutaneous fat), bones (cortex as a projected tube, cancellous bone with trabecular texture,
growth plates, lesions, vascular canals, fractures), casts and splints, metal and lead markers. The detector sees
``I = I0 * heel * exp(-A)`` plus scatter, focal/detector blur and quantum noise; the image is the logarithm,
windowed, tone-mapped and edge-enhanced as a CR/DR workstation would, so bone is bright.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.altsim.anatomy import REGIONS, Bone, Scene, add_normal_variants, build_scene, radius_profile
from pipeline.altsim.fractures import Fracture, apply_dislocation, choose_site, make_fracture
from pipeline.taxonomy import FRACTURE_TYPES

MU_SOFT = 0.02    # 1/mm, muscle-equivalent soft tissue
MU_FAT = 0.017
MU_CORTEX = 0.07  # excess over the soft tissue it displaces
MU_METAL = 0.6
TILE = 256


class _View:
    """Limb-frame mm <-> pixel mapping: rotation ``theta``, ``scale`` px/mm, ``vc`` limb point at pixel ``c``."""

    def __init__(self, vc: tuple[float, float], theta: float, scale: float, w: int, h: int) -> None:
        self.vc, self.theta, self.scale, self.w, self.h = vc, theta, scale, w, h
        self.c = (w / 2.0, h / 2.0)
        self.ct, self.st = math.cos(theta), math.sin(theta)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        dx, dy = x - self.vc[0], y - self.vc[1]
        return (self.c[0] + self.scale * (self.ct * dx - self.st * dy),
                self.c[1] + self.scale * (self.st * dx + self.ct * dy))

    def local_affine(self, p0: tuple[float, float], ax: float, ay: float) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients (a, b, c) so that s = a*px + b*py + c and t likewise, for a frame at p0 with axis (ax, ay)."""
        nx, ny = -ay, ax
        out = []
        for ux, uy in ((ax, ay), (nx, ny)):
            # X = vc.x + (ct*dx + st*dy)/scale ; Y = vc.y + (-st*dx + ct*dy)/scale, d = px - c
            a = (ux * self.ct - uy * self.st) / self.scale
            b = (ux * self.st + uy * self.ct) / self.scale
            c0 = ux * (self.vc[0] - p0[0]) + uy * (self.vc[1] - p0[1]) - a * self.c[0] - b * self.c[1]
            out.append(np.array([a, b, c0], dtype=np.float64))
        return out[0], out[1]

    def bbox(self, pts: list[tuple[float, float]], margin_mm: float) -> tuple[int, int, int, int] | None:
        px = [self.to_px(*p) for p in pts]
        m = margin_mm * self.scale + 2
        x0 = max(int(min(p[0] for p in px) - m), 0)
        y0 = max(int(min(p[1] for p in px) - m), 0)
        x1 = min(int(max(p[0] for p in px) + m) + 1, self.w)
        y1 = min(int(max(p[1] for p in px) + m) + 1, self.h)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1


def _grid(view: _View, box: tuple[int, int, int, int], p0: tuple[float, float], ax: float, ay: float):
    x0, y0, x1, y1 = box
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    cs, ct = view.local_affine(p0, ax, ay)
    s = (cs[0] * xs + cs[1] * ys + cs[2]).astype(np.float32)
    t = (ct[0] * xs + ct[1] * ys + ct[2]).astype(np.float32)
    return s, t


def _seg_dist(pts: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    d = np.full(s.shape, 1e6, dtype=np.float32)
    for (a0, b0), (a1, b1) in zip(pts[:-1], pts[1:], strict=False):
        ds, dt = a1 - a0, b1 - b0
        ll = ds * ds + dt * dt or 1e-6
        u = np.clip(((s - a0) * ds + (t - b0) * dt) / ll, 0, 1)
        d = np.minimum(d, np.hypot(s - a0 - u * ds, t - b0 - u * dt))
    return d


def _wrap_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    p = int(3 * sigma) + 2
    big = np.pad(a, p, mode="wrap")
    return np.ascontiguousarray(cv2.GaussianBlur(big, (0, 0), sigma)[p:-p, p:-p])


class _Texture:
    """A wrap-around trabecular tile sampled in bone-local mm, so texture moves with displaced fragments."""

    def __init__(self, rng: np.random.Generator) -> None:
        n1 = _wrap_blur(rng.standard_normal((TILE, TILE)).astype(np.float32), 1.3)
        n1 /= n1.std() + 1e-6
        ridge = 1.0 - np.clip(np.abs(n1), 0, 2.0)  # thin network of plates/rods
        n2 = _wrap_blur(rng.standard_normal((TILE, TILE)).astype(np.float32), 4.0)
        n2 /= n2.std() + 1e-6
        self.tile = (1.0 + 0.4 * ridge + 0.08 * n2).astype(np.float32)
        self.tile /= self.tile.mean()
        self.tau = float(rng.uniform(0.14, 0.26))       # mm per texel
        self.aniso = float(rng.uniform(1.3, 2.4))       # trabeculae run along stress lines ~ the long axis

    def sample(self, s: np.ndarray, t: np.ndarray, off: tuple[float, float]) -> np.ndarray:
        mx = t * np.float32(1.0 / self.tau) + np.float32(off[0])
        my = s * np.float32(1.0 / (self.tau * self.aniso)) + np.float32(off[1])
        return cv2.remap(self.tile, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def _bone_density(b: Bone, s: np.ndarray, t: np.ndarray, tex: _Texture, off: tuple[float, float],
                  px: float) -> tuple[np.ndarray, np.ndarray]:
    """Excess attenuation line integral of an intact bone at local (s, t), and its radius there."""
    L = b.length
    u = np.clip(s / max(L, 1e-6), 0, 1)
    t = t - b.bow * 4.0 * u * (1.0 - u)
    R = radius_profile(b, s)
    # 1 in the diaphysis, 0 at the ends (where cortex thins and cancellous bone fills the bone)
    w = np.clip(np.minimum(s, L - s) / (2.6 * b.r), 0, 1) if b.tubular else np.zeros_like(s)
    ct = b.r * b.cortex * (0.16 + 0.84 * w) + 0.15
    Ri = np.maximum(R - ct, 0)
    k = b.depth
    outer = 2.0 * k * np.sqrt(np.maximum(R * R - t * t, 0))
    inner = 2.0 * k * np.sqrt(np.maximum(Ri * Ri - t * t, 0))
    trab = (0.42 - 0.3 * w) * tex.sample(s, t, off)
    dens = MU_CORTEX * b.density * ((outer - inner) + trab * inner)
    for ph, from_start in ((b.physis0, True), (b.physis1, False)):
        if ph > 0:
            sp = ph if from_start else L - ph
            wp = 0.06 * b.r + 0.35
            wav = 0.12 * R * np.sin(t / max(b.r, 1) * 2.2)
            dist = s - sp - wav
            toward_shaft = 1.0 if from_start else -1.0
            dens = dens * (1.0 - 0.85 * np.exp(-(dist / wp) ** 2))
            dens = dens * (1.0 + 0.45 * np.exp(-((dist - toward_shaft * 1.7 * wp) / (0.5 * wp)) ** 2))
    for sl, tl, rs, rl, depth, rim in b.lesions:
        d = np.sqrt(((s - sl) / rl) ** 2 + ((t - tl) / rs) ** 2)
        disc = 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) * 9.0, 50.0)))
        dens = dens * (1.0 - depth * disc) * (1.0 + rim * np.exp(-((d - 1.0) / 0.12) ** 2))
    for pts, width, depth in b.canals:
        dd = _seg_dist(pts, s, t)
        dens = dens * (1.0 - depth * np.exp(-(dd / max(width, 0.6 * px)) ** 2))
    return dens.astype(np.float32), R


def _render_bone(view: _View, b: Bone, tex: _Texture, rng: np.random.Generator, A_add: np.ndarray,
                 frac: Fracture | None, mask: np.ndarray) -> None:
    ax, ay, _nx, _ny = b.frame()
    px = 1.0 / view.scale
    margin = b.r * max(b.flare0, b.flare1) * 1.2 + abs(b.bow) + 1.0
    pts = [b.p0, b.p1]
    if frac is not None:
        margin += max(math.hypot(*f.shift) + abs(f.angle) * b.length * 0.5 for f in frac.fragments)
    box = view.bbox(pts, margin)
    if box is None:
        return
    s, t = _grid(view, box, b.p0, ax, ay)
    off = (float(rng.uniform(0, TILE)), float(rng.uniform(0, TILE)))
    x0, y0, x1, y1 = box
    if frac is None:
        dens, _ = _bone_density(b, s, t, tex, off, px)
        A_add[y0:y1, x0:x1] = np.maximum(A_add[y0:y1, x0:x1], dens) if b.group >= 0 else \
            A_add[y0:y1, x0:x1] + dens
        return
    total = np.zeros(s.shape, np.float32)
    m = np.zeros(s.shape, bool)
    cover = np.zeros(s.shape, np.float32)
    for f in frac.fragments:
        ca, sa = math.cos(f.angle), math.sin(f.angle)
        ds, dt = s - f.pivot[0] - f.shift[0], t - f.pivot[1] - f.shift[1]
        qs = (f.pivot[0] + ca * ds + sa * dt).astype(np.float32)
        qt = (f.pivot[1] - sa * ds + ca * dt).astype(np.float32)
        sd = f.sd(qs, qt)
        ind = np.clip((sd - 0.5 * frac.gap) / px + 0.5, 0, 1)
        dens, R = _bone_density(b, qs, qt, tex, off, px)
        u = np.clip(qs / max(b.length, 1e-6), 0, 1)
        qtc = qt - b.bow * 4.0 * u * (1 - u)
        for pts_c, width, depth in frac.cracks:
            dd = _seg_dist(pts_c, qs, qtc)
            dens = dens * (1.0 - depth * np.exp(-(dd / width) ** 2))
            inside = (np.abs(qtc) < R + px) & (R > 0)
            if depth > 0:
                m |= inside & (dd < max(width * 1.2, frac.band))
        if frac.kind == "impacted" and total.any():
            # impacted trabeculae are compressed, not a full second bone: max plus part of the overlap
            dens = dens * ind
            total = np.maximum(total, dens) + 0.45 * np.minimum(total, dens)
        else:
            total += dens * ind
        inside = (np.abs(qtc) < R + 1.5 * px) & (R > 0)
        cover += (inside & (ind > 0.5)).astype(np.float32)
        if sd.max() < 1e5:
            m |= inside & (sd > -px) & (sd < 0.5 * frac.gap + frac.band)
    if frac.kind == "impacted":
        m |= cover > 1.5
    A_add[y0:y1, x0:x1] = np.maximum(A_add[y0:y1, x0:x1], total) if b.group >= 0 else A_add[y0:y1, x0:x1] + total
    mask[y0:y1, x0:x1] |= m


def _render_soft(view: _View, scene: Scene, A: np.ndarray) -> np.ndarray:
    soft = np.zeros_like(A)
    for st in scene.soft:
        L = math.hypot(st.p1[0] - st.p0[0], st.p1[1] - st.p0[1])
        ax, ay = (st.p1[0] - st.p0[0]) / L, (st.p1[1] - st.p0[1]) / L
        box = view.bbox([st.p0, st.p1], max(st.r0, st.r1) + 2)
        if box is None:
            continue
        s, t = _grid(view, box, st.p0, ax, ay)
        sc = np.clip(s, 0, L)
        R = st.r0 + (st.r1 - st.r0) * sc / L
        te = np.sqrt(t * t + (s - sc) ** 2)
        outer = 2 * 0.85 * np.sqrt(np.maximum(R * R - te * te, 0))
        Ri = np.maximum(R - st.fat, 0)
        inner = 2 * 0.85 * np.sqrt(np.maximum(Ri * Ri - te * te, 0))
        val = MU_SOFT * inner + MU_FAT * (outer - inner)
        x0, y0, x1, y1 = box
        soft[y0:y1, x0:x1] = np.maximum(soft[y0:y1, x0:x1], val)
    return soft


def _cast(view: _View, scene: Scene, rng: np.random.Generator, site: tuple[float, float], A: np.ndarray) -> str:
    """Plaster or fibreglass cast around the limb, or a slab splint along one side."""
    st = min(scene.soft, key=lambda q: abs(0.5 * (q.p0[1] + q.p1[1]) - site[1]))
    kind = str(rng.choice(["plaster", "fibreglass", "splint"]))
    y0 = site[1] - rng.uniform(40, 160)
    y1 = site[1] + rng.uniform(40, 160)
    r = 0.5 * (st.r0 + st.r1) + 3
    thick = rng.uniform(4, 9) if kind != "fibreglass" else rng.uniform(3, 6)
    mu = 0.03 if kind == "plaster" else 0.022
    box = view.bbox([(site[0], y0), (site[0], y1)], r + thick + 4)
    if box is None:
        return kind
    s, t = _grid(view, box, (0.0, y0), 0.0, 1.0)
    t = -t  # x across
    inlen = np.clip(np.minimum(s, (y1 - y0) - s) / 4.0, 0, 1)
    tc = t - site[0] * 0 - 0.0
    R1, R0 = r + thick, r
    if kind == "splint":
        side = rng.choice([-1, 1])
        val = ((side * tc > R0) & (side * tc < R1)).astype(np.float32) * 0.8 * 2 * r * mu
        val = cv2.GaussianBlur(val, (0, 0), 0.7)
    else:
        o = 2 * np.sqrt(np.maximum(R1 * R1 - tc * tc, 0))
        i = 2 * np.sqrt(np.maximum(R0 * R0 - tc * tc, 0))
        val = (o - i) * mu
    if kind == "fibreglass":
        p = rng.uniform(1.5, 3.0)
        val = val * (1 + 0.12 * np.sin(2 * np.pi * (s + tc) / p) * np.sin(2 * np.pi * (s - tc) / p))
    else:
        n = cv2.resize(rng.standard_normal((8, 8)).astype(np.float32), (val.shape[1], val.shape[0]))
        val = val * (1 + 0.08 * n)
    x0, yy0, x1, yy1 = box
    A[yy0:yy1, x0:x1] += (val * inlen).astype(np.float32)
    return kind


def _hardware(view: _View, scene: Scene, rng: np.random.Generator, avoid: tuple[int, float],
              layer: np.ndarray) -> str:
    """Plate and screws, intramedullary nail or K-wires on a bone, kept clear of the site."""
    tub = [i for i, b in enumerate(scene.bones) if b.tubular and b.length > 25]
    bi = int(rng.choice(tub))
    b = scene.bones[bi]
    kind = str(rng.choice(["plate", "nail", "wires"], p=[0.5, 0.2, 0.3]))
    sc = view.scale
    lo, hi = 0.1 * b.length, 0.9 * b.length
    if bi == avoid[0]:
        kind = "plate" if kind == "nail" else kind
        # the segment of bone farther from the site
        if avoid[1] > 0.5 * b.length:
            hi = max(avoid[1] - 3 * b.r, lo + 5)
        else:
            lo = min(avoid[1] + 3 * b.r, hi - 5)

    def poly(pts: list[tuple[float, float]], val: int) -> None:
        arr = np.array([view.to_px(*b.point(s_, t_)) for s_, t_ in pts], dtype=np.float32)
        cv2.fillPoly(layer, [np.round(arr * 4).astype(np.int32)], val, cv2.LINE_AA, shift=2)

    if kind == "plate":
        side = float(rng.choice([-1, 1]))
        pw = rng.uniform(0.3, 0.7) * b.r
        r0 = b.r
        span = min(float(rng.uniform(40, 150)), hi - lo)
        lo = lo + float(rng.random()) * max(hi - lo - span, 0.0)
        hi = lo + span
        poly([(lo, side * r0), (hi, side * r0), (hi, side * (r0 + pw)), (lo, side * (r0 + pw))], 200)
        n = max(2, int(span / rng.uniform(10, 16)))
        sw = min(max(0.18 * b.r, 1.0), 2.2)
        for j in range(n):
            if rng.random() < 0.25 and 0 < j < n - 1:
                continue  # empty hole
            sj = lo + (j + 0.5) * span / n
            tip = -side * r0 * rng.uniform(1.0, 1.25)
            poly([(sj - sw, side * (r0 + pw)), (sj + sw, side * (r0 + pw)), (sj + sw, tip),
                  (sj - 0.3 * sw, tip - side * 0.8 * sw), (sj - sw, tip)], 255)
    elif kind == "nail":
        nw = 0.45 * b.r
        poly([(lo, -nw), (hi, -nw), (hi, nw), (lo, nw)], 230)
        for sj in (lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)):
            poly([(sj - 1.5, -1.3 * b.r), (sj + 1.5, -1.3 * b.r), (sj + 1.5, 1.3 * b.r), (sj - 1.5, 1.3 * b.r)], 255)
    else:
        for _ in range(int(rng.integers(1, 4))):
            sj = rng.uniform(lo, hi)
            a = math.radians(rng.uniform(20, 70)) * rng.choice([-1, 1])
            ln = 3.0 * b.r
            p = b.point(sj, 0)
            ax, ay, nx, ny = b.frame()
            dx, dy = math.sin(a) * ax + math.cos(a) * nx, math.sin(a) * ay + math.cos(a) * ny
            q0 = view.to_px(p[0] - dx * ln * 0.5, p[1] - dy * ln * 0.5)
            q1 = view.to_px(p[0] + dx * ln * 0.5, p[1] + dy * ln * 0.5)
            cv2.line(layer, (int(q0[0]), int(q0[1])), (int(q1[0]), int(q1[1])), 255,
                     max(1, int(round(1.6 * sc))), cv2.LINE_AA)
    return kind


def _sample_layout(rng: np.random.Generator, long_side: int | None) -> tuple[int, int]:
    ls = int(long_side) if long_side else int(rng.integers(700, 1401))
    short = int(round(ls * rng.uniform(0.72, 0.92)))
    return ls, short


def render(seed: int, index: int, fracture: bool | None = None, fracture_type: str | None = None,
           long_side: int | None = None) -> dict:
    """One synthetic radiograph with its fracture mask. Deterministic in ``(seed, index)``."""
    if fracture_type is not None:
        if fracture_type not in FRACTURE_TYPES:
            raise ValueError(f"unknown fracture type {fracture_type!r}; expected one of {', '.join(FRACTURE_TYPES)}")
        if fracture is False:
            raise ValueError("fracture_type given for an intact image")
        fracture = True
    rng = np.random.default_rng([seed, index])
    if fracture is None:
        fracture = bool(rng.random() < 0.5)
    for _attempt in range(8):
        out = _render_once(rng, bool(fracture), fracture_type, long_side)
        if out is not None:
            return out
    raise RuntimeError(f"could not place a visible fracture for seed={seed} index={index}")


def _render_once(rng: np.random.Generator, fracture: bool, ftype: str | None, long_side: int | None) -> dict | None:
    kind = ftype or (str(rng.choice(FRACTURE_TYPES)) if fracture else None)
    site_kind = kind or str(rng.choice(FRACTURE_TYPES))
    child = True if site_kind == "greenstick" else bool(rng.random() < 0.3)
    region = str(rng.choice(REGIONS, p=[0.2, 0.2, 0.12, 0.12, 0.2, 0.16]))
    proj = str(rng.choice(["AP", "lateral", "oblique"], p=[0.45, 0.35, 0.2]))
    phi = {"AP": rng.normal(0, 6), "lateral": rng.normal(90, 8), "oblique": rng.uniform(30, 60)}[proj]
    phi = math.radians(float(phi))
    laterality = str(rng.choice(["L", "R"]))
    scene = build_scene(rng, region, child, phi, proj)
    if laterality == "L":  # mirror across the limb axis
        for b in scene.bones:
            b.p0, b.p1 = (-b.p0[0], b.p0[1]), (-b.p1[0], b.p1[1])
        for st in scene.soft:
            st.p0, st.p1 = (-st.p0[0], st.p0[1]), (-st.p1[0], st.p1[1])
        scene.joints = [(a, r, (-c[0], c[1])) for a, r, c in scene.joints]
    variants = add_normal_variants(rng, scene)
    bi, s0 = choose_site(rng, scene, site_kind)
    site_bone = scene.bones[bi]

    ls, short = _sample_layout(rng, long_side)
    ext = scene.extent
    full = max(ext[2] - ext[0], ext[3] - ext[1])
    fov = float(math.exp(rng.uniform(math.log(40.0), math.log(min(full * 0.85, 460.0)))))
    fov = max(fov, 7.0 * site_bone.r)
    if rng.random() < 0.6:
        theta = math.radians(rng.normal(0, 10)) + (math.pi if rng.random() < 0.08 else 0.0)
    else:
        theta = float(rng.uniform(0, 2 * math.pi))
    vertical = abs(math.cos(theta)) > 0.7
    w, h = (short, ls) if (vertical ^ (rng.random() < 0.2)) else (ls, short)
    scale = ls / fov
    px = 1.0 / scale

    frac = None
    if kind is not None:
        frac = make_fracture(rng, scene, kind, bi, s0, px)
        if frac.dislocation is not None:
            apply_dislocation(scene, *frac.dislocation)
    elif site_kind == "pathological":
        # the same lesion without a fracture, so a lesion alone never predicts the label
        rs = float(site_bone.radius_at(s0) * rng.uniform(0.55, 0.9))
        site_bone.lesions.append((s0, float(rng.normal(0, 0.1 * rs)), rs, rs * float(rng.uniform(1.0, 2.2)),
                                  float(rng.uniform(0.5, 0.8)), float(rng.uniform(0.0, 0.4))))
        variants.append("lucent_lesion")
    elif rng.random() < 0.03 and scene.joints:
        # an intact but dislocated joint: malalignment alone is not a fracture
        seg, ray, c = scene.joints[int(rng.integers(len(scene.joints)))]
        apply_dislocation(scene, seg, ray, (float(rng.normal(0, 6)), float(rng.normal(0, 4))),
                          math.radians(rng.normal(0, 15)), c)
        variants.append("dislocation_no_fracture")
    sp = site_bone.point(s0, 0.0)
    short_mm = min(w, h) / scale
    vc = (sp[0] + rng.uniform(-0.3, 0.3) * short_mm, sp[1] + rng.uniform(-0.3, 0.3) * short_mm)
    view = _View(vc, theta, scale, w, h)

    A = np.zeros((h, w), np.float32)
    soft = _render_soft(view, scene, A)
    A += soft
    tex = _Texture(rng)
    bones_A = np.zeros_like(A)
    groups: dict[int, np.ndarray] = {}
    mask = np.zeros((h, w), bool)
    for i, b in enumerate(scene.bones):
        target = bones_A if b.group < 0 else groups.setdefault(b.group, np.zeros_like(A))
        _render_bone(view, b, tex, rng, target, frac if (frac is not None and i == bi) else None, mask)
    for g in groups.values():
        bones_A += g
    A += bones_A

    extras: list[str] = list(variants)
    if rng.random() < 0.15:
        extras.append("cast:" + _cast(view, scene, rng, sp, A))
    metal = np.zeros((h, w), np.uint8)
    if rng.random() < 0.12:
        extras.append("hardware:" + _hardware(view, scene, rng, (bi, s0), metal))
    # skin fold / clothing edge: a long soft-tissue step with a thin line, crossing bone freely
    if rng.random() < 0.3:
        extras.append("skin_fold")
        ang = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        xs = np.arange(w, dtype=np.float32)[None, :]
        ys = np.arange(h, dtype=np.float32)[:, None]
        curv = rng.uniform(-1, 1) / max(w, h)
        along = (xs - cx) * math.cos(ang) + (ys - cy) * math.sin(ang)
        dl = -(xs - cx) * math.sin(ang) + (ys - cy) * math.cos(ang) + curv * along * along
        amp = rng.uniform(0.04, 0.12) * float(soft.max() + 1e-3) * 0.15
        step = 1 / (1 + np.exp(np.clip(-dl / (1.5 + 2 * rng.random()), -50, 50)))
        fold = amp * step + 1.5 * amp * np.exp(-(dl / 1.2) ** 2)
        A += (fold * np.clip(soft / (soft.max() + 1e-6) * 6, 0, 1)).astype(np.float32)
    if not child and rng.random() < 0.12:
        # arterial calcification: thin patchy parallel lines in the soft tissue
        extras.append("vascular_calcification")
        calc = np.zeros((h, w), np.uint8)
        x_off = rng.uniform(-0.6, 0.6) * min(q.r0 for q in scene.soft)
        ys_mm = np.linspace(scene.extent[1], scene.extent[3], 60)
        xs_mm = x_off + np.cumsum(rng.normal(0, 0.8, 60))
        lw = max(1, int(round(0.5 * scale)))
        for off in (-1.6, 1.6):
            pts = np.array([view.to_px(x + off, y) for x, y in zip(xs_mm, ys_mm, strict=True)], np.float32)
            for j in range(len(pts) - 1):
                if rng.random() < 0.55:
                    cv2.line(calc, tuple(np.round(pts[j]).astype(int)), tuple(np.round(pts[j + 1]).astype(int)),
                             255, lw, cv2.LINE_AA)
        A += calc.astype(np.float32) / 255 * 0.08
    # lead side marker inside the field
    if rng.random() < 0.5:
        extras.append("marker")
        size = min(12.0 * scale, 0.08 * min(w, h))
        # radiographers keep the marker off the region of interest: pick a spot well away from the site
        spx, spy = view.to_px(*sp)
        spots = [(float(rng.uniform(0.05, 0.8) * w), float(rng.uniform(0.12, 0.95) * h)) for _ in range(6)]
        far = [q for q in spots if math.hypot(q[0] - spx, q[1] - spy) > 0.35 * min(w, h)]
        mx, my = far[0] if far else max(spots, key=lambda q: math.hypot(q[0] - spx, q[1] - spy))
        fs = max(size / 22.0, 0.3)
        th = max(1, int(fs * 2.5))
        cv2.putText(metal, laterality if rng.random() < 0.8 else proj[:3].upper(), (int(mx), int(my)),
                    cv2.FONT_HERSHEY_SIMPLEX, fs, 255, th, cv2.LINE_AA)
    A += metal.astype(np.float32) / 255 * MU_METAL * rng.uniform(3, 6)

    img, field = _acquire(rng, A, metal)
    mask &= field
    if fracture and mask.sum() < 3:
        return None
    # burned-in annotation text, after processing
    bits = 16 if rng.random() < 0.4 else 8
    if rng.random() < 0.6:
        extras.append("text")
        for _ in range(int(rng.integers(1, 4))):
            txt = str(rng.choice(["AP", "LAT", "OBL", "PA", laterality, "WB", "SUPINE", "PORTABLE", "POST CAST"]))
            if rng.random() < 0.5:
                txt += f" {int(rng.integers(1, 99)):02d}"
            fs = max(min(w, h) / 900.0, 0.3) * rng.uniform(0.7, 1.4)
            corner_x = rng.choice([0.03, 0.7]) * w
            corner_y = rng.choice([0.06, 0.95]) * h
            layer = np.zeros((h, w), np.uint8)
            cv2.putText(layer, txt, (int(corner_x), int(corner_y)), cv2.FONT_HERSHEY_SIMPLEX, fs,
                        255, max(1, int(fs * 2)), cv2.LINE_AA)
            img = np.maximum(img, layer.astype(np.float32) * float(rng.uniform(0.75, 1.0) / 255))
    img = np.clip(img, 0, 1)
    image = (img * 65535 + 0.5).astype(np.uint16) if bits == 16 else (img * 255 + 0.5).astype(np.uint8)
    mask_u8 = mask.astype(np.uint8) * 255
    box = None
    if mask.any():
        ys_, xs_ = np.nonzero(mask)
        box = (int(xs_.min()), int(ys_.min()), int(xs_.max()) + 1, int(ys_.max()) + 1)
    return {"image": image, "mask": mask_u8, "box": box, "fracture": bool(fracture), "type": kind,
            "region": region, "child": child, "bits": bits, "laterality": laterality, "projection": proj,
            "bone": site_bone.name, "extras": extras, "px_per_mm": scale}


def _acquire(rng: np.random.Generator, A: np.ndarray, metal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detector physics and display processing; returns the [0,1] image and the exposed-field mask."""
    h, w = A.shape
    n0 = float(math.exp(rng.uniform(math.log(700), math.log(9000))))
    # heel effect: the anode side of the field gets less exposure
    ha = rng.uniform(0, 2 * math.pi)
    hs = rng.uniform(0.0, 0.25)
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    heel = 1.0 + hs * 0.5 * (xs * math.cos(ha) + ys * math.sin(ha))
    primary = cv2.exp(-A) * heel * np.float32(n0)
    sf = rng.uniform(0.05, 0.6)
    small = cv2.resize(primary, (max(w // 8, 1), max(h // 8, 1)), interpolation=cv2.INTER_AREA)
    scatter = cv2.resize(cv2.GaussianBlur(small, (0, 0), rng.uniform(3, 10)), (w, h))
    sig = primary + sf * scatter
    # collimation: a (slightly rotated) rectangle; outside it only a little scatter arrives
    field = np.ones((h, w), bool)
    coll = rng.random()
    if coll < 0.75:
        fm = np.zeros((h, w), np.uint8)
        cx, cy = w / 2 + rng.normal(0, 0.05 * w), h / 2 + rng.normal(0, 0.05 * h)
        hw_, hh_ = w * rng.uniform(0.42, 0.6), h * rng.uniform(0.42, 0.6)
        rect = ((cx, cy), (2 * hw_, 2 * hh_), float(rng.normal(0, 3)))
        cv2.fillPoly(fm, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
        field = fm.astype(bool)
        edge = cv2.GaussianBlur(fm.astype(np.float32), (0, 0), rng.uniform(0.8, 3))
        sig = sig * (0.03 + 0.97 * edge)
    sig = cv2.GaussianBlur(sig, (0, 0), rng.uniform(0.35, 1.1))
    noise = rng.standard_normal((h, w), dtype=np.float32)
    sig = sig + np.sqrt(np.maximum(sig, 1.0)) * noise * rng.uniform(0.7, 1.3)
    sig = cv2.GaussianBlur(sig, (0, 0), rng.uniform(0.3, 0.7))
    L = np.float32(math.log(n0 * 1.2)) - cv2.log(np.maximum(sig, np.float32(0.5)))
    sample = L[::4, ::4][field[::4, ::4] & (metal[::4, ::4] == 0)]
    if sample.size < 10:
        sample = L[::4, ::4].ravel()
    lo = float(np.percentile(sample, rng.uniform(0.5, 5))) - rng.uniform(0.0, 0.15)
    hi = float(np.percentile(sample, rng.uniform(99.0, 99.95))) + rng.uniform(0.0, 0.3)
    x = (L - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-3))
    # tone curve (gamma, optionally an S-shaped film-like curve) applied through a lookup table
    grid = np.linspace(0.0, 1.05, 2049)
    gamma = float(math.exp(rng.normal(0, 0.25)))
    curve = np.power(grid, gamma)
    if rng.random() < 0.6:
        g = rng.uniform(3, 7)
        curve = (1 / (1 + np.exp(-g * (curve - 0.5))) - 1 / (1 + math.exp(g / 2))) / (1 - 2 / (1 + math.exp(g / 2)))
    idx = (np.clip(x, 0, 1.05) * np.float32(2048 / 1.05) + np.float32(0.5)).astype(np.int32)
    x = curve.astype(np.float32)[idx]
    if rng.random() < 0.75:  # unsharp-mask edge enhancement, as CR/DR processing applies
        k = rng.uniform(0.2, 1.2)
        sigma = rng.uniform(3, 20)
        f = 4 if sigma > 8 else 2
        small = cv2.resize(x, (max(w // f, 1), max(h // f, 1)), interpolation=cv2.INTER_AREA)
        low = cv2.resize(cv2.GaussianBlur(small, (0, 0), sigma / f), (w, h), interpolation=cv2.INTER_LINEAR)
        x = x + np.float32(k) * (x - low)
    lift = rng.uniform(0, 0.08)
    x = lift + (1 - lift) * x
    if coll < 0.75 and rng.random() < 0.45:  # digital shutter: black outside the collimated field
        x = np.where(field, x, 0.0)
    return np.clip(x, 0, 1).astype(np.float32), field
