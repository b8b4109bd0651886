"""`codec-eval`: the progressive codec's rate-distortion curve beside JPEG's and WebP's.

Each image is compressed once; every prefix of K groups (K = 1 .. all) is decoded and scored by
its bits per pixel (the header and the first K streams) and PSNR (and LPIPS when weights are
given). JPEG and WebP (Pillow) code the same images at a range of qualities. Results are the
means over the images: OUT/codec_rd.json and OUT/codec_rd.png.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from progvae.codec.coder import Codec, prefix_bytes, read_header
from progvae.codec.files import psnr_uint8
from progvae.core.atomic import atomic_write_json, writable_folder
from progvae.core.errors import UserError
from progvae.data.readers import read_image

QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)


def codec_rd(codec: Codec, files: list[Path], out: Path, qualities=QUALITIES,
             lpips_weights: str = "", progress=None) -> dict:
    """Score the codec's prefixes and JPEG/WebP on `files`; writes and returns codec_rd.json."""
    scorer = None
    if lpips_weights:
        from progvae.evaluation.metrics.lpips_metric import LpipsScorer
        scorer = LpipsScorer(lpips_weights)
    prefixes = {k: [] for k in range(1, codec.n_groups + 1)}
    baselines = {name: {q: [] for q in qualities} for name in ("jpeg", "webp")}
    encode_seconds = decode_seconds = pixels = 0.0
    for file in files:
        image = codec.channels_of(read_image(file))
        started = time.perf_counter()
        encoded = codec.compress(image)
        encode_seconds += time.perf_counter() - started
        header = read_header(encoded.data, str(file))
        area = image.shape[0] * image.shape[1]
        pixels += area
        for k in prefixes:
            started = time.perf_counter()
            decoded, _, _ = codec.decompress(encoded.data, k, source=str(file))
            if k == codec.n_groups:
                decode_seconds += time.perf_counter() - started
            prefixes[k].append(_scores(image, decoded, 8 * prefix_bytes(header, k) / area, scorer))
        for name in baselines:
            for quality in qualities:
                decoded, size = pillow_roundtrip(image, name, quality)
                baselines[name][quality].append(_scores(image, decoded, 8 * size / area, scorer))
        if progress is not None:
            progress(file)
    result = {
        "images": [str(file) for file in files],
        "megapixels": pixels / 1e6,
        "progvae": [{"groups": k, **_mean(rows)} for k, rows in prefixes.items()],
        **{name: [{"quality": q, **_mean(rows)} for q, rows in table.items()]
           for name, table in baselines.items()},
        "encode_seconds": encode_seconds, "decode_seconds": decode_seconds,
        "encode_megapixels_per_s": pixels / 1e6 / encode_seconds,
        "decode_megapixels_per_s": pixels / 1e6 / decode_seconds,
    }
    full = result["progvae"][-1]
    result["at_progvae_full_rate"] = {
        name: {"bpp": full["bpp"], "psnr": interpolate_psnr(result[name], full["bpp"])}
        for name in baselines}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "codec_rd.json")
    plot_rd(result, out / "codec_rd.png")
    return result


def pillow_roundtrip(image: np.ndarray, codec_name: str, quality: int) -> tuple[np.ndarray, int]:
    """Encode with Pillow's JPEG or WebP at `quality`, decode; (picture, bytes)."""
    from PIL import Image

    picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    picture.save(buffer, format=codec_name.upper(), quality=int(quality))
    size = buffer.tell()
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert(picture.mode))
    return decoded.reshape(image.shape), size


def interpolate_psnr(rows: list[dict], bpp: float) -> float | None:
    """A baseline's PSNR at `bpp`, linear between its two neighbouring qualities (None outside
    the range it covers)."""
    points = sorted((row["bpp"], row["psnr"]) for row in rows)
    rates = [rate for rate, _ in points]
    if not rates[0] <= bpp <= rates[-1]:
        return None
    return float(np.interp(bpp, rates, [psnr for _, psnr in points]))


def _scores(original: np.ndarray, decoded: np.ndarray, bpp: float, scorer) -> dict:
    scores = {"bpp": bpp, "psnr": psnr_uint8(original, decoded)}
    if scorer is not None:
        import torch
        as_input = [torch.from_numpy(a).permute(2, 0, 1)[None].double().div(127.5).sub(1)
                    for a in (original, decoded)]
        scores["lpips"] = float(scorer(*as_input)[0])
    return scores


def _mean(rows: list[dict]) -> dict:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def plot_rd(result: dict, path: Path) -> None:
    """Bits per pixel against PSNR: the codec's prefixes (labelled by K), JPEG and WebP."""
    from matplotlib.figure import Figure

    from progvae.core.atomic import atomic_path

    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.add_subplot()
    for name, style in (("jpeg", "s--"), ("webp", "^--")):
        rows = sorted(result[name], key=lambda row: row["bpp"])
        axes.plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], style, label=name.upper(),
                  markersize=4)
    rows = result["progvae"]
    axes.plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], "o-", color="black",
              label="progvae, first K groups")
    for row in rows:
        axes.annotate(str(row["groups"]), (row["bpp"], row["psnr"]), textcoords="offset points",
                      xytext=(4, -10), fontsize=7)
    axes.set_xlabel("bits per pixel")
    axes.set_ylabel("PSNR (dB)")
    axes.set_title(f"{len(result['images'])} image(s), {result['megapixels']:.2f} megapixels")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def format_codec_rd(result: dict, out: Path) -> str:
    """What `codec-eval` prints: bits per pixel and PSNR for every prefix, JPEG and WebP at the
    full file's rate, the coding speed and the files written."""
    lines = [f"{'groups':>6} {'bits/pixel':>10} {'PSNR':>7}"]
    lines += [f"{row['groups']:>6} {row['bpp']:>10.3f} {row['psnr']:>7.2f}"
              for row in result["progvae"]]
    lines += [f"{name.upper()} at {matched['bpp']:.3f} bits/pixel: PSNR {matched['psnr']:.2f}"
              for name, matched in result["at_progvae_full_rate"].items()
              if matched["psnr"] is not None]
    lines.append(f"Encoding {result['encode_megapixels_per_s']:.3f} megapixels/s, decoding "
                 f"{result['decode_megapixels_per_s']:.3f}. Wrote {out / 'codec_rd.json'} "
                 "and codec_rd.png.")
    return "\n".join(lines)


def parse_qualities(qualities) -> tuple[int, ...]:
    """`--qualities` as a tuple of JPEG/WebP qualities, each an integer in 1..100 (QUALITIES if
    none are given); anything else is one sentence naming the value."""
    if qualities is None:
        return QUALITIES
    if isinstance(qualities, (int, float)):
        qualities = (qualities,)
    for quality in qualities:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise UserError(f"--qualities holds {quality!r}; JPEG and WebP qualities are "
                            "integers 1..100.")
    return tuple(qualities)


def codec_eval_command(run: str, images: str, out: str = "", lpips_weights: str = "",
                       qualities=None, report=print) -> str:
    """`progvae codec-eval`: check the arguments, score the images (`codec_rd`), and return
    what to print; OUT defaults to the run's directory."""
    from progvae.codec.files import image_files, load_codec

    qualities = parse_qualities(qualities)
    files = image_files(images)
    if not out:
        if not Path(str(run)).is_dir():
            raise UserError("Pass --out=DIR for codec_rd.json and codec_rd.png.")
        out = run
    writable_folder(out, "--out")
    result = codec_rd(load_codec(run), files, Path(str(out)), qualities, lpips_weights,
                      progress=lambda file: report(f"scored {file}"))
    return format_codec_rd(result, Path(str(out)))
