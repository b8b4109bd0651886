"""`codec-eval`: the progressive codec's rate-distortion curves beside JPEG's and WebP's, and
the Bjontegaard-delta rate against each.

Each image is compressed once per model (the shipped `--quality` levels, or one `--run`); every
prefix of K groups (K = 1 .. all) is decoded and scored by its bits per pixel (the header and
the first K streams) and PSNR (and LPIPS when weights are given). JPEG and WebP (Pillow) code
the same images at a range of qualities. The BD-rate (Bjontegaard, VCEG-M33) is computed per
image, between that image's codec curve (the quality levels' full decodes; for one run, its
prefixes) and its JPEG or WebP curve, over the PSNR range both cover, with the `bjontegaard`
package's PCHIP interpolation (the JCT-VC common test conditions' choice), then averaged over
the images: negative means fewer bits than JPEG for the same PSNR. Results are means over the
images: OUT/codec_rd.json and OUT/codec_rd.png.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np

from progvae.codec.coder import Codec, prefix_bytes, read_header
from progvae.codec.files import psnr_uint8
from progvae.core.atomic import atomic_write_json, writable_folder
from progvae.core.errors import UserError
from progvae.data.readers import read_image

QUALITIES = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
BASELINES = ("jpeg", "webp")


def codec_rd(codecs: dict[str, Codec] | Codec, files: list[Path], out: Path,
             qualities=QUALITIES, lpips_weights: str = "", progress=None) -> dict:
    """Score every codec's prefixes and JPEG/WebP on `files` (`codecs`: {label: Codec}, or
    one Codec); writes and returns codec_rd.json."""
    if isinstance(codecs, Codec):
        codecs = {"progvae": codecs}
    scorer = None
    if lpips_weights:
        from progvae.evaluation.metrics.lpips_metric import LpipsScorer
        scorer = LpipsScorer(lpips_weights)
    prefixes = {label: {k: [] for k in range(1, codec.n_groups + 1)}
                for label, codec in codecs.items()}
    baselines = {name: {q: [] for q in qualities} for name in BASELINES}
    seconds = {label: [0.0, 0.0] for label in codecs}
    pixels = 0.0
    for file in files:
        first = next(iter(codecs.values()))
        image = first.channels_of(read_image(file))
        area = image.shape[0] * image.shape[1]
        pixels += area
        for label, codec in codecs.items():
            started = time.perf_counter()
            encoded = codec.compress(image)
            seconds[label][0] += time.perf_counter() - started
            header = read_header(encoded.data, str(file))
            for k in prefixes[label]:
                started = time.perf_counter()
                decoded, _, _ = codec.decompress(encoded.data, k, source=str(file))
                if k == codec.n_groups:
                    seconds[label][1] += time.perf_counter() - started
                prefixes[label][k].append(
                    _scores(image, decoded, 8 * prefix_bytes(header, k) / area, scorer))
        for name in baselines:
            for quality in qualities:
                decoded, size = pillow_roundtrip(image, name, quality)
                baselines[name][quality].append(_scores(image, decoded, 8 * size / area, scorer))
        if progress is not None:
            progress(file)
    models = [{"label": label, "groups": codecs[label].n_groups,
               "prefixes": [{"groups": k, **_mean(rows)} for k, rows in table.items()],
               "encode_megapixels_per_s": pixels / 1e6 / seconds[label][0],
               "decode_megapixels_per_s": pixels / 1e6 / seconds[label][1]}
              for label, table in prefixes.items()]
    # The curve the BD-rate is taken over, per image: each model's full decode when there are
    # several (the quality levels), else the one model's prefixes.
    if len(codecs) > 1:
        curves = [[table[max(table)][i] for table in prefixes.values()]
                  for i in range(len(files))]
    else:
        table = next(iter(prefixes.values()))
        curves = [[rows[i] for rows in table.values()] for i in range(len(files))]
    result = {
        "images": [str(file) for file in files],
        "megapixels": pixels / 1e6,
        "models": models,
        "progvae": models[0]["prefixes"] if len(models) == 1 else
        [{"label": m["label"], **m["prefixes"][-1]} for m in models],
        **{name: [{"quality": q, **_mean(rows)} for q, rows in table.items()]
           for name, table in baselines.items()},
        "encode_megapixels_per_s": models[0]["encode_megapixels_per_s"],
        "decode_megapixels_per_s": models[0]["decode_megapixels_per_s"],
        "bd_rate_curve": "quality levels" if len(codecs) > 1 else "prefixes",
    }
    per_image = {name: [bd_rate([(r["bpp"], r["psnr"]) for r in
                                 [rows[i] for rows in baselines[name].values()]],
                                [(r["bpp"], r["psnr"]) for r in curves[i]])
                        for i in range(len(files))]
                 for name in BASELINES}
    result["bd_rate_per_image"] = per_image
    # the mean over the images whose curves share a PSNR range with the baseline's
    result["bd_rate"] = {name: (float(np.mean([v for v in values if v is not None]))
                                if any(v is not None for v in values) else None)
                         for name, values in per_image.items()}
    result["bd_rate_images"] = {name: sum(v is not None for v in values)
                                for name, values in per_image.items()}
    full = result["progvae"][-1]
    result["at_progvae_full_rate"] = {
        name: {"bpp": full["bpp"], "psnr": interpolate_psnr(result[name], full["bpp"])}
        for name in baselines}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "codec_rd.json")
    plot_rd(result, out / "codec_rd.png")
    return result


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]
            ) -> float | None:
    """The Bjontegaard-delta rate of `test` against `anchor` in percent (negative: fewer bits
    for the same PSNR), from (bits per pixel, PSNR) points, over the PSNR range both curves
    cover; None when they share no range or a curve has fewer than two distinct points. Each
    curve keeps only the points that raise its PSNR as the rate grows (a prefix or quality
    that adds bits and loses PSNR is no operating point anyone would pick)."""
    import bjontegaard

    curves = [_rising(points) for points in (anchor, test)]
    if min(len(curve) for curve in curves) < 2:
        return None
    (anchor_rate, anchor_psnr), (test_rate, test_psnr) = (zip(*curve) for curve in curves)
    low = max(min(anchor_psnr), min(test_psnr))
    high = min(max(anchor_psnr), max(test_psnr))
    if high <= low:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = bjontegaard.bd_rate(list(anchor_rate), list(anchor_psnr), list(test_rate),
                                    list(test_psnr), method="pchip",
                                    require_matching_points=False, min_overlap=0)
    return float(value)


def _rising(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    kept: list[tuple[float, float]] = []
    for rate, psnr in sorted(points):
        if rate > 0 and np.isfinite(psnr) and (not kept or (psnr > kept[-1][1]
                                                            and rate > kept[-1][0])):
            kept.append((rate, psnr))
    return kept


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
    """Bits per pixel against PSNR: each model's prefixes (labelled by K), the quality levels'
    full decodes, JPEG and WebP; the BD-rates in the title."""
    from matplotlib.figure import Figure

    from progvae.core.atomic import atomic_path

    figure = Figure(figsize=(6.8, 4.6))
    axes = figure.add_subplot()
    for name, style in (("jpeg", "s--"), ("webp", "^--")):
        rows = sorted(result[name], key=lambda row: row["bpp"])
        axes.plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], style, label=name.upper(),
                  markersize=4)
    several = len(result["models"]) > 1
    for model in result["models"]:
        rows = model["prefixes"]
        axes.plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], "o-", markersize=3,
                  alpha=0.5 if several else 1.0, color=None if several else "black",
                  label=f"{model['label']}, first K groups")
        if not several:
            for row in rows:
                axes.annotate(str(row["groups"]), (row["bpp"], row["psnr"]),
                              textcoords="offset points", xytext=(4, -10), fontsize=7)
    if several:
        rows = result["progvae"]
        axes.plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], "D-", color="black",
                  label="progvae, the quality levels")
    bd = ", ".join(f"{name.upper()} {value:+.1f}%" for name, value in result["bd_rate"].items()
                   if value is not None)
    axes.set_xlabel("bits per pixel")
    axes.set_ylabel("PSNR (dB)")
    axes.set_title(f"{len(result['images'])} image(s), {result['megapixels']:.2f} megapixels"
                   + (f"; BD-rate against {bd}" if bd else ""), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def format_codec_rd(result: dict, out: Path) -> str:
    """What `codec-eval` prints: bits per pixel and PSNR for every prefix of every model, JPEG
    and WebP at the full file's rate, the BD-rates, the coding speed and the files written."""
    lines = []
    for model in result["models"]:
        lines.append(f"{model['label']}:  {'groups':>6} {'bits/pixel':>10} {'PSNR':>7}")
        lines += [f"{'':>{len(model['label']) + 2}} {row['groups']:>6} {row['bpp']:>10.3f} "
                  f"{row['psnr']:>7.2f}" for row in model["prefixes"]]
        lines.append(f"  encoding {model['encode_megapixels_per_s']:.3f} megapixels/s, "
                     f"decoding {model['decode_megapixels_per_s']:.3f}")
    if len(result["models"]) == 1:
        lines += [f"{name.upper()} at {matched['bpp']:.3f} bits/pixel: PSNR {matched['psnr']:.2f}"
                  for name, matched in result["at_progvae_full_rate"].items()
                  if matched["psnr"] is not None]
    images = len(result["images"])
    for name, value in result["bd_rate"].items():
        counted = result["bd_rate_images"][name]
        lines.append(f"BD-rate against {name.upper()} over the {result['bd_rate_curve']}: " + (
            "none (on no image do the curves share a PSNR range)" if value is None else
            f"{value:+.1f}%" + ("" if counted == images else
                                f" (the {counted} of {images} images whose curves share a "
                                "PSNR range)")))
    lines.append(f"Wrote {out / 'codec_rd.json'} and codec_rd.png.")
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
    """`progvae codec-eval`: check the arguments, score the images (`codec_rd`) with the run's
    model or, without --run, every shipped quality level, and return what to print; OUT
    defaults to the run's directory."""
    from progvae.codec.files import image_files, load_codec
    from progvae.codec.shipped import QUALITY_TARGETS, shipped_codec

    qualities = parse_qualities(qualities)
    files = image_files(images)
    if not out:
        if not (run and Path(str(run)).is_dir()):
            raise UserError("Pass --out=DIR for codec_rd.json and codec_rd.png.")
        out = run
    writable_folder(out, "--out")
    codecs = ({"progvae": load_codec(run)} if run else
              {f"quality {q}": shipped_codec(q) for q in QUALITY_TARGETS})
    result = codec_rd(codecs, files, Path(str(out)), qualities, lpips_weights,
                      progress=lambda file: report(f"scored {file}"))
    return format_codec_rd(result, Path(str(out)))
