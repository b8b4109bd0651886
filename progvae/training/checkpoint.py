"""Atomic checkpoint files and loading a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from progvae.atomic import atomic_path
from progvae.config import Config
from progvae.errors import UserError

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through `progvae.atomic.atomic_path`: a kill at any moment leaves either the
    old file or the new one, never half of one."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_run_config(run: str | Path) -> tuple[Path, Config]:
    """The run directory and its resolved config; fails with one sentence if it is no run."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"Run directory '{run}' does not exist; pass the --out of a training run.")
    if not (run / "config.json").is_file() or not (run / CHECKPOINT).is_file():
        raise UserError(f"'{run}' holds no {CHECKPOINT} (or config.json); train it first or pass "
                        "the --out of a run that has written a checkpoint.")
    values = json.loads((run / "config.json").read_text())
    values.pop("stage", None)
    return run, Config.from_dict(values, source=f"{run}/config.json")
