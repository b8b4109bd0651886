"""Image grids written as PNG files: samples, reconstructions, progressive decodings."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from progvae.core.atomic import atomic_path

MIN_CELL_PIXELS = 64  # tiny images (8×8 digits) are enlarged so a grid is legible on screen
PADDING_GRAY = 128  # mid-gray separates cells on black (digits) and white (sky) backgrounds alike


def save_grid(images: np.ndarray, path: str | Path, ncols: int | None = None, padding: int = 1) -> None:
    """Write uint8 images (N, H, W, C), C in {1, 3}, as one PNG grid at `path`.

    `ncols` defaults to ceil(sqrt(N)); cells are separated (and framed) by `padding` mid-gray
    pixels. Images smaller than 64 pixels a side are enlarged by an integer factor with
    nearest-neighbour so each cell is at least 64 pixels. Grayscale stays grayscale. The file
    is written atomically (`progvae.core.atomic`), so a reader never sees half a PNG.
    """
    _write_png_atomically(grid_canvas(images, ncols, padding), Path(path))


def grid_canvas(images: np.ndarray, ncols: int | None = None, padding: int = 1) -> np.ndarray:
    """The picture `save_grid` writes, as a uint8 (height, width, C) array."""
    images = _check_images(images)
    return _tile(images, ncols or math.ceil(math.sqrt(len(images))), padding)


def save_rows(rows: list[np.ndarray], path: str | Path, padding: int = 1) -> None:
    """Write several equal-length rows of uint8 images (N, H, W, C) one above the other.

    For example `save_rows([originals, reconstructions], path)` puts each reconstruction below
    its original. Grayscale rows are shown in colour when any row is colour.
    """
    _write_png_atomically(rows_canvas(rows, padding), Path(path))


def rows_canvas(rows: list[np.ndarray], padding: int = 1) -> np.ndarray:
    """The picture `save_rows` writes, as a uint8 (height, width, C) array."""
    rows = [_check_images(row) for row in rows]
    if not rows or len({row.shape[:3] for row in rows}) != 1:
        raise ValueError(f"save_rows needs rows of equal (N, H, W), got {[row.shape for row in rows]}")
    if len({row.shape[3] for row in rows}) > 1:
        rows = [np.repeat(row, 3, axis=3) if row.shape[3] == 1 else row for row in rows]
    return _tile(np.concatenate(rows), len(rows[0]), padding)


def save_labelled(canvas: np.ndarray, caption: str, path: str | Path) -> None:
    """A picture (uint8 (H, W, C)) with a caption above it saying what it shows, as a PNG
    (matplotlib draws the text; pixels are shown one to one)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

    height, width = canvas.shape[:2]
    dpi = 100
    caption = "\n".join(textwrap.wrap(caption, max(20, max(width, 320) // 8)))
    caption_pixels = 18 * (caption.count("\n") + 1) + 8
    figure = Figure(figsize=(max(width, 320) / dpi, (height + caption_pixels) / dpi), dpi=dpi)
    axes = figure.add_axes((0, 0, width / max(width, 320), height / (height + caption_pixels)))
    axes.imshow(canvas[:, :, 0] if canvas.shape[2] == 1 else canvas, cmap="gray",
                vmin=0, vmax=255, interpolation="nearest")
    axes.axis("off")
    figure.text(0.01, 1 - 4 / (height + caption_pixels), caption, va="top", ha="left",
                fontsize=9)
    with atomic_path(Path(path)) as temporary, open(temporary, "wb") as stream:
        figure.savefig(stream, format="png", dpi=dpi)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ValueError(
            f"expected uint8 images (N, H, W, C) with N > 0 and C 1 or 3, got {images.dtype} {images.shape}"
        )
    return images


def _tile(images: np.ndarray, ncols: int, padding: int) -> np.ndarray:
    """(N, H, W, C) → one (rows·cell + pad, ncols·cell + pad, C) canvas, images enlarged first."""
    count, height, width, channels = images.shape
    scale = max(1, math.ceil(MIN_CELL_PIXELS / min(height, width)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        height, width = height * scale, width * scale
    nrows = math.ceil(count / ncols)
    canvas_shape = (nrows * (height + padding) + padding, ncols * (width + padding) + padding, channels)
    canvas = np.full(canvas_shape, PADDING_GRAY, dtype=np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // ncols) * (height + padding)
        left = padding + (index % ncols) * (width + padding)
        canvas[top : top + height, left : left + width] = image
    return canvas


def save_png(canvas: np.ndarray, path: str | Path) -> None:
    """A picture (uint8 (H, W, C), C in {1, 3}) as a PNG, written atomically."""
    _write_png_atomically(canvas, Path(path))


def _write_png_atomically(canvas: np.ndarray, path: Path) -> None:
    import imageio.v3 as iio

    if canvas.shape[2] == 1:
        canvas = canvas[:, :, 0]  # a 2-D array writes a grayscale PNG
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, canvas, extension=".png")
