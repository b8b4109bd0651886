"""The VDVAE core: KL, block strings, shapes of every preset, decoding from given latents."""

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F

from progvae.core.config import load_config
from progvae.core.errors import UserError
from progvae.models import activations
from progvae.models.activations import gelu
from progvae.models.blocks import BlockSpec, parse_block_string
from progvae.models.distributions import (NoiseShard, gaussian_kl, gaussian_log_ratio,
                                          gaussian_sample, gaussian_sample_with_kl,
                                          precision_weighted_merge, standard_normal_like)
from progvae.models.vdvae import VDVAE


def test_gaussian_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q_mean, q_logstd = torch.tensor([0.3, -1.0]), torch.tensor([-0.5, 0.2])
    p_mean, p_logstd = torch.tensor([0.0, 0.5]), torch.tensor([0.1, -0.3])
    z = q_mean + q_logstd.exp() * torch.randn(400_000, 2)
    q = torch.distributions.Normal(q_mean, q_logstd.exp())
    p = torch.distributions.Normal(p_mean, p_logstd.exp())
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    analytic = gaussian_kl(q_mean, q_logstd, p_mean, p_logstd)
    assert torch.allclose(analytic, monte_carlo, atol=0.01)
    assert torch.allclose(gaussian_kl(q_mean, q_logstd, q_mean, q_logstd), torch.zeros(2))


def test_precision_weighted_merge_is_the_product_of_gaussians():
    mean, logstd = precision_weighted_merge(torch.tensor(1.0), torch.tensor(0.0),
                                            torch.tensor(3.0), torch.tensor(0.0))
    assert mean.item() == pytest.approx(2.0)
    assert logstd.exp().item() ** 2 == pytest.approx(0.5)
    # unequal widths: N(1, 0.5^2) x N(3, 2^2) has precision 4 + 0.25 and mean (4 + 0.75) / 4.25
    mean, logstd = precision_weighted_merge(torch.tensor(1.0), torch.tensor(0.5).log(),
                                            torch.tensor(3.0), torch.tensor(2.0).log())
    assert mean.item() == pytest.approx(4.75 / 4.25)
    assert logstd.exp().item() ** 2 == pytest.approx(1 / 4.25)


def test_log_ratio_is_the_difference_of_normal_log_densities():
    generator = torch.Generator().manual_seed(3)
    z, q_mean, p_mean = torch.randn(3, 50, generator=generator)
    q_logstd, p_logstd = torch.randn(2, 50, generator=generator) * 0.7
    expected = (torch.distributions.Normal(q_mean, q_logstd.exp()).log_prob(z)
                - torch.distributions.Normal(p_mean, p_logstd.exp()).log_prob(z))
    assert torch.allclose(gaussian_log_ratio(z, q_mean, q_logstd, p_mean, p_logstd), expected,
                          atol=1e-5)


@pytest.mark.parametrize("rank, world_size", [(0, 3), (1, 3), (2, 3), (1, 2)])
def test_a_noise_shard_is_this_ranks_slice_of_the_global_batchs_noise(rank, world_size):
    """Rank r of N draws rows r*B .. (r+1)*B of the noise one process would draw for the
    global batch N*B, so N processes follow one."""
    t = torch.empty(4, 3, 2, 2)
    torch.manual_seed(7)
    global_noise = torch.randn(4 * world_size, 3, 2, 2)
    torch.manual_seed(7)
    shard = standard_normal_like(t, NoiseShard(rank=rank, world_size=world_size))
    assert torch.equal(shard, global_noise[4 * rank:4 * (rank + 1)])
    torch.manual_seed(7)
    alone = standard_normal_like(t, NoiseShard(rank=0, world_size=1))
    torch.manual_seed(7)
    assert torch.equal(alone, torch.randn(4, 3, 2, 2))
    torch.manual_seed(7)
    plain = standard_normal_like(t)
    torch.manual_seed(7)
    assert torch.equal(plain, torch.randn(4, 3, 2, 2))


