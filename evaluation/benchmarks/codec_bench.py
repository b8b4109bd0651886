"""`bench --suite=codec`: how fast the progressive codec encodes and decodes, on small images
of the model's size (images/s) and on a whole photograph (megapixels/s)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from progvae.codec.coder import Codec


def sample_photo() -> tuple[np.ndarray, str]:
    """A full-size photograph that ships with matplotlib (512x600), never in `patches` or in
    the training split of `photos`."""
    import matplotlib

    from progvae.data.readers import read_image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return read_image(path), path.name


def run_codec_bench(codec: Codec, n_small: int = 32, repeats: int = 3, photo_side: int = 0
                    ) -> dict:
    """Median timings of `repeats` rounds: n_small images of the model's size one file each,
    then the photo (its top-left photo_side x photo_side corner if given)."""
    photo, name = sample_photo()
    photo = codec.channels_of(photo)
    if photo_side:
        photo = photo[:photo_side, :photo_side]
    size = codec.tile
    rng = np.random.default_rng(0)
    corners = rng.integers(0, [photo.shape[0] - size, photo.shape[1] - size], size=(n_small, 2))
    small = [photo[y:y + size, x:x + size] for y, x in corners]
    timings = {key: [] for key in ("small_encode", "small_decode", "photo_encode",
                                   "photo_decode")}
    for _ in range(repeats):
        started = time.perf_counter()
        encoded = [codec.compress(image) for image in small]
        timings["small_encode"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for item in encoded:
            codec.decompress(item.data)
        timings["small_decode"].append(time.perf_counter() - started)
        started = time.perf_counter()
        whole = codec.compress(photo)
        timings["photo_encode"].append(time.perf_counter() - started)
        started = time.perf_counter()
        codec.decompress(whole.data)
        timings["photo_decode"].append(time.perf_counter() - started)
    median = {key: statistics.median(values) for key, values in timings.items()}
    megapixels = photo.shape[0] * photo.shape[1] / 1e6
    small_bits = sum(8 * len(item.data) for item in encoded) / (n_small * size * size)
    return {
        "tile": size, "whole": codec.whole, "groups": codec.n_groups, "small_images": n_small, "repeats": repeats,
        "encode_images_per_s": n_small / median["small_encode"],
        "decode_images_per_s": n_small / median["small_decode"],
        "small_bits_per_pixel": small_bits,
        "photo": name, "photo_size": [photo.shape[1], photo.shape[0]],
        "photo_bits_per_pixel": 8 * len(whole.data) / (megapixels * 1e6),
        "encode_megapixels_per_s": megapixels / median["photo_encode"],
        "decode_megapixels_per_s": megapixels / median["photo_decode"],
    }


def format_codec_bench(result: dict) -> str:
    width, height = result["photo_size"]
    return "\n".join([
        f"codec: {result['groups']} groups, " + (
            f"whole images padded to multiples of {result['tile']} pixels" if result["whole"]
            else f"tiles of {result['tile']} pixels") + f" (median of {result['repeats']} rounds)",
        f"  {result['small_images']} images of {result['tile']}x{result['tile']}: encode "
        f"{result['encode_images_per_s']:.1f} images/s, decode "
        f"{result['decode_images_per_s']:.1f} images/s ({result['small_bits_per_pixel']:.3f} "
        "bits/pixel)",
        f"  {result['photo']} ({width}x{height}): encode {result['encode_megapixels_per_s']:.3f} "
        f"megapixels/s, decode {result['decode_megapixels_per_s']:.3f} megapixels/s "
        f"({result['photo_bits_per_pixel']:.3f} bits/pixel)"])
