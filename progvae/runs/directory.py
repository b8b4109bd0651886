"""Starting a run directory and loading one back: the one way every command does both."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import torch

from progvae.core.atomic import atomic_write_json
from progvae.core.config import ARCHITECTURE_FIELDS, Config
from progvae.core.errors import UserError
from progvae.core.untrusted import RESTORE, load_checkpoint, read_json
from progvae.data.loading import ImageData, load_data_for
from progvae.training import dist, history
from progvae.training.checkpoint import CHECKPOINT
from progvae.training.history import HISTORY

KIND_KEY = "kind"          # config.json's (and the checkpoint's) name of the run's kind
OLD_KIND_KEY = "stage"     # what runs written before the rename call it; still read
LOCK = ".progvae.lock"   # held (flock) by the one process writing a run directory


@dataclass
class PreparedRun:
    """A run directory ready for training: the resolved config, the data, the directory, the
    checkpoint to resume from (None for a new run) and the writer's lock, held until `close`."""

    config: Config
    data: ImageData
    run_dir: Path
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
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out='{out}' is a file; pass a directory.")
    _check_continuation(run_dir, config, stage)
    resume_state = _agreed_resume_state(run_dir, resume_from)
    lock = None
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out='{out}' cannot be created ({error.strerror}); pass a "
                            "directory you can write to.") from None
        lock = lock_run_directory(run_dir)
        remove_stale_temporaries(run_dir)
        if resume_from:
            aside = history.rewind(run_dir, resume_from)
            print(f"Going back to step {resume_from}; what came after it is set aside in "
                  f"{aside}.", flush=True)
        atomic_write_json({KIND_KEY: stage, **config.to_dict()}, run_dir / "config.json")
    dist.barrier()
    # The same seed on every rank: identical initial weights and one shared noise stream.
    torch.manual_seed(config.seed)
    return PreparedRun(config, data, run_dir, resume_state, lock)


def _agreed_resume_state(run_dir: Path, resume_from: int) -> dict | None:
    """The checkpoint state to continue from (None: start afresh), the same on every rank:
    rank 0 decides from what it sees, and a rank that cannot see that checkpoint (several nodes
    without a shared --out) is sent it by rank 0 instead of starting at step 0 on its own."""
    def load() -> dict | None:
        if resume_from:
            return history.load_kept(run_dir, resume_from)
        path = run_dir / CHECKPOINT
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


def lock_run_directory(run_dir: Path) -> IO:
    """An exclusive lock on the run directory (flock on OUT/.progvae.lock, which the OS releases
    when the process dies); a second writer is refused at once, naming the holder."""
    try:
        handle = open(run_dir / LOCK, "a+")
    except OSError as error:
        raise UserError(f"'{run_dir}' is not writable ({error.strerror}); pass a directory you "
                        "can write to.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"'{run_dir}' is being written by {holder}; wait for that run to end "
                        "(or stop it), or pass another --out.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"progvae pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files an interrupted atomic write left behind (progvae.core.atomic names them
    NAME.PID.HEX.tmp); only called by the lock holder, so none of them is being written."""
    for path in [*run_dir.glob("*.tmp"), *(run_dir / HISTORY).glob("*.tmp")]:
        parts = path.name.split(".")
        if len(parts) >= 4 and parts[-3].isdigit() and len(parts[-2]) == 8:
            path.unlink(missing_ok=True)


def _check_continuation(run_dir: Path, config: Config, stage: str) -> None:
    """A run directory that already holds a run may only be continued by the same kind of run
    with the same architecture; anything else would overwrite it."""
    previous = run_dir / "config.json"
    if not previous.is_file():
        return
    kind, recorded = read_run_config(previous, fix="restore it, or pass a new --out")
    if kind != stage:
        raise UserError(f"'{run_dir}' holds a {kind} run; pass a new --out for this {stage} run.")
    changed = [name for name in ARCHITECTURE_FIELDS
               if getattr(recorded, name) != getattr(config, name)]
    if changed:
        raise UserError(f"'{run_dir}' holds a run with a different architecture "
                        f"({', '.join(changed)}); pass a new --out or the same settings.")


def load_run_config(run: str | Path) -> tuple[Path, Config]:
    """The run directory and its resolved config; fails with one sentence if it is no run."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"Run directory '{run}' does not exist; pass the --out of a training run.")
    if not (run / "config.json").is_file() or not (run / CHECKPOINT).is_file():
        raise UserError(f"'{run}' holds no {CHECKPOINT} (or config.json); train it first or pass "
                        "the --out of a run that has written a checkpoint.")
    return run, read_run_config(run / "config.json")[1]


def read_run_config(path: Path, fix: str = RESTORE) -> tuple[str | None, Config]:
    """A run's config.json as the kind it records and its Config (a field an older run does not
    record has its default value); a damaged or hand-edited file is one sentence naming it."""
    values = read_json(path, fix=fix)
    return recorded_kind(values), Config.from_dict(config_fields(values), source=str(path))


def recorded_kind(values: dict) -> str | None:
    """The kind a run's config.json or checkpoint records (under its old name too)."""
    return values.get(KIND_KEY, values.get(OLD_KIND_KEY))


def config_fields(values: dict) -> dict:
    """config.json's values less the kind: the Config's fields."""
    return {name: value for name, value in values.items()
            if name not in (KIND_KEY, OLD_KIND_KEY)}
