"""Diagonal Gaussians as (mean, log standard deviation) pairs: sampling, the analytic KL and
the log density ratio; and the quantised latents of a codec (Balle et al. 2018; Duan et al.
2023): uniform noise for training and the Gaussian integrated over a unit box, whose negative
log is a symbol's code length."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseShard:
    """Which slice of the *global* batch's noise this process draws (rank r of N).

    Under torchrun every rank holds the same RNG state; each reparameterisation then draws the
    noise of the whole global batch (all ranks' local batches stacked in rank order) and keeps
    this rank's slice, so a run's trajectory does not depend on how its global batch is split
    over processes: N processes with batch B follow one process with batch N*B (up to float
    rounding). It costs N times the (cheap) noise generation. The shard travels as an explicit
    argument, so a block recomputed by activation checkpointing (on whatever thread autograd
    runs it) draws the same slice again.
    """

    rank: int
    world_size: int


def standard_normal_like(t: torch.Tensor, shard: NoiseShard | None = None) -> torch.Tensor:
    """N(0, 1) noise of t's shape and memory layout: this rank's slice of the global batch's
    noise if `shard` spans several processes, else a plain draw."""
    return _noise_like(t, shard, torch.randn)


def _noise_like(t: torch.Tensor, shard: NoiseShard | None, draw) -> torch.Tensor:
    """`draw(shape)` noise for t, drawn into contiguous memory of t's layout (the CPU's fast
    generators need contiguous memory: drawing straight into a channels-last tensor takes a
    scalar path about ten times slower). A contiguous t gets exactly `draw(t.shape)`."""
    world = 1 if shard is None else shard.world_size
    batch = t.shape[0]
    shape = (batch * world, *t.shape[1:])
    options = {"dtype": t.dtype, "device": t.device}
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        n, c, h, w = shape
        noise = draw((n, h, w, c), **options).permute(0, 3, 1, 2)
    else:
        noise = draw(shape, **options)
    if world == 1:
        return noise
    return noise[shard.rank * batch:(shard.rank + 1) * batch]


def gaussian_log_ratio(z: torch.Tensor, q_mean: torch.Tensor, q_logstd: torch.Tensor,
                       p_mean: torch.Tensor, p_logstd: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; q) - log N(z; p) in nats (the -log(2 pi)/2 terms cancel); its
    expectation under z ~ q is KL(q || p)."""
    return (-0.5 * ((z - q_mean) * torch.exp(-q_logstd)) ** 2 - q_logstd
            + 0.5 * ((z - p_mean) * torch.exp(-p_logstd)) ** 2 + p_logstd)


def gaussian_kl(q_mean: torch.Tensor, q_logstd: torch.Tensor,
                p_mean: torch.Tensor, p_logstd: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(q_mean, q_std^2) || N(p_mean, p_std^2)) in nats.

    KL = log(p_std / q_std) + (q_std^2 + (q_mean - p_mean)^2) / (2 p_std^2) - 1/2.
    """
    return (p_logstd - q_logstd
            + 0.5 * (torch.exp(2 * q_logstd) + (q_mean - p_mean) ** 2) * torch.exp(-2 * p_logstd)
            - 0.5)


def gaussian_sample(mean: torch.Tensor, logstd: torch.Tensor, temperature: float = 1.0,
                    shard: NoiseShard | None = None) -> torch.Tensor:
    """Reparameterised sample mean + temperature * std * eps; temperature 0 gives the mean."""
    if temperature == 0:
        return mean
    return mean + temperature * torch.exp(logstd) * standard_normal_like(mean, shard)


def gaussian_sample_with_kl(q_mean: torch.Tensor, q_logstd: torch.Tensor,
                            p_mean: torch.Tensor, p_logstd: torch.Tensor,
                            shard: NoiseShard | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterised draw z = q_mean + q_std * eps and the elementwise KL(q || p) in nats
    (`gaussian_sample` and `gaussian_kl`, same values to float rounding) as one autograd node
    with its derivatives written out: the draw and the KL share their intermediate maps, and
    the backward pass is a few elementwise operations instead of one or two per operation of
    the forward pass. Inputs of mixed precision (autocast) take the two functions apart, the KL
    in float32."""
    dtypes = {t.dtype for t in (q_mean, q_logstd, p_mean, p_logstd)}
    if dtypes not in ({torch.float32}, {torch.float64}):
        return gaussian_sample(q_mean, q_logstd, shard=shard), gaussian_kl(
            q_mean.float(), q_logstd.float(), p_mean.float(), p_logstd.float())
    return _SampleWithKl.apply(q_mean, q_logstd, p_mean, p_logstd,
                               standard_normal_like(q_mean, shard))


