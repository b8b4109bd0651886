"""`compress` and `decompress`: image files to .pvc files and back (see progvae.codec)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from progvae.codec.coder import Codec, prefix_bytes, read_pvc
from progvae.core.atomic import atomic_write_bytes, writable_folder, writable_output
from progvae.core.errors import UserError
from progvae.data.images import save_png
from progvae.data.readers import IMAGE_EXTENSIONS, list_images, read_image


def load_codec(run: str, name: str = "") -> Codec:
    """The codec of a trained run (a directory or an exported file); `name` is how messages
    call it (the run's path by default)."""
    from progvae.runs.load import load_model

    if not run:
        raise UserError("Pass --run=RUN, a stage one trained with --latents=quantized (a run "
                        "directory or an exported model).")
    _, model, _ = load_model(run)
    return Codec(model, name or f"'{run}'")   # which picks its own layout and precision


def image_files(images: str) -> list[Path]:
    """--images: one image file, or every image under a folder."""
    if not images:
        raise UserError("Pass --images=PATH, an image file or a folder of them (PNG, JPEG, BMP).")
    path = Path(str(images))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--images '{path}' does not exist; pass an image file or a folder.")
    found = [Path(file) for file in list_images(path)]
    if not found:
        raise UserError(f"--images '{path}' holds no {'/'.join(sorted(IMAGE_EXTENSIONS))} "
                        "files.")
    return found


def psnr_uint8(original: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB between two uint8 pictures (peak 255), via `progvae.runs.heldout.psnr` on the
    [-1, 1] scale, where a level is 1/127.5."""
    from progvae.core.units import psnr

    mse = np.mean((original.astype(np.float64) - decoded.astype(np.float64)) ** 2)
    return psnr(mse / 127.5 ** 2)


def compress_files(codec: Codec, files: list[Path], out: Path, report=print) -> list[dict]:
    """Compress each file to out/STEM.pvc; returns one record per image."""
    stems = [file.stem for file in files]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise UserError(f"Several images are named '{repeated[0]}' (in different folders or "
                        "formats), and their .pvc files would overwrite each other; rename them.")
    writable_folder(out, "--out")
    records = []
    for file in files:
        image = read_image(file)
        started = time.perf_counter()
        encoded = codec.compress(image)
        seconds = time.perf_counter() - started
        target = out / f"{file.stem}.pvc"
        atomic_write_bytes(encoded.data, target)
        pixels = image.shape[0] * image.shape[1]
        record = {"image": str(file), "file": str(target), "width": image.shape[1],
                  "height": image.shape[0], "bytes": len(encoded.data),
                  "header_bytes": encoded.header_bytes,
                  "predicted_bytes": encoded.predicted_bits / 8,
                  "bpp": 8 * len(encoded.data) / pixels,
                  "psnr": psnr_uint8(codec.channels_of(image), encoded.reconstruction),
                  "seconds": seconds}
        records.append(record)
        report(f"{file} -> {target}: {image.shape[1]}x{image.shape[0]}, {record['bytes']:,} "
               f"bytes (model's estimate {record['predicted_bytes']:,.0f} + {record['header_bytes']}"
               f" header), {record['bpp']:.3f} bits/pixel, PSNR {record['psnr']:.2f} dB, "
               f"{seconds:.2f} s")
    return records


def decompress_file(codec: Codec, file: str, out: str, groups: int | None) -> dict:
    """Decode a .pvc file (its first `groups` groups) to the PNG `out`."""
    if not file:
        raise UserError("Pass --file=F.pvc, a file written by `progvae compress`.")
    if not out:
        raise UserError("Pass --out=IMAGE.png, where to write the decoded picture.")
    target = writable_output(out, "--out", ".png")
    data = read_pvc(file)
    started = time.perf_counter()
    image, header, decoded = codec.decompress(data, groups, source=f"'{file}'")
    seconds = time.perf_counter() - started
    save_png(image, target)
    used = prefix_bytes(header, decoded)
    return {"out": str(target), "groups": decoded, "of": codec.n_groups, "bytes": used,
            "bpp": 8 * used / (header.width * header.height), "width": header.width,
            "height": header.height, "seconds": seconds}


def format_decompressed(done: dict) -> str:
    """What `decompress` prints of `decompress_file`'s result."""
    return (f"Wrote {done['out']}: {done['width']}x{done['height']} from {done['groups']} of "
            f"{done['of']} groups ({done['bytes']:,} bytes, {done['bpp']:.3f} bits/pixel, "
            f"{done['seconds']:.2f} s).")
