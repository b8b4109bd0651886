"""Every random number generator a training step draws from, captured and restored, so a
resumed run continues the interrupted one's random streams exactly.

The state is tensors, numbers and strings only, so a checkpoint holding it loads with
`weights_only=True`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """The torch (CPU and every CUDA device), numpy and Python generators' states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": _numpy_state_as_tensors(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Set every generator to a state `capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(state["python"])


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
