"""The units every part shares (DESIGN: conventions): PSNR of an MSE per dimension on the
[-1, 1] scale, and bits per dimension of an ELBO in nats per dimension."""

from __future__ import annotations

import math


def psnr(distortion: float) -> float:
    """PSNR in dB of an MSE per dimension on the [-1, 1] scale (peak-to-peak 2): 10 log10(4/D)."""
    return 10 * math.log10(4.0 / distortion) if distortion > 0 else float("inf")


def bits_per_dim(nats_per_dim: float) -> float:
    """Bits per dimension of a (negative) ELBO in nats per dimension: -ELBO / ln 2."""
    return -nats_per_dim / math.log(2)
