"""Drawing samples from a trained run: the one sampling loop of `sample`, `evaluate` and the
demo, and the `sample` command's work (an image grid and, if asked, every image as .npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from progvae.core.atomic import atomic_path
from progvae.data.images import save_grid
from progvae.runs.kinds import RunKind
from progvae.runs.load import load_scored
from progvae.training.dist import default_device

GRID_LIMIT = 1024   # a grid of more images would be unreadable


@torch.no_grad()
def draw_samples(kind: RunKind, model: nn.Module, n: int, temperature: float = 1.0,
                 batch_size: int = 256, stage1_temperature: float | None = None,
                 progress: bool = False, pixel_temperature: float | None = None) -> np.ndarray:
    """n samples of a kind's scored model as uint8 NHWC, drawn in batches (with a progress bar
    if asked): the one sampling loop of `sample`, `evaluate` and the demo. `stage1_temperature`
    (two-stage kinds) and `pixel_temperature` (DMoL heads) default to `temperature`."""
    from tqdm import tqdm

    from progvae.data.loading import to_uint8_images

    batches = []
    with tqdm(total=n, desc=f"sampling ({kind.name})", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            images = kind.sample(model, count, temperature, stage1_temperature,
                                 pixel_temperature)
            batches.append(to_uint8_images(images.cpu()))
            bar.update(count)
    return np.concatenate(batches)


def sample_run(run: str | Path, n: int, out: Path, seed: int = 0, temperature: float = 1.0,
               stage1_temperature: float | None = None, pixel_temperature: float | None = None,
               npz: Path | None = None, batch_size: int = 256) -> str:
    """Draw n samples of a trained run (a stage-one run: mean samples; a stage-two or joint
    run: full pipeline samples) under `seed`, save the first GRID_LIMIT as an image grid at
    `out` and, with `npz`, all of them as uint8 NHWC under the key "samples". Returns what was
    done, in words."""
    _, model, info = load_scored(run, default_device())
    kind = info["kind"]
    torch.manual_seed(seed)
    images = draw_samples(kind, model, n, temperature, batch_size, stage1_temperature,
                          progress=n > batch_size, pixel_temperature=pixel_temperature)
    shown = images[:GRID_LIMIT]
    save_grid(shown, out)
    done = [f"Wrote {len(shown)} {kind.name} samples of '{run}' ("
            f"{describe_temperatures(kind, temperature, stage1_temperature, pixel_temperature)})"
            f" to {out}."]
    if npz:
        with atomic_path(npz) as temporary, open(temporary, "wb") as stream:
            np.savez(stream, samples=images)
        done.append(f"Saved all {len(images)} samples as uint8 NHWC under 'samples' in {npz}.")
    return "\n".join(done)


def describe_temperatures(kind: RunKind, temperature: float, stage1_temperature: float | None,
                          pixel_temperature: float | None) -> str:
    """How samples were drawn, in words: the temperatures that apply to the kind."""
    words = [f"latents at temperature {temperature:g}"]
    if kind.composite and stage1_temperature is not None:
        words.append(f"stage one's at {stage1_temperature:g}")
    if kind.has_likelihood:   # a DMoL head
        pixels = temperature if pixel_temperature is None else pixel_temperature
        words.append("each pixel at its most probable value" if pixels == 0
                     else f"pixels drawn at temperature {pixels:g}")
    return ", ".join(words)
