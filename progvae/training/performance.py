"""Speed switches for the training step: reduced precision, memory format, compilation.

Each is a config field and each defaults to "auto", which turns it on where it helps (CUDA)
and off where it does not (CPU, where these models are bound by per-operator overhead).
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch
from torch import nn

from progvae.core.config import Config
from progvae.core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (None = full fp32). KL, DMoL likelihood and loss reductions are computed
    in fp32 inside the model regardless, so only convolutions run in bf16."""
    if config.precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                        f"'{config.precision}'.")
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "auto" and device.type == "cuda":
        return auto_dtype(torch.cuda.get_device_capability(device))
    return None


def auto_dtype(capability: tuple[int, int]) -> torch.dtype | None:
    """precision=auto on a GPU of this compute capability: bf16 where the tensor cores run it
    natively (8.0, Ampere, and later); fp32 before (T4, V100), where bf16 is emulated and
    slower than fp32."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(config: Config, device: torch.device) -> bool:
    """NHWC on CUDA and, since oneDNN's convolutions run about twice as fast in it on these
    models' narrow layers, on the CPU too."""
    return _switch(config.channels_last, "channels_last", device, cpu_auto=True)


def use_compile(config: Config, device: torch.device) -> bool:
    return _switch(config.compile, "compile", device)


def _switch(value: str, name: str, device: torch.device, cpu_auto: bool = False) -> bool:
    if value not in ("auto", "true", "false"):
        raise UserError(f"{name} must be auto, true or false, got '{value}'.")
    return value == "true" or (value == "auto" and (device.type == "cuda" or cpu_auto))


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions on CUDA (fp32 accuracy is kept for the
    reductions that matter: KL and likelihood are computed in fp32 tensors); on the CPU, a
    malloc that keeps freed memory for reuse (`keep_freed_memory`)."""
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2 ** 20   # the largest glibc accepts on 64-bit machines
TRIM_THRESHOLD_MAX = 2 ** 31 - 1    # an int


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that tensors free for the next ones, rather than
    handing it back to the operating system; returns whether it could (Linux with glibc).

    By default glibc maps every block over a (dynamic) threshold fresh from the kernel and trims
    freed memory at the top of the heap, so each training step pays a page fault per 4 KiB of
    the activations it allocates: about 115,000 faults, 450 MB, per step of the `svhn` blocks
    at width 64, and 8.2 against 10.3 images/s with them gone. Blocks up to 32 MiB then come
    from the heap and the heap is not trimmed, so the process keeps its peak memory while it
    runs (as jemalloc and tcmalloc, which PyTorch recommends for CPUs, also do)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                    and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX))
    except (OSError, AttributeError):   # not glibc (musl, an embedded libc): leave it be
        return False


def compiled_or_eager(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(module), or the module itself if compilation is off or unavailable.
    Each compiled training run starts from empty compiler caches, so runs one after another in
    one process (a sweep, the progressive experiment) do not pile their graphs up towards
    torch's recompile limit, past which it would silently run eagerly."""
    if not enabled:
        return module
    try:
        torch._dynamo.reset()
        return torch.compile(module)
    except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
        warn_compile_failed(error)
        return module


def compiler_errors() -> tuple[type[BaseException], ...]:
    """The errors torch.compile's own machinery raises (Dynamo, Inductor, the C++ and CUDA
    compilers it calls): only these mean "run eagerly instead". Out-of-memory, NCCL and the
    model's own errors are not among them."""
    import torch._dynamo.exc as dynamo
    import torch._inductor.exc as inductor

    names = ("CppCompileError", "CUDACompileError", "XPUCompileError")
    return (dynamo.TorchDynamoException,
            *(getattr(inductor, name) for name in names if hasattr(inductor, name)))


def warn_compile_failed(error: BaseException) -> None:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    warnings.warn(f"torch.compile failed ({first_line[:200]}); continuing without compilation.",
                  stacklevel=2)
    print(f"WARNING: torch.compile failed ({first_line[:200]}); running eagerly.",
          file=sys.stderr)
