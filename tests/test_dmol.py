"""The DMoL head: a proper distribution over 256 levels, consistent loss, faithful sampling."""

import math

import pytest
import torch

from progvae.models.dmol import DmolHead, dmol_log_probs_all_levels, n_dmol_params

LEVELS = torch.arange(256) / 127.5 - 1


def random_params(batch, channels, k, height=3, width=3, seed=0):
    """Random mixtures, with extreme log-scales (-7, +5, below the clamp) and far-off means."""
    generator = torch.Generator().manual_seed(seed)
    params = torch.randn(batch, n_dmol_params(channels, k), height, width, generator=generator)
    logits, means, log_scales, coeffs = params.split(
        [k, channels * k, channels * k, params.shape[1] - k - 2 * channels * k], dim=1)
    means.mul_(3)  # many means far outside [-1, 1]
    means[:, 0].fill_(-40.0)
    means[:, 1].fill_(25.0)
    log_scales.mul_(3)
    log_scales[:, 0].fill_(-7.0)
    log_scales[:, 1].fill_(5.0)
    log_scales[:, 2].fill_(-30.0)  # clamped to -7
    coeffs.mul_(2)
    return params


def random_image(batch, channels, height=3, width=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (batch, channels, height, width), generator=generator)
    levels[0, :, 0, 0] = 0  # the edge bins
    levels[0, :, 0, 1] = 255
    return levels / 127.5 - 1


def to_level(image):
    return torch.round((image + 1) * 127.5).long()


@pytest.mark.parametrize("channels", [1, 3])
def test_pmf_sums_to_one_and_matches_the_loss(channels):
    k, head = 5, DmolHead(width=4, image_channels=channels, n_mixtures=5)
    params, x = random_params(2, channels, k), random_image(2, channels)
    log_pmf = dmol_log_probs_all_levels(params, channels, k, x=x)  # (B, C, 256, H, W)
    assert log_pmf.shape == (2, channels, 256, 3, 3)
    assert torch.isfinite(log_pmf).all()
    assert torch.allclose(log_pmf.exp().sum(2), torch.ones(2, channels, 3, 3), atol=1e-4)
    # The loss is -mean over dims of log p(x_c | x_<c) at the data.
    at_data = log_pmf.gather(2, to_level(x).unsqueeze(2)).squeeze(2)
    expected = -at_data.flatten(1).mean(1)
    assert torch.allclose(head.reconstruction_loss(params, x), expected, rtol=1e-5, atol=1e-5)


def test_all_mass_on_one_level_for_a_tiny_scale():
    k = 1
    params = torch.zeros(1, n_dmol_params(1, k), 1, 1)
    params[0, 1] = LEVELS[100]
    params[0, 2] = -7.0
    pmf = dmol_log_probs_all_levels(params, 1, k).exp()[0, 0, :, 0, 0]
    assert pmf.argmax() == 100 and pmf[100] > 0.97  # sigmoid(4.3) - sigmoid(-4.3)


def test_samples_follow_the_pmf_grayscale():
    torch.manual_seed(0)
    k = 3
    params = torch.zeros(1, n_dmol_params(1, k), 1, 1)
    params[0, :k, 0, 0] = torch.tensor([0.0, 1.0, -0.5])  # logits
    params[0, k:2 * k, 0, 0] = torch.tensor([-0.9, 0.2, 1.05])  # means
    params[0, 2 * k:, 0, 0] = torch.tensor([-3.0, -2.0, -4.0])  # log-scales
    head = DmolHead(width=1, image_channels=1, n_mixtures=k)
    samples = head.sample(params.expand(50_000, -1, -1, -1))
    assert samples.min() >= -1 and samples.max() <= 1
    assert torch.equal(samples, torch.round((samples + 1) * 127.5) / 127.5 - 1)  # on the grid
    empirical = torch.bincount(to_level(samples).flatten(), minlength=256).float() / 50_000
    pmf = dmol_log_probs_all_levels(params, 1, k).exp()[0, 0, :, 0, 0]
    assert 0.5 * (empirical - pmf).abs().sum() < 0.05


def test_rgb_samples_follow_the_likelihood():
    """Joint frequencies of (r, g, b) match exp(log p): the coupling uses the sampled levels."""
    torch.manual_seed(0)
    k, n = 2, 40_000
    params = torch.zeros(1, n_dmol_params(3, k), 1, 1)
    logits, means, log_scales, coeffs = params[0, :, 0, 0].split([k, 3 * k, 3 * k, 3 * k])
    logits.copy_(torch.tensor([0.3, -0.3]))
    means.copy_(torch.tensor([0.3, -0.5, 0.1, 0.6, -0.2, 0.5]))  # (C, K) channel-major
    log_scales.fill_(-6.5)  # a fifth of a bin: a few levels per channel
    coeffs.copy_(torch.tensor([1.0, -0.7, 0.5, 0.3, -1.2, 0.8]))
    head = DmolHead(width=1, image_channels=3, n_mixtures=k)
    samples = head.sample(params.expand(n, -1, -1, -1))  # (n, 3, 1, 1)
    outcomes, counts = torch.unique(samples.flatten(1), dim=0, return_counts=True)
    model = head.log_prob(params.expand(len(outcomes), -1, -1, -1),
                          outcomes.view(-1, 3, 1, 1)).exp().flatten()
    total_variation = 0.5 * ((counts / n - model).abs().sum() + (1 - model.sum()))
    # About 0.01 here; coupling to the unrounded lower channels instead would give about 0.19.
    assert total_variation < 0.03


