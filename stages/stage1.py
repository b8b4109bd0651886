"""Stage one: a VDVAE with a linear mean head trained to minimise rate subject to a distortion
target (paper 003 §5 and A.3, A.5; paper 002 §3 and B.2)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from progvae.core.config import Config
from progvae.models.distributions import NoiseShard
from progvae.runs.kinds import KINDS
from progvae.runs.train import StageParts, train_run
from progvae.training import dist
from progvae.training.controllers import (build_controller, check_same_controller,
                                          constraint_summary, constraint_warning)


class Stage1Objective:
    """Batch-mean rate R (nats/dim) and distortion D (MSE/dim), combined by the controller."""

    def __init__(self, controller):
        self.controller = controller

    def __call__(self, model, images: torch.Tensor,
                 noise: NoiseShard | None = None) -> dict[str, torch.Tensor]:
        out = model(images, noise=noise)
        rate = out["rate"].mean()
        distortion = model.head.reconstruction_loss(out["output"], images).mean()
        return {"loss": self.controller.loss(rate, distortion), "rate": rate,
                "distortion": distortion}

    def after_update(self, metrics: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        self.controller.update(metrics["rate"], metrics["distortion"], applied)

    def to(self, device: torch.device) -> None:
        """The controller's loss inputs on the training device (progvae.training.controllers)."""
        self.controller.to(device)

    def log_values(self) -> dict[str, float]:
        return {"multiplier": self.controller.multiplier}

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])


def controller_summary(controller, tolerance: float):
    """summary.json keys of a constrained run from its held-out metrics: the multiplier and
    whether the constraint was met (progvae.training.controllers.constraint_summary)."""
    def summarise(heldout: dict) -> dict:
        return {"multiplier": controller.multiplier,
                **constraint_summary(controller, heldout["rate"], heldout["mse"], tolerance)}
    return summarise


def train_stage1(config: Config, out: str | Path, quiet: bool = False,
                 resume_from: int = 0) -> dict:
    """Train (or continue) a stage-one run in `out`; returns the held-out summary."""
    controller = build_controller(config)          # fails on a bad target before any write
    check_same_controller(out, config)
    parts = StageParts(Stage1Objective(controller), quiet=quiet,
                    summary=controller_summary(controller, config.constraint_tolerance))
    summary, _ = train_run(KINDS["stage1"], config, out, parts, resume_from)
    if dist.is_main():
        warning = constraint_warning(summary)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    return summary
