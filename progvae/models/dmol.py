"""The discretized mixture of logistics (DMoL) head: an exact likelihood over 256 pixel levels.

Each pixel is a mixture of K components that share one weight across channels (PixelCNN++,
Salimans et al. 2017, section 2.1-2.2; VDVAE, Child 2020, uses it as its output layer). Within a
component, each channel is a logistic distribution discretised to the 256 bins of width 2/255
centred on `v/127.5 - 1`; the lowest and highest bins also take all the mass below and above
them. For RGB the channel means are coupled autoregressively (PixelCNN++ eq. 3):

    mean_green = mu_green + c0 * x_red
    mean_blue  = mu_blue  + c1 * x_red + c2 * x_green,      c = tanh(raw coefficients)

where `x_red`, `x_green` are the true values when scoring an image and the sampled values when
drawing one, so `sample` draws exactly from the distribution that `reconstruction_loss` scores.

Parameter layout of `params` (B, P, H, W), P = K * (1 + 2C + C(C-1)/2):
`[logits (K) | means (C*K) | log-scales (C*K) | coupling coefficients (C(C-1)/2 * K)]`,
each block channel-major, i.e. viewed as (B, C, K, H, W).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from progvae.models.blocks import conv

N_LEVELS = 256
HALF_BIN = 1.0 / 255.0  # half the width of one bin on the [-1, 1] scale
EDGE = 0.999  # data below -EDGE is the lowest level, above +EDGE the highest
UNIFORM_EPS = 1e-6  # keeps logistic noise finite when sampling


class MixtureParams(NamedTuple):
    """A DMoL prediction split into its parts; K components, C channels."""

    logits: torch.Tensor  # (B, K, H, W) unnormalised component weights
    means: torch.Tensor  # (B, C, K, H, W) before channel coupling
    log_scales: torch.Tensor  # (B, C, K, H, W) clamped below at min_log_scale
    coeffs: torch.Tensor  # (B, C(C-1)/2, K, H, W) in (-1, 1); empty for grayscale


def n_dmol_params(image_channels: int, n_mixtures: int) -> int:
    """Channels the network must predict per pixel: K * (1 + 2C + C(C-1)/2)."""
    _check_channels(image_channels)
    n_coeffs = image_channels * (image_channels - 1) // 2
    return n_mixtures * (1 + 2 * image_channels + n_coeffs)


def split_params(params: torch.Tensor, image_channels: int, n_mixtures: int,
                 min_log_scale: float = -7.0) -> MixtureParams:
    """Split (B, P, H, W) into a `MixtureParams`, in float32 whatever the input dtype.

    The likelihood is computed in float32 even under autocast: bins of width 2/255 and
    scales down to e^-7 need more precision than bfloat16 or float16 hold.
    """
    expected = n_dmol_params(image_channels, n_mixtures)
    if params.dim() != 4 or params.shape[1] != expected:
        raise ValueError(
            f"DMoL parameters must have shape (B, {expected}, H, W) for {image_channels} "
            f"channel(s) and {n_mixtures} mixtures, got {tuple(params.shape)}.")
    params = params.float()
    batch, _, height, width = params.shape
    channels, k = image_channels, n_mixtures
    n_coeffs = channels * (channels - 1) // 2
    logits, means, log_scales, coeffs = params.split(
        [k, channels * k, channels * k, n_coeffs * k], dim=1)
    return MixtureParams(
        logits=logits,
        means=means.reshape(batch, channels, k, height, width),
        log_scales=log_scales.reshape(batch, channels, k, height, width).clamp(min=min_log_scale),
        coeffs=torch.tanh(coeffs.reshape(batch, n_coeffs, k, height, width)),
    )


def coupled_means(mixture: MixtureParams, conditioning: torch.Tensor) -> torch.Tensor:
    """Each component's channel means given the lower channels' values.

    conditioning: (B, C, H, W) values of the lower channels (the image itself when scoring).
    Returns (B, C, K, H, W). For grayscale the means are returned unchanged.
    """
    means = mixture.means
    if means.shape[1] == 1:
        return means
    red, green = conditioning[:, 0:1].float(), conditioning[:, 1:2].float()  # (B, 1, H, W)
    c = mixture.coeffs
    return torch.stack([
        means[:, 0],
        means[:, 1] + c[:, 0] * red,
        means[:, 2] + c[:, 1] * red + c[:, 2] * green,
    ], dim=1)


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor,
                                  log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin containing x) under a logistic(mean, e^log_scale) discretised to 256 levels.

    Broadcasts its arguments; x lies on the [-1, 1] grid. Interior bins use the identity
    sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - e^(b-a)), so that

        log P = log_sigmoid(a) + log_sigmoid(-b) + log(1 - e^-(a-b)),   a-b = (2/255) / scale,

    every term of which is finite and accurate in float32 for any mean and scale. This is the
    same quantity as PixelCNN++'s CDF difference, computed without its cancellation; it
    therefore needs no fallback to "pdf at the bin centre times the bin width" for tiny bins.
    The edge bins are log CDF(upper edge) and log(1 - CDF(lower edge)) (PixelCNN++ sec. 2.1).
    """
    inv_scale = torch.exp(-log_scale)
    centred = x - mean
    upper = inv_scale * (centred + HALF_BIN)
    lower = inv_scale * (centred - HALF_BIN)
    log_cdf_upper = -F.softplus(-upper)  # log sigmoid(upper)
    log_survival_lower = -F.softplus(lower)  # log (1 - sigmoid(lower))
    # log(1 - e^-d) for d = (2/255) / scale; for tiny d (scale above ~e^12) use log d - d/2,
    # feeding the unused branch a safe value so its gradient stays finite.
    d = 2 * HALF_BIN * inv_scale
    small = d < 1e-4
    log_one_minus_exp = torch.where(
        small,
        math.log(2 * HALF_BIN) - log_scale - d / 2,
        torch.log(-torch.expm1(-torch.where(small, torch.ones_like(d), d))))
    interior = log_cdf_upper + log_survival_lower + log_one_minus_exp
    return torch.where(x < -EDGE, log_cdf_upper,
                       torch.where(x > EDGE, log_survival_lower, interior))


