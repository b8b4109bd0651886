"""`python -m progvae bench`: how fast a training step, sampling and the data path are.

It times the trainer's real `train_step` (optimizer, EMA, controller and all) on synthetic
images of the preset's shape, and reports images/s (median over timed steps after warm-up,
with min and max), peak memory, FLOPs per step (torch.utils.flop_counter), the achieved FLOP/s
and its fraction of the device's measured peak (a large matmul timed in the same process and
dtype), pipeline sampling images/s and data-loader images/s.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.data.loading import ImageData
from progvae.models.activations import fused_gelu
from progvae.models.pipeline import Pipeline
from progvae.runs.kinds import KINDS
from progvae.training.controllers import LagrangianController
from progvae.training.trainer import Trainer


def synthetic_data(config: Config, n: int) -> ImageData:
    generator = np.random.default_rng(0)
    shape = (n, config.image_size, config.image_size, config.image_channels)
    return ImageData(train=generator.integers(0, 256, shape, dtype=np.uint8),
                     test=generator.integers(0, 256, (64, *shape[1:]), dtype=np.uint8),
                     name="synthetic")


def _stage1_objective(config: Config, device: torch.device):
    from progvae.stages.stage1 import Stage1Objective
    return Stage1Objective(LagrangianController(0.01, init=0.9))


def _stage2_objective(config: Config, device: torch.device):
    from progvae.stages.stage2 import CompositeObjective
    return CompositeObjective(KINDS["stage1"].build(config).to(device).eval().requires_grad_(False))


def _joint_objective(config: Config, device: torch.device):
    from progvae.stages.stage2 import CompositeObjective
    return CompositeObjective()


def _vdvae_objective(config: Config, device: torch.device):
    from progvae.stages.vdvae import ElboObjective
    return ElboObjective()


# The training objective bench times for each kind it can time (random networks, no data).
OBJECTIVES = {"stage1": _stage1_objective, "stage2": _stage2_objective,
              "joint": _joint_objective, "vdvae": _vdvae_objective}
MODELS = tuple(OBJECTIVES)


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the practical peak this process can reach."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_bench(config: Config, model: str = "stage1", steps: int = 20, warmup: int = 5,
              sample_batches: int = 3, device: str = "", profile: int = 0,
              tf32: bool = True) -> dict:
    """Benchmark one configuration; returns the numbers `bench` prints and writes. With
    `profile` > 0 it also profiles that many steps (torch.profiler) into "profile", a table
    of the operators that take the most time. `tf32=False` keeps CUDA matmuls and
    convolutions in full fp32 (the trainer otherwise allows TF32)."""
    if not isinstance(profile, int) or isinstance(profile, bool) or profile < 0:
        raise UserError(f"--profile must be a number of steps >= 0, got {profile!r}.")
    if model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got '{model}'.")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda was asked for but no CUDA device is visible.")
    if device == "cpu" and torch.cuda.is_available():
        raise UserError("--device=cpu on a CUDA machine: hide the GPUs with "
                        "CUDA_VISIBLE_DEVICES= to benchmark the CPU.")
    torch.manual_seed(config.seed)
    data = synthetic_data(config, max(512, 4 * config.batch_size))
    config = dataclasses.replace(config, steps=10 ** 9, log_every=10 ** 9, eval_every=0,
                                 checkpoint_every=0)
    with tempfile.TemporaryDirectory() as scratch:
        network = KINDS[model].build(config)
        trainer = Trainer(network, OBJECTIVES[model](config, torch.device("cpu")), config,
                          data, Path(scratch), model, quiet=True)
        device_ = trainer.device
        if device_.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        frozen = getattr(trainer.objective, "stage1", None)
        if frozen is not None:   # move the frozen stage one to where the step runs
            frozen.to(device_)
        warming = time.perf_counter()
        for _ in range(warmup):   # includes compiling, where compilation is on
            trainer.train_step()
        _synchronize(device_)
        warmup_seconds = time.perf_counter() - warming
        if device_.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device_)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            trainer.train_step()
            _synchronize(device_)
            times.append(time.perf_counter() - started)
        memory = peak_memory_bytes(device_)
        with FlopCounterMode(display=False) as counter:
            trainer.train_step()
        flops = counter.get_total_flops()
        sampling = sampling_rate(trainer, model, config, device_, sample_batches)
        table = profile_steps(trainer, device_, profile) if profile else None
    images = config.batch_size * config.accumulate
    median = statistics.median(times)
    dtype = trainer.autocast_dtype or torch.float32
    peak = measured_peak_flops(device_, dtype)
    result = {
        "model": model, "device": str(device_),
        "device_name": torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": images, "image_size": config.image_size,
        "precision": str(dtype).replace("torch.", ""), "compile": trainer.step_module is not
        trainer.loss_module, "channels_last": trainer.channels_last,
        "checkpoint_activations": config.checkpoint_activations,
        "cpu_gelu_operator": device_.type == "cpu" and dtype == torch.float32
        and trainer.step_module is trainer.loss_module and fused_gelu() is not None,
        "parameters": sum(p.numel() for p in network.parameters()),
        "train_images_per_s": {"median": images / median, "min": images / max(times),
                               "max": images / min(times)},
        "step_ms_median": 1000 * median,
        "warmup_seconds": warmup_seconds,
        "peak_memory_mb": memory / 2 ** 20,
        "flops_per_step": flops,
        "achieved_tflops": flops / median / 1e12,
        "measured_peak_tflops": peak / 1e12,
        "fraction_of_peak": flops / median / peak,
        "sample_images_per_s": sampling,
        "loader_images_per_s": loader_rate(data, config.batch_size),
    }
    if table is not None:
        result["profile"] = table
    return result


def profile_steps(trainer: Trainer, device: torch.device, steps: int) -> str:
    """torch.profiler over `steps` training steps: the 20 operators with the most self time
    (CUDA time on a GPU), which is what bounds the step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            trainer.train_step()
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=20)


