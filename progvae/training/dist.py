"""Distributed helpers that are no-ops in one process.

Under `torchrun` the environment names this process's rank; `setup` joins the process group
(NCCL on CUDA, gloo on CPU) and everything else here then talks to the other ranks. Without
torchrun every helper answers as the only process would, so the single-process path always
exists and needs no flag.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as torch_dist

from progvae.core.errors import UserError


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(timeout_seconds: float) -> None:
    """Join the process group torchrun describes; a no-op in a single process.

    `timeout_seconds` bounds the rendezvous and every collective, so a dead peer ends the run
    with an error instead of hanging it."""
    if not launched_by_torchrun() or is_distributed():
        return
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        store, rank_, size = next(torch_dist.rendezvous("env://", timeout=timeout))
        # torchrun's static rendezvous keeps one store across restarts, so a restarted group
        # would read the dead attempt's addresses and fail to connect; key each attempt apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = torch_dist.PrefixStore(f"progvae/attempt_{attempt}", store)
        torch_dist.init_process_group(backend, store=store, rank=rank_, world_size=size,
                                      timeout=timeout)
    except (RuntimeError, TimeoutError, ValueError) as error:
        raise UserError(f"Could not join the torchrun process group within {timeout_seconds:g} s "
                        f"({str(error).splitlines()[0]}); check that every node was started.")


def set_cpu_threads(requested: int = 0) -> int:
    """Set this process's torch CPU threads (see `cpu_threads`); returns the count in effect."""
    threads = cpu_threads(requested, os.environ, usable_cores())
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_threads(requested: int, environ, cores: int) -> int:
    """The threads a process should use, or 0 for torch's own choice: `requested` (--num_threads)
    when > 0; else, with several processes on this machine (torchrun's LOCAL_WORLD_SIZE), the
    cores divided among them. torchrun sets OMP_NUM_THREADS=1 in every process unless it is
    already set, so "1" counts as unset here (pass --num_threads=1 for one thread); any other
    OMP_NUM_THREADS is the user's and torch already follows it."""
    if requested > 0:
        return requested
    local = int(environ.get("LOCAL_WORLD_SIZE") or 1)
    if local <= 1 or environ.get("OMP_NUM_THREADS", "1") != "1":
        return 0
    return max(1, cores // local)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cleanup() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


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


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def max_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return values


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank (`value` itself in one process)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    torch_dist.broadcast(tensor, src=0)
    return int(tensor.item())


def all_ranks_agree(flag: bool) -> bool:
    """Whether `flag` is true on every rank."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], device=collective_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MIN)
    return bool(tensor.item())


def broadcast_object(value):
    """Rank 0's `value` (any picklable object, e.g. a checkpoint's state) on every rank. The
    pickle travels between this job's own processes only, never from a file."""
    if not is_distributed():
        return value
    holder = [value if is_main() else None]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def default_device() -> torch.device:
    """The device this process computes on: its local GPU under torchrun, the current GPU in
    one process, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() if is_distributed() else
                            torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(local: torch.device | str = "cpu") -> torch.device:
    """Where tensors must be for a collective: this rank's GPU under NCCL, the CPU under gloo,
    and `local` in one process, where the collective is the identity (so a CUDA tensor need
    not wait for a copy to the host)."""
    if not is_distributed():
        return torch.device(local)
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(count: int) -> slice:
    """This rank's contiguous share of `count` items (all of them in one process); the shares
    of all ranks cover every item exactly once, in order."""
    return slice(rank() * count // world_size(), (rank() + 1) * count // world_size())


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N_r, ...) tensor along dim 0, in rank order, on every rank;
    the N_r may differ. Returns a CPU tensor (`rows` itself in one process)."""
    if not is_distributed():
        return rows
    device = collective_device()
    local = rows.to(device)
    count = torch.tensor([len(local)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    torch_dist.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros((largest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    torch_dist.all_gather(pieces, padded)
    return torch.cat([piece[:int(c.item())] for piece, c in zip(pieces, counts)]).cpu()
