"""3-D anatomy of the simulated limbs.

Every bone is an analytic solid so that its projection (the chord length of each ray through it) can be
computed in closed form, vectorised over pixels:

* :class:`Bone` -- a long bone: a generalised cylinder around a (slightly bowed) axis that lies roughly in
  the detector plane.  Its outer radius ``r_out(t)`` flares from the diaphysis into metaphyses and rounded
  joint ends; the medullary radius ``r_in(t)`` leaves a cortical shell that is thick mid-shaft and thin at
  the ends; the medulla holds trabecular bone whose density rises toward the ends.  Children get growth
  plates (thin radiolucent bands near the ends).
* :class:`Blob` -- an ellipsoid with a thin cortical shell (carpals, tarsals, patella, heads, condyles).
* :class:`Envelope` -- the soft-tissue envelope (muscle inside a subcutaneous fat layer).

Bones are first placed in a *limb frame* (Y along the limb toward distal, X lateral, Z depth, mm).  The
projection angle rotates the limb about its long axis (so the forearm bones and the tibia/fibula move over
each other as the view goes from AP to lateral), laterality mirrors X, and a 2-D similarity transform places
the limb in the detector field.  Geometry after :func:`place` is in *world* coordinates: millimetres in
the patient plane, X to the right and Y down the image, origin at the image's top-left corner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REGIONS: tuple[str, ...] = ("forearm", "lower_leg", "femur", "humerus", "hand")
BODY_PART: dict[str, str] = {
    "forearm": "FOREARM",
    "lower_leg": "LEG",
    "femur": "FEMUR",
    "humerus": "HUMERUS",
    "hand": "HAND",
}
#: Long side of the detector field in mm (patient plane), before random variation.
FIELD_MM: dict[str, float] = {"forearm": 300.0, "lower_leg": 430.0, "femur": 470.0, "humerus": 380.0, "hand": 230.0}


def smoothstep(x):  # array or scalar
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass
class Profile:
    """Radial profile of a long bone sampled along its axis (all mm)."""

    t: np.ndarray
    r_out: np.ndarray
    r_in: np.ndarray
    trab: np.ndarray

    def at(self, t: float) -> float:
        return float(np.interp(t, self.t, self.r_out))

    @property
    def length(self) -> float:
        return float(self.t[-1])


def long_bone_profile(
    length: float,
    r0: float,
    r_prox: float,
    r_dist: float,
    flare_prox: float,
    flare_dist: float,
    cortex: float,
    cap_prox: float | None = None,
    cap_dist: float | None = None,
    n: int = 192,
) -> Profile:
    t = np.linspace(0.0, length, n)
    sp = smoothstep(1.0 - t / flare_prox)
    sd = smoothstep(1.0 - (length - t) / flare_dist)
    # concave (trumpet-shaped) metaphyseal flare
    xp_ = np.clip(1.0 - t / flare_prox, 0.0, 1.0)
    xd_ = np.clip(1.0 - (length - t) / flare_dist, 0.0, 1.0)
    fp_ = xp_**2.2 * 0.8 + 0.2 * sp
    fd_ = xd_**2.2 * 0.8 + 0.2 * sd
    r = r0 + (r_prox - r0) * fp_ + (r_dist - r0) * fd_
    cp = cap_prox if cap_prox is not None else 0.7 * r_prox
    cd = cap_dist if cap_dist is not None else 0.7 * r_dist
    xp = np.clip((cp - t) / cp, 0.0, 1.0)
    xd = np.clip((t - (length - cd)) / cd, 0.0, 1.0)
    # superelliptic end caps: flatter articular surfaces for broad ends (condyles, plateau)
    ep = 2.0 + 1.0 * smoothstep((r_prox / r0 - 1.3) / 1.2)
    ed = 2.0 + 1.0 * smoothstep((r_dist / r0 - 1.3) / 1.2)
    r = r * np.clip(1.0 - xp**ep, 0.0, 1.0) ** (1.0 / ep) * np.clip(1.0 - xd**ed, 0.0, 1.0) ** (1.0 / ed)
    end = np.maximum(sp, sd)
    ct = np.maximum(cortex * (1.0 - 0.82 * end), 0.45)
    r_in = np.clip(r - ct, 0.0, None)
    trab = 0.12 + 0.88 * end**0.7
    return Profile(t.astype(np.float64), r.astype(np.float64), r_in.astype(np.float64), trab.astype(np.float64))


@dataclass
class Fragment:
    """One piece of a (possibly broken) long bone.

    ``member(t, a, b)`` gives, for points in the bone's own straight, un-rotated anatomical frame (``t`` along
    the axis, ``a``/``b`` across it), the fraction of bone that belongs to this fragment (1 inside, 0 outside,
    in between for a lucent slab or a lytic lesion).  ``None`` means the whole bone.  Outside ``zone`` (a
    t-interval) the membership is constant along each ray and is evaluated once; inside it is integrated
    along the ray with stratified samples.  The fragment is then moved rigidly: rotated by ``rot`` (radians,
    in the image plane) about ``pivot`` (t, d), shifted by ``shift`` (t, d) mm and twisted by ``twist`` about
    the long axis.
    """

    member: Callable[[Any, Any, Any], Any] | None = None
    zone: tuple[float, float] = (0.0, 0.0)
    rot: float = 0.0
    pivot: tuple[float, float] = (0.0, 0.0)
    shift: tuple[float, float] = (0.0, 0.0)
    twist: float = 0.0
    density: float = 1.0
    mask_all: bool = False


@dataclass
class Bone:
    name: str
    p0: np.ndarray  # world mm, proximal end (t = 0)
    u: np.ndarray  # unit direction in the image plane, proximal -> distal
    prof: Profile
    phi: float = 0.0  # rotation about the own axis (view angle), radians
    bow: float = 0.0  # mm of lateral bowing at mid-shaft
    kw: float = 1.0  # elliptical cross-section: projected half-width / radius
    kt: float = 1.0  # elliptical cross-section: depth scale of every chord
    density: float = 1.0
    growth_plates: list[float] = field(default_factory=list)
    nutrient: tuple[float, float, float] | None = None  # (t, side, slope)
    fragments: list[Fragment] | None = None
    fracturable: bool = True
    group: str = ""

    @property
    def length(self) -> float:
        return self.prof.length

    def world(self, t: float, d: float = 0.0) -> np.ndarray:
        n = np.array([-self.u[1], self.u[0]])
        return self.p0 + self.u * t + n * d


@dataclass
class Blob:
    name: str
    c: np.ndarray  # world mm
    ax: tuple[float, float, float]  # semi-axes: in-plane along angle, in-plane across, depth
    angle: float = 0.0
    shell: float = 0.8
    density: float = 1.0
    group: str = ""


@dataclass
class Envelope:
    p0: np.ndarray
    u: np.ndarray
    t: np.ndarray  # profile sample positions (mm)
    r: np.ndarray  # radius
    flat: float = 0.85  # depth / width ratio
    fat: float = 5.0  # mm of subcutaneous fat


@dataclass
class Joint:
    name: str
    pivot: np.ndarray  # world mm
    bone: str  # bone whose end forms one side of the joint
    end: str  # "p" or "d"
    partners: list[str]  # names of bones / blobs on the other side
    width: float  # mm


@dataclass
class Scene:
    region: str
    laterality: str
    child: bool
    bones: list[Bone]
    blobs: list[Blob]
    envelopes: list[Envelope]
    joints: list[Joint]
    width_mm: float
    height_mm: float
    view: float  # projection angle about the limb axis (radians)
    limb_p0: np.ndarray
    limb_u: np.ndarray
    limb_len: float
    limb_r: float
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# limb-frame descriptions


@dataclass
class _LB:  # long bone in limb frame
    name: str
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r0: float
    rp: float
    rd: float
    fp: float
    fd: float
    cortex: float
    cap_p: float | None = None
    cap_d: float | None = None
    bow: float = 0.0
    fracturable: bool = True
    group: str = ""
    plates: tuple[bool, bool] = (True, True)


@dataclass
class _BL:  # blob in limb frame
    name: str
    c: tuple[float, float, float]
    ax: tuple[float, float, float]
    angle: float = 0.0
    group: str = ""
    density: float = 1.0


#: carpal bones: name, x (radial side +), y from the proximal row, z, semi-axes (x, y), angle (rad)
_CARPALS = (
    ("scaphoid", 15.0, 1.0, 2.0, 10.5, 5.5, 0.65),
    ("lunate", 3.5, 0.0, 0.0, 7.0, 6.5, 0.1),
    ("triquetrum", -8.5, 2.0, -1.0, 6.5, 5.5, -0.3),
    ("pisiform", -10.0, 4.0, 8.0, 4.5, 4.5, 0.0),
    ("trapezium", 20.5, 15.0, 3.0, 7.0, 6.5, 0.45),
    ("trapezoid", 11.5, 16.5, 0.0, 5.0, 6.0, 0.2),
    ("capitate", 2.5, 15.5, 0.0, 6.5, 10.5, 0.05),
    ("hamate", -8.5, 15.0, -1.0, 6.5, 9.0, -0.25),
)


def _carpals(rng: np.random.Generator, y0: float, group: str) -> list[_BL]:
    out = []
    for name, x, dy, z, ax, ay, ang in _CARPALS:
        jt = rng.uniform(-1.0, 1.0, 2)
        k = rng.uniform(0.9, 1.1, 2)
        out.append(_BL(name, (x + jt[0], y0 + dy + jt[1], z), (ax * k[0], ay * k[1], 0.8 * min(ax, ay) + 1.5),
                       ang + rng.normal(0, 0.1), group))
    return out


def _limb_forearm(rng: np.random.Generator):
    lr = rng.uniform(0.92, 1.08)
    bones = [
        _LB("radius", (13, 0, 2), (19, 235 * lr, 0), 6.2, 9.5, 15.5, 28, 38, 2.3, 5.5, 9, bow=1.5),
        _LB("ulna", (-12, -25, 4), (-15, 240 * lr, 1), 5.8, 12.5, 7.5, 50, 14, 2.3, 8, 5, bow=-1.0),
    ]
    y = 240 * lr
    blobs = []
    blobs.extend(_carpals(rng, y + 12.0, "wrist"))
    for i, x in enumerate((-17, -6, 5, 16)):
        bones.append(_LB(f"mc{i + 2}", (x * 0.9, y + 40, 0), (x * 1.25, y + 100, 0), 3.8, 6.5, 6.5, 12, 12, 1.5,
                         fracturable=False, group="wrist"))
    bones.append(_LB("mc1", (30, y + 30, 2), (45, y + 70, 6), 4.5, 7, 6, 10, 10, 1.5, fracturable=False,
                     group="wrist"))
    env = ((-120, 37), (60, 33), (y - 10, 27), (y + 30, 38), (y + 160, 42))
    joints = [("wrist", (3, y + 4, 0), "radius", "d", ["wrist"], 22.0)]
    return bones, blobs, env, joints, 0.75, (y * 0.5, 60.0)


def _limb_lower_leg(rng: np.random.Generator):
    lr = rng.uniform(0.92, 1.08)
    L = 365 * lr
    bones = [
        _LB("tibia", (0, 0, 0), (3, L, 0), 11.5, 36, 22, 75, 45, 4.2, 12, 10, bow=1.0),
        _LB("fibula", (-30, 14, -10), (-27, L + 18, -6), 6.0, 11, 11.5, 25, 28, 2.1, 9, 10, bow=-1.5),
        _LB("femur", (2, -420, 0), (0, -14, 0), 13, 20, 40, 60, 60, 5.0, 15, 16, fracturable=False,
            plates=(False, True)),
    ]
    blobs = [
        _BL("talus", (2, L + 22, 0), (22, 14, 20), 0.0, "ankle"),
        _BL("calcaneus", (-6, L + 48, -18), (34, 16, 22), 0.3, "ankle"),
        _BL("navicular", (14, L + 40, 10), (12, 9, 12), 0.0, "ankle"),
        _BL("patella", (2, -40, 38), (20, 24, 10), 0.0, ""),
    ]
    env = ((-300, 78), (-60, 55), (60, 58), (160, 48), (L - 30, 34), (L + 40, 42), (L + 120, 40))
    joints = [("ankle", (1, L + 6, 0), "tibia", "d", ["ankle"], 30.0)]
    return bones, blobs, env, joints, 0.8, (L * 0.5, 80.0)


def _limb_femur(rng: np.random.Generator):
    lr = rng.uniform(0.93, 1.07)
    L = 430 * lr
    bones = [
        _LB("femur", (0, 0, 0), (8, L, 0), 13.5, 24, 40, 80, 65, 5.2, 14, 16, bow=3.0),
        _LB("femoral_neck", (-2, 36, 0), (-52, -6, 8), 14, 15, 19, 15, 25, 2.5, 10, 19),
        _LB("tibia", (9, L + 16, 0), (13, L + 300, 0), 12, 37, 20, 75, 40, 4.5, 12, 10, fracturable=False,
            group="knee", plates=(True, False)),
        _LB("fibula", (-22, L + 30, -12), (-18, L + 300, -8), 6.0, 11, 10, 25, 25, 2.0, 9, 9,
            fracturable=False, group="knee"),
    ]
    blobs = [
        _BL("femoral_head", (-56, -10, 8), (23, 23, 23), 0.0, ""),
        _BL("trochanter", (22, 6, -4), (16, 24, 18), 0.2, ""),
        _BL("patella", (10, L - 30, 40), (20, 24, 10), 0.0, "knee"),
        _BL("acetabulum", (-72, -18, 4), (14, 34, 26), 0.6, "", 0.8),
    ]
    env = ((-80, 84), (120, 74), (L - 60, 58), (L + 40, 55), (L + 300, 48))
    joints = [("knee", (9, L + 7, 0), "femur", "d", ["knee"], 40.0)]
    return bones, blobs, env, joints, 0.9, (L * 0.56, 120.0)


def _limb_humerus(rng: np.random.Generator):
    lr = rng.uniform(0.93, 1.07)
    L = 310 * lr
    bones = [
        _LB("humerus", (0, 0, 0), (4, L, 0), 10.5, 23, 27, 55, 40, 4.0, 15, 10, bow=1.0),
        _LB("radius", (14, L + 12, 4), (24, L + 250, 6), 6.2, 9.5, 14, 25, 30, 2.2, 6, 8, fracturable=False,
            group="elbow"),
        _LB("ulna", (-10, L - 6, -4), (-16, L + 250, 0), 6.0, 13, 7, 50, 14, 2.2, 9, 5, fracturable=False,
            group="elbow"),
        _LB("clavicle", (-80, -40, 10), (30, -48, 20), 7, 10, 11, 30, 20, 2.5, 8, 8, fracturable=False,
            plates=(False, False)),
    ]
    blobs = [
        _BL("humeral_head", (-6, 6, 0), (24, 24, 24), 0.0, ""),
        _BL("glenoid", (-40, 8, -8), (7, 22, 18), 0.2, "", 0.9),
        _BL("scapula", (-62, 40, -20), (22, 60, 6), 0.2, "", 0.8),
        _BL("acromion", (-10, -36, 10), (26, 8, 10), 0.1, "", 0.9),
    ]
    env = ((-120, 80), (0, 52), (160, 44), (L, 40), (L + 250, 34))
    joints = [("elbow", (2, L + 4, 0), "humerus", "d", ["elbow"], 32.0)]
    return bones, blobs, env, joints, 0.8, (L * 0.5, 75.0)


def _limb_hand(rng: np.random.Generator):
    bones: list[_LB] = []
    blobs: list[_BL] = []
    joints = []
    spread = rng.uniform(0.6, 1.3)
    # carpals: the wrist sits at the bottom of the field (limb axis points toward the fingertips)
    blobs.extend(_carpals(rng, -14.0, ""))
    bones.append(_LB("radius", (16, -160, 0), (18, -28, 0), 6.8, 8, 15.5, 20, 32, 2.2, 6, 9, fracturable=False))
    bones.append(_LB("ulna", (-12, -165, 0), (-14, -30, 0), 6.2, 8, 7.5, 20, 14, 2.2, 6, 5, fracturable=False))
    fingers = [  # (base x, angle deg, metacarpal length, phalanx lengths, radius)
        (-19, -10, 52, (30, 20, 17), 3.6),
        (-7, -3, 60, (38, 25, 18), 4.0),
        (6, 2, 66, (42, 27, 19), 4.2),
        (18, 8, 64, (38, 23, 18), 4.0),
        (29, 38, 44, (32, 0, 24), 4.6),
    ]
    envs = []
    for fi, (bx, ang, lm, phal, r) in enumerate(fingers):
        a = math.radians(ang * spread)
        ux, uy = math.sin(a), 1.0
        n = math.hypot(ux, uy)
        ux, uy = ux / n, uy / n
        y0 = 12.0 if fi < 4 else 6.0
        p = np.array([bx, y0])
        seg = [("mc", lm, r, 6.5)] + [(nm, ln, r * k, r * k * 1.35) for nm, ln, k in
                                        zip(("pp", "mp", "dp"), phal, (0.95, 0.82, 0.72), strict=True) if ln > 0]
        prev = None
        for j, (nm, ln, rr, rend) in enumerate(seg):
            q = p + np.array([ux, uy]) * ln
            name = f"{nm}{fi + 1}"
            fract = nm in ("mc", "pp", "mp")
            cap_d = rend * (0.55 if nm != "dp" else 0.35)
            bones.append(_LB(name, (p[0], p[1], 0), (q[0], q[1], 0), rr, rend * (1.05 if nm == "mc" else 1.1),
                             rend * (1.0 if nm != "dp" else 0.75), ln * 0.28, ln * 0.25, rr * 0.38,
                             rend * 0.6, cap_d, fracturable=fract, group=f"f{fi}_{j}"))
            if prev is not None:
                pj = p - np.array([ux, uy]) * 1.2
                joints.append((f"{prev}-{name}", (pj[0], pj[1], 0), prev, "d",
                               [f"f{fi}_{k}" for k in range(j, len(seg))], rr * 2.3))
            prev = name
            p = q + np.array([ux, uy]) * (2.4 if nm == "mc" else 2.0)
        envs.append(((bx, y0 - 20.0), (p[0] + ux * 4, p[1] + uy * 4), r * 2.6))
    env = ((-170, 34), (-40, 30), (0, 40), (60, 47), (80, 40))
    return bones, blobs, (env, envs), joints, 0.82, (30.0, 40.0)


_LIMBS = {
    "forearm": _limb_forearm,
    "lower_leg": _limb_lower_leg,
    "femur": _limb_femur,
    "humerus": _limb_humerus,
    "hand": _limb_hand,
}


def build_scene(rng: np.random.Generator, region: str, laterality: str, child: bool,
                width_mm: float, height_mm: float) -> Scene:
    """Place a limb of ``region`` into a ``width_mm`` x ``height_mm`` field (patient plane)."""
    bones_l, blobs_l, env_l, joints_l, _aspect, (y_focus, _y_jit) = _LIMBS[region](rng)
    hand = region == "hand"
    size = rng.uniform(0.9, 1.1) * (rng.uniform(0.62, 0.8) if child else 1.0)
    # projection angle about the limb's long axis: mostly AP, some oblique, some near-lateral
    r = rng.random()
    if hand:
        view = rng.uniform(-0.15, 0.15) if r < 0.6 else rng.uniform(-0.75, 0.75)
    elif r < 0.55:
        view = rng.uniform(-0.25, 0.25)
    elif r < 0.85:
        view = rng.uniform(-0.9, 0.9)
    else:
        view = rng.choice([-1.0, 1.0]) * rng.uniform(1.2, 1.6)
    cv, sv = math.cos(view), math.sin(view)
    mirror = -1.0 if laterality == "L" else 1.0
    # in-plane orientation: limb mostly along the long side of the field, distal up or down
    long_vertical = height_mm >= width_mm
    base = 0.0 if long_vertical else math.pi / 2
    if rng.random() < 0.5:
        base += math.pi
    theta = base + rng.normal(0, 0.12)
    ct, st = math.cos(theta), math.sin(theta)
    # choose a focus point of the limb and place it near the field centre
    yf = y_focus * size + rng.uniform(-0.07, 0.07) * max(width_mm, height_mm)
    center = np.array([width_mm / 2, height_mm / 2]) + rng.normal(0, 0.04, 2) * np.array([width_mm, height_mm])

    def proj(p):
        x, y, z = p
        xp = (x * cv + z * sv) * mirror * size
        yp = (y * size - yf)
        return center + np.array([ct * xp - st * yp, st * xp + ct * yp])

    # keep the primary joint (wrist, ankle, knee, elbow) inside the field: a label-independent adjustment
    if joints_l:
        pj = proj(joints_l[0][1])
        lo = np.array([0.1 * width_mm, 0.1 * height_mm])
        hi = np.array([0.9 * width_mm, 0.9 * height_mm])
        center = center + (np.clip(pj, lo, hi) - pj)

    zscale = size

    def depth(p):
        x, y, z = p
        return (-x * sv + z * cv) * zscale

    bones: list[Bone] = []
    for lb in bones_l:
        a, b = proj(lb.a), proj(lb.b)
        vec = b - a
        L2 = float(np.hypot(*vec))
        # out-of-plane foreshortening is already in the projected length; keep the 3-D radii
        L3 = math.sqrt(L2**2 + (depth(lb.b) - depth(lb.a)) ** 2)
        k = L2 / max(L3, 1e-6)
        s = size
        prof = long_bone_profile(L3 * k, lb.r0 * s, lb.rp * s, lb.rd * s, lb.fp * s * k, lb.fd * s * k,
                                 lb.cortex * s, (lb.cap_p or 0.7 * lb.rp) * s * k, (lb.cap_d or 0.7 * lb.rd) * s * k)
        # oval shaft cross-section (minor/major 0.72-1), oriented anatomically, seen from the view angle
        ecc = rng.uniform(0.72, 1.0)
        psi = view + rng.normal(0, 0.3)
        kw = math.sqrt(math.cos(psi) ** 2 + (ecc * math.sin(psi)) ** 2)
        kt = ecc / kw
        gp: list[float] = []
        if child:
            if lb.plates[0] and lb.rp > 7 * (0.5 if hand else 1):
                gp.append(min(lb.fp * 0.45, lb.rp * 0.9) * s * k)
            if lb.plates[1] and lb.rd > 7 * (0.5 if hand else 1):
                gp.append(L2 - min(lb.fd * 0.45, lb.rd * 0.9) * s * k)
        bones.append(Bone(lb.name, a, vec / L2, prof, phi=view * mirror + rng.normal(0, 0.1),
                          bow=lb.bow * s * mirror, density=rng.uniform(0.9, 1.1) * (0.82 if child else 1.0),
                          kw=kw, kt=kt,
                          growth_plates=gp, fracturable=lb.fracturable, group=lb.group))
    blobs = []
    for bl in blobs_l:
        ax = (bl.ax[0] * size, bl.ax[1] * size, bl.ax[2] * size)
        # rotate the in-plane/depth semi-axes with the view (approximation: blend x and z extents)
        ax_x = math.sqrt((ax[0] * cv) ** 2 + (ax[2] * sv) ** 2)
        ax_z = math.sqrt((ax[0] * sv) ** 2 + (ax[2] * cv) ** 2)
        ang = theta + bl.angle * mirror
        blobs.append(Blob(bl.name, proj(bl.c), (ax_x, ax[1], ax_z), ang,
                          shell=0.9 * size, density=bl.density * rng.uniform(0.9, 1.1) * (0.8 if child else 1.0),
                          group=bl.group))
    envs = []
    if hand:
        env_pts, fingers = env_l
    else:
        env_pts, fingers = env_l, []
    p_a, p_b = proj((0, env_pts[0][0], 0)), proj((0, env_pts[-1][0], 0))
    vec = p_b - p_a
    Le = float(np.hypot(*vec))
    ue = vec / Le
    te = np.array([(p[0] - env_pts[0][0]) * size for p in env_pts])
    re = np.array([p[1] * size for p in env_pts]) * rng.uniform(0.9, 1.15)
    flat = rng.uniform(0.7, 0.95)
    if hand:
        flat = 0.45 * abs(cv) + 0.9 * abs(sv)
        re = re * (abs(cv) + 0.5 * abs(sv))
    envs.append(Envelope(p_a, ue, te, re, flat, fat=rng.uniform(3, 9) * size))
    for fa, fb, fr in fingers:
        a, b = proj((fa[0], fa[1], 0)), proj((fb[0], fb[1], 0))
        vec = b - a
        Lf = float(np.hypot(*vec))
        tt = np.array([0.0, Lf * 0.7, Lf])
        rr = np.array([fr, fr * 0.85, fr * 0.7]) * size
        envs.append(Envelope(a, vec / Lf, tt, rr, 0.95, fat=2.0 * size))
    joints = []
    for name, pv, bone, end, partners, width in joints_l:
        joints.append(Joint(name, proj(pv), bone, end, partners, width * size))
    return Scene(region, laterality, child, bones, blobs, envs, joints, width_mm, height_mm, view,
                 p_a, ue, Le, float(np.max(re)), extras={"size": size, "theta": theta, "mirror": mirror})
