"""Diagonal Gaussians as (mean, log standard deviation) pairs, with the analytic KL."""

from __future__ import annotations

import contextlib
import contextvars

import torch

# (rank, world size) while a training step runs under torchrun; see `global_batch_noise`.
_NOISE_SHARD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "noise_shard", default=None)


@contextlib.contextmanager
def global_batch_noise(rank: int, world_size: int):
    """Within this block, every reparameterisation draws the noise of the *global* batch (all
    ranks' local batches stacked in rank order) from the shared RNG stream and keeps this rank's
    slice. Every rank holds the same RNG state, so a run's trajectory does not depend on how
    its global batch is split over processes: N processes with batch B follow one process with
    batch N*B (up to float rounding). Costs N times the (cheap) noise generation."""
    token = _NOISE_SHARD.set((rank, world_size))
    try:
        yield
    finally:
        _NOISE_SHARD.reset(token)


def standard_normal_like(t: torch.Tensor) -> torch.Tensor:
    shard = _NOISE_SHARD.get()
    if shard is None or shard[1] == 1:
        return torch.randn_like(t)
    rank, world_size = shard
    batch = t.shape[0]
    noise = torch.randn((batch * world_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return noise[rank * batch:(rank + 1) * batch]


def gaussian_kl(q_mean: torch.Tensor, q_logstd: torch.Tensor,
                p_mean: torch.Tensor, p_logstd: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(q_mean, q_std^2) || N(p_mean, p_std^2)) in nats.

    KL = log(p_std / q_std) + (q_std^2 + (q_mean - p_mean)^2) / (2 p_std^2) - 1/2.
    """
    return (p_logstd - q_logstd
            + 0.5 * (torch.exp(2 * q_logstd) + (q_mean - p_mean) ** 2) * torch.exp(-2 * p_logstd)
            - 0.5)


def gaussian_sample(mean: torch.Tensor, logstd: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Reparameterised sample mean + temperature * std * eps; temperature 0 gives the mean."""
    if temperature == 0:
        return mean
    return mean + temperature * torch.exp(logstd) * standard_normal_like(mean)


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
