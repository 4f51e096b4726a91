"""Network definitions in plain PyTorch (no torchvision).

:class:`FractureNet` is one compact residual backbone with a small feature pyramid and three heads:

* ``seg``: a dense fracture-region logit map at 1/8 of the input, supervised by the generator's masks during
  training (what makes a small network learn from few CPU minutes: the whole-image label alone does not) and
  reused at inference as the detection evidence and as the place where the type is read;
* ``detect``: one logit, "the image shows a fracture" (calibrated later by temperature scaling);
* ``types``: eleven logits over :data:`pipeline.taxonomy.FRACTURE_TYPES`.

The first layer sees the standardised image and a fixed high-pass copy of it (the image minus its Gaussian
blur, sigma 3 px): fracture lines are 1-2 px features on smooth bone, and giving them to the network directly
made the segmentation learn several times faster than from the image alone.  The high-pass filter is part of
the network (a buffer, not a weight), so training and inference cannot disagree about it.

:class:`TypeReader` is the second-stage type classifier: it reads a patch around the detector's strongest
segmentation evidence at twice the detector's resolution, where the geometry that tells the eleven types apart
(the line's angle to the shaft, a second line, a fragment, a lesion, a displaced joint) is still visible.

:class:`ValidityNet` is a small classifier "bone radiograph or not" at 160 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.architecture import (
    HIGHPASS_GAIN,
    HIGHPASS_SIGMA,
    INPUT_MULTIPLE,
    SEG_STRIDE,
    TOPK,
    highpass_kernel,
)

__all__ = ["INPUT_MULTIPLE", "SEG_STRIDE", "TOPK", "FractureNet", "ResBlock", "TypeReader", "ValidityNet"]



def _norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


class ResBlock(nn.Module):
    """Basic residual block: 3x3 conv - norm - relu - 3x3 conv - norm, plus identity or 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _norm(cout)
        self.skip: nn.Module
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x), inplace=True)


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(cin, cout, stride=2), ResBlock(cout, cout))


class HighPass(nn.Module):
    """Input (N, 1, H, W) -> (N, 2, H, W): the image and ``gain * (image - gaussian_blur(image))``."""

    def __init__(self, sigma: float = HIGHPASS_SIGMA, gain: float = HIGHPASS_GAIN) -> None:
        super().__init__()
        g = torch.from_numpy(highpass_kernel(sigma))  # the taps the NumPy runtime uses too
        self.register_buffer("kernel", g.view(1, 1, 1, -1), persistent=False)
        self.kernel: torch.Tensor
        self.radius = (len(g) - 1) // 2
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
        k = self.kernel.to(x.dtype)
        blur = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k)
        blur = F.conv2d(F.pad(blur, (0, 0, r, r), mode=mode), k.transpose(2, 3))
        return torch.cat([x, self.gain * (x - blur)], dim=1)


@dataclass
class FractureOutput:
    detect: torch.Tensor  # (N,) logit
    types: torch.Tensor  # (N, 11) logits
    seg: torch.Tensor  # (N, 1, h, w) logits at 1/8
    features: torch.Tensor  # (N, C, h, w) fused pyramid features at 1/8 (Grad-CAM target)


class ResidualBackbone(nn.Module):
    """The high-pass input, the stem and four residual stages to 1/32 that :class:`FractureNet` and
    :class:`TypeReader` share (same parameter names and shapes, so a type reader starts from a detector)."""

    def __init__(self, width: int, num_types: int) -> None:
        super().__init__()
        w = width
        self.config = {"width": width, "num_types": num_types}
        c1, c2, c3, c4, c5 = self.channels = (w, w, 2 * w, 4 * w, 8 * w)
        self.highpass = HighPass()
        self.stem = nn.Sequential(nn.Conv2d(2, c1, 3, 2, 1, bias=False), _norm(c1), nn.ReLU(inplace=True))  # 1/2
        self.stage1 = _stage(c1, c2)  # 1/4
        self.stage2 = _stage(c2, c3)  # 1/8
        self.stage3 = _stage(c3, c4)  # 1/16
        self.stage4 = _stage(c4, c5)  # 1/32