def test_a_reparameterised_sample_is_mean_plus_temperature_times_std_times_noise():
    mean, logstd = torch.full((5,), 0.5), torch.full((5,), -1.0)
    torch.manual_seed(2)
    drawn = gaussian_sample(mean, logstd, temperature=0.7)
    torch.manual_seed(2)
    assert torch.allclose(drawn, mean + 0.7 * logstd.exp() * torch.randn(5))
    assert torch.equal(gaussian_sample(mean, logstd, temperature=0.0), mean)
    torch.manual_seed(2)
    drawn = gaussian_sample(mean, logstd)               # the posterior's draw: temperature 1
    torch.manual_seed(2)
    assert torch.allclose(drawn, mean + logstd.exp() * torch.randn(5))


def test_the_fused_draw_and_kl_equal_the_two_functions_in_value_and_gradient():
    """The decoder draws z ~ q and takes KL(q || p) in one autograd node with a written-out
    backward; it must be gaussian_sample and gaussian_kl to float rounding, gradients too."""
    torch.manual_seed(3)
    inputs = [torch.randn(2, 4, 3, 3, dtype=torch.float64) for _ in range(4)]
    fused_inputs = [t.clone().requires_grad_() for t in inputs]
    plain_inputs = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(4)
    latent, kl = gaussian_sample_with_kl(*fused_inputs)
    torch.manual_seed(4)
    plain_latent = gaussian_sample(*plain_inputs[:2])
    plain_kl = gaussian_kl(*plain_inputs)
    assert torch.allclose(latent, plain_latent, atol=1e-12)
    assert torch.allclose(kl, plain_kl, atol=1e-12)
    upstream_latent, upstream_kl = torch.randn_like(latent), torch.randn_like(kl)
    fused = torch.autograd.grad((latent * upstream_latent).sum() + (kl * upstream_kl).sum(),
                                fused_inputs)
    plain = torch.autograd.grad((plain_latent * upstream_latent).sum()
                                + (plain_kl * upstream_kl).sum(), plain_inputs)
    for got, want in zip(fused, plain):
        assert torch.allclose(got, want, atol=1e-12)
    # Only the KL's gradient (the latent unused) and only the latent's.
    latent, kl = gaussian_sample_with_kl(*fused_inputs)
    assert torch.allclose(torch.autograd.grad(kl.sum(), fused_inputs[1])[0],
                          torch.autograd.grad(gaussian_kl(*plain_inputs).sum(),
                                              plain_inputs[1])[0], atol=1e-12)
    # Reduced precision (autocast) takes the two functions, the KL still in float32.
    halves = [t.to(torch.bfloat16) for t in inputs[:2]] + inputs[2:]
    latent, kl = gaussian_sample_with_kl(*[t.float() if i > 1 else t
                                           for i, t in enumerate(halves)])
    assert latent.dtype == torch.bfloat16 and kl.dtype == torch.float32


@pytest.mark.skipif(shutil.which("c++") is None, reason="the CPU GELU operator needs a compiler")
def test_the_cpu_gelu_equals_torchs_in_value_and_gradient():
    """Training on the CPU runs every block's GELU through progvae's compiled operator, which
    saves GELU'(x) in the forward pass. It must be torch's GELU to float rounding, value and
    gradient, across the tails, in either memory format, and keep NaN a NaN (skipped steps)."""
    assert activations.fused_gelu() is not None, "the operator did not build on this machine"
    torch.manual_seed(5)
    cases = [torch.randn(4, 24, 8, 8).contiguous(memory_format=torch.channels_last) * 3,
             torch.linspace(-30, 30, 40_001),                # the tails and every branch
             torch.randn(6, 5, 4, 9)[:, :, :, ::2] * 2]      # not dense: copied first
    for x in cases:
        fused_input = x.clone().requires_grad_()
        plain_input = x.clone().requires_grad_()
        fused, plain = gelu(fused_input), F.gelu(plain_input)
        assert "Gelu>" in fused.grad_fn.name()              # the operator, not torch's
        assert fused.stride() == plain.stride()
        assert torch.allclose(fused, plain, rtol=2e-6, atol=1e-6)
        upstream = torch.randn_like(plain)
        fused.backward(upstream)
        plain.backward(upstream)
        assert torch.allclose(fused_input.grad, plain_input.grad, rtol=2e-6, atol=1e-6)
    nan = gelu(torch.tensor([float("nan"), 1.0], requires_grad=True))
    assert nan[0].isnan() and not nan[1].isnan()
    # Without a gradient (evaluation, sampling) and in other dtypes it is torch's own GELU.
    x = torch.randn(100)
    assert torch.equal(gelu(x), F.gelu(x))
    with torch.no_grad():
        assert torch.equal(gelu(x.requires_grad_()), F.gelu(x))
    assert torch.equal(gelu(x.double()), F.gelu(x.double()))


