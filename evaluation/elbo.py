"""Held-out likelihood bounds and reconstruction errors, exact over a whole split.

For every kind of run the per-image terms are computed on every held-out image (the last,
short batch included) and averaged, under a fixed seed, so the same weights always give the
same numbers:

| kind            | terms (nats per dimension; MSE per dimension on the [-1, 1] scale)           |
| --------------- | ---------------------------------------------------------------------------- |
| stage1          | rate (KL), mse (the linear head's mean) — no likelihood, so no ELBO          |
| vdvae           | elbo = -(nll + rate), nll (DMoL), rate, mse (DMoL mean)                     |
| stage2 / joint  | the composite ELBO of paper 003 §5 (`progvae.pipeline.composite_terms`):    |
|                 | elbo, nll, rate (stage two's KL), stage1_rate, mse, stage1_distortion        |

`group_rates` is the KL of each latent group of the (stage-one or plain) VDVAE in nats per
dimension, top group first: R_K of paper 003 §4.1 is the sum of its first K entries.

`iw_samples=K` adds the importance-weighted bound of Burda et al. (2015),
log (1/K) sum_k p(x, z_k) / q(z_k | x) with z_k ~ q(z | x), which is >= the ELBO and tightens
with K. It needs log q - log p at the drawn latents, which the model only returns as analytic
KLs, so `LatentLogRatio` reads each decoder block's prior and posterior as it runs.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import torch
from torch import nn

from progvae import dist
from progvae.data import to_model_input
from progvae.distributions import precision_weighted_merge
from progvae.heads import mse_per_image
from progvae.pipeline import composite_terms
from progvae.runs import psnr, seeded
from progvae.vdvae import DecoderBlock

KINDS_WITH_LIKELIHOOD = ("vdvae", "stage2", "joint")
RANK_SEED_STRIDE = 7919   # rank r draws under seed + r * stride (rank 0: the one-process seed)


def image_terms(kind: str, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image terms (B,) of one batch (see the module docstring); `model` is a VDVAE for
    stage1 and vdvae runs and a Pipeline for stage2 and joint runs."""
    if kind in ("stage1", "vdvae"):
        out = model(x)
        terms = {"rate": out["rate"], "mse": mse_per_image(model.head.mean(out["output"]), x),
                 "group_rates": torch.stack(out["kl"], dim=1) / model.dims_per_image}
        if kind == "vdvae":
            terms["nll"] = model.head.reconstruction_loss(out["output"], x)
            terms["elbo"] = -(terms["nll"] + out["rate"])
        return terms
    if kind in ("stage2", "joint"):
        terms = composite_terms(model.stage1, model.stage2, x)
        return {"elbo": terms["elbo"], "nll": terms["nll"], "rate": terms["stage2_rate"],
                "stage1_rate": terms["stage1_rate"],
                "mse": mse_per_image(model.stage2.head.mean(terms["output"]), x),
                "stage1_distortion": mse_per_image(terms["x_tilde"], x)}
    raise ValueError(f"unknown kind of run '{kind}'")


@torch.no_grad()
def heldout_metrics(kind: str, model: nn.Module, images: np.ndarray, batch_size: int = 64,
                    seed: int = 0, iw_samples: int = 0) -> dict:
    """Means of `image_terms` over every image of `images` (uint8 NHWC), plus bpd and PSNR;
    with `iw_samples` > 0 also "iw_elbo" (and "iw_bpd") for kinds with a likelihood."""
    device = next(model.parameters()).device
    model.eval()
    with_bound = iw_samples > 0 and kind in KINDS_WITH_LIKELIHOOD
    totals: dict[str, torch.Tensor] = collections.defaultdict(float)
    # Under torchrun each rank takes its share of the images under its own seed, and the sums
    # are added across ranks, so every image counts exactly once.
    local = images[dist.shard(len(images))]
    # The bound runs as a second pass under its own seed, so asking for it leaves the
    # single-sample numbers unchanged.
    for pass_seed, bound_pass in ((seed, False), (seed + 1, True))[:2 if with_bound else 1]:
        with seeded(pass_seed + RANK_SEED_STRIDE * dist.rank(), device):
            for start in range(0, len(local), batch_size):
                x = to_model_input(torch.from_numpy(local[start:start + batch_size])).to(device)
                if bound_pass:
                    terms = {"iw_elbo": importance_weighted_elbo(kind, model, x, iw_samples)}
                else:
                    terms = image_terms(kind, model, x)
                for name, value in terms.items():
                    totals[name] = totals[name] + value.double().sum(0).cpu()
    count = len(images)
    metrics: dict = {"n_images": count}
    for name in sorted(totals):   # the same order on every rank, for the collectives
        total = dist.sum_across_ranks(totals[name].to(dist.collective_device())).cpu()
        mean = total / count
        metrics[name] = mean.tolist() if mean.dim() else float(mean)
    for name in ("elbo", "iw_elbo"):
        if name in metrics:
            metrics[name.replace("elbo", "bpd")] = -metrics[name] / math.log(2)
    metrics["psnr"] = psnr(metrics["mse"])
    if with_bound:
        metrics["iw_samples"] = iw_samples
    return metrics


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


def importance_weighted_elbo(kind: str, model: nn.Module, x: torch.Tensor,
                             n_samples: int) -> torch.Tensor:
    """The K-sample importance-weighted bound (Burda et al. 2015) per image, (B,) in nats per
    dimension: log mean_k exp(log p(x | z_k) - [log q(z_k | x) - log p(z_k)])."""
    dims = x[0].numel()
    log_weights = []
    for _ in range(n_samples):
        with LatentLogRatio(model) as ratio:
            terms = image_terms(kind, model, x)
        log_weights.append(-terms["nll"].double() * dims - ratio.total.double())
    stacked = torch.stack(log_weights, dim=1)                     # (B, K) in nats
    return ((torch.logsumexp(stacked, dim=1) - math.log(n_samples)) / dims).float()