def dmol_log_prob(params: torch.Tensor, x: torch.Tensor, image_channels: int, n_mixtures: int,
                  min_log_scale: float = -7.0) -> torch.Tensor:
    """Exact log-likelihood in nats of each pixel (all channels together): (B, H, W).

    log p(x) = logsumexp_k [ log w_k + sum_c log P_k(x_c | x_<c) ]  (PixelCNN++ eq. 2-3).
    """
    mixture = split_params(params, image_channels, n_mixtures, min_log_scale)
    _check_image(x, params, image_channels)
    x = x.float()
    means = coupled_means(mixture, x)  # (B, C, K, H, W)
    per_channel = discretized_logistic_log_prob(x.unsqueeze(2), means, mixture.log_scales)
    per_component = per_channel.sum(1) + F.log_softmax(mixture.logits, dim=1)  # (B, K, H, W)
    return torch.logsumexp(per_component, dim=1)


def dmol_log_probs_all_levels(params: torch.Tensor, image_channels: int, n_mixtures: int,
                              min_log_scale: float = -7.0,
                              x: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_c = level | x_<c) for every channel and all 256 levels: (B, C, 256, H, W).

    For RGB the lower channels are conditioned on their values in `x` (required then): both
    through the coupled means and through the component weights, which become the posterior
    weights given x_<c. Each channel's 256 values therefore sum to one, and summing the entries
    at x's own levels over channels gives `dmol_log_prob(params, x)`.
    Memory grows as B*C*K*256*H*W: meant for tests and small evaluations.
    """
    mixture = split_params(params, image_channels, n_mixtures, min_log_scale)
    if x is None:
        if image_channels != 1:
            raise ValueError("dmol_log_probs_all_levels needs the image x to condition the "
                             "green and blue channels on; pass x=...")
        x = torch.zeros_like(mixture.means[:, :, 0])
    _check_image(x, params, image_channels)
    x = x.float()
    means = coupled_means(mixture, x)  # (B, C, K, H, W)
    levels = torch.arange(N_LEVELS, device=params.device, dtype=torch.float32) / 127.5 - 1
    log_probs = discretized_logistic_log_prob(  # (B, C, K, 256, H, W)
        levels.view(1, 1, 1, N_LEVELS, 1, 1), means.unsqueeze(3),
        mixture.log_scales.unsqueeze(3))
    # Component weights for channel c: prior weights times the likelihood of the true x_<c.
    at_data = discretized_logistic_log_prob(x.unsqueeze(2), means, mixture.log_scales)
    lower_channels = torch.cumsum(at_data, dim=1) - at_data  # (B, C, K, H, W): sum over c' < c
    log_weights = F.log_softmax(F.log_softmax(mixture.logits, dim=1).unsqueeze(1)
                                + lower_channels, dim=2)
    return torch.logsumexp(log_weights.unsqueeze(3) + log_probs, dim=2)


def discretized_logistic_mean(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """E[x] under a logistic(mean, e^log_scale) discretised to the 256 levels, the edge bins
    taking the tails (as `discretized_logistic_log_prob`): with the 255 boundaries b_j between
    levels, spaced 2/255 apart, E[x] = 1 - (2/255) sum_j sigmoid((b_j - mean) / scale), since
    each boundary the value exceeds adds one level. Same shape as `mean`; float32."""
    mean, inv_scale = mean.float(), torch.exp(-log_scale.float())
    total = torch.zeros_like(mean)
    boundaries = (torch.arange(N_LEVELS - 1, device=mean.device, dtype=torch.float32)
                  * (2 * HALF_BIN) - 1 + HALF_BIN)
    for chunk in boundaries.split(16):   # bounded memory: 16 copies of the input at a time
        shifted = (chunk.view(-1, *([1] * mean.dim())) - mean) * inv_scale
        total += torch.sigmoid(shifted).sum(0)
    return 1.0 - 2 * HALF_BIN * total


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and round to the nearest of the 256 levels v/127.5 - 1."""
    return torch.round((image.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class DmolHead(nn.Module):
    """Discretized mixture of logistics over 256 levels (PixelCNN++, Salimans et al. 2017;
    the output layer of VDVAE, Child 2020, and of stage two in paper 003 A.4).

    A 1x1 convolution predicts the mixture; `reconstruction_loss` is the exact discrete
    negative log-likelihood in nats per dimension. Supports grayscale (C=1) and RGB (C=3).
    """

    def __init__(self, width: int, image_channels: int, n_mixtures: int = 10,
                 min_log_scale: float = -7.0):
        super().__init__()
        _check_channels(image_channels)
        self.image_channels = image_channels
        self.n_mixtures = n_mixtures
        self.min_log_scale = min_log_scale
        self.proj = conv(width, n_dmol_params(image_channels, n_mixtures), 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, width, H, W) -> (B, P, H, W)
        return self.proj(features)

    def split(self, params: torch.Tensor) -> MixtureParams:
        return split_params(params, self.image_channels, self.n_mixtures, self.min_log_scale)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Log-likelihood in nats of each pixel, all channels together: (B, H, W)."""
        return dmol_log_prob(params, x, self.image_channels, self.n_mixtures,
                             self.min_log_scale)

    def log_probs_all_levels(self, params: torch.Tensor,
                             x: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_c = level | x_<c) for all 256 levels: (B, C, 256, H, W)."""
        return dmol_log_probs_all_levels(params, self.image_channels, self.n_mixtures,
                                         self.min_log_scale, x)

    def reconstruction_loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x) in nats per dimension (divided by C*H*W) of each image: (B,)."""
        log_prob = self.log_prob(params, x)  # (B, H, W)
        return -log_prob.flatten(1).sum(1) / (self.image_channels * log_prob[0].numel())

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Expected image under the mixture, on the 256-level grid's range [-1, 1]: (B, C, H, W).

        Each component's channel expectation is that of the discretised logistic, edge bins
        included (`discretized_logistic_mean`), so it is exact for grayscale and for red. Green
        and blue are coupled to the lower channels' expected values within the component (the
        coupling is linear; what is left out is only the discretisation's curvature over the
        lower channel's spread, at most about one bin).
        """
        mixture = self.split(params)
        means, scales = mixture.means, mixture.log_scales
        if self.image_channels == 3:
            c = mixture.coeffs
            red = discretized_logistic_mean(means[:, 0], scales[:, 0])
            green = discretized_logistic_mean(means[:, 1] + c[:, 0] * red, scales[:, 1])
            blue = discretized_logistic_mean(means[:, 2] + c[:, 1] * red + c[:, 2] * green,
                                             scales[:, 2])
            expected = torch.stack([red, green, blue], dim=1)
        else:
            expected = discretized_logistic_mean(means, scales)
        weights = torch.softmax(mixture.logits, dim=1).unsqueeze(1)  # (B, 1, K, H, W)
        return (weights * expected).sum(2)

    @torch.no_grad()
    def sample(self, params: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Draw an image on the 256-level grid: (B, C, H, W).

        Picks a component per pixel by Gumbel-max on logits / temperature, draws logistic noise
        scaled by temperature, and couples green and blue to the already *quantized* lower
        channels, so that at temperature 1 the draw follows exactly the distribution scored by
        `reconstruction_loss`. Temperature 0 is deterministic: the most probable component's
        (coupled) mean, rounded to the grid.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        mixture = self.split(params)
        batch, channels, k, height, width = mixture.means.shape
        if temperature == 0:
            component = mixture.logits.argmax(1)  # (B, H, W)
        else:
            u = torch.rand_like(mixture.logits).clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
            gumbel = -torch.log(-torch.log(u))
            component = (mixture.logits / temperature + gumbel).argmax(1)

        def pick(tensor: torch.Tensor) -> torch.Tensor:  # (B, n, K, H, W) -> (B, n, H, W)
            index = component[:, None, None].expand(-1, tensor.shape[1], 1, -1, -1)
            return tensor.gather(2, index).squeeze(2)

        means, log_scales = pick(mixture.means), pick(mixture.log_scales)
        u = torch.rand_like(means).clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
        logistic_noise = torch.log(u) - torch.log1p(-u)
        draws = means + torch.exp(log_scales) * temperature * logistic_noise  # before coupling
        if channels == 1:
            return quantize(draws)
        c = pick(mixture.coeffs)
        red = quantize(draws[:, 0])
        green = quantize(draws[:, 1] + c[:, 0] * red)
        blue = quantize(draws[:, 2] + c[:, 1] * red + c[:, 2] * green)
        return torch.stack([red, green, blue], dim=1)


def _check_channels(image_channels: int) -> None:
    if image_channels not in (1, 3):
        raise ValueError(f"The DMoL head supports 1 (grayscale) or 3 (RGB) image channels, "
                         f"got {image_channels}.")


def _check_image(x: torch.Tensor, params: torch.Tensor, image_channels: int) -> None:
    expected = (params.shape[0], image_channels, *params.shape[2:])
    if tuple(x.shape) != expected:
        raise ValueError(f"The image must have shape {expected} to match the DMoL parameters, "
                         f"got {tuple(x.shape)}.")
