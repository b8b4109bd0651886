"""Training stages: each supplies its objective (and what else is its own) to
progvae.runs.train.train_run; `train` picks one by the kind's name."""

from __future__ import annotations

from pathlib import Path

from progvae.core.config import Config
from progvae.core.errors import UserError

TRAINED_KINDS = ("stage1", "stage2", "joint", "vdvae")


def train(kind: str, config: Config, out: str | Path, stage1: str | Path = "",
          quiet: bool = False, resume_from: int = 0) -> dict:
    """Train (or continue) a run of `kind` (stage1, stage2, joint or vdvae) with `config` in
    the run directory `out`, and return its held-out summary (summary.json's values). Stage two
    needs `stage1`, a finished stage-one run directory or exported file."""
    from progvae.stages.joint import train_joint
    from progvae.stages.stage1 import train_stage1
    from progvae.stages.stage2 import train_stage2
    from progvae.stages.vdvae import train_vdvae

    if kind not in TRAINED_KINDS:
        raise UserError(f"kind must be one of {', '.join(TRAINED_KINDS)}, got '{kind}'.")
    if kind == "stage2":
        if not stage1:
            raise UserError("Training stage two needs stage1=RUN, a finished stage-one run.")
        return train_stage2(config, stage1, out, quiet=quiet, resume_from=resume_from)
    train_kind = {"stage1": train_stage1, "joint": train_joint, "vdvae": train_vdvae}[kind]
    return train_kind(config, out, quiet=quiet, resume_from=resume_from)
