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
from progvae.training import history
from progvae.training.checkpoint import CHECKPOINT, load_checkpoint, load_run_config
from progvae.training.history import HISTORY
from progvae.config import ARCHITECTURE_FIELDS, Config
from progvae.data.loading import ImageData, load_data_for
from progvae.errors import UserError
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
    checkpoint = out_dir / CHECKPOINT
    if resume_from:
        resume_state = history.load_kept(out_dir, resume_from)
    else:
        resume_state = load_checkpoint(checkpoint) if checkpoint.is_file() else None
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
    "finished"}."""
    run_dir, config = load_run_config(run)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    kind = get_kind(state.get("stage"), f"'{run_dir}'")
    model = kind.build(config)
    model.load_state_dict(state["ema"])
    refuse_non_finite_weights(model, f"'{run_dir}'")
    model.to(device).eval().requires_grad_(False)
    info = {"stage": kind.name, "kind": kind, "step": state["step"],
            "finished": state["step"] >= config.steps}
    return config, model, info


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
    with: for a stage-two run the Pipeline of it and the stage-one run its config records."""
    config, model, info = load_model(run, device)
    if info["kind"].needs_stage1_run:
        model = _with_stage1(run, model, config.stage1, device)
    return config, model, info


def load_pipeline(run: str | Path, stage1_run: str | Path | None = None,
                  device: torch.device | str = "cpu") -> Pipeline:
    """A Pipeline from a joint run, or from a stage-two run and its stage-one run (the one its
    config.json records unless `stage1_run` is given)."""
    config, model, info = load_model(run, device)
    if not info["kind"].composite:
        raise UserError(f"'{run}' is a {info['stage']} run; a pipeline needs a stage2 or joint run.")
    if info["kind"].needs_stage1_run:
        return _with_stage1(run, model, stage1_run or config.stage1, device)
    return model


def _with_stage1(run, stage2: nn.Module, stage1_run, device) -> Pipeline:
    if not stage1_run:
        raise UserError(f"The stage-two run '{run}' does not record its stage-one run; pass it.")
    _, stage1, stage1_info = load_model(stage1_run, device)
    if stage1_info["kind"] is not KINDS["stage1"]:
        raise UserError(f"'{stage1_run}' is a {stage1_info['stage']} run, not a stage-one run.")
    return Pipeline(stage1, stage2).to(device).eval()
