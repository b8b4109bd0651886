"""The conventional baseline: stage one and stage two, the same networks as the two-stage
model, trained together end to end by the composite ELBO (paper 003 A.4, last paragraph)."""

from __future__ import annotations

from pathlib import Path

from progvae.core.config import Config
from progvae.runs.kinds import KINDS
from progvae.runs.train import StageParts, train_run
from progvae.stages.stage2 import CompositeObjective


def train_joint(config: Config, out: str | Path, quiet: bool = False,
                resume_from: int = 0) -> dict:
    """Train (or continue) a joint run in `out`; returns the held-out summary. The Pipeline it
    trains has exactly the two-stage model's parameters (KINDS["joint"].build)."""
    summary, _ = train_run(KINDS["joint"], config, out,
                           StageParts(CompositeObjective(), quiet=quiet),
                           resume_from)
    return summary
