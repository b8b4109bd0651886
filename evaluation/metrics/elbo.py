"""The importance-weighted bound of Burda et al. (2015) on a held-out split.

log (1/K) sum_k p(x, z_k) / q(z_k | x) with z_k ~ q(z | x) is >= the ELBO, equals it in
expectation at K = 1 and tightens with K. It needs log q - log p at the drawn latents, which
every kind with a likelihood computes from the posteriors and priors its model returns
(`RunKind.log_weight`). The single-sample ELBO, MSE and rates come from the one held-out
evaluator, `progvae.runs.heldout`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from progvae.core.units import bits_per_dim
from progvae.runs.heldout import split_means
from progvae.runs.kinds import RunKind


@torch.no_grad()
def importance_weighted_metrics(kind: RunKind, model: nn.Module, images: np.ndarray,
                                batch_size: int, seed: int, n_samples: int) -> dict:
    """{"iw_elbo", "iw_bpd", "iw_samples"} over every image of `images`; drawn under `seed`
    + 1, so asking for the bound leaves the single-sample numbers unchanged."""
    model.eval()
    device = next(model.parameters()).device
    means = split_means(
        lambda x: {"iw_elbo": importance_weighted_elbo(kind, model, x, n_samples)},
        images, batch_size, seed + 1, device)
    return {"iw_elbo": means["iw_elbo"], "iw_bpd": bits_per_dim(means["iw_elbo"]),
            "iw_samples": n_samples}


def importance_weighted_elbo(kind: RunKind, model: nn.Module, x: torch.Tensor,
                             n_samples: int) -> torch.Tensor:
    """The K-sample importance-weighted bound (Burda et al. 2015) per image, (B,) in nats per
    dimension: log mean_k exp(log p(x, z_k) - log q(z_k | x)), the log weights from the
    kind's `log_weight` (which scores the latents with the distributions the model returns)."""
    dims = x[0].numel()
    stacked = torch.stack([kind.log_weight(model, x) for _ in range(n_samples)], dim=1)  # (B, K)
    return ((torch.logsumexp(stacked, dim=1) - math.log(n_samples)) / dims).float()
