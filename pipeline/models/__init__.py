"""Networks and model bundles (weights + verified model card)."""

import os

# Under CPU oversubscription (a shared 2-core box) OpenMP's default spin-waiting makes torch many times
# slower; passive waiting must be chosen before torch is first imported. Users may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.models.bundle import Bundle, BundleError, load_bundle, save_bundle
from pipeline.models.nets import FractureNet, ValidityNet

__all__ = ["Bundle", "BundleError", "FractureNet", "ValidityNet", "load_bundle", "save_bundle"]
