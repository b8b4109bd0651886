"""The plain VDVAE (Child 2020) trained by the ELBO with its DMoL head: the conventionally
trained HVAE that paper 003 §4 starts from (A.1, A.2), and a reference model for VDVAE users.

Objective: the negative ELBO in nats per dimension, -ln p(x | z) / dims + KL(q(z|x) || p(z)) / dims,
with the exact discrete likelihood of the DMoL head over 256 levels.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from progvae import dist
from progvae.checkpoint import write_json
from progvae.config import Config
from progvae.data import ImageData, to_uint8_images
from progvae.heads import mse_per_image
from progvae.images import save_grid
from progvae.runs import build_model, heldout_batch, prepare_run, psnr, seeded, write_comparison
from progvae.trainer import FixedObjective, Trainer
from progvae.vdvae import VDVAE


class ElboObjective(FixedObjective):
    """Batch means of the negative ELBO ("loss") and its parts: "elbo", "nll" (DMoL), "rate"
    (KL); held-out evaluation adds "mse" of the DMoL mean reconstruction."""

    def __call__(self, model: VDVAE, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(images)
        nll = model.head.reconstruction_loss(out["output"], images)
        elbo = -(nll + out["rate"])
        metrics = {"loss": -elbo.mean(), "elbo": elbo.mean(), "nll": nll.mean(),
                   "rate": out["rate"].mean()}
        if not model.training:
            metrics["mse"] = mse_per_image(model.head.mean(out["output"]), images).mean()
        return metrics


def train_vdvae(config: Config, out: str | Path, quiet: bool = False) -> dict:
    """Train (or continue) a plain VDVAE run in `out`; returns the held-out summary."""
    config, data, out_dir = prepare_run(config, out, "vdvae")
    model = build_model(config, "vdvae")
    trainer = Trainer(model, ElboObjective(), config, data, out_dir, "vdvae", quiet)
    trainer.resume()
    trainer.fit()
    heldout = trainer.evaluate()
    summary = {
        **trainer.run_facts(),
        "elbo": heldout["elbo"],
        "bpd": -heldout["elbo"] / math.log(2),
        "nll": heldout["nll"],
        "rate": heldout["rate"],
        "mse": heldout["mse"],
        "psnr": psnr(heldout["mse"]),
    }
    if dist.is_main():
        write_json(summary, out_dir / "summary.json")
        write_vdvae_images(trainer.ema_model, data, out_dir, config.n_grid, config.seed)
    dist.barrier()
    return summary


@torch.no_grad()
def write_vdvae_images(model: VDVAE, data: ImageData, out_dir: Path, n: int, seed: int) -> None:
    """reconstructions.png (held-out originals over their DMoL-mean reconstructions) and
    samples.png (DMoL samples of z ~ p(z) at temperature 1), from a fixed seed."""
    device = next(model.parameters()).device
    with seeded(seed, device):
        originals, x = heldout_batch(data, n, device)
        write_comparison([originals, to_uint8_images(model.reconstruct(x).cpu())],
                         out_dir / "reconstructions.png")
        samples = model.head.sample(model.decode(n=n, temperature=1.0), 1.0)
        save_grid(to_uint8_images(samples.cpu()), out_dir / "samples.png")
