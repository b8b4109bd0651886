"""Make the codec's shipped weights: every `--quality` level's stage one of the `codec` preset,
trained side by side for a wall-clock budget, then exported in float16 as
OUT/quality_N.safetensors, the files progvae/codec/weights/ ships (see its MODEL_CARD.md).

    python -m progvae.evaluation.experiments.codec_weights --out=weights --minutes=80 \\
        --threads=1 --steps=8000 [--qualities=12] [--image_size=N] [--init_from_shipped]

Each level is `python -m progvae stage1 --config=codec --distortion_target=T` in OUT/runs/
quality_N, stopped by SIGTERM when the budget is spent (a clean stop with a checkpoint), then
finished at the step it reached (`--steps=STEP`: the held-out evaluation and summary.json) and
exported. With --init_from_shipped each level starts from the weights that ship now
(`--init_from`), so a short GPU lease adds to the training before it instead of restarting it.
Running it again on the same OUT continues the runs. Each exported level then compresses the
held-out photographs whole (OUT/quality_N/*.pvc; `held_out_photographs` in its summary, printed,
and OUT/summaries.json). On a GPU raise --batch_size (the preset's 8 keeps a CPU step short).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from progvae.codec.shipped import QUALITY_TARGETS, shipped_path
from progvae.core.config import load_config
from progvae.core.untrusted import load_checkpoint
from progvae.models.blocks import scale_block_string

# --quality -> the multiplier's upper limit (--multiplier_max): while a level's distortion
# target is out of reach the Lagrangian's multiplier sits at its limit, and at the default
# 0.9999 the rate weighs 1/9999 of the distortion, so the rate grows freely (measured: quality
# 2 fine-tuned at lr 1e-3 went from 0.12 to 0.29 nats/dim in 1,250 steps at the same
# distortion, and quality 3 became the same model). These limits are the slope
# D-weight / R-weight = 1 / (2 D) that the high-rate law R = log(sigma^2 / D) / 2 gives at each
# target, rounded up: 0.99, 0.995 and 0.998 (ratios 99, 199 and 499).
MULTIPLIER_LIMITS = {1: 0.99, 2: 0.995, 3: 0.998}
LEARNING_RATE = 5e-4   # the preset's 1e-3 held quality 2's distortion at 0.0040, above target


def stage1_command(quality: int, run: Path, batch_size: int, init_from_shipped: bool,
                   threads: int, steps: int, lr_decay_steps: int, image_size: int = 0
                   ) -> list[str]:
    command = [sys.executable, "-m", "progvae", "stage1", "--config=codec",
               f"--distortion_target={QUALITY_TARGETS[quality]}", f"--batch_size={batch_size}",
               "--eval_every=0", "--checkpoint_every=1000", "--tensorboard=false",
               f"--num_threads={threads}", "--quiet=True", f"--out={run}", f"--steps={steps}",
               f"--lr_decay_steps={lr_decay_steps}", f"--lr={LEARNING_RATE}",
               f"--multiplier_max={MULTIPLIER_LIMITS[quality]}"]
    if image_size:   # the preset's network on larger crops: its block strings scaled
        preset = load_config("codec")
        factor = image_size // preset.image_size
        command += [f"--image_size={image_size}",
                    f"--enc_blocks={scale_block_string(preset.enc_blocks, factor)}",
                    f"--dec_blocks={scale_block_string(preset.dec_blocks, factor)}"]
    if init_from_shipped:
        command.append(f"--init_from={shipped_path(quality)}")
    return command


def make_weights(out: Path, minutes: float, batch_size: int = 8, init_from_shipped: bool = False,
                 threads: int = 2, steps: int = 0, image_size: int = 0,
                 qualities: tuple[int, ...] = tuple(QUALITY_TARGETS)) -> dict:
    """Train the `qualities` levels for `minutes` of wall time side by side (or until `steps`,
    whose last fifth trains at a tenth of the learning rate), on crops of `image_size` (0: the
    preset's), finish and export them; returns {quality: summary.json of its run}."""
    decay = steps // 5
    steps = steps or 1_000_000
    out.mkdir(parents=True, exist_ok=True)
    runs = {quality: out / "runs" / f"quality_{quality}" for quality in qualities}
    logs = {quality: open(out / f"quality_{quality}.log", "a") for quality in qualities}
    processes = {quality: subprocess.Popen(
        stage1_command(quality, run, batch_size, init_from_shipped, threads, steps, decay,
                       image_size),
        stdout=logs[quality], stderr=subprocess.STDOUT) for quality, run in runs.items()}
    deadline = time.monotonic() + 60 * minutes
    while any(p.poll() is None for p in processes.values()) and time.monotonic() < deadline:
        time.sleep(1)
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)   # a clean stop after the current update
    for process in processes.values():
        process.wait()
    summaries = {}
    for quality, run in runs.items():
        reached = load_checkpoint(run / "checkpoint.pt")["step"]
        finish = stage1_command(quality, run, batch_size, False, threads, reached, decay,
                                image_size)
        subprocess.run(finish, stdout=logs[quality], stderr=subprocess.STDOUT, check=True)
        export_half(run, out / f"quality_{quality}.safetensors")
        summaries[quality] = json.loads((run / "summary.json").read_text())
        summaries[quality]["held_out_photographs"] = whole_photographs(
            out / f"quality_{quality}.safetensors")
        logs[quality].close()
    return summaries


