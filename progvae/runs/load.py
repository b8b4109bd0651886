"""Loading a trained run (a run directory or an exported file) back as its network, the
scored model or a pipeline, and exporting one: the one way every command loads a run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from progvae.core.atomic import writable_output
from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.core.untrusted import check_numbers, load_checkpoint, read_json
from progvae.models.pipeline import Pipeline
from progvae.runs.directory import load_run_config, recorded_kind
from progvae.runs.exported import (MODEL_PREFIX, STAGE1_PREFIX, ExportedNetwork, is_exported,
                                   read_exported, write_exported)
from progvae.runs.kinds import KINDS, get_kind
from progvae.training import performance
from progvae.training.checkpoint import CHECKPOINT


def load_model(run: str | Path, device: torch.device | str = "cpu"
               ) -> tuple[Config, nn.Module, dict]:
    """A trained run's config and its network with the EMA weights, in eval mode, and the
    checkpoint's bookkeeping: {"kind" (its RunKind), "step",
    "finished"}. `run` is a run directory or a file written by `progvae export`."""
    if is_exported(run):
        network, _ = read_exported(run, weights_of=(MODEL_PREFIX,))
        return _network(network.kind, network.config, network.weights, network.step,
                        f"'{run}'", device)
    run_dir, config = load_run_config(run)
    state = load_checkpoint(run_dir / CHECKPOINT)
    return _network(recorded_kind(state), config, state["ema"], state["step"], f"'{run_dir}'",
                    device)


def _network(kind_name, config: Config, weights: dict, step: int, source: str, device
             ) -> tuple[Config, nn.Module, dict]:
    kind = get_kind(kind_name, source)
    model = kind.build(config)
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(weights)) or [
        name for name, value in weights.items() if value.shape != expected[name].shape]
    if wrong:
        raise UserError(f"{source} holds weights that do not fit its config (e.g. {wrong[0]}); "
                        "it was altered or written by another version, so export or train it "
                        "again.")
    model.load_state_dict(weights)
    refuse_non_finite_weights(model, source)
    model.to(device).eval().requires_grad_(False)
    if performance.use_channels_last(config, torch.device(device)):
        # The layout training evaluated it in, so `evaluate` repeats its numbers exactly.
        model.to(memory_format=torch.channels_last)
    info = {"kind": kind, "step": step, "finished": step >= config.steps}
    return config, model, info


# summary.json's numbers that commands read back (the rest they only show)
SUMMARY_NUMBERS = ("mse", "rate", "psnr", "elbo", "bpd", "nll", "multiplier", "target",
                   "relative_error", "saturated_fraction", "stage1_rate", "stage1_distortion")


def run_summary(run: str | Path) -> dict:
    """A run's summary.json (or an exported model's copy of it); {} if it has none."""
    if is_exported(run):
        return read_exported(run, weights_of=())[0].summary
    path = Path(run) / "summary.json"
    if not path.is_file():
        return {}
    return check_numbers(read_json(path, {"steps": int}), SUMMARY_NUMBERS, str(path))


def export_run(run: str | Path, out: str | Path) -> str:
    """Write a run's EMA network (and for a stage-two run its stage one) with their configs to
    the safetensors file `out`; returns what was written, in words."""
    if not run:
        raise UserError("Pass --run=RUN, the directory of a trained run to export.")
    if not out:
        raise UserError("Pass --out=MODEL.safetensors, the file to write.")
    out = writable_output(out, "--out", ".safetensors")
    config, model, info = load_model(run)
    network = ExportedNetwork(info["kind"].name, config, info["step"], run_summary(run),
                              model.state_dict())
    stage1 = None
    if info["kind"].needs_stage1_run:
        stage1_config, stage1_model, stage1_info = _stage1_of(run, config, "cpu")
        stage1 = ExportedNetwork(stage1_info["kind"].name, stage1_config, stage1_info["step"],
                                 _stage1_summary(run, config), stage1_model.state_dict())
    write_exported(out, network, stage1)
    state = "finished" if info["finished"] else "not finished"
    return (f"Wrote the {info['kind'].name} run '{run}' at step {info['step']} ({state})"
            f"{' with its stage one' if stage1 is not None else ''} to {out}.")


def _stage1_of(run, config: Config, device) -> tuple[Config, nn.Module, dict]:
    """The stage one of a stage-two run: the one inside an exported file, else the stage-one
    run its config records."""
    if is_exported(run):
        _, stage1 = read_exported(run, weights_of=(STAGE1_PREFIX,))
        if stage1 is not None:
            return _network(stage1.kind, stage1.config, stage1.weights, stage1.step,
                            f"stage one in '{run}'", device)
    if not config.stage1:
        raise UserError(f"The stage-two run '{run}' does not record its stage-one run; pass it.")
    return _load_stage1(config.stage1, device)


def _load_stage1(path, device) -> tuple[Config, nn.Module, dict]:
    loaded = load_model(path, device)
    if loaded[2]["kind"] is not KINDS["stage1"]:
        raise UserError(f"'{path}' is a {loaded[2]['kind'].name} run, not a stage-one run.")
    return loaded


def _stage1_summary(run, config: Config) -> dict:
    if is_exported(run):
        _, stage1 = read_exported(run, weights_of=())
        if stage1 is not None:
            return stage1.summary
    return run_summary(config.stage1)


def refuse_non_finite_weights(model: nn.Module, source: str) -> None:
    """A network whose weights hold NaN or Inf (a run that diverged) is refused: everything
    computed from it would be NaN."""
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise UserError(f"{source} holds NaN or Inf weights in {len(bad)} tensor(s) (e.g. "
                        f"{bad[0]}): the run diverged; resume it from an earlier checkpoint "
                        "with a lower --lr, or retrain it.")


def load_scored(run: str | Path, device: torch.device | str = "cpu"
                ) -> tuple[Config, nn.Module, dict]:
    """Like `load_model`, but the model is the one the kind scores, samples and reconstructs
    with: for a stage-two run the Pipeline of it and its stage one."""
    config, model, info = load_model(run, device)
    if info["kind"].needs_stage1_run:
        model = Pipeline(_stage1_of(run, config, device)[1], model).to(device).eval()
    return config, model, info


def load_pipeline(run: str | Path, stage1_run: str | Path | None = None,
                  device: torch.device | str = "cpu") -> Pipeline:
    """A Pipeline from a joint run, or from a stage-two run and its stage one (the one it
    records unless `stage1_run` is given)."""
    config, model, info = load_model(run, device)
    if not info["kind"].composite:
        raise UserError(f"'{run}' is a {info['kind'].name} run; a pipeline needs a stage2 or "
                        "joint run.")
    if info["kind"].needs_stage1_run:
        stage1 = (_load_stage1(stage1_run, device) if stage1_run else
                  _stage1_of(run, config, device))[1]
        return Pipeline(stage1, model).to(device).eval()
    return model
