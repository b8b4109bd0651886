"""The codec's model and its shipped weights: a fully convolutional stage one that runs on any
image size in one pass, trains on the rounded latents it decodes, learns from packaged
photographs, ships three quality levels that work with no --run, and is scored by BD-rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_codec import _run  # the command line in this process: (exit status, stdout, stderr)

from progvae.codec.shipped import QUALITY_TARGETS, shipped_codec, shipped_path
from progvae.core.config import load_config
from progvae.core.errors import UserError
from progvae.evaluation.benchmarks.codec_bench import sample_photo
from progvae.evaluation.experiments.codec_rd import bd_rate
from progvae.models.vdvae import VDVAE

SMALL_CODEC = {"image_channels": 3, "width": 16, "zdim": 4, "image_size": 32,
               "enc_blocks": "8x1,8d2,4d2,2x1", "dec_blocks": "2x1,4m2,8m4"}


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    import imageio.v3 as imageio
    folder = tmp_path_factory.mktemp("photo")
    photo, _ = sample_photo()
    imageio.imwrite(folder / "hopper.png", photo)
    return folder / "hopper.png"


# --- the model ---------------------------------------------------------------------------------
def test_a_fully_convolutional_model_runs_any_multiple_of_its_stride_in_one_pass():
    torch.manual_seed(0)
    model = VDVAE(load_config("codec", SMALL_CODEC)).eval()
    for height, width in ((32, 32), (96, 160)):
        x = torch.rand(2, 3, height, width) * 2 - 1
        with torch.no_grad():
            out = model(x)
        assert out["output"].shape == x.shape
        # the coarsest group sits at stride 16 (patches of 4, then 2 halvings) whatever the size
        assert out["latents"][0].shape[-2:] == (height // 16, width // 16)
        assert torch.isfinite(out["rate"]).all()
    assert model.decoder.stream_init["2"].shape == (1, 16, 1, 1)   # a learned bias


def test_learned_upsampling_starts_as_nearest_neighbour():
    from progvae.models.vdvae import _upsampler
    layer = _upsampler(6, 4, 2)
    x = torch.randn(1, 6, 3, 5)
    upsampled = torch.nn.functional.pixel_shuffle(layer(x), 2)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")[:, :4]
    torch.testing.assert_close(upsampled, expected)


@pytest.mark.parametrize("mode, integral", [("ste", True), ("noise", False)])
def test_ste_training_decodes_the_rounded_latent_and_noise_training_the_noisy_one(mode, integral):
    torch.manual_seed(0)
    model = VDVAE(load_config("codec", {**SMALL_CODEC, "quantized_training": mode})).train()
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    offsets = [latent - prior_mean for latent, (prior_mean, _) in zip(out["latents"],
                                                                       out["priors"])]
    assert all(torch.equal(o, o.round()) for o in offsets) == integral
    out["rate"].mean().backward()   # the rate is the noisy latent's and reaches the encoder
    assert model.encoder.in_conv.weight.grad.abs().sum() > 0


def test_block_strings_scale_resolutions_and_mixins_but_not_counts_or_rates():
    from progvae.models.blocks import scale_block_string
    assert scale_block_string("16x1,16d2,8x2,2", 2) == "32x1,32d2,16x2,4"
    assert scale_block_string("2x2,4m2,16m8,16x3", 4) == "8x2,16m8,64m32,64x3"


def test_init_from_takes_the_shipped_codec_onto_larger_crops_as_the_same_network():
    """A fully convolutional model trained on small crops (64x64 put the coarsest latents, at
    stride 32, on a 2x2 grid, all border) goes on training on larger ones with its block
    strings scaled, and the network computes exactly what it did."""
    from progvae.models.blocks import scale_block_string
    from progvae.runs.load import load_model
    from progvae.runs.train import start_from

    source_config, source, _ = load_model(shipped_path(2))
    overrides = {"image_size": 2 * source_config.image_size, "fully_convolutional": True, **{
        name: scale_block_string(getattr(source_config, name), 2)
        for name in ("enc_blocks", "dec_blocks")}}
    config = load_config("codec", overrides)
    model = VDVAE(config).eval()
    start_from(model, config, str(shipped_path(2)))
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(0)
        before = source.float()(x)
        torch.manual_seed(0)
        after = model(x)
    torch.testing.assert_close(after["output"], before["output"], rtol=0, atol=1e-5)
    torch.testing.assert_close(after["rate"], before["rate"], rtol=1e-5, atol=0)

    # a network that differs in more than its scale (one more block at the finest resolution)
    # is still refused
    head, count = overrides["dec_blocks"].rsplit("x", 1)
    config = load_config("codec", {**overrides, "dec_blocks": f"{head}x{int(count) + 1}"})
    with pytest.raises(UserError, match="another architecture"):
        start_from(VDVAE(config), config, str(shipped_path(2)))


def test_the_photos_dataset_holds_the_judged_photographs_out_of_training():
    from progvae.data.loading import load_data
    from progvae.data.photos import HELD_OUT, TRAINING
    assert {p.name for p in TRAINING}.isdisjoint(p.name for p in HELD_OUT)
    assert "grace_hopper" in {p.name for p in HELD_OUT}
    data = load_data("photos", 64)
    assert data.train.shape[1:] == (64, 64, 3) and data.test.shape[1:] == (64, 64, 3)
    np.testing.assert_array_equal(load_data("photos", 64).test[:8], data.test[:8])


# --- the shipped weights -----------------------------------------------------------------------
def test_the_shipped_weights_are_small_half_precision_and_described():
    from safetensors import safe_open
    card = (shipped_path(1).parent / "MODEL_CARD.md").read_text()
    for quality in QUALITY_TARGETS:
        path = shipped_path(quality)
        assert path.stat().st_size < 3_000_000
        with safe_open(str(path), "pt") as weights:
            assert json.loads(weights.metadata()["config"])["fully_convolutional"] is True
            assert all(weights.get_tensor(name).dtype == torch.float16
                       for name in list(weights.keys())[:5])
    from progvae.data.photos import HELD_OUT, TRAINING
    for photo in TRAINING + HELD_OUT:
        assert photo.name in card and photo.licence.split(" (")[0] in card


def test_a_fresh_install_compresses_and_decompresses_a_photo_with_no_run(photo_file, tmp_path):
    code, printed, err = _run(["compress", f"--images={photo_file}", f"--out={tmp_path}"])
    assert code == 0, err
    bits = float(printed.split(" bits/pixel")[0].rsplit(" ", 1)[1])
    psnr = float(printed.split("PSNR ")[1].split(" dB")[0])
    assert bits < 0.9 and psnr > 30.0   # quality 2 on grace_hopper: 0.750 and 31.67 when shipped
    threads = torch.get_num_threads()
    try:   # another thread count decodes the same picture: the coder pins its own
        code, printed, err = _run(["decompress", f"--file={tmp_path}/hopper.pvc",
                                   f"--out={tmp_path}/back.png", "--num_threads=1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and "from 12 of 12 groups" in printed, err
    import imageio.v3 as imageio
    expected = shipped_codec(2).compress(imageio.imread(photo_file)).reconstruction
    np.testing.assert_array_equal(imageio.imread(tmp_path / "back.png"), expected)


def test_higher_quality_levels_spend_more_bits_for_more_psnr():
    from progvae.codec.files import psnr_uint8
    photo = sample_photo()[0][100:228, 150:342]
    points = []
    for quality in QUALITY_TARGETS:
        encoded = shipped_codec(quality).compress(photo)
        points.append((len(encoded.data), psnr_uint8(photo, encoded.reconstruction)))
    assert [size for size, _ in points] == sorted(size for size, _ in points)
    assert [psnr for _, psnr in points] == sorted(psnr for _, psnr in points)


@pytest.mark.parametrize("args, words", [
    (["--quality=7"], "--quality must be one of 1, 2, 3"),
    (["--quality=2", "--run=somewhere"], "not both"),
])
def test_a_bad_quality_is_one_sentence(photo_file, tmp_path, args, words):
    code, _, err = _run(["compress", f"--images={photo_file}", f"--out={tmp_path}", *args])
    assert code == 2 and words in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_decompress_without_run_refuses_a_file_no_shipped_model_wrote(tmp_path):
    from progvae.codec.coder import Codec
    torch.manual_seed(0)
    codec = Codec(VDVAE(load_config("codec", SMALL_CODEC)).eval())
    (tmp_path / "x.pvc").write_bytes(codec.compress(sample_photo()[0][:40, :40]).data)
    code, _, err = _run(["decompress", f"--file={tmp_path}/x.pvc", f"--out={tmp_path}/x.png"])
    assert code == 2 and "not made by a shipped model" in err
    assert not (tmp_path / "x.png").exists()


# --- BD-rate -----------------------------------------------------------------------------------
ANCHOR = [(0.25, 28.1), (0.5, 31.0), (1.0, 34.2), (2.0, 37.9)]


def test_bd_rate_of_a_curve_needing_a_fifth_fewer_bits_is_minus_twenty_percent():
    cheaper = [(rate * 0.8, psnr) for rate, psnr in ANCHOR]
    assert bd_rate(ANCHOR, cheaper) == pytest.approx(-20.0, abs=1e-6)
    assert bd_rate(ANCHOR, [(rate * 1.5, psnr) for rate, psnr in ANCHOR]) == \
        pytest.approx(50.0, abs=1e-6)
    # three points of the test curve, the quality levels' count, are enough (the interpolation
    # between other knots moves it by a few hundredths of a percent)
    assert bd_rate(ANCHOR, cheaper[1:]) == pytest.approx(-20.0, abs=0.1)


def test_bd_rate_is_none_without_a_shared_psnr_range():
    assert bd_rate(ANCHOR, [(3.0, 40.0), (4.0, 42.0)]) is None
    assert bd_rate(ANCHOR, [(1.0, 30.0)]) is None


@pytest.mark.slow   # three short trainings side by side, about 75 s on 2 cores
def test_the_weights_recipe_trains_every_level_for_its_budget_and_exports_half_precision(
        tmp_path):
    from safetensors import safe_open

    from progvae.codec.files import load_codec
    from progvae.evaluation.experiments.codec_weights import make_weights
    summaries = make_weights(tmp_path, minutes=0.2, threads=1, init_from_shipped=True)
    assert sorted(summaries) == sorted(QUALITY_TARGETS)
    for quality, summary in summaries.items():
        path = tmp_path / f"quality_{quality}.safetensors"
        with safe_open(str(path), "pt") as weights:
            assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.float16
        assert summary["steps"] >= 1
        assert [figure["photo"] for figure in summary["held_out_photographs"]] == \
            ["coffee", "flower", "grace_hopper"]
        encoded = load_codec(str(path)).compress(sample_photo()[0][:64, :64])
        assert len(encoded.data) > 0
