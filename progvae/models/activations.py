"""GELU, the VDVAE blocks' activation, with a faster training path on the CPU.

Every convolution of a VDVAE block reads a GELU, so a training step evaluates about six
hundred of them and, in the backward pass, their derivatives. torch's GELU saves its input and
evaluates erf and exp again for the derivative: a fifth of a CPU step on the `svhn` blocks.
`gelu.cpp` (an operator compiled on first use for the CPU it runs on) writes GELU(x) and
GELU'(x) in one pass, so the backward pass is one multiplication; the values equal torch's to
float rounding.

`gelu(x)` takes that path for float32 CPU tensors that need a gradient, and torch's GELU for
everything else (GPUs, reduced precision, evaluation, torch.compile). Where the operator cannot
be compiled (no C++ compiler, ninja or OpenMP) it warns once and uses torch's GELU.
PROGVAE_FUSED_GELU=0 in the environment turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from progvae.core.atomic import atomic_write_text

SOURCE = Path(__file__).with_name("gelu.cpp")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x Phi(x) (exact, erf-based, as VDVAE uses)."""
    if (x.requires_grad and x.dtype == torch.float32 and x.device.type == "cpu"
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        operator = fused_gelu()
        if operator is not None:
            return operator(x)
    return F.gelu(x)


@functools.cache   # built (or found wanting) once per process
def fused_gelu():
    """The compiled operator, building it on the first call; None where it is switched off or
    cannot be built."""
    if os.environ.get("PROGVAE_FUSED_GELU", "1") == "0":
        return None
    try:
        return _load()
    except Exception as error:  # noqa: BLE001 - any build failure means: use torch's GELU
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"progvae could not compile its CPU GELU operator ({first_line[:200]}); "
                      "training uses torch's GELU, which is slower on the CPU.", stacklevel=3)
        return None


@contextlib.contextmanager
def _build_environment(ninja_bin: str):
    """What torch's extension builder needs, for the build alone: the ninja executable on PATH
    (torch runs `ninja` from PATH and takes no path to it) and its logger quiet (it warns about
    CUDA_HOME on machines without CUDA). Both are restored afterwards, so the process's
    environment and torch's logging are as they were."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level, path = logger.level, os.environ.get("PATH")
    logger.setLevel(logging.ERROR)
    os.environ["PATH"] = ninja_bin + os.pathsep + (path or "")
    try:
        yield
    finally:
        logger.setLevel(level)
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _load():
    import ninja  # a dependency: torch's builder runs the `ninja` executable from PATH

    with _build_environment(ninja.BIN_DIR):
        from torch.utils import cpp_extension

        return _build(cpp_extension)


def _build(cpp_extension):
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    cflags = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", *openmp]
    # -march=native builds for this CPU: the name carries the CPU's identity, so a build
    # directory shared between machines (a cluster's home) never hands one CPU another's code.
    text = SOURCE.read_text()
    identity = "\n".join([text, " ".join(cflags), torch.__version__, platform.machine(),
                          _cpu_flags()])
    name = "progvae_gelu_" + hashlib.sha256(identity.encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build = Path(root, "progvae", name)
    if not (build / f"{name}.so").exists():
        print("progvae: compiling the CPU GELU operator for this machine (once, about 15 s)",
              file=sys.stderr, flush=True)
        build.mkdir(parents=True, exist_ok=True)
    # Built from a copy inside the build folder: ninja rebuilds when a source's path changes,
    # and every checkout of progvae (the same text, hence the same folder) then shares one build.
    source = build / SOURCE.name
    if not source.exists() or source.read_text() != text:
        atomic_write_text(text, source)
    cpp_extension.load(name, [str(source)], extra_cflags=cflags, extra_ldflags=openmp,
                       build_directory=str(build), is_python_module=False, verbose=False)
    return torch.ops.progvae.gelu


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
