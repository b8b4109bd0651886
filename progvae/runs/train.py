"""The one training entry point: every kind of run, the sweep and the progressive experiment
train through `train_run`.

It checks the data and the run directory, builds the kind's network, resumes from the last
checkpoint, trains (progvae.training.trainer), evaluates the EMA weights on the whole held-out
split with the one held-out evaluator (progvae.runs.heldout, the same numbers `evaluate`
gives), writes `summary.json` and the image grids. A stage supplies only what is its own,
as `StageParts`: the objective, and where it needs them a data check, a model adjustment,
extra summary keys. (progvae.data.cache's `Recipe` is another thing: how a dataset's cache is
built.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from progvae.core.atomic import atomic_write_json, flag_non_finite
from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.data.images import grid_canvas, rows_canvas, save_labelled, save_png
from progvae.data.loading import ImageData, to_model_input, to_uint8_images
from progvae.runs.curves import write_curves
from progvae.runs.directory import PreparedRun, prepare_run
from progvae.runs.heldout import HELDOUT_SEED, heldout_metrics, seeded
from progvae.runs.kinds import KINDS, RunKind
from progvae.training import dist
from progvae.training.objective import Objective
from progvae.training.trainer import Trainer


def _unchanged(model: nn.Module) -> nn.Module:
    return model


def _nothing(heldout: dict) -> dict:
    return {}


@dataclass
class StageParts:
    """What a stage hands the loop besides its kind."""

    objective: Objective                                              # the training loss
    check_data: Callable[[ImageData], None] | None = None             # refuse mismatched data
    prepare_model: Callable[[nn.Module, ImageData], None] | None = None   # e.g. freeze parts
    scored: Callable[[nn.Module], nn.Module] = _unchanged             # EMA network -> scored model
    summary: Callable[[dict], dict] = _nothing                        # extra keys from held-out
    quiet: bool = False


def train_run(kind: RunKind, config: Config, out: str | Path, parts: StageParts,
              resume_from: int = 0) -> tuple[dict, Trainer]:
    """Train (or continue) a run of `kind` in `out`; returns its summary (also written to
    `out/summary.json`, with reconstructions.png and samples.png beside it) and the trainer,
    whose `ema_model` is the trained network. `resume_from=STEP` continues from the kept
    checkpoint of that step instead of the latest (progvae.training.history)."""
    prepared = prepare_run(config, out, kind.name, parts.check_data, resume_from)
    try:
        return _train(kind, prepared, parts)
    finally:
        prepared.close()   # the run directory's lock


def start_from(model: nn.Module, config: Config, source: str) -> None:
    """Load the EMA weights of `source` (a run or an exported model) into a new run's model,
    whose architecture must match (--init_from)."""
    from progvae.core.config import ARCHITECTURE_FIELDS
    from progvae.runs.load import load_model

    source_config, trained, _ = load_model(source)
    differing = [name for name in ARCHITECTURE_FIELDS if name != "image_size"
                 and getattr(source_config, name) != getattr(config, name)]
    weights, expected = trained.state_dict(), model.state_dict()
    factor = rescaled_from(source_config, config) if differing else None
    if factor is not None:   # the same fully convolutional network, its names at another scale
        differing = [name for name in differing if name not in ("enc_blocks", "dec_blocks")]
        weights = {_rescaled_name(name, factor): value for name, value in weights.items()}
    if differing or set(weights) != set(expected) or any(
            value.shape != expected[name].shape for name, value in weights.items()):
        name = differing[0] if differing else "its layers"
        raise UserError(f"--init_from '{source}' has another architecture ({name} differs); "
                        "start from a model of the same architecture, or leave init_from empty.")
    model.load_state_dict(weights)


def rescaled_from(source: Config, config: Config) -> int | None:
    """The factor f when `config` is `source`'s fully convolutional network trained on crops f
    times larger: block strings whose resolutions (and mix-ins) are f times the source's, every
    layer the same (so its weights carry over, the resolution-keyed stream starts renamed);
    None otherwise."""
    from progvae.models.blocks import parse_block_string, scale_block_string

    if not (source.fully_convolutional and config.fully_convolutional) \
            or config.image_size % source.image_size or source.custom_width:
        return None
    factor = config.image_size // source.image_size
    same = all(parse_block_string(scale_block_string(getattr(source, name), factor))
               == parse_block_string(getattr(config, name)) for name in ("enc_blocks", "dec_blocks"))
    return factor if same and factor > 1 else None


def _rescaled_name(name: str, factor: int) -> str:
    prefix, _, resolution = name.rpartition(".")
    if prefix == "decoder.stream_init":
        return f"{prefix}.{int(resolution) * factor}"
    return name


def _train(kind: RunKind, prepared: PreparedRun, parts: StageParts) -> tuple[dict, Trainer]:
    config, data, run_dir = prepared.config, prepared.data, prepared.run_dir
    model = kind.build(config)
    if config.init_from and prepared.resume_state is None:
        start_from(model, config, config.init_from)
    if parts.prepare_model is not None:   # before the optimizer and DDP see the parameters
        parts.prepare_model(model, data)
    trainer = Trainer(model, parts.objective, config, data, run_dir, kind.name, parts.quiet)

    def evaluate() -> dict:
        scored = parts.scored(trainer.ema_model)
        return heldout_metrics(kind, scored, data.test, config.eval_batch_size, HELDOUT_SEED)

    def evaluate_periodically(step: int) -> None:
        """heldout.jsonl and TensorBoard, labelled grids in OUT/images/, curves.png."""
        trainer.log.heldout(step, evaluate())
        if dist.is_main():
            pictures = write_images(kind, parts.scored(trainer.ema_model), data,
                                    run_dir / "images", config.n_grid, config.seed,
                                    labelled_step=step)
            trainer.log.images(step, pictures)
            write_curves(run_dir)
        dist.barrier()

    trainer.evaluate_periodically = evaluate_periodically
    try:
        trainer.resume(prepared.resume_state)
        trainer.fit()
        heldout = evaluate()
        summary = flag_non_finite({**trainer.run_facts(), **summary_values(kind, heldout),
                                   **parts.summary(heldout)}, f"{run_dir}/summary.json")
        if dist.is_main():
            atomic_write_json(summary, run_dir / "summary.json")
            pictures = write_images(kind, parts.scored(trainer.ema_model), data, run_dir,
                                    config.n_grid, config.seed)
            if trainer.step > trainer.resumed_at:   # a finished run re-run logs nothing new
                trainer.log.scalars("heldout", trainer.step, heldout)
                trainer.log.images(trainer.step, pictures)
            if (run_dir / "metrics.jsonl").is_file():   # none if stopped before a log line
                write_curves(run_dir, final=heldout)
        dist.barrier()
    finally:
        trainer.log.close()
    return summary, trainer


def summary_values(kind: RunKind, heldout: dict) -> dict:
    """What summary.json reports of the held-out metrics: all of them, each once, under the
    names of `evaluate`'s eval.json (the distortion D is `mse`)."""
    values = {name: value for name, value in heldout.items() if name != "n_images"}
    values["heldout_images"] = heldout["n_images"]
    return values


