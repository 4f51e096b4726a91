"""Interleave the first N rows of several generator-layout folders into one folder of symbolic links.

Used for a training run's per-epoch monitoring set when the training data come from more than one simulator:
``train --val-limit K`` reads the first K rows, so the rows alternate between the sources.

    .venv/bin/python bench/interleave_sets.py --out var/data/mixval --take 150 var/data/va1 var/data/av

Only the importer's columns (file, fracture, type, region, laterality, x0..y1) are kept; images and masks are
links to the sources (absolute paths), so the folder is only valid on the machine that made it.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

FIELDS = ["file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1"]


def interleave(out: Path, take: int, sources: list[Path]) -> int:
    rows = []
    for src in sources:
        with open(src / "labels.csv", newline="") as handle:
            rows.append(list(csv.DictReader(handle))[:take])
    (out / "images").mkdir(parents=True, exist_ok=False)
    (out / "masks").mkdir()
    written = 0
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for i in range(max(len(r) for r in rows)):
            for src, src_rows in zip(sources, rows, strict=True):
                if i >= len(src_rows):
                    continue
                row = src_rows[i]
                name = f"{src.name}_{Path(row['file']).name}"
                os.symlink((src / row["file"]).resolve(), out / "images" / name)
                mask = src / "masks" / row["file"].replace("images/", "", 1)
                if mask.is_file():
                    os.symlink(mask.resolve(), out / "masks" / name)
                writer.writerow({**row, "file": f"images/{name}"})
                written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--take", type=int, required=True, help="rows taken from the start of each source")
    parser.add_argument("sources", type=Path, nargs="+")
    args = parser.parse_args()
    print(f"wrote {interleave(args.out, args.take, args.sources)} rows to {args.out}")


if __name__ == "__main__":
    main()
