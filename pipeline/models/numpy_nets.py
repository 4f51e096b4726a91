"""The bundled networks' inference in NumPy, without PyTorch.

A job worker only runs the networks forward, and ``import torch`` alone makes a process about 224 MiB
resident: more than the rest of a worker. This module runs the same three architectures as
:mod:`pipeline.models.nets` from the same ``weights.safetensors`` (read with ``safetensors.numpy``), so a
worker need not load PyTorch at all. Training, and the type reader's Grad-CAM (which needs a backward pass
through a convolutional stage), stay with PyTorch; tests hold the two runtimes to the same outputs on the
bundled weights and on random ones.

Convolutions are im2col plus one matrix product (NumPy's BLAS), with each batch norm folded into the
convolution before it (inference statistics, as ``model.eval()``). The detector's Grad-CAM needs no autograd:
its heads are linear in the features apart from a softmax attention, a global maximum and a top-k mean, and the
channel-mean of their gradient works out to ``(a_c + m_c + s_c) / N`` for the detection logit (``a``/``m``:
the detection layer's weights on the attention-pooled and max-pooled features, ``s``: the segmentation head's
weights, ``N``: the number of cells), whatever the image; see :meth:`NumpyFractureNet.cam_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.models.architecture import BN_EPS, HIGHPASS_GAIN, HIGHPASS_SIGMA, TOPK, highpass_kernel


class WeightsError(ValueError):
    """The weights do not fit the architecture (a missing, unexpected or misshapen tensor)."""


class _Weights:
    """A state dict being consumed: every tensor must be taken once, with the shape the architecture expects."""

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = dict(state)
        self.taken: set[str] = set()

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.state:
            raise WeightsError(f"missing tensor {key!r}")
        value = self.state[key]
        if tuple(value.shape) != shape:
            raise WeightsError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {shape}")
        self.taken.add(key)
        return np.asarray(value, dtype=np.float32)

    def finish(self) -> None:
        left = sorted(k for k in self.state if k not in self.taken and not k.endswith("num_batches_tracked"))
        if left:
            raise WeightsError(f"unexpected tensors {left[:5]}{' ...' if len(left) > 5 else ''}")


@dataclass
class Conv:
    """A 2-D convolution (square kernel) with bias, on one image (C, H, W)."""

    weight: np.ndarray  # (cout, cin * k * k)
    bias: np.ndarray  # (cout,)
    k: int
    stride: int = 1
    pad: int = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c, h, w = x.shape
        k, s, p = self.k, self.stride, self.pad
        if k == 1 and p == 0:
            xs = x[:, ::s, ::s] if s > 1 else x
            ho, wo = xs.shape[1:]
            out = self.weight @ np.ascontiguousarray(xs).reshape(c, ho * wo)
        else:
            # im2col straight from the unpadded input: tap (i, j) of output (y, x) reads input
            # (s*y + i - p, s*x + j - p); outside the input it is the zero padding (no padded copy).
            ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            cols = np.empty((c, k, k, ho, wo), dtype=np.float32)
            across = [_valid(j - p, s, w, wo) for j in range(k)]
            for i in range(k):
                y0, y1 = _valid(i - p, s, h, ho)
                for j, (x0, x1) in enumerate(across):
                    tap = cols[:, i, j]
                    if y0 or x0 or y1 < ho or x1 < wo:
                        tap[:, :y0], tap[:, y1:], tap[:, :, :x0], tap[:, :, x1:] = 0, 0, 0, 0
                    tap[:, y0:y1, x0:x1] = x[:, s * y0 + i - p:s * (y1 - 1) + i - p + 1:s,
                                             s * x0 + j - p:s * (x1 - 1) + j - p + 1:s]
            out = self.weight @ cols.reshape(c * k * k, ho * wo)
        out += self.bias[:, None]
        return out.reshape(-1, ho, wo)


def _valid(offset: int, stride: int, size: int, out: int) -> tuple[int, int]:
    """Output indices ``[a, b)`` whose input index ``stride * o + offset`` lies inside ``[0, size)``."""
    a = -(offset // stride) if offset < 0 else 0  # ceil(-offset / stride)
    b = min(out, (size - 1 - offset) // stride + 1)
    return a, max(a, b)


def _conv(wts: _Weights, key: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> Conv:
    w = wts.take(f"{key}.weight", (cout, cin, k, k))
    b = wts.take(f"{key}.bias", (cout,))
    return Conv(w.reshape(cout, -1).copy(), b.copy(), k, stride, pad)


def _conv_bn(wts: _Weights, conv: str, bn: str, cin: int, cout: int, k: int, stride: int = 1,
             pad: int = 0) -> Conv:
    """A bias-free convolution followed by a batch norm, folded into one convolution."""
    w = wts.take(f"{conv}.weight", (cout, cin, k, k)).astype(np.float64)
    gamma, beta = wts.take(f"{bn}.weight", (cout,)), wts.take(f"{bn}.bias", (cout,))
    mean, var = wts.take(f"{bn}.running_mean", (cout,)), wts.take(f"{bn}.running_var", (cout,))
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
    folded = (w * scale[:, None, None, None]).reshape(cout, -1).astype(np.float32)
    bias = (beta - mean * scale).astype(np.float32)
    return Conv(folded, bias, k, stride, pad)


def _linear(wts: _Weights, key: str, cin: int, cout: int) -> tuple[np.ndarray, np.ndarray]:
    return wts.take(f"{key}.weight", (cout, cin)).astype(np.float64), wts.take(f"{key}.bias", (cout,)).astype(
        np.float64)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


class ResBlock:
    """As :class:`pipeline.models.nets.ResBlock` (dilation 1)."""

    def __init__(self, wts: _Weights, key: str, cin: int, cout: int, stride: int) -> None:
        self.conv1 = _conv_bn(wts, f"{key}.conv1", f"{key}.bn1", cin, cout, 3, stride, 1)
        self.conv2 = _conv_bn(wts, f"{key}.conv2", f"{key}.bn2", cout, cout, 3, 1, 1)
        self.skip = (_conv_bn(wts, f"{key}.skip.0", f"{key}.skip.1", cin, cout, 1, stride, 0)
                     if stride != 1 or cin != cout else None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.conv2(relu(self.conv1(x)))
        y += self.skip(x) if self.skip is not None else x
        return relu(y)


def _stage(wts: _Weights, key: str, cin: int, cout: int) -> list[ResBlock]:
    return [ResBlock(wts, f"{key}.0", cin, cout, 2), ResBlock(wts, f"{key}.1", cout, cout, 1)]


def _run(blocks: list[ResBlock], x: np.ndarray) -> np.ndarray:
    for block in blocks:
        x = block(x)
    return x


def highpass(x: np.ndarray, sigma: float = HIGHPASS_SIGMA, gain: float = HIGHPASS_GAIN) -> np.ndarray:
    """(H, W) -> (2, H, W): the image and ``gain * (image - gaussian_blur(image))``, as
    :class:`pipeline.models.nets.HighPass` (reflected edges, replicated when the image is no larger than the
    kernel's radius)."""
    kernel = highpass_kernel(sigma)
    radius = (len(kernel) - 1) // 2
    border = cv2.BORDER_REFLECT_101 if min(x.shape) > radius else cv2.BORDER_REPLICATE
    blur = cv2.sepFilter2D(x, cv2.CV_32F, kernel, kernel, borderType=border)
    out = np.empty((2, *x.shape), dtype=np.float32)
    out[0] = x
    np.subtract(x, blur, out=out[1])
    out[1] *= gain
    return out


def upsample_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W), as ``F.interpolate(mode="nearest", size=...)``."""
    _c, h, w = x.shape
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


class Trunk:
    """Another executor of a network's trunk (its convolutions from the prepared input to the features its heads
    read): called with the trunk's (C, H, W) input, it returns the trunk's outputs as (C', h, w) arrays. The
    ``onnx`` runtime sets one (:class:`pipeline.models.onnx_trunks.OrtTrunk`); without one, NumPy runs it."""

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError


class _TrunkHolder:
    """A network whose trunk (the attributes named in ``TRUNK_PARTS``) another executor may take over."""

    trunk: Trunk | None = None
    TRUNK_PARTS: tuple[str, ...] = ()

    def hand_over_trunk(self, trunk: Trunk) -> None:
        """Run the trunk on ``trunk`` from now on, and let go of NumPy's copy of its weights (``trunk`` holds its
        own)."""
        self.trunk = trunk
        for name in self.TRUNK_PARTS:
            if name in vars(self):
                delattr(self, name)


class _Backbone(_TrunkHolder):
    """High-pass input, stem and stages 1-4 (:class:`pipeline.models.nets.ResidualBackbone`)."""

    TRUNK_PARTS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage4")

    def __init__(self, wts: _Weights, width: int) -> None:
        w = width
        self.channels = c1, c2, c3, c4, c5 = (w, w, 2 * w, 4 * w, 8 * w)
        self.stem = _conv_bn(wts, "stem.0", "stem.1", 2, c1, 3, 2, 1)
        self.stage1 = _stage(wts, "stage1", c1, c2)
        self.stage2 = _stage(wts, "stage2", c2, c3)
        self.stage3 = _stage(wts, "stage3", c3, c4)
        self.stage4 = _stage(wts, "stage4", c4, c5)

    @staticmethod
    def trunk_input(x: np.ndarray) -> np.ndarray:
        """The (H, W) prepared input -> (2, H, W): the image and its high-pass."""
        if x.ndim != 2:
            raise ValueError(f"expected one (H, W) image, got shape {x.shape}")
        return highpass(x)

    def to_stage2(self, x: np.ndarray) -> np.ndarray:
        return _run(self.stage2, _run(self.stage1, relu(self.stem(self.trunk_input(x)))))


@dataclass
class FracturePass:
    """One forward pass of the detector: what its heads read and gave."""

    detect_logit: float
    type_logits: np.ndarray  # (11,)
    seg: np.ndarray  # (h, w) logits at 1/8
    features: np.ndarray  # (C, h, w)
    type_hidden: np.ndarray  # the type head's hidden layer before its ReLU (for the type's Grad-CAM)


class NumpyFractureNet(_Backbone):
    """:class:`pipeline.models.nets.FractureNet`, forward only, plus its Grad-CAM in closed form."""

    TRUNK_PARTS = (*_Backbone.TRUNK_PARTS, "lat2", "lat3", "lat4", "fuse")

    def __init__(self, state: Mapping[str, np.ndarray], width: int = 16, num_types: int = 11) -> None:
        wts = _Weights(state)
        super().__init__(wts, width)
        w = width
        _c1, _c2, c3, c4, c5 = self.channels
        f = 3 * w
        self.lat2, self.lat3, self.lat4 = (_conv(wts, "lat2", c3, f, 1), _conv(wts, "lat3", c4, f, 1),
                                           _conv(wts, "lat4", c5, f, 1))
        self.fuse = _conv_bn(wts, "fuse.0", "fuse.1", f, f, 3, 1, 1)
        self.seg_w = wts.take("seg_head.weight", (1, f, 1, 1)).reshape(f).astype(np.float64)
        self.seg_b = float(wts.take("seg_head.bias", (1,))[0])
        self.det_w, self.det_b = _linear(wts, "det_fc", 2 * f, 1)
        self.type_w1, self.type_b1 = _linear(wts, "type_fc.0", 2 * f, 4 * w)
        self.type_w2, self.type_b2 = _linear(wts, "type_fc.3", 4 * w, num_types)
        wts.finish()
        self.out_channels = f

    def backbone(self, x: np.ndarray) -> np.ndarray:
        """(H, W) standardised, padded input -> fused pyramid features (C, H/8, W/8)."""
        if self.trunk is not None:
            return self.trunk(self.trunk_input(x))[0]
        f2 = self.to_stage2(x)
        f3 = _run(self.stage3, f2)
        f4 = _run(self.stage4, f3)
        p = upsample_nearest(self.lat4(f4), f3.shape[1:])
        p += self.lat3(f3)
        p = upsample_nearest(p, f2.shape[1:])
        p += self.lat2(f2)
        return relu(self.fuse(p))

    def forward(self, x: np.ndarray, cams: bool = False) -> FracturePass:
        """(H, W) standardised, padded input -> logits, segmentation map and features (``cams`` is accepted for
        the torch runtime's signature: :meth:`cam` needs nothing more)."""
        f = self.backbone(x)
        c, h, w = f.shape
        flat_f = f.reshape(c, h * w).astype(np.float64)
        seg = self.seg_w @ flat_f + self.seg_b
        k = min(TOPK, seg.size)
        seg_top = float(np.partition(seg, seg.size - k)[seg.size - k:].mean())
        pooled = np.concatenate([flat_f @ softmax(seg), flat_f.max(axis=1)])
        det = float(self.det_w[0] @ pooled + self.det_b[0]) + seg_top
        hidden = self.type_w1 @ pooled + self.type_b1
        types = self.type_w2 @ np.maximum(hidden, 0) + self.type_b2
        return FracturePass(det, types, seg.reshape(h, w).astype(np.float32), f, hidden)

    def cam_weights(self, fp: FracturePass, type_index: int | None = None) -> np.ndarray:
        """Grad-CAM's channel weights (the gradient's mean over the map) for the detection logit, or with
        ``type_index`` for that type's logit.

        With ``g`` the gradient of the logit with respect to the pooled vector ``[attn, max]`` (2C), the mean
        over the N cells of the gradient with respect to the features is ``(g_attn + g_max) / N`` plus, for the
        detection logit, ``s / N`` from the top-k mean of the segmentation map: the attention term's dependence
        on the softmax weights sums to zero over the map, and the maximum and the top-k mean pass their gradient
        to cells that sum to one whichever cells they are (ties included)."""
        c = self.out_channels
        if type_index is None:
            g = self.det_w[0]
            extra = self.seg_w
        else:
            g = (self.type_w2[type_index] * (fp.type_hidden > 0)) @ self.type_w1
            extra = np.zeros(c)
        n = fp.features.shape[1] * fp.features.shape[2]
        return (g[:c] + g[c:] + extra) / n

    def cam(self, fp: FracturePass, type_index: int | None = None) -> np.ndarray:
        """Grad-CAM map (h, w) in [0, 1], as :func:`pipeline.explain.grad_cam` on the torch network."""
        c, h, w = fp.features.shape
        weights = self.cam_weights(fp, type_index).astype(np.float32)
        cam = relu(weights @ fp.features.reshape(c, h * w)).reshape(h, w)
        peak = float(cam.max())
        if peak <= 0 or not np.isfinite(peak):
            return np.zeros_like(cam)
        return cam / peak


@dataclass
class ReaderPass:
    """One pass of a type reader (the torch runtime keeps the features and logits with their graph)."""

    type_logits: np.ndarray  # (11,)
    evidence: float  # the strongest cell of the reader's segmentation map (a logit)
    features: Any = None
    logits: Any = None
    evidence_cam: np.ndarray | None = None  # Grad-CAM of ``evidence`` over the patch, in [0, 1] (evidence_cam())


def evidence_cam(seg: np.ndarray, bias: float) -> np.ndarray:
    """Grad-CAM (h, w) in [0, 1] of a reader's evidence, the maximum of its segmentation map ``seg`` (logits of a
    1x1 convolution with bias ``bias`` over the Grad-CAM target features), in closed form.

    The maximum's gradient with respect to the features is the convolution's weight vector at the strongest cell
    and zero elsewhere, so Grad-CAM's channel weights are that vector over the number of cells, and their sum
    with the features is the map less its bias over the number of cells: rectified and scaled to its peak,
    ``relu(seg - bias) / max``. Both runtimes use this (a test holds it equal to autograd's Grad-CAM)."""
    cam = np.maximum(np.asarray(seg, dtype=np.float32) - np.float32(bias), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0 or not np.isfinite(peak):
        return np.zeros_like(cam)
    return cam / peak


class NumpyTypeReader(_Backbone):
    """:class:`pipeline.models.nets.TypeReader`, forward only (its Grad-CAM needs the torch runtime)."""

    def __init__(self, state: Mapping[str, np.ndarray], width: int = 16, num_types: int = 11) -> None:
        wts = _Weights(state)
        super().__init__(wts, width)
        _c1, _c2, _c3, c4, c5 = self.channels
        self.seg_w = wts.take("reader_seg.weight", (1, c4, 1, 1)).reshape(c4).astype(np.float64)
        self.seg_b = float(wts.take("reader_seg.bias", (1,))[0])
        self.fc_w, self.fc_b = _linear(wts, "reader_fc.1", c4 + 2 * c5, num_types)
        wts.finish()

    def classify(self, x: np.ndarray, cams: bool = False) -> ReaderPass:
        """(P, P) standardised patch -> eleven type logits."""
        if cams:
            raise NotImplementedError(self.NO_CAM)
        logits, seg = self.read_map(x)
        return ReaderPass(logits, float(seg.max()), evidence_cam=evidence_cam(seg, self.seg_b))

    supports_cam = False
    NO_CAM = ("the type reader's Grad-CAM needs a backward pass through a convolutional stage: load the models "
              "with the torch runtime for it")

    def cam(self, rp: ReaderPass, index: int) -> np.ndarray:
        raise NotImplementedError(self.NO_CAM)

    def read_map(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The eleven type logits and the segmentation map (h, w) of logits at 1/16 of the patch."""
        if self.trunk is not None:
            f, t = self.trunk(self.trunk_input(x))
        else:
            f = _run(self.stage3, self.to_stage2(x))
            t = _run(self.stage4, f)
        c, h, w = f.shape
        flat_f = f.reshape(c, h * w).astype(np.float64)
        seg = self.seg_w @ flat_f + self.seg_b
        attn = softmax(seg)
        flat_t = t.reshape(t.shape[0], -1).astype(np.float64)
        pooled = np.concatenate([flat_f @ attn, flat_t.mean(axis=1), flat_t.max(axis=1)])
        return self.fc_w @ pooled + self.fc_b, seg.reshape(h, w)


class NumpyValidityNet(_TrunkHolder):
    """:class:`pipeline.models.nets.ValidityNet`, forward only."""

    TRUNK_PARTS = ("stem", "blocks")

    def __init__(self, state: Mapping[str, np.ndarray], width: int = 16) -> None:
        wts = _Weights(state)
        w = width
        self.stem = _conv_bn(wts, "features.0", "features.1", 1, w, 3, 2, 1)
        self.blocks = [ResBlock(wts, "features.3", w, 2 * w, 2), ResBlock(wts, "features.4", 2 * w, 4 * w, 2),
                       ResBlock(wts, "features.5", 4 * w, 4 * w, 2)]
        self.fc_w, self.fc_b = _linear(wts, "fc", 8 * w, 1)
        wts.finish()

    def logit(self, x: np.ndarray) -> float:
        """(S, S) prepared input -> the "bone radiograph" logit."""
        prepared = x[None].astype(np.float32, copy=False)
        f = self.trunk(prepared)[0] if self.trunk is not None else _run(self.blocks, relu(self.stem(prepared)))
        flat = f.reshape(f.shape[0], -1).astype(np.float64)
        pooled = np.concatenate([flat.mean(axis=1), flat.max(axis=1)])
        return float(self.fc_w[0] @ pooled + self.fc_b[0])


NUMPY_ARCHITECTURES: dict[str, type[NumpyFractureNet] | type[NumpyTypeReader] | type[NumpyValidityNet]] = {
    "FractureNet": NumpyFractureNet, "TypeReader": NumpyTypeReader, "ValidityNet": NumpyValidityNet,
}
