"""``fracture-node train``: train a model bundle on the generator's layout or on imported real data."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.models.bundle import BundleError, read_card
from pipeline.training.average import average_bundles, describe
from pipeline.training.datasets import DatasetError, Record, load_records, split_records
from pipeline.training.device import DEVICE_CHOICES, DeviceError, resolve_device
from pipeline.training.loop import TrainConfig, train_fracture, train_validity
from pipeline.training.type_reader import boost_log_prior, train_type_reader

DEFAULT_OUT = {"validity": "validity", "detect": "detector", "classify": "classifier", "fracture": "."}


def _describe(records: list[Record], sources: tuple[str, ...]) -> str:
    n_rad = sum(r.is_radiograph for r in records)
    n_frac = sum(bool(r.fracture) for r in records)
    n_neg = sum(not r.is_radiograph for r in records)
    return (f"{', '.join(sources)}: {len(records)} images ({n_rad} radiographs, {n_frac} with fracture, "
            f"{n_neg} non-radiograph negatives)")


def _command_line() -> str:
    """The options given on the command line, as a reproducible ``fracture-node train`` invocation."""
    ctx = click.get_current_context()
    parts = ["fracture-node", "train"]
    for param in ctx.command.params:
        name = param.name or ""
        if ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(param, click.Option) and param.is_flag:
            parts.append(flag)
        else:
            for v in value if isinstance(value, tuple) else (value,):
                parts += [flag, str(v)]
    return " ".join(parts)


def _type_boost(task: str, given: tuple[str, ...]) -> dict[str, int]:
    """``--type-boost TYPE=N`` options as a dict, or a usage error naming what is wrong."""
    if given and task == "validity":
        raise click.ClickException("--type-boost applies to the classify, fracture and detect tasks: the radiograph "
                                   "check has no fracture types")
    boost: dict[str, int] = {}
    for item in given:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not value.strip().isdigit() or int(value) < 2:
            raise click.ClickException(f"--type-boost {item!r}: expected TYPE=N with N a whole number, 2 or more "
                                       "(for example hairline=3)")
        if name in boost:
            raise click.ClickException(f"--type-boost names {name!r} twice")
        boost[name] = int(value)
    try:
        boost_log_prior(boost)  # the type names, checked where training checks them
    except ValueError as exc:
        raise click.ClickException(f"--type-boost: {exc}") from None
    return boost


@click.command(name="train")
@click.option("--task", type=click.Choice(["validity", "detect", "classify", "fracture"]), required=True,
              help="detect trains the multi-head detector network; 'fracture' writes both OUT/detector and a "
                   "classifier sharing its network from one run; classify trains the second-stage type reader, "
                   "which reads a patch around the detector's fracture evidence at twice its resolution.")
@click.option("--data", "data", multiple=True, required=True,
              help="Generator folder (labels.csv), folder-per-class tree, or MURA-style CSV. Repeatable.")
@click.option("--val-data", multiple=True, help="Validation data (default: a seeded share of --data).")
@click.option("--calibration-data", multiple=True,
              help="Fit temperature and operating point on this labelled data instead of the validation split "
                   "(e.g. a held-out folder generated at the deployment resolution).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write (default: ./var/models/<task bundle name>).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Default 16 (detect, fracture), 32 (classify) or 64 (validity).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (cosine schedule with warm-up).")
@click.option("--long-side", type=int, default=None,
              help="Image long side (px) the model sees: default 512 (detector), 1024 (type reader).")
@click.option("--patch", type=int, default=192, show_default=True,
              help="Classify task: side of the square patch (px at --long-side scale) the type reader reads.")
@click.option("--detector", "detector", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="Classify task: detector bundle that places the patches for calibration and "
                                 "the card's metrics (default: the bundled detector). Fracture and detect tasks "
                                 "with --site-share: the detector whose peaks place the site crops (default: "
                                 "--init, else the bundled detector).")
@click.option("--crop", type=int, default=320, show_default=True, help="Training crop side (px, at input scale).")
@click.option("--width", type=click.IntRange(min=4), default=None,
              help="Backbone base width (default: the --init's, else 16). A fracture network wider than its --init "
                   "starts as that network widened, computing what it computed (function-preserving); narrower is "
                   "refused.")
@click.option("--max-minutes", type=float, default=None,
              help="Time budget: the LR schedule is fitted to it from the measured speed (stretched in its first "
                   "half if the CPU turns out faster than first measured); stops early, then calibrates.")
@click.option("--max-steps", type=int, default=None, help="Cap on optimiser steps (sets the LR schedule).")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
              help="Default: ./var/checkpoints/<task>-seed<S>.")
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("--init", "init", type=click.Path(path_type=Path, exists=True), default=None,
              help="Start from a FractureNet bundle or a checkpoint.pt (fine-tuning, e.g. on real data).")
@click.option("--augment", type=float, default=1.0, show_default=True, help="Augmentation strength (0 = none).")
@click.option("--processing", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Validity, fracture and classify tasks: strength of the post-processing augmentation (wide tone "
                   "curves, CLAHE, multi-scale equalisation, edge enhancement), so that a vendor's processed "
                   "radiograph is still read (0 = none, as before session 13; classify: as before session 15).")
@click.option("--zoom-out", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Validity, fracture and classify tasks: share of training images placed in a wider field of view "
                   "(a canvas 1.1-1.8x each side, the margin unexposed air; for classify, patches shrunk by that "
                   "factor), so that a limb filling less of the detector is still read (0 = none, as before "
                   "session 14; classify: as before session 15).")
@click.option("--zoom-in", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Validity, fracture and classify tasks: share of training images cut to a closer field of view "
                   "(a window 1/1.2-1/2.5 of each side, holding the fracture, shown as the whole image; for "
                   "classify, patches enlarged by that factor), so that a study collimated tight around a wrist "
                   "or a finger, with the bone several times larger, is still read (0 = none, as before session "
                   "16; classify: as before session 17).")
@click.option("--rotate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Validity and fracture tasks: share of training images rotated by up to 45 degrees instead of 15 "
                   "(10 for validity); with the flips every angle then occurs, as for an oblique hand or a limb "
                   "laid across the detector (0 = none, as before session 16).")
@click.option("--noise-max", type=click.FloatRange(0.002, 0.2), default=0.03, show_default=True,
              help="Largest quantum-noise sigma (at full brightness) of the acquisition augmentation; 0.03 until "
                   "session 14, a low-dose exposure is about 0.05.")
@click.option("--type-weight", type=float, default=1.0, show_default=True,
              help="Fracture task: weight of the shared network's type loss in training. The types users see "
                   "come from the type reader, so a lower weight lets the backbone spend itself on detection.")
@click.option("--site-share", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
              help="Classify task: share of the training patches centred on the detector's strongest peaks away "
                   "from the fracture (fractured and intact images), where the reader learns to say 'no "
                   "fracture here'. Fracture and detect tasks (since session 21): share of the crops not centred "
                   "on the fracture that are centred on those peaks instead, the detector's hardest negatives. "
                   "The detector bundle (--detector) is run once over every training image to find them.")
@click.option("--type-boost", "type_boost", multiple=True, metavar="TYPE=N",
              help="Classify task: draw each fractured image of TYPE N times an epoch (a whole number, 2 or more; "
                   "repeatable), for types the reader learns slowest or a real data set holds few of; log N is "
                   "taken off that type's logit after training, so the shipped reader keeps the data's type prior. "
                   "Fracture and detect tasks (since session 27): each such image gives N times --crops-per-image "
                   "crops a round; the detection logit is recalibrated as always.")
@click.option("--device", default="auto", show_default=True, metavar="|".join(DEVICE_CHOICES) + "|cuda:N",
              help="Where the optimisation steps run: auto takes the first CUDA GPU torch sees, else the CPU. Crops "
                   "are drawn, and calibration and the bundle done, on the CPU either way; the card records the "
                   "device (training.device). A checkpoint resumes on either.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes drawing crops and patches (DataLoader workers; for the detector's rounds of crops, "
                   "the processes drawing a round).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--val-limit", type=int, default=400, show_default=True, help="Images used for per-epoch validation.")
@click.option("--cache-mb", type=int, default=3500, show_default=True)
@click.option("--crops-per-image", type=int, default=3, show_default=True,
              help="Fracture task with masks: crops drawn per image in each round (0 = draw every crop on the fly).")
@click.option("--epochs-per-round", type=int, default=2, show_default=True,
              help="Fracture task with masks: epochs that replay one round of drawn crops before new ones are drawn.")
@click.option("--head-images", type=int, default=1500, show_default=True,
              help="Fracture task: after crop training, refit the detection and type heads on this many whole "
                   "training images with the backbone frozen (0 = skip).")
@click.option("--max-images", type=int, default=None,
              help="Train on a seeded random subset of at most this many radiographs (negatives are kept).")
@click.option("--weights-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(task: str, data: tuple[str, ...], val_data: tuple[str, ...], calibration_data: tuple[str, ...],
          val_fraction: float, epochs: int,
          out: Path | None, seed: int, batch_size: int | None, lr: float | None, long_side: int | None,
          patch: int, detector: Path | None, crop: int,
          width: int | None, max_minutes: float | None, max_steps: int | None, checkpoint_dir: Path | None,
          checkpoint_every: int, resume: bool, init: Path | None, workers: int, threads: int, val_limit: int,
          cache_mb: int, crops_per_image: int, epochs_per_round: int, head_images: int,
          max_images: int | None, weights_dtype: str, quiet: bool, augment: float, processing: float,
          zoom_out: float, zoom_in: float, rotate: float, noise_max: float, type_weight: float,
          site_share: float, type_boost: tuple[str, ...], device: str) -> None:
    """Train a model bundle (reproducible, checkpointed, resumable)."""
    try:
        where = resolve_device(device)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    if task == "classify" and rotate:
        raise click.ClickException("--rotate applies to the validity and fracture tasks: the type reader's patches "
                                   "already take any angle")
    if task == "validity" and site_share:
        raise click.ClickException("--site-share applies to the fracture, detect and classify tasks: the radiograph "
                                   "check has no detector peaks to learn from")
    boost = _type_boost(task, type_boost)
    torch.set_num_threads(threads)
    try:
        records = [r for src in data for r in load_records(src)]
        if val_data:
            train_recs = [r for r in records if r.split != "test"]
            val_recs = [r for src in val_data for r in load_records(src)]
        else:
            train_recs, val_recs = split_records(records, val_fraction, seed)
        calib_recs = [r for src in calibration_data for r in load_records(src)] or None
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    if max_images is not None:
        rads = [r for r in train_recs if r.is_radiograph]
        keep = set(np.random.default_rng(seed).permutation(len(rads))[:max_images].tolist())
        train_recs = [r for i, r in enumerate(rads) if i in keep] + [r for r in train_recs if not r.is_radiograph]
    if not val_recs:
        raise click.ClickException("no validation images (use --val-data or a larger --val-fraction)")
    width = width or _init_width(init) or 16
    out = out if out is not None else Path("var/models") / DEFAULT_OUT[task]
    ckpt = checkpoint_dir if checkpoint_dir is not None else Path("var/checkpoints") / f"{task}-seed{seed}"
    cfg = TrainConfig(
        task=task, epochs=epochs, seed=seed,
        batch_size=batch_size or {"validity": 64, "classify": 32}.get(task, 16),
        lr=lr or (3e-3 if task == "validity" else 2e-3),
        long_side=long_side or (1024 if task == "classify" else 512),
        crop=crop, patch=patch, width=width, max_minutes=max_minutes, max_steps=max_steps,
        checkpoint_every=checkpoint_every, val_limit=val_limit, num_workers=workers, cache_mb=cache_mb,
        bank_per_image=crops_per_image, bank_epochs=epochs_per_round, head_images=head_images,
        weights_dtype=weights_dtype, data_description=_describe(train_recs, data), augment=augment,
        processing=processing, zoom_out=zoom_out, zoom_in=zoom_in, rotate=rotate, noise_max=noise_max,
        type_loss_weight=type_weight, site_share=site_share, type_boost=boost, device=str(where),
        extra={"command": _command_line(),
               **({"calibration_data": ", ".join(calibration_data)} if calibration_data else {})},
    )
    show = not quiet
    from pipeline.run import BUNDLE_NAMES, BUNDLED_MODEL_DIR

    bundled_detector = BUNDLED_MODEL_DIR / BUNDLE_NAMES["detect"]
    try:
        if task == "validity":
            written = train_validity(train_recs, val_recs, cfg, out, ckpt, resume=resume, show=show)
        elif task == "classify":
            written = train_type_reader(train_recs, val_recs, cfg, out, ckpt, detector or bundled_detector,
                                        resume=resume, init=init, show=show, calibration=calib_recs)
        else:
            written = train_fracture(train_recs, val_recs, cfg, out, ckpt, resume=resume, init=init, show=show,
                                     calibration=calib_recs, detector=detector or init or bundled_detector)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({k: str(v) for k, v in written.items()}))


def _init_width(init: Path | None) -> int | None:
    """The base width of the network ``--init`` names (a bundle's card, or a checkpoint's stem), if it says."""
    if init is None:
        return None
    if init.is_dir():
        try:
            return read_card(init).get("architecture", {}).get("config", {}).get("width")
        except BundleError as exc:
            raise click.ClickException(str(exc)) from None
    state = torch.load(init, map_location="cpu", weights_only=False).get("model", {})
    stem = state.get("stem.0.weight")
    return int(stem.shape[0]) if stem is not None else None


@click.command(name="recalibrate")
@click.option("--classifier", "reader", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="The type reader bundle (task classify, TypeReader).")
@click.option("--detector", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="The detector bundle it will run behind (its segmentation peak places the reader's patch).")
@click.option("--data", multiple=True, required=True,
              help="Calibration data: fractured radiographs with type and box (generator layout); repeatable.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the recalibrated bundle (default: the --classifier folder, in place).")
@click.option("--sites", type=click.IntRange(1, 16), default=None,
              help="How many of the detector's strongest segmentation peaks inference weighs before reading the "
                   "type (1: the strongest only; default: as the reader's card says).")
@click.option("--fuse-detection", is_flag=True,
              help="Also fit the detection fusion: the call's probability from the detector's logit and the "
                   "reader's own evidence together, on every labelled radiograph of --data (fractured and intact), "
                   "with its operating point and indeterminate band; stored in the reader's card for this detector.")
@click.option("--second-scale", type=click.FloatRange(min=1.0, min_open=True), default=None,
              help="With --fuse-detection: also look a second time with the image shown this many times smaller to "
                   "both networks (1.5 in the shipped card), and call on the mean of the two fused logits "
                   "(Platt-scaled on --data). Costs a second detector pass at the smaller size and the reader's "
                   "sites again (docs/MODELS.md, \"A second, coarser look\").")
@click.option("--second-scale-sites", "second_sites", type=click.IntRange(1, 16), default=None,
              help="With --second-scale: how many of the coarser look's detector peaks the reader reads (default: as "
                   "many as in the native look; the shipped card reads 1).")
@click.option("--second-scale-type-margin", "type_margin", type=click.FloatRange(min=0.0), default=None,
              help="With --second-scale: read the type, and the reader's part of the call's map, at the coarser "
                   "look when its fused logit exceeds the native look's by more than this (in logits; the shipped "
                   "card: 1.0). Default: always at the native look. Changes no fitted value.")
@click.option("--mirror", is_flag=True,
              help="With --fuse-detection: look at every image twice, as it is and mirrored left to right, and "
                   "average the two looks' call, type and map; the fusion is fitted on the averaged inputs. Doubles "
                   "the fracture models' cost (docs/MODELS.md, \"A mirrored look\").")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def recalibrate(reader: Path, detector: Path, data: tuple[str, ...], out: Path | None, sites: int | None,
                fuse_detection: bool, second_scale: float | None, second_sites: int | None,
                type_margin: float | None, mirror: bool, threads: int, quiet: bool) -> None:
    """Refit a type reader's temperature and card metrics behind another detector (no training).

    Needed whenever the detector in front of a reader changes (a new run, or real weights trained elsewhere):
    the reader's patch is centred on one of the detector's peaks, so its calibration belongs to that pairing.
    """
    from pipeline.training.type_reader import recalibrate_type_reader

    if second_scale is not None and not fuse_detection:
        raise click.UsageError("--second-scale belongs to the detection fusion: give --fuse-detection too")
    if second_sites is not None and second_scale is None:
        raise click.UsageError("--second-scale-sites belongs to the second look: give --second-scale too")
    if type_margin is not None and second_scale is None:
        raise click.UsageError("--second-scale-type-margin belongs to the second look: give --second-scale too")
    if mirror and not fuse_detection:
        raise click.UsageError("--mirror belongs to the detection fusion: give --fuse-detection too")
    torch.set_num_threads(threads)
    try:
        records = [r for src in data for r in load_records(src)]
        written = recalibrate_type_reader(reader, detector, records, out or reader, ", ".join(data),
                                          show=not quiet, sites=sites, fuse_detection=fuse_detection,
                                          second_scale=second_scale, second_sites=second_sites,
                                          type_margin=type_margin, mirror=mirror)
    except (DatasetError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    card = read_card(written)
    fusion = card.get("detection_fusion")
    click.echo(json.dumps({"classify": str(written), "temperature": card["temperature"],
                           "metrics": card["metrics"]["validation"],
                           **({"detection_fusion": {k: fusion.get(k) for k in ("weights", "bias", "operating_point",
                                                                               "metrics_on_fit_images",
                                                                               "second_scale", "mirror")}}
                              if fusion else {})}))


@click.command(name="average")
@click.option("--bundle", "bundles", multiple=True, required=True,
              type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="A detector or type reader bundle to average; give two or more of one network (siblings: "
                   "trained from the same weights with the same recipe and other seeds).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write the averaged bundle.")
@click.option("--version", default=None, help="The averaged card's version (default: the first's, '-average').")
@click.option("--weights-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
def average(bundles: tuple[Path, ...], out: Path, version: str | None, weights_dtype: str) -> None:
    """Average the weights of sibling bundles into one network (a "model soup"; uncalibrated until refitted).

    The mean of every weight and BatchNorm statistic; the card keeps the first bundle's name, input and
    architecture, names every ingredient with its SHA-256, and drops what was fitted to one set of weights
    (temperature, operating point, detection fusion, metrics): refit them with the command it prints.
    """
    try:
        written = average_bundles(list(bundles), out, version=version, weights_dtype=weights_dtype)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"average": str(written), "note": describe(read_card(written))}))
