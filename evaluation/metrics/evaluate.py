"""`progvae evaluate`: every metric that applies to a trained run, written to RUN/eval.json.

| metric       | what                                                              |
| ------------ | ----------------------------------------------------------------- |
| `elbo`       | held-out ELBO (nats/dim), bits/dim, its parts, per-group rates;   |
|              | stage-one runs have no likelihood and report their rate only      |
| `mse`        | held-out reconstruction MSE per dimension and PSNR                |
| `fid`        | Inception FID of samples against the split (`evaluation.fid`)     |
| `fid_digits` | FID on digit-classifier features, for `--data=digits` only        |
| `lpips`      | LPIPS (AlexNet) of held-out images against their reconstructions  |

Every metric applies to every kind of run (`progvae.runs.kinds`).

ELBO and MSE cover the whole split exactly; FID compares `n_samples` samples with the whole
split; LPIPS covers the whole split. Weights that cannot be found fail before any work.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import torch

from progvae.core.atomic import atomic_write_json, flag_non_finite
from progvae.core.errors import UserError
from progvae.core.untrusted import RESTORE, check_numbers, read_json
from progvae.data.loading import device_batch, load_data_for, to_model_input
from progvae.evaluation.metrics.elbo import importance_weighted_metrics
from progvae.runs.exported import is_exported
from progvae.runs.heldout import HELDOUT_SEED, RANK_SEED_STRIDE, heldout_metrics, seeded
from progvae.runs.kinds import RunKind
from progvae.runs.load import load_scored
from progvae.runs.sampling import draw_samples
from progvae.training import dist
from progvae.training.dist import default_device

METRICS = ("elbo", "mse", "fid", "fid_digits", "lpips")
SPLITS = {"test": lambda data: data.test, "train": lambda data: data.train}   # --split
DEFAULT_METRICS = ("elbo", "mse", "fid", "lpips")
DIGITS_DEFAULT_METRICS = ("elbo", "mse", "fid_digits")   # Inception means little on digits


def parse_metrics(metrics, data_name: str) -> list[str]:
    """--metrics as fire hands it over (a string, a tuple, or None for the defaults), for the
    dataset named `data_name` (its --data spec)."""
    if metrics is None or metrics == "":
        return list(DIGITS_DEFAULT_METRICS if data_name == "digits" else DEFAULT_METRICS)
    names = metrics if isinstance(metrics, (tuple, list)) else re.split(r"[,\s]+", str(metrics))
    names = [str(name) for name in names if str(name)]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise UserError(f"Unknown metric(s) {', '.join(unknown) or '(none)'} in --metrics; "
                        f"choose from {', '.join(METRICS)}.")
    if "fid_digits" in names and data_name != "digits":
        raise UserError(f"fid_digits is defined for --data=digits only, not {data_name}; use "
                        "fid instead.")
    return list(dict.fromkeys(names))


@torch.no_grad()
def reconstructions(kind: RunKind, model, images: np.ndarray, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reconstructions of every image (B, C, H, W) in [-1, 1], and for two-stage kinds stage
    one's x_tilde as well (else None)."""
    device = next(model.parameters()).device
    finals, firsts = [], []
    for start in range(0, len(images), batch_size):
        final, x_tilde = kind.reconstruct(model, device_batch(images[start:start + batch_size],
                                                              device))
        finals.append(final)
        if x_tilde is not None:
            firsts.append(x_tilde)
    # one copy to the host at the end, not one per batch
    return torch.cat(finals).cpu(), (torch.cat(firsts).cpu() if firsts else None)