def whole_photographs(weights: Path) -> list[dict]:
    """Each held-out photograph compressed whole by `weights` (the .pvc files beside them, in
    a folder of the same name): [{"photo", "bits_per_pixel", "psnr"}]. The run's held-out
    figures are crops, which can hide how the coarse latents behave away from a border: a
    quality 1 trained 9,700 steps on 64x64 crops (its stride-32 latents on a 2x2 grid) scored
    27.15 dB on such crops and 14.11 dB on coffee whole."""
    from progvae.codec.files import compress_files, load_codec
    from progvae.data.photos import HELD_OUT, photo_path

    records = compress_files(load_codec(str(weights)), [photo_path(p) for p in HELD_OUT],
                             weights.with_suffix(""), report=lambda line: None)
    return [{"photo": photo.name, "bits_per_pixel": record["bpp"], "psnr": record["psnr"]}
            for photo, record in zip(HELD_OUT, records)]


def export_half(run: Path, target: Path) -> None:
    """`progvae export` of the run, its weights stored in float16 (half the size; the codec
    computes in float32)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    full = target.with_suffix(".float32.safetensors")
    subprocess.run([sys.executable, "-m", "progvae", "export", f"--run={run}", f"--out={full}"],
                   check=True, stdout=subprocess.DEVNULL)
    with safe_open(str(full), "pt") as exported:
        metadata = exported.metadata()
        tensors = {name: exported.get_tensor(name) for name in exported.keys()}
    save_file({name: value.half() if value.is_floating_point() else value
               for name, value in tensors.items()}, str(target), metadata=metadata)
    full.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the weights and runs go")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--steps", type=int, default=0,
                        help="updates per level, the last fifth at a tenth of the learning "
                             "rate (0: as many as the budget allows, no decay)")
    parser.add_argument("--init_from_shipped", action="store_true",
                        help="start every level from the weights that ship now")
    parser.add_argument("--image_size", type=int, default=0,
                        help="side of the training crops, a multiple of the preset's (0: the "
                             "preset's 128)")
    parser.add_argument("--qualities", default="".join(map(str, QUALITY_TARGETS)),
                        help="the levels to train, e.g. 12")
    args = parser.parse_args(argv)
    qualities = tuple(sorted({int(q) for q in args.qualities}))
    preset_size = load_config("codec").image_size
    if args.image_size % preset_size:
        parser.error(f"--image_size={args.image_size}: use a multiple of the preset's "
                     f"{preset_size}")
    if not set(qualities) <= set(QUALITY_TARGETS):
        parser.error(f"--qualities={args.qualities}: each level is one of "
                     f"{''.join(map(str, QUALITY_TARGETS))}")
    summaries = make_weights(Path(args.out), args.minutes, args.batch_size,
                             args.init_from_shipped, args.threads, args.steps, args.image_size,
                             qualities)
    for quality, summary in summaries.items():
        print(f"quality {quality}: {summary['steps']} steps, held-out crops {summary['psnr']:.2f} "
              f"dB at {summary['rate']:.4f} nats/dim -> {args.out}/quality_{quality}.safetensors")
        for figure in summary["held_out_photographs"]:
            print(f"  {figure['photo']} whole: {figure['bits_per_pixel']:.3f} bits/pixel at "
                  f"{figure['psnr']:.2f} dB")
    (Path(args.out) / "summaries.json").write_text(json.dumps(summaries, indent=1))


if __name__ == "__main__":
    main()
