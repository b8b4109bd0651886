"""Atomic checkpoint files and loading a run directory."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from progvae.atomic import atomic_path
from progvae.config import Config
from progvae.errors import UserError

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through `progvae.atomic.atomic_path`: a kill at any moment leaves either the
    old file or the new one, never half of one. A write that fails (a full disk, a quota or
    file-size limit) leaves the old one too, and is one sentence saying so."""
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            torch.save(obj, temporary)
    except (OSError, RuntimeError) as error:   # torch's writer reports a failed write as a
        # RuntimeError without the cause; say what there is, and how much room is left
        cause = error.strerror if isinstance(error, OSError) and error.strerror else \
            "the write failed"
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2 ** 30:.1f} GiB free there"
        except OSError:
            free = "free space unknown"
        raise UserError(f"Could not write '{path}' ({cause}; {free}): the previous checkpoint is "
                        "intact, so free space (or raise the file-size limit) and run the same "
                        "command again to continue from it.") from None


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs, and nothing that can run code: checkpoints written by
    progvae before its RNG states became tensors hold numpy's random state as an array."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def refused_global(error: pickle.UnpicklingError) -> str:
    """What a weights-only load refused, from its error: the pickled global it would not run."""
    return str(error).split("Unsupported global: GLOBAL ")[-1].split(" ")[0][:80]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without unpickling anything but tensors, numbers,
    strings and containers (`weights_only=True`): a file handed to progvae cannot run code. A
    file holding anything else, or one that is not a readable checkpoint, is one sentence."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"'{path}' holds objects progvae refuses to load (for example "
                        f"{refused_global(error)}): it was not written by progvae or has been "
                        "altered; progvae never unpickles code, so use a checkpoint written "
                        "by progvae.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise UserError(f"'{path}' is not a readable checkpoint ({first_line}); it may be "
                        "truncated or corrupt, so restore it or start a new --out.") from None
    if not isinstance(state, dict):
        raise UserError(f"'{path}' does not hold a progvae checkpoint; pass the --out of a "
                        "progvae run.")
    return state


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
