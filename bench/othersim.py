"""othersim: an independently written synthetic bone-radiograph simulator, for out-of-family evaluation only.

What it is
    A second, independent source of synthetic limb radiographs with fracture labels. The project's own models
    are trained on the project's own generator; this file exists so they can also be scored on images whose
    construction shares nothing with that generator. It was written by a helper session under strict
    independence rules: it did not open, grep or import anything under ``pipeline/`` (except reading
    ``pipeline/training/datasets.py`` to match the CSV layout), ``docs/``, the other ``bench/`` files or any image
    the project generated; it was not tuned against the project's models or their scores. Every design choice
    below comes from general radiological knowledge. Do not use its output for training, or it stops being
    independent.

How it renders (a 2-D analytic model, not a ray tracer)
    * Each bone is a body of revolution about a (slightly bowed) axis. Its radius profile R(s) has a tapered
      shaft, trumpet-shaped metaphyseal flares, epiphyses and dome-shaped articular ends; an inner (medullary)
      radius r(s) leaves a thick cortex in the shaft and a thin one at the ends. The projected excess density at
      a point (s, d) is  2*rho_cortex*(sqrt(R^2-d^2) - sqrt(r^2-d^2)) + 2*rho_inner(s)*tex*sqrt(r^2-d^2),
      so cortices are bright lines along the edges, the shaft centre is greyer and the ends are filled with a
      directional trabecular texture. Carpals, tarsals and the patella are short capsules of the same kind.
    * Regions: single long bone (femur or humerus with the knee / elbow), paired bones (forearm, lower leg with
      the joints at both ends), hand and foot (rays of metacarpals/metatarsals and phalanges, carpal/tarsal
      blobs). Children get open growth plates (dark wavy transverse bands) and smaller epiphyses.
    * Soft tissue is a union (max) of elliptical-section sleeves with a fat layer. Confounders: nutrient
      canals, overlapping bones, skin folds, a lead L/R marker, collimation (bright or black, sometimes
      rotated), plaster/fibreglass casts, plates and screws on intact bones, burned-in text.
    * Fractures are rigid fragments in the bone's own coordinates: each fragment is a region bounded by
      fracture curves (jagged straight lines, S-curves, ellipses) with its own rotation/translation; a gap
      along a fracture curve removes density (dark line), overlapping fragments add (dense band). Lytic
      lesions thin the cortex and remove density; an avulsed fragment leaves a crater; a fracture-dislocation
      moves the distal chain of bones out of the joint. The label mask is the fracture curve band in every
      fragment's position (plus lesion / fragment), closed over the displacement, clipped to the field.
    * Exposure: I = I0*exp(-mu*path) with a heel-effect ramp, scatter veil, detector blur, Poisson-like
      quantum noise, log transform, optional unsharp-mask equalisation, a display window and random tone
      curve (gamma + S-curve), then 16-bit (~70 %) or 8-bit PNG. Bone is bright, air dark.

CLI
    .venv/bin/python bench/othersim.py --out DIR --count N --seed S [--workers K] [--fracture-rate 0.5]
                                       [--sheet PNG]
    Writes DIR/labels.csv (file,fracture,type,region,laterality,x0,y0,x1,y1,seed,index,width,height,child,bits),
    DIR/images/NNNNNN.png, DIR/masks/NNNNNN.png (8-bit 0/255) and DIR/othersim.json. Each image's RNG is
    ``np.random.default_rng([seed, index])`` so the output is identical whatever --workers is.
    In Python: ``render(seed, index, fracture_type=None, fracture=None)`` returns one sample as a dict.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

VERSION = "othersim-1.0"
TYPES = ("transverse", "oblique", "spiral", "comminuted", "greenstick", "hairline", "impacted",
         "longitudinal", "avulsion", "pathological", "fracture_dislocation")
HEADER = ["file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1",
          "seed", "index", "width", "height", "child", "bits"]
F32 = np.float32
DEG = math.pi / 180.0


def _sat(x):
    return np.clip(x, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- geometry
class Bone:
    """Body of revolution along a bowed axis. s: distance along the axis from the proximal shaft end (0) to
    the distal one (L); the articular domes extend to -cap0 and L+cap1. Local straight frame (a, b):
    a along the axis, b perpendicular; d = b - bow(a)."""

    def __init__(self, ox, oy, ang, L, Rs0, Rs1, Re0, Re1, m0, m1, cap0, cap1, rng, *, tc=0.3, tend=0.07,
                 rho_c=1.7, rho_can=0.35, rho_mar=0.03, bow=0.0, kind="long", name="", parent=-1,
                 solo=False, plates=(False, False), flare=2.0):
        self.name, self.kind, self.parent, self.solo = name, kind, parent, solo
        self.L, self.cap0, self.cap1 = float(L), float(cap0), float(cap1)
        self.rho_c, self.bow = float(rho_c), float(bow)
        self.set_pose(ox, oy, ang)
        self.lesion = None
        self.callus = None
        self.fracture = None
        self.canals = []
        self.plates = []
        ds = max(0.25, min(Rs0, Rs1, Re0, Re1) / 24.0)
        s = np.arange(-cap0 - 3 * ds, L + cap1 + 3 * ds, ds)
        u = np.clip(s / max(L, 1e-6), 0, 1)
        shaft = Rs0 + (Rs1 - Rs0) * u
        w0 = np.clip(1 - s / m0, 0, 1) ** flare if m0 > 0 else (s <= 0).astype(float)
        w1 = np.clip(1 - (L - s) / m1, 0, 1) ** flare if m1 > 0 else (s >= L).astype(float)
        R = shaft + (Re0 - shaft) * w0 + (Re1 - shaft) * w1
        lo, hi = s < 0, s > L
        R[lo] = Re0 * np.sqrt(np.clip(1 - (s[lo] / max(cap0, 1e-6)) ** 2, 0, 1))
        R[hi] = Re1 * np.sqrt(np.clip(1 - ((s[hi] - L) / max(cap1, 1e-6)) ** 2, 0, 1))
        wend = np.maximum(w0, w1)
        wend[lo | hi] = 1.0
        if m0 <= 0 and m1 <= 0:  # short / irregular bone: cancellous throughout
            wend[:] = 1.0
        Re_loc = np.where(s < L / 2, Re0, Re1)
        t = tc * shaft * (1 - wend) + tend * Re_loc * wend
        t = np.maximum(t, 0.9)
        for end, on in enumerate(plates):
            if not on:
                continue
            Re = Re0 if end == 0 else Re1
            sp = rng.uniform(0.1, 0.45) * Re
            sp = sp if end == 0 else L - sp
            ef = rng.uniform(0.78, 0.95)
            epi = (s < sp) if end == 0 else (s > sp)
            R[epi] *= ef
            self.plates.append((sp, rng.uniform(0.035, 0.08) * Re + 0.6, rng.uniform(0.7, 0.93),
                                rng.uniform(0.0, 0.08) * Re, rng.uniform(1.5, 4.5) / Re,
                                rng.uniform(0, 2 * math.pi)))
        r = np.maximum(R - t, 0)
        rin = rho_mar + (rho_can - rho_mar) * np.clip(wend * 1.6, 0, 1)
        R[0] = R[-1] = 0
        r[0] = r[-1] = 0
        self.s_lo, self.ds, self.n = float(s[0]), ds, len(s)
        self.s_hi = float(s[-1])
        self.R, self.r, self.rin = R.astype(F32), r.astype(F32), rin.astype(F32)
        self.Rmax = float(R.max())

    def set_pose(self, ox, oy, ang):
        self.ox, self.oy, self.ang = float(ox), float(oy), float(ang)
        self.ux, self.uy = math.cos(ang), math.sin(ang)

    # profile look-ups
    def _i(self, s):
        i = ((np.asarray(s) - self.s_lo) / self.ds).astype(np.int32)
        return np.clip(i, 0, self.n - 1)

    def R_at(self, s):
        return float(self.R[self._i(s)])

    def r_at(self, s):
        return float(self.r[self._i(s)])

    def bowf(self, a):
        if self.bow == 0.0:
            return 0.0
        u = np.clip(a / self.L, 0, 1)
        return self.bow * 4 * u * (1 - u)

    def to_img(self, a, b):
        return self.ox + a * self.ux - b * self.uy, self.oy + a * self.uy + b * self.ux

    def to_loc(self, x, y):
        dx, dy = x - self.ox, y - self.oy
        return dx * self.ux + dy * self.uy, -dx * self.uy + dy * self.ux

    def axis_pt(self, s, d=0.0):
        return self.to_img(s, d + float(self.bowf(np.float64(s))))

    def T(self, s, d, tex):
        i = ((s - self.s_lo) * (1.0 / self.ds)).astype(np.int32)
        np.clip(i, 0, self.n - 1, out=i)
        R, r, rin = self.R[i], self.r[i], self.rin[i]
        w = None
        if self.lesion is not None:
            w = self.lesion.weight(s, d)
            R = R * (1 + self.lesion.expand * w)
            r = r + (R - r) * (self.lesion.thin * w)
            rin = rin * (1 - w) - 0.04 * w
        d2 = d * d
        cR = np.sqrt(np.maximum(R * R - d2, 0))
        cr = np.sqrt(np.maximum(r * r - d2, 0))
        T = (2 * self.rho_c) * (cR - cr) + 2 * rin * cr * tex
        if w is not None:
            T *= 1 - self.lesion.lyt * w
        for sp, hw, depth, amp, fq, ph in self.plates:
            sel = np.abs(s - sp) < hw + amp + 1.5
            if sel.any():
                dist = np.abs(s[sel] - sp - amp * np.sin(d[sel] * fq + ph))
                T[sel] *= 1 - depth * _sat(hw - dist + 0.5)
        for cs, cd, cux, cuy, hl, hw, depth in self.canals:
            sel = np.abs(s - cs) < hl + 2
            if sel.any():
                x, y = s[sel] - cs, d[sel] - cd
                along, perp = x * cux + y * cuy, -x * cuy + y * cux
                band = _sat(hw - np.abs(perp) + 0.5) * _sat(hl - np.abs(along) + 0.5)
                T[sel] *= 1 - depth * band
        if self.callus is not None:
            cs, la, rc, wc, rho = self.callus
            sel = np.abs(s - cs) < 2.5 * la
            if sel.any():
                g = np.exp(-((s[sel] - cs) / la) ** 2) * _sat(1 - np.abs(np.abs(d[sel]) - rc) / wc)
                T[sel] += rho * g * wc
        return T


class Soft:
    """Soft-tissue sleeve: elliptical cross-section (depth = ecc * half-width) with a fat layer."""

    def __init__(self, ox, oy, ang, L, radii, cap0, cap1, ecc=1.0, fat=0.15, fat_rho=0.88):
        self.ox, self.oy, self.ux, self.uy = ox, oy, math.cos(ang), math.sin(ang)
        self.L, self.cap0, self.cap1, self.ecc, self.fat, self.fat_rho = L, cap0, cap1, ecc, fat, fat_rho
        radii = np.asarray(radii, float)
        ds = 1.0 if L < 4000 else L / 4000
        s = np.arange(-cap0 - 2, L + cap1 + 2, ds)
        R = np.interp(np.clip(s, 0, L), np.linspace(0, L, len(radii)), radii)
        lo, hi = s < 0, s > L
        if cap0 > 0:
            R[lo] *= np.sqrt(np.clip(1 - (s[lo] / cap0) ** 2, 0, 1))
        if cap1 > 0:
            R[hi] *= np.sqrt(np.clip(1 - ((s[hi] - L) / cap1) ** 2, 0, 1))
        R[0] = R[-1] = 0
        self.s_lo, self.ds, self.n, self.R = float(s[0]), ds, len(s), R.astype(F32)
        self.Rmax = float(R.max())

    def box(self, H, W):
        pts = []
        for s in (self.s_lo, self.s_lo + self.ds * self.n):
            for b in (-self.Rmax, self.Rmax):
                pts.append((self.ox + s * self.ux - b * self.uy, self.oy + s * self.uy + b * self.ux))
        return _clip_box(pts, H, W, 2)

    def render(self, soft, H, W):
        bx = self.box(H, W)
        if bx is None:
            return
        x0, y0, x1, y1 = bx
        xs = np.arange(x0, x1, dtype=F32) - F32(self.ox)
        ys = np.arange(y0, y1, dtype=F32) - F32(self.oy)
        s = (xs * F32(self.ux))[None, :] + (ys * F32(self.uy))[:, None]
        d = (xs * F32(-self.uy))[None, :] + (ys * F32(self.ux))[:, None]
        i = ((s - self.s_lo) * (1.0 / self.ds)).astype(np.int32)
        np.clip(i, 0, self.n - 1, out=i)
        R = self.R[i]
        d2 = d * d
        Ri = R * (1 - self.fat)
        c = (2 * self.ecc) * (self.fat_rho * np.sqrt(np.maximum(R * R - d2, 0))
                              + (1 - self.fat_rho) * np.sqrt(np.maximum(Ri * Ri - d2, 0)))
        np.maximum(soft[y0:y1, x0:x1], c, out=soft[y0:y1, x0:x1])


def _clip_box(pts, H, W, pad=0):
    pts = np.asarray(pts, float)
    x0 = int(math.floor(pts[:, 0].min() - pad))
    y0 = int(math.floor(pts[:, 1].min() - pad))
    x1 = int(math.ceil(pts[:, 0].max() + pad)) + 1
    y1 = int(math.ceil(pts[:, 1].max() + pad)) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


# ----------------------------------------------------------------------------------------------- fractures
def _jagger(rng, amp):
    if amp <= 0:
        return None
    k = 3
    w = rng.uniform(0.12, 1.0, k)
    ph = rng.uniform(0, 2 * math.pi, k)
    a = rng.uniform(0.3, 1.0, k)
    a = a * amp / a.sum()

    def jag(t):
        return a[0] * np.sin(w[0] * t + ph[0]) + a[1] * np.sin(w[1] * t + ph[1]) + a[2] * np.sin(w[2] * t + ph[2])
    return jag


class _Line:
    """Straight fracture line through (s0, d0); psi is the angle of its normal to the bone axis
    (psi = 0: transverse). f > 0 on the distal side."""

    def __init__(self, s0, d0, psi, jag=None, g=2.0, depth=1.0, ext=None, in_mask=True):
        self.s0, self.d0, self.c, self.sn = s0, d0, math.cos(psi), math.sin(psi)
        self.jag, self.g, self.depth, self.ext, self.in_mask, self.region = jag, g, depth, ext, in_mask, False

    def f(self, s, d):
        x, y = s - self.s0, d - self.d0
        v = x * self.c + y * self.sn
        if self.jag is not None:
            v = v + self.jag(y * self.c - x * self.sn)
        return v


class _SCurve:
    """S-shaped (spiral) fracture: s = s0 + A*sin(pi/2 * d/Rl)."""

    def __init__(self, s0, A, Rl, jag=None, g=2.0, depth=1.0):
        self.s0, self.A, self.Rl, self.jag, self.g, self.depth = s0, A, Rl, jag, g, depth
        self.ext, self.in_mask, self.region = None, True, False

    def f(self, s, d):
        q = np.clip(d / self.Rl, -1.0, 1.0)
        k = math.pi / 2
        sl = self.s0 + self.A * np.sin(k * q)
        slope = np.where(np.abs(d) < self.Rl, self.A * k / self.Rl * np.cos(k * q), 0.0)
        v = (s - sl) / np.sqrt(1 + slope * slope)
        if self.jag is not None:
            v = v + self.jag(d * 1.7)
        return v


class _Ellipse:
    """Closed region (signed distance-like, negative inside): avulsed fragment or lytic lesion."""

    def __init__(self, sc, dc, a, b, rot=0.0, lobes=0.0, rng=None, in_mask=True):
        self.sc, self.dc, self.a, self.b = sc, dc, a, b
        self.c, self.sn = math.cos(rot), math.sin(rot)
        self.lob = lobes
        self.lk = int(rng.integers(3, 6)) if rng is not None else 3
        self.lph = float(rng.uniform(0, 2 * math.pi)) if rng is not None else 0.0
        self.g, self.depth, self.ext, self.in_mask, self.region = 0.0, 0.0, None, in_mask, True

    def rho(self, s, d):
        x, y = s - self.sc, d - self.dc
        u, v = (x * self.c + y * self.sn) / self.a, (-x * self.sn + y * self.c) / self.b
        rho = np.sqrt(u * u + v * v)
        if self.lob:
            rho = rho * (1 + self.lob * np.sin(self.lk * np.arctan2(v, u) + self.lph))
        return rho

    def f(self, s, d):
        return (self.rho(s, d) - 1) * min(self.a, self.b)


class _Lesion:
    def __init__(self, ell, thin, lyt, expand):
        self.ell, self.thin, self.lyt, self.expand = ell, thin, lyt, expand

    def weight(self, s, d):
        w = _sat((1 - self.ell.rho(s, d)) * 2.5)
        return w * w * (3 - 2 * w)


class _Frag:
    def __init__(self, signs=(), phi=0.0, P=(0.0, 0.0), t=(0.0, 0.0)):
        self.signs, self.phi, self.P, self.t = tuple(signs), float(phi), P, t
        self.c, self.s = math.cos(phi), math.sin(phi)
        self.wp = self.wd = 1.0
        self.identity = phi == 0 and t[0] == 0 and t[1] == 0

    def fwd(self, a, b):
        x, y = a - self.P[0], b - self.P[1]
        return self.c * x - self.s * y + self.P[0] + self.t[0], self.s * x + self.c * y + self.P[1] + self.t[1]

    def inv(self, a, b):
        x, y = a - self.P[0] - self.t[0], b - self.P[1] - self.t[1]
        return self.c * x + self.s * y + self.P[0], -self.s * x + self.c * y + self.P[1]


class _Fracture:
    def __init__(self, lines, frags, site, margin=2.0, close=3, hull=False):
        self.lines, self.frags, self.site = lines, frags, site
        self.margin, self.close, self.hull = margin, close, hull

    def finish(self):
        a0, a1 = self.site[0], self.site[1]
        for fg in self.frags:
            pp = self.member(fg, np.array([a0 - 3.0]), np.array([0.0]))[0]
            pd = self.member(fg, np.array([a1 + 3.0]), np.array([0.0]))[0]
            fg.wp, fg.wd = float(round(pp)), float(round(pd))
        return self

    def member(self, fg, s, d, F=None):
        if F is None:
            F = [ln.f(s, d) for ln in self.lines]
        m = np.ones_like(s)
        for k, sg in enumerate(fg.signs):
            if sg > 0:
                m = m * _sat(F[k] + 0.5)
            elif sg < 0:
                m = m * _sat(0.5 - F[k])
        return m

    def exact(self, fg, s, d):
        F = [ln.f(s, d) for ln in self.lines]
        m = self.member(fg, s, d, F)
        for k, ln in enumerate(self.lines):
            if ln.depth <= 0 or ln.g <= 0:
                continue
            if ln.ext is not None:
                e = ln.ext(s, d)
                band = _sat(ln.g * e / 2 - np.abs(F[k]) + 0.5) * _sat(e * 4)
            else:
                band = _sat(ln.g / 2 - np.abs(F[k]) + 0.5)
            m = m * (1 - ln.depth * band)
        return m

    def mdist(self, s, d):
        out = np.full(s.shape, 1e9, dtype=F32)
        for ln in self.lines:
            if not ln.in_mask:
                continue
            v = ln.f(s, d)
            v = v if ln.region else np.abs(v) - ln.g / 2
            if ln.ext is not None:
                v = np.where(ln.ext(s, d) > 0, v, 1e9)
            out = np.minimum(out, v)
        return out


# ----------------------------------------------------------------------------------------------- bone render
def _aff(fn):
    """Affine coefficients (cx, cy, c0) of the two outputs of fn(x, y) (exactly affine maps)."""
    p0 = fn(0.0, 0.0)
    px = fn(1.0, 0.0)
    py = fn(0.0, 1.0)
    return [(px[k] - p0[k], py[k] - p0[k], p0[k]) for k in range(2)]


def _frag_loc_coords(bone, fg, box):
    """Original local (a, b) of each pixel of box, for fragment fg."""
    x0, y0, x1, y1 = box
    ca, cb = _aff(lambda x, y: fg.inv(*bone.to_loc(x, y)))
    xs = np.arange(x0, x1, dtype=np.float64)
    ys = np.arange(y0, y1, dtype=np.float64)
    a = (ca[0] * xs + ca[2]).astype(F32)[None, :] + (ca[1] * ys).astype(F32)[:, None]
    b = (cb[0] * xs + cb[2]).astype(F32)[None, :] + (cb[1] * ys).astype(F32)[:, None]
    return a, b


def _frag_box(bone, fg, slo, shi, rpad, H, W):
    ss = np.linspace(slo, shi, 5)
    pts = []
    for s in ss:
        bw = float(bone.bowf(np.float64(s)))
        for b in (bw - rpad, bw + rpad):
            pts.append(bone.to_img(*fg.fwd(s, b)))
    return _clip_box(pts, H, W, 2)


def _tex_for(bone, fg, tex, box):
    x0, y0, x1, y1 = box
    if fg.identity:
        return tex[y0:y1, x0:x1]
    cx, cy = _aff(lambda x, y: bone.to_img(*fg.inv(*bone.to_loc(x, y))))
    M = np.array([[cx[0], cx[1], cx[2] + cx[0] * x0 + cx[1] * y0],
                  [cy[0], cy[1], cy[2] + cy[0] * x0 + cy[1] * y0]], dtype=np.float64)
    return cv2.warpAffine(tex, M, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def _render_bone(bone, acc, tex, H, W):
    fr = bone.fracture
    frags = fr.frags if fr is not None else [_Frag()]
    rpad = bone.Rmax * 1.25 + 3 + (bone.callus[3] + bone.callus[2] if bone.callus else 0)
    for fg in frags:
        lo, hi = bone.s_lo, bone.s_hi
        if fr is not None:
            if fg.wp < 0.5:
                lo = max(lo, fr.site[0] - 1)
            if fg.wd < 0.5:
                hi = min(hi, fr.site[1] + 1)
        if hi <= lo:
            continue
        nch = max(1, int(math.ceil((hi - lo) / max(6 * bone.Rmax, 160))))
        edges = np.linspace(lo, hi, nch + 1)
        for k in range(nch):
            box = _frag_box(bone, fg, edges[k], edges[k + 1], rpad, H, W)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            a, b = _frag_loc_coords(bone, fg, box)
            d = b - bone.bowf(a) if bone.bow else b
            T = bone.T(a, d, _tex_for(bone, fg, tex, box))
            if fr is not None:
                Wt = np.full(a.shape, fg.wd, dtype=F32)
                Wt[a < fr.site[0]] = fg.wp
                mid = (a >= fr.site[0]) & (a <= fr.site[1])
                if mid.any():
                    Wt[mid] = fr.exact(fg, a[mid], d[mid])
                T *= Wt
            if k > 0:
                T *= a >= edges[k]
            if k < nch - 1:
                T *= a < edges[k + 1]
            acc[y0:y1, x0:x1] += T


def _fracture_mask(bone, H, W):
    fr = bone.fracture
    a0, a1, b0, b1 = fr.site
    pad = fr.margin + fr.close + 4
    pts = []
    for fg in fr.frags:
        for a in (a0, a1):
            for b in (b0, b1):
                bw = float(bone.bowf(np.float64(a)))
                pts.append(bone.to_img(*fg.fwd(a, b + bw)))
    box = _clip_box(pts, H, W, pad)
    if box is None:
        return None, None
    x0, y0, x1, y1 = box
    M = np.zeros((y1 - y0, x1 - x0), bool)
    for fg in fr.frags:
        a, b = _frag_loc_coords(bone, fg, box)
        d = b - bone.bowf(a) if bone.bow else b
        Rs = bone.R[bone._i(a)]
        if bone.lesion is not None:
            Rs = Rs * (1 + bone.lesion.expand)
        sel = (a >= a0) & (a <= a1) & (np.abs(d) < Rs * 1.05 + 1.5)
        if not sel.any():
            continue
        s_, d_ = a[sel], d[sel]
        ok = fr.mdist(s_, d_) < fr.margin
        if fg.signs:
            ok &= fr.member(fg, s_, d_) > 0.02
        Mi = np.zeros_like(M)
        Mi[sel] = ok
        M |= Mi
    m8 = M.astype(np.uint8) * 255
    if not m8.any():
        return None, None
    if fr.hull:
        pts = cv2.findNonZero(m8)
        hull = cv2.convexHull(pts)
        cv2.fillConvexPoly(m8, hull, 255)
    elif fr.close > 1:  # morphological closing with a disc, via distance transforms (cost independent of size)
        r = fr.close / 2.0
        dil = (cv2.distanceTransform((m8 == 0).astype(np.uint8), cv2.DIST_L2, 5) <= r).astype(np.uint8)
        ero = cv2.distanceTransform(dil, cv2.DIST_L2, 5) > r
        m8 = ((ero | (m8 > 0)) * 255).astype(np.uint8)
    return box, m8


# ----------------------------------------------------------------------------------------------- fracture builders
def _line_through(p1, p2, **kw):
    """Line through two (s, d) points; normal oriented towards +s."""
    ds_, dd = p2[0] - p1[0], p2[1] - p1[1]
    n = (dd, -ds_)
    if n[0] < 0 or (n[0] == 0 and n[1] < 0):
        n = (-n[0], -n[1])
    psi = math.atan2(n[1], n[0])
    return _Line(p1[0], p1[1], psi, **kw)


def _gap(rng, lo=1.0, hi=6.0):
    return lo + (hi - lo) * rng.random() ** 1.6


def _build_fracture(ftype, bone, s0, rng, side):
    """Attach a fracture of ftype at s0 to bone. side: +-1 (which cortex / direction)."""
    Rl = bone.R_at(s0)
    bw0 = float(bone.bowf(np.float64(s0)))
    c = side
    subtle = rng.random() < 0.2

    def disp(scale=1.0):
        if subtle or rng.random() < 0.3:
            return 0.0, 0.0, 0.0
        td = c * rng.uniform(0.05, 2.0) ** 1.3 * Rl * scale
        ts = rng.uniform(-0.35, 0.25) * Rl * scale
        phi = float(np.clip(rng.normal(0, 7), -20, 20)) * DEG * scale
        return ts, td, phi

    jag = _jagger(rng, rng.uniform(0.3, 1.4) + 0.02 * Rl)
    if ftype in ("transverse", "oblique"):
        psi = rng.uniform(-15, 15) * DEG if ftype == "transverse" else c * rng.uniform(33, 57) * DEG
        g = _gap(rng)
        depth = rng.uniform(0.35, 0.65) if subtle else rng.uniform(0.75, 1.0)
        ln = _Line(s0, 0.0, psi, jag, g=g, depth=depth)
        ts, td, phi = disp()
        ext_a = abs(math.tan(psi)) * Rl * 1.1 + 4 + g
        frags = [_Frag((-1,)), _Frag((1,), phi, (s0, bw0), (ts, td))]
        site = (s0 - ext_a, s0 + ext_a, -Rl * 1.3, Rl * 1.3)
        close = int(2 * math.hypot(ts, td) + 2 * Rl * abs(phi) + 3)
        fr = _Fracture([ln], frags, site, margin=rng.uniform(1.5, 3.0) + g / 2, close=close)
    elif ftype == "spiral":
        A = c * rng.uniform(2.3, 4.0) * Rl
        g = _gap(rng, 1.0, 4.5)
        cur = _SCurve(s0, A, Rl, jag, g=g, depth=rng.uniform(0.7, 1.0))
        lines = [cur]
        if rng.random() < 0.6:  # back wall of the helix, faint
            dl = -np.sign(A) * rng.uniform(0.3, 0.6) * Rl
            half = abs(A) * rng.uniform(0.6, 0.9)
            back = _Line(s0, dl, (90 + rng.uniform(-6, 6)) * DEG, None, g=rng.uniform(0.8, 1.8),
                         depth=rng.uniform(0.25, 0.5), ext=lambda s, d, s0=s0, h=half: _sat((h - np.abs(s - s0)) / 3))
            lines.append(back)
        ts, td, phi = disp(0.6)
        ts = -abs(ts) if ts else 0.0
        frags = [_Frag((-1,) + (0,) * (len(lines) - 1)),
                 _Frag((1,) + (0,) * (len(lines) - 1), phi, (s0, bw0), (ts, td))]
        site = (s0 - abs(A) - 6 - g, s0 + abs(A) + 6 + g, -Rl * 1.3, Rl * 1.3)
        fr = _Fracture(lines, frags, site, margin=rng.uniform(1.5, 3.0) + g / 2,
                       close=int(2 * math.hypot(ts, td) + 2 * Rl * abs(phi) + 3))
    elif ftype == "comminuted":
        g = _gap(rng, 1.0, 5.0)
        depth = rng.uniform(0.75, 1.0)
        if rng.random() < 0.6:  # butterfly
            w = rng.uniform(1.2, 3.0) * Rl
            apex = (s0 + rng.uniform(-0.3, 0.3) * Rl, c * Rl * 1.03)
            l1 = _line_through(apex, (s0 - w / 2, -c * Rl * 1.05), jag=_jagger(rng, 0.8), g=g, depth=depth)
            l2 = _line_through(apex, (s0 + w / 2, -c * Rl * 1.05), jag=_jagger(rng, 0.8), g=g, depth=depth)
            lines = [l1, l2]
            ts, td, phi = disp(0.7)
            wd = -c * rng.uniform(0.15, 0.8) * Rl
            wphi = rng.uniform(-20, 20) * DEG
            wc = (s0, -c * 0.5 * Rl + bw0)
            frags = [_Frag((-1, -1)), _Frag((1, 1), phi, (s0, bw0), (ts, td)),
                     _Frag((1, -1), wphi, wc, (rng.uniform(-0.3, 0.3) * Rl, wd))]
            if rng.random() < 0.4:  # split the wedge
                l3 = _Line(s0, -c * rng.uniform(0.2, 0.5) * Rl, (90 + rng.uniform(-25, 25)) * DEG, _jagger(rng, 0.6),
                           g=g * 0.7, depth=depth,
                           ext=lambda s, d, l1=l1, l2=l2: _sat(l1.f(s, d) + 0.5) * _sat(0.5 - l2.f(s, d)))
                lines.append(l3)
                frags = [_Frag((-1, -1, 0)), _Frag((1, 1, 0), phi, (s0, bw0), (ts, td)),
                         _Frag((1, -1, 1), wphi, wc, (rng.uniform(-0.3, 0.3) * Rl, wd)),
                         _Frag((1, -1, -1), -wphi, wc, (rng.uniform(-0.3, 0.3) * Rl, wd * rng.uniform(0.3, 1.2)))]
            ext_a = w / 2 + 0.5 * Rl + 6
            dmag = math.hypot(ts, td) + abs(wd)
        else:  # multi-fragment
            n = int(rng.integers(2, 4))
            offs = np.sort(rng.uniform(-1.1, 1.1, n)) * Rl
            offs = offs + np.arange(n) * 0.5 * Rl - (n - 1) * 0.25 * Rl
            lines = [_Line(s0 + o, rng.uniform(-0.5, 0.5) * Rl, rng.uniform(-55, 55) * DEG, _jagger(rng, 0.8),
                           g=g, depth=depth) for o in offs]
            ts, td, phi = disp(0.7)
            frags = []
            dmag = math.hypot(ts, td)
            for code in range(2 ** n):
                signs = tuple(1 if (code >> k) & 1 else -1 for k in range(n))
                if all(sg < 0 for sg in signs):
                    frags.append(_Frag(signs))
                elif all(sg > 0 for sg in signs):
                    frags.append(_Frag(signs, phi, (s0, bw0), (ts, td)))
                else:
                    md = rng.uniform(-0.7, 0.7) * Rl
                    dmag = max(dmag, abs(md))
                    frags.append(_Frag(signs, rng.uniform(-15, 15) * DEG, (s0, bw0),
                                       (rng.uniform(-0.3, 0.3) * Rl, md)))
            ext_a = max(abs(offs[0]), abs(offs[-1])) + 2.2 * Rl + 6
        site = (s0 - ext_a, s0 + ext_a, -Rl * 2.5, Rl * 2.5)
        fr = _Fracture(lines, frags, site, margin=rng.uniform(1.5, 3.0) + g / 2, close=int(2 * dmag + 5))
    elif ftype == "greenstick":
        frac = rng.uniform(0.45, 0.85)
        d_tip = c * Rl * (1 - 2 * frac)
        psi = rng.uniform(-12, 12) * DEG
        g = _gap(rng, 0.8, 3.0)
        ext = (lambda s, d, c=c, t=d_tip: _sat(c * (d - t) + 0.5))
        ln = _Line(s0, 0.0, psi, jag, g=g, depth=rng.uniform(0.6, 1.0), ext=ext)
        phi = c * rng.uniform(2.5, 8) * DEG
        s_tip = s0 - d_tip * math.tan(psi)
        frags = [_Frag((-1,)), _Frag((1,), phi, (s_tip, d_tip + bw0), (0.0, 0.0))]
        ext_a = abs(math.tan(psi)) * Rl * 1.1 + 2 * Rl * abs(math.sin(phi)) + 6 + g
        site = (s0 - ext_a, s0 + ext_a, -Rl * 1.3, Rl * 1.3)
        mext = lambda s, d, c=c, t=d_tip, e=0.3 * Rl: _sat(c * (d - t) + e)  # noqa: E731
        mline = _Line(s0, 0.0, psi, jag, g=g, depth=0.0, ext=mext)
        ln.in_mask = False
        fr = _Fracture([ln, mline], [_Frag((-1, 0)), _Frag((1, 0), frags[1].phi, frags[1].P, frags[1].t)], site,
                       margin=rng.uniform(1.5, 3.0) + g / 2, close=int(2 * Rl * abs(math.sin(phi)) + 4))
    elif ftype == "hairline":
        psi = rng.uniform(-20, 20) * DEG if rng.random() < 0.6 else c * rng.uniform(30, 60) * DEG
        g = rng.uniform(0.6, 1.5)
        ext = None
        if rng.random() < 0.5:
            frac = rng.uniform(0.5, 0.95)
            t = c * Rl * (1 - 2 * frac)
            ext = (lambda s, d, c=c, t=t: _sat(c * (d - t) + 0.5))
        ln = _Line(s0, 0.0, psi, _jagger(rng, rng.uniform(0.2, 0.7)), g=g, depth=rng.uniform(0.25, 0.6), ext=ext)
        if rng.random() < 0.3:
            bone.callus = (s0, rng.uniform(1.0, 2.2) * Rl, Rl * 1.02 + 1, rng.uniform(0.06, 0.15) * Rl + 1,
                           rng.uniform(0.2, 0.5))
        ext_a = abs(math.tan(psi)) * Rl * 1.1 + 5
        site = (s0 - ext_a, s0 + ext_a, -Rl * 1.3, Rl * 1.3)
        fr = _Fracture([ln], [_Frag((0,))], site, margin=rng.uniform(1.5, 2.5) + g / 2, close=3)
    elif ftype == "impacted":
        psi = rng.uniform(-15, 15) * DEG
        o = max(2.5, rng.uniform(0.12, 0.55) * Rl)
        ln = _Line(s0, 0.0, psi, _jagger(rng, rng.uniform(0.5, 1.5)), g=0.0, depth=0.0)
        phi = rng.uniform(-6, 6) * DEG
        td = rng.uniform(-0.15, 0.15) * Rl
        frags = [_Frag((-1,)), _Frag((1,), phi, (s0, bw0), (-o, td))]
        ext_a = abs(math.tan(psi)) * Rl * 1.1 + o + 6
        site = (s0 - ext_a, s0 + ext_a, -Rl * 1.3, Rl * 1.3)
        fr = _Fracture([ln], frags, site, margin=rng.uniform(1.5, 3.0), close=int(o + 2 * Rl * abs(phi) + 4))
    elif ftype == "longitudinal":
        beta = rng.uniform(-14, 14) * DEG
        half = rng.uniform(1.3, 3.2) * Rl
        d0 = rng.uniform(-0.5, 0.5) * Rl
        g = _gap(rng, 1.0, 4.0)
        psi = c * 90 * DEG + beta
        ln = _Line(s0, d0, psi, _jagger(rng, rng.uniform(0.2, 0.9)), g=g, depth=rng.uniform(0.6, 1.0))
        ln.ext = (lambda s, d, s0=s0, h=half: np.sqrt(_sat(1 - ((s - s0) / h) ** 2)))
        ext_a = half + 4
        site = (s0 - ext_a, s0 + ext_a, -Rl * 1.3, Rl * 1.3)
        fr = _Fracture([ln], [_Frag((0,))], site, margin=rng.uniform(1.5, 3.0) + g / 2, close=3)
    elif ftype == "pathological":
        la, lb = rng.uniform(0.8, 1.7) * Rl, rng.uniform(0.55, 0.95) * Rl
        ell = _Ellipse(s0 + rng.uniform(-0.3, 0.3) * la, rng.uniform(-0.25, 0.25) * Rl, la, lb,
                       rng.uniform(-15, 15) * DEG, rng.uniform(0, 0.08), rng)
        bone.lesion = _Lesion(ell, rng.uniform(0.6, 0.95), rng.uniform(0.35, 0.65), rng.uniform(0.0, 0.12))
        psi = rng.uniform(-35, 35) * DEG
        g = _gap(rng, 1.0, 4.0)
        ln = _Line(s0, ell.dc, psi, jag, g=g, depth=rng.uniform(0.7, 1.0))
        ts, td, phi = disp(0.4)
        frags = [_Frag((-1, 0)), _Frag((1, 0), phi, (s0, bw0), (ts, td))]
        ext_a = max(la * 1.3, abs(math.tan(psi)) * Rl * 1.1) + 6
        site = (s0 - ext_a, s0 + ext_a, -Rl * 1.4, Rl * 1.4)
        fr = _Fracture([ln, ell], frags, site, margin=rng.uniform(1.5, 3.0) + g / 2,
                       close=int(2 * math.hypot(ts, td) + 2 * Rl * abs(phi) + 3))
    else:
        raise ValueError(ftype)
    bone.fracture = fr.finish()
    return fr


def _build_avulsion(bone, rng, end, c):
    if end == 0:
        s_a = rng.uniform(-0.3 * bone.cap0, 0.7 * max(bone.R_at(0.0), 1.0))
    else:
        s_a = bone.L - rng.uniform(-0.3 * bone.cap1, 0.7 * max(bone.R_at(bone.L), 1.0))
    Rl = bone.R_at(s_a)
    a_e = max(3.0, rng.uniform(0.15, 0.4) * Rl)
    b_e = max(2.5, rng.uniform(0.4, 0.8) * a_e)
    dc = c * (Rl - b_e * rng.uniform(0.3, 0.8))
    ell = _Ellipse(s_a, dc, a_e, b_e, rng.uniform(-20, 20) * DEG, 0.0, rng)
    bw = float(bone.bowf(np.float64(s_a)))
    pull = c * rng.uniform(max(2.0, 0.1 * Rl), 0.7 * Rl + 3)
    frag = _Frag((-1,), rng.uniform(-35, 35) * DEG, (s_a, dc + bw), (rng.uniform(-1, 1) * a_e, pull))
    ext = a_e + 2 * abs(pull) + 6
    site = (s_a - ext, s_a + ext, -Rl - 2 * abs(pull) - 6, Rl + 2 * abs(pull) + 6)
    fr = _Fracture([ell], [_Frag((1,)), frag], site, margin=rng.uniform(1.5, 3.0), hull=True)
    bone.fracture = fr.finish()
    return s_a


def _build_dislocation_fracture(bone, rng, disl_local, psi_rot, Jl, c):
    """Marginal fracture of the distal end of bone; the fragment follows the dislocated partner a bit."""
    Re = bone.R_at(bone.L)
    d1 = c * Re * rng.uniform(-0.4, 0.4)
    s1 = bone.L + bone.cap1 * math.sqrt(max(0.0, 1 - (d1 / Re) ** 2)) * 0.9 + 2
    s2 = bone.L - rng.uniform(0.4, 1.4) * Re
    p2 = (s2, c * bone.R_at(s2) * 1.05 + c)
    ln = _line_through((s1, d1), p2, jag=_jagger(rng, rng.uniform(0.4, 1.2)), g=_gap(rng, 1.0, 4.0),
                       depth=rng.uniform(0.7, 1.0))
    corner = (bone.L + 0.3 * bone.cap1, c * Re * 0.85)
    sg = 1 if ln.f(np.array([corner[0]]), np.array([corner[1]]))[0] > 0 else -1
    k = rng.uniform(0.3, 1.0)
    frag = _Frag((sg,), psi_rot * k, Jl, (disl_local[0] * k, disl_local[1] * k))
    site = (s2 - Re - 4, bone.L + bone.cap1 + Re + 4 + abs(disl_local[0]), -Re * 1.6 - abs(disl_local[1]),
            Re * 1.6 + abs(disl_local[1]))
    dm = math.hypot(*disl_local) * k
    fr = _Fracture([ln], [_Frag((-sg,)), frag], site, margin=rng.uniform(1.5, 3.0) + ln.g / 2,
                   close=int(2 * dm + 2 * Re * abs(psi_rot) * k + 3))
    bone.fracture = fr.finish()
    return fr


# ----------------------------------------------------------------------------------------------- layouts
class _Frame:
    """Limb frame (x along the limb, distal positive; y across) -> image."""

    def __init__(self, cx, cy, theta, fx, side):
        self.cx, self.cy, self.th, self.fx, self.side = cx, cy, theta, fx, side
        self.c, self.s = math.cos(theta), math.sin(theta)

    def pt(self, x, y):
        X, Y = x - self.fx, self.side * y
        return self.cx + self.c * X - self.s * Y, self.cy + self.s * X + self.c * Y

    def ang(self, a):
        return self.th + self.side * a


class _Layout:
    def __init__(self, fr, rng, child):
        self.fr, self.rng, self.child = fr, rng, child
        self.bones, self.softs = [], []

    def bone(self, x, y, a, L, Rs0, Rs1, Re0, Re1, m0, m1, cap0, cap1, plates=(True, True), **kw):
        """Bone whose proximal dome tip is at limb point (x, y), direction a (limb radians)."""
        rng = self.rng
        dx, dy = math.cos(a), math.sin(a)
        ox, oy = self.fr.pt(x + dx * cap0, y + dy * cap0)
        pl = tuple(p and self.child for p in plates)
        kw.setdefault("rho_c", rng.uniform(1.45, 1.85) * (0.85 if self.child else 1.0))
        kw.setdefault("rho_can", rng.uniform(0.25, 0.45))
        kw.setdefault("tc", rng.uniform(0.22, 0.34) * (0.8 if self.child else 1.0))
        b = Bone(ox, oy, self.fr.ang(a), L, Rs0, Rs1, Re0, Re1, m0, m1, cap0, cap1, rng, plates=pl, **kw)
        b.tip = (x + dx * (cap0 + L + cap1), y + dy * (cap0 + L + cap1))  # distal tip in limb coords
        b.adir = a
        self.bones.append(b)
        return len(self.bones) - 1

    def blob(self, x, y, a, along, across, parent=-1, name="blob", rho=None):
        rng = self.rng
        L = max(along * 0.25, 1.0)
        cap = along - L / 2
        return self.bone(x - math.cos(a) * along, y - math.sin(a) * along, a, L, across, across, across, across,
                         0, 0, cap, cap, plates=(False, False), kind="blob", name=name, parent=parent,
                         tc=0.05, tend=rng.uniform(0.06, 0.12), rho_can=rng.uniform(0.3, 0.5),
                         rho_c=rho if rho is not None else rng.uniform(1.2, 1.6))

    def soft(self, x0, y0, a, L, radii, cap0, cap1, ecc=1.0, fat=None):
        rng = self.rng
        ox, oy = self.fr.pt(x0, y0)
        self.softs.append(Soft(ox, oy, self.fr.ang(a), L, radii, cap0, cap1, ecc,
                               fat if fat is not None else rng.uniform(0.08, 0.22), rng.uniform(0.84, 0.93)))


def _long_region(lay, Rs, kind):
    rng = lay.rng
    L = Rs * rng.uniform(27, 33)
    if kind == "femur":
        Re0, Re1 = Rs * rng.uniform(1.9, 2.3), Rs * rng.uniform(2.4, 3.0)
        cap0, cap1 = Re0 * 0.75, Re1 * rng.uniform(0.4, 0.55)
    else:
        Re0, Re1 = Rs * rng.uniform(2.1, 2.5), Rs * rng.uniform(2.3, 2.8)
        cap0, cap1 = Re0 * 0.9, Re1 * rng.uniform(0.35, 0.5)
    main = lay.bone(0, 0, 0, L, Rs * 1.08, Rs * 0.95, Re0, Re1, Rs * rng.uniform(4, 6), Rs * rng.uniform(4, 6.5),
                    cap0, cap1, bow=rng.uniform(-0.6, 0.6) * Rs, name=kind, solo=True)
    J = cap0 + L + cap1 + Rs * rng.uniform(0.15, 0.35)
    flex = rng.normal(0, 0.12)
    dx, dy = math.cos(flex), math.sin(flex)
    kids = []
    if kind == "femur":
        Rt = Rs * rng.uniform(0.85, 1.0)
        Ret = Re1 * rng.uniform(0.9, 1.0)
        capt = Ret * rng.uniform(0.1, 0.2)
        Lt = Rt * rng.uniform(28, 32)
        kids.append(lay.bone(J, 0, flex, Lt, Rt * 1.05, Rt * 0.9, Ret, Rt * 1.8, Rs * 5, Rs * 4, capt, Rt * 1.2,
                             parent=main, name="tibia"))
        Rf = Rt * rng.uniform(0.38, 0.5)
        off = Ret * rng.uniform(0.55, 0.8)
        st = J + Rs * rng.uniform(0.6, 1.6)
        kids.append(lay.bone(st * dx - off * dy, st * dy + off * dx, flex + rng.uniform(-0.03, 0.03),
                             Lt * 0.95, Rf, Rf * 0.9, Rf * 2.1, Rf * 2.0, Rf * 4, Rf * 4, Rf * 1.6, Rf * 1.8,
                             parent=main, name="fibula"))
        if rng.random() < 0.65:
            lay.blob(cap0 + L + cap1 * rng.uniform(-0.8, 0.1), rng.uniform(-0.3, 0.3) * Rs, rng.uniform(-0.2, 0.2),
                     Rs * rng.uniform(1.2, 1.5), Rs * rng.uniform(1.0, 1.25), name="patella",
                     rho=rng.uniform(0.9, 1.3))
        Rst = Rs / rng.uniform(0.2, 0.3)
        lay.soft(-L, 0, 0, 2 * L + J, [Rst * 1.05, Rst, Rst * 0.9, Rst * 0.75], 0, Rst * 0.4)
        lay.soft(J - Rst * 0.3, 0, flex, Lt * 1.2, [Rst * 0.75, Rst * 0.72, Rst * 0.6, Rst * 0.4], Rst * 0.3, 0)
    else:
        Rr, Ru = Rs * rng.uniform(0.5, 0.6), Rs * rng.uniform(0.55, 0.65)
        Lf = Rr * rng.uniform(28, 32) * 0.9
        kids.append(lay.bone(J - Rs * rng.uniform(0.5, 1.2), -Re1 * 0.35, flex, Lf, Ru * 1.1, Ru * 0.8,
                             Ru * 2.0, Ru * 1.2, Ru * 5, Ru * 3, Ru * 1.5, Ru * 1.0, parent=main, name="ulna"))
        kids.append(lay.bone(J + Rs * 0.1, Re1 * 0.45, flex + rng.uniform(-0.05, 0.02), Lf * 0.97, Rr * 0.95, Rr * 1.1,
                             Rr * 1.5, Rr * 2.4, Rr * 3, Rr * 5, Rr * 0.4, Rr * 0.6, parent=main, name="radius"))
        Rst = Rs / rng.uniform(0.22, 0.32)
        lay.soft(-L, 0, 0, 2 * L + J, [Rst, Rst * 1.05, Rst * 0.95, Rst * 0.8], 0, Rst * 0.4)
        lay.soft(J - Rst * 0.3, 0, flex, Lf * 1.2, [Rst * 0.85, Rst * 0.8, Rst * 0.6, Rst * 0.5], Rst * 0.3, 0)
    for k in kids:
        lay.bones[k].solo = False
    return Rst, (L * 0.05, J + L * 0.25)


def _pair_region(lay, Rs, kind):
    rng = lay.rng
    Rb = Rs * rng.uniform(1.1, 1.35)
    Lb = Rb * 30
    Reb = Rs * (rng.uniform(2.3, 2.8) if kind == "lower_leg" else rng.uniform(2.6, 3.3))
    capb = Reb * rng.uniform(0.4, 0.55)
    up = lay.bone(-(Lb + capb + Rb * 2), 0, 0, Lb, Rb, Rb * 0.95, Rb * 2, Reb, Rb * 4, Rb * 5, Rb * 1.6, capb,
                  name="femur" if kind == "lower_leg" else "humerus")
    J = Rs * rng.uniform(0.15, 0.35)
    flex = rng.normal(0, 0.1)
    if kind == "lower_leg":
        Ret = Reb * rng.uniform(0.9, 1.0)
        Lp = Rs * rng.uniform(28, 32)
        main = lay.bone(J, 0, flex, Lp, Rs * 1.05, Rs * 0.9, Ret, Rs * 1.8, Rs * 5, Rs * 4, Ret * 0.15, Rs * 0.5,
                        parent=up, name="tibia")
        Rf = Rs * rng.uniform(0.4, 0.5)
        off = Ret * rng.uniform(0.55, 0.85)
        lay.bone(J + Rs * rng.uniform(0.6, 1.5), off, flex + rng.uniform(-0.02, 0.02), Lp * 1.0, Rf, Rf * 0.9,
                 Rf * 2.1, Rf * 2.2, Rf * 4, Rf * 4, Rf * 1.6, Rf * 1.6, parent=up, name="fibula")
        end = J + Lp + Rs * 1.5
        tal = lay.blob(end + Rs * 1.7, rng.uniform(-0.3, 0.3) * Rs, flex, Rs * 1.7, Rs * 1.8, name="talus")
        lay.blob(end + Rs * 3.3, -Rs * 0.5, flex + 0.4, Rs * 2.6, Rs * 1.6, name="calcaneus")
        for b in (tal,):
            lay.bones[b].parent = main
        Rst = Rs / rng.uniform(0.2, 0.27)
        lay.soft(-Lb, 0, 0, Lb + J, [Rst * 1.25, Rst * 1.1, Rst], 0, Rst * 0.4)
        lay.soft(-Rst * 0.3, 0, flex, Lp + Rs * 10, [Rst, Rst * 1.05, Rst * 0.75, Rst * 0.5, Rst * 0.55], Rst * 0.3, 0)
    else:
        Ru = Rs * rng.uniform(0.95, 1.1)
        Lp = Rs * rng.uniform(28, 32)
        lay.bone(J - Rs * 1.4, -Reb * 0.35, flex, Lp * 1.03, Ru * 1.1, Ru * 0.75, Ru * 2.1, Ru * 1.1,
                 Ru * 5, Ru * 3, Ru * 1.6, Ru * 1.0, parent=up, name="ulna")
        cross = rng.random() < 0.35
        y0, y1 = Reb * 0.45, (-Reb * 0.5 if cross else Reb * rng.uniform(0.3, 0.6))
        a = flex + math.atan2(y1 - y0, Lp)
        main = lay.bone(J + Rs * 0.2, y0, a, Lp, Rs * 0.85, Rs * 1.05, Rs * 1.35, Rs * 2.3, Rs * 3, Rs * 5,
                        Rs * 0.35, Rs * 0.5, parent=up, name="radius")
        end = J + Lp + Rs * 1.2
        for i in range(int(rng.integers(5, 9))):
            lay.blob(end + Rs * rng.uniform(0.8, 3.6), rng.uniform(-2.2, 2.2) * Rs, rng.uniform(-0.6, 0.6),
                     Rs * rng.uniform(0.8, 1.3), Rs * rng.uniform(0.7, 1.1), parent=main, name="carpal")
        Rst = Rs / rng.uniform(0.25, 0.33)
        lay.soft(-Lb, 0, 0, Lb + J, [Rst * 1.2, Rst * 1.15, Rst * 1.0], 0, Rst * 0.4)
        lay.soft(-Rst * 0.3, 0, flex, Lp + Rs * 14, [Rst, Rst * 1.0, Rst * 0.75, Rst * 0.6, Rst * 0.8],
                 Rst * 0.3, 0, ecc=rng.uniform(0.7, 1.0))
    return Rst, (J + Lp * 0.05, J + Lp * 0.95)


def _hand_region(lay, Rs, kind):
    rng = lay.rng
    foot = kind == "foot"
    # forearm / tarsus behind
    if not foot:
        Rr = Rs * rng.uniform(2.6, 3.2)
        rad = lay.bone(-Rs * 12 - Rr * 30, Rs * 1.2, 0, Rr * 30, Rr, Rr * 1.1, Rr * 1.3, Rs * 6.0, Rr * 3, Rs * 7,
                       Rr * 0.3, Rs * 1.0, name="radius")
        lay.bone(-Rs * 12.5 - Rr * 30, -Rs * 4.5, 0, Rr * 29.5, Rr * 0.9, Rr * 0.8, Rr * 2.0, Rs * 2.2, Rr * 4,
                 Rs * 3, Rr * 1.5, Rs * 1.6, name="ulna")
        nblob, bx0, bx1, bsz = int(rng.integers(7, 10)), -10.0, -2.5, (1.4, 2.4)
    else:
        rad = -1
        nblob, bx0, bx1, bsz = int(rng.integers(6, 9)), -14.0, -2.5, (2.0, 3.6)
    for i in range(nblob):
        lay.blob(Rs * rng.uniform(bx0, bx1), Rs * rng.uniform(-5.0, 5.0), rng.uniform(-0.8, 0.8),
                 Rs * rng.uniform(*bsz), Rs * rng.uniform(bsz[0] * 0.7, bsz[1] * 0.75), parent=rad, name="carpal")
    spread = rng.uniform(0.08, 0.13) if not foot else rng.uniform(0.04, 0.08)
    ybase = [-3.2, -1.0, 1.0, 3.0, 5.0] if not foot else [-4.6, -1.6, 0.6, 2.6, 4.6]
    rays = []
    for k in range(5):
        thumb = (k == 0)
        if thumb and not foot:
            a = -rng.uniform(0.55, 0.85)
            Lm, Rm = Rs * rng.uniform(11, 13), Rs * 1.1
            x0, y0 = -Rs * 2.0, -Rs * 4.2
            nph = 2
        else:
            a = (k - 2) * spread + rng.normal(0, 0.02)
            Lm = Rs * ([0, 16, 15.5, 14, 12.5] if not foot else [14, 19, 17.5, 16.5, 15])[k] * rng.uniform(0.93, 1.07)
            Rm = Rs * (1.0 if not foot else (1.6 if thumb else [1, 0.95, 0.9, 0.9, 0.95][k]))
            x0, y0 = Rs * rng.uniform(-0.5, 0.5) - (Rs * 2.5 if foot and k == 4 else 0), Rs * ybase[k]
            nph = 3 if not thumb else 2
        mc = lay.bone(x0, y0, a, Lm, Rm * 1.1, Rm * 0.95, Rm * 1.7, Rm * 1.55, Rm * 3, Rm * 3, Rm * 0.35, Rm * 1.3,
                      plates=(thumb, not thumb), parent=rad, name="metatarsal" if foot else "metacarpal", solo=True)
        prev, tipx, tipy = mc, *lay.bones[mc].tip
        ap = a
        Rp = Rm * rng.uniform(0.8, 0.9)
        lens = ([11, 7.5, 5.5] if not foot else [7, 4, 3]) if not thumb else ([8.5, 6.5] if not foot else [8, 6])
        if foot and thumb:
            Rp = Rm * 0.85
        for j in range(nph):
            gap = Rs * rng.uniform(0.25, 0.45)
            ap = ap + rng.normal(0, 0.05)
            Lph = Rp * lens[j] * rng.uniform(0.9, 1.1)
            last = j == nph - 1
            ph = lay.bone(tipx + gap * math.cos(ap), tipy + gap * math.sin(ap), ap, Lph, Rp * 1.05, Rp * 0.85,
                          Rp * 1.6, Rp * (1.35 if not last else 1.25), Rp * 2.2, Rp * (2.0 if not last else 1.2),
                          Rp * 0.25, Rp * (0.8 if not last else 0.9), plates=(True, False), parent=prev,
                          name="phalanx", solo=True)
            prev, (tipx, tipy) = ph, lay.bones[ph].tip
            Rp *= 0.85
        rays.append((x0, y0, a, tipx, tipy))
        fw = Rm * rng.uniform(2.0, 2.5)
        L_ray = math.hypot(tipx - x0, tipy - y0)
        lay.soft(x0 + Rm * 5 * math.cos(a), y0 + Rm * 5 * math.sin(a), math.atan2(tipy - y0, tipx - x0),
                 L_ray - Rm * 5, [fw * 1.3, fw, fw * 0.95, fw * 0.85], 0, fw * 1.1, ecc=rng.uniform(0.75, 1.0))
    Rst = Rs * rng.uniform(10.5, 12.5) if not foot else Rs * rng.uniform(10, 12)
    lay.soft(-Rs * 14, Rs * 0.6, 0, Rs * 26, [Rst * 0.75, Rst, Rst * 1.02, Rst * 0.9], 0, Rst * 0.3,
             ecc=rng.uniform(0.3, 0.45))
    if not foot:
        lay.soft(-Rs * 60, Rs * 0.6, 0, Rs * 48, [Rst * 0.85, Rst * 0.8, Rst * 0.75], 0, Rst * 0.3,
                 ecc=rng.uniform(0.6, 0.8))
    return Rst, (-Rs * 8, Rs * 30)


REGIONS = (("femur", 0.12), ("humerus", 0.1), ("forearm", 0.2), ("lower_leg", 0.18), ("hand", 0.25),
           ("foot", 0.15))


# ----------------------------------------------------------------------------------------------- confounders
def _draw_poly_cov(layer, pts):
    p = np.round(np.asarray(pts, float) * 16).astype(np.int32)
    cv2.fillConvexPoly(layer, p, 255, lineType=cv2.LINE_AA, shift=4)


def _hardware(bone, rng, layer):
    L = bone.L
    half = min(rng.uniform(2.5, 5.0) * bone.Rmax * 0.5 + bone.Rmax, 0.35 * L)
    sc = rng.uniform(min(L * 0.3, L / 2), max(L * 0.7, L / 2))
    Rl = bone.R_at(sc)
    c = rng.choice([-1, 1])
    edge = rng.random() < 0.6
    tp = Rl * (rng.uniform(0.18, 0.3) if edge else rng.uniform(0.6, 0.9))
    dmid = c * (Rl + tp / 2) if edge else rng.uniform(-0.2, 0.2) * Rl
    bw = lambda s: float(bone.bowf(np.float64(s)))  # noqa: E731
    corners = [bone.to_img(s, dmid + bw(s) + e) for s, e in
               ((sc - half, -tp / 2), (sc + half, -tp / 2), (sc + half, tp / 2), (sc - half, tp / 2))]
    _draw_poly_cov(layer, corners)
    n = int(rng.integers(3, 8))
    sw = Rl * rng.uniform(0.1, 0.16)
    for s in np.linspace(sc - half * 0.85, sc + half * 0.85, n):
        if rng.random() < 0.15:
            continue
        d0, d1 = c * (Rl + tp * 1.1), -c * Rl * rng.uniform(0.95, 1.2)
        tilt = rng.uniform(-0.1, 0.1) * Rl
        pts = [bone.to_img(s - sw / 2, d0 + bw(s)), bone.to_img(s + sw / 2, d0 + bw(s)),
               bone.to_img(s + sw / 2 + tilt, d1 + bw(s)), bone.to_img(s - sw / 2 + tilt, d1 + bw(s))]
        _draw_poly_cov(layer, pts)
        for t in np.linspace(0.1, 0.9, 7):  # threads
            q = bone.to_img(s + tilt * t, d0 + (d1 - d0) * t + bw(s))
            pa = bone.to_img(s + tilt * t - sw * 0.7, d0 + (d1 - d0) * t + bw(s))
            pb = bone.to_img(s + tilt * t + sw * 0.7, d0 + (d1 - d0) * t + bw(s))
            del q
            cv2.line(layer, (int(pa[0] * 16), int(pa[1] * 16)), (int(pb[0] * 16), int(pb[1] * 16)), 255,
                     max(1, int(sw * 0.15)), cv2.LINE_AA, 4)


def _cast(lay, rng, H, W, soft_ref):
    """Plaster / fibreglass sleeve around the main soft segment: returns an attenuation layer (soft units)."""
    sg = soft_ref
    Rm = sg.Rmax
    out = np.zeros((H, W), F32)
    bx = sg.box(H, W)
    if bx is None:
        return out
    x0, y0, x1, y1 = bx
    pad = int(Rm * 0.4) + 4
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(W, x1 + pad), min(H, y1 + pad)
    xs = np.arange(x0, x1, dtype=F32) - F32(sg.ox)
    ys = np.arange(y0, y1, dtype=F32) - F32(sg.oy)
    s = (xs * F32(sg.ux))[None, :] + (ys * F32(sg.uy))[:, None]
    d = (xs * F32(-sg.uy))[None, :] + (ys * F32(sg.ux))[:, None]
    i = np.clip(((s - sg.s_lo) / sg.ds).astype(np.int32), 0, sg.n - 1)
    Rin = sg.R[i] * rng.uniform(1.03, 1.12) + 2
    th = Rm * rng.uniform(0.08, 0.18) + 2
    Rout = Rin + th
    d2 = d * d
    ch = 2 * (np.sqrt(np.maximum(Rout * Rout - d2, 0)) - np.sqrt(np.maximum(Rin * Rin - d2, 0)))
    L = sg.L
    s_a, s_b = rng.uniform(-0.2, 0.5) * L, rng.uniform(0.6, 1.2) * L
    ch *= _sat((s - s_a) / (th * 2)) * _sat((s_b - s) / (th * 2)) * (sg.R[i] > 0)
    if rng.random() < 0.5:  # fibreglass mesh
        p = rng.uniform(3, 7)
        tex = 1 + 0.35 * np.sin(s * (2 * math.pi / p)) * np.sin(d * (2 * math.pi / p) + 0.7 * s / p)
        rho = rng.uniform(0.35, 0.6)
    else:  # plaster
        tex = 1 + 0.12 * cv2.GaussianBlur(rng.standard_normal(ch.shape, dtype=F32), (0, 0), 1.5) * 2.5
        rho = rng.uniform(0.7, 1.2)
    out[y0:y1, x0:x1] = ch * tex * rho
    return out


def _noise_field(rng, H, W, grain, theta, aniso=2.2):
    q = max(1.0, grain / 2.0)
    h, w = int(H / q) + 8, int(W / q) + 8
    n = rng.standard_normal((h, w), dtype=F32)
    n1 = cv2.GaussianBlur(n, (0, 0), sigmaX=1.0 * aniso, sigmaY=1.0)
    n2 = cv2.GaussianBlur(n1, (0, 0), sigmaX=3.0 * aniso, sigmaY=3.0)
    n = n1 - 0.8 * n2
    n /= max(float(n.std()), 1e-6)
    c, s = math.cos(theta), math.sin(theta)
    # dst (x, y) -> src = Rot(-theta)(p - centre)/q + src centre
    M = np.array([[c / q, s / q, 0.0], [-s / q, c / q, 0.0]])
    M[:, 2] = np.array([w / 2, h / 2]) - M[:, :2] @ np.array([W / 2, H / 2])
    return cv2.warpAffine(n, M, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)


def _blur_big(img, sigma):
    H, W = img.shape
    f = max(1, int(sigma / 3))
    small = cv2.resize(img, (max(2, W // f), max(2, H // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / f)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------------------------- main render
def _pick(rng, items):
    names = [n for n, _ in items]
    p = np.array([w for _, w in items], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _descendants(bones, i):
    out, todo = [], [i]
    while todo:
        j = todo.pop()
        for k, b in enumerate(bones):
            if b.parent == j and k not in out:
                out.append(k)
                todo.append(k)
    return out


def _move_bones(bones, idx, fn, dang):
    for k in idx:
        b = bones[k]
        ox, oy = fn(b.ox, b.oy)
        b.set_pose(ox, oy, b.ang + dang)


def _site_visible(poly, pts, margin):
    return all(cv2.pointPolygonTest(poly, (float(x), float(y)), True) >= margin for x, y in pts)


def _choose_site(lay, ftype, rng, poly, H, W):
    """Pick (bone index, s0, end) for ftype with the site inside the field; None when not found."""
    bones = lay.bones
    longs = [i for i, b in enumerate(bones) if b.kind == "long"]
    if ftype == "fracture_dislocation":
        longs = [i for i in longs if any(bones[k].parent == i for k in range(len(bones)))]
    if not longs:
        return None
    for _ in range(40):
        i = longs[int(rng.integers(len(longs)))]
        b = bones[i]
        L, Rs = b.L, b.R_at(b.L / 2)
        if ftype == "fracture_dislocation":
            s0, end = L, 1
            pts = [b.axis_pt(L - b.R_at(L), 0), b.axis_pt(L + b.cap1, 0)]
            marg = b.R_at(L) * 1.2 + 6
        elif ftype == "avulsion":
            end = int(rng.integers(2))
            s0 = 0.0 if end == 0 else L
            pts = [b.axis_pt(s0, 0)]
            marg = b.R_at(s0) * 1.3 + 8
        else:
            lo, hi = 0.18 * L, 0.82 * L
            if ftype in ("impacted", "pathological", "greenstick", "hairline") and rng.random() < 0.5:
                lo, hi = 0.06 * L, 0.94 * L
            span = 4.2 * Rs if ftype in ("spiral", "longitudinal") else 1.5 * Rs
            if hi - lo < 2 * span:
                continue
            s0 = rng.uniform(lo + span / 2, hi - span / 2)
            end = -1
            pts = [b.axis_pt(s0 - span, 0), b.axis_pt(s0 + span, 0), b.axis_pt(s0, 0)]
            marg = Rs * 1.2 + 6
        if min(b.R_at(s0) if ftype != "avulsion" else b.R_at(s0), 99) < 3.0 and ftype != "avulsion":
            continue
        if _site_visible(poly, pts, marg):
            return i, s0, end
    return None


def render(seed, index, fracture_type=None, fracture=None, fracture_rate=0.5, size_range=(700, 2500)):
    """Render one sample; returns dict(image, mask, fracture, type, region, laterality, box, child, bits).

    fracture_type forces a fractured image of that type; fracture=False/True forces normal/fractured;
    size_range bounds the long side (the CLI always uses the default)."""
    rng = np.random.default_rng([int(seed), int(index)])
    is_frac = rng.random() < fracture_rate
    tdraw = TYPES[int(rng.integers(len(TYPES)))]
    if fracture_type is not None:
        if fracture_type not in TYPES:
            raise ValueError(f"unknown type {fracture_type!r}")
        is_frac, tdraw = True, fracture_type
    elif fracture is not None:
        is_frac = bool(fracture)
    ftype = tdraw if is_frac else None
    for attempt in range(40):
        out = _render_once(rng, ftype, size_range)
        if out is not None:
            return out
    raise RuntimeError(f"could not place a {ftype} fracture (seed {seed}, index {index})")


def _render_once(rng, ftype, size_range=(700, 2500)):
    region = _pick(rng, REGIONS)
    child = ftype == "greenstick" or rng.random() < 0.18
    side = 1 if rng.random() < 0.5 else -1
    laterality = "right" if side > 0 else "left"
    longside = int(rng.uniform(*size_range))
    shortside = int(longside / rng.uniform(1.0, 1.6))
    H, W = (longside, shortside) if rng.random() < 0.6 else (shortside, longside)
    short = min(H, W)
    # limb orientation: mostly along the long image axis, sometimes anything
    base = math.pi / 2 if H >= W else 0.0
    theta = base + rng.normal(0, 0.25) if rng.random() < 0.55 else rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.5:
        theta += math.pi
    fill = rng.uniform(0.3, 0.9)
    if region in ("hand", "foot"):
        Rs = fill * short / 2 / rng.uniform(10.5, 12.5) * (rng.uniform(1.0, 2.0) if rng.random() < 0.35 else 1.0)
    else:
        Rs = fill * short / 2 * rng.uniform(0.2, 0.32)
    Rs = float(np.clip(Rs, 0.018 * short, 0.125 * short))
    if child:
        Rs *= 1.0
    # collimation field
    cx, cy = W / 2 + rng.uniform(-0.12, 0.12) * W, H / 2 + rng.uniform(-0.12, 0.12) * H
    collim = rng.random() < 0.65
    if collim:
        mx = rng.uniform(0.0, 0.12, 2) * W
        my = rng.uniform(0.0, 0.12, 2) * H
        rot = rng.uniform(-4, 4) * DEG if rng.random() < 0.4 else 0.0
        rect = np.array([[mx[0], my[0]], [W - mx[1], my[0]], [W - mx[1], H - my[1]], [mx[0], H - my[1]]])
        cc = rect.mean(0)
        R2 = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        rect = (rect - cc) @ R2.T + cc
    else:
        rect = np.array([[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]], float)
    poly = rect.astype(np.float32).reshape(-1, 1, 2)
    # layout
    lay = _Layout(_Frame(cx, cy, theta, 0.0, side), rng, child)
    builder = {"femur": _long_region, "humerus": _long_region, "forearm": _pair_region,
               "lower_leg": _pair_region, "hand": _hand_region, "foot": _hand_region}[region]
    # choose the focus after building in a unit frame: build once, read the focus range, then shift
    Rst, (f0, f1) = builder(lay, Rs, region)
    fx = rng.uniform(f0, f1)
    ex, ey = lay.fr.c * fx, lay.fr.s * fx
    for b in lay.bones:
        b.set_pose(b.ox - ex, b.oy - ey, b.ang)
    for sg in lay.softs:
        sg.ox, sg.oy = sg.ox - ex, sg.oy - ey
    bones = lay.bones
    # nutrient canals
    for b in bones:
        if b.kind == "long" and rng.random() < 0.3 and b.R_at(b.L / 2) > 4:
            cs = rng.uniform(0.3, 0.7) * b.L
            R, r = b.R_at(cs), b.r_at(cs)
            beta = rng.uniform(15, 35) * DEG
            cc = rng.choice([-1, 1])
            sgn = rng.choice([-1, 1])
            b.canals.append((cs, cc * (R + r) / 2, math.cos(beta) * sgn, -cc * math.sin(beta),
                             (R - r) / (2 * math.sin(beta)) + 1, rng.uniform(0.35, 0.8), rng.uniform(0.3, 0.65)))
    fbone = None
    if ftype is not None:
        site = _choose_site(lay, ftype, rng, poly, H, W)
        if site is None:
            return None
        i, s0, end = site
        fbone = bones[i]
        c = 1 if rng.random() < 0.5 else -1
        if ftype == "avulsion":
            _build_avulsion(fbone, rng, end, c)
        elif ftype == "fracture_dislocation":
            Re = fbone.R_at(fbone.L)
            disl = (-rng.uniform(0.0, 0.6) * Re, (1 if rng.random() < 0.5 else -1) * rng.uniform(0.4, 1.1) * Re)
            psi = float(np.clip(rng.normal(0, 12), -30, 30)) * DEG
            Jl = (fbone.L + fbone.cap1 + 0.2 * Re, float(fbone.bowf(np.float64(fbone.L))))
            _build_dislocation_fracture(fbone, rng, disl, psi, Jl, c)
            fg = _Frag((), psi, Jl, disl)

            def fn(x, y, b=fbone, fg=fg):
                return b.to_img(*fg.fwd(*b.to_loc(x, y)))
            kids = [k for k in range(len(bones)) if bones[k].parent == i]
            allk = set(kids)
            for k in kids:
                allk.update(_descendants(bones, k))
            _move_bones(bones, sorted(allk), fn, psi)
        else:
            _build_fracture(ftype, fbone, s0, rng, c)
            fr = fbone.fracture
            if fbone.solo:
                dist = [fg for fg in fr.frags if fg.wd > 0.5 and fg.wp < 0.5 and not fg.identity]
                if dist:
                    fg = dist[0]

                    def fn(x, y, b=fbone, fg=fg):
                        return b.to_img(*fg.fwd(*b.to_loc(x, y)))
                    _move_bones(bones, _descendants(bones, i), fn, fg.phi)
    # --- attenuation maps (soft-tissue-equivalent path lengths, px)
    soft = np.zeros((H, W), F32)
    for sg in lay.softs:
        sg.render(soft, H, W)
    smax = float(soft.max())
    if smax <= 0:
        return None
    grain = float(np.clip(0.09 * Rs, 1.2, 6))
    tex = _noise_field(rng, H, W, grain, theta)
    tex = np.clip(1 + rng.uniform(0.18, 0.32) * tex, 0.1, 3.0).astype(F32)
    bone_acc = np.zeros((H, W), F32)
    for b in bones:
        _render_bone(b, bone_acc, tex, H, W)
    mask = np.zeros((H, W), np.uint8)
    if fbone is not None:
        box, m8 = _fracture_mask(fbone, H, W)
        if box is None:
            return None
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] |= m8
        field = np.zeros((H, W), np.uint8)
        cv2.fillConvexPoly(field, np.round(rect * 16).astype(np.int32), 1, cv2.LINE_8, 4)
        mask *= field
        if mask.sum() < 255 * 6:
            return None
    tau = rng.uniform(1.0, 2.4) if region not in ("hand", "foot") else rng.uniform(0.7, 1.6)
    k = tau / smax
    ckv = rng.uniform(0.75, 1.3)
    A = soft * F32(k) + bone_acc * F32(k * ckv)
    extra = np.zeros((H, W), np.uint8)
    # skin folds
    if rng.random() < 0.25:
        for _ in range(int(rng.integers(1, 3))):
            p0 = np.array([cx, cy]) + rng.uniform(-0.4, 0.4, 2) * short
            ang = rng.uniform(0, 2 * math.pi)
            pts = [p0 + t * short * np.array([math.cos(ang + 0.4 * math.sin(t * 3)),
                                              math.sin(ang + 0.4 * math.sin(t * 3))])
                   for t in np.linspace(0, rng.uniform(0.2, 0.5), 12)]
            lay_f = np.zeros((H, W), np.uint8)
            cv2.polylines(lay_f, [np.round(np.array(pts) * 16).astype(np.int32)], False, 255,
                          int(rng.integers(2, 6)), cv2.LINE_AA, 4)
            A += (cv2.GaussianBlur(lay_f.astype(F32) / 255, (0, 0), 1.5) * F32(rng.uniform(0.03, 0.08) * tau)
                  * (soft > 0))
    # cast
    if rng.random() < 0.08 and lay.softs:
        A += _cast(lay, rng, H, W, max(lay.softs, key=lambda q: q.Rmax)) * F32(k)
    # hardware on an intact bone
    metal = np.zeros((H, W), np.uint8)
    if rng.random() < 0.07:
        cand = [b for b in bones if b.kind == "long" and b.fracture is None and b.R_at(b.L / 2) > 8
                and b.L > 14 * b.R_at(b.L / 2)]
        if cand:
            _hardware(cand[int(rng.integers(len(cand)))], rng, metal)
    # lead marker
    marker = rng.random() < 0.7
    if marker:
        letter = "R" if side > 0 else "L"
        if rng.random() < 0.08:
            letter = "L" if letter == "R" else "R"
        scale = short * rng.uniform(0.0025, 0.005)
        th = max(2, int(scale * 2.6))
        (tw, tht), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, th)
        bx, by, bxx, byy = rect[:, 0].min(), rect[:, 1].min(), rect[:, 0].max(), rect[:, 1].max()
        mx, my = bx + rng.uniform(0.03, 0.08) * W, by + rng.uniform(0.04, 0.1) * H + tht
        if rng.random() < 0.5:
            mx = bxx - rng.uniform(0.03, 0.08) * W - tw
        if rng.random() < 0.5:
            my = byy - rng.uniform(0.04, 0.1) * H
        ml = np.zeros((H, W), np.uint8)
        cv2.putText(ml, letter, (int(mx), int(my)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, th, cv2.LINE_AA)
        if rng.random() < 0.6:  # plastic holder
            cv2.rectangle(extra, (int(mx - th * 2), int(my - tht - th * 2)), (int(mx + tw + th * 2), int(my + th * 2)),
                          255, -1)
        A += ml.astype(F32) * F32(rng.uniform(2.5, 4.0) / 255)
    A += metal.astype(F32) * F32(rng.uniform(3.5, 5.5) / 255) + extra.astype(F32) * F32(0.12 / 255)
    img = _expose(rng, A, soft, bone_acc, rect, collim, H, W)
    # burned-in annotations
    if rng.random() < 0.5:
        strs = ["AP", "PA", "LAT", "OBL", f"{int(rng.integers(45, 75))} kV", f"{rng.uniform(1, 12):.1f} mAs",
                f"ID {int(rng.integers(100000, 999999))}", "SUPINE", "PORTABLE", laterality.upper()[0],
                f"{rng.uniform(0.8, 1.3):.2f}x"]
        scale = short / rng.uniform(900, 1600)
        thick = max(1, int(scale * 1.5))
        val = float(rng.uniform(0.8, 1.0))
        corner = int(rng.integers(4))
        n = int(rng.integers(1, 4))
        tl = np.zeros((H, W), np.uint8)
        for j in range(n):
            s = strs[int(rng.integers(len(strs)))]
            (tw, tht), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            x = 10 if corner in (0, 3) else W - tw - 10
            y = 10 + tht + j * int(tht * 1.6) if corner in (0, 1) else H - 10 - j * int(tht * 1.6)
            cv2.putText(tl, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
        img = np.maximum(img, tl.astype(F32) * F32(val / 255))
    bits = 16 if rng.random() < 0.7 else 8
    img = np.clip(img, 0, 1)
    if bits == 16:
        out = np.round(img * 65535).astype(np.uint16)
    else:
        out = np.round(img * 255).astype(np.uint8)
    box = None
    if fbone is not None:
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return dict(image=out, mask=mask, fracture=ftype is not None, type=ftype or "", region=region,
                laterality=laterality, box=box, child=child, bits=bits, width=W, height=H)


def _expose(rng, A, soft, bone_acc, rect, collim, H, W):
    yy = np.arange(H, dtype=F32)[:, None]
    xx = np.arange(W, dtype=F32)[None, :]
    hang = rng.uniform(0, 2 * math.pi)
    heel = rng.uniform(0.0, 0.2)
    I0 = 1 + F32(heel) * ((xx - W / 2) * F32(math.cos(hang)) + (yy - H / 2) * F32(math.sin(hang))) / F32(max(H, W))
    prim = np.exp(-A)
    I = I0 * prim
    sf = rng.uniform(0.03, 0.3)
    I += F32(sf) * _blur_big((1 - prim).astype(F32), 0.04 * max(H, W)) * I0
    if collim:
        field = np.zeros((H, W), np.uint8)
        cv2.fillConvexPoly(field, np.round(rect * 16).astype(np.int32), 255, cv2.LINE_AA, 4)
        fld = cv2.GaussianBlur(field, (0, 0), 1.5).astype(F32) / 255
        leak = rng.uniform(0.005, 0.04)
        I *= leak + (1 - leak) * fld
    I = cv2.GaussianBlur(I, (0, 0), rng.uniform(0.5, 1.3))
    N0 = rng.uniform(300, 4000)
    noise = rng.standard_normal((H, W), dtype=F32)
    if rng.random() < 0.5:
        noise = cv2.GaussianBlur(noise, (0, 0), 0.6) * F32(1.6)
    I += np.sqrt(np.maximum(I, 0) * F32(1 / N0)) * noise
    np.maximum(I, F32(2e-3), out=I)
    Lg = -np.log(I)
    if rng.random() < 0.7:  # console equalisation (large-kernel unsharp mask)
        amt = rng.uniform(0.3, 1.2)
        Lg += F32(amt) * (Lg - _blur_big(Lg, rng.uniform(0.02, 0.08) * min(H, W)))
    if rng.random() < 0.4:  # fine edge enhancement
        Lg += F32(rng.uniform(0.2, 0.7)) * (Lg - cv2.GaussianBlur(Lg, (0, 0), rng.uniform(1.5, 3.0)))
    # display window from the field content
    sub = (slice(None, None, 4), slice(None, None, 4))
    if collim:
        inside = fld[sub] > 0.5
    else:
        inside = np.ones_like(Lg[sub], bool)
    Ls = Lg[sub]
    bonep = (bone_acc[sub] > 0.05 * float(bone_acc.max() + 1e-6)) & inside
    bodyp = (soft[sub] > 0.05 * float(soft.max())) & inside
    airp = inside & ~bodyp
    hi_src = Ls[bonep] if bonep.sum() > 50 else Ls[inside]
    hi = float(np.percentile(hi_src, rng.uniform(99.0, 99.9))) * rng.uniform(0.95, 1.08)
    air = float(np.median(Ls[airp])) if airp.sum() > 50 else float(np.percentile(Ls[inside], 1))
    softm = float(np.median(Ls[bodyp & ~bonep])) if (bodyp & ~bonep).sum() > 50 else air
    lo = air + rng.uniform(-0.1, 0.55) * (softm - air)
    if hi <= lo + 1e-3:
        hi = lo + 1.0
    x = (Lg - F32(lo)) * F32(1.0 / (hi - lo))
    # tone curve LUT: gamma, S-curve, offset
    t = np.linspace(0, 1, 4096)
    g = rng.uniform(0.8, 1.8)
    y = t ** g
    cs = rng.uniform(0.0, 3.0)
    if cs > 0.2:
        y = 0.5 + 0.5 * np.tanh(cs * (y - 0.5)) / math.tanh(cs * 0.5)
    off = rng.uniform(0.0, 0.07)
    top = rng.uniform(0.93, 1.0)
    lut = (off + (top - off) * y).astype(F32)
    idx = np.clip(x * 4095, 0, 4095).astype(np.int32)
    img = lut[idx]
    if collim and rng.random() < 0.4:  # electronic shutter: black borders
        img = img * fld + F32(rng.uniform(0.0, 0.03)) * (1 - fld)
    return img


# ----------------------------------------------------------------------------------------------- CLI
def _job(args):
    seed, index, rate, out = args
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    r = render(seed, index, fracture_rate=rate)
    name = f"{index:06d}.png"
    params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    cv2.imwrite(str(Path(out) / "images" / name), r["image"], params)
    cv2.imwrite(str(Path(out) / "masks" / name), r["mask"], params)
    b = r["box"]
    row = [f"images/{name}", int(r["fracture"]), r["type"], r["region"], r["laterality"],
           *(b if b else ("", "", "", "")), seed, index, r["width"], r["height"], int(r["child"]), r["bits"]]
    return row, time.perf_counter() - t0


def _thumb(out, row, size=240):
    img = cv2.imread(str(Path(out) / row[0]), cv2.IMREAD_UNCHANGED)
    if img.dtype == np.uint16:
        img = (img / 257).astype(np.uint8)
    H, W = img.shape
    f = size / max(H, W)
    t = cv2.resize(img, (max(1, int(W * f)), max(1, int(H * f))), interpolation=cv2.INTER_AREA)
    t = cv2.cvtColor(t, cv2.COLOR_GRAY2BGR)
    if row[1]:
        x0, y0, x1, y1 = (int(v) for v in row[5:9])
        cv2.rectangle(t, (int(x0 * f), int(y0 * f)), (int(math.ceil(x1 * f)), int(math.ceil(y1 * f))), (0, 0, 255), 1)
    cell = np.full((size + 22, size, 3), 40, np.uint8)
    cell[:t.shape[0], :t.shape[1]] = t
    label = (row[2] if row[1] else "normal") + f" {row[3]}"
    cv2.putText(cell, label, (3, size + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                (80, 80, 255) if row[1] else (200, 200, 200), 1, cv2.LINE_AA)
    return cell


def write_sheet(out, rows, path, n=24, cols=6):
    rows = rows[:n]
    cells = [_thumb(out, r) for r in rows]
    if not cells:
        return
    h, w = cells[0].shape[:2]
    nr = int(math.ceil(len(cells) / cols))
    sheet = np.full((nr * (h + 4), cols * (w + 4), 3), 20, np.uint8)
    for k, c in enumerate(cells):
        r, q = divmod(k, cols)
        sheet[r * (h + 4):r * (h + 4) + h, q * (w + 4):q * (w + 4) + w] = c
    cv2.imwrite(str(path), sheet)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--fracture-rate", type=float, default=0.5)
    ap.add_argument("--sheet", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(a.seed, i, a.fracture_rate, str(out)) for i in range(a.count)]
    rows = [None] * a.count
    t0 = time.perf_counter()
    tsum = 0.0
    if a.workers > 1:
        import multiprocessing as mp
        here = os.path.dirname(os.path.abspath(__file__))
        if _job.__module__ not in ("__main__", "__mp_main__") and here not in sys.path:
            sys.path.insert(0, here)  # spawned workers import this file by its module name
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.workers) as pool:
            for k, (row, dt) in enumerate(pool.imap(_job, jobs, chunksize=1)):
                rows[k] = row
                tsum += dt
                if (k + 1) % 50 == 0 or k + 1 == a.count:
                    print(f"othersim: {k + 1}/{a.count} images, {tsum / (k + 1):.2f} s/image/core", flush=True)
    else:
        for k, job in enumerate(jobs):
            rows[k], dt = _job(job)
            tsum += dt
            if (k + 1) % 50 == 0 or k + 1 == a.count:
                print(f"othersim: {k + 1}/{a.count} images, {tsum / (k + 1):.2f} s/image", flush=True)
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    meta = {"generator": "bench/othersim.py", "version": VERSION, "count": a.count, "seed": a.seed,
            "fracture_rate": a.fracture_rate, "types": list(TYPES)}
    (out / "othersim.json").write_text(json.dumps(meta, indent=2) + "\n")
    if a.sheet:
        write_sheet(out, rows, a.sheet)
    print(f"othersim: wrote {a.count} images to {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