def evaluate_run(run: str | Path, data_spec: str = "", metrics=None, split: str = "test",
                 n_samples: int = 10_000, iw_samples: int = 0, batch_size: int | None = None,
                 inception_weights: str = "", lpips_weights: str = "",
                 temperature: float = 1.0, seed: int = HELDOUT_SEED,
                 dist_timeout: float = 1800.0, fid_stats: str = "") -> dict:
    """Compute the metrics, merge them into RUN/eval.json and return them. ELBO and MSE come
    from the one held-out evaluator with the run's eval_batch_size and seed 0 unless given, so
    they equal the run's summary.json on the same checkpoint. Under torchrun
    the held-out images, the samples and the LPIPS pairs are split between the ranks and
    their sums (or, for FID, their features) gathered; rank 0 writes eval.json."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'.")
    for name, value, smallest in (("n_samples", n_samples, 1), ("iw_samples", iw_samples, 0),
                                  ("batch_size", 1 if batch_size is None else batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
            raise UserError(f"--{name} must be an integer >= {smallest}, got {value!r}.")
    dist.setup(dist_timeout)   # under torchrun: the work is shared between the ranks
    device = default_device()
    config, model, info = load_scored(run, device)
    kind = info["kind"]
    if iw_samples > 0 and config.latents == "quantized":
        raise UserError("--iw_samples needs Gaussian latents; the rate of a run with "
                        "--latents=quantized is already the exact code length, so leave it out.")
    batch_size = batch_size or config.eval_batch_size
    data_spec = data_spec or config.data
    names = parse_metrics(metrics, data_spec)
    # Every scorer is built (and its weights and statistics read) before any long computation.
    fid_scorers, given_statistics = {}, {}
    if fid_stats:
        if "fid" not in names:
            raise UserError("--fid_stats are reference statistics for the fid metric; add fid "
                            "to --metrics.")
        from progvae.evaluation.metrics.fid import read_statistics
        given_statistics["fid"] = read_statistics(fid_stats)
    if "fid" in names:
        from progvae.evaluation.metrics.fid import FidScorer
        fid_scorers["fid"] = FidScorer("inception", inception_weights or None,
                                       batch_size=batch_size)
    if "fid_digits" in names:
        from progvae.evaluation.metrics.fid import FidScorer
        fid_scorers["fid_digits"] = FidScorer("digits", batch_size=batch_size)
    lpips_scorer = None
    if "lpips" in names:
        from progvae.evaluation.metrics.lpips_metric import LpipsScorer
        lpips_scorer = LpipsScorer(lpips_weights or None, device)
    data = load_data_for(dataclasses.replace(config, data=data_spec))
    if (data.image_size, data.channels) != (config.image_size, config.image_channels):
        raise UserError(f"'{run}' models {config.image_size}x{config.image_size} images with "
                        f"{config.image_channels} channel(s) but --data={data.name} does not; pass "
                        "the data it was trained on.")

    images = SPLITS[split](data)
    if len(images) < dist.world_size():
        raise UserError(f"The {split} split has {len(images)} images, fewer than the "
                        f"{dist.world_size()} processes; run with fewer processes.")
    started = time.perf_counter()
    result: dict = {"run": str(run), "kind": kind.name, "step": info["step"], "data": data.name,
                    "split": split, "n_images": len(images)}
    if "elbo" in names or "mse" in names:
        result.update(heldout_metrics(kind, model, images, batch_size, seed))
        if iw_samples > 0 and kind.has_likelihood:
            result.update(importance_weighted_metrics(kind, model, images, batch_size, seed,
                                                      iw_samples))
    rank_seed = seed + RANK_SEED_STRIDE * dist.rank()
    if fid_scorers:
        # Under torchrun each rank draws its share of the samples and extracts their
        # features; the features are gathered, so the statistics are those of all samples.
        with seeded(rank_seed, device):
            share = dist.shard(n_samples)
            samples = draw_samples(kind, model, share.stop - share.start, temperature,
                                   batch_size)
        for metric, scorer in fid_scorers.items():
            features = dist.gather_rows(scorer.features(samples))
            result[metric] = scorer.score_features(features, images,
                                                   given_statistics.get(metric))
        result.update({"fid_n_samples": n_samples, "fid_temperature": temperature})
    if lpips_scorer is not None:
        local = images[dist.shard(len(images))]
        with seeded(rank_seed, device):
            finals, firsts = reconstructions(kind, model, local, batch_size)
        originals = to_model_input(torch.from_numpy(local))
        result["lpips"] = mean_lpips(lpips_scorer, originals, finals, batch_size, len(images))
        if firsts is not None:
            result["stage1_lpips"] = mean_lpips(lpips_scorer, originals, firsts, batch_size,
                                                len(images))
    result["metrics"] = names
    result["seconds"] = round(time.perf_counter() - started, 2)
    if dist.is_main():
        result = flag_non_finite(result, f"{run}/eval.json")
        write_eval(eval_path(run), result)
    dist.barrier()
    return result


def mean_lpips(scorer, originals: torch.Tensor, reconstructed: torch.Tensor,
               batch_size: int, count: int | None = None) -> float:
    """Mean LPIPS over aligned image sets (B, C, H, W) in [-1, 1]: under torchrun each rank
    passes its share and `count`, the number of images over all ranks."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(originals), batch_size):
        total += scorer(originals[start:start + batch_size],
                        reconstructed[start:start + batch_size]).double().sum().cpu()
    total = dist.sum_across_ranks(total.to(dist.collective_device()))
    return float(total) / (len(originals) if count is None else count)