@torch.no_grad()
def write_images(kind: RunKind, scored: nn.Module, data: ImageData, folder: Path, n: int,
                 seed: int, labelled_step: int | None = None) -> dict[str, np.ndarray]:
    """reconstructions.png: rows of held-out originals, (for two-stage kinds) stage one's
    x_tilde, and the reconstruction; samples.png: n samples at temperature 1. Fixed seed.
    With `labelled_step`, as step_NNNNNN_reconstructions.png and step_NNNNNN_samples.png, each
    with a caption saying what it shows. Returns the two pictures (for TensorBoard)."""
    device = next(scored.parameters()).device
    scored.eval()
    with seeded(seed, device):
        originals = data.test[:n]
        x = to_model_input(torch.from_numpy(originals)).to(device)
        final, x_tilde = kind.reconstruct(scored, x)
        rows = [originals] + ([] if x_tilde is None else [to_uint8_images(x_tilde.cpu())])
        samples = kind.sample(scored, n, 1.0, None, None)
        pictures = {"reconstructions": comparison_canvas(rows + [to_uint8_images(final.cpu())]),
                    "samples": grid_canvas(to_uint8_images(samples.cpu()))}
    if labelled_step is None:
        for name, picture in pictures.items():
            save_png(picture, folder / f"{name}.png")
        return pictures
    what = ("rows: held-out originals, stage one's x_tilde, the reconstruction"
            if x_tilde is not None else "rows: held-out originals, their reconstructions")
    captions = {"reconstructions": f"{kind.name}, step {labelled_step}, EMA weights; {what}",
                "samples": f"{kind.name}, step {labelled_step}, EMA weights; samples at "
                           "temperature 1.0"}
    for name, picture in pictures.items():
        save_labelled(picture, captions[name], folder / f"step_{labelled_step:06d}_{name}.png")
    return pictures


