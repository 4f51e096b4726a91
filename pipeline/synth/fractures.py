"""The eleven fracture types, made by cutting and moving the 3-D bone.

Each builder returns the fragments of one bone (see :class:`~.anatomy.Fragment`): membership functions in
the bone's 3-D anatomical frame (``t`` along the axis, ``a``/``b`` across it) and a rigid motion of each
piece.  Because the cutting surfaces live in 3-D and the bone is rotated about its axis by the projection
angle, the same fracture projects differently in every view.  Severity (displacement, angulation, gap,
contrast) is drawn from subtle to obvious.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from .anatomy import Bone, Fragment, Scene, smoothstep

F32 = np.float32


@dataclass
class FractureInfo:
    bone: str
    kind: str
    site: np.ndarray  # world mm, centre of the fracture
    extra_mask: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (world centre, radius mm)
    dislocation: tuple | None = None  # (group, pivot, rot, shift)
    params: dict = field(default_factory=dict)


def _to_anat(bone: Bone, n_view: tuple[float, float, float]) -> tuple[float, float, float]:
    """Convert a vector given in the bone's view frame (t, d, z) into its anatomical frame (t, a, b)."""
    nt, nd, nz = n_view
    c, s = math.cos(bone.phi), math.sin(bone.phi)
    v = np.array([nt, nd * c + nz * s, -nd * s + nz * c])
    v /= np.linalg.norm(v)
    return float(v[0]), float(v[1]), float(v[2])


# roughness of the cutting planes of the fracture being built (per thread: builders may run concurrently)
_STATE = threading.local()


def _plane(t0: float, n: tuple[float, float, float], a0: float = 0.0, b0: float = 0.0,
           rough: tuple[float, float, float, float, float, float] | None = None):
    """Signed distance to a cutting plane, optionally with a jagged (interdigitating) surface."""
    nt, na, nb = n
    if rough is None:
        rough = getattr(_STATE, "rough", None)
        if rough is None:
            return lambda t, a, b: nt * (t - t0) + na * (a - a0) + nb * (b - b0)
    amp, f1, f2, p1, p2, f3 = rough

    def g(t, a, b):
        base = nt * (t - t0) + na * (a - a0) + nb * (b - b0)
        return base + amp * (np.sin(f1 * a + p1) * np.cos(f2 * b + p2) + 0.5 * np.sin(f3 * (a - b) + p2))

    return g


def _set_rough(rng: np.random.Generator, scale: float) -> None:
    """Choose the surface roughness used by the planes of the next fracture (amplitude ~0.15-0.6 mm)."""
    _STATE.rough = (float(rng.uniform(0.15, 0.6) * scale), float(rng.uniform(0.5, 1.4)),
                    float(rng.uniform(0.5, 1.4)), float(rng.uniform(0, 6.3)), float(rng.uniform(0, 6.3)),
                    float(rng.uniform(1.5, 3.0)))


def _side(g, positive: bool):
    if positive:
        return lambda t, a, b: (g(t, a, b) >= 0).astype(F32)
    return lambda t, a, b: (g(t, a, b) < 0).astype(F32)


def _view_point(bone: Bone, d: float, z: float) -> tuple[float, float]:
    c, s = math.cos(bone.phi), math.sin(bone.phi)
    return d * c + z * s, -d * s + z * c


def visible_range(bone: Bone, scene: Scene, margin_frac: float = 0.07) -> tuple[float, float] | None:
    L = bone.length
    ts = np.linspace(0, L, 200)
    pts = bone.p0[None, :] + bone.u[None, :] * ts[:, None]
    mx, my = margin_frac * scene.width_mm, margin_frac * scene.height_mm
    ok = (pts[:, 0] > mx) & (pts[:, 0] < scene.width_mm - mx) & (pts[:, 1] > my) & (pts[:, 1] < scene.height_mm - my)
    if not ok.any():
        return None
    idx = np.nonzero(ok)[0]
    return float(ts[idx[0]]), float(ts[idx[-1]])


