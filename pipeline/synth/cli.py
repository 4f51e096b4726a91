"""``fracture-node synth``: write a synthetic radiograph dataset (see ``pipeline/synth/README.md``)."""

from __future__ import annotations

import click


@click.command("synth")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--count", required=True, type=click.IntRange(min=0), help="Number of radiographs.")
@click.option("--seed", required=True, type=int, help="Dataset seed (same seed -> byte-identical output).")
@click.option("--fracture-rate", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Fraction of images with a fracture.")
@click.option("--format", "fmt", default="png", show_default=True, type=click.Choice(["png", "dicom", "both"]),
              help="16-bit PNG (bone-bright), DICOM DX/CR, or both.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (output does not depend on it).")
@click.option("--long-side", default=None, type=click.IntRange(min=64),
              help="Long side in pixels (default: random 1024..3000 per image).")
@click.option("--negatives", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also write this many non-radiograph images for the validity stage.")
@click.option("--compress/--no-compress", default=False, show_default=True,
              help="RLE Lossless compress about half of the DICOM files.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out_dir, count, seed, fracture_rate, fmt, workers, long_side, negatives, compress, quiet):
    """Generate synthetic bone radiographs with fracture labels, masks and boxes."""
    from . import generate_dataset

    out = generate_dataset(out_dir, count, seed, fracture_rate=fracture_rate, fmt=fmt, workers=workers,
                           long_side=long_side, negatives=negatives, progress=not quiet, compress=compress)
    click.echo(f"wrote {count} radiographs" + (f" and {negatives} negatives" if negatives else "") + f" to {out}")
