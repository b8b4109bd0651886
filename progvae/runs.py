"""Starting a run directory and loading one back: the one way every command does both."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import torch
from torch import nn

from progvae.training import dist
from progvae.atomic import atomic_write_json
from progvae.training import history, performance
from progvae.training.checkpoint import CHECKPOINT, load_checkpoint, load_run_config
from progvae.training.history import HISTORY
from progvae.config import ARCHITECTURE_FIELDS, Config
from progvae.data.loading import ImageData, load_data_for
from progvae.errors import UserError
from progvae.exported import (MODEL_PREFIX, STAGE1_PREFIX, ExportedNetwork, is_exported,
                              read_exported, write_exported)
from progvae.kinds import KINDS, get_kind
from progvae.models.pipeline import Pipeline


LOCK = ".progvae.lock"   # held (flock) by the one process writing a run directory


@dataclass
class PreparedRun:
    """A run directory ready for training: the resolved config, the data, the directory, the
    checkpoint to resume from (None for a new run) and the writer's lock, held until `close`."""

    config: Config
    data: ImageData
    out_dir: Path
    resume_state: dict | None
    lock: IO | None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()   # releases the flock
            self.lock = None


def prepare_run(config: Config, out: str | Path, stage: str,
                check_data: Callable[[ImageData], None] | None = None,
                resume_from: int = 0) -> PreparedRun:
    """Load and check the data (also with `check_data`, if given), fill in what the data
    decides, check that `out` may be continued and load its checkpoint, then take the run
    directory's lock and write config.json. Everything that can fail on bad input fails before
    the first write, so a refused command changes no file of an existing run. `resume_from`:
    continue from the kept checkpoint of that step (progvae.training.history), not the latest."""
    if not out:
        raise UserError("Pass --out=DIR, the run directory to write (or to continue).")
    dist.setup(config.dist_timeout)
    dist.set_cpu_threads(config.num_threads)
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
    resume_state = _agreed_resume_state(out_dir, resume_from)
    lock = None
    if dist.is_main():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out='{out}' cannot be created ({error.strerror}); pass a "
                            "directory you can write to.") from None
        lock = lock_run_directory(out_dir)
        remove_stale_temporaries(out_dir)
        if resume_from:
            aside = history.rewind(out_dir, resume_from)
            print(f"Going back to step {resume_from}; what came after it is set aside in "
                  f"{aside}.", flush=True)
        atomic_write_json({"stage": stage, **config.to_dict()}, out_dir / "config.json")
    dist.barrier()
    # The same seed on every rank: identical initial weights and one shared noise stream.
    torch.manual_seed(config.seed)
    return PreparedRun(config, data, out_dir, resume_state, lock)


def _agreed_resume_state(out_dir: Path, resume_from: int) -> dict | None:
    """The checkpoint state to continue from (None: start afresh), the same on every rank:
    rank 0 decides from what it sees, and a rank that cannot see that checkpoint (several nodes
    without a shared --out) is sent it by rank 0 instead of starting at step 0 on its own."""
    def load() -> dict | None:
        if resume_from:
            return history.load_kept(out_dir, resume_from)
        path = out_dir / CHECKPOINT
        return load_checkpoint(path) if path.is_file() else None

    if not dist.is_distributed():
        return load()
    state = load() if dist.is_main() else None
    step = dist.broadcast_int(-1 if state is None else int(state["step"]))
    if step < 0:
        return None
    if not dist.is_main():
        try:
            state = load()
        except UserError:
            state = None
        if state is not None and state.get("step") != step:
            state = None
    if not dist.all_ranks_agree(state is not None):
        state = dist.broadcast_object(state)
    return state


def lock_run_directory(out_dir: Path) -> IO:
    """An exclusive lock on the run directory (flock on OUT/.progvae.lock, which the OS releases
    when the process dies); a second writer is refused at once, naming the holder."""
    try:
        handle = open(out_dir / LOCK, "a+")
    except OSError as error:
        raise UserError(f"'{out_dir}' is not writable ({error.strerror}); pass a directory you "
                        "can write to.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"'{out_dir}' is being written by {holder}; wait for that run to end "
                        "(or stop it), or pass another --out.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"progvae pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files an interrupted atomic write left behind (progvae.atomic names them
    NAME.PID.HEX.tmp); only called by the lock holder, so none of them is being written."""
    for path in [*out_dir.glob("*.tmp"), *(out_dir / HISTORY).glob("*.tmp")]:
        parts = path.name.split(".")
        if len(parts) >= 4 and parts[-3].isdigit() and len(parts[-2]) == 8:
            path.unlink(missing_ok=True)


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
    defaults = Config()   # a field an older run does not record had its default value
    changed = [name for name in ARCHITECTURE_FIELDS
               if values.get(name, getattr(defaults, name)) != getattr(config, name)]
    if changed:
        raise UserError(f"'{out_dir}' holds a run with a different architecture "
                        f"({', '.join(changed)}); pass a new --out or the same settings.")


def load_model(run: str | Path, device: torch.device | str = "cpu"
               ) -> tuple[Config, nn.Module, dict]:
    """A trained run's config and its network with the EMA weights, in eval mode, and the
    checkpoint's bookkeeping: {"stage" (the kind's name), "kind" (its RunKind), "step",
    "finished"}. `run` is a run directory or a file written by `progvae export`."""
    if is_exported(run):
        network, _ = read_exported(run, weights_of=(MODEL_PREFIX,))
        return _network(network.kind, network.config, network.weights, network.step,
                        f"'{run}'", device)
    run_dir, config = load_run_config(run)
    state = load_checkpoint(run_dir / CHECKPOINT)
    return _network(state.get("stage"), config, state["ema"], state["step"], f"'{run_dir}'",
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
    info = {"stage": kind.name, "kind": kind, "step": step, "finished": step >= config.steps}
    return config, model, info


def run_summary(run: str | Path) -> dict:
    """A run's summary.json (or an exported model's copy of it); {} if it has none."""
    if is_exported(run):
        return read_exported(run, weights_of=())[0].summary
    path = Path(run) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export_run(run: str | Path, out: str | Path) -> dict:
    """Write a run's EMA network (and for a stage-two run its stage one) with their configs to
    the safetensors file `out`; returns what was written, for the message."""
    config, model, info = load_model(run)
    network = ExportedNetwork(info["stage"], config, info["step"], run_summary(run),
                              model.state_dict())
    stage1 = None
    if info["kind"].needs_stage1_run:
        stage1_config, stage1_model, stage1_info = _stage1_of(run, config, "cpu")
        stage1 = ExportedNetwork(stage1_info["stage"], stage1_config, stage1_info["step"],
                                 _stage1_summary(run, config), stage1_model.state_dict())
    write_exported(out, network, stage1)
    return {"kind": info["stage"], "step": info["step"], "finished": info["finished"],
            "with_stage1": stage1 is not None}


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
        raise UserError(f"'{path}' is a {loaded[2]['stage']} run, not a stage-one run.")
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
        raise UserError(f"'{run}' is a {info['stage']} run; a pipeline needs a stage2 or joint run.")
    if info["kind"].needs_stage1_run:
        stage1 = (_load_stage1(stage1_run, device) if stage1_run else
                  _stage1_of(run, config, device))[1]
        return Pipeline(stage1, model).to(device).eval()
    return model