def test_mean_matches_sample_mean_and_stays_in_range():
    torch.manual_seed(0)
    for channels in (1, 3):
        k = 2
        head = DmolHead(width=1, image_channels=channels, n_mixtures=k)
        params = torch.zeros(1, n_dmol_params(channels, k), 1, 1)
        params[0, :k] = torch.tensor([0.5, -0.5]).view(k, 1, 1)
        params[0, k:k + channels * k] = torch.linspace(-0.4, 0.3, channels * k).view(-1, 1, 1)
        params[0, k + channels * k:k + 2 * channels * k] = -4.0
        # coupling coefficients (RGB), a different one for each pair (atanh of 0.6, -0.4, 0.3)
        params[0, k + 2 * channels * k:] = torch.atanh(
            torch.tensor([0.6, 0.6, -0.4, -0.4, 0.3, 0.3])[:params.shape[1] - k - 2 * channels * k]
        ).view(-1, 1, 1)
        samples = head.sample(params.expand(20_000, -1, -1, -1))
        assert samples.shape == (20_000, channels, 1, 1)
        assert torch.allclose(head.mean(params)[0], samples.mean(0), atol=0.01)
    extreme = head.mean(random_params(2, 3, k))
    assert extreme.min() >= -1 and extreme.max() <= 1
    for channels in (1, 3):   # images, not parameters: (B, C, H, W) whatever H and W are
        head = DmolHead(width=1, image_channels=channels, n_mixtures=3)
        assert head.sample(random_params(2, channels, 3, height=3, width=5)).shape == \
            (2, channels, 3, 5)


def test_temperature_zero_is_deterministic_and_picks_the_top_component():
    head = DmolHead(width=1, image_channels=3, n_mixtures=3)
    params = random_params(2, 3, 3, seed=5)
    first, second = head.sample(params, temperature=0.0), head.sample(params, temperature=0.0)
    assert torch.equal(first, second)
    samples = head.sample(params, temperature=0.5)
    assert samples.min() >= -1 and samples.max() <= 1
    assert torch.equal(samples, torch.round((samples + 1) * 127.5) / 127.5 - 1)
    # grayscale, 3 components with means -0.5, 0.25, 0.75: at temperature 0 each pixel is the
    # mean of its most probable component, rounded to the grid
    gray = DmolHead(width=1, image_channels=1, n_mixtures=3)
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])       # top: component 1, then 0
    component_means = torch.tensor([-0.5, 0.25, 0.75])
    params = torch.zeros(2, 9, 1, 1)
    params[:, 0:3, 0, 0] = logits
    params[:, 3:6, 0, 0] = component_means
    params[:, 6:9, 0, 0] = -3.0
    picked = gray.sample(params, temperature=0.0)[:, 0, 0, 0]
    expected = torch.round((component_means[[1, 0]] + 1) * 127.5) / 127.5 - 1
    assert torch.equal(picked, expected)


def test_gradients_are_finite_for_extreme_parameters():
    head = DmolHead(width=4, image_channels=3, n_mixtures=4)
    params = random_params(2, 3, 4, seed=3)
    params[:, 4 + 12:4 + 24] *= 30  # log-scales from far below the clamp to e^+90
    params[:, 4:4 + 12] *= 50  # means hundreds of bins outside [-1, 1]
    params[:, :4] *= 50  # near one-hot weights
    params.requires_grad_(True)
    loss = head.reconstruction_loss(params, random_image(2, 3))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_forward_loss_shapes_and_autocast():
    head = DmolHead(width=8, image_channels=3)  # 10 mixtures: 100 parameters per pixel
    features, x = torch.randn(2, 8, 4, 4), random_image(2, 3, 4, 4)
    params = head(features)
    assert params.shape == (2, 100, 4, 4)
    loss = head.reconstruction_loss(params, x)
    assert loss.shape == (2,) and (loss > 0).all()
    # An untrained head predicts broad logistics: close to a uniform log(256) nats per dimension.
    assert loss.max() < math.log(256) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = head.reconstruction_loss(head(features), x)
    assert low_precision.dtype == torch.float32
    assert torch.allclose(low_precision, loss, rtol=0.05)


def test_log_scales_are_clamped_at_minus_seven():
    """A log-scale far below the clamp scores as -7 (not as itself, nor as -8)."""
    head = DmolHead(width=1, image_channels=1, n_mixtures=1)
    x = torch.full((1, 1, 1, 1), 0.2)

    def loss(log_scale: float) -> float:
        params = torch.tensor([0.0, 0.2, log_scale]).view(1, 3, 1, 1)
        return float(head.reconstruction_loss(params, x))

    assert loss(-30.0) == loss(-7.0)
    assert loss(-8.0) == loss(-7.0) and loss(-6.0) != loss(-7.0)
    assert DmolHead(width=1, image_channels=1, n_mixtures=1).min_log_scale == -7.0