@torch.no_grad()
def sampling_rate(trainer: Trainer, model: str, config: Config, device: torch.device,
                  batches: int) -> float:
    """Images/s of sampling with the EMA weights: stage-one mean samples, or full pipeline
    samples (a random stage one feeds stage two) for the other models."""
    kind = KINDS[model]
    network = trainer.ema_model
    if kind.needs_stage1_run:
        network = Pipeline(trainer.objective.stage1, network)
    draw = lambda n, temperature: kind.sample(network, n, temperature, None, None)  # noqa: E731
    n = max(config.batch_size, 64 if device.type == "cpu" else 500)
    draw(n, 1.0)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        draw(n, 1.0)
    _synchronize(device)
    return n * batches / (time.perf_counter() - started)


def loader_rate(data: ImageData, batch_size: int) -> float:
    from progvae.evaluation.benchmarks.bench_data import benchmark_loader

    return benchmark_loader(data, batch_size=batch_size, seconds=1.0)["images_per_second"]


def format_result(result: dict) -> str:
    rate = result["train_images_per_s"]
    return "\n".join([
        f"bench {result['model']} on {result['device_name']} ({result['threads']} threads), "
        f"batch {result['batch']} at {result['image_size']}px, {result['precision']}"
        f"{', compiled' if result['compile'] else ''}"
        f"{', channels_last' if result['channels_last'] else ''}"
        f"{', GELU operator' if result.get('cpu_gelu_operator') else ''}"
        f"{', activation checkpointing' if result['checkpoint_activations'] else ''}",
        f"  train  {rate['median']:.1f} images/s (min {rate['min']:.1f}, max {rate['max']:.1f}), "
        f"{result['step_ms_median']:.1f} ms/step",
        f"  flops  {result['flops_per_step'] / 1e9:.2f} GFLOP/step, achieved "
        f"{1000 * result['achieved_tflops']:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.1f}% "
        f"of measured peak {1000 * result['measured_peak_tflops']:.0f} GFLOP/s",
        f"  memory {result['peak_memory_mb']:.0f} MiB peak",
        f"  sample {result['sample_images_per_s']:.1f} images/s; "
        f"loader {result['loader_images_per_s']:.0f} images/s",
    ] + ([f"  profile of the step (operators by self time):\n{result['profile']}"]
         if "profile" in result else []))


def write_result(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