@pytest.fixture
def fresh_gelu_build():
    """The operator's once-per-process build forgotten, before the test and after it."""
    activations.fused_gelu.cache_clear()
    yield
    activations.fused_gelu.cache_clear()


def test_the_cpu_gelu_falls_back_to_torchs_when_it_cannot_build_or_is_switched_off(
        monkeypatch, fresh_gelu_build):
    def no_compiler():
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(activations, "_load", no_compiler)
    x = torch.randn(50, requires_grad=True)
    with pytest.warns(UserWarning, match="could not compile its CPU GELU operator"):
        y = gelu(x)
    assert torch.equal(y, F.gelu(x)) and y.grad_fn.name() == "GeluBackward0"
    activations.fused_gelu.cache_clear()
    monkeypatch.setenv("PROGVAE_FUSED_GELU", "0")
    assert activations.fused_gelu() is None


def test_block_string_parsing():
    assert parse_block_string("32x2,32d2,4m1,1") == [
        BlockSpec(32), BlockSpec(32), BlockSpec(32, down_rate=2), BlockSpec(4, mixin=1),
        BlockSpec(1)]
    svhn = load_config("svhn")
    decoder = parse_block_string(svhn.dec_blocks)
    assert len(decoder) == 1 + 1 + 2 + 1 + 5 + 1 + 10 + 1 + 21
    with pytest.raises(UserError, match="32y3"):
        parse_block_string("32y3")


def _model(preset: str, **overrides) -> tuple[VDVAE, object]:
    config = load_config(preset, overrides)
    channels = 1 if config.data == "digits" else 3
    config = dataclasses.replace(config, image_channels=channels)
    torch.manual_seed(0)
    return VDVAE(config), config


@pytest.mark.parametrize("preset", ["digits", "tiny", "svhn", "celeba64", "lsun64"])
def test_every_preset_builds_with_the_right_shapes(preset):
    model, config = _model(preset)
    assert model.n_groups == len(parse_block_string(config.dec_blocks))
    if preset in ("celeba64", "lsun64"):   # built, not run: too big for a quick CPU test
        assert model.decoder.group_resolutions[-1] == 64
        return
    x = torch.rand(2, config.image_channels, config.image_size, config.image_size) * 2 - 1
    with torch.no_grad():
        out = model(x)
    assert out["output"].shape == x.shape
    assert out["rate"].shape == (2,) and bool((out["rate"] >= 0).all())
    assert len(out["kl"]) == len(out["latents"]) == model.n_groups
    assert model.sample(3).shape == (3, *x.shape[1:])


def test_priors_start_at_standard_normal():
    """Zero-initialised prior outputs: at init every p(z_i) is N(0, I)."""
    model, config = _model("digits")
    decoded = model.decoder.sample(2, temperature=0.0)
    assert all(bool((latent == 0).all()) for latent in decoded["latents"])


