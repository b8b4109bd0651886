"""Stage two: a conditional U-Net VDVAE with a DMoL head that models the image given stage
one's reconstruction x_tilde, trained by the ELBO with stage one frozen (paper 003 §5.1 and
A.4; paper 002 §4, eqs 5-6, and A.2)."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import torch

from progvae.core.config import Config, apply_overrides, load_config
from progvae.core.errors import UserError
from progvae.core.untrusted import read_json
from progvae.data.loading import ImageData
from progvae.models.distributions import NoiseShard
from progvae.models.pipeline import Pipeline, composite_terms
from progvae.models.vdvae import VDVAE
from progvae.runs.directory import load_run_config
from progvae.runs.exported import is_exported, read_exported
from progvae.runs.kinds import KINDS
from progvae.runs.load import load_model, run_summary
from progvae.runs.train import StageParts, train_run
from progvae.training import dist
from progvae.training.checkpoint import CHECKPOINT
from progvae.training.controllers import constraint_warning
from progvae.training.dist import default_device
from progvae.training.objective import FixedObjective


class CompositeObjective(FixedObjective):
    """The negative composite ELBO in nats per dimension:
    -E[ln p(x | z, z_tilde)] + KL(q(z|x) || p(z)) + KL(q(z_tilde|x, x_tilde) || p(z_tilde|x_tilde)).

    With a frozen `stage1` the model being trained is stage two alone (two-stage training; the
    stage-one KL is then a constant). With `stage1=None` the model is a whole Pipeline trained
    end to end, gradients flowing through x_tilde into stage one (the conventional baseline,
    paper 003 A.4, last paragraph). Logged: "elbo" (composite), "nll", "rate" (stage two's
    KL), "stage1_rate".
    """

    def __init__(self, stage1: VDVAE | None = None):
        self.stage1 = stage1

    def __call__(self, model, images: torch.Tensor,
                 noise: NoiseShard | None = None) -> dict[str, torch.Tensor]:
        stage1, stage2 = (model.stage1, model.stage2) if self.stage1 is None else (self.stage1, model)
        terms = composite_terms(stage1, stage2, images, noise)
        return {"loss": -terms["elbo"].mean(), "elbo": terms["elbo"].mean(),
                "nll": terms["nll"].mean(), "rate": terms["stage2_rate"].mean(),
                "stage1_rate": terms["stage1_rate"].mean()}


def load_finished_stage1(run: str | Path, device: torch.device
                         ) -> tuple[Config, VDVAE, int]:
    """A finished stage-one run's config, EMA network and step."""
    config, model, info = load_model(run, device)
    if info["kind"] is not KINDS["stage1"]:
        raise UserError(f"--stage1='{run}' is a {info['kind'].name} run; pass a stage-one run.")
    if not info["finished"]:
        raise UserError(f"The stage-one run '{run}' stopped at step {info['step']} of "
                        f"{config.steps}; finish it first by re-running its command.")
    return config, model, info["step"]


def stage1_provenance(run: str | Path, step: int) -> dict:
    """Which stage one a stage-two run trains on: the SHA-256 and step of its checkpoint (or
    of the exported model file)."""
    digest = hashlib.sha256()
    with open(run if is_exported(run) else Path(run) / CHECKPOINT, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return {"stage1_sha256": digest.hexdigest(), "stage1_step": step}


def check_same_stage1(out: str | Path, provenance: dict) -> None:
    """A stage-two run continues only on the stage one it started on: one that was trained
    further (or replaced) since would silently change what stage two models."""
    previous = Path(out) / "config.json" if out else None
    if previous is None or not previous.is_file():
        return
    recorded = read_json(previous, fix="restore it, or pass a new --out")
    if recorded.get("stage1_sha256") and recorded["stage1_sha256"] != provenance["stage1_sha256"]:
        raise UserError(
            f"The stage-one run changed since '{out}' started on it (its checkpoint was at step "
            f"{recorded.get('stage1_step')} and is now at step {provenance['stage1_step']}, with "
            "different weights); pass a new --out for stage two on the changed stage one.")


def warn_if_stage1_missed_its_target(run: str | Path) -> None:
    summary = run_summary(run)
    if summary.get("constraint_met") is not False or not dist.is_main():
        return
    warning = constraint_warning(summary)
    if warning:
        print(f"{warning.replace('WARNING: the', 'WARNING: stage one (' + str(run) + '): its', 1)} "
              "Stage two will model what that stage one leaves out.", file=sys.stderr, flush=True)


def train_stage2(config: Config, stage1_run: str | Path, out: str | Path,
                 quiet: bool = False, resume_from: int = 0) -> dict:
    """Train (or continue) stage two on a frozen, finished stage-one run."""
    dist.setup(config.dist_timeout)
    stage1_config, stage1, stage1_step = load_finished_stage1(stage1_run, default_device())

    def check_data(data: ImageData) -> None:
        if (data.image_size, data.channels) != (stage1_config.image_size,
                                                stage1_config.image_channels):
            raise UserError(
                f"The stage-one run '{stage1_run}' models {stage1_config.image_size}x"
                f"{stage1_config.image_size} images with {stage1_config.image_channels} "
                f"channel(s) but --data={config.data} has {data.image_size}x{data.image_size} "
                f"with {data.channels}; pass the data stage one was trained on.")

    provenance = stage1_provenance(stage1_run, stage1_step)
    check_same_stage1(out, provenance)
    config = dataclasses.replace(config, stage1=str(Path(stage1_run).resolve()), **provenance)
    warn_if_stage1_missed_its_target(stage1_run)
    parts = StageParts(CompositeObjective(stage1), check_data=check_data, quiet=quiet,
                    scored=lambda stage2: Pipeline(stage1, stage2))
    summary, _ = train_run(KINDS["stage2"], config, out, parts, resume_from)
    return summary


def stage2_config(stage1_run: str | Path, preset: str = "", overrides: dict | None = None
                  ) -> Config:
    """Stage two's config: the preset if one is named, else the stage-one run's own (its
    config.json, or the config inside an exported model), with `overrides` applied."""
    overrides = overrides or {}
    if preset:
        return load_config(preset, overrides)
    if is_exported(stage1_run):
        stage1_config = read_exported(stage1_run, weights_of=())[0].config   # header only
    else:
        _, stage1_config = load_run_config(stage1_run)
    return apply_overrides(stage1_config, overrides, "the command line")
