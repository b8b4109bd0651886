"""`progvae demo`: the whole method on scikit-learn's digits, on the CPU in a few minutes.

Stage one to a distortion target (OUT/stage1), stage two on it (OUT/stage2), 64 full-pipeline
samples (OUT/samples.png), and the two-stage model's held-out ELBO (bits/dim) and fid_digits.
Running it again on the same `out` finds the finished checkpoints and only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from progvae.core.config import load_config
from progvae.evaluation.metrics.evaluate import evaluate_run
from progvae.runs.sampling import sample_run
from progvae.runs.train import format_summary
from progvae.stages.stage1 import train_stage1
from progvae.stages.stage2 import train_stage2

TARGET = 0.02              # distortion target, MSE/dim
STEPS = 1600               # stage one; the `digits` preset's 2,400 take 90 to 105 s more
STAGE2_STEPS = 600
PIXEL_TEMPERATURE = 0.0    # OUT/samples.png: each pixel at its most probable value
FID_SAMPLES = 1000         # fid_digits samples: a few seconds on the CPU


def run_demo(out: str | Path = "runs/demo", steps: int = STEPS,
             stage2_steps: int = STAGE2_STEPS, quiet: bool = False, report=print) -> dict:
    """Run the demo into `out`, reporting progress and results through `report`; returns the
    two-stage model's summary with its fid_digits."""
    config = load_config("digits", {"distortion_target": TARGET, "steps": steps})
    stage1_out, stage2_out = f"{out}/stage1", f"{out}/stage2"
    report(f"progvae demo: stage one on built-in digits ({config.image_size}x"
           f"{config.image_size}), distortion target {config.distortion_target} MSE/dim, "
           f"{config.steps} steps -> {stage1_out}")
    started = time.perf_counter()
    report(format_summary(train_stage1(config, stage1_out, quiet=quiet), stage1_out,
                          "Stage one"))
    report(f"\nprogvae demo: stage two on the frozen stage one, {stage2_steps} steps -> "
           f"{stage2_out}")
    summary = train_stage2(dataclasses.replace(config, steps=stage2_steps), stage1_out,
                           stage2_out, quiet=quiet)
    report(format_summary(summary, stage2_out))
    # Latents drawn at temperature 1, each pixel at its most probable value: after a few
    # minutes of training stage two's per-pixel distributions are still broad, and drawing
    # every pixel from them (as stage2/samples.png does) buries the digits in speckle.
    report(sample_run(stage2_out, 64, Path(f"{out}/samples.png"), seed=0,
                      pixel_temperature=PIXEL_TEMPERATURE))
    scored = evaluate_run(stage2_out, metrics="fid_digits", n_samples=FID_SAMPLES)
    report(f"\nTwo-stage model, held-out digits: ELBO {summary['elbo']:.4f} nats/dim = "
           f"{summary['bpd']:.4f} bits/dim; fid_digits {scored['fid_digits']:.2f} "
           f"({FID_SAMPLES} samples against the {scored['n_images']} held-out digits, on a "
           "digit classifier's features: not comparable with Inception FIDs).")
    report(f"Demo finished in {time.perf_counter() - started:.0f} s.")
    return {**summary, "fid_digits": scored["fid_digits"]}
