"""Dataset importers: the generator's layout, a folder-per-class tree and a MURA-style CSV.

All three produce a list of :class:`Record` so the training loop does not care where the data came from.

* Generator layout (``fracture-node synth``): ``DIR/labels.csv`` with ``file,fracture,type,region,laterality,
  x0,y0,x1,y1``, masks in ``DIR/masks/<same name>``, negatives (non-radiographs) listed in
  ``DIR/negatives.csv`` (``file,kind``).
* Folder per class (the common public layout): ``DIR/<class>/**/image`` or ``DIR/{train,val,test}/<class>/...``.
  Class names are mapped through the taxonomy's synonyms (:func:`pipeline.taxonomy.normalise_type`);
  ``normal``/``negative``/``no_fracture``... mean no fracture, ``fracture``/``fractured``/``positive``/
  ``abnormal`` mean a fracture of unknown type.
* MURA-style CSV: rows ``path,label`` where ``path`` is a study folder or an image and ``label`` 0/1
  (``1`` = abnormal, taken as fracture); paths are resolved against the CSV's folder and its parents.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.taxonomy import normalise_type

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}
NEGATIVE_CLASS_NAMES = {"normal", "negative", "no_fracture", "nofracture", "not_fractured", "non_fractured",
                        "unfractured", "healthy", "0", "no", "none"}
POSITIVE_CLASS_NAMES = {"fracture", "fractured", "positive", "abnormal", "1", "yes", "broken"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


class DatasetError(ValueError):
    """A dataset folder or CSV cannot be read; the message says which file and why."""


@dataclass(frozen=True)
class Record:
    path: Path
    fracture: bool | None = None
    type: str | None = None
    mask: Path | None = None
    box: tuple[int, int, int, int] | None = None
    region: str | None = None
    is_radiograph: bool = True
    kind: str | None = None  # negative kind for non-radiographs
    split: str | None = None
    key: str = ""  # the file's path relative to its data set's root (the CSV's own path for MURA): what splits it


def _truthy(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "fracture", "t"):
        return True
    if v in ("0", "false", "no", "n", "normal", "f", ""):
        return False
    raise DatasetError(f"cannot read {value!r} as a fracture flag")


def read_generator_layout(root: str | Path, include_negatives: bool = True) -> list[Record]:
    """Records from ``labels.csv`` (+ ``negatives.csv``) written by the synthetic generator."""
    root = Path(root)
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"{labels}: not found (expected the generator's layout)")
    records: list[Record] = []
    with open(labels, newline="") as handle:
        reader = csv.DictReader(handle)
        required = {"file", "fracture"}
        if not reader.fieldnames or not required <= set(reader.fieldnames):
            raise DatasetError(f"{labels}: header must start with file,fracture,type,...")
        for n, row in enumerate(reader, start=2):
            try:
                fracture = _truthy(row["fracture"])
                ftype = normalise_type(row["type"]) if fracture and (row.get("type") or "").strip() else None
                box = None
                if fracture and all((row.get(k) or "").strip() for k in ("x0", "y0", "x1", "y1")):
                    box = tuple(int(float(row[k])) for k in ("x0", "y0", "x1", "y1"))
            except (DatasetError, ValueError) as exc:
                raise DatasetError(f"{labels}:{n}: {exc}") from None
            mask = root / "masks" / row["file"].replace("images/", "", 1)
            if not mask.is_file():
                mask_alt = root / "masks" / Path(row["file"]).name
                mask = mask_alt if mask_alt.is_file() else mask
            records.append(Record(
                path=root / row["file"], fracture=fracture, type=ftype,
                mask=mask if mask.is_file() else None, box=box,  # type: ignore[arg-type]
                region=(row.get("region") or None), key=Path(row["file"]).as_posix(),
            ))
    neg_csv = root / "negatives.csv"
    if include_negatives and neg_csv.is_file():
        with open(neg_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                records.append(Record(path=root / row["file"], is_radiograph=False, kind=row.get("kind") or None,
                                      key=Path(row["file"]).as_posix()))
    return records


def _class_of(name: str) -> tuple[bool, str | None]:
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if key in NEGATIVE_CLASS_NAMES:
        return False, None
    if key in POSITIVE_CLASS_NAMES:
        return True, None
    return True, normalise_type(name)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_folder_per_class(root: str | Path) -> list[Record]:
    """``root/<class>/...`` or ``root/<split>/<class>/...``; unknown class names are an error."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    splits = [(SPLIT_NAMES[p.name.lower()], p) for p in subdirs if p.name.lower() in SPLIT_NAMES]
    groups = splits if splits else [(None, root)]
    records: list[Record] = []
    for split, base in groups:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            try:
                fracture, ftype = _class_of(class_dir.name)
            except ValueError as exc:
                raise DatasetError(f"{class_dir}: class folder {class_dir.name!r} is not in the taxonomy ({exc})") \
                    from None
            for img in _images_under(class_dir):
                records.append(Record(path=img, fracture=fracture, type=ftype, split=split,
                                      key=img.relative_to(root).as_posix()))
    if not records:
        raise DatasetError(f"{root}: no images found in class folders")
    return records


