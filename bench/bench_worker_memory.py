"""Where a worker's memory goes, stage by stage, for one image after another (issue #9's memory budget).

One process does what a worker does with each image, in the same order and with the same functions: read and
decode the DICOM, analyse it (validity, detection, type, Grad-CAM, edges, hybrid overlay), encode the three
explanation PNGs, let go of the pixels, then build and write the study's Secondary Capture, presentation state
and Structured Report. Before each stage the peak-RSS counter is reset (``/proc/self/clear_refs``), so each
line is that stage's own peak; ``held`` is the RSS once the stage is done.

    .venv/bin/python bench/bench_worker_memory.py                   # 4 x 2000 px DX, the bundled models
    .venv/bin/python bench/bench_worker_memory.py --images 8 --size 3000 --models DIR

The first image pays for lazy imports and first-use caches (oneDNN kernels, highdicom's tables); the later
ones show the steady state that the node's peak is made of.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node_harness import header, load_average, synth_dicoms  # noqa: E402


def rss_mib() -> tuple[int, int]:
    """(current, peak since the last reset) resident set size of this process, MiB."""
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) // 1024,  # type: ignore[union-attr]
            int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024)  # type: ignore[union-attr]


class Stages:
    def __init__(self) -> None:
        self.rows: list[tuple[int, str, int, int, int]] = []
        self.image = 0
        self.reset()

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.before = rss_mib()[0]

    def done(self, name: str) -> None:
        held, peak = rss_mib()
        self.rows.append((self.image, name, self.before, peak, held))
        self.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=2000, help="long side, px")
    parser.add_argument("--models", type=Path, default=None, help="model bundles (default: the bundled models)")
    parser.add_argument("--runtime", choices=("onnx", "numpy", "torch"), default="onnx",
                        help="how the networks run (FRACTURE_MODEL_RUNTIME; onnx is the workers' default)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fn-bench-inputs")
    args = parser.parse_args()
    header("worker memory by stage")
    files = synth_dicoms(args.cache, args.images, args.size, seed=21)

    from service.malloc import release_memory, tune_malloc

    tune_malloc()  # as `fracture-node work` does before its threads start
    start = rss_mib()[0]
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from config import Settings
    from dicom.gsps import build_presentation_state
    from dicom.image import check_radiograph_header, radiograph_from_dataset, read_dataset
    from dicom.sc import build_secondary_capture
    from dicom.sr import build_structured_report
    from pipeline.run import analyze_batch, load_models
    from service.jobs import Claim
    from service.reporting import _read_rgb, device_identity, findings_from_result
    from service.worker import _Item, _result_from_analysis, write_explanations

    imported = rss_mib()[0]
    models = load_models(args.models, runtime=args.runtime)
    loaded = rss_mib()[0]
    print(f"runtime {args.runtime}: python {start} MiB; + imports {imported} MiB; + models loaded {loaded} MiB;"
          f" torch imported: {'torch' in sys.modules}")
    stages = Stages()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        settings = Settings.from_env({}, data_dir=out)
        for index, path in enumerate(files):
            stages.image = index + 1
            item = _Item(Claim(job_id=index, instance_pk=index, attempt=1, max_attempts=1, owner="bench"),
                         sop_instance_uid=f"image-{index}", study_instance_uid="study")
            release_memory()
            stages.reset()
            # What service.worker._prepare does once the stored file is read and verified.
            ds = read_dataset(path.read_bytes())
            assert check_radiograph_header(ds) is None
            item.radiograph = radiograph_from_dataset(ds)
            del ds
            stages.done("read + decode")
            (analysis,) = analyze_batch([item.radiograph], models)
            stages.done("analyse")
            assert analysis.explanation is not None
            item.artifacts = write_explanations(settings, item, analysis.explanation)
            stages.done("explanation PNGs")
            findings = findings_from_result(_result_from_analysis(item, analysis))
            del analysis
            item.radiograph = None
            release_memory()
            stages.done("release pixels")
            # What service.reporting.report_study does for the study (one image here).
            source = dcmread(path, stop_before_pixels=True)
            device = device_identity([findings])
            sc = build_secondary_capture(source, _read_rgb(item.artifacts["hybrid"]), findings, device,
                                         series_instance_uid=generate_uid(), series_number=900,
                                         sop_instance_uid=generate_uid(), instance_number=1)
            sc.save_as(out / "sc.dcm", enforce_file_format=True)
            del sc
            stages.done("SC build + write")
            gsps = build_presentation_state(source, findings, device, series_instance_uid=generate_uid(),
                                            series_number=901, sop_instance_uid=generate_uid(), instance_number=1)
            gsps.save_as(out / "gsps.dcm", enforce_file_format=True)
            sr = build_structured_report([(source, findings)], device, series_instance_uid=generate_uid(),
                                         series_number=902, sop_instance_uid=generate_uid(), instance_number=1)
            sr.save_as(out / "sr.dcm", enforce_file_format=True)
            del gsps, sr
            release_memory()
            stages.done("GSPS + SR")
    print(f"images: {len(files)} x {args.size} px DX; models: {args.models or 'bundled'}")
    print(f"{'image':>5}  {'stage':<18} {'before':>7} {'peak':>6} {'+peak':>6} {'held':>6}   (MiB)")
    for image, name, before, peak, held in stages.rows:
        print(f"{image:>5}  {name:<18} {before:>7} {peak:>6} {peak - before:>+6} {held:>6}")
    later = [row for row in stages.rows if row[0] > 1] or stages.rows
    worst = max(later, key=lambda row: row[3])
    print(f"load average at end: {load_average()}")
    print(f"SUMMARY worker memory: models loaded {loaded} MiB; after the first image, peak {worst[3]} MiB "
          f"(stage '{worst[1]}'), held between images {later[-1][4]} MiB")


if __name__ == "__main__":
    main()
