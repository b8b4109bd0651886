"""Diagonal Gaussians as (mean, log standard deviation) pairs: sampling, the analytic KL and
the log density ratio."""

from __future__ import annotations

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
    """N(0, 1) noise of t's shape: this rank's slice of the global batch's noise if `shard`
    spans several processes, else a plain draw."""
    if shard is None or shard.world_size == 1:
        return torch.randn_like(t)
    batch = t.shape[0]
    noise = torch.randn((batch * shard.world_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
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