def _resolve(raw: str, bases: list[Path]) -> Path | None:
    rel = Path(raw.strip())
    if rel.is_absolute():
        return rel if rel.exists() else None
    for base in bases:
        cand = base / rel
        if cand.exists():
            return cand
    return None


def read_mura_csv(csv_path: str | Path, root: str | Path | None = None) -> list[Record]:
    """MURA-style ``path,label`` rows (study folders or images); label 1 = abnormal (fracture)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: not found")
    bases = [Path(root)] if root else []
    bases += [csv_path.parent, *csv_path.parent.parents][:4]
    split = None
    m = re.search(r"(train|valid|val|test)", csv_path.name.lower())
    if m:
        split = SPLIT_NAMES[m.group(1)]
    records: list[Record] = []
    with open(csv_path, newline="") as handle:
        for n, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip():
                continue
            if n == 1 and row[0].strip().lower() in ("path", "file", "image", "study"):
                continue
            if len(row) < 2:
                raise DatasetError(f"{csv_path}:{n}: expected 'path,label'")
            try:
                label = _truthy(row[1])
            except DatasetError as exc:
                raise DatasetError(f"{csv_path}:{n}: {exc}") from None
            found = _resolve(row[0], bases)
            if found is None:
                raise DatasetError(f"{csv_path}:{n}: {row[0]!r} not found under {', '.join(map(str, bases))}")
            region_match = re.search(r"XR_([A-Z]+)", row[0].upper())
            region = region_match.group(1).lower() if region_match else None
            listed = Path(row[0].strip()).as_posix()
            images = _images_under(found) if found.is_dir() else [found]
            for img in images:
                key = f"{listed}/{img.relative_to(found).as_posix()}" if found.is_dir() else listed
                records.append(Record(path=img, fracture=label, region=region, split=split, key=key))
    if not records:
        raise DatasetError(f"{csv_path}: no images listed")
    return records


def load_records(source: str | Path) -> list[Record]:
    """Detect the layout: generator folder (labels.csv), MURA-style CSV file, or folder per class."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".csv":
        return read_mura_csv(p)
    if (p / "labels.csv").is_file():
        return read_generator_layout(p)
    if p.is_dir():
        return read_folder_per_class(p)
    raise DatasetError(f"{p}: neither a dataset folder nor a CSV file")


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic split: explicit ``split`` columns win, otherwise a seeded hash of the file's path relative to
    its data set's root (``Record.key``), so a data set splits the same wherever it is stored and whatever its
    folder is called. A record without a key (made by hand) is hashed on its last three path parts."""
    if any(r.split in ("val",) for r in records):
        train = [r for r in records if r.split in (None, "train")]
        val = [r for r in records if r.split == "val"]
        return train, val
    train, val = [], []
    for r in records:
        if r.split == "test":
            continue
        name = r.key or "/".join(r.path.parts[-3:])
        h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        (val if int.from_bytes(h[:4], "big") / 2**32 < val_fraction else train).append(r)
    return train, val


def with_split(records: list[Record], split: str) -> list[Record]:
    return [replace(r, split=split) for r in records]
