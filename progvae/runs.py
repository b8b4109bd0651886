"""Starting a run directory and loading one back: the one way every command does both."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from progvae.checkpoint import load_checkpoint, load_run_config, write_json
from progvae.config import ARCHITECTURE_FIELDS, Config
from progvae.data import ImageData, load_data, to_model_input, to_uint8_images
from progvae.errors import UserError
from progvae.images import save_grid, save_rows
from progvae.vdvae import VDVAE


def prepare_run(config: Config, out: str | Path, stage: str) -> tuple[Config, ImageData, Path]:
    """Load and check the data, fill in what the data decides, then create `out` and write
    config.json. Everything that can fail on bad input fails before the first write."""
    if not out:
        raise UserError("Pass --out=DIR, the run directory to write (or to continue).")
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    data = load_data(config.data, config.image_size, seed=config.seed, resize=config.resize)
    config = dataclasses.replace(config, image_channels=data.channels)
    if config.batch_size > len(data.train):
        raise UserError(f"batch_size={config.batch_size} is larger than the {len(data.train)} "
                        "training images; pass a smaller --batch_size.")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out='{out}' is a file; pass a directory.")
    _check_continuation(out_dir, config, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json({"stage": stage, **config.to_dict()}, out_dir / "config.json")
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


def load_model(run: str | Path, device: torch.device | str = "cpu") -> tuple[Config, VDVAE, dict]:
    """A trained run's config and its model with the EMA weights, in eval mode, and the
    checkpoint's bookkeeping (step, stage)."""
    run_dir, config = load_run_config(run)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    model = VDVAE(config)
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    return config, model, {"step": state["step"], "stage": state["stage"]}


def psnr(distortion: float) -> float:
    """PSNR in dB of an MSE per dimension on the [-1, 1] scale (peak-to-peak 2): 10 log10(4/D)."""
    return 10 * math.log10(4.0 / distortion) if distortion > 0 else float("inf")


@torch.no_grad()
def write_image_grids(model: VDVAE, data: ImageData, out_dir: Path, n: int,
                      device: torch.device, seed: int) -> None:
    """reconstructions.png (rows of held-out originals over their reconstructions) and
    samples.png (mean images of z ~ p(z)), from a fixed seed."""
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        originals = data.test[:n]
        x = to_model_input(torch.from_numpy(originals)).to(device)
        reconstructions = to_uint8_images(model.reconstruct(x).cpu())
        columns = max(1, int(math.sqrt(2 * len(originals))))
        rows = []
        for start in range(0, len(originals), columns):
            rows += [originals[start:start + columns], reconstructions[start:start + columns]]
        if len(rows[-1]) != len(rows[0]):  # keep every row the same length
            rows = rows[:-2] or rows
        save_rows(rows, out_dir / "reconstructions.png")
        save_grid(to_uint8_images(model.sample(n).cpu()), out_dir / "samples.png")


def read_summary(run: str | Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())
