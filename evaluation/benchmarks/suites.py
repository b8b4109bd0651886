"""`progvae bench`: its three suites, one function each, in one registry (`SUITES`), so the
command and its error message know the same names.

| suite   | measures                                                     | writes            |
| ------- | ------------------------------------------------------------ | ----------------- |
| `step`  | one training step of a preset: images/s, FLOPs, memory, sampling and the data path (the default) | bench.json |
| `gpu`   | the whole GPU check: svhn in fp32, TF32 and bf16 + compile, pipeline samples | bench_gpu.json |
| `codec` | `compress` and `decompress` speed of the shipped codec (or --run, or --config) | bench_codec.json |
"""

from __future__ import annotations

import dataclasses

from progvae.core.config import load_config
from progvae.core.errors import UserError
from progvae.evaluation.benchmarks.bench import format_result, run_bench, write_result


def step_suite(config: str = "tiny", model: str = "stage1", batch: int | None = None,
               precision: str = "auto", compile: bool | str = "auto", device: str = "",
               steps: int = 20, warmup: int = 5, out: str = "", profile: int = 0,
               overrides: dict | None = None, **_unused) -> str:
    """The training step of the preset `config` on synthetic images of its shape."""
    overrides = {**(overrides or {}), "precision": precision, "compile": compile}
    if batch is not None:
        overrides["batch_size"] = batch
    settings = load_config(config, overrides)
    if settings.data == "digits":
        settings = dataclasses.replace(settings, image_channels=1)
    result = run_bench(settings, model=model, steps=steps, warmup=warmup, device=device,
                       profile=profile)
    path = out or "bench.json"
    write_result({"config": config, **result}, path)
    return f"{format_result(result)}\nWrote {path}."


def gpu_suite(steps: int = 20, warmup: int = 5, out: str = "", **_unused) -> str:
    """The GPU check (progvae.evaluation.benchmarks.gpu_suite) on the svhn preset."""
    from progvae.evaluation.benchmarks.gpu_suite import format_suite, run_gpu_suite

    summary = run_gpu_suite(load_config("svhn", {"image_channels": 3}), steps, warmup)
    path = out or "bench_gpu.json"
    write_result(summary, path)
    return f"{format_suite(summary)}\nWrote {path}."


def codec_suite(config: str = "tiny", run: str = "", out: str = "",
                overrides: dict | None = None, **_unused) -> str:
    """Coding speed of the model in `run`, of an untrained model of a named preset (the work
    does not depend on the weights), or else of the shipped default --quality model."""
    from progvae.codec.coder import Codec
    from progvae.codec.files import load_codec
    from progvae.codec.shipped import DEFAULT_QUALITY, shipped_codec
    from progvae.evaluation.benchmarks.codec_bench import format_codec_bench, run_codec_bench
    from progvae.runs.kinds import KINDS

    if run:
        codec, source = load_codec(run), run
    elif config != "tiny":
        settings = load_config(config, {**(overrides or {}), "latents": "quantized"})
        codec = Codec(KINDS["stage1"].build(settings).eval(), f"the {config} preset")
        source = f"the {config} preset, untrained"
    else:
        codec = shipped_codec(DEFAULT_QUALITY)
        source = f"the shipped quality {DEFAULT_QUALITY} model"
    result = run_codec_bench(codec)
    path = out or "bench_codec.json"
    write_result({"run": run, "model": source, **result}, path)
    return f"{format_codec_bench(result)}\nWrote {path}."


SUITES = {"step": step_suite, "gpu": gpu_suite, "codec": codec_suite}


def run_suite(suite: str, **options) -> str:
    """Run the named suite (an empty name is `step`) with the command's options; returns what
    to print."""
    if (suite or "step") not in SUITES:
        raise UserError(f"--suite must be one of {', '.join(SUITES)}, got '{suite}'.")
    return SUITES[suite or "step"](**options)
