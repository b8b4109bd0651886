"""The conventional baseline: stage one and stage two, the same networks as the two-stage
model, trained together end to end by the composite ELBO (paper 003 A.4, last paragraph)."""

from __future__ import annotations

from pathlib import Path

from progvae import dist
from progvae.checkpoint import write_json
from progvae.config import Config
from progvae.runs import build_model, prepare_run
from progvae.stages.stage2 import CompositeObjective, composite_summary, write_pipeline_images
from progvae.trainer import Trainer


def train_joint(config: Config, out: str | Path, quiet: bool = False) -> dict:
    config, data, out_dir = prepare_run(config, out, "joint")
    model = build_model(config, "joint")
    two_stage = sum(p.numel() for stage in ("stage1", "stage2")
                    for p in build_model(config, stage).parameters())
    assert sum(p.numel() for p in model.parameters()) == two_stage, \
        "the joint baseline must have exactly the two-stage model's parameters"
    trainer = Trainer(model, CompositeObjective(), config, data, out_dir, "joint", quiet)
    trainer.resume()
    trainer.fit()
    summary = composite_summary(trainer)
    if dist.is_main():
        write_json(summary, out_dir / "summary.json")
        write_pipeline_images(trainer.ema_model, data, out_dir, config.n_grid, config.seed)
    dist.barrier()
    return summary
