"""Stage two: a conditional U-Net VDVAE with a DMoL head that models the image given stage
one's reconstruction x_tilde, trained by the ELBO with stage one frozen (paper 003 §5.1 and
A.4; paper 002 §4, eqs 5-6, and A.2)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from progvae import dist
from progvae.checkpoint import write_json
from progvae.config import Config
from progvae.data import ImageData, to_uint8_images
from progvae.errors import UserError
from progvae.heads import mse_per_image
from progvae.images import save_grid
from progvae.pipeline import Pipeline, composite_terms
from progvae.runs import (build_model, heldout_batch, load_model, prepare_run, psnr, seeded,
                          write_comparison)
from progvae.trainer import FixedObjective, Trainer, default_device
from progvae.vdvae import VDVAE


class CompositeObjective(FixedObjective):
    """The negative composite ELBO in nats per dimension:
    -E[ln p(x | z, z_tilde)] + KL(q(z|x) || p(z)) + KL(q(z_tilde|x, x_tilde) || p(z_tilde|x_tilde)).

    With a frozen `stage1` the model being trained is stage two alone (two-stage training; the
    stage-one KL is then a constant). With `stage1=None` the model is a whole Pipeline trained
    end to end, gradients flowing through x_tilde into stage one (the conventional baseline,
    paper 003 A.4, last paragraph).

    Logged: "elbo" (composite), "nll", "rate" (stage two's KL), "stage1_rate"; held-out
    evaluation adds "mse" (stage two's mean reconstruction) and "stage1_distortion" (x_tilde).
    """

    def __init__(self, stage1: VDVAE | None = None):
        self.stage1 = stage1

    def __call__(self, model, images: torch.Tensor) -> dict[str, torch.Tensor]:
        stage1, stage2 = (model.stage1, model.stage2) if self.stage1 is None else (self.stage1, model)
        terms = composite_terms(stage1, stage2, images)
        metrics = {"loss": -terms["elbo"].mean(), "elbo": terms["elbo"].mean(),
                   "nll": terms["nll"].mean(), "rate": terms["stage2_rate"].mean(),
                   "stage1_rate": terms["stage1_rate"].mean()}
        if not stage2.training:
            final = stage2.head.mean(terms["output"])
            metrics["mse"] = mse_per_image(final, images).mean()
            metrics["stage1_distortion"] = mse_per_image(terms["x_tilde"], images).mean()
        return metrics


def composite_summary(trainer: Trainer) -> dict:
    """summary.json of a stage-two or joint run: held-out composite ELBO and its parts."""
    heldout = trainer.evaluate()
    return {
        **trainer.run_facts(),
        "elbo": heldout["elbo"],
        "bpd": -heldout["elbo"] / math.log(2),
        "nll": heldout["nll"],
        "rate": heldout["rate"],
        "stage1_rate": heldout["stage1_rate"],
        "mse": heldout["mse"],
        "psnr": psnr(heldout["mse"]),
        "stage1_distortion": heldout["stage1_distortion"],
    }


@torch.no_grad()
def write_pipeline_images(pipeline: Pipeline, data: ImageData, out_dir: Path, n: int,
                          seed: int) -> None:
    """reconstructions.png (rows: originals, stage one's x_tilde, the final reconstruction) and
    samples.png (full pipeline samples)."""
    with seeded(seed, pipeline.device):
        originals, x = heldout_batch(data, n, pipeline.device)
        x_tilde, final = pipeline.progressive(x)
        write_comparison([originals, to_uint8_images(x_tilde.cpu()),
                          to_uint8_images(final.cpu())], out_dir / "reconstructions.png")
        save_grid(to_uint8_images(pipeline.sample(n).cpu()), out_dir / "samples.png")


def load_finished_stage1(run: str | Path, device: torch.device) -> tuple[Config, VDVAE]:
    config, model, info = load_model(run, device)
    if info["stage"] != "stage1":
        raise UserError(f"--stage1='{run}' is a {info['stage']} run; pass a stage-one run.")
    if not info["finished"]:
        raise UserError(f"The stage-one run '{run}' stopped at step {info['step']} of "
                        f"{config.steps}; finish it first by re-running its command.")
    return config, model


def train_stage2(config: Config, stage1_run: str | Path, out: str | Path,
                 quiet: bool = False) -> dict:
    """Train (or continue) stage two on a frozen, finished stage-one run."""
    dist.setup(config.dist_timeout)
    device = default_device()
    stage1_config, stage1 = load_finished_stage1(stage1_run, device)

    def check_data(data: ImageData) -> None:
        if (data.image_size, data.channels) != (stage1_config.image_size,
                                                stage1_config.image_channels):
            raise UserError(
                f"The stage-one run '{stage1_run}' models {stage1_config.image_size}x"
                f"{stage1_config.image_size} images with {stage1_config.image_channels} "
                f"channel(s) but --data={config.data} has {data.image_size}x{data.image_size} "
                f"with {data.channels}; pass the data stage one was trained on.")

    config = dataclasses.replace(config, stage1=str(Path(stage1_run).resolve()))
    config, data, out_dir = prepare_run(config, out, "stage2", check_data)
    model = build_model(config, "stage2")
    trainer = Trainer(model, CompositeObjective(stage1), config, data, out_dir, "stage2", quiet)
    trainer.resume()
    trainer.fit()
    summary = composite_summary(trainer)
    if dist.is_main():
        write_json(summary, out_dir / "summary.json")
        write_pipeline_images(Pipeline(stage1, trainer.ema_model), data, out_dir, config.n_grid,
                              config.seed)
    dist.barrier()
    return summary
