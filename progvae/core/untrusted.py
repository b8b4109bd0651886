"""Reading back files handed to progvae, which are untrusted: nothing is unpickled but tensors,
numbers, strings and containers, and a file that is not what it should be is one sentence
naming it (a UserError), never a traceback."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from progvae.core.errors import UserError


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
