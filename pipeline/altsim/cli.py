"""``altsim`` command: render a synthetic radiograph dataset in the generator layout."""

from __future__ import annotations

import time

import click

from pipeline.altsim.dataset import generate


@click.command("altsim")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(min=0), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int, help="Dataset seed.")
@click.option("--fracture-rate", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Fraction of images with a fracture.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (output is identical for any number).")
@click.option("--long-side", default=None, type=click.IntRange(min=64),
              help="Fixed long side in pixels (default: drawn per image, 700-1400).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def altsim(out: str, count: int, seed: int, fracture_rate: float, workers: int, long_side: int | None,
           quiet: bool) -> None:
    """Render COUNT synthetic radiographs with fracture masks into OUT (labels.csv, images/, masks/)."""
    started = time.monotonic()
    labels = generate(out, count, seed, fracture_rate=fracture_rate, workers=workers, long_side=long_side,
                      progress=not quiet)
    if not quiet:
        elapsed = time.monotonic() - started
        click.echo(f"wrote {count} images to {labels.parent} in {elapsed:.1f}s ({count / max(elapsed, 1e-6):.2f}/s)")


def main() -> None:
    altsim()