def _severity(rng: np.random.Generator) -> float:
    return float(0.12 + 0.88 * rng.random() ** 1.15)


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _tilt_normal(bone: Bone, rng: np.random.Generator, tilt: float, spread: float = 0.7):
    """Plane normal tilted ``tilt`` rad from the long axis, tilt direction mostly in the image plane."""
    bv = rng.uniform(-spread, spread) + (math.pi if rng.random() < 0.5 else 0.0)
    return _to_anat(bone, (math.cos(tilt), math.sin(tilt) * math.cos(bv), math.sin(tilt) * math.sin(bv)))


def _choose_site(bone: Bone, scene: Scene, rng: np.random.Generator, lo: float, hi: float) -> float | None:
    vr = visible_range(bone, scene)
    if vr is None:
        return None
    L = bone.length
    a, b = max(lo * L, vr[0]), min(hi * L, vr[1])
    if b - a < 2.0:
        return None
    return float(rng.uniform(a, b))


def _complete(bone, rng, t_f, tilt, sev, *, gap=(0.3, 3.0), disp=(0.0, 0.9), ang=(0.0, 0.3), twist=0.35,
              shorten=0.0):
    r = bone.prof.at(t_f)
    D = 2 * r
    n = _tilt_normal(bone, rng, tilt)
    g = _plane(t_f, n)
    R = float(bone.prof.r_out.max()) * 1.05
    half = R * abs(math.tan(tilt)) + 1.5
    zone = (t_f - half, t_f + half)
    gap_mm = sev * rng.uniform(*gap) + 0.35
    shift_t = gap_mm - shorten * sev * rng.uniform(0, 1)
    shift_d = _sign(rng) * sev * rng.uniform(*disp) * D
    rot = _sign(rng) * sev * rng.uniform(*ang)
    tw = rng.uniform(-twist, twist) * sev
    prox = Fragment(_side(g, False), zone)
    dist = Fragment(_side(g, True), zone, rot=rot, pivot=(t_f, 0.0), shift=(shift_t, shift_d), twist=tw)
    return [prox, dist], {"tilt_deg": math.degrees(tilt), "gap_mm": gap_mm, "shift_d_mm": shift_d,
                          "angulation_deg": math.degrees(rot)}


def build_fracture(kind: str, scene: Scene, rng: np.random.Generator) -> FractureInfo | None:
    """Cut one bone of ``scene`` in place; returns ``None`` if no suitable site is visible."""
    cands = [b for b in scene.bones if b.fracturable]
    _set_rough(rng, 1.0 if scene.region != "hand" else 0.5)
    if kind == "fracture_dislocation":
        joints = [j for j in scene.joints if any(b.name == j.bone and b.fracturable for b in scene.bones)]
        rng.shuffle(joints)
        for j in joints:
            bone = next(b for b in scene.bones if b.name == j.bone)
            info = _fracture_dislocation(bone, j, scene, rng)
            if info is not None:
                return info
        return None
    order = rng.permutation(len(cands))
    for i in order:
        bone = cands[int(i)]
        info = _BUILDERS[kind](bone, scene, rng)
        if info is not None:
            return info
    return None


def _finish(bone: Bone, kind: str, frags: list[Fragment], t_f: float, params: dict) -> FractureInfo:
    bone.fragments = frags
    return FractureInfo(bone.name, kind, bone.world(t_f), params=params)


def _transverse(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.22, 0.78)
    if t_f is None:
        return None
    sev = _severity(rng)
    frags, p = _complete(bone, rng, t_f, rng.uniform(0, math.radians(15)), sev, shorten=3.0)
    return _finish(bone, "transverse", frags, t_f, p)


