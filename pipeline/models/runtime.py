"""One interface to a network in either runtime, for the pipeline (:mod:`pipeline.run`,
:mod:`pipeline.validation`).

The detector (:class:`~pipeline.models.nets.FractureNet`) offers ``forward(x, cams)`` on an (H, W) prepared
input, giving a pass with ``detect_logit``, ``type_logits`` and the segmentation map ``seg``, and
``cam(pass, type_index)``, the Grad-CAM map of the detection logit (``type_index`` None) or of one type's logit.
The type reader offers ``classify(x, cams)`` giving a pass with ``type_logits``, ``evidence`` (the
strongest cell of its segmentation map) and ``evidence_cam`` (that evidence's Grad-CAM over the patch), and
``cam(pass, index)``. The
radiograph check offers ``logit(x)``. The NumPy networks (:mod:`pipeline.models.numpy_nets`) have these methods
themselves; the torch modules are wrapped here, and torch is imported only for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.models.numpy_nets import (
    NumpyFractureNet,
    NumpyTypeReader,
    NumpyValidityNet,
    ReaderPass,
    evidence_cam,
)

Engine = Any  # one of the classes below or a NumPy network: duck-typed by what the pipeline calls


@dataclass
class TorchFracturePass:
    detect_logit: float
    type_logits: np.ndarray
    seg: np.ndarray
    features: Any  # torch.Tensor, with the heads' graph when asked for maps
    out: Any  # pipeline.models.nets.FractureOutput


class TorchFractureNet:
    def __init__(self, net: Any) -> None:
        self.net = net

    def forward(self, x: np.ndarray, cams: bool = False) -> TorchFracturePass:
        import torch

        from pipeline.models.preprocess import as_batch

        with torch.no_grad():
            feats = self.net.backbone(as_batch(x))
        feats.requires_grad_(cams)
        with torch.set_grad_enabled(cams):  # only the heads are differentiated
            out = self.net.heads(feats)
        return TorchFracturePass(
            detect_logit=float(out.detect[0].detach()),
            type_logits=out.types[0].detach().numpy().astype(np.float64),
            seg=out.seg[0, 0].detach().numpy(),
            features=feats,
            out=out,
        )

    def cam(self, fp: TorchFracturePass, type_index: int | None = None) -> np.ndarray:
        from pipeline.explain import grad_cam

        score = fp.out.detect[0] if type_index is None else fp.out.types[0, type_index]
        return grad_cam(fp.features, score, retain_graph=True)


class TorchTypeReader:
    def __init__(self, net: Any) -> None:
        self.net = net

    def classify(self, x: np.ndarray, cams: bool = False) -> ReaderPass:
        import torch

        from pipeline.models.preprocess import as_batch

        with torch.no_grad():
            feats = self.net.features(as_batch(x))
        feats.requires_grad_(cams)
        with torch.set_grad_enabled(cams):
            out = self.net.heads(feats)
        logits = out.types[0]
        seg = out.seg[0, 0].detach().numpy()
        return ReaderPass(logits.detach().numpy().astype(np.float64), float(seg.max()),
                          feats if cams else None, logits if cams else None,
                          evidence_cam(seg, float(self.net.reader_seg.bias.detach()[0])))

    def cam(self, rp: ReaderPass, index: int) -> np.ndarray:
        from pipeline.explain import grad_cam

        if rp.features is None:
            raise ValueError("classify(x, cams=True) first")
        return grad_cam(rp.features, rp.logits[index], retain_graph=True)


class TorchValidityNet:
    def __init__(self, net: Any) -> None:
        self.net = net

    def logit(self, x: np.ndarray) -> float:
        import torch

        from pipeline.models.preprocess import as_batch

        with torch.inference_mode():
            return float(self.net(as_batch(x))[0])


def engine_for(model: Any) -> Engine:
    """The runtime-neutral interface to ``model`` (a NumPy network is its own)."""
    if isinstance(model, NumpyFractureNet | NumpyTypeReader | NumpyValidityNet):
        return model
    name = type(model).__name__
    wrappers = {"FractureNet": TorchFractureNet, "TypeReader": TorchTypeReader, "ValidityNet": TorchValidityNet}
    if name not in wrappers:
        raise TypeError(f"no runtime interface for {name}")
    return wrappers[name](model)
