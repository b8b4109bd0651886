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

from progvae.config import Config
from progvae.errors import UserError

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
    return _switch(config.channels_last, "channels_last", device)


def use_compile(config: Config, device: torch.device) -> bool:
    return _switch(config.compile, "compile", device)


def _switch(value: str, name: str, device: torch.device) -> bool:
    if value not in ("auto", "true", "false"):
        raise UserError(f"{name} must be auto, true or false, got '{value}'.")
    return value == "true" or (value == "auto" and device.type == "cuda")


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions on CUDA (fp32 accuracy is kept for the
    reductions that matter: KL and likelihood are computed in fp32 tensors)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
