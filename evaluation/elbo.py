"""The importance-weighted bound of Burda et al. (2015) on a held-out split.

log (1/K) sum_k p(x, z_k) / q(z_k | x) with z_k ~ q(z | x) is >= the ELBO, equals it in
expectation at K = 1 and tightens with K. It needs log q - log p at the drawn latents, which the
model only returns as analytic KLs, so `LatentLogRatio` reads each decoder block's prior and
posterior as it runs. The single-sample ELBO, MSE and rates come from the one held-out
evaluator, `progvae.heldout`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from progvae.distributions import precision_weighted_merge
from progvae.heldout import bits_per_dim, split_means
from progvae.kinds import RunKind
from progvae.vdvae import DecoderBlock


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


class LatentLogRatio:
    """While active, sums log q(z_i | .) - log p(z_i | .) at every latent group z_i that a
    VDVAE decoder inside `model` draws from its posterior: `total` is (B,) in nats.

    Forward hooks read each block's prior and posterior outputs (and apply the
    precision-weighted merge where the model uses it), so the model runs unchanged.
    """

    def __init__(self, model: nn.Module):
        self.blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
        self.total: torch.Tensor | float = 0.0
        self._handles: list = []
        self._outputs: dict[int, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> "LatentLogRatio":
        self.total = 0.0
        for block in self.blocks:
            store = self._outputs.setdefault(id(block), {})
            self._handles += [
                block.prior.register_forward_hook(_keeper(store, "prior")),
                block.posterior.register_forward_hook(_keeper(store, "posterior")),
                block.register_forward_hook(self._add_block)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _add_block(self, block: DecoderBlock, inputs, output) -> None:
        _, latent, kl = output
        if kl is None:   # the block sampled from its prior: no posterior term
            return
        store = self._outputs[id(block)]
        prior_mean, prior_logstd, _ = store["prior"].split(
            [block.zdim, block.zdim, block.width], dim=1)
        posterior_mean, posterior_logstd = store["posterior"].chunk(2, dim=1)
        if block.precision_weighted:
            posterior_mean, posterior_logstd = precision_weighted_merge(
                posterior_mean, posterior_logstd, prior_mean, prior_logstd)
        ratio = (_log_normal(latent, posterior_mean, posterior_logstd)
                 - _log_normal(latent, prior_mean, prior_logstd))
        self.total = self.total + ratio.float().flatten(1).sum(1)


def _keeper(store: dict, name: str):
    def hook(module, inputs, output):
        store[name] = output
    return hook


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logstd: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(logstd)^2) without the constant -log(2 pi)/2, which
    cancels in a ratio of two Gaussians."""
    return -0.5 * ((z - mean) * torch.exp(-logstd)) ** 2 - logstd


def importance_weighted_elbo(kind: RunKind, model: nn.Module, x: torch.Tensor,
                             n_samples: int) -> torch.Tensor:
    """The K-sample importance-weighted bound (Burda et al. 2015) per image, (B,) in nats per
    dimension: log mean_k exp(log p(x | z_k) - [log q(z_k | x) - log p(z_k)])."""
    dims = x[0].numel()
    log_weights = []
    for _ in range(n_samples):
        with LatentLogRatio(model) as ratio:
            terms = kind.terms(model, x)
        log_weights.append(-terms["nll"].double() * dims - ratio.total.double())
    stacked = torch.stack(log_weights, dim=1)                     # (B, K) in nats
    return ((torch.logsumexp(stacked, dim=1) - math.log(n_samples)) / dims).float()