def _oblique(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.22, 0.78)
    if t_f is None:
        return None
    sev = _severity(rng)
    line = rng.uniform(math.radians(32), math.radians(58))  # angle of the line to the long axis
    frags, p = _complete(bone, rng, t_f, math.pi / 2 - line, sev, gap=(0.2, 2.0), shorten=4.0)
    return _finish(bone, "oblique", frags, t_f, p)


def _spiral(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.25, 0.75)
    if t_f is None:
        return None
    sev = _severity(rng)
    D = 2 * bone.prof.at(t_f)
    pitch = _sign(rng) * rng.uniform(2.3, 3.4) * D
    th0 = rng.uniform(-math.pi, math.pi)
    k = pitch / (2 * math.pi)

    def g(t, a, b):
        th = np.arctan2(b, a) - th0
        th = (th + np.pi) % (2 * np.pi) - np.pi
        return (t - t_f) - k * th

    half = abs(pitch) / 2 + 2.0
    zone = (t_f - half, t_f + half)
    tw = _sign(rng) * rng.uniform(0.12, 0.5) * sev + _sign(rng) * 0.05
    shift_t = rng.uniform(-2.5, 2.5) * sev
    shift_t += 0.5 if shift_t >= 0 else -0.5
    shift_d = _sign(rng) * sev * rng.uniform(0.0, 0.5) * D
    rot = _sign(rng) * sev * rng.uniform(0, 0.2)
    frags = [Fragment(_side(g, False), zone),
             Fragment(_side(g, True), zone, rot=rot, pivot=(t_f, 0.0), shift=(shift_t, shift_d), twist=tw)]
    return _finish(bone, "spiral", frags, t_f, {"pitch_mm": pitch, "twist_deg": math.degrees(tw)})


def _comminuted(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.25, 0.75)
    if t_f is None:
        return None
    sev = _severity(rng)
    r = bone.prof.at(t_f)
    D = 2 * r
    w = rng.uniform(0.7, 1.6) * D
    t1, t2 = t_f - w / 2, t_f + w / 2
    tl1, tl2 = rng.uniform(0, 0.8), rng.uniform(0, 0.8)
    g1 = _plane(t1, _tilt_normal(bone, rng, tl1))
    g2 = _plane(t2, _tilt_normal(bone, rng, tl2))
    R = float(bone.prof.r_out.max()) * 1.05
    zone = (t1 - R * math.tan(tl1) - 1.5, t2 + R * math.tan(tl2) + 1.5)
    nmid = 2 if rng.random() < 0.6 else 3
    th0 = rng.uniform(-math.pi, math.pi)
    edges = np.sort(rng.uniform(0, 2 * math.pi, nmid - 1))
    edges = np.concatenate([[0.0], edges, [2 * math.pi]])
    # make sure sectors are not tiny
    edges = np.linspace(0, 2 * math.pi, nmid + 1) * 0.5 + edges * 0.5
    frags = [Fragment(_side(g1, False), zone)]
    dist_shift = (sev * rng.uniform(0.3, 3.0) - sev * rng.uniform(0, 3.0), _sign(rng) * sev * rng.uniform(0, 0.6) * D)
    frags.append(Fragment(_side(g2, True), zone, rot=_sign(rng) * sev * rng.uniform(0, 0.25), pivot=(t_f, 0.0),
                          shift=dist_shift, twist=rng.uniform(-0.3, 0.3) * sev))
    ang = bone.phi
    for k in range(nmid):
        lo, hi = float(edges[k]), float(edges[k + 1])

        def mem(t, a, b, lo=lo, hi=hi):
            th = (np.arctan2(b, a) - th0) % (2 * np.pi)
            return ((g1(t, a, b) >= 0) & (g2(t, a, b) < 0) & (th >= lo) & (th < hi)).astype(F32)

        mid = th0 + 0.5 * (lo + hi)
        radial_d = math.cos(mid + ang)
        disp = rng.uniform(1.2, 4.5) * (0.4 + sev)
        frags.append(Fragment(mem, zone, rot=rng.uniform(-0.3, 0.3), pivot=(t_f, radial_d * r * 0.6),
                              shift=(rng.uniform(-2, 2), radial_d * disp + _sign(rng) * 0.6)))
    return _finish(bone, "comminuted", frags, t_f, {"fragments": len(frags), "segment_mm": w})


