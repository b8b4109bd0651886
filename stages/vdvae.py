"""The plain VDVAE (Child 2020) trained by the ELBO with its DMoL head: the conventionally
trained HVAE that paper 003 §4 starts from (A.1, A.2), and a reference model for VDVAE users.

Objective: the negative ELBO in nats per dimension, -ln p(x | z) / dims + KL(q(z|x) || p(z)) / dims,
with the exact discrete likelihood of the DMoL head over 256 levels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from progvae.core.config import Config
from progvae.models.distributions import NoiseShard
from progvae.models.vdvae import VDVAE
from progvae.runs.kinds import KINDS
from progvae.runs.train import StageParts, train_run
from progvae.training.objective import FixedObjective


class ElboObjective(FixedObjective):
    """Batch means of the negative ELBO ("loss") and its parts: "elbo", "nll" (DMoL), "rate"
    (KL)."""

    def __call__(self, model: VDVAE, images: torch.Tensor,
                 noise: NoiseShard | None = None) -> dict[str, torch.Tensor]:
        out = model(images, noise=noise)
        nll = model.head.reconstruction_loss(out["output"], images)
        elbo = -(nll + out["rate"])
        return {"loss": -elbo.mean(), "elbo": elbo.mean(), "nll": nll.mean(),
                "rate": out["rate"].mean()}


def train_vdvae(config: Config, out: str | Path, quiet: bool = False,
                resume_from: int = 0) -> dict:
    """Train (or continue) a plain VDVAE run in `out`; returns the held-out summary."""
    summary, _ = train_run(KINDS["vdvae"], config, out, StageParts(ElboObjective(), quiet=quiet),
                            resume_from)
    return summary
