"""``fracture-node evaluate``: the full inference stack over a labelled folder, metrics as JSON + figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click

from pipeline.evaluation.evaluate import PER_IMAGE_FIELDS, evaluate_folder
from pipeline.evaluation.shifts import SHIFTS, get_shift
from pipeline.models.bundle import RUNTIMES, BundleError, read_card, update_card
from pipeline.run import BUNDLE_NAMES, DEFAULT_RUNTIME, load_models
from pipeline.training.datasets import DatasetError

TARGETS = {
    "detection.auc": (">=", 0.97),
    "detection.sensitivity": (">=", 0.92),
    "detection.specificity": (">=", 0.90),
    "classification.macro_f1": (">=", 0.85),
    "calibration.ece": ("<=", 0.05),
    "localization.pointing_game": (">=", 0.80),
    "validity.accuracy": (">=", 0.99),
}


def check_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, (op, target) in TARGETS.items():
        section, name = key.split(".")
        value = result.get(section, {}).get(name) if isinstance(result.get(section), dict) else None
        met = value is not None and (value >= target if op == ">=" else value <= target)
        out[key] = {"value": value, "target": f"{op} {target}", "met": bool(met)}
    per_kind = result.get("validity", {}).get("per_kind", {})
    worst = min((v for v in per_kind.values() if v is not None), default=None)
    out["validity.worst_kind"] = {"value": worst, "target": ">= 0.97", "met": worst is not None and worst >= 0.97}
    return out


@click.command(name="evaluate")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="Folder with validity/, detector/, classifier/ (default: the bundled models).")
@click.option("--data", type=click.Path(path_type=Path, exists=True), required=True,
              help="Labelled folder in the generator's layout (labels.csv, masks/, negatives.csv).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), required=True, help="Where to write the JSON.")
@click.option("--figures", type=click.Path(path_type=Path), default=None,
              help="Folder for reliability.png and confusion.png (default: next to the JSON).")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N images (and N negatives).")
@click.option("--threads", type=int, default=2, show_default=True,
              help="Threads of PyTorch (torch runtime) or of each ONNX Runtime session (onnx runtime).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=DEFAULT_RUNTIME, show_default=True,
              help="Run the networks with their convolutions in ONNX Runtime and the rest in NumPy (onnx), in NumPy "
                   "only (numpy: the job workers' default) or in PyTorch; all give the same results.")
@click.option("--shift", type=click.Choice(list(SHIFTS)), default=None,
              help="Apply this acquisition shift to every radiograph first (pipeline/evaluation/shifts.py; "
                   "bench/robustness.py runs them all).")
@click.option("--per-image", "per_image_csv", type=click.Path(path_type=Path), default=None,
              help="Also write one CSV row per image (check verdict, probabilities, type, heatmap peak).")
@click.option("--update-cards", is_flag=True, help="Write the results into the bundles' model cards (metrics.test).")
@click.option("--one-reading", is_flag=True,
              help="Read each image once even where the reader's card reads it mirrored too, with the card's "
                   "one-reading fit (what FRACTURE_MIRROR_LOOK=off makes the workers do).")
@click.option("--quiet", is_flag=True)
def evaluate(models_dir: Path | None, data: Path, json_out: Path, figures: Path | None, limit: int | None,
             threads: int, runtime: str, shift: str | None, per_image_csv: Path | None, update_cards: bool,
             one_reading: bool, quiet: bool) -> None:
    """Evaluate model bundles on a labelled folder."""
    if shift not in (None, "none") and update_cards:
        raise click.ClickException("--update-cards records the models' test figures; not under a --shift")
    if one_reading and update_cards:
        raise click.ClickException("--update-cards records the models' test figures as the card reads images; "
                                   "not with --one-reading")
    rows: list[dict[str, Any]] | None = [] if per_image_csv is not None else None
    try:
        models = load_models(models_dir, num_threads=threads, runtime=runtime, mirror=not one_reading)
        result = evaluate_folder(models, data, limit=limit, show=not quiet,
                                 figures=figures if figures is not None else json_out.parent,
                                 shift=get_shift(shift) if shift else None, per_image=rows)
    except (BundleError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from None
    result["targets"] = check_targets(result)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    if per_image_csv is not None and rows is not None:
        per_image_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(per_image_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=PER_IMAGE_FIELDS, restval="")
            writer.writeheader()
            writer.writerows(rows)
    if update_cards:
        summary = {k: v for k, v in result.items() if k not in ("figures",)}
        for name in BUNDLE_NAMES.values():
            bundle_dir = models.model_dir / name
            card = read_card(bundle_dir)
            metrics = dict(card.get("metrics", {}))
            metrics["test"] = _card_metrics(name, summary)
            update_card(bundle_dir, metrics=metrics)
    brief = {k: v for k, v in result["targets"].items()}
    click.echo(json.dumps({"json": str(json_out), "images_per_second": result["images_per_second"],
                           "targets": brief}, indent=2))


def _card_metrics(bundle: str, result: dict[str, Any]) -> dict[str, Any]:
    common = {"data": result["data"], "images": result["images"], "negatives": result["negatives"]}
    if bundle == "validity":
        return {**common, **result["validity"]}
    detection = {k: v for k, v in result["detection"].items() if k != "detector_alone"}
    alone = result["detection"].get("detector_alone")  # present when the reader's fusion made the call
    pointing = result["localization"]["pointing_game"]  # of the call's map
    if bundle == "detector":
        if alone is None:
            return {**common, **detection, "ece": result["calibration"]["ece"], "pointing_game": pointing}
        return {**common, **alone, "pointing_game": result["localization"]["detector_alone"]["pointing_game"]}
    cls = dict(result["classification"])
    if alone is not None:
        cls["detection_fusion"] = {**detection, "ece": result["calibration"]["ece"], "pointing_game": pointing}
    return {**common, **cls}
