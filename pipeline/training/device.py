"""Where training runs: the CPU (the usual case here) or a CUDA GPU (a lent machine, a hospital's server).

Only the optimisation loop moves to the device (:func:`pipeline.training.loop.run_training_loop`): crops and
patches are drawn on the CPU by the same code, the per-epoch validation runs the model where it is, and the model
comes back to the CPU when the loop ends, so the head refit, calibration and the bundle written are the CPU path
every CPU run takes. A checkpoint is stored with its tensors as they were and loaded onto whatever device the
resuming run uses, so a run started on a GPU can be finished on a CPU and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The device asked for is not there (the message says what is)."""


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str) -> torch.device:
    """``auto`` (the first CUDA GPU if torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda:0") if cuda_count() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    count = cuda_count()
    if count == 0:
        build = torch.version.cuda
        raise DeviceError(f"device {name!r}: this torch ({torch.__version__}) "
                          + (f"is built for CUDA {build} but sees no GPU" if build else "is a CPU-only build")
                          + "; train with --device cpu (or auto), or install a CUDA build of torch "
                            "on a machine with a GPU")
    number = int(index or 0)
    if number >= count:
        raise DeviceError(f"device {name!r}: torch sees {count} GPU{'s' if count > 1 else ''} "
                          f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", number)


def describe_device(device: torch.device) -> dict[str, Any]:
    """What a card records of where its weights were trained."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"type": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (the CPU for a model without any)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (on the CPU the same tensors: ``Tensor.to`` copies nothing there)."""
    return {k: v.to(device, non_blocking=device.type == "cuda") for k, v in batch.items()}


def prepare(device: torch.device) -> None:
    """Per-run settings for the device: fixed crop shapes let cuDNN pick its fastest convolutions."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