def test_decoding_all_given_latents_reproduces_the_inference_pass():
    model, config = _model("digits")
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x)
        decoded = model.decode(out["latents"])
    assert torch.allclose(decoded, out["output"], atol=1e-5)


def test_decoding_from_the_first_k_latents():
    model, config = _model("digits")
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    k = 3
    with torch.no_grad():
        latents = model(x)["latents"][:k]
        result = model.decoder.decode_latents(latents, temperature=0.0)
        again = model.decoder.decode_latents(latents, temperature=0.0)
        sampled = model.decoder.decode_latents(latents, temperature=1.0)
    for given, used in zip(latents, result["latents"][:k]):
        assert torch.equal(given, used)
    assert len(result["latents"]) == model.n_groups
    assert torch.equal(result["features"], again["features"])       # prior means: deterministic
    assert not torch.equal(result["features"], sampled["features"])  # the rest are sampled


def test_precision_weighted_merge_option_builds_and_runs():
    model, _ = _model("digits", precision_weighted_merge=True)
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 16, 16))
    assert torch.isfinite(out["rate"]).all()


def test_mismatched_block_strings_are_rejected():
    with pytest.raises(UserError, match="image size"):
        _model("digits", image_size=32)


@pytest.mark.parametrize("masked", ["sample", "mean"])
def test_the_masked_coder_draws_or_fixes_the_groups_after_k(masked):
    from progvae.models.masked_coder import MaskedCoder
    config = load_config("digits", {"width": 8, "zdim": 4, "enc_blocks": "16d2,8d2,4d4,1x1",
                                    "dec_blocks": "1x1,4m1,8m4,16m8", "image_channels": 1,
                                    "latent_groups": 1, "masked": masked})
    torch.manual_seed(0)
    coder = MaskedCoder.from_config(config).eval()
    with torch.no_grad():   # priors that depend on the stream, so a sample differs from the mean
        for block in coder.decoder.blocks:
            last = [m for m in block.prior.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            last.bias.normal_(0, 0.5)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    latents = coder.inference(x)["latents"][:1]
    first = coder.decoder.decode_latents(latents, coder.masked_temperature)["features"]
    second = coder.decoder.decode_latents(latents, coder.masked_temperature)["features"]
    assert torch.equal(first, second) == (masked == "mean")


def test_the_paper_samples_the_masked_groups_by_default():
    assert load_config("digits", {}).masked == "sample"


def test_every_convolution_bias_starts_at_zero_as_in_vdvae():
    config = load_config("digits", {"image_channels": 1})
    for head in ("linear", "dmol"):
        model = VDVAE(config, head=head)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) > 20
        assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
        assert any(torch.count_nonzero(m.weight) > 0 for m in convs)


def test_each_posterior_and_prior_is_vdvaes_blocks_on_the_concatenation_and_the_stream():
    """The decoder never builds [stream, encoder activation]; what it computes instead is still
    VDVAE's q(z_i | .) = posterior block on the concatenation and p(z_i | .) = prior block on
    the stream, at every group (the blocks run as plain modules on the streams they got)."""
    model, config = _model("tiny")
    model.eval()
    streams = []
    for block in model.decoder.blocks:
        block.register_forward_pre_hook(lambda module, args: streams.append(args[0]))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # untrained priors are N(0, I) and the last convolutions start at zero: randomise them
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
        activations = model.encoder(x)
        decoded = model.decoder(activations)
        for block, stream, (q_mean, q_logstd), (p_mean, p_logstd) in zip(
                model.decoder.blocks, streams, decoded["posteriors"], decoded["priors"]):
            joined = torch.cat([stream, activations[block.resolution]], dim=1)
            mean, logstd = block.posterior(joined).chunk(2, dim=1)
            prior_mean, prior_logstd, _ = block.prior(stream).split(
                [block.zdim, block.zdim, block.width], dim=1)
            for got, want in ((q_mean, mean), (q_logstd, logstd), (p_mean, prior_mean),
                              (p_logstd, prior_logstd)):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
