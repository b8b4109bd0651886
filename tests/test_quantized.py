"""Quantised latents (--latents=quantized): the box-integrated Gaussian's code lengths, the
noisy latents of training and the rounded, exactly coded latents of evaluation."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from progvae.core.config import load_config
from progvae.models.distributions import LIKELIHOOD_BOUND, box_gaussian_nll
from progvae.runs.kinds import KINDS

TINY = {"width": 8, "zdim": 4, "enc_blocks": "16d2,8d2,4d4,1x1",
        "dec_blocks": "1x1,4m1,8m4,16m8", "image_channels": 1, "latents": "quantized"}


@pytest.mark.parametrize("z, mean, std", [
    (0.0, 0.0, 1.0), (2.0, 0.3, 0.7), (-3.0, 0.1, 0.5),      # the bulk
    (5.0, 0.0, 1.0), (-6.0, 0.0, 1.1),                        # tails, above the bound
    (1.0, 0.0, 1000.0), (0.0, 0.0, 0.01)])                    # a flat and a sharp prior
def test_code_length_is_the_gaussian_mass_of_the_unit_box(z, mean, std):
    expected = -math.log(norm.cdf(z + 0.5, mean, std) - norm.cdf(z - 0.5, mean, std))
    got = box_gaussian_nll(torch.tensor(z, dtype=torch.float64),
                           torch.tensor(mean, dtype=torch.float64),
                           torch.tensor(math.log(std), dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_code_lengths_are_a_distribution_over_symbols_and_bounded_far_out():
    symbols = torch.arange(-60, 61, dtype=torch.float64)
    mass = torch.exp(-box_gaussian_nll(symbols + 0.3, torch.tensor(0.3, dtype=torch.float64),
                                       torch.tensor(math.log(3.0), dtype=torch.float64)))
    # sums to one, but for the floor of LIKELIHOOD_BOUND given to each far-out symbol
    assert mass.sum().item() == pytest.approx(1.0, abs=len(symbols) * LIKELIHOOD_BOUND)
    assert mass.sum().item() >= 1.0 - 1e-12
    far = box_gaussian_nll(torch.tensor(40.0), torch.tensor(0.0), torch.tensor(0.0))
    assert far.item() == pytest.approx(-math.log(LIKELIHOOD_BOUND), rel=1e-6)   # finite


def _model():
    torch.manual_seed(0)
    return KINDS["stage1"].build(load_config("digits", TINY))


def test_training_adds_unit_noise_and_evaluation_codes_rounded_symbols_exactly():
    model = _model()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    model.train()
    out = model(x)
    rate = 0.0
    for latent, (q_mean, _), (p_mean, p_logstd) in zip(out["latents"], out["posteriors"],
                                                      out["priors"]):
        assert ((latent - q_mean).abs() <= 0.5).all()               # U(-1/2, 1/2) noise
        assert not torch.equal(latent, torch.round(latent - p_mean) + p_mean)
        rate = rate + box_gaussian_nll(latent, p_mean, p_logstd).flatten(1).sum(1)
    assert torch.allclose(out["rate"], rate / model.dims_per_image)
    out["rate"].mean().backward()                        # the rate trains the posterior
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.decoder.blocks[0].posterior.parameters())
    model.eval()
    with torch.no_grad():
        first, again = model(x), model(x)
    code_length = 0.0
    for latent, (q_mean, _), (p_mean, p_logstd) in zip(first["latents"], first["posteriors"],
                                                      first["priors"]):
        symbols = latent - p_mean
        assert torch.allclose(symbols, torch.round(q_mean - p_mean), atol=1e-5)   # integers
        code_length = code_length + box_gaussian_nll(latent, p_mean, p_logstd).flatten(1).sum(1)
    assert torch.allclose(first["rate"], code_length / model.dims_per_image)
    assert torch.equal(first["rate"], again["rate"])                   # deterministic
    for one, two in zip(first["latents"], again["latents"]):
        assert torch.equal(one, two)


def test_prior_samples_are_prior_mean_plus_integers():
    model = _model().eval()
    with torch.no_grad():
        decoded = model.decoder.sample(3)
        images = model.sample(3)
    for latent, (p_mean, _) in zip(decoded["latents"], decoded["priors"]):
        assert torch.allclose(latent - p_mean, torch.round(latent - p_mean), atol=1e-5)
    assert images.shape == (3, 1, 16, 16) and np.isfinite(images.numpy()).all()


def test_a_quantized_stage_one_trains_evaluates_and_keeps_its_latents_kind(tmp_path, capsys):
    """Through the command line: summary.json's rate is the exact code length `evaluate`
    reports, and the run cannot be continued with Gaussian latents."""
    import json

    from progvae.__main__ import main

    out = tmp_path / "run"
    args = ["stage1", "--config=digits", "--width=8", "--zdim=4", "--enc_blocks=16d2,8d2,4d4,1x1",
            "--dec_blocks=1x1,4m1,8m4,16m8", "--steps=3", "--batch_size=8", "--log_every=1",
            "--n_grid=4", "--distortion_target=0.05", "--latents=quantized", "--quiet=True",
            f"--out={out}"]
    main(args)
    main(["evaluate", f"--run={out}", "--metrics=elbo,mse"])
    summary = json.loads((out / "summary.json").read_text())
    evaluated = json.loads((out / "eval.json").read_text())
    assert summary["rate"] == evaluated["rate"] and summary["mse"] == evaluated["mse"]
    assert sum(evaluated["group_rates"]) == pytest.approx(evaluated["rate"], rel=1e-6)
    with pytest.raises(SystemExit) as refused:
        main([*args[:-3], "--latents=gaussian", "--quiet=True", f"--out={out}"])
    assert refused.value.code == 2 and "latents" in capsys.readouterr().err