class FractureNet(ResidualBackbone):
    """Residual backbone to 1/32, top-down pyramid back to 1/8, and detection/type/segmentation heads."""

    def __init__(self, width: int = 16, num_types: int = 11) -> None:
        super().__init__(width, num_types)
        w = width
        _c1, _c2, c3, c4, c5 = self.channels
        f = 3 * w  # pyramid channels
        self.lat2, self.lat3, self.lat4 = nn.Conv2d(c3, f, 1), nn.Conv2d(c4, f, 1), nn.Conv2d(c5, f, 1)
        self.fuse = nn.Sequential(nn.Conv2d(f, f, 3, padding=1, bias=False), _norm(f), nn.ReLU(inplace=True))
        self.seg_head = nn.Conv2d(f, 1, 1)
        self.det_fc = nn.Linear(2 * f, 1)
        self.type_fc = nn.Sequential(nn.Linear(2 * f, 4 * w), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                     nn.Linear(4 * w, num_types))
        self.out_channels = f

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Fused pyramid features at 1/8 (the Grad-CAM target)."""
        f2 = self.stage2(self.stage1(self.stem(self.highpass(x))))
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        p = F.interpolate(self.lat4(f4), size=f3.shape[-2:], mode="nearest") + self.lat3(f3)
        p = F.interpolate(p, size=f2.shape[-2:], mode="nearest") + self.lat2(f2)
        return self.fuse(p)

    def evidence(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(seg, pooled, seg_top)``: what the detection and type heads read from the pyramid features.

        Every pooling here is independent of the image size, so a network trained on crops behaves the same on
        whole images: attention pooling of the features with the softmax of the segmentation map as weights,
        the global maximum of the features (``pooled``, (N, 2C)), and the mean of the top-k segmentation
        logits (``seg_top``, (N,))."""
        seg = self.seg_head(f)
        flat = seg.flatten(1)
        seg_top = flat.topk(min(TOPK, flat.shape[1]), dim=1).values.mean(dim=1)
        attn = torch.softmax(flat, dim=1).view_as(seg)
        pooled = torch.cat([(f * attn).sum(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return seg, pooled, seg_top

    def heads(self, f: torch.Tensor) -> FractureOutput:
        seg, pooled, seg_top = self.evidence(f)
        det = self.det_fc(pooled).squeeze(1) + seg_top
        types = self.type_fc(pooled)
        return FractureOutput(detect=det, types=types, seg=seg, features=f)

    def forward(self, x: torch.Tensor) -> FractureOutput:
        return self.heads(self.backbone(x))


@dataclass
class TypeOutput:
    types: torch.Tensor  # (N, 11) logits
    seg: torch.Tensor  # (N, 1, P/16, P/16) fracture logits (training-only supervision; the attention weights)


class TypeReader(ResidualBackbone):
    """Patch (N, 1, P, P) -> eleven type logits.

    The backbone has the detector's shape (stem and stages 1-4 of :class:`FractureNet`), so it can start from a
    trained detector's weights: its line detectors carry over to the finer scale. A segmentation head at 1/16,
    supervised by the fracture mask during training, gives attention weights that pool the 1/16 features over
    the fracture wherever it lies in the patch; the 1/32 stage adds context across the whole patch. ``features``
    (1/16) is the Grad-CAM target."""

    def __init__(self, width: int = 16, num_types: int = 11) -> None:
        super().__init__(width, num_types)
        _c1, _c2, _c3, c4, c5 = self.channels
        self.reader_seg = nn.Conv2d(c4, 1, 1)
        self.reader_fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(c4 + 2 * c5, num_types))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(self.stage2(self.stage1(self.stem(self.highpass(x)))))

    def heads(self, f: torch.Tensor) -> TypeOutput:
        seg = self.reader_seg(f)
        attn = torch.softmax(seg.flatten(1), dim=1).view_as(seg)
        t = self.stage4(f)
        pooled = torch.cat([(f * attn).sum(dim=(2, 3)), t.mean(dim=(2, 3)), t.amax(dim=(2, 3))], dim=1)
        return TypeOutput(types=self.reader_fc(pooled), seg=seg)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.heads(f).types

    def forward(self, x: torch.Tensor) -> TypeOutput:
        return self.heads(self.features(x))


class ValidityNet(nn.Module):
    """Small CNN: logit that the input (160x160, grayscale) is a bone radiograph."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.config = {"width": width}
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, 2, 1, bias=False), _norm(w), nn.ReLU(inplace=True),  # 80
            ResBlock(w, w * 2, stride=2),  # 40
            ResBlock(w * 2, w * 4, stride=2),  # 20
            ResBlock(w * 4, w * 4, stride=2),  # 10
        )
        self.fc = nn.Linear(w * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1)
        return self.fc(pooled).squeeze(1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