def _greenstick(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.25, 0.75)
    if t_f is None:
        return None
    r = bone.prof.at(t_f)
    side = _sign(rng)
    n = _tilt_normal(bone, rng, rng.uniform(0, 0.15))
    g = _plane(t_f, n)
    R = float(bone.prof.r_out.max())
    half = R * 0.16 + 1.5
    zone = (t_f - half, t_f + half)
    bend = rng.uniform(math.radians(4), math.radians(13))
    rot = -side * bend
    frags = [Fragment(_side(g, False), zone),
             Fragment(_side(g, True), zone, rot=rot, pivot=(t_f, -side * r * 0.97 * bone.kw), shift=(0.0, 0.0))]
    return _finish(bone, "greenstick", frags, t_f, {"bend_deg": math.degrees(bend)})


def _hairline(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.2, 0.8)
    if t_f is None:
        return None
    tilt = rng.uniform(0, math.radians(40))
    n = _tilt_normal(bone, rng, tilt, spread=0.35)
    g = _plane(t_f, n, rough=(0.12, 0.8, 0.8, 0.0, 1.0, 2.0))
    # keep the line at least ~0.9 px wide so it survives sampling at the native resolution
    width = max(rng.uniform(0.3, 0.7), 0.9 * scene.extras.get("spacing", 0.2))
    contrast = rng.uniform(0.45, 0.85)
    r = bone.prof.at(t_f)
    partial = rng.random() < 0.45
    cut = rng.uniform(-0.5, 0.2) * r
    sd = _sign(rng)
    c, s = math.cos(bone.phi), math.sin(bone.phi)

    def mem(t, a, b):
        slab = np.abs(g(t, a, b)) < width / 2
        if partial:
            dview = a * c - b * s
            slab &= sd * dview > cut
        return (1.0 - contrast * slab).astype(F32)

    R = float(bone.prof.r_out.max()) * 1.05
    half = R * math.tan(tilt) + width + 1.0
    frags = [Fragment(mem, (t_f - half, t_f + half))]
    return _finish(bone, "hairline", frags, t_f, {"width_mm": width, "contrast": contrast, "partial": partial})


def _impacted(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.15, 0.85)
    if t_f is None:
        return None
    sev = _severity(rng)
    tilt = rng.uniform(0, math.radians(12))
    n = _tilt_normal(bone, rng, tilt)
    g = _plane(t_f, n)
    R = float(bone.prof.r_out.max()) * 1.05
    over = rng.uniform(1.5, 4.5) * (0.6 + 0.4 * sev) * max(bone.prof.at(t_f) / 10.0, 0.45)
    half = R * math.tan(tilt) + over + 1.5
    zone = (t_f - half, t_f + half)
    crush = rng.uniform(0.25, 0.6)  # the driven-in trabecular ends are compacted, not simply doubled

    def dist(t, a, b):
        gg = g(t, a, b)
        return (gg >= 0) * (1.0 - crush * np.exp(-np.maximum(gg, 0.0) / max(over, 0.5)))

    frags = [Fragment(_side(g, False), zone),
             Fragment(dist, zone, rot=_sign(rng) * rng.uniform(0, 0.09), pivot=(t_f, 0.0),
                      shift=(-over, _sign(rng) * rng.uniform(0, 0.8)))]
    return _finish(bone, "impacted", frags, t_f, {"overlap_mm": over})


