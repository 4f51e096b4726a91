"""Training: dataset importers, augmentation, the training loop, calibration and the ``train`` command."""

import os

# Under CPU oversubscription (a shared 2-core box) OpenMP's default spin-waiting makes torch many times
# slower; passive waiting must be chosen before torch is first imported. Users may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
