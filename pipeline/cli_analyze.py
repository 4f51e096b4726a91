"""``fracture-node analyze FILE...``: the whole pipeline on local files, without any server.

For each file (DICOM, PNG, JPEG) it runs the radiograph check, the detector, the classifier (when the
detector finds a fracture or is indeterminate) and the explanations, and writes next to a JSON result
``<stem>.result.json`` the images ``<stem>.heatmap.png`` (detector Grad-CAM), ``<stem>.type_heatmap.png``
(classifier top-class Grad-CAM), ``<stem>.edges.png`` (Canny view of the bone) and ``<stem>.hybrid.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import cv2

from pipeline.explain import heatmap_rgb
from pipeline.models.bundle import RUNTIMES, BundleError
from pipeline.models.imageio import load_file
from pipeline.run import analysis_to_dict, analyze_detailed, load_models


def _write_rgb(path: Path, rgb: Any) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path.name


@click.command(name="analyze")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="Folder with validity/, detector/, classifier/ (default: the bundled models).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write results and images (default: next to each input file).")
@click.option("--no-images", is_flag=True, help="Skip the explanation images.")
@click.option("--threads", type=int, default=2, show_default=True,
              help="Threads of PyTorch (torch runtime) or of each ONNX Runtime session (onnx runtime).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="torch", show_default=True,
              help="PyTorch (needed for the type map), or onnx / numpy (then no type map is written).")
def analyze(files: tuple[Path, ...], as_json: bool, models_dir: Path | None, out_dir: Path | None,
            no_images: bool, threads: int, runtime: str) -> None:
    """Run the whole pipeline on local files (research use only, not for diagnostic use)."""
    try:
        models = load_models(models_dir, num_threads=threads, runtime=runtime)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from None
    results = []
    failed = 0
    for path in files:
        target = out_dir if out_dir is not None else path.parent
        target.mkdir(parents=True, exist_ok=True)
        stem = path.stem
        try:
            radiograph = load_file(path)
        except Exception as exc:  # any decoding problem is reported per file
            failed += 1
            entry: dict[str, Any] = {"file": str(path), "error": f"cannot read image: {exc}"}
            results.append(entry)
            if not as_json:
                click.echo(f"{path}: ERROR {entry['error']}", err=True)
            continue
        detailed = analyze_detailed(radiograph, models, explain=not no_images, type_map=runtime == "torch")
        a = detailed.analysis
        entry = {"file": str(path), **analysis_to_dict(a), "images": {}}
        if a.explanation is not None:
            ex = a.explanation
            images = {
                "heatmap": _write_rgb(target / f"{stem}.heatmap.png", heatmap_rgb(ex.heatmap)),
                "edges": (cv2.imwrite(str(target / f"{stem}.edges.png"), ex.edges) and f"{stem}.edges.png"),
                "hybrid": _write_rgb(target / f"{stem}.hybrid.png", ex.hybrid),
            }
            if detailed.type_heatmap is not None:
                images["type_heatmap"] = _write_rgb(target / f"{stem}.type_heatmap.png",
                                                    heatmap_rgb(detailed.type_heatmap))
            entry["images"] = images
        result_path = target / f"{stem}.result.json"
        result_path.write_text(json.dumps(entry, indent=2) + "\n")
        entry["result"] = str(result_path)
        results.append(entry)
        if not as_json:
            click.echo(_line(entry))
    if as_json:
        click.echo(json.dumps(results, indent=2))
    if failed:
        raise SystemExit(1)


def _line(entry: dict[str, Any]) -> str:
    v = entry["validity"]
    if v["verdict"] != "radiograph":
        return f"{entry['file']}: not a bone radiograph ({v['reason']})"
    d = entry["detection"]
    s = f"{entry['file']}: {d['call']} (p={d['probability']:.3f}, operating point {d['operating_point']:.3f})"
    c = entry["classification"]
    if c:
        s += f", type {c['top_type']} ({c['top_probability']:.2f})"
    if entry.get("peak_box"):
        s += f", region {entry['peak_box']}"
    return s + f" -> {entry['result']}  [{entry['disclaimer']}]"
