"""The command line: `python -m progvae COMMAND --flag=value` (through fire).

This is the only module that reaches up into progvae.stages and progvae.evaluation. Every
command turns bad input into one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from progvae.cli_fire import check_number, run
from progvae.core.errors import UserError


def stage1(config: str = "tiny", out: str = "", quiet: bool = False, resume_from: int = 0,
           **overrides) -> None:
    """Train stage one: minimise rate subject to --distortion_target (MSE/dim on [-1, 1]).

    Example: python -m progvae stage1 --config=tiny --data=patches --out=runs/s1
             --distortion_target=0.015 --steps=3000 --checkpoint_every=500
    --controller=NAME sets the multiplier: lagrangian (paper 003 A.5, the default), geco,
    dco, hinge, beta, or rate (R held to --rate_target); see docs/training.md.
    summary.json says whether the target was met ("constraint_met").
    Any config field can be overridden as --field=value. Re-running on the same --out resumes
    from the latest checkpoint; --resume_from=STEP from a kept one (--keep_checkpoints=N).
    """
    _train("stage1", _config(config, overrides), out, quiet, resume_from, title="Stage one")


def stage2(stage1: str = "", config: str = "", out: str = "", quiet: bool = False,
           resume_from: int = 0, **overrides) -> None:
    """Train stage two on a finished, frozen stage-one run.

    Example: python -m progvae stage2 --stage1=runs/s1 --out=runs/s2 --steps=2000
    --config defaults to the stage-one run's own configuration (architecture, data, optimiser);
    any field can be overridden as --field=value. Re-running on the same --out resumes.
    """
    from progvae.stages.stage2 import stage2_config

    if not stage1:
        raise UserError("Pass --stage1=RUN, the directory of a finished stage-one run.")
    _train("stage2", stage2_config(stage1, config, overrides), out, quiet, resume_from,
           stage1=stage1)


def joint(config: str = "tiny", out: str = "", quiet: bool = False, resume_from: int = 0,
          **overrides) -> None:
    """Train the conventional baseline: stage one and stage two end to end by the ELBO.

    Example: python -m progvae joint --config=digits --out=runs/joint --steps=2000
    """
    _train("joint", _config(config, overrides), out, quiet, resume_from)


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
    from progvae.core.atomic import writable_output
    from progvae.runs.sampling import sample_run

    for flag, value, minimum, integer in (
            ("--n", n, 1, True), ("--batch_size", batch_size, 1, True), ("--seed", seed, 0, True),
            ("--temperature", temperature, 0, False),
            ("--stage1_temperature", stage1_temperature, 0, False),
            ("--pixel_temperature", pixel_temperature, 0, False)):
        if value is not None:
            check_number(flag, value, minimum, integer)
    out = writable_output(out, "--out", ".png")
    npz = writable_output(npz, "--npz", ".npz") if npz else None
    print(sample_run(run, n, out, seed, temperature, stage1_temperature, pixel_temperature,
                     npz, batch_size))


def demo(out: str = "runs/demo", steps: int = 1600, stage2_steps: int = 600,
         quiet: bool = False) -> None:
    """The built-in end-to-end demo on scikit-learn's digits, on CPU in a few minutes: stage
    one to a distortion target (OUT/stage1), then stage two on it (OUT/stage2), with image
    grids, summaries and pipeline samples (OUT/samples.png), ending with the two-stage model's
    held-out ELBO (bits/dim) and fid_digits."""
    from progvae.evaluation.experiments.demo import run_demo

    run_demo(out, steps, stage2_steps, quiet)


def sweep(config: str = "tiny", out: str = "", targets=None, quiet: bool = True,
          **overrides) -> None:
    """Rate-distortion sweep: one stage-one run per target, then rd.json and figures in --out.

    Example: python -m progvae sweep --config=digits --targets=0.0512,0.0256,0.0128
             --controller=dco --out=runs/sweep
    --targets are distortion targets (MSE/dim), rate targets (nats/dim) for --controller=rate,
    or beta values for --controller=beta; each run lives in OUT/target_T/ and a re-run
    finishes a killed sweep. Writes rd.json, rd.png, multipliers.png, reconstructions.png.
    """
    from progvae.evaluation.experiments.sweep import format_sweep, parse_targets, run_sweep

    config = _config(config, overrides)
    print(format_sweep(run_sweep(config, parse_targets(targets), out, quiet=quiet),
                       config.controller, out))


def data(data: str = "", image_size: int = 0, out: str = "preview.png", n: int = 64,
         resize: bool = False, svhn_extra: bool = False, cache_dir: str = "", data_workers: int = 0,
         verify: bool = False) -> None:
    """Inspect a dataset (counts, shapes, splits, pixel range, cache) and write a grid of n
    training images; builds the preprocessing cache once. --verify=True checksums the cache.

    Example: python -m progvae data --data=celeba:/data/celeba --out=celeba.png
    """
    from progvae.data.preview import preview_dataset

    print(preview_dataset(data, out, image_size, n, resize, svhn_extra, cache_dir, data_workers,
                          verify))


def evaluate(run: str = "", data: str = "", metrics=None, split: str = "test",
             n_samples: int = 10_000, iw_samples: int = 0, batch_size: int | None = None,
             inception_weights: str = "", lpips_weights: str = "", temperature: float = 1.0,
             seed: int = 0, num_threads: int = 0, dist_timeout: float = 1800.0,
             fid_stats: str = "") -> None:
    """Score a trained run (stage1, stage2, joint or vdvae) and write RUN/eval.json.

    Example: python -m progvae evaluate --run=runs/s2 --metrics=elbo,mse,fid,lpips
             --inception_weights=weights-inception-2015-12-05-6726825d.pth
             --lpips_weights=alexnet-owt-7be5be79.pth
    --metrics from elbo, mse, fid, fid_digits, lpips (default elbo,mse,fid,lpips; on digits
    elbo,mse,fid_digits). ELBO and MSE cover the whole --split exactly, under --seed: the
    numbers of summary.json. --iw_samples=K adds the K-sample importance-weighted bound. FID
    compares --n_samples samples with the split, or with --fid_stats=FILE.npz (mu, sigma).
    Offline, pass the weights files named above. See docs/evaluation.md.
    """
    from progvae.evaluation.metrics.evaluate import evaluate_run, format_evaluation

    if not run:
        raise UserError("Pass --run=RUN, the directory of a trained run (or an exported "
                        "model).")
    _set_threads(num_threads)
    result = evaluate_run(run, data, metrics, split, n_samples, iw_samples, batch_size,
                          inception_weights, lpips_weights, temperature, seed, dist_timeout,
                          fid_stats)
    _print_main(format_evaluation(result, run))


def plot(run: str = "", out: str = "") -> None:
    """Draw a run's training curves (rate, distortion and its target, multiplier, gradient
    norm, held-out numbers) to RUN/curves.png or --out, also while it trains.

    Example: python -m progvae plot --run=runs/s1 --out=s1_curves.png
    """
    from progvae.runs.curves import plot_run

    print(f"Wrote {plot_run(run, out)}.")


def export(run: str = "", out: str = "") -> None:
    """Write a trained run as one safetensors file (EMA weights, config, kind, step, summary;
    a stage-two run's stage one too) that cannot run code when loaded: the file to share.

    Example: python -m progvae export --run=runs/s2 --out=s2.safetensors
    """
    from progvae.runs.load import export_run

    print(export_run(run, out))


def compress(run: str = "", images: str = "", out: str = "compressed",
             quality: int | None = None, num_threads: int = 0) -> None:
    """Compress images (a file or a folder; PNG, JPEG, BMP, any size): one OUT/NAME.pvc each,
    one stream per latent group, so a prefix decodes coarser. --quality=1..3 picks a shipped
    model (2 by default; 1 the smallest files); --run=RUN a quantised stage one of your own.

    Example: python -m progvae compress --images=photo.jpg --out=compressed --quality=3
    """
    from progvae.codec.files import compress_files, image_files, load_codec
    from progvae.codec.shipped import DEFAULT_QUALITY, shipped_path
    from progvae.core.atomic import writable_folder

    _set_threads(num_threads)
    if run and quality is not None:
        raise UserError("Pass --run=RUN (your own model) or --quality=N (a shipped one), not "
                        "both.")
    quality = DEFAULT_QUALITY if quality is None else quality
    model = run or str(shipped_path(quality))   # a bad --quality is named before anything
    files = image_files(images)
    target = writable_folder(out, "--out")   # before the model is loaded
    codec = load_codec(model, "" if run else f"the shipped quality {quality} model")
    compress_files(codec, files, target)


def decompress(run: str = "", file: str = "", out: str = "", groups: int | None = None,
               num_threads: int = 0) -> None:
    """Decode a .pvc file to a PNG: with the shipped model that wrote it (its header names
    the model), or --run, the run that compressed it; --groups=K decodes the first K latent
    groups only (a prefix of the file), as does a file cut short.

    Example: python -m progvae decompress --file=compressed/photo.pvc --out=photo.png
             --groups=2
    """
    from progvae.codec.coder import read_pvc
    from progvae.codec.files import decompress_file, format_decompressed, load_codec
    from progvae.codec.shipped import codec_for_file

    _set_threads(num_threads)
    if groups is not None:
        check_number("--groups", groups, 0, integer=True)
    if run:
        codec = load_codec(run)
    else:
        if not file:
            raise UserError("Pass --file=F.pvc, a file written by `progvae compress`.")
        codec = codec_for_file(read_pvc(file), f"'{file}'")
    print(format_decompressed(decompress_file(codec, file, out, groups)))


def codec_eval(run: str = "", images: str = "", out: str = "", lpips_weights: str = "",
               qualities=None, num_threads: int = 0) -> None:
    """The codec's bits per pixel against PSNR on --images for every prefix (of --run's model,
    or of every shipped quality level), beside JPEG and WebP at --qualities, with the BD-rate
    against each: OUT/codec_rd.json and .png (OUT: the run's directory by default).

    Example: python -m progvae codec-eval --images=photos/ --out=runs/codec_eval
    """
    from progvae.evaluation.experiments.codec_rd import codec_eval_command

    _set_threads(num_threads)
    print(codec_eval_command(run, images, out, lpips_weights, qualities, report=print))


def vdvae(config: str = "tiny", out: str = "", quiet: bool = False, resume_from: int = 0,
          **overrides) -> None:
    """Train the original VDVAE by the ELBO with its DMoL head (the conventional HVAE of paper
    003 §4, which `progressive` analyses). Re-running on the same --out resumes.

    Example: python -m progvae vdvae --config=digits --out=runs/vdvae --steps=1200
    """
    _train("vdvae", _config(config, overrides), out, quiet, resume_from)


def progressive(run: str = "", out: str = "", data: str = "", max_resolution: int = 0,
                steps: int = 0, quiet: bool = False, **overrides) -> None:
    """The (R_K, D_K) progressive-coding experiment of paper 003 §4.1 on a plain VDVAE run.

    Example: python -m progvae progressive --run=runs/vdvae --out=runs/progressive --steps=600
    K = the latent groups at resolution <= --max_resolution (default image size / 8). R_K is
    their held-out KL; D_K the held-out MSE of a new decoder trained --steps on z_1:K; then
    the inference path and that decoder train --steps more at rate target R_K, giving R'_K.
    --steps defaults to half the VDVAE's. Other --field=value overrides apply to both runs.
    Writes OUT/table.md, table.json, reconstructions.png; re-running resumes.
    """
    from progvae.evaluation.experiments.progressive import run_progressive

    if not run:
        raise UserError("Pass --run=RUN, the directory of a finished vdvae run.")
    table = run_progressive(run, out, data, max_resolution, steps, quiet, overrides)
    _print_main(f"{(Path(out) / 'table.md').read_text()}\nWrote {out}/table.md, table.json, "
                f"reconstructions.png ({table['seconds']:.0f} s).")


def report(runs=None, out: str = "", sweep: str = "", lpips_weights: str = "") -> None:
    """One Markdown page comparing runs side by side: OUT/report.md.

    Example: python -m progvae report --runs=runs/demo/stage2,runs/joint --out=runs/report
    ELBO, FID, LPIPS, rate and distortion of every run, paper 003's Tables 1 and 2 where the
    runs make them, and image grids; --sweep=DIR adds LPIPS against MSE across a sweep.
    """
    from progvae.evaluation.report import write_report

    if isinstance(runs, str):
        runs = [part for part in runs.split(",") if part]
    path = write_report([str(run) for run in (runs or [])], out, sweep, lpips_weights)
    print(f"Wrote {path}.")


def bench(config: str = "tiny", model: str = "stage1", batch: int | None = None,
          precision: str = "auto", compile: bool | str = "auto", device: str = "",
          steps: int = 20, warmup: int = 5, out: str = "", profile: int = 0,
          suite: str = "step", run: str = "", **overrides) -> None:
    """Measure speed. --suite=step (default): the training step (images/s, FLOPs, memory),
    sampling and the data path of a preset (bench.json; --profile=N adds a profile);
    --suite=gpu: the GPU check (bench_gpu.json); --suite=codec: compress and decompress of --run.

    Example: python -m progvae bench --config=svhn --model=stage1 --precision=bf16 --compile
    """
    from progvae.evaluation.benchmarks.suites import run_suite

    print(run_suite(suite, config=config, model=model, batch=batch, precision=precision,
                    compile=compile, device=device, steps=steps, warmup=warmup, out=out,
                    profile=profile, run=run, overrides=overrides))


def _resume_step(step) -> int:
    """--resume_from=STEP (0: the latest checkpoint, as a plain re-run)."""
    check_number("--resume_from", step, minimum=0, integer=True)
    return step


def _set_threads(num_threads: int) -> None:
    from progvae.training import dist
    check_number("--num_threads", num_threads, 0, integer=True)
    dist.set_cpu_threads(int(num_threads))


def _config(preset: str, overrides: dict):
    from progvae.core.config import load_config
    return load_config(preset, overrides)


def _train(kind: str, config, out: str, quiet: bool, resume_from, title: str = "",
           stage1: str = "") -> None:
    """Train (or continue) a run of `kind` (progvae.stages.train) and print its summary."""
    from progvae.runs.train import format_summary
    from progvae.stages import train

    summary = train(kind, config, out, stage1=stage1, quiet=quiet,
                    resume_from=_resume_step(resume_from))
    _print_main(format_summary(summary, out, title))


def _print_main(text: str) -> None:
    """Print on the main process only (under torchrun every rank runs the command)."""
    from progvae.training import dist
    if dist.is_main():
        print(text)


COMMANDS = {"demo": demo, "stage1": stage1, "stage2": stage2, "joint": joint, "vdvae": vdvae,
            "sample": sample, "sweep": sweep, "evaluate": evaluate, "progressive": progressive,
            "report": report, "data": data, "bench": bench, "export": export, "plot": plot,
            "compress": compress, "decompress": decompress, "codec-eval": codec_eval}


# Commands that take any config field as --field=value: their --help also lists the fields.
CONFIG_COMMANDS = ("stage1", "stage2", "joint", "vdvae", "sweep", "progressive", "bench")


def main(argv: list[str] | None = None) -> None:
    from progvae.training import dist
    run(COMMANDS, list(sys.argv[1:] if argv is None else argv), _fields_after_help,
        dist.cleanup)


def _fields_after_help(command: str) -> None:
    """A command that takes any config field lists the fields after its own --help."""
    if command in CONFIG_COMMANDS:
        from progvae.core.config import describe_fields
        print(describe_fields())


if __name__ == "__main__":
    main()
