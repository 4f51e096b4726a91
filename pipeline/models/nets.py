"""Network definitions in plain PyTorch (no torchvision).

:class:`FractureNet` is one compact residual backbone with three heads:

* ``detect``: one logit, "the image shows a fracture" (calibrated later by temperature scaling);
* ``types``: eleven logits over :data:`pipeline.taxonomy.FRACTURE_TYPES`, pooled with attention from the
  segmentation map so the type is read where the fracture is;
* ``seg``: a dense fracture-region logit map at 1/16 of the input, supervised by the generator's masks
  during training (it is what makes a small network learn from few CPU minutes) and reused at inference as
  part of the detection evidence.

:class:`ValidityNet` is a small classifier "bone radiograph or not" at 160 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TOPK = 4  # segmentation cells averaged into the detection evidence


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


@dataclass
class FractureOutput:
    detect: torch.Tensor  # (N,) logit
    types: torch.Tensor  # (N, 11) logits
    seg: torch.Tensor  # (N, 1, h, w) logits at 1/16
    features: torch.Tensor  # (N, C, h, w) last stage (Grad-CAM target)


class FractureNet(nn.Module):
    """Shared residual backbone (stride 16) with detection, type and segmentation heads."""

    def __init__(self, width: int = 16, num_types: int = 11) -> None:
        super().__init__()
        w = width
        self.config = {"width": width, "num_types": num_types}
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), _norm(w), nn.ReLU(inplace=True))
        self.stage1 = ResBlock(w, w * 2, stride=2)  # 1/4
        self.stage2 = nn.Sequential(ResBlock(w * 2, w * 3, stride=2), ResBlock(w * 3, w * 3))  # 1/8
        self.stage3 = nn.Sequential(ResBlock(w * 3, w * 6, stride=2), ResBlock(w * 6, w * 6))  # 1/16
        self.stage4 = nn.Sequential(ResBlock(w * 6, w * 8, dilation=2), ResBlock(w * 8, w * 8, dilation=2))
        c = w * 8
        self.seg_head = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(c // 2, 1, 1))
        self.det_fc = nn.Linear(c, 1)
        self.det_seg_weight = nn.Parameter(torch.tensor(1.0))
        self.type_fc = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                     nn.Linear(c, num_types))
        self.out_channels = c

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))

    def heads(self, f: torch.Tensor) -> FractureOutput:
        seg = self.seg_head(f)
        flat = seg.flatten(1)
        # Every pooling here is independent of the image size, so a network trained on crops behaves the
        # same on whole images: the mean of the top-k segmentation logits, and attention pooling of the
        # features with the softmax of the segmentation map as weights.
        k = min(TOPK, flat.shape[1])
        seg_top = flat.topk(k, dim=1).values.mean(dim=1)
        attn = torch.softmax(flat, dim=1).view_as(seg)
        att_pool = (f * attn).sum(dim=(2, 3))
        det = self.det_fc(att_pool).squeeze(1) + self.det_seg_weight * seg_top
        types = self.type_fc(att_pool)
        return FractureOutput(detect=det, types=types, seg=seg, features=f)

    def forward(self, x: torch.Tensor) -> FractureOutput:
        return self.heads(self.backbone(x))


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