def comparison_canvas(image_sets: list[np.ndarray]) -> np.ndarray:
    """Aligned image sets (e.g. originals, stage one, final), uint8 NHWC of equal length, as
    groups of rows: a row of each set in turn, so every column shows one image's versions."""
    count = len(image_sets[0])
    columns = max(1, int(math.sqrt(len(image_sets) * count)))
    rows = []
    for start in range(0, count - columns + 1, columns):
        rows += [images[start:start + columns] for images in image_sets]
    return rows_canvas(rows or [images for images in image_sets])


def write_comparison(image_sets: list[np.ndarray], path: Path) -> None:
    save_png(comparison_canvas(image_sets), path)


def format_summary(summary: dict, out: str | Path, title: str = "") -> str:
    """What the training commands print of a summary.json: a heading, then the kind's numbers
    (a rate under a constraint, a composite ELBO, or an ELBO), then the files written.
    Non-finite values (None in the file, see progvae.core.atomic.flag_non_finite) print as
    nan."""
    summary = {key: float("nan") if value is None else value for key, value in summary.items()}
    kind = KINDS[summary["kind"]]
    lines = [f"\n{title or kind.name}, held-out split (EMA weights) after "
             f"{summary['steps']} steps ({summary['skipped']} skipped):"]
    if kind.composite:
        lines += [f"  ELBO {summary['elbo']:.4f} nats/dim = {summary['bpd']:.4f} bits/dim "
                  f"(stage-one rate {summary['stage1_rate']:.4f}, stage-two rate "
                  f"{summary['rate']:.4f}, nll {summary['nll']:.4f})",
                  f"  MSE of stage one {summary['stage1_distortion']:.5f} -> final "
                  f"{summary['mse']:.5f} (PSNR {summary['psnr']:.2f} dB)"]
    elif kind.has_likelihood:
        lines += [f"  ELBO {summary['elbo']:.4f} nats/dim = {summary['bpd']:.4f} bits/dim "
                  f"(rate {summary['rate']:.4f}, nll {summary['nll']:.4f})",
                  f"  MSE of the DMoL mean {summary['mse']:.5f} (PSNR {summary['psnr']:.2f} dB)"]
    else:
        notes = {"distortion": "", "rate": ""}
        if summary.get("constrained") in notes:   # absent from summaries of older runs
            notes[summary["constrained"]] = (f"  (target {summary['target']}, "
                                             f"{100 * summary['relative_error']:+.1f}%)")
        lines += [f"  distortion {summary['mse']:.5f} MSE/dim{notes['distortion']}   "
                  f"PSNR {summary['psnr']:.2f} dB",
                  f"  rate       {summary['rate']:.5f} nats/dim{notes['rate']}   "
                  f"multiplier {summary['multiplier']:.5g}"]
    lines.append(f"  {summary['steps_per_second']:.1f} steps/s; wrote {out}/summary.json, "
                 "reconstructions.png, samples.png")
    return "\n".join(lines)