def _longitudinal(bone, scene, rng):
    vr = visible_range(bone, scene)
    if vr is None:
        return None
    L = bone.length
    r_mid = bone.prof.at(L / 2)
    D = 2 * r_mid
    ell = rng.uniform(2.5, 5.0) * D
    lo, hi = max(0.15 * L, vr[0]), min(0.85 * L, vr[1])
    if hi - lo < 1.2 * D:
        return None
    ell = min(ell, hi - lo)
    t1 = lo + rng.random() * max(hi - lo - ell, 0.0)
    t2 = t1 + ell
    t_f = 0.5 * (t1 + t2)
    dlt = rng.uniform(-math.radians(12), math.radians(12))
    bv = rng.uniform(-0.6, 0.6)
    n = _to_anat(bone, (math.sin(dlt), math.cos(dlt) * math.cos(bv), math.cos(dlt) * math.sin(bv)))
    off = rng.uniform(-0.45, 0.45) * r_mid
    a0, b0 = _view_point(bone, off, 0.0)
    g = _plane(t_f, n, a0, b0)
    taper = rng.uniform(1.5, 4.0)

    def piece(t, a, b):
        gg = g(t, a, b)
        return ((gg > 0) & (t > t1 + taper * gg) & (t < t2 - taper * gg)).astype(F32)

    def rest(t, a, b):
        return 1.0 - piece(t, a, b)

    R = float(bone.prof.r_out.max()) * 1.05
    zone = (t1 - R - 2, t2 + R + 2)
    sev = _severity(rng)
    sd = 1.0 if n[1] * math.cos(bone.phi) - n[2] * math.sin(bone.phi) >= 0 else -1.0
    frags = [Fragment(rest, zone),
             Fragment(piece, zone, rot=_sign(rng) * rng.uniform(0, 0.03), pivot=(t_f, off * bone.kw),
                      shift=(rng.uniform(-1.5, 1.5) * sev, sd * (0.45 + 2.0 * sev * rng.random())))]
    return _finish(bone, "longitudinal", frags, t_f, {"length_mm": ell, "offset_mm": off})


def _avulsion(bone, scene, rng):
    vr = visible_range(bone, scene, 0.05)
    if vr is None:
        return None
    L = bone.length
    ends = []
    if vr[1] > L - 2:
        ends.append("d")
    if vr[0] < 2:
        ends.append("p")
    if not ends:
        return None
    end = ends[int(rng.integers(len(ends)))]
    r_end = float(bone.prof.r_out[-1 if end == "d" else 0])
    r_end = max(r_end, float(np.max(bone.prof.r_out[-30:] if end == "d" else bone.prof.r_out[:30])))
    off = r_end * rng.uniform(0.45, 1.3)
    t_a = L - off if end == "d" else off
    r_a = bone.prof.at(t_a)
    side = _sign(rng)
    rho = r_a * rng.uniform(0.28, 0.45)
    zc = rng.uniform(-0.35, 0.35) * r_a
    dc = side * math.sqrt(max(r_a**2 - zc**2, 0)) * 0.92
    ac, bc = _view_point(bone, dc, zc)
    el = rng.uniform(1.0, 1.6)

    def frag(t, a, b):
        return ((((t - t_a) / el) ** 2 + (a - ac) ** 2 + (b - bc) ** 2) < rho * rho).astype(F32)

    def rest(t, a, b):
        return 1.0 - frag(t, a, b)

    zone = (t_a - rho * el - 1, t_a + rho * el + 1)
    sev = _severity(rng)
    away = side * (0.8 + rng.uniform(0.8, 4.0) * sev) * max(r_a / 10, 0.4)
    pull = (1 if end == "p" else -1) * rng.uniform(-0.5, 3.0) * sev * max(r_a / 10, 0.4)
    frags = [Fragment(rest, zone),
             Fragment(frag, zone, rot=rng.uniform(-0.7, 0.7), pivot=(t_a, dc * bone.kw), shift=(pull, away),
                      mask_all=True)]
    info = _finish(bone, "avulsion", frags, t_a, {"fragment_mm": 2 * rho, "end": end})
    info.extra_mask.append((bone.world(t_a + pull, dc * bone.kw + away), rho * 1.2))
    return info


