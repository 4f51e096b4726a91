"""Write a synthetic dataset to disk (PNG and/or DICOM, labels.csv, masks, negatives)."""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from .anatomy import BODY_PART
from .negatives import render_negative
from .render import Sample, display_image, render_sample

LABEL_COLUMNS: tuple[str, ...] = (
    "file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1",
    "seed", "mask", "photometric", "bits_stored", "spacing", "width", "height", "long_side_arg", "child",
    "view_deg", "confounders", "dicom",
)
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
FORMATS = ("png", "dicom", "both")
#: bump when the rendering changes, so datasets record which generator made them
GENERATOR_VERSION = "1.0"
# 16-bit noisy radiographs barely compress; Huffman-only deflate is several times faster than the default
_PNG16 = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
          cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
_PNG8 = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def item_seed(seed: int, index: int) -> int:
    """Per-image seed: a deterministic function of the dataset seed and the image index (52 bits)."""
    st = np.random.SeedSequence([int(seed) & (2**63 - 1), int(index), 0x5EED]).generate_state(2, np.uint32)
    return int((int(st[0]) << 20) ^ int(st[1])) & ((1 << 52) - 1)


def item_fracture(seed: int, index: int, fracture_rate: float) -> bool:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), int(index), 0xF7AC]))
    return bool(rng.random() < fracture_rate)


def png16(sample: Sample) -> np.ndarray:
    """The PNG payload: display-ready (windowed, MONOCHROME2 = bone bright) image scaled to 16 bit."""
    return np.rint(display_image(sample) * 65535.0).astype(np.uint16)


def _uid(*parts: object) -> UID:
    """Deterministic UID under the 2.25 (UUID-derived) root, from a hash of ``parts``."""
    h = hashlib.sha256("|".join(["fracture-node-synth", *[str(p) for p in parts]]).encode()).digest()
    return UID("2.25." + str(int.from_bytes(h[:16], "big") >> 1))


def sample_to_dicom(sample: Sample, *, index: int = 0, compress: bool = False,
                    modality: str | None = None) -> pydicom.Dataset:
    """A DX (or CR) "For Presentation" object holding the raw values, photometric and window of ``sample``.

    All UIDs and dates are derived from the sample's seed, so the bytes are reproducible.
    """
    rng = np.random.default_rng(np.random.SeedSequence([sample.seed, 0xD1C0]))
    if modality is None:
        modality = "DX" if rng.random() < 0.7 else "CR"
    sop_class = UID(DX_SOP_CLASS if modality == "DX" else CR_SOP_CLASS)
    study_uid = _uid("study", sample.seed)
    series_uid = _uid("series", sample.seed)
    sop_uid = _uid("instance", sample.seed)
    day = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 2000)))
    secs = int(rng.integers(7 * 3600, 20 * 3600))
    tm = f"{secs // 3600:02d}{(secs // 60) % 60:02d}{secs % 60:02d}"
    birth = day - _dt.timedelta(days=int(365.25 * (rng.uniform(4, 14) if sample.child else rng.uniform(18, 90))))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    meta.ImplementationVersionName = "FRACNODE_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"] if modality == "DX" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = tm
    ds.AccessionNumber = f"SYN{sample.seed % 10**12:012d}"
    ds.Modality = modality
    ds.Manufacturer = "FractureNode synthetic"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"XR {sample.region.replace('_', ' ').upper()} {sample.laterality}"
    ds.SeriesDescription = f"{sample.region} view {sample.view_deg:+.0f} deg"
    ds.ManufacturerModelName = "synth-drr"
    ds.PatientName = f"SYNTHETIC^{sample.seed % 100000:05d}"
    ds.PatientID = f"SYN-{sample.seed:016d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "M" if rng.random() < 0.5 else "F"
    ds.BodyPartExamined = BODY_PART[sample.region]
    ds.KVP = f"{sample.kvp:.1f}"
    ds.ImagerPixelSpacing = [f"{v:.6f}" for v in sample.imager_pixel_spacing_mm]
    ds.EstimatedRadiographicMagnificationFactor = f"{sample.magnification:.4f}"
    ds.PatientOrientation = ["", ""]
    ds.ViewPosition = "AP" if abs(sample.view_deg) < 30 else ("LL" if abs(sample.view_deg) > 60 else "")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{sample.seed % 10**8}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(index) + 1
    ds.Laterality = sample.laterality
    if modality == "DX":
        ds.ImageLaterality = sample.laterality
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = sample.photometric
    ds.Rows, ds.Columns = (int(v) for v in sample.image.shape)
    ds.PixelSpacing = [f"{v:.6f}" for v in sample.pixel_spacing_mm]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.BitsAllocated = 16
    ds.BitsStored = sample.bits_stored
    ds.HighBit = sample.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower values = less beam intensity (MONOCHROME1 raw: bone is low); -1 for bone-bright MONOCHROME2
    ds.PixelIntensityRelationshipSign = -1 if sample.photometric == "MONOCHROME2" else 1
    ds.PresentationLUTShape = "IDENTITY" if sample.photometric == "MONOCHROME2" else "INVERSE"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{sample.window_center:.1f}"
    ds.WindowWidth = f"{sample.window_width:.1f}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(sample.image, dtype="<u2").tobytes()
    if compress:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    return ds


