"""The progressive codec: .pvc files that decode to exactly the encoder's picture, prefixes that
decode to coarser ones, sizes the model predicts, any thread count, and bad files refused."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from progvae.__main__ import main
from progvae.codec.coder import (_FIXED, SCALE_COUNT, TAILS, Codec, _decode_group, _encode_group,
                                 read_header)
from progvae.core.config import load_config
from progvae.runs.exported import ExportedNetwork, write_exported
from progvae.runs.kinds import KINDS

SMALL = {"width": 8, "zdim": 4, "enc_blocks": "16d2,8d2,4d4,1x1",
         "dec_blocks": "1x1,4m1,8m4,16m8", "image_size": 16, "image_channels": 3,
         "latents": "quantized", "steps": 10}


def _model(seed: int = 0):
    """A quantised stage one whose priors and posteriors vary with the image (random last
    layers instead of the zero start), so symbols spread over many scales."""
    torch.manual_seed(seed)
    config = load_config("digits", SMALL)
    model = KINDS["stage1"].build(config)
    with torch.no_grad():
        for block in model.decoder.blocks:
            last = [m for m in block.prior.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            last.weight.normal_(0, 0.3)
            last.bias.normal_(0, 0.5)
    return config, model.eval()


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour picture with some texture, uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], axis=2)
    picture = 127.5 + 90 * base + rng.normal(0, 12, base.shape)
    return picture.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def codec():
    return Codec(_model()[1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The model as a file the commands accept as --run, and an image file."""
    folder = tmp_path_factory.mktemp("codec")
    config, model = _model()
    write_exported(folder / "codec.safetensors",
                   ExportedNetwork("stage1", config, 10, {}, model.state_dict()))
    import imageio.v3 as imageio
    imageio.imwrite(folder / "photo.png", _photo(37, 50, seed=1))
    return folder


def test_full_decode_is_the_encoders_picture_and_every_prefix_differs(codec):
    image = _photo(37, 50)                      # not a multiple of the 16-pixel tiles
    encoded = codec.compress(image, batch=3)    # several batches per stream
    decoded, header, groups = codec.decompress(encoded.data)
    assert groups == codec.n_groups == 4
    assert decoded.shape == image.shape
    np.testing.assert_array_equal(decoded, encoded.reconstruction)
    prefixes = [codec.decompress(encoded.data, k)[0] for k in range(codec.n_groups)]
    assert all(not np.array_equal(p, decoded) for p in prefixes)   # every group matters
    assert np.diff(np.cumsum(header.stream_bytes)).min() >= 0


def test_a_file_cut_after_k_streams_decodes_that_prefix_and_refuses_more(codec):
    encoded = codec.compress(_photo(32, 32))
    header = read_header(encoded.data, "test")
    cut = encoded.data[:header.size + sum(header.stream_bytes[:2]) + 3]
    whole_prefix = codec.decompress(encoded.data, 2)[0]
    np.testing.assert_array_equal(codec.decompress(cut, 2)[0], whole_prefix)
    with pytest.raises(Exception, match="truncated: it holds 2 of its 4"):
        codec.decompress(cut, 3)


def test_a_grayscale_image_codes_in_an_rgb_model(codec):
    gray = _photo(20, 20)[:, :, :1]
    encoded = codec.compress(gray)
    decoded = codec.decompress(encoded.data)[0]
    assert decoded.shape == (20, 20, 3)
    np.testing.assert_array_equal(decoded, encoded.reconstruction)


def test_file_size_is_the_models_code_length(codec):
    encoded = codec.compress(_photo(96, 128, seed=3))
    streams = len(encoded.data) - encoded.header_bytes
    predicted = encoded.predicted_bits / 8
    assert predicted > 2000
    assert abs(streams - predicted) <= 0.01 * predicted


