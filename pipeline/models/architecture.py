"""Constants of the network architectures that both runtimes (:mod:`pipeline.models.nets` in PyTorch,
:mod:`pipeline.models.numpy_nets` in NumPy) and the pipeline share; torch-free."""

import numpy as np

TOPK = 8  # segmentation cells averaged into the detection evidence
SEG_STRIDE = 8  # the detector's segmentation map is at 1/8 of its input
INPUT_MULTIPLE = 32  # the deepest stage is at 1/32: inputs are padded to a multiple of this
HIGHPASS_SIGMA = 3.0  # the fixed high-pass input channel: gain * (image - gaussian_blur(image, sigma))
HIGHPASS_GAIN = 4.0
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, the one the networks are built with


def highpass_kernel(sigma: float = HIGHPASS_SIGMA) -> np.ndarray:
    """The high-pass input's 1-D Gaussian (radius ``round(3 * sigma)``, summing to one), computed in float64 and
    rounded once to float32, so that both runtimes blur with the same float32 taps. (Each runtime once computed
    its own in different precisions: the taps differed by an ulp, which the gain of 4 and the network amplified
    to about 3e-4 in the detection logit between the runtimes.)"""
    radius = int(round(3 * sigma))
    g = np.exp(-np.arange(-radius, radius + 1, dtype=np.float64) ** 2 / (2 * sigma * sigma))
    out: np.ndarray = (g / g.sum()).astype(np.float32)
    return out