def _write_dicom(ds: pydicom.Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _work(job: tuple) -> list[str]:
    out_dir, index, seed, fracture_rate, fmt, long_side, compress = job
    out = Path(out_dir)
    s_i = item_seed(seed, index)
    frac = item_fracture(seed, index, fracture_rate)
    sample = render_sample(s_i, fracture=frac, long_side=long_side)
    name = f"{index:06d}"
    png_rel = f"images/{name}.png"
    dcm_rel = f"dicom/{name}.dcm"
    mask_rel = f"masks/{name}.png"
    if fmt in ("png", "both"):
        cv2.imwrite(str(out / png_rel), png16(sample), _PNG16)
    if fmt in ("dicom", "both"):
        do_c = bool(compress) and item_fracture(seed, index + 7_919_000, 0.5)
        _write_dicom(sample_to_dicom(sample, index=index, compress=do_c), out / dcm_rel)
    cv2.imwrite(str(out / mask_rel), sample.mask, _PNG8)
    box = sample.box if sample.box is not None else ("", "", "", "")
    h, w = sample.image.shape
    return [
        png_rel if fmt in ("png", "both") else dcm_rel,
        "1" if sample.fracture else "0",
        sample.fracture_type or "",
        sample.region,
        sample.laterality,
        *(str(v) for v in box),
        str(sample.seed),
        mask_rel,
        sample.photometric,
        str(sample.bits_stored),
        f"{sample.pixel_spacing_mm[0]:.6f}",
        str(w),
        str(h),
        "" if long_side is None else str(int(long_side)),
        "1" if sample.child else "0",
        f"{sample.view_deg:.1f}",
        ";".join(sample.confounders),
        dcm_rel if fmt in ("dicom", "both") else "",
    ]


def _neg_work(job: tuple) -> list[str]:
    out_dir, index, seed, long_side = job
    s_i = item_seed(seed ^ 0x4E4547, index)
    neg = render_negative(s_i, long_side=long_side)
    rel = f"negatives/{index:06d}.png"
    img = neg.image if neg.image.ndim == 2 else cv2.cvtColor(neg.image, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(Path(out_dir) / rel), img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    return [rel, neg.kind, str(s_i)]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; avoid oversubscription


def _run(fn, jobs: list[tuple], workers: int, progress: bool, desc: str) -> list[list[str]]:
    from tqdm import tqdm

    bar = progress and len(jobs) > 0
    if workers <= 1 or len(jobs) < 2:
        it: Iterable = map(fn, jobs)
        if bar:
            it = tqdm(it, total=len(jobs), desc=desc, unit="img", disable=len(jobs) < 20)
        return list(it)
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=int(workers), initializer=_init_worker) as pool:
        it = pool.imap(fn, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
        if bar:
            it = tqdm(it, total=len(jobs), desc=desc, unit="img", disable=len(jobs) < 20)
        return list(it)


def generate_dataset(out_dir, count: int, seed: int, fracture_rate: float = 0.5, fmt: str = "png",
                     workers: int = 1, long_side: int | None = None, negatives: int = 0, progress: bool = True,
                     compress: bool = False) -> Path:
    """Write ``count`` radiographs (+ ``negatives`` non-radiographs) under ``out_dir``; returns the path.

    Output is byte-identical for the same arguments, whatever ``workers`` is.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}")
    if not 0.0 <= fracture_rate <= 1.0:
        raise ValueError("fracture_rate must be in [0, 1]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    if fmt in ("png", "both"):
        (out / "images").mkdir(exist_ok=True)
    if fmt in ("dicom", "both"):
        (out / "dicom").mkdir(exist_ok=True)
    workers = max(1, min(int(workers), os.cpu_count() or 1, max(int(count), 1)))
    jobs = [(str(out), i, int(seed), float(fracture_rate), fmt, long_side, compress) for i in range(int(count))]
    rows = _run(_work, jobs, workers, progress, "synth")
    meta = {"generator": "pipeline.synth", "version": GENERATOR_VERSION, "count": int(count), "seed": int(seed),
            "fracture_rate": float(fracture_rate), "format": fmt, "long_side": long_side,
            "negatives": int(negatives), "compress": bool(compress),
            "png": "16-bit, display-ready, MONOCHROME2 (bone bright)", "mask": "8-bit 0/255"}
    (out / "synth.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(LABEL_COLUMNS)
        wr.writerows(rows)
    if negatives:
        (out / "negatives").mkdir(exist_ok=True)
        njobs = [(str(out), i, int(seed), long_side) for i in range(int(negatives))]
        nrows = _run(_neg_work, njobs, workers, progress, "negatives")
        with open(out / "negatives.csv", "w", newline="", encoding="utf-8") as fh:
            wr = csv.writer(fh, lineterminator="\n")
            wr.writerow(("file", "kind", "seed"))
            wr.writerows(nrows)
    return out
