"""``fracture-node average``: one bundle whose weights are the mean of several bundles' weights.

Networks trained from the same starting weights with the same recipe and different seeds (siblings) tend to lie
in one basin of the loss, and the average of their weights (a "model soup", Wortsman et al., ICML 2022) costs
one network at inference and often scores like the ensemble of its ingredients. The average is a new network: the
ingredients' calibration (temperature, Platt shift, operating point, a reader's detection fusion) and their metrics
do not describe it, so the averaged card carries none of them and says how to refit them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.models.bundle import BundleError, card_time, load_bundle, save_bundle

#: Card fields fitted to, or measured on, one set of weights: dropped from an average.
FITTED_FIELDS = ("metrics", "operating_point", "detection_fusion", "temperature")

#: Training-record fields that describe one run's calibration or history, never carried into an average's card.
RUN_FIELDS = ("calibration", "calibration_images", "calibration_data", "recalibrations", "first_calibration",
              "recalibration_command", "history", "log", "note", "continued_from")

#: How to refit what the average lacks, by task.
REFIT = {
    "classify": "fracture-node recalibrate --classifier OUT --detector DETECTOR --data CAL [--fuse-detection ...]",
    "detect": "fracture-node train --task fracture --init OUT --max-steps 0 --head-images 0 --calibration-data CAL "
              "--data TRAIN --out DIR",
}


def average_state(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (float32, whatever the stored dtype); of integer tensors
    (BatchNorm's batch counters) the largest. Raises :class:`BundleError` when the
    ingredients do not hold the same tensors with the same shapes."""
    first = states[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        if state.keys() != first.keys():
            missing = sorted(set(first) ^ set(state))
            raise BundleError(f"{name} does not hold the same tensors as {names[0]} (differ: {', '.join(missing[:5])})")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise BundleError(f"{name}: {key} has shape {tuple(tensor.shape)}, {names[0]} has "
                                  f"{tuple(first[key].shape)}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(dim=0)
        else:
            out[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return out


def shared_training(cards: list[dict[str, Any]]) -> dict[str, Any]:
    """The training-record fields that every card holds with the same value (the recipe the ingredients share:
    data, augmentation, losses, learning rate...), less those of one run's calibration or history
    (:data:`RUN_FIELDS`)."""
    records = [c.get("training", {}) for c in cards]
    return {k: v for k, v in records[0].items()
            if k not in RUN_FIELDS and all(k in r and r[k] == v for r in records[1:])}


def average_bundles(bundles: list[Path], out: Path, version: str | None = None,
                    weights_dtype: str = "float16") -> Path:
    """Write the bundle at ``out`` whose weights are the mean of ``bundles``' (two or more detectors or type
    readers, each verified by its SHA-256; one task, architecture and input spec). Its card is the first
    ingredient's without the fitted fields (:data:`FITTED_FIELDS`); its training record holds what every
    ingredient's shares (:func:`shared_training`) and ``averaged_from``, naming every ingredient."""
    if len(bundles) < 2:
        raise BundleError("averaging needs two bundles or more")
    loaded = [load_bundle(b, runtime="torch") for b in bundles]
    first = loaded[0]
    if first.task not in REFIT:
        raise BundleError(f"{first.path}: a {first.task} bundle; averaging is for the detector and the type reader, "
                          "whose training continues from given weights (--init) and whose cards can be refitted")
    for other in loaded[1:]:
        for what, mine, theirs in (("task", first.task, other.task),
                                   ("architecture", first.card["architecture"], other.card["architecture"]),
                                   ("input", first.input_spec, other.input_spec)):
            if mine != theirs:
                raise BundleError(f"{other.path}: its {what} ({theirs}) differs from {first.path}'s ({mine}); only "
                                  "bundles of one network trained for one input can be averaged")
    names = [str(b.path) for b in loaded]
    state = average_state([b.model.state_dict() for b in loaded], names)
    model = first.model
    model.load_state_dict(state, strict=True)
    card = {k: v for k, v in first.card.items() if k not in (*FITTED_FIELDS, "weights")}
    card["version"] = version or f"{first.card['version']}-average"
    card["created"] = card_time()
    card["training"] = {
        **shared_training([b.card for b in loaded]),
        "averaged_from": [{"path": str(b.path), "name": b.identity.name, "version": b.identity.version,
                           "sha256": b.identity.sha256,
                           **{k: b.card.get("training", {}).get(k)
                              for k in ("data", "seed", "initialised_from", "command")}} for b in loaded],
        "rule": "the element-wise mean of every floating-point tensor of the ingredients (BatchNorm's running "
                "statistics included); integer tensors: the largest",
        "calibration": f"none: refit it before use ({REFIT[first.task]})",
    }
    return save_bundle(model, card, out, dtype=weights_dtype)


def describe(card: dict[str, Any]) -> str:
    """One line for the command's output: what was averaged and what to run next."""
    parts = [f"{i['name']} {i['version']} ({i['sha256'][:12]})" for i in card["training"]["averaged_from"]]
    return f"averaged {', '.join(parts)}; {card['training']['calibration']}"