def test_a_temperature_sharpens_the_choice_of_component():
    """Component k is drawn with probability softmax(logits / T)_k: at T = 0.5 and logits
    (0, 1), 88% for the second (61% at T = 2)."""
    torch.manual_seed(0)
    head = DmolHead(width=1, image_channels=1, n_mixtures=2)
    params = torch.tensor([0.0, 1.0, -0.5, 0.5, -7.0, -7.0]).view(1, 6, 1, 1)
    for temperature, expected in ((0.5, torch.softmax(torch.tensor([0.0, 2.0]), 0)[1]),
                                  (2.0, torch.softmax(torch.tensor([0.0, 0.5]), 0)[1])):
        samples = head.sample(params.expand(20_000, -1, -1, -1), temperature)
        second = float((samples > 0).float().mean())
        assert abs(second - float(expected)) < 0.015, (temperature, second)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3"):
        DmolHead(width=4, image_channels=2)
    head = DmolHead(width=4, image_channels=3, n_mixtures=2)
    with pytest.raises(ValueError, match=r"DMoL parameters must have shape \(B, 20, H, W\) for 3 "
                                         r"channel\(s\) and 2 mixtures, got \(1, 7, 2, 2\)"):
        head.reconstruction_loss(torch.zeros(1, 7, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        head.sample(torch.zeros(1, 20, 2, 2), temperature=-1.0)
    with pytest.raises(ValueError, match="image must have shape"):
        head.reconstruction_loss(torch.zeros(1, 20, 2, 2), torch.zeros(1, 1, 2, 2))


def test_bin_probabilities_match_a_float64_cdf_difference():
    """The stable float32 form equals the textbook CDF difference computed in float64."""
    from progvae.models.dmol import discretized_logistic_log_prob

    generator = torch.Generator().manual_seed(2)
    mean = (torch.randn(4000, generator=generator) * 0.7).double()
    log_scale = (torch.rand(4000, generator=generator) * 9 - 7).double()  # [-7, 2]
    x = LEVELS[torch.randint(0, 256, (4000,), generator=generator)].double()
    upper = torch.sigmoid((x - mean + 1 / 255) / log_scale.exp())
    lower = torch.sigmoid((x - mean - 1 / 255) / log_scale.exp())
    reference = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    ours = discretized_logistic_log_prob(x.float(), mean.float(), log_scale.float()).double()
    resolvable = reference > 1e-6  # where the float64 difference itself is accurate
    assert resolvable.sum() > 1000
    assert torch.allclose(ours[resolvable].exp(), reference[resolvable], rtol=1e-5, atol=0)


@pytest.mark.parametrize("mean, log_scale", [
    (-0.9, math.log(0.3)),    # much of the mass in the lowest bin: the old mean was 0.1 off
    (0.95, math.log(0.2)),
    (0.0, math.log(0.05)),
    (-1.3, -7.0),             # beyond the edge, a tiny scale: all mass on level 0
    (0.3, 2.0),               # nearly flat over [-1, 1]
])
def test_the_mean_is_the_exact_expectation_over_the_256_levels(mean, log_scale):
    """Grayscale with two components: the head's mean equals sum_v v P(v) from the pmf."""
    head = DmolHead(width=1, image_channels=1, n_mixtures=2)
    params = torch.tensor([0.4, -0.2, mean, mean / 2, log_scale, log_scale + 0.5]).view(1, 6, 1, 1)
    pmf = dmol_log_probs_all_levels(params, 1, 2).exp()[0, 0, :, 0, 0].double()
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    assert head.mean(params).item() == pytest.approx((pmf * levels).sum().item(), abs=2e-6)


def test_the_rgb_mean_is_exact_for_red_and_near_for_the_coupled_channels():
    """Means near and beyond the edges, trained-model scales (e^-5..e^-3), strong coupling."""
    head = DmolHead(width=1, image_channels=3, n_mixtures=2)
    params = random_params(1, 3, 2, height=4, width=4, seed=3)
    params[:, 2:8] = params[:, 2:8].clamp(-1.3, 1.3)      # component means
    params[:, 8:14] = params[:, 8:14].clamp(-5.0, -3.0)   # log-scales
    mean = head.mean(params)[0].double()
    red_pmf = dmol_log_probs_all_levels(params, 3, 2, x=torch.zeros(1, 3, 4, 4)).exp()[0, 0]
    levels = torch.arange(256, dtype=torch.float64).view(256, 1, 1) / 127.5 - 1
    assert torch.allclose(mean[0], (red_pmf.double() * levels).sum(0), atol=2e-6)
    torch.manual_seed(0)
    samples = head.sample(params.expand(100_000, -1, -1, -1)).double().mean(0)
    assert torch.allclose(mean, samples, atol=0.015)
