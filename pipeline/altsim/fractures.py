"""The eleven fracture types as rigid fragments and lucent cracks in a bone's local frame.

A bone-local point is ``(s, t)``: ``s`` mm along the bone from its proximal end, ``t`` mm across it. A fracture
splits the bone into fragments, each given by an inside-positive signed distance ``sd(s, t)`` in the unbroken
bone and a rigid motion (rotation about a pivot, then a shift). Projecting every moved fragment and summing
their attenuation gives gaps where fragments part, a dense band where they overlap (impaction, overriding) and
steps in the cortex where they translate. Cracks are thin lucent (or, with negative depth, sclerotic) lines that
do not separate the bone: hairline and longitudinal fractures, the far-side limb of a spiral, a greenstick crack.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.altsim.anatomy import Bone, Scene

SD = Callable[[np.ndarray, np.ndarray], np.ndarray]
INF_SD: SD = lambda s, t: np.full(np.shape(s), 1e6, dtype=np.float32)  # noqa: E731


@dataclass
class Fragment:
    sd: SD
    angle: float = 0.0                   # radians, about pivot
    pivot: tuple[float, float] = (0.0, 0.0)
    shift: tuple[float, float] = (0.0, 0.0)


@dataclass
class Fracture:
    kind: str
    bone: int
    site: tuple[float, float]
    fragments: list[Fragment]
    cracks: list[tuple[np.ndarray, float, float]] = field(default_factory=list)
    gap: float = 0.0                     # mm of bone removed along each fragment surface (total)
    band: float = 1.0                    # half-width of the labelled zone around fracture surfaces, mm
    dislocation: tuple[int, int, tuple[float, float], float, tuple[float, float]] | None = None


def _line(s0: float, ang: float, jag: float = 0.0, phase: float = 0.0, freq: float = 1.0) -> SD:
    """Signed distance to a (slightly jagged) straight line through (s0, 0) at ``ang`` rad from perpendicular;
    positive distal."""
    ca, ta = math.cos(ang), math.tan(ang)

    def f(s: np.ndarray, t: np.ndarray) -> np.ndarray:
        g = s0 + ta * t
        if jag:
            g = g + jag * np.sin(freq * t + phase) + 0.5 * jag * np.sin(2.7 * freq * t + 2 * phase)
        return ((s - g) * ca).astype(np.float32)

    return f


def _neg(f: SD) -> SD:
    return lambda s, t: -f(s, t)


def _fold(op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., SD]:
    """Intersection (``np.minimum``) or union (``np.maximum``) of signed-distance regions."""
    def combine(*fs: SD) -> SD:
        def f(s: np.ndarray, t: np.ndarray) -> np.ndarray:
            out = fs[0](s, t)
            for g in fs[1:]:
                out = op(out, g(s, t))
            return out

        return f

    return combine


_and = _fold(np.minimum)
_or = _fold(np.maximum)


def _halfplane(p: tuple[float, float], q: tuple[float, float]) -> SD:
    """Positive on the left of the directed line p->q (in s,t)."""
    ds, dt = q[0] - p[0], q[1] - p[1]
    n = math.hypot(ds, dt) or 1.0

    def f(s: np.ndarray, t: np.ndarray) -> np.ndarray:
        return ((ds * (t - p[1]) - dt * (s - p[0])) / n).astype(np.float32)

    return f


def _displace(rng: np.random.Generator, R: float, big: bool) -> tuple[float, tuple[float, float]]:
    """Angulation (rad) and (axial, lateral) shift of a distal fragment."""
    if not big:
        return math.radians(rng.normal(0, 1.5)), (float(rng.uniform(-0.3, 0.6)), float(rng.normal(0, 0.25 * R)))
    ang = math.radians(rng.normal(0, 12))
    lat = float(rng.choice([-1, 1]) * rng.uniform(0.2, 1.2) * 2 * R)
    ax = float(rng.uniform(-0.8, 0.4) * 2 * R) if abs(lat) > 1.6 * R else float(rng.uniform(0, 0.4) * R)
    return ang, (ax, lat)


def choose_site(rng: np.random.Generator, scene: Scene, kind: str) -> tuple[int, float]:
    """A bone and a position along it suited to ``kind``; also used, with a random kind, for intact films so
    that framing never depends on the label."""
    tub = [i for i, b in enumerate(scene.bones) if b.tubular]
    if kind == "fracture_dislocation":
        cands = []
        for i in tub:
            b = scene.bones[i]
            for seg, ray, _c in scene.joints:
                if b.seg == seg and (ray in (-1, b.ray)) and b.length > 15:
                    cands.append(i)
        tub = cands or tub
    w = np.array([scene.bones[i].length * scene.bones[i].r ** 0.5 for i in tub], dtype=float)
    i = tub[int(rng.choice(len(tub), p=w / w.sum()))]
    L = scene.bones[i].length
    if kind in ("impacted",):
        u = rng.choice([rng.uniform(0.07, 0.16), rng.uniform(0.84, 0.93)])
    elif kind == "avulsion":
        u = rng.choice([rng.uniform(0.04, 0.12), rng.uniform(0.88, 0.96)])
    elif kind == "fracture_dislocation":
        u = rng.uniform(0.8, 0.9)
    else:
        u = rng.uniform(0.2, 0.8)
    return i, float(u * L)


def make_fracture(rng: np.random.Generator, scene: Scene, kind: str, bi: int, s0: float,
                  mm_per_px: float) -> Fracture:
    """Fragments, cracks and labelled band for a fracture of ``kind`` at ``s0`` mm along bone ``bi``."""
    b: Bone = scene.bones[bi]
    R = b.radius_at(s0)
    R = max(R, 0.5 * b.r)
    px = mm_per_px
    gap = float(max(rng.uniform(0.8, 3.0) * px, 0.15))
    band = float(max(2.0 * px, 0.35))
    side = float(rng.choice([-1.0, 1.0]))
    frags: list[Fragment]
    cracks: list[tuple[np.ndarray, float, float]] = []
    dislocation = None
    jag = float(rng.uniform(0, 0.12) * R)
    ph = float(rng.uniform(0, 6.3))
    fq = float(rng.uniform(0.6, 2.0) / max(R, 1.0))

    def two(f: SD, big: bool | None = None) -> list[Fragment]:
        big = bool(rng.random() < 0.55) if big is None else big
        ang, sh = _displace(rng, R, big)
        return [Fragment(_neg(f)), Fragment(f, ang, (s0, 0.0), sh)]

    if kind == "transverse":
        frags = two(_line(s0, math.radians(rng.uniform(-15, 15)), jag, ph, fq))
    elif kind == "oblique":
        frags = two(_line(s0, side * math.radians(rng.uniform(32, 58)), 0.5 * jag, ph, fq))
    elif kind == "spiral":
        h = float(rng.uniform(2.3, 4.0) * 2 * R)
        kk = float(rng.uniform(1.0, 2.2))

        def spiral(s: np.ndarray, t: np.ndarray, h: float = h, kk: float = kk) -> np.ndarray:
            g = s0 + side * 0.5 * h * np.tanh(kk * t / R) / math.tanh(kk)
            # cosh overflows far from the bone (|t| >> R) where the slope is 0 anyway; clipped, no warning
            slope = side * 0.5 * h * kk / R / math.tanh(kk) / np.cosh(np.clip(kk * t / R, -30.0, 30.0)) ** 2
            return ((s - g) / np.sqrt(1 + slope * slope)).astype(np.float32)

        frags = two(spiral)
        # the far-side limb of the helix: a fainter line running along the shaft between the two tips
        tt = -side * R * rng.uniform(0.3, 0.8)
        cracks.append((np.array([[s0 - 0.45 * h, tt], [s0, tt * 0.9], [s0 + 0.45 * h, tt * 1.05]], np.float32),
                       max(0.8 * px, 0.2), float(rng.uniform(0.25, 0.5))))
    elif kind == "comminuted":
        main = _line(s0, math.radians(rng.uniform(-35, 35)), jag, ph, fq)
        wb = float(rng.uniform(0.8, 1.6) * R)
        apex = (s0 + rng.normal(0, 0.2 * R), -side * R * rng.uniform(0.0, 0.4))
        base_a, base_b = (s0 - wb, side * R * 1.3), (s0 + wb, side * R * 1.3)
        # triangle apex -> base_a -> base_b, inside-positive
        wedge = _and(_halfplane(apex, base_a) if side > 0 else _halfplane(base_a, apex),
                     _halfplane(base_b, apex) if side > 0 else _halfplane(apex, base_b))
        outside = _neg(wedge)
        ang1, sh1 = _displace(rng, R, bool(rng.random() < 0.7))
        frags = [Fragment(_and(_neg(main), outside)), Fragment(_and(main, outside), ang1, (s0, 0.0), sh1)]
        if rng.random() < 0.5:  # butterfly split in two by the main line
            for piece in (_and(wedge, _neg(main)), _and(wedge, main)):
                frags.append(Fragment(piece, math.radians(rng.normal(0, 15)), (s0, side * R * 0.6),
                                      (float(rng.normal(0, 0.3 * R)), side * float(rng.uniform(0.5, 3.0)))))
        else:
            frags.append(Fragment(wedge, math.radians(rng.normal(0, 15)), (s0, side * R * 0.6),
                                  (float(rng.normal(0, 0.3 * R)), side * float(rng.uniform(0.5, 3.0)))))
        if rng.random() < 0.5:  # a further small cortical chip on the opposite cortex
            cs = float(s0 + rng.uniform(-1, 1) * R)
            a_, b_ = (cs - 0.5 * R, -side * 0.55 * R), (cs + 0.5 * R, -side * 0.55 * R)

            def along(s: np.ndarray, t: np.ndarray, cs: float = cs) -> np.ndarray:
                return (0.5 * R - np.abs(s - cs)).astype(np.float32)

            chip = _and(_halfplane(a_, b_) if side < 0 else _halfplane(b_, a_), along, outside)
            frags = [Fragment(_and(f.sd, _neg(chip)), f.angle, f.pivot, f.shift) for f in frags]
            frags.append(Fragment(chip, math.radians(rng.normal(0, 20)), (cs, -side * R),
                                  (float(rng.normal(0, 0.5)), -side * float(rng.uniform(0.5, 2.0)))))
        gap = max(gap, 1.5 * px)
    elif kind == "greenstick":
        ga = math.radians(rng.uniform(-12, 12))
        f = _line(s0, ga)
        alpha = -side * math.radians(rng.uniform(3, 9))
        frags = [Fragment(_neg(f)), Fragment(f, alpha, (s0, -side * R), (0.0, 0.0))]
        t_a, t_b = side * R * 1.05, side * R * (1 - 2 * rng.uniform(0.45, 0.75))
        cracks.append((np.array([[s0 + math.tan(ga) * t_a, t_a], [s0 + math.tan(ga) * t_b, t_b]], np.float32),
                       max(1.0 * px, 0.2), float(rng.uniform(0.4, 0.8))))
        gap = 0.0
    elif kind == "hairline":
        ang = math.radians(rng.uniform(-50, 50))
        frac = rng.uniform(0.55, 1.05)
        t_a, t_b = side * R * 1.05, side * R * (1.05 - 2.1 * frac)
        pts = np.array([[s0, t_a], [s0 + math.tan(ang) * (t_a - t_b) * 0.5 + rng.normal(0, 0.1 * R),
                                    0.5 * (t_a + t_b)], [s0 + math.tan(ang) * (t_a - t_b), t_b]], np.float32)
        width = float(rng.uniform(0.5, 0.9) * px)
        cracks.append((pts, width, float(rng.uniform(0.3, 0.65))))
        if rng.random() < 0.3:  # healing stress fracture: faint sclerotic band around the line
            cracks.append((pts, float(rng.uniform(1.0, 2.5) * max(px, 0.3)), -float(rng.uniform(0.1, 0.25))))
        frags = [Fragment(INF_SD)]
        gap = 0.0
        band = float(max(1.5 * px, 0.25))
    elif kind == "impacted":
        f = _line(s0, math.radians(rng.uniform(-10, 10)), float(rng.uniform(0.02, 0.07) * R), ph, 3 * fq)
        d = float(rng.uniform(0.08, 0.25) * 2 * R)
        end_is_distal = s0 > 0.5 * b.length  # the short end fragment is driven into the shaft
        moving, fixed = (f, _neg(f)) if end_is_distal else (_neg(f), f)
        frags = [Fragment(fixed), Fragment(moving, math.radians(rng.normal(0, 4)), (s0, 0.0),
                                           (-d if end_is_distal else d, float(rng.normal(0, 0.08 * R))))]
        gap = 0.0
        band = band + d
    elif kind == "longitudinal":
        ln = float(min(rng.uniform(2.0, 6.0) * 2 * R, 0.6 * b.length))
        ang = math.radians(rng.uniform(-12, 12))
        t0 = float(rng.uniform(-0.5, 0.5) * R)
        pts = np.array([[s0 - 0.5 * ln, t0 - 0.5 * ln * math.tan(ang)],
                        [s0 + rng.normal(0, 0.05 * ln), t0 + rng.normal(0, 0.05 * R)],
                        [s0 + 0.5 * ln, t0 + 0.5 * ln * math.tan(ang)]], np.float32)
        cracks.append((pts, float(max(rng.uniform(0.7, 2.0) * px, 0.2)), float(rng.uniform(0.45, 0.9))))
        frags = [Fragment(INF_SD)]
        gap = 0.0
    elif kind == "avulsion":
        end = 0.0 if s0 < 0.5 * b.length else b.length
        sa = s0
        Ra = b.radius_at(sa)
        dd = float(min(rng.uniform(0.1, 0.25) * Ra, 4.0))
        ll = float(min(rng.uniform(0.35, 0.8) * Ra, 9.0))

        def chip(s: np.ndarray, t: np.ndarray) -> np.ndarray:
            # a lens-shaped flake of cortex: an ellipse centred on the bone surface, clipped by the bone outline
            e = np.sqrt(((s - sa) / (0.5 * ll)) ** 2 + ((t - side * Ra) / dd) ** 2)
            return ((1.0 - e) * min(0.5 * ll, dd)).astype(np.float32)

        away = 1.0 if end > sa else -1.0
        frags = [Fragment(_neg(chip)), Fragment(chip, math.radians(rng.uniform(5, 35)) * rng.choice([-1, 1]),
                                                (sa, side * Ra), (away * float(rng.uniform(0.3, 2.5)),
                                                                  side * float(rng.uniform(0.8, 3.5))))]
        gap = max(gap, 1.0 * px)
        band = max(band, 0.5)
    elif kind == "pathological":
        rs = float(R * rng.uniform(0.55, 0.9))
        b.lesions.append((s0, float(rng.normal(0, 0.1 * R)), rs, rs * float(rng.uniform(1.0, 2.2)),
                          float(rng.uniform(0.5, 0.8)), float(rng.uniform(0.0, 0.4))))
        frags = two(_line(s0, math.radians(rng.uniform(-25, 25)), 0.5 * jag, ph, fq), big=bool(rng.random() < 0.35))
    elif kind == "fracture_dislocation":
        frags = two(_line(s0, side * math.radians(rng.uniform(0, 45)), jag, ph, fq), big=bool(rng.random() < 0.5))
        jr = b.radius_at(b.length * 0.97)
        lat = float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.4) * 2 * jr)
        ax = float(rng.uniform(-0.6, 0.5) * 2 * jr)
        ax_, ay_, nx_, ny_ = b.frame()
        shift = (lat * nx_ + ax * ax_, lat * ny_ + ax * ay_)
        centre = b.point(b.length, 0.0)
        dislocation = (b.seg, b.ray, shift, math.radians(rng.normal(0, 18)), centre)
    else:
        raise ValueError(f"unknown fracture type {kind!r}")
    return Fracture(kind, bi, (s0, 0.0), frags, cracks, gap, band, dislocation)


def apply_dislocation(scene: Scene, seg: int, ray: int, shift: tuple[float, float], angle: float,
                      centre: tuple[float, float]) -> None:
    """Move every bone beyond the joint after ``seg`` (same digit ray, if any) out of alignment."""
    c, s = math.cos(angle), math.sin(angle)
    for b in scene.bones:
        if b.seg > seg and (ray == -1 or b.ray == ray):
            def mv(p: tuple[float, float]) -> tuple[float, float]:
                x, y = p[0] - centre[0], p[1] - centre[1]
                return (centre[0] + c * x - s * y + shift[0], centre[1] + s * x + c * y + shift[1])
            b.p0, b.p1 = mv(b.p0), mv(b.p1)