class _SampleWithKl(torch.autograd.Function):
    """z = m_q + s_q eps and KL = log s_p - log s_q + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2,
    so with r = s_q^2 / s_p^2 and d = (m_q - m_p) / s_p^2:
    dz/dm_q = 1, dz/dlog s_q = s_q eps; dKL/dm_q = d = -dKL/dm_p;
    dKL/dlog s_q = r - 1; dKL/dlog s_p = 1 - r - (m_q - m_p) d."""

    @staticmethod
    def forward(ctx, q_mean, q_logstd, p_mean, p_logstd, noise):
        q_std = torch.exp(q_logstd)
        spread = q_std * noise                       # dz / dlog s_q
        latent = q_mean + spread
        p_precision = torch.exp(p_logstd * -2.0)     # 1 / s_p^2
        difference = q_mean - p_mean
        ratio = q_std * q_std * p_precision          # r
        scaled = difference * p_precision            # d
        kl = (p_logstd - q_logstd).add_(ratio + difference * scaled, alpha=0.5).sub_(0.5)
        ctx.save_for_backward(spread, ratio, difference, scaled)
        return latent, kl

    @staticmethod
    def backward(ctx, grad_latent, grad_kl):
        spread, ratio, difference, scaled = ctx.saved_tensors
        if grad_latent is None:
            grad_latent = torch.zeros_like(spread)
        if grad_kl is None:
            grad_kl = torch.zeros_like(spread)
        grad_kl_mean = grad_kl * scaled
        grad_q_mean = grad_latent + grad_kl_mean
        grad_q_logstd = torch.addcmul(grad_latent * spread, grad_kl, ratio - 1.0)
        grad_p_logstd = grad_kl * (1.0 - ratio - difference * scaled)
        return grad_q_mean, grad_q_logstd, -grad_kl_mean, grad_p_logstd, None


def precision_weighted_merge(encoder_mean: torch.Tensor, encoder_logstd: torch.Tensor,
                             prior_mean: torch.Tensor, prior_logstd: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior as the product of the encoder's Gaussian and the prior (Sonderby et al. 2016,
    the LVAE merge used by paper 002 A.1): precisions add, means are precision-weighted."""
    encoder_precision = torch.exp(-2 * encoder_logstd)
    prior_precision = torch.exp(-2 * prior_logstd)
    precision = encoder_precision + prior_precision
    mean = (encoder_mean * encoder_precision + prior_mean * prior_precision) / precision
    return mean, -0.5 * torch.log(precision)


LIKELIHOOD_BOUND = 1e-9   # the smallest probability a symbol is given (its code length ~20.7 nats)


def uniform_noise_like(t: torch.Tensor, shard: NoiseShard | None = None) -> torch.Tensor:
    """U(-1/2, 1/2) noise of t's shape, sharded over processes as `standard_normal_like`."""
    return _noise_like(t, shard, torch.rand) - 0.5


def quantized_latent(posterior_mean: torch.Tensor, prior_mean: torch.Tensor) -> torch.Tensor:
    """The coded latent: prior mean + round(posterior mean - prior mean) (Duan et al. 2023,
    eq. 9), so the symbol, an integer, is what the entropy coder writes."""
    return prior_mean + torch.round(posterior_mean - prior_mean)


def box_gaussian_nll(z: torch.Tensor, mean: torch.Tensor, logstd: torch.Tensor) -> torch.Tensor:
    """Elementwise -log P(z) in nats, P(z) the mass of N(mean, std^2) on [z - 1/2, z + 1/2] (the
    Gaussian convolved with a unit box, Balle et al. 2018): at z = mean + an integer it is the
    code length of that symbol, at z = posterior mean + U(-1/2, 1/2) the rate term of training.

    Computed on the lower tail by symmetry, as log Phi(upper) + log(1 - Phi(lower) / Phi(upper))
    with log Phi from `log_ndtr`, so a symbol 40 standard deviations out still has a finite,
    accurate length; P is bounded below by LIKELIHOOD_BOUND."""
    distance = torch.abs(z - mean)
    inverse_std = torch.exp(-logstd)
    upper = torch.special.log_ndtr((0.5 - distance) * inverse_std)
    lower = torch.special.log_ndtr((-0.5 - distance) * inverse_std)
    gap = lower - upper   # <= 0
    log_one_minus = torch.where(gap > -math.log(2.0), torch.log(-torch.expm1(gap)),
                                torch.log1p(-torch.exp(gap)))
    return -torch.clamp(upper + log_one_minus, min=math.log(LIKELIHOOD_BOUND))
