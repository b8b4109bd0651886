"""`progvae data`: what a dataset holds and a grid of its training images, the first thing to
run on a new dataset (for folder:, svhn:, celeba: and lsun: it builds the preprocessing cache)."""

from __future__ import annotations

from pathlib import Path

from progvae.core.errors import UserError
from progvae.data.cache import verify_cache
from progvae.data.images import save_grid
from progvae.data.loading import describe, evenly_spaced, load_data, natural_image_size


def preview_dataset(data: str, out: str | Path, image_size: int = 0, n: int = 64,
                    resize: bool = False, svhn_extra: bool = False, cache_dir: str = "",
                    workers: int = 0, verify: bool = False) -> str:
    """Load the dataset `data` names (at its natural size unless `image_size`), check every
    byte of its cache with `verify`, and write n evenly spaced training images to the PNG
    `out`. Returns the description (counts, shapes, splits, pixel range, cache) in words."""
    if not data:
        raise UserError("Pass --data=SPEC, e.g. --data=svhn:/data/svhn; see "
                        "progvae/data/loading.py for the specs.")
    if not str(out).lower().endswith(".png"):
        raise UserError(f"--out must name a .png file, got '{out}'.")
    dataset = load_data(data, image_size or natural_image_size(data), resize=resize,
                        svhn_extra=svhn_extra, cache_dir=cache_dir, workers=workers)
    lines = describe(dataset)
    if verify and dataset.cache is not None:
        problems = verify_cache(dataset.cache)
        if problems:
            raise UserError(f"The cache at {dataset.cache.directory} is corrupt "
                            f"({'; '.join(problems)}); run the command again to rebuild it.")
        lines.append("  verified: every byte of the cache matches its checksum")
    shown = dataset.train[evenly_spaced(len(dataset.train), max(1, n))]
    save_grid(shown, out)
    lines.append(f"Wrote {len(shown)} training images to {out}.")
    return "\n".join(lines)
