"""Diagonal Gaussians as (mean, log standard deviation) pairs, with the analytic KL."""

from __future__ import annotations

import torch


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
    return mean + temperature * torch.exp(logstd) * torch.randn_like(mean)


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
