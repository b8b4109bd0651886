"""Every random number generator a training step draws from, captured and restored, so a
resumed run continues the interrupted one's random streams exactly.

Each rank's torch generators (the CPU one and, on a GPU, its own device's) are gathered into the
checkpoint, one row per rank, and each rank restores its own row: a rank never takes over
another device's generator. numpy's and Python's generators are rank 0's (they drive no
per-rank randomness). The state is tensors, numbers and strings only, so a checkpoint holding
it loads with `weights_only=True`.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from progvae.training import dist


def capture_rng_state() -> dict:
    """The generators' states; under torchrun a collective, called on every rank."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_as_tensors(),
        "python": random.getstate(),
        "per_rank": dist.gather_rows(_local_generators().unsqueeze(0)),
    }


def restore_rng_state(state: dict) -> None:
    """Set every generator to a state `capture_rng_state` returned: this rank's own row where
    the checkpoint has one per rank of this job's size, else rank 0's (the ranks draw one
    shared noise stream, so rank 0's generators continue every rank's)."""
    rows = state.get("per_rank")
    if rows is not None:
        row = rows[dist.rank()] if len(rows) == dist.world_size() else rows[0]
        _set_local_generators(row)
    else:   # a checkpoint written before the states were kept per rank
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda[0])   # rank 0's device's, the one it advanced
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(state["python"])


def _local_generators() -> torch.Tensor:
    """This process's torch generators as one uint8 row: the CPU generator's state, then (with
    CUDA) that of this process's current device."""
    parts = [torch.get_rng_state()]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_rng_state())
    return torch.cat(parts)


def _set_local_generators(row: torch.Tensor) -> None:
    size = torch.get_rng_state().numel()
    torch.set_rng_state(row[:size].clone())
    if torch.cuda.is_available() and row.numel() > size:
        torch.cuda.set_rng_state(row[size:].clone())


def _numpy_state_as_tensors() -> dict:
    """numpy's global RNG state as tensors and numbers, which a weights-only load accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(state) -> tuple:
    if isinstance(state, tuple):   # checkpoints written before the state became tensors
        return state
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["position"],
            state["has_gauss"], state["cached"])
