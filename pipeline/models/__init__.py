"""Networks and model bundles (weights + verified model card)."""

import os
from typing import Any

# Under CPU oversubscription (a shared 2-core box) OpenMP's default spin-waiting makes torch many times
# slower; passive waiting must be chosen before torch is first imported. Users may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.models.bundle import Bundle, BundleError, load_bundle, save_bundle  # noqa: E402

__all__ = ["Bundle", "BundleError", "FractureNet", "ValidityNet", "load_bundle", "save_bundle"]


def __getattr__(name: str) -> Any:
    # The torch networks are imported on first use only: the NumPy runtime (a job worker) never loads torch.
    if name in ("FractureNet", "ValidityNet"):
        from pipeline.models import nets

        return getattr(nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
