"""The one held-out evaluator: the end of training, periodic evaluation and `evaluate` all call
`heldout_metrics`, so the same checkpoint always gives the same numbers.

For every kind of run the kind's per-image terms (`progvae.runs.kinds`) are computed on every image
of the split (the last, short batch included) and averaged in float64, under a fixed seed and in
fixed batches, so a run's `summary.json` and its `eval.json` agree exactly.

| kind            | terms (nats per dimension; MSE per dimension on the [-1, 1] scale)           |
| --------------- | ---------------------------------------------------------------------------- |
| stage1          | rate (KL), mse (the linear head's mean), group_rates — no likelihood         |
| vdvae           | elbo = -(nll + rate), nll (DMoL), rate, mse (DMoL mean), group_rates         |
| stage2 / joint  | the composite ELBO of paper 003 §5: elbo, nll, rate (stage two's KL),        |
|                 | stage1_rate, mse, stage1_distortion                                          |

`group_rates` is the KL of each latent group in nats per dimension, top group first: R_K of
paper 003 §4.1 is the sum of its first K entries.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from progvae.core.units import bits_per_dim, psnr
from progvae.data.loading import device_batch
from progvae.runs.kinds import RunKind
from progvae.training import dist

HELDOUT_SEED = 0          # the seed of every held-out evaluation unless `evaluate --seed` says
RANK_SEED_STRIDE = 7919   # rank r draws under seed + r * stride (rank 0: the one-process seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str):
    """Run a block under its own RNG state, leaving the caller's untouched."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def split_means(terms: Callable[[torch.Tensor], dict[str, torch.Tensor]], images: np.ndarray,
                batch_size: int, seed: int, device: torch.device) -> dict:
    """Means over every image of `images` (uint8 NHWC) of the per-image `terms(x)`, each (B,)
    or (B, k). Under torchrun each rank takes its share under its own seed and the sums are
    added across ranks, so every image counts exactly once. The sums stay on the device until
    the end: one copy to the host per term, not one per batch."""
    totals: dict[str, torch.Tensor] = collections.defaultdict(float)
    local = images[dist.shard(len(images))]
    with seeded(seed + RANK_SEED_STRIDE * dist.rank(), device):
        for start in range(0, len(local), batch_size):
            x = device_batch(local[start:start + batch_size], device)
            for name, value in terms(x).items():
                totals[name] = totals[name] + value.double().sum(0)
    if not totals:   # more ranks than images: this rank learns the names from one image
        with seeded(seed, device):
            one = device_batch(images[:1], device)
            totals = {name: value.double().sum(0) * 0 for name, value in terms(one).items()}
    means: dict = {}
    for name in sorted(totals):   # the same order on every rank, for the collectives
        total = dist.sum_across_ranks(totals[name].to(dist.collective_device())).cpu()
        mean = total / len(images)
        means[name] = mean.tolist() if mean.dim() else float(mean)
    return means


@torch.no_grad()
def heldout_metrics(kind: RunKind, model: nn.Module, images: np.ndarray, batch_size: int = 64,
                    seed: int = HELDOUT_SEED) -> dict:
    """The kind's terms averaged over `images`, plus n_images, psnr and (with a likelihood)
    bpd. `model` is the scored model of the kind (`progvae.runs.kinds`), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    metrics = {"n_images": len(images),
               **split_means(lambda x: kind.terms(model, x), images, batch_size, seed, device)}
    if "elbo" in metrics:
        metrics["bpd"] = bits_per_dim(metrics["elbo"])
    metrics["psnr"] = psnr(metrics["mse"])
    return metrics
