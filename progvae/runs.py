"""Starting a run directory and loading one back: the one way every command does both."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from progvae import dist
from progvae.checkpoint import load_checkpoint, load_run_config, write_json
from progvae.config import ARCHITECTURE_FIELDS, Config
from progvae.data import ImageData, load_data_for, to_model_input
from progvae.errors import UserError
from progvae.images import save_rows
from progvae.vdvae import VDVAE


def prepare_run(config: Config, out: str | Path, stage: str,
                check_data: Callable[[ImageData], None] | None = None
                ) -> tuple[Config, ImageData, Path]:
    """Load and check the data (also with `check_data`, if given), fill in what the data
    decides, then create `out` and write config.json. Everything that can fail on bad input
    fails before the first write."""
    if not out:
        raise UserError("Pass --out=DIR, the run directory to write (or to continue).")
    dist.setup(config.dist_timeout)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    data = load_data_for(config)
    if check_data is not None:
        check_data(data)
    config = dataclasses.replace(config, image_channels=data.channels)
    if config.batch_size > len(data.train):
        raise UserError(f"batch_size={config.batch_size} is larger than the {len(data.train)} "
                        "training images; pass a smaller --batch_size.")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out='{out}' is a file; pass a directory.")
    _check_continuation(out_dir, config, stage)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json({"stage": stage, **config.to_dict()}, out_dir / "config.json")
    dist.barrier()
    # The same seed on every rank: identical initial weights and one shared noise stream.
    torch.manual_seed(config.seed)
    return config, data, out_dir


def _check_continuation(out_dir: Path, config: Config, stage: str) -> None:
    """A run directory that already holds a run may only be continued by the same kind of run
    with the same architecture; anything else would overwrite it."""
    previous = out_dir / "config.json"
    if not previous.is_file():
        return
    values = json.loads(previous.read_text())
    if values.get("stage") != stage:
        raise UserError(f"'{out_dir}' holds a {values.get('stage')} run; pass a new --out for "
                        f"this {stage} run.")
    changed = [name for name in ARCHITECTURE_FIELDS if values.get(name) != getattr(config, name)]
    if changed:
        raise UserError(f"'{out_dir}' holds a run with a different architecture "
                        f"({', '.join(changed)}); pass a new --out or the same settings.")


STAGES = ("stage1", "stage2", "joint", "vdvae")


def build_model(config: Config, stage: str) -> nn.Module:
    """The network a kind of run trains: stage one (linear head), stage two (conditional, DMoL
    head), joint (both, as one Pipeline) or the plain VDVAE (DMoL head)."""
    if stage == "stage1":
        return VDVAE(config, head="linear")
    if stage == "stage2":
        return VDVAE(config, head="dmol", conditional=True)
    if stage == "vdvae":
        return VDVAE(config, head="dmol")
    if stage == "joint":
        from progvae.pipeline import Pipeline
        return Pipeline(VDVAE(config, head="linear"),
                        VDVAE(config, head="dmol", conditional=True))
    raise ValueError(f"unknown stage '{stage}'")


def load_model(run: str | Path, device: torch.device | str = "cpu"
               ) -> tuple[Config, nn.Module, dict]:
    """A trained run's config and its model with the EMA weights, in eval mode, and the
    checkpoint's bookkeeping: {"stage", "step", "finished"}."""
    run_dir, config = load_run_config(run)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    stage = state.get("stage")
    if stage not in STAGES:
        raise UserError(f"'{run_dir}' holds a run of unknown kind '{stage}'; pass the --out of a "
                        f"{', '.join(STAGES)} run.")
    model = build_model(config, stage)
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    info = {"stage": stage, "step": state["step"], "finished": state["step"] >= config.steps}
    return config, model, info


def load_pipeline(run: str | Path, stage1_run: str | Path | None = None,
                  device: torch.device | str = "cpu"):
    """A Pipeline from a joint run, or from a stage-two run and its stage-one run (the one its
    config.json records unless `stage1_run` is given)."""
    return _as_pipeline(run, *load_model(run, device), stage1_run, device)


def _as_pipeline(run, config: Config, model: nn.Module, info: dict, stage1_run, device):
    from progvae.pipeline import Pipeline

    if info["stage"] == "joint":
        return model
    if info["stage"] != "stage2":
        raise UserError(f"'{run}' is a {info['stage']} run; a pipeline needs a stage2 or joint run.")
    stage1_run = stage1_run or config.stage1
    _, stage1, stage1_info = load_model(stage1_run, device)
    if stage1_info["stage"] != "stage1":
        raise UserError(f"'{stage1_run}' is a {stage1_info['stage']} run, not a stage-one run.")
    return Pipeline(stage1, model).to(device).eval()


def load_sampler(run: str | Path, device: torch.device | str = "cpu",
                 stage1_temperature: float | None = None
                 ) -> tuple[str, Callable[[int, float], torch.Tensor]]:
    """(kind, sample(n, temperature) -> images in [-1, 1]) for any run: stage-one mean samples,
    the plain VDVAE's DMoL samples, or full pipeline samples for stage-two and joint runs."""
    config, model, info = load_model(run, device)
    if info["stage"] == "stage2":
        model = _as_pipeline(run, config, model, info, None, device)
    return info["stage"], sampler_for(info["stage"], model, stage1_temperature)


def sampler_for(kind: str, model: nn.Module, stage1_temperature: float | None = None
                ) -> Callable[[int, float], torch.Tensor]:
    """sample(n, temperature) -> images in [-1, 1] for a model of a `kind` of run: a stage-one
    VDVAE's mean samples, a plain VDVAE's DMoL samples, or a Pipeline's (stage2, joint)."""
    if kind == "stage1":
        return model.sample
    if kind == "vdvae":
        return lambda n, t: model.head.sample(model.decode(n=n, temperature=t), t)
    return lambda n, t: model.sample(n, t, stage1_temperature)


def psnr(distortion: float) -> float:
    """PSNR in dB of an MSE per dimension on the [-1, 1] scale (peak-to-peak 2): 10 log10(4/D)."""
    return 10 * math.log10(4.0 / distortion) if distortion > 0 else float("inf")


def write_comparison(image_sets: list[np.ndarray], path: Path) -> None:
    """Aligned image sets (e.g. originals, stage one, final), uint8 NHWC of equal length, as
    groups of rows: a row of each set in turn, so every column shows one image's versions."""
    count = len(image_sets[0])
    columns = max(1, int(math.sqrt(len(image_sets) * count)))
    rows = []
    for start in range(0, count - columns + 1, columns):
        rows += [images[start:start + columns] for images in image_sets]
    save_rows(rows or [images for images in image_sets], path)


def heldout_batch(data: ImageData, n: int, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """The first n held-out images, as uint8 NHWC and as model input on `device`."""
    originals = data.test[:n]
    return originals, to_model_input(torch.from_numpy(originals)).to(device)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block under its own RNG state, leaving the caller's untouched."""
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def read_summary(run: str | Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())
