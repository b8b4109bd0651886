"""The command line: `python -m progvae COMMAND --flag=value` (through fire).

This is the only module that reaches up into progvae.stages and progvae.evaluation. Every
command turns bad input into one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys
import time
from pathlib import Path

import fire

from progvae.errors import TrainingInterrupted, UserError

DEMO_TARGET = 0.02
DEMO_STEPS = 1600          # stage one; the `digits` preset's 2,400 take 90 to 105 s more
DEMO_STAGE2_STEPS = 600
DEMO_PIXEL_TEMPERATURE = 0.0   # OUT/samples.png: each pixel at its most probable value
DEMO_FID_SAMPLES = 1000   # fid_digits samples: a few seconds on CPU


def stage1(config: str = "tiny", out: str = "", quiet: bool = False, resume_from: int = 0,
           **overrides) -> None:
    """Train stage one: minimise rate subject to --distortion_target (MSE/dim on [-1, 1]).

    Example: python -m progvae stage1 --config=tiny --data=patches --out=runs/s1
             --distortion_target=0.015 --steps=3000 --checkpoint_every=500
    --controller=NAME picks how the rate-distortion multiplier is set (progvae/training/controllers.py):
      lagrangian  projected Lagrangian of paper 003 A.5 (default)
      geco        GECO, paper 004 Algorithm 1            (--geco_lr, --geco_ema, ...)
      dco         D-CO, paper 000 eq. 3                  (--dco_lr, --dco_momentum, --dco_max)
      hinge       D-hinge, paper 000 eq. 4, fixed weight (--hinge_weight)
      beta        beta-VAE D + beta R, fixed, no target  (--beta)
      rate        rate targeting, R held to --rate_target nats/dim instead of D
    summary.json says whether the target was met ("constraint_met").
    Any config field can be overridden as --field=value. Re-running on the same --out resumes
    from the latest checkpoint; --resume_from=STEP from a kept one (--keep_checkpoints=N).
    """
    from progvae.config import load_config
    from progvae.stages.stage1 import train_stage1

    summary = train_stage1(load_config(config, overrides), out, quiet=quiet,
                           resume_from=_resume_step(resume_from))
    _print_stage1_summary(summary, out)


def stage2(stage1: str = "", config: str = "", out: str = "", quiet: bool = False,
           resume_from: int = 0, **overrides) -> None:
    """Train stage two on a finished, frozen stage-one run.

    Example: python -m progvae stage2 --stage1=runs/s1 --out=runs/s2 --steps=2000
    --config defaults to the stage-one run's own configuration (architecture, data, optimiser);
    any field can be overridden as --field=value. Re-running on the same --out resumes.
    """
    from progvae.stages.stage2 import train_stage2

    if not stage1:
        raise UserError("Pass --stage1=RUN, the directory of a finished stage-one run.")
    summary = train_stage2(_stage2_config(stage1, config, overrides), stage1, out, quiet=quiet,
                           resume_from=_resume_step(resume_from))
    _print_composite_summary(summary, out)


def joint(config: str = "tiny", out: str = "", quiet: bool = False, resume_from: int = 0,
          **overrides) -> None:
    """Train the conventional baseline: stage one and stage two end to end by the ELBO.

    Example: python -m progvae joint --config=digits --out=runs/joint --steps=2000
    """
    from progvae.config import load_config
    from progvae.stages.joint import train_joint

    summary = train_joint(load_config(config, overrides), out, quiet=quiet,
                          resume_from=_resume_step(resume_from))
    _print_composite_summary(summary, out)


def sample(run: str, n: int = 64, out: str = "samples.png", seed: int = 0,
           temperature: float = 1.0, stage1_temperature: float | None = None,
           pixel_temperature: float | None = None, npz: str = "",
           batch_size: int = 256) -> None:
    """Draw n samples from a trained run and save them as an image grid (and --npz=FILE).

    A stage-one run gives stage-one mean samples (z ~ p(z), decoded to the head's mean); a
    stage-two or joint run gives full pipeline samples (z ~ p(z), x_tilde, then x ~ stage two).
    --temperature scales the latents' prior noise; --stage1_temperature (two-stage runs) and
    --pixel_temperature (runs with a DMoL head: 0 puts each pixel at its most probable value
    instead of drawing it) default to it.
    --npz=FILE also saves every image as uint8 NHWC under the key "samples" (for FID).
    Example: python -m progvae sample --run=runs/s2 --n=64 --out=samples.png --temperature=0.9
    """
    import numpy as np
    import torch

    from progvae.data.images import save_grid
    from progvae.kinds import draw_samples
    from progvae.runs import load_scored
    from progvae.training.dist import default_device

    from progvae.atomic import atomic_path, writable_output

    _check_number("--n", n, minimum=1, integer=True)
    _check_number("--batch_size", batch_size, minimum=1, integer=True)
    _check_number("--seed", seed, minimum=0, integer=True)
    _check_number("--temperature", temperature, minimum=0.0)
    if stage1_temperature is not None:
        _check_number("--stage1_temperature", stage1_temperature, minimum=0.0)
    if pixel_temperature is not None:
        _check_number("--pixel_temperature", pixel_temperature, minimum=0.0)
    out = writable_output(out, "--out", ".png")
    if npz:
        npz = writable_output(npz, "--npz", ".npz")
    _, model, info = load_scored(run, default_device())
    kind = info["kind"]
    torch.manual_seed(seed)
    images = draw_samples(kind, model, n, temperature, batch_size, stage1_temperature,
                          progress=n > batch_size, pixel_temperature=pixel_temperature)
    shown = images[:1024]  # a grid of more would be unreadable
    save_grid(shown, out)
    print(f"Wrote {len(shown)} {kind.name} samples of '{run}' "
          f"({_temperatures(kind, temperature, stage1_temperature, pixel_temperature)}) to {out}.")
    if npz:
        with atomic_path(npz) as temporary, open(temporary, "wb") as stream:
            np.savez(stream, samples=images)
        print(f"Saved all {len(images)} samples as uint8 NHWC under 'samples' in {npz}.")


def _temperatures(kind, temperature: float, stage1_temperature: float | None,
                  pixel_temperature: float | None) -> str:
    """How `sample` drew its samples, in words: the temperatures that apply to the kind."""
    words = [f"latents at temperature {temperature:g}"]
    if kind.composite and stage1_temperature is not None:
        words.append(f"stage one's at {stage1_temperature:g}")
    if kind.has_likelihood:   # a DMoL head
        pixels = temperature if pixel_temperature is None else pixel_temperature
        words.append("each pixel at its most probable value" if pixels == 0
                     else f"pixels drawn at temperature {pixels:g}")
    return ", ".join(words)


def demo(out: str = "runs/demo", steps: int = DEMO_STEPS, stage2_steps: int = DEMO_STAGE2_STEPS,
         quiet: bool = False) -> None:
    """The built-in end-to-end demo on scikit-learn's digits, on CPU in a few minutes: stage
    one to a distortion target (OUT/stage1), then stage two on it (OUT/stage2), with image
    grids, summaries and pipeline samples (OUT/samples.png), ending with the two-stage model's
    held-out ELBO (bits/dim) and fid_digits."""
    from progvae.config import load_config
    from progvae.evaluation.metrics.evaluate import evaluate_run
    from progvae.stages.stage1 import train_stage1
    from progvae.stages.stage2 import train_stage2

    config = load_config("digits", {"distortion_target": DEMO_TARGET, "steps": steps})
    stage1_out, stage2_out = f"{out}/stage1", f"{out}/stage2"
    print(f"progvae demo: stage one on built-in digits ({config.image_size}x{config.image_size}), "
          f"distortion target {config.distortion_target} MSE/dim, {config.steps} steps -> "
          f"{stage1_out}")
    started = time.perf_counter()
    summary = train_stage1(config, stage1_out, quiet=quiet)
    _print_stage1_summary(summary, stage1_out)
    print(f"\nprogvae demo: stage two on the frozen stage one, {stage2_steps} steps -> "
          f"{stage2_out}")
    stage2_config = dataclasses.replace(config, steps=stage2_steps)
    summary = train_stage2(stage2_config, stage1_out, stage2_out, quiet=quiet)
    _print_composite_summary(summary, stage2_out)
    # Latents drawn at temperature 1, each pixel at its most probable value: after a few
    # minutes of training stage two's per-pixel distributions are still broad, and drawing
    # every pixel from them (as stage2/samples.png does) buries the digits in speckle.
    sample(stage2_out, n=64, out=f"{out}/samples.png", seed=0,
           pixel_temperature=DEMO_PIXEL_TEMPERATURE)
    scored = evaluate_run(stage2_out, metrics="fid_digits", n_samples=DEMO_FID_SAMPLES)
    print(f"\nTwo-stage model, held-out digits: ELBO {summary['elbo']:.4f} nats/dim = "
          f"{summary['bpd']:.4f} bits/dim; fid_digits {scored['fid_digits']:.2f} "
          f"({DEMO_FID_SAMPLES} samples against the {scored['n_images']} held-out digits, on a "
          "digit classifier's features: not comparable with Inception FIDs).")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s.")


def sweep(config: str = "tiny", out: str = "", targets=None, quiet: bool = True,
          **overrides) -> None:
    """Rate-distortion sweep: one stage-one run per target, then rd.json and figures in --out.

    Example: python -m progvae sweep --config=digits --targets=0.0512,0.0256,0.0128
             --controller=dco --out=runs/sweep
    --controller=NAME as for stage1. --targets are distortion targets (MSE/dim), rate targets
    (nats/dim) for --controller=rate, or beta values for --controller=beta. Each run lives in
    OUT/target_T/; a finished target is skipped and an interrupted one resumes from its
    checkpoint, so re-running the same command finishes a killed sweep. Writes rd.json, rd.png,
    multipliers.png and reconstructions.png. Any other config field can be overridden as
    --field=value.
    """
    from progvae.config import load_config
    from progvae.evaluation.experiments.sweep import parse_targets, run_sweep

    config = load_config(config, overrides)
    result = run_sweep(config, parse_targets(targets), out, quiet=quiet)
    print(f"\nSweep of {len(result['runs'])} targets ({config.controller}), held-out split:")
    print(f"  {'target':>10} {'distortion':>10} {'PSNR':>7} {'rate':>9} {'multiplier':>10} "
          f"{'met':>5} {'reached at':>10} {'settled at':>10}")
    for run in result["runs"]:
        print(f"  {run['target']:>10g} {run['distortion']:>10.5f} {run['psnr']:>7.2f} "
              f"{run['rate']:>9.5f} {run['multiplier']:>10.4g} {str(run['constraint_met']):>5} "
              f"{str(run['steps_to_target']):>10} {str(run['steps_to_settle']):>10}")
    print(f"Wrote {out}/rd.json, rd.png, multipliers.png, reconstructions.png "
          f"(figures in {result['figures_seconds']:.1f} s).")


def data(data: str = "", image_size: int = 0, out: str = "preview.png", n: int = 64,
         resize: bool = False, svhn_extra: bool = False, cache_dir: str = "", data_workers: int = 0,
         verify: bool = False) -> None:
    """Inspect a dataset: counts, shapes, split sizes, pixel range and where its cache lives,
    and write a preview grid of n training images. The first thing to run on a new dataset: for
    folder:, svhn:, celeba: and lsun: it builds the preprocessing cache (once).

    Example: python -m progvae data --data=celeba:/data/celeba --out=celeba.png
    --image_size defaults to the dataset's own (64 for celeba and lsun, 32 for svhn);
    --verify=True checksums every byte of the cache.
    """
    from progvae.data.cache import verify_cache
    from progvae.data.loading import describe, evenly_spaced, load_data, natural_image_size
    from progvae.data.images import save_grid

    if not data:
        raise UserError("Pass --data=SPEC, e.g. --data=svhn:/data/svhn; see progvae/data/loading.py for the specs.")
    if not str(out).lower().endswith(".png"):
        raise UserError(f"--out must name a .png file, got '{out}'.")
    dataset = load_data(data, image_size or natural_image_size(data), resize=resize,
                        svhn_extra=svhn_extra, cache_dir=cache_dir, workers=data_workers)
    print("\n".join(describe(dataset)))
    if verify and dataset.cache is not None:
        problems = verify_cache(dataset.cache)
        if problems:
            raise UserError(f"The cache at {dataset.cache.directory} is corrupt ({'; '.join(problems)}); "
                            "run the command again to rebuild it.")
        print("  verified: every byte of the cache matches its checksum")
    shown = dataset.train[evenly_spaced(len(dataset.train), max(1, n))]
    save_grid(shown, out)
    print(f"Wrote {len(shown)} training images to {out}.")


def evaluate(run: str = "", data: str = "", metrics=None, split: str = "test",
             n_samples: int = 10_000, iw_samples: int = 0, batch_size: int | None = None,
             inception_weights: str = "", lpips_weights: str = "", temperature: float = 1.0,
             seed: int = 0, num_threads: int = 0, dist_timeout: float = 1800.0,
             fid_stats: str = "") -> None:
    """Score a trained run (stage1, stage2, joint or vdvae) and write RUN/eval.json.

    Example: python -m progvae evaluate --run=runs/s2 --metrics=elbo,mse,fid,lpips
             --inception_weights=weights-inception-2015-12-05-6726825d.pth
             --lpips_weights=alexnet-owt-7be5be79.pth
    --metrics from elbo, mse, fid, fid_digits, lpips (default: elbo,mse,fid,lpips; on
    --data=digits elbo,mse,fid_digits). ELBO/bits-per-dim and MSE cover the whole --split
    (test or train) exactly, in batches of --batch_size (default: the run's eval_batch_size)
    under --seed=0: the numbers of the run's summary.json for the same checkpoint.
    --iw_samples=K adds the K-sample importance-weighted bound. FID
    compares --n_samples samples at --temperature with the whole split (Inception-v3 through
    torch-fidelity; reference statistics cached as .npz), or with --fid_stats=FILE.npz (arrays
    mu and sigma of Inception's 2048 pool features, e.g. published statistics). fid_digits uses a small digit classifier's
    features instead and is not comparable with FID. LPIPS (AlexNet) compares held-out images
    with their reconstructions. --data defaults to the run's own data. Offline, pass the
    weights files named above; without them FID and LPIPS stop with a message. Under
    torchrun the images, samples and features are shared out between the processes.
    """
    from progvae.evaluation.metrics.evaluate import eval_path, evaluate_run, format_table

    if not run:
        raise UserError("Pass --run=RUN, the directory of a trained run (or an exported "
                        "model).")
    from progvae.training import dist
    dist.set_cpu_threads(num_threads)
    result = evaluate_run(run, data, metrics, split, n_samples, iw_samples, batch_size,
                          inception_weights, lpips_weights, temperature, seed, dist_timeout,
                          fid_stats)
    if _is_main():
        print(format_table(result))
        print(f"Wrote {eval_path(run)} ({result['seconds']:.0f} s).")


def plot(run: str = "", out: str = "") -> None:
    """Draw a run's training curves (batch rate, distortion against its target, multiplier,
    gradient norm, and the held-out numbers at each evaluation) to RUN/curves.png or --out.
    Works on a run that is still training.

    Example: python -m progvae plot --run=runs/s1 --out=s1_curves.png
    """
    from progvae.atomic import writable_output
    from progvae.curves import write_curves

    if not run:
        raise UserError("Pass --run=RUN, the directory of a training run.")
    if not Path(str(run)).is_dir():
        raise UserError(f"Run directory '{run}' does not exist; pass the --out of a training run.")
    target = writable_output(out or Path(str(run)) / "curves.png", "--out", ".png")
    from progvae.runs import run_summary

    final = run_summary(run) or None   # the end-of-training held-out numbers, once finished
    print(f"Wrote {write_curves(run, target, final=final)}.")


def export(run: str = "", out: str = "") -> None:
    """Write a trained run as one safetensors file: its EMA weights, config, kind, step and
    summary (a stage-two run's stage one included). Nothing in it can run code when loaded,
    unlike a pickled checkpoint, so it is the file to share; sample, evaluate and
    stage2 --stage1= accept it wherever they accept a run directory.

    Example: python -m progvae export --run=runs/s2 --out=s2.safetensors
    """
    from progvae.atomic import writable_output
    from progvae.runs import export_run

    if not run:
        raise UserError("Pass --run=RUN, the directory of a trained run to export.")
    if not out:
        raise UserError("Pass --out=MODEL.safetensors, the file to write.")
    out = writable_output(out, "--out", ".safetensors")
    written = export_run(run, out)
    state = "finished" if written["finished"] else "not finished"
    print(f"Wrote the {written['kind']} run '{run}' at step {written['step']} ({state})"
          f"{' with its stage one' if written['with_stage1'] else ''} to {out}.")


def compress(run: str = "", images: str = "", out: str = "compressed",
             num_threads: int = 0) -> None:
    """Compress images (PNG, JPEG, BMP; any size) with a stage one trained with
    --latents=quantized: one OUT/NAME.pvc per image, holding one entropy-coded stream per latent
    group, top group first, so a prefix of the file decodes to a coarser picture. Prints each
    file's size, bits per pixel and PSNR. --images is a file or a folder.

    Example: python -m progvae compress --run=runs/codec --images=photo.jpg --out=compressed
    """
    from progvae.compress import compress_files, image_files, load_codec

    from progvae.atomic import writable_folder

    _set_threads(num_threads)
    files = image_files(images)
    target = writable_folder(out, "--out")   # before the model is loaded
    codec = load_codec(run)
    compress_files(codec, files, target)


def decompress(run: str = "", file: str = "", out: str = "", groups: int | None = None,
               num_threads: int = 0) -> None:
    """Decode a .pvc file to a PNG with the run that compressed it. --groups=K decodes only the
    first K latent groups (the rest at their prior means): the progressive reconstruction from a
    prefix of the file; a file cut short decodes as far as its complete streams reach.

    Example: python -m progvae decompress --run=runs/codec --file=compressed/photo.pvc
             --out=photo.png --groups=2
    """
    from progvae.compress import decompress_file, load_codec

    _set_threads(num_threads)
    if groups is not None:
        _check_number("--groups", groups, 0, integer=True)
    codec = load_codec(run)
    done = decompress_file(codec, file, out, groups)
    print(f"Wrote {done['out']}: {done['width']}x{done['height']} from {done['groups']} of "
          f"{done['of']} groups ({done['bytes']:,} bytes, {done['bpp']:.3f} bits/pixel, "
          f"{done['seconds']:.2f} s).")


def codec_eval(run: str = "", images: str = "", out: str = "", lpips_weights: str = "",
               qualities=None, num_threads: int = 0) -> None:
    """The codec's rate-distortion curve on --images (a file or folder): bits per pixel
    against PSNR for every prefix of K groups, beside JPEG and WebP (Pillow) at --qualities
    (default 5,10,20,...,90,95) on the same images; LPIPS too with --lpips_weights. Writes
    OUT/codec_rd.json and OUT/codec_rd.png (OUT defaults to the run's directory).

    Example: python -m progvae codec-eval --run=runs/codec --images=photos/
    """
    from progvae.compress import image_files, load_codec
    from progvae.evaluation.experiments.codec_rd import QUALITIES, codec_rd

    _set_threads(num_threads)
    if qualities is None:
        qualities = QUALITIES
    elif isinstance(qualities, (int, float)):
        qualities = (qualities,)
    for quality in qualities:
        _check_number("--qualities", quality, 1, integer=True)
        if quality > 100:
            raise UserError(f"--qualities holds {quality}; JPEG and WebP qualities are 1..100.")
    files = image_files(images)
    if not out:
        if not Path(str(run)).is_dir():
            raise UserError("Pass --out=DIR for codec_rd.json and codec_rd.png.")
        out = run
    from progvae.atomic import writable_folder
    writable_folder(out, "--out")
    codec = load_codec(run)
    result = codec_rd(codec, files, Path(str(out)), tuple(int(q) for q in qualities),
                      lpips_weights, progress=lambda file: print(f"scored {file}"))
    print(f"{'groups':>6} {'bits/pixel':>10} {'PSNR':>7}")
    for row in result["progvae"]:
        print(f"{row['groups']:>6} {row['bpp']:>10.3f} {row['psnr']:>7.2f}")
    for name, matched in result["at_progvae_full_rate"].items():
        if matched["psnr"] is not None:
            print(f"{name.upper()} at {matched['bpp']:.3f} bits/pixel: PSNR {matched['psnr']:.2f}")
    print(f"Encoding {result['encode_megapixels_per_s']:.3f} megapixels/s, decoding "
          f"{result['decode_megapixels_per_s']:.3f}. Wrote {Path(str(out)) / 'codec_rd.json'} "
          f"and codec_rd.png.")


def _set_threads(num_threads: int) -> None:
    from progvae.training import dist

    _check_number("--num_threads", num_threads, 0, integer=True)
    dist.set_cpu_threads(int(num_threads))


def vdvae(config: str = "tiny", out: str = "", quiet: bool = False, resume_from: int = 0,
          **overrides) -> None:
    """Train the original VDVAE by the ELBO with its DMoL head (the conventional HVAE of paper
    003 §4; the run `progressive` analyses).

    Example: python -m progvae vdvae --config=digits --out=runs/vdvae --steps=1200
    Any config field can be overridden as --field=value. Re-running on the same --out resumes.
    """
    from progvae.config import load_config
    from progvae.stages.vdvae import train_vdvae

    summary = _printed_summary("", train_vdvae(load_config(config, overrides), out, quiet=quiet,
                                               resume_from=_resume_step(resume_from)))
    if summary is not None:
        print(f"  ELBO {summary['elbo']:.4f} nats/dim = {summary['bpd']:.4f} bits/dim "
              f"(rate {summary['rate']:.4f}, nll {summary['nll']:.4f})\n  MSE of the DMoL mean "
              f"{summary['mse']:.5f} (PSNR {summary['psnr']:.2f} dB)\n  "
              f"{summary['steps_per_second']:.1f} steps/s; wrote {out}/summary.json, "
              "reconstructions.png, samples.png")


def progressive(run: str = "", out: str = "", data: str = "", max_resolution: int = 0,
                steps: int = 0, quiet: bool = False, **overrides) -> None:
    """The (R_K, D_K) progressive-coding experiment of paper 003 §4.1 on a plain VDVAE run.

    Example: python -m progvae progressive --run=runs/vdvae --out=runs/progressive --steps=600
    K = the latent groups at resolution <= --max_resolution (default image size / 8). R_K is
    their held-out KL; D_K the held-out MSE of a new decoder trained --steps on z_1:K (the
    VDVAE frozen); then the inference path and that decoder are trained --steps more with the
    rate target R_K (controller `rate`), giving R'_K and an upper bound on lambda*. --steps
    defaults to half the VDVAE's steps (the paper: 400K after 800K). Other --field=value
    overrides apply to both training runs (e.g. --lr, --multiplier_init, --num_threads;
    --masked=sample|mean: the groups after K drawn from the new decoder's prior, as the paper
    does, or at its mean).
    Writes OUT/table.md, table.json, reconstructions.png; re-running resumes.
    """
    from progvae.evaluation.experiments.progressive import run_progressive

    if not run:
        raise UserError("Pass --run=RUN, the directory of a finished vdvae run.")
    table = run_progressive(run, out, data, max_resolution, steps, quiet, overrides)
    if _is_main():
        print((Path(out) / "table.md").read_text())
        print(f"Wrote {out}/table.md, table.json, reconstructions.png ({table['seconds']:.0f} s).")


def report(runs=None, out: str = "", sweep: str = "", lpips_weights: str = "") -> None:
    """One Markdown page comparing runs side by side: OUT/report.md.

    Example: python -m progvae report --runs=runs/demo/stage2,runs/joint,runs/progressive
             --out=runs/report
    Shows ELBO/bits-per-dim, FID or fid_digits, LPIPS, rate and distortion of every run (from
    eval.json where `evaluate` has run, else summary.json), the conventional-vs-two-stage table
    when a joint and a stage2 run are both given, Table 1 of progressive experiments, and each
    run's image grids. --sweep=DIR adds LPIPS against MSE across a sweep's stage-one runs
    (needs --lpips_weights offline).
    """
    from progvae.evaluation.report import write_report

    if isinstance(runs, str):
        runs = [part for part in runs.split(",") if part]
    path = write_report([str(run) for run in (runs or [])], out, sweep, lpips_weights)
    print(f"Wrote {path}.")


def bench(config: str = "tiny", model: str = "stage1", batch: int | None = None,
          precision: str = "auto", compile: bool | str = "auto", device: str = "",
          steps: int = 20, warmup: int = 5, out: str = "bench.json", profile: int = 0,
          suite: str = "", run: str = "", **overrides) -> None:
    """Measure the training step (images/s, memory, FLOPs and fraction of peak), sampling and
    the data path on synthetic images of the preset's shape; prints and writes bench.json.

    Example: python -m progvae bench --config=svhn --model=stage1 --precision=bf16 --compile
    (--device=cpu|cuda only checks that the step runs where you expect; CUDA is used when
    visible). --profile=N adds a torch.profiler table of N steps (the operators that take the
    most time). Any config field can be overridden, e.g. --checkpoint_activations=True.
    --suite=gpu runs the whole GPU check instead: the svhn preset in fp32, TF32 and
    bf16 + compile and 10,000 pipeline samples, written to bench_gpu.json.
    --suite=codec times `compress` and `decompress` of --run (a quantised stage one; default an
    untrained model of --config, codec32 unless given): images/s on images of the model's size
    and megapixels/s on a 512x600 photograph, written to bench_codec.json.
    """
    from progvae.config import load_config
    from progvae.evaluation.benchmarks.bench import format_result, run_bench, write_result

    if suite == "codec":
        from progvae.codec import Codec
        from progvae.compress import load_codec
        from progvae.evaluation.benchmarks.codec_bench import format_codec_bench, run_codec_bench
        from progvae.kinds import KINDS

        if run:
            codec = load_codec(run)
        else:
            preset = "codec32" if config == "tiny" else config
            settings = load_config(preset, {"latents": "quantized", **overrides})
            codec = Codec(KINDS["stage1"].build(settings).eval(), f"the {preset} preset")
        path = "bench_codec.json" if out == "bench.json" else out
        result = run_codec_bench(codec)
        print(format_codec_bench(result))
        write_result({"run": run, **result}, path)
        print(f"Wrote {path}.")
        return
    if suite:
        if suite != "gpu":
            raise UserError(f"--suite must be gpu (the whole GPU check) or codec, got '{suite}'.")
        from progvae.evaluation.benchmarks.gpu_suite import format_suite, run_gpu_suite

        path = "bench_gpu.json" if out == "bench.json" else out
        summary = run_gpu_suite(load_config("svhn", {"image_channels": 3}), steps, warmup)
        print(format_suite(summary))
        write_result(summary, path)
        print(f"Wrote {path}.")
        return

    overrides.update(precision=precision, compile=compile)
    if batch is not None:
        overrides["batch_size"] = batch
    settings = load_config(config, overrides)
    if settings.data == "digits":
        settings = dataclasses.replace(settings, image_channels=1)
    result = run_bench(settings, model=model, steps=steps, warmup=warmup, device=device,
                       profile=profile)
    print(format_result(result))
    write_result({"config": config, **result}, out)
    print(f"Wrote {out}.")


def _resume_step(step) -> int:
    """--resume_from=STEP (0: the latest checkpoint, as a plain re-run)."""
    _check_number("--resume_from", step, minimum=0, integer=True)
    return step


def _check_number(flag: str, value, minimum: float, integer: bool = False) -> None:
    """A numeric flag of a command (config fields are checked by progvae.config): a finite
    number (an integer where `integer`) of at least `minimum`."""
    import math

    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value)
            or value < minimum):
        what = "an integer" if integer else "a finite number"
        raise UserError(f"{flag} must be {what} >= {minimum:g}, got {value!r}.")


def _stage2_config(stage1_run: str, preset: str, overrides: dict):
    """Stage two's config: a preset if given, else the stage-one run's own (config.json, or the
    config inside an exported model)."""
    from progvae.config import apply_overrides, load_config
    from progvae.exported import is_exported, read_exported
    from progvae.training.checkpoint import load_run_config

    if preset:
        return load_config(preset, overrides)
    if is_exported(stage1_run):
        stage1_config = read_exported(stage1_run, weights_of=())[0].config   # header only
    else:
        _, stage1_config = load_run_config(stage1_run)
    return apply_overrides(stage1_config, overrides, "the command line")


def _printable(summary: dict) -> dict:
    """A summary whose non-finite values (None, see progvae.atomic.flag_non_finite) print as nan."""
    return {key: float("nan") if value is None else value for key, value in summary.items()}


def _printed_summary(title: str, summary: dict) -> dict | None:
    """The summary to print (None on ranks other than 0), after its heading line."""
    if not _is_main():
        return None
    summary = _printable(summary)
    print(f"\n{title or summary['stage']}, held-out split (EMA weights) after "
          f"{summary['steps']} steps ({summary['skipped']} skipped):")
    return summary


def _print_composite_summary(summary: dict, out: str) -> None:
    summary = _printed_summary("", summary)
    if summary is None:
        return
    print(f"  ELBO {summary['elbo']:.4f} nats/dim = {summary['bpd']:.4f} bits/dim "
          f"(stage-one rate {summary['stage1_rate']:.4f}, stage-two rate {summary['rate']:.4f}, "
          f"nll {summary['nll']:.4f})")
    print(f"  MSE of stage one {summary['stage1_distortion']:.5f} -> final {summary['mse']:.5f} "
          f"(PSNR {summary['psnr']:.2f} dB)")
    print(f"  {summary['steps_per_second']:.1f} steps/s; wrote {out}/summary.json, "
          f"reconstructions.png, samples.png")


def _print_stage1_summary(summary: dict, out: str) -> None:
    summary = _printed_summary("Stage one", summary)
    if summary is None:
        return
    notes = {"distortion": "", "rate": ""}
    if summary.get("constrained") in notes:   # absent from summaries of older runs
        notes[summary["constrained"]] = (f"  (target {summary['target']}, "
                                         f"{100 * summary['relative_error']:+.1f}%)")
    print(f"  distortion {summary['distortion']:.5f} MSE/dim{notes['distortion']}   "
          f"PSNR {summary['psnr']:.2f} dB")
    print(f"  rate       {summary['rate']:.5f} nats/dim{notes['rate']}   "
          f"multiplier {summary['multiplier']:.5g}")
    print(f"  {summary['steps_per_second']:.1f} steps/s; wrote {out}/summary.json, "
          f"reconstructions.png, samples.png")


def _is_main() -> bool:
    from progvae.training import dist
    return dist.is_main()


COMMANDS = {"demo": demo, "stage1": stage1, "stage2": stage2, "joint": joint, "vdvae": vdvae,
            "sample": sample, "sweep": sweep, "evaluate": evaluate, "progressive": progressive,
            "report": report, "data": data, "bench": bench, "export": export, "plot": plot,
            "compress": compress, "decompress": decompress, "codec-eval": codec_eval}


# Commands that take any config field as --field=value: their --help also lists the fields.
CONFIG_COMMANDS = ("stage1", "stage2", "joint", "vdvae", "sweep", "progressive", "bench")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _help_for_fire(argv)
    asked_for_help = command != argv
    try:
        command = _checked_arguments(command)
        fire.Fire(COMMANDS, command=command, name="progvae")
    except SystemExit as done:
        if asked_for_help and argv[0] in CONFIG_COMMANDS and not done.code:
            from progvae.config import describe_fields
            print(describe_fields())
        raise
    except UserError as error:
        print(f"progvae: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as stopped:
        print(f"progvae: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signal_number)
    except BrokenPipeError:   # output piped into a reader that stopped (`| head`): no noise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:   # Ctrl-C outside a training loop (loading, evaluating)
        print("progvae: interrupted (Ctrl-C); nothing was left half-written.", file=sys.stderr)
        sys.exit(128 + 2)
    finally:
        from progvae.training import dist
        dist.cleanup()


def _checked_arguments(argv: list[str]) -> list[str]:
    """Refuse, before the command starts, a positional argument it has no place for (fire
    would complain only after the command had run), and keep the value of a text option text:
    fire reads `--out=123` as the number 123."""
    if not argv or argv[0] not in COMMANDS:
        return argv
    end = argv.index("--") if "--" in argv else len(argv)
    parameters = inspect.signature(COMMANDS[argv[0]]).parameters
    text_options = {name for name, parameter in parameters.items()
                    if parameter.annotation in ("str", str)}
    checked, named, positional = [argv[0]], set(), []
    index = 1
    while index < end:
        token = argv[index]
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token[2:].partition("=")
            name = name.replace("-", "_")
            named.add(name)
            if equals and name in text_options and not _reads_as_text(value):
                token = f"--{name}={value!r}"
            checked.append(token)
            if not equals and index + 1 < end and not argv[index + 1].startswith("--"):
                index += 1   # `--flag value`
                checked.append(argv[index])
        else:
            positional.append(token)
            checked.append(token)
        index += 1
    free = [name for name, parameter in parameters.items()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name not in named]
    if len(positional) > len(free):
        raise UserError(f"Unexpected argument '{positional[len(free)]}' for `progvae {argv[0]}`; "
                        f"options are written --name=value (see `progvae {argv[0]} --help`).")
    return checked + argv[end:]


def _reads_as_text(value: str) -> bool:
    """Whether fire hands `value` to a command as the string it is (not a number, bool, ...)."""
    try:
        return isinstance(ast.literal_eval(value), str)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return True


def _help_for_fire(argv: list[str]) -> list[str]:
    """Commands that take --field=value config overrides accept any flag, so fire would read
    `--help` as a config field; move it behind fire's own `--` separator, where it means help."""
    flags = argv[:argv.index("--")] if "--" in argv else argv
    if not any(flag in ("--help", "-h") for flag in flags):
        return argv
    kept = [flag for flag in flags if flag not in ("--help", "-h")]
    return kept + ["--", "--help"]


if __name__ == "__main__":
    main()
