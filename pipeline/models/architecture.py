"""Constants of the network architectures that both runtimes (:mod:`pipeline.models.nets` in PyTorch,
:mod:`pipeline.models.numpy_nets` in NumPy) and the pipeline share; torch-free."""

TOPK = 8  # segmentation cells averaged into the detection evidence
SEG_STRIDE = 8  # the detector's segmentation map is at 1/8 of its input
INPUT_MULTIPLE = 32  # the deepest stage is at 1/32: inputs are padded to a multiple of this
HIGHPASS_SIGMA = 3.0  # the fixed high-pass input channel: gain * (image - gaussian_blur(image, sigma))
HIGHPASS_GAIN = 4.0
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, the one the networks are built with