@pytest.mark.parametrize("scale", [0, 40, SCALE_COUNT - 1])
def test_symbols_far_in_the_tail_escape_and_come_back(scale):
    import constriction
    tail = int(TAILS[scale])
    symbols = np.array([0, 1, -1, tail, tail + 1, -tail - 1, tail + 2, -(1 << 19), 77777])
    scales = np.array([scale, 3, 90, scale, scale, scale, scale, scale, 0])
    coder = constriction.stream.queue.RangeEncoder()
    _encode_group(coder, symbols, scales)
    _encode_group(coder, symbols[::-1].copy(), scales)          # a second batch follows
    decoder = constriction.stream.queue.RangeDecoder(coder.get_compressed())
    np.testing.assert_array_equal(_decode_group(decoder, scales, "test"), symbols)
    np.testing.assert_array_equal(_decode_group(decoder, scales, "test"), symbols[::-1])


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def test_commands_round_trip_on_different_thread_counts(exported, tmp_path):
    run = str(exported / "codec.safetensors")
    threads = torch.get_num_threads()
    try:
        code, printed, _ = _run(["compress", f"--run={run}", f"--images={exported}/photo.png",
                                 f"--out={tmp_path}", "--num_threads=1"])
        assert code == 0 and "bits/pixel" in printed and "PSNR" in printed
        code, printed, _ = _run(["decompress", f"--run={run}", f"--file={tmp_path}/photo.pvc",
                                 f"--out={tmp_path}/back.png", "--num_threads=2"])
        assert code == 0 and "from 4 of 4 groups" in printed
    finally:
        torch.set_num_threads(threads)
    import imageio.v3 as imageio
    codec = Codec(_model()[1])
    expected = codec.compress(imageio.imread(exported / "photo.png")).reconstruction
    np.testing.assert_array_equal(imageio.imread(tmp_path / "back.png"), expected)


def _with_header_field(data: bytes, index: int, value) -> bytes:
    """The file with one field of the fixed header changed and the header's CRC made valid."""
    fields = list(_FIXED.unpack_from(data))
    fields[index] = value
    header = read_header(data, "test")
    body = _FIXED.pack(*fields) + data[_FIXED.size:header.size - 4]
    return body + struct.pack("<I", zlib.crc32(body)) + data[header.size:]


def _with_symbol_crc(data: bytes, group: int, value: int) -> bytes:
    """The file with one group's symbol checksum changed (as if the decoding machine computed
    other prior scales) and the header's CRC made valid."""
    header = read_header(data, "test")
    header.symbol_crcs[group] = value
    return header.pack() + data[header.size:]


