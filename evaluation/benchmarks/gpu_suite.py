"""`python -m progvae bench --suite=gpu`: the whole GPU check in one command.

The `svhn` preset at the paper's batch, timed as fp32 eager (TF32 off), TF32 eager and
bf16 + torch.compile (images/s, peak memory, fraction of the measured peak, warm-up seconds,
which include compiling), then 10,000 full-pipeline samples timed. Each variant's row is printed
as it is measured, so a check stopped at its time limit still says what it reached. Written to
bench_gpu.json and printed as a table. It refuses to run without a visible CUDA GPU. The GPU
tests are `PROGVAE_TEST_GPU=1 pytest tests/test_gpu.py`, run beside it, not inside it (they
take minutes of their own).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from progvae.core.config import Config
from progvae.core.errors import UserError

VARIANTS = (   # (label, config overrides, TF32 allowed)
    ("fp32 eager", {"precision": "fp32", "compile": "false"}, False),
    ("TF32 eager", {"precision": "fp32", "compile": "false"}, True),
    ("bf16 + compile", {"precision": "bf16", "compile": "true"}, True),
)
SAMPLES = 10_000
SAMPLE_BATCH = 500


def run_gpu_suite(config: Config, steps: int = 20, warmup: int = 5,
                  samples: int = SAMPLES) -> dict:
    from progvae.evaluation.benchmarks.bench import run_bench

    if not torch.cuda.is_available():
        raise UserError("bench --suite=gpu needs a CUDA GPU and none is visible; run it on a "
                        "GPU machine (the CPU benchmark is plain `bench`).")
    rows = []
    for label, overrides, tf32 in VARIANTS:
        result = run_bench(dataclasses.replace(config, **overrides), "stage1", steps, warmup,
                           sample_batches=1, tf32=tf32)
        rows.append({"variant": label, "tf32": tf32,
                     **{key: result[key] for key in (
                         "train_images_per_s", "peak_memory_mb", "fraction_of_peak",
                         "warmup_seconds", "batch", "parameters", "device_name")}})
        print(format_row(rows[-1]), flush=True)
    baseline, fastest = rows[0], rows[-1]
    summary = {
        "preset_batch": config.batch_size, "variants": rows,
        "speedup_bf16_compile_over_fp32": fastest["train_images_per_s"]["median"]
        / baseline["train_images_per_s"]["median"],
        "memory_ratio_bf16_compile_over_fp32": fastest["peak_memory_mb"]
        / baseline["peak_memory_mb"],
        "pipeline_samples": samples,
        "pipeline_sample_seconds": time_pipeline_samples(config, samples),
    }
    return summary


@torch.no_grad()
def time_pipeline_samples(config: Config, count: int) -> float:
    """Seconds to draw `count` full-pipeline samples (stage one, then stage two) in batches of
    SAMPLE_BATCH with random networks of the preset's shape, bf16 autocast."""
    from progvae.models.pipeline import Pipeline
    from progvae.runs.kinds import KINDS

    device = torch.device("cuda")
    pipeline = Pipeline(KINDS["stage1"].build(config), KINDS["stage2"].build(config))
    pipeline = pipeline.to(device).eval()
    kind = KINDS["stage2"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kind.sample(pipeline, SAMPLE_BATCH, 1.0, None, None)          # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, count, SAMPLE_BATCH):
            kind.sample(pipeline, min(SAMPLE_BATCH, count - start), 1.0, None, None)
        torch.cuda.synchronize()
    return time.perf_counter() - started


def format_row(row: dict) -> str:
    return (f"  {row['variant']:<16} {row['train_images_per_s']['median']:>9.1f} "
            f"{row['peak_memory_mb']:>9.0f} {100 * row['fraction_of_peak']:>7.1f}% "
            f"{row['warmup_seconds']:>10.1f}")


def format_suite(summary: dict) -> str:
    lines = [f"GPU check on {summary['variants'][0]['device_name']}, svhn preset at batch "
             f"{summary['preset_batch']} ({summary['variants'][0]['parameters']:,} parameters):",
             f"  {'variant':<16} {'images/s':>9} {'peak MiB':>9} {'of peak':>8} {'warm-up s':>10}"]
    lines += [format_row(row) for row in summary["variants"]]
    lines += [f"  bf16 + compile against fp32 eager: "
              f"{summary['speedup_bf16_compile_over_fp32']:.2f}x the images/s at "
              f"{summary['memory_ratio_bf16_compile_over_fp32']:.2f}x the memory",
              f"  {summary['pipeline_samples']:,} pipeline samples in "
              f"{summary['pipeline_sample_seconds']:.1f} s"]
    return "\n".join(lines)
