"""Simplified radiological anatomy: bones as projected tubes, soft-tissue envelopes, joints.

Coordinates are millimetres in the *limb frame*: ``y`` runs along the limb from proximal (negative) to distal,
``x`` across it in the image plane. Each bone is built from a 3-D position (``x`` medial/lateral, ``z``
anterior/posterior) and projected for the chosen view angle ``phi`` (0 = AP, 90 = lateral), so paired bones
separate in AP and superimpose in lateral, as they do on real films.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

REGIONS: tuple[str, ...] = ("forearm", "leg", "humerus", "femur", "hand", "foot")


@dataclass
class Bone:
    """A tubular (or, when short, rounded) bone between ``p0`` (proximal) and ``p1`` (distal) in limb mm."""

    name: str
    p0: tuple[float, float]
    p1: tuple[float, float]
    r: float                      # shaft outer radius, mm
    flare0: float = 1.0           # end radius / shaft radius at p0 (metaphyseal flare)
    flare1: float = 1.0
    cortex: float = 0.3           # cortical thickness at mid-shaft, as a fraction of r
    seg: int = 0                  # chain position: a joint lies between seg i and seg i+1
    ray: int = -1                 # digit ray (hand/foot); -1 = whole limb
    group: int = -1               # parts of one bone share a group (combined by max, not summed)
    physis0: float = 0.0          # distance of an open growth plate from the p0 end, mm (0 = closed/none)
    physis1: float = 0.0
    depth: float = 1.0            # depth semi-axis / in-plane semi-axis
    tubular: bool = True          # can take shaft fractures
    density: float = 1.0
    bow: float = 0.0              # lateral bow at mid-shaft, mm
    lesions: list[tuple[float, float, float, float, float, float]] = field(default_factory=list)
    canals: list[tuple[np.ndarray, float, float]] = field(default_factory=list)

    @property
    def length(self) -> float:
        return float(math.hypot(self.p1[0] - self.p0[0], self.p1[1] - self.p0[1]))

    def point(self, s: float, t: float = 0.0) -> tuple[float, float]:
        """Limb-frame position of bone-local (s along, t across)."""
        ax, ay, nx, ny = self.frame()
        return (self.p0[0] + s * ax + t * nx, self.p0[1] + s * ay + t * ny)

    def frame(self) -> tuple[float, float, float, float]:
        L = max(self.length, 1e-6)
        ax, ay = (self.p1[0] - self.p0[0]) / L, (self.p1[1] - self.p0[1]) / L
        return ax, ay, -ay, ax

    def radius_at(self, s: float) -> float:
        return float(radius_profile(self, np.array([s], dtype=np.float32))[0])


def radius_profile(b: Bone, s: np.ndarray) -> np.ndarray:
    """Outer radius along the bone: shaft, metaphyseal flare, rounded articular ends."""
    L = b.length
    fl = min(2.8 * b.r, 0.3 * L) if b.tubular else 0.5 * L
    e0 = np.clip(1.0 - s / fl, 0.0, 1.0)
    e1 = np.clip(1.0 - (L - s) / fl, 0.0, 1.0)
    R = b.r * (1.0 + (b.flare0 - 1.0) * e0 * e0 + (b.flare1 - 1.0) * e1 * e1)
    c0 = max(0.55 * b.r * b.flare0, 0.5)
    c1 = max(0.55 * b.r * b.flare1, 0.5)
    c0, c1 = min(c0, 0.5 * L), min(c1, 0.5 * L)
    k0 = np.clip((c0 - s) / c0, 0.0, 1.0)
    k1 = np.clip((c1 - (L - s)) / c1, 0.0, 1.0)
    R = R * np.sqrt(np.clip(1.0 - k0 * k0, 0.0, 1.0)) * np.sqrt(np.clip(1.0 - k1 * k1, 0.0, 1.0))
    R = np.where((s < 0) | (s > L), 0.0, R)
    return R.astype(np.float32)


@dataclass
class SoftTissue:
    p0: tuple[float, float]
    p1: tuple[float, float]
    r0: float
    r1: float
    fat: float = 4.0  # subcutaneous fat thickness, mm


@dataclass
class Scene:
    region: str
    bones: list[Bone]
    soft: list[SoftTissue]
    joints: list[tuple[int, int, tuple[float, float]]]  # (seg before, ray, centre)
    extent: tuple[float, float, float, float]  # limb-frame bbox of the anatomy, mm
    child: bool
    projection: str


def _proj(phi: float):
    c, s = math.cos(phi), math.sin(phi)
    return lambda x, z: x * c + z * s


def _flat(flare: float, phi: float, rho: float) -> float:
    """Projected flare of an end that is wide in AP and narrow (ratio rho) in lateral."""
    return 1.0 + (flare - 1.0) * math.sqrt(math.cos(phi) ** 2 + (rho * math.sin(phi)) ** 2)


def _physis(child: bool, k: float, frac: float) -> float:
    return frac * k if child else 0.0


def _rays(rng: np.random.Generator, k: float, child: bool, phi: float, y0: float, foot: bool,
          seg0: int, bones: list[Bone], soft: list[SoftTissue], joints: list) -> None:
    """Metacarpals/metatarsals and phalanges fanning from ``y0``."""
    P = _proj(phi)
    spread = 1.0 - 0.55 * abs(math.sin(phi))  # rays superimpose on a lateral view
    if foot:
        meta = [62, 72, 66, 63, 60]
        phal = [[30, 0, 22], [30, 16, 12], [26, 13, 10], [22, 11, 9], [20, 9, 8]]
        xs = [-32, -12, 2, 15, 28]
        ang = [-4, -2, 2, 6, 11]
        rad = [6.5, 4.2, 4.0, 3.9, 4.0]
    else:
        meta = [44, 66, 63, 57, 53]
        phal = [[32, 0, 24], [42, 25, 19], [46, 29, 20], [43, 27, 19], [34, 19, 17]]
        xs = [-30, -13, 0, 12, 23]
        ang = [-38, -8, 0, 7, 15]
        rad = [5.0, 4.2, 4.3, 3.9, 3.6]
    jitter = rng.normal(0, 3.0, 5)
    for i in range(5):
        a = math.radians((ang[i] + jitter[i]) * spread)
        dx, dy = math.sin(a), math.cos(a)
        x = P(xs[i] * k * spread, 0.0)
        y = y0 + (abs(xs[i]) * 0.15 if not foot else 0.0) * k
        lengths = [meta[i]] + [v for v in phal[i] if v > 0]
        thumb_base = i == 0 and not foot
        for j, nominal in enumerate(lengths):
            ln = nominal * k
            r = rad[i] * k * (1.0 if j == 0 else (0.85 if j == 1 else 0.7))
            p0 = (x, y)
            p1 = (x + dx * ln, y + dy * ln)
            last = j == len(lengths) - 1
            ph0 = ph1 = 0.0
            if child:
                if j == 0 and (thumb_base or (foot and i == 0)):
                    ph0 = 0.16 * ln
                elif j == 0:
                    ph1 = 0.14 * ln
                else:
                    ph0 = 0.16 * ln
            bones.append(Bone(f"{'mt' if foot else 'mc'}{i + 1}" if j == 0 else f"ph{i + 1}{j}", p0, p1, r,
                              flare0=1.5 if j == 0 else 1.45, flare1=(1.45 if not last else 1.15),
                              cortex=0.34, seg=seg0 + j, ray=i, physis0=ph0, physis1=ph1, bow=0.3 * r))
            if not last:
                joints.append((seg0 + j, i, p1))
            gap = (1.6 + 0.4 * rng.random()) * k
            x, y = p1[0] + dx * gap, p1[1] + dy * gap
        soft.append(SoftTissue((bones[-len(lengths)].p0[0], bones[-len(lengths)].p0[1] + 0.4 * meta[i] * k),
                               (x + dx * 4 * k, y + dy * 4 * k), 9.0 * k * (1.2 if i == 0 else 1.0), 7.0 * k,
                               fat=2.0 * k))


def build_scene(rng: np.random.Generator, region: str, child: bool, phi: float, projection: str) -> Scene:
    """One limb region in limb-frame millimetres. Adults ~1.0 scale; children 0.5-0.85 with open physes."""
    k = float(rng.uniform(0.52, 0.85)) if child else float(rng.uniform(0.88, 1.1))
    P = _proj(phi)
    bones: list[Bone] = []
    soft: list[SoftTissue] = []
    joints: list[tuple[int, int, tuple[float, float]]] = []
    sep = abs(math.cos(phi))

    def carpals(y0: float, seg: int, n_rows: int = 2, size: float = 7.5, width: float = 44.0, foot: bool = False):
        for row in range(n_rows):
            n = 4 if not foot else 3 + row
            for j in range(n):
                fx = (j - (n - 1) / 2) / max(n - 1, 1)
                x = P(fx * width * k * (0.6 + 0.4 * sep) + rng.normal(0, 2.0) * k, rng.normal(0, 4) * k)
                y = y0 + (row * 1.75 * size + rng.normal(0, 1.2) + 2.0 * abs(fx) * (1 - 2 * row)) * k
                rr = size * k * rng.uniform(0.75, 1.2)
                if child and rng.random() < 0.35:
                    continue  # not yet ossified
                a = rng.normal(0, 0.5)
                hl = rr * rng.uniform(0.5, 1.0)
                bones.append(Bone(f"carpal{row}{j}", (x - hl * math.sin(a), y - hl * math.cos(a)),
                                  (x + hl * math.sin(a), y + hl * math.cos(a)), rr * rng.uniform(0.75, 0.95),
                                  flare0=rng.uniform(1.0, 1.3), flare1=rng.uniform(1.0, 1.3), cortex=0.18, seg=seg,
                                  tubular=False, depth=rng.uniform(0.7, 1.0)))

    if region == "forearm":
        fh = _flat(2.6, phi, 0.5)
        bones.append(Bone("humerus", (P(0, 0), -300 * k), (P(0, 0), -4 * k), 11 * k, 1.3, fh, 0.32, seg=0,
                          physis1=_physis(child, k, 14), bow=1.0 * k))
        ux, uz, rx, rz = 12 * k, -6 * k, -13 * k, 6 * k
        bones.append(Bone("ulna", (P(ux * 0.6, uz), -22 * k), (P(ux, uz), 252 * k), 6.2 * k, 2.3, 1.15, 0.34,
                          seg=1, physis1=_physis(child, k, 10), bow=2.0 * k))
        bones.append(Bone("radius", (P(rx * 0.5, rz), 4 * k), (P(rx, rz), 250 * k), 6.5 * k, 1.5, 2.6, 0.32,
                          seg=1, physis0=_physis(child, k, 8), physis1=_physis(child, k, 14), bow=-3.0 * k))
        joints += [(0, -1, (0.0, 0.0)), (1, -1, (P(-2 * k, 0), 256 * k))]
        carpals(262 * k, 2)
        soft += [SoftTissue((0, -500 * k), (0, 0), 45 * k, 38 * k, 6 * k),
                 SoftTissue((0, 0), (0, 300 * k), 38 * k, 27 * k, 5 * k)]
        extent = (-60 * k, -260 * k, 60 * k, 300 * k)
    elif region == "leg":
        fd = _flat(2.7, phi, 0.8)
        bones.append(Bone("femur", (P(-6 * k, 0), -420 * k), (P(0, 0), -6 * k), 14 * k, 1.1, fd, 0.32, seg=0,
                          physis1=_physis(child, k, 18), bow=1.5 * k))
        bones.append(Bone("patella", (P(0, 32 * k), -60 * k), (P(0, 32 * k), -18 * k), 19 * k * (0.7 + 0.3 * sep),
                          1.0, 1.0, 0.15, seg=0, tubular=False, depth=0.5))
        if child and k < 0.6:
            bones.pop()
        tp = _flat(2.7, phi, 0.75)
        bones.append(Bone("tibia", (P(0, 0), 6 * k), (P(-3 * k, 0), 380 * k), 12.5 * k, tp, 1.9, 0.36, seg=1,
                          physis0=_physis(child, k, 16), physis1=_physis(child, k, 10), bow=1.0 * k))
        bones.append(Bone("fibula", (P(26 * k, -14 * k), 22 * k), (P(24 * k, -6 * k), 392 * k), 5.5 * k, 1.7,
                          1.7, 0.3, seg=1, physis0=_physis(child, k, 9), physis1=_physis(child, k, 9),
                          bow=1.5 * k))
        bones.append(Bone("talus", (P(-2 * k, 0), 386 * k), (P(-2 * k, 0), 420 * k), 17 * k, 1.0, 1.0, 0.15,
                          seg=2, tubular=False))
        joints += [(0, -1, (0.0, 0.0)), (1, -1, (P(-3 * k, 0), 383 * k))]
        soft += [SoftTissue((0, -600 * k), (0, 0), 75 * k, 50 * k, 10 * k),
                 SoftTissue((0, 0), (0, 430 * k), 50 * k, 30 * k, 6 * k)]
        extent = (-70 * k, -330 * k, 70 * k, 430 * k)
    elif region == "humerus":
        hh = _flat(2.4, phi, 0.9)
        bones.append(Bone("scapula", (P(-40 * k, -15 * k), -60 * k), (P(-50 * k, -15 * k), 30 * k), 24 * k, 1.2,
                          0.8, 0.12, seg=0, tubular=False, depth=0.35, density=0.8))
        bones.append(Bone("humerus", (P(-8 * k, 0), -8 * k), (P(0, 0), 300 * k), 11 * k, hh, _flat(2.5, phi, 0.5),
                          0.32, seg=1, physis0=_physis(child, k, 22), physis1=_physis(child, k, 12), bow=1.0 * k))
        bones.append(Bone("ulna", (P(10 * k, -6 * k), 290 * k), (P(12 * k, -6 * k), 560 * k), 6.5 * k, 2.3, 1.0,
                          0.34, seg=2))
        bones.append(Bone("radius", (P(-10 * k, 6 * k), 310 * k), (P(-14 * k, 6 * k), 560 * k), 6.5 * k, 1.5,
                          1.0, 0.32, seg=2, physis0=_physis(child, k, 8)))
        joints += [(0, -1, (P(-25 * k, 0), -10 * k)), (1, -1, (0.0, 304 * k))]
        soft += [SoftTissue((-20 * k, -200 * k), (0, 300 * k), 60 * k, 40 * k, 8 * k),
                 SoftTissue((0, 300 * k), (0, 600 * k), 40 * k, 30 * k, 6 * k)]
        extent = (-80 * k, -70 * k, 60 * k, 420 * k)
    elif region == "femur":
        bones.append(Bone("pelvis", (P(-25 * k, 0), -90 * k), (P(-15 * k, 0), 5 * k), 38 * k, 1.0, 0.9, 0.1,
                          seg=0, tubular=False, depth=0.3, density=0.9))
        ca = math.radians(rng.uniform(120, 135))
        hx, hy = P(-12 * k, 0), 0.0
        neck_len = 55 * k * (0.55 + 0.45 * sep)
        nx, ny = hx + neck_len * math.sin(ca), hy + neck_len * (-math.cos(ca))
        bones.append(Bone("femoral_head_neck", (hx, hy), (nx, ny + 8 * k), 16 * k, 1.55, 1.6, 0.2, seg=1, group=7,
                          physis0=_physis(child, k, 10), tubular=True))
        bones.append(Bone("femur", (nx + 8 * k, ny - 12 * k), (nx - 8 * k, 430 * k), 14 * k, 1.8, _flat(2.7, phi, 0.8),
                          0.34, seg=1, group=7, physis1=_physis(child, k, 18), bow=3.0 * k))
        bones.append(Bone("tibia", (P(-8 * k, 0), 437 * k), (P(-8 * k, 0), 800 * k), 12.5 * k, 2.7, 1.0, 0.36,
                          seg=2, physis0=_physis(child, k, 16)))
        joints += [(0, -1, (hx, hy)), (1, -1, (nx - 8 * k, 433 * k))]
        soft += [SoftTissue((0, -300 * k), (0, 430 * k), 95 * k, 55 * k, 14 * k),
                 SoftTissue((0, 430 * k), (0, 820 * k), 55 * k, 40 * k, 8 * k)]
        extent = (-90 * k, -90 * k, 80 * k, 520 * k)
    elif region == "hand":
        bones.append(Bone("radius", (P(-14 * k, 5 * k), -280 * k), (P(-10 * k, 5 * k), -4 * k), 8 * k, 1.0, 2.5, 0.32,
                          seg=0, physis1=_physis(child, k, 12)))
        bones.append(Bone("ulna", (P(17 * k, -5 * k), -280 * k), (P(15 * k, -5 * k), -7 * k), 6 * k, 1.0, 1.25, 0.32,
                          seg=0, physis1=_physis(child, k, 8)))
        joints.append((0, -1, (0.0, 0.0)))
        carpals(6 * k, 1)
        _rays(rng, k, child, phi, 40 * k, False, 2, bones, soft, joints)
        soft.append(SoftTissue((0, -600 * k), (0, 70 * k), 34 * k, 45 * k, 4 * k))
        extent = (-70 * k, -90 * k, 70 * k, 200 * k)
    elif region == "foot":
        bones.append(Bone("tibia", (P(-4 * k, 0), -330 * k), (P(-4 * k, 0), -6 * k), 12 * k, 1.0, 1.9, 0.34, seg=0,
                          physis1=_physis(child, k, 10)))
        bones.append(Bone("fibula", (P(26 * k, -10 * k), -330 * k), (P(24 * k, -10 * k), 8 * k), 5 * k, 1.0, 1.7,
                          0.3, seg=0, physis1=_physis(child, k, 9)))
        bones.append(Bone("talus", (P(0, 0), 2 * k), (P(0, 0), 34 * k), 16 * k, 1.0, 1.0, 0.15, seg=1,
                          tubular=False))
        joints.append((0, -1, (0.0, 0.0)))
        carpals(44 * k, 1, n_rows=2, size=9.0, width=50.0, foot=True)
        _rays(rng, k, child, phi, 78 * k, True, 2, bones, soft, joints)
        soft.append(SoftTissue((0, -640 * k), (0, 100 * k), 46 * k, 48 * k, 5 * k))
        extent = (-70 * k, -110 * k, 70 * k, 240 * k)
    else:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    return Scene(region, bones, soft, joints, extent, child, projection)


def add_normal_variants(rng: np.random.Generator, scene: Scene) -> list[str]:
    """Intact structures that mimic fractures on real films, added independently of the label."""
    notes: list[str] = []
    for b in scene.bones:
        if b.tubular and b.length > 40 and rng.random() < 0.35:
            # nutrient (vascular) canal: a thin oblique lucent line through one cortex, pointing away from the
            # growing end ("to the elbow I go, from the knee I flee" -- the direction is anatomy, not a cue)
            R = b.r
            side = rng.choice([-1.0, 1.0])
            s0 = b.length * rng.uniform(0.35, 0.65)
            ln = R * rng.uniform(1.2, 2.5)
            ang = math.radians(rng.uniform(15, 40))
            pts = np.array([[s0, side * R * 1.02], [s0 + ln * math.cos(ang) * rng.choice([-1, 1]),
                                                    side * (R - ln * math.sin(ang) * 0.5)]], dtype=np.float32)
            b.canals.append((pts, rng.uniform(0.25, 0.5), rng.uniform(0.25, 0.5)))
            notes.append("nutrient_canal")
        if b.tubular and b.length > 30 and rng.random() < 0.06:
            # benign lucent lesion (e.g. non-ossifying fibroma / cyst) or a sclerotic bone island, no fracture
            s0 = b.length * rng.uniform(0.2, 0.8)
            dense = rng.random() < 0.4
            rr = b.r * rng.uniform(0.25, 0.5) if dense else b.r * rng.uniform(0.4, 0.85)
            b.lesions.append((s0, rng.uniform(-0.3, 0.3) * b.r, rr, rr * rng.uniform(1.0, 2.0),
                              -0.5 if dense else rng.uniform(0.4, 0.75), rng.uniform(0, 0.4)))
            notes.append("bone_island" if dense else "lucent_lesion")
    if rng.random() < 0.25:
        # sesamoid / accessory ossicle beside a joint: a small corticated ossicle that mimics an avulsed flake
        seg, _ray, c = scene.joints[int(rng.integers(len(scene.joints)))]
        ref = [b for b in scene.bones if b.seg == seg] or scene.bones
        r = min(b.r for b in ref) * rng.uniform(0.3, 0.6)
        off = rng.normal(0, 1.0, 2) * r * 2.5
        x, y = c[0] + off[0], c[1] + off[1]
        scene.bones.append(Bone("ossicle", (x, y - r), (x, y + r), r, 1.0, 1.0, 0.35, seg=seg, tubular=False))
        notes.append("ossicle")
    return notes