@pytest.fixture(scope="module")
def bad_files(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    code, _, err = _run(["compress", f"--run={exported}/codec.safetensors",
                         f"--images={exported}/photo.png", f"--out={folder}"])
    assert code == 0, err
    good = (folder / "photo.pvc").read_bytes()
    header = read_header(good, "test")
    flipped = bytearray(good)
    flipped[header.size + header.stream_bytes[0] + 5] ^= 0x40
    files = {
        "not_pvc": b"\x89PNG\r\n\x1a\n" + bytes(100),
        "header_cut": good[:20],
        "version": good[:4] + bytes([9]) + good[5:],
        "header_bit": good[:12] + bytes([good[12] ^ 1]) + good[13:],
        "stream_bit": bytes(flipped),
        "symbol_crc": _with_symbol_crc(good, 0, header.symbol_crcs[0] ^ 1),
        "huge": _with_header_field(good, 3, 1 << 30),
        "huge_batch": _with_header_field(good, 7, 60000),
    }
    for name, data in files.items():
        (folder / f"{name}.pvc").write_bytes(data)
    config, other = _model(seed=5)
    write_exported(folder / "other.safetensors",
                   ExportedNetwork("stage1", config, 10, {}, other.state_dict()))
    return folder


@pytest.mark.parametrize("name, extra, words", [
    ("not_pvc", [], "not a progvae compressed image"),
    ("header_cut", [], "truncated inside its header"),
    ("version", [], "format version 9"),
    ("header_bit", [], "header fails its checksum"),
    ("stream_bit", [], "does not decode"),   # a checksum, or the coder itself, notices
    ("symbol_crc", [], "group 1's symbols fail their checksum"),
    ("huge", [], "beyond what progvae writes"),
    ("huge_batch", [], "beyond what progvae writes"),
    ("photo", ["--groups=9"], "outside 0..4"),
    ("photo", ["--groups=-1"], "--groups"),
    ("missing", [], "does not exist"),
])
def test_bad_files_end_in_one_sentence(exported, bad_files, tmp_path, name, extra, words):
    source = bad_files / f"{name}.pvc"
    code, _, err = _run(["decompress", f"--run={exported}/codec.safetensors",
                         f"--file={source}", f"--out={tmp_path}/x.png", *extra])
    assert code == 2, err
    assert words in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_a_file_from_another_model_is_refused(bad_files, tmp_path):
    code, _, err = _run(["decompress", f"--run={bad_files}/other.safetensors",
                         f"--file={bad_files}/photo.pvc", f"--out={tmp_path}/x.png"])
    assert code == 2 and "made by another model" in err


def test_a_gaussian_model_has_no_code(exported, tmp_path):
    config = load_config("digits", {**SMALL, "latents": "gaussian"})
    model = KINDS["stage1"].build(config)
    write_exported(tmp_path / "g.safetensors",
                   ExportedNetwork("stage1", config, 10, {}, model.state_dict()))
    code, _, err = _run(["compress", f"--run={tmp_path}/g.safetensors",
                         f"--images={exported}/photo.png", f"--out={tmp_path}/c"])
    assert code == 2 and "--latents=quantized" in err


def test_codec_eval_writes_the_curve_beside_jpeg_and_webp(exported, tmp_path):
    code, printed, err = _run(["codec-eval", f"--run={exported}/codec.safetensors",
                               f"--images={exported}/photo.png", f"--out={tmp_path}",
                               "--qualities=[10,90]"])
    assert code == 0, err
    result = json.loads((tmp_path / "codec_rd.json").read_text())
    rates = [row["bpp"] for row in result["progvae"]]
    assert [row["groups"] for row in result["progvae"]] == [1, 2, 3, 4]
    assert rates == sorted(rates) and rates[0] < rates[-1]
    assert [row["quality"] for row in result["jpeg"]] == [10, 90]
    assert result["jpeg"][0]["psnr"] < result["jpeg"][1]["psnr"]
    assert result["webp"][1]["bpp"] > 0
    assert (tmp_path / "codec_rd.png").stat().st_size > 1000
    assert "JPEG" in printed or "megapixels/s" in printed


def test_bench_times_encoding_and_decoding(codec):
    from progvae.evaluation.benchmarks.codec_bench import format_codec_bench, run_codec_bench
    result = run_codec_bench(codec, n_small=2, repeats=1, photo_side=48)
    assert result["photo_size"] == [48, 48]
    for key in ("encode_images_per_s", "decode_images_per_s", "encode_megapixels_per_s",
                "decode_megapixels_per_s"):
        assert result[key] > 0
    assert "megapixels/s" in format_codec_bench(result)


def test_the_codec32_preset_is_a_working_codec():
    config = load_config("codec32", {"image_channels": 3})
    assert (config.latents, config.data, config.image_size) == ("quantized", "patches", 32)
    codec = Codec(KINDS["stage1"].build(config).eval())
    encoded = codec.compress(_photo(40, 70))
    np.testing.assert_array_equal(codec.decompress(encoded.data)[0], encoded.reconstruction)


@pytest.mark.slow
def test_a_trained_codec_compresses_a_photograph_it_never_saw(tmp_path):
    """codec32 for 300 steps on `patches`, then matplotlib's 512x600 photograph: the file
    decodes to the encoder's picture, and a 2-group prefix to a coarser one."""
    import imageio.v3 as imageio

    from progvae.codec.files import psnr_uint8
    from progvae.evaluation.benchmarks.codec_bench import sample_photo
    run = tmp_path / "codec"
    code, _, err = _run(["stage1", "--config=codec32", f"--out={run}", "--steps=300",
                         "--eval_every=0", "--quiet=True"])
    assert code == 0, err
    photo, name = sample_photo()
    imageio.imwrite(tmp_path / "photo.png", photo)
    assert _run(["compress", f"--run={run}", f"--images={tmp_path}/photo.png",
                 f"--out={tmp_path}"])[0] == 0
    for groups, out in ((None, "all.png"), (2, "two.png")):
        extra = [] if groups is None else [f"--groups={groups}"]
        assert _run(["decompress", f"--run={run}", f"--file={tmp_path}/photo.pvc",
                     f"--out={tmp_path}/{out}", *extra])[0] == 0
    from progvae.codec.files import load_codec
    expected = load_codec(str(run)).compress(photo).reconstruction
    full = imageio.imread(tmp_path / "all.png")
    np.testing.assert_array_equal(full, expected)
    assert psnr_uint8(photo, imageio.imread(tmp_path / "two.png")) < psnr_uint8(photo, full)


@pytest.mark.parametrize("command, words", [
    (["compress", "--out=/proc/progvae/out"], "cannot be created"),
    (["compress", "--out={photo}"], "is a file"),
    (["codec-eval", "--out=/proc/progvae/out"], "cannot be created"),
    (["compress", "--images={folder}/missing.png", "--out={folder}/c"], "does not exist"),
])
def test_a_bad_output_or_input_is_refused_before_the_model_loads(exported, command, words):
    name, *rest = command
    args = [name, f"--run={exported}/codec.safetensors", f"--images={exported}/photo.png",
            *[a.format(photo=exported / "photo.png", folder=exported) for a in rest]]
    code, _, err = _run(args)
    assert code == 2 and words in err and "Traceback" not in err
