"""Distributed helpers that are no-ops in one process (torchrun sets the environment)."""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity in one process)."""
    if is_distributed():
        values = values.clone()
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
        values /= world_size()
    return values


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
