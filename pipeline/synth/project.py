"""Analytic ray integrals: the digitally reconstructed radiograph of a :class:`~.anatomy.Scene`.

Rays are parallel to the detector normal (z).  For a pixel at perpendicular distance ``d`` from a bone's
axis at axial position ``t`` the chord through a radius-``r`` circle is ``2*sqrt(r^2 - d^2)``; the cortical
path is the outer chord minus the medullary chord.  Fragments of a broken bone are the bone clipped by
cutting surfaces given in the bone's 3-D frame; where a surface crosses a ray the fraction of the path that
belongs to the fragment is integrated with stratified, jittered samples along z.  The result is the line
integral of the linear attenuation coefficient (dimensionless, ``sum mu_i * L_i``) per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .anatomy import Blob, Bone, Envelope, Fragment

# linear attenuation coefficients (1/mm) at a nominal ~60 kVp; bone values are *excess* over soft tissue
MU_SOFT = 0.021
MU_FAT = 0.017
MU_CORTEX = 0.052
MU_TRAB = 0.019
MU_METAL = 0.45


@dataclass
class Canvas:
    h: int
    w: int
    s: float  # mm per pixel

    def box(self, pts: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
        x0 = int(math.floor((pts[:, 0].min() - margin) / self.s))
        x1 = int(math.ceil((pts[:, 0].max() + margin) / self.s))
        y0 = int(math.floor((pts[:, 1].min() - margin) / self.s))
        y1 = int(math.ceil((pts[:, 1].max() + margin) / self.s))
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.w), min(y1, self.h)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1

    def grid(self, bx: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        x0, y0, x1, y1 = bx
        xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) * self.s)[None, :]
        ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) * self.s)[:, None]
        return xs, ys


def coarse_canvas(cv: Canvas, step_mm: float = 1.0) -> tuple[Canvas, int]:
    """A decimated canvas (integer factor) for smooth layers; upsample with :func:`upsample`."""
    f = max(1, int(step_mm / cv.s))
    return Canvas(-(-cv.h // f), -(-cv.w // f), cv.s * f), f


def upsample(img: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
    if f == 1:
        return img
    big = cv2.resize(img, (img.shape[1] * f, img.shape[0] * f), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(big[:h, :w])


_TEXTURES: dict[int, list[np.ndarray]] = {}


def make_texture(rng: np.random.Generator, n: int = 128) -> np.ndarray:
    """A trabecular texture tile for one image: one of 8 per-process tiles (built from a constant seed),
    randomly rolled and flipped by ``rng`` -- deterministic, and cheaper than building a tile per image."""
    tiles = _TEXTURES.get(n)
    if tiles is None:  # built once per process; a concurrent duplicate build yields identical tiles
        base_rng = np.random.default_rng(0x7EC5)
        tiles = [_texture_tile(base_rng, n) for _ in range(8)]
        _TEXTURES[n] = tiles
    k, fl, oy, ox = (int(v) for v in rng.integers(0, 1 << 16, 4))
    tex = np.roll(tiles[k % len(tiles)], (oy % n, ox % n), axis=(0, 1))
    if fl & 1:
        tex = tex[::-1]
    if fl & 2:
        tex = tex[:, ::-1]
    return np.ascontiguousarray(tex)


def _texture_tile(rng: np.random.Generator, n: int) -> np.ndarray:
    """Tileable trabecular texture: anisotropic band-pass noise, mean ~1, streaks along the bone axis."""
    base = np.tile(rng.standard_normal((n, n)).astype(np.float32), (3, 3))
    a = cv2.GaussianBlur(base, (0, 0), sigmaX=0.8, sigmaY=1.8)[n:2 * n, n:2 * n]
    b = cv2.GaussianBlur(base, (0, 0), sigmaX=2.5, sigmaY=5.0)[n:2 * n, n:2 * n]
    tex = a - 0.8 * b
    tex /= float(tex.std()) + 1e-6
    return (1.0 + 0.28 * np.tanh(tex)).astype(np.float32)


def render_envelope(P: np.ndarray, cv: Canvas, env: Envelope, tissue: np.ndarray) -> None:
    """Soft-tissue chord (muscle inside fat); ``tissue`` collects the max chord for union of segments."""
    L = float(env.t[-1])
    pts = np.array([env.p0, env.p0 + env.u * L])
    bx = cv.box(pts, float(env.r.max()) + 2)
    if bx is None:
        return
    xs, ys = cv.grid(bx)
    dx, dy = xs - np.float32(env.p0[0]), ys - np.float32(env.p0[1])
    ux, uy = np.float32(env.u[0]), np.float32(env.u[1])
    t = dx * ux + dy * uy
    d = -dx * uy + dy * ux
    r = np.interp(t, env.t, env.r).astype(np.float32)
    # rounded ends (only matters where the limb ends inside the field, e.g. fingertips, palm)
    r0, r1 = float(env.r[0]), float(env.r[-1])
    c0, c1 = 0.7 * r0, 0.7 * r1
    r = np.where(t < 0, r0 * np.sqrt(np.clip(1 - (t / c0) ** 2, 0, 1)), r)
    r = np.where(t > L, r1 * np.sqrt(np.clip(1 - ((t - L) / c1) ** 2, 0, 1)), r)
    ho = np.sqrt(np.maximum(r * r - d * d, 0.0))
    ri = np.maximum(r - env.fat, 0.0)
    hi = np.sqrt(np.maximum(ri * ri - d * d, 0.0))
    val = (2 * env.flat) * (MU_FAT * ho + (MU_SOFT - MU_FAT) * hi)
    x0, y0, x1, y1 = bx
    np.maximum(tissue[y0:y1, x0:x1], val, out=tissue[y0:y1, x0:x1])


def render_blob(P: np.ndarray, cv: Canvas, b: Blob, tex: np.ndarray, mu_c: float, mu_t: float,
                dx_: float = 0.0, dy_: float = 0.0, rot: float = 0.0, pivot: np.ndarray | None = None) -> None:
    c = b.c.copy()
    ang = b.angle
    if pivot is not None:
        cr, sr = math.cos(rot), math.sin(rot)
        v = c - pivot
        c = pivot + np.array([cr * v[0] - sr * v[1], sr * v[0] + cr * v[1]]) + np.array([dx_, dy_])
        ang += rot
    A, B, C = b.ax
    R = max(A, B)
    bx = cv.box(c[None, :], R + 1)
    if bx is None:
        return
    xs, ys = cv.grid(bx)
    ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
    X, Y = xs - np.float32(c[0]), ys - np.float32(c[1])
    u = X * ca + Y * sa
    v = -X * sa + Y * ca
    q = 1.0 - (u / A) ** 2 - (v / B) ** 2
    sh = b.shell
    Ai, Bi, Ci = max(A - sh, 0.3), max(B - sh, 0.3), max(C - sh, 0.3)
    qi = 1.0 - (u / Ai) ** 2 - (v / Bi) ** 2
    ch = 2 * C * np.sqrt(np.maximum(q, 0.0))
    chi = 2 * Ci * np.sqrt(np.maximum(qi, 0.0))
    x0, y0, x1, y1 = bx
    sc = np.float32(1.0 / max(0.3, 0.75 * cv.s))
    tx = cv2.remap(tex, (u * sc).astype(np.float32), (v * sc).astype(np.float32), cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_WRAP)
    P[y0:y1, x0:x1] += b.density * (mu_c * (ch - chi) + 0.85 * mu_t * tx * chi)


def _rotate(a: np.ndarray, b: np.ndarray, ang: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(ang), math.sin(ang)
    return a * c + b * s, -a * s + b * c


def render_bone(P: np.ndarray, M: np.ndarray | None, cv: Canvas, bone: Bone, tex: np.ndarray,
                rng: np.random.Generator, mu_c: float, mu_t: float) -> None:
    """Add one long bone (all its fragments) to the attenuation map ``P``; mark cut surfaces in ``M``.

    An intact bone is processed in axial segments, each with its own tight bounding box (less wasted
    work for oblique bones and narrow shafts); a broken one in a single box covering all fragments.
    """
    prof = bone.prof
    L = prof.length
    frags = bone.fragments or [Fragment()]
    nl = 1024
    kl = (nl - 1) / L
    tl = np.linspace(0.0, L, nl)
    pad = np.zeros(1, np.float32)
    lut_o = np.concatenate([pad, np.interp(tl, prof.t, prof.r_out).astype(np.float32), pad])
    lut_i = np.concatenate([pad, np.interp(tl, prof.t, prof.r_in).astype(np.float32), pad])
    lut_t = np.concatenate([pad, np.interp(tl, prof.t, prof.trab).astype(np.float32), pad])
    lut_b = np.concatenate([pad, (bone.bow * np.sin(np.pi * tl / L)).astype(np.float32), pad])  # bowing
    parts: list[tuple[tuple[int, int, int, int], tuple[float, float] | None]] = []
    if bone.fragments is None:
        rmid = max(float(np.interp(L / 2, prof.t, prof.r_out)), 1.0)
        nseg = int(min(max(math.ceil(L / (5.0 * rmid)), 1), 10))
        edges = np.linspace(0.0, L, nseg + 1)
        for k in range(nseg):
            ta, tb = float(edges[k]), float(edges[k + 1])
            near = (prof.t >= ta - 1.0) & (prof.t <= tb + 1.0)
            rseg = float(prof.r_out[near].max()) if near.any() else rmid
            bx = cv.box(np.array([bone.world(ta), bone.world(tb)]), rseg * bone.kw + abs(bone.bow) + 2.0)
            if bx is not None:
                parts.append((bx, (-1e9 if k == 0 else ta, 1e9 if k == nseg - 1 else tb)))
    else:
        rmax = float(prof.r_out.max())
        pts = [bone.p0, bone.world(L)]
        for f in frags:
            if f.shift != (0.0, 0.0) or f.rot:
                for tt in (0.0, L):
                    tt2, dd2 = _fwd(f, tt, 0.0)
                    pts.append(bone.world(tt2, dd2))
        bx = cv.box(np.array(pts), rmax + abs(bone.bow) + 2.0)
        if bx is not None:
            parts.append((bx, None))
    ux, uy = np.float32(bone.u[0]), np.float32(bone.u[1])
    for bx, seg_t in parts:
        x0, y0, x1, y1 = bx
        xs, ys = cv.grid(bx)
        dx, dy = xs - np.float32(bone.p0[0]), ys - np.float32(bone.p0[1])
        t_img = dx * ux + dy * uy
        d_img = -dx * uy + dy * ux
        bh, bw = y1 - y0, x1 - x0
        acc = np.zeros(bh * bw, np.float32)
        macc = np.zeros(bh * bw, bool) if M is not None else None
        for f in frags:
            if f.shift == (0.0, 0.0) and f.pivot == (0.0, 0.0) and not f.rot:
                t, d = t_img, d_img
            else:
                t = t_img - np.float32(f.shift[0] + f.pivot[0])
                d = d_img - np.float32(f.shift[1] + f.pivot[1])
                if f.rot:
                    cr, sr = np.float32(math.cos(-f.rot)), np.float32(math.sin(-f.rot))
                    t, d = cr * t - sr * d, sr * t + cr * d
                t = t + np.float32(f.pivot[0])
                d = d + np.float32(f.pivot[1])
            li = np.clip(t * np.float32(kl) + np.float32(1.5), 0, nl + 1).astype(np.int32)
            if bone.bow:
                d = d - lut_b[li]
            if bone.kw != 1.0:
                d = d * np.float32(1.0 / bone.kw)  # oval section: work in the circle-normalised frame
            ro = lut_o[li]
            inside = np.abs(d) < ro
            if seg_t is not None:
                if seg_t[0] > -1e8:
                    inside &= t_img >= seg_t[0]
                if seg_t[1] < 1e8:
                    inside &= t_img < seg_t[1]
            idx = np.flatnonzero(inside)
            if idx.size == 0:
                continue
            # from here on work only on the pixels whose ray meets the bone
            t = t.ravel()[idx]
            d = d.ravel()[idx]
            li = li.ravel()[idx]
            ro = ro.ravel()[idx]
            ri = lut_i[li]
            d2 = d * d
            ho = np.sqrt(np.maximum(ro * ro - d2, 0.0))
            hi = np.sqrt(np.maximum(ri * ri - d2, 0.0))
            cort = 2 * (ho - hi)
            med = 2 * hi
            trab = lut_t[li]
            tn_ = tex.shape[0]
            ts_ = np.float32(1.0 / max(0.25, 0.75 * cv.s))  # texels per mm: never much finer than a pixel
            ix = (d * ts_ + np.float32(4096)).astype(np.int32) & (tn_ - 1)
            iy = (t * ts_ + np.float32(4096)).astype(np.int32) & (tn_ - 1)
            tx = tex.ravel()[iy * tn_ + ix]
            if bone.nutrient is not None:
                tn, side, slope = bone.nutrient
                near = np.abs(t - tn) < 2.5 * ro
                if near.any():
                    rr = np.maximum(ro, 1e-3)
                    band = np.exp(-(((t - tn) - slope * (d - side * rr)) / 0.45) ** 2)
                    band *= (side * d > 0.35 * rr) & near
                    cort = cort * (1.0 - 0.55 * band)
            wc = wm = None
            if f.member is not None:
                ang = bone.phi + f.twist
                a0, b0 = _rotate(d, np.zeros_like(d), ang)
                w0 = np.asarray(f.member(t, a0, b0), dtype=np.float32)
                wc = w0.copy()
                wm = w0.copy()
                edge = np.zeros(w0.shape, bool)
                z0, z1 = f.zone
                sel = np.flatnonzero((t >= z0) & (t <= z1))
                if sel.size:
                    ts = t[sel][:, None]
                    ds = d[sel][:, None]
                    hos = ho[sel][:, None]
                    his = hi[sel][:, None]
                    kc, km = 5, 6
                    j = rng.random((ts.shape[0], 1), dtype=np.float32)
                    fc = (np.arange(kc, dtype=np.float32)[None, :] + j) / kc
                    zc = his + fc * (hos - his)
                    zc = np.concatenate([zc, -zc], axis=1)
                    fm = (np.arange(km, dtype=np.float32)[None, :] + j) / km
                    zm = -his + fm * (2 * his)
                    ac, bc = _rotate(np.broadcast_to(ds, zc.shape), zc, ang)
                    am, bm = _rotate(np.broadcast_to(ds, zm.shape), zm, ang)
                    tsc = np.broadcast_to(ts, zc.shape)
                    tsm = np.broadcast_to(ts, zm.shape)
                    wc[sel] = np.asarray(f.member(tsc, ac, bc), dtype=np.float32).mean(axis=1)
                    wm[sel] = np.asarray(f.member(tsm, am, bm), dtype=np.float32).mean(axis=1)
                    if macc is not None and not f.mask_all:
                        # a cut seen edge-on does not mix along the ray: detect it across neighbouring pixels
                        dl = np.float32(max(cv.s, 0.25))
                        t1, d1 = ts[:, 0], ds[:, 0]
                        zero = np.zeros_like(d1)
                        a1, b1 = _rotate(d1, zero, ang)
                        ap, bp = _rotate(d1 + dl, zero, ang)
                        an, bn = _rotate(d1 - dl, zero, ang)
                        nb = np.stack([np.asarray(f.member(t1 + dl, a1, b1), dtype=np.float32),
                                       np.asarray(f.member(t1 - dl, a1, b1), dtype=np.float32),
                                       np.asarray(f.member(t1, ap, bp), dtype=np.float32),
                                       np.asarray(f.member(t1, an, bn), dtype=np.float32)])
                        edge[sel] = (nb.max(axis=0) - nb.min(axis=0)) > 0.3
                if macc is not None:
                    if f.mask_all:
                        mk = (wc > 0.3) | (wm > 0.3)
                    else:
                        wt = np.where(med > 0, 0.5 * (wc + wm), wc)
                        mk = ((wt > 0.04) & (wt < 0.96)) | edge
                    macc[idx] |= mk
            val = mu_c * cort * (wc if wc is not None else np.float32(1.0))
            val = val + mu_t * (trab * tx) * med * (wm if wm is not None else np.float32(1.0))
            for tg in bone.growth_plates:
                near = np.abs(t - tg) < 4.0
                if near.any():
                    wav = 0.6 * np.sin(d * 0.45) + 0.25 * np.sin(d * 1.3 + 1.0)
                    val = val * (1.0 - 0.85 * near * np.exp(-(((t - tg) - wav) / 0.9) ** 2))
            acc[idx] += np.float32(bone.density * f.density * bone.kt) * val
        P[y0:y1, x0:x1] += acc.reshape(bh, bw)
        if M is not None and macc is not None:
            M[y0:y1, x0:x1] |= macc.reshape(bh, bw)


def _fwd(f: Fragment, t: float, d: float) -> tuple[float, float]:
    tt, dd = t - f.pivot[0], d - f.pivot[1]
    cr, sr = math.cos(f.rot), math.sin(f.rot)
    tt, dd = cr * tt - sr * dd, sr * tt + cr * dd
    return tt + f.pivot[0] + f.shift[0], dd + f.pivot[1] + f.shift[1]
