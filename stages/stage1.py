"""Stage one: a VDVAE with a linear mean head trained to minimise rate subject to a distortion
target (paper 003 §5 and A.3, A.5; paper 002 §3 and B.2)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from progvae import dist
from progvae.checkpoint import write_json
from progvae.config import Config
from progvae.controllers import (build_controller, check_same_controller, constraint_summary,
                                  constraint_warning)
from progvae.data import ImageData, to_uint8_images
from progvae.images import save_grid
from progvae.runs import build_model, heldout_batch, prepare_run, psnr, seeded, write_comparison
from progvae.trainer import Trainer
from progvae.vdvae import VDVAE


class Stage1Objective:
    """Batch-mean rate R (nats/dim) and distortion D (MSE/dim), combined by the controller."""

    def __init__(self, controller):
        self.controller = controller

    def __call__(self, model: VDVAE, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(images)
        rate = out["rate"].mean()
        distortion = model.head.reconstruction_loss(out["output"], images).mean()
        return {"loss": self.controller.loss(rate, distortion), "rate": rate,
                "distortion": distortion}

    def after_update(self, metrics: dict[str, float]) -> None:
        self.controller.update(metrics["rate"], metrics["distortion"])

    def log_values(self) -> dict[str, float]:
        return {"multiplier": self.controller.multiplier}

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])


def train_stage1(config: Config, out: str | Path, quiet: bool = False) -> dict:
    """Train (or continue) a stage-one run in `out`; returns the held-out summary."""
    controller = build_controller(config)          # fails on a bad target before any write
    check_same_controller(out, config)
    config, data, out_dir = prepare_run(config, out, "stage1")
    model = build_model(config, "stage1")
    trainer = Trainer(model, Stage1Objective(controller), config, data, out_dir, "stage1", quiet)
    trainer.resume()
    trainer.fit()
    heldout = trainer.evaluate()
    summary = {
        "stage": "stage1",
        "data": data.name,
        "steps": trainer.step,
        "skipped": trainer.skipped,
        "rate": heldout["rate"],
        "distortion": heldout["distortion"],
        "psnr": psnr(heldout["distortion"]),
        "multiplier": controller.multiplier,
        # controller, constrained, target, relative_error, multiplier_at_bound,
        # saturated_fraction, constraint_met
        **constraint_summary(controller, heldout["rate"], heldout["distortion"],
                             config.constraint_tolerance),
        "train_seconds": round(trainer.elapsed, 2),
        "steps_per_second": round(trainer.step / max(trainer.elapsed, 1e-9), 3),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if dist.is_main():
        write_json(summary, out_dir / "summary.json")
        warning = constraint_warning(summary)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        write_stage1_images(trainer.ema_model, data, out_dir, config.n_grid, config.seed)
    dist.barrier()
    return summary


@torch.no_grad()
def write_stage1_images(model: VDVAE, data: ImageData, out_dir: Path, n: int, seed: int) -> None:
    """reconstructions.png (rows of held-out originals over their reconstructions) and
    samples.png (mean decodings of z ~ p(z)), from a fixed seed."""
    device = next(model.parameters()).device
    with seeded(seed, device):
        originals, x = heldout_batch(data, n, device)
        reconstructions = to_uint8_images(model.reconstruct(x).cpu())
        write_comparison([originals, reconstructions], out_dir / "reconstructions.png")
        save_grid(to_uint8_images(model.sample(n).cpu()), out_dir / "samples.png")