def eval_path(run: str | Path) -> Path:
    """Where `evaluate` writes: RUN/eval.json, or MODEL.eval.json beside an exported model."""
    run = Path(str(run))
    return run.with_suffix(".eval.json") if is_exported(run) else run / "eval.json"


# eval.json's numbers that are read back (merged by a later `evaluate`, shown by `report`)
EVAL_NUMBERS = ("step", "elbo", "bpd", "mse", "psnr", "rate", "fid", "fid_digits", "lpips",
                "iw_elbo", "iw_bpd")


def read_eval(path: Path, fix: str = RESTORE) -> dict:
    """An eval.json, its numbers checked; a damaged file is one sentence naming it."""
    return check_numbers(read_json(path, fix=fix), EVAL_NUMBERS, str(path), fix)


def write_eval(path: Path, result: dict) -> None:
    """Merge into eval.json when it describes the same checkpoint, data and split (so separate
    calls for different metrics add up); otherwise replace it."""
    merged = dict(result)
    if path.is_file():
        previous = read_eval(path, fix="remove it (evaluate then writes a new one) or restore it")
        if all(previous.get(key) == result[key] for key in ("step", "data", "split")):
            names = list(dict.fromkeys(previous.get("metrics", []) + result["metrics"]))
            merged = {**previous, **result, "metrics": names}
    atomic_write_json(merged, path)


def format_table(result: dict) -> str:
    """The printed summary: one metric a line, with its unit."""
    rows = [("ELBO", "elbo", "nats/dim"), ("bits/dim", "bpd", ""),
            (f"IW-ELBO (K={result.get('iw_samples')})", "iw_elbo", "nats/dim"),
            ("IW bits/dim", "iw_bpd", ""), ("nll", "nll", "nats/dim"),
            ("rate", "rate", "nats/dim"), ("stage-one rate", "stage1_rate", "nats/dim"),
            ("MSE", "mse", "per dim, [-1, 1] scale"), ("PSNR", "psnr", "dB"),
            ("stage-one MSE", "stage1_distortion", "x_tilde"),
            (f"FID ({result.get('fid_n_samples')} samples)", "fid", "Inception-v3"),
            (f"fid_digits ({result.get('fid_n_samples')} samples)", "fid_digits",
             "digit-classifier features, not comparable with FID"),
            ("LPIPS", "lpips", "AlexNet"), ("stage-one LPIPS", "stage1_lpips", "x_tilde")]
    lines = [f"{result['kind']} run '{result['run']}' at step {result['step']}, "
             f"{result['data']} {result['split']} split ({result['n_images']} images):"]
    for label, key, unit in rows:
        if result.get(key) is not None:
            lines.append(f"  {label:<28} {result[key]:>10.5f}  {unit}")
    return "\n".join(lines)


def format_evaluation(result: dict, run: str | Path) -> str:
    """What `evaluate` prints: the table and where eval.json went."""
    return f"{format_table(result)}\nWrote {eval_path(run)} ({result['seconds']:.0f} s)."