def _pathological(bone, scene, rng):
    t_f = _choose_site(bone, scene, rng, 0.15, 0.85)
    if t_f is None:
        return None
    sev = _severity(rng) * 0.6
    r = bone.prof.at(t_f)
    lt = rng.uniform(0.9, 1.8) * r
    lr = rng.uniform(0.7, 1.0) * r
    off = rng.uniform(0.25, 0.6) * r
    # eccentric lesion, mostly toward a cortex seen in profile, so the cortical thinning is visible
    ca, cb = _view_point(bone, _sign(rng) * off, rng.uniform(-0.3, 0.3) * off)
    depth = rng.uniform(0.7, 0.95)

    def lesion(t, a, b):
        q = ((t - t_f) / lt) ** 2 + ((a - ca) ** 2 + (b - cb) ** 2) / (lr * lr)
        return 1.0 - depth * smoothstep((1.0 - q) / 0.3)

    tilt = rng.uniform(0, math.radians(35))
    n = _tilt_normal(bone, rng, tilt)
    g = _plane(t_f + rng.uniform(-0.3, 0.3) * lt, n)
    R = float(bone.prof.r_out.max()) * 1.05
    half = max(R * math.tan(tilt), lt) + 2.0
    zone = (t_f - half, t_f + half)
    gap = sev * rng.uniform(0.2, 2.0) + 0.35
    frags = [Fragment(lambda t, a, b: (g(t, a, b) < 0) * lesion(t, a, b), zone),
             Fragment(lambda t, a, b: (g(t, a, b) >= 0) * lesion(t, a, b), zone,
                      rot=_sign(rng) * sev * rng.uniform(0, 0.15), pivot=(t_f, 0.0),
                      shift=(gap, _sign(rng) * sev * rng.uniform(0, 0.4) * 2 * r))]
    return _finish(bone, "pathological", frags, t_f, {"lesion_mm": 2 * lt, "lesion_depth": depth})


def _fracture_dislocation(bone: Bone, joint, scene: Scene, rng: np.random.Generator):
    vr = visible_range(bone, scene, 0.05)
    if vr is None:
        return None
    L = bone.length
    pv = joint.pivot
    inside = (0.03 * scene.width_mm < pv[0] < 0.97 * scene.width_mm
              and 0.03 * scene.height_mm < pv[1] < 0.97 * scene.height_mm)
    if joint.end != "d" or not inside:
        return None
    r_end = float(np.max(bone.prof.r_out[-40:]))
    t_f = L - r_end * rng.uniform(1.0, 2.0)
    if t_f < vr[0] + 2 or t_f > vr[1] + r_end:
        return None
    sev = _severity(rng)
    tilt = rng.uniform(0, math.radians(45))
    frags, p = _complete(bone, rng, t_f, tilt, 0.5 + 0.5 * sev, gap=(0.2, 1.5), disp=(0.05, 0.3), ang=(0.05, 0.25))
    bone.fragments = frags
    rot = _sign(rng) * rng.uniform(math.radians(12), math.radians(38))
    w = joint.width
    n = np.array([-bone.u[1], bone.u[0]])
    shift = n * _sign(rng) * rng.uniform(0.45, 1.0) * w + bone.u * rng.uniform(-0.2, 0.45) * w
    info = FractureInfo(bone.name, "fracture_dislocation", bone.world(t_f), params=p)
    info.dislocation = (joint.partners, joint.pivot.copy(), rot, shift)
    info.extra_mask.append((joint.pivot + shift * 0.5, 0.75 * w + 0.5 * float(np.hypot(*shift))))
    return info


_BUILDERS = {
    "transverse": _transverse,
    "oblique": _oblique,
    "spiral": _spiral,
    "comminuted": _comminuted,
    "greenstick": _greenstick,
    "hairline": _hairline,
    "impacted": _impacted,
    "longitudinal": _longitudinal,
    "avulsion": _avulsion,
    "pathological": _pathological,
}
