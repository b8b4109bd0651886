"""Is a conventionally trained HVAE a good progressive coder? Paper 003 §4.1 and A.2, Table 1.

Given a plain VDVAE trained by the ELBO (`progvae vdvae`), take its first K latent groups
z_{1:K} (those at resolution <= R; the paper uses R = image size / 8) and measure:

- R_K: the held-out KL of the first K groups, KL(q(z_{1:K} | x) || p(z_{1:K})), nats/dim.
- D_K: the held-out MSE of a *new* decoder trained on z_{1:K} ~ q from the frozen VDVAE:
  a fresh VDVAE decoder with a linear mean head, the remaining groups masked: drawn from its
  own prior (`--masked=sample`, the default and the paper's, whose masked decoder is VDVAE's
  forward_manual_latents) or set to its prior means (`--masked=mean`, a deterministic function
  of z_{1:K}).
- gamma-optimal training with the rate target gamma = R_K: the VDVAE's inference path (its
  encoder and the top K groups' posteriors and priors, starting from the trained weights)
  paired with a masked decoder of the same architecture and fresh initialisation as D_K's,
  trained jointly on min D subject to R <= R_K (the `rate` controller, A.5) for as many steps
  as D_K's decoder. Its held-out rate is R'_K and its held-out MSE an upper bound on lambda*,
  the gamma-optimal distortion. D_K well above it means (R_K, D_K) is not Pareto-optimal.
- Both decoders are evaluated with EMA weights whose average spans at most 5% of the run
  (`experiment_ema_rate`), so that a short run reports its final models.

Writes into OUT: `conventional_decoder/` and `gamma_optimal/` (ordinary resumable run
directories), `table.json`, `table.md` (the shape of Table 1) and `reconstructions.png`
(Fig. 1: originals, conventional and gamma-optimal reconstructions from z_{1:K}).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from progvae.core.atomic import atomic_write_json
from progvae.core.config import Config, apply_overrides
from progvae.core.errors import UserError
from progvae.data.loading import ImageData, load_data_for, to_model_input, to_uint8_images
from progvae.models.distributions import NoiseShard
from progvae.models.heads import mse_per_image
from progvae.models.masked_coder import MaskedCoder
from progvae.models.vdvae import VDVAE
from progvae.runs.directory import read_run_config
from progvae.runs.heldout import HELDOUT_SEED, heldout_metrics, seeded
from progvae.runs.kinds import KINDS
from progvae.runs.load import load_model
from progvae.runs.train import StageParts, train_run, write_comparison
from progvae.stages.stage1 import Stage1Objective, controller_summary
from progvae.training import dist
from progvae.training.controllers import build_controller
from progvae.training.dist import default_device
from progvae.training.objective import FixedObjective

N_FIGURE = 8   # held-out images in reconstructions.png
# The gamma-optimal model's inference path starts trained and already at its rate target, so
# the multiplier starts with equal weights on D and R rather than the paper's 0.9999 on R,
# which imitates KL annealing for a model trained from scratch (A.5). --multiplier_init
# overrides it.
GAMMA_MULTIPLIER_INIT = 0.5
# The decoders are compared after a short run from scratch, still learning fast at its end; an
# EMA spanning much of the run would report the models of earlier steps (with the VDVAE's 0.99,
# 200 steps on `patches` held-out MSE 0.066 against the live weights' 0.039). So the EMA spans
# at most this fraction of the run, 1 / (1 - ema_rate) <= steps * fraction: 0.9 for 200 steps,
# the VDVAE's own rate at the paper's lengths. --ema_rate overrides it.
EMA_SPAN_FRACTION = 0.05
# Paper 003 compares D_K with the gamma-optimal coder's distortion at the same rate: R'_K within
# this fraction of R_K counts as the same rate, and a wider gap is said, not compared.
SAME_RATE = 0.02
CORRECTION_ROUNDS = 4   # at most this many target corrections of a quarter of --steps each


def experiment_ema_rate(ema_rate: float, steps: int) -> float:
    """The VDVAE run's ema_rate, or lower where its span would exceed EMA_SPAN_FRACTION of
    `steps`."""
    return min(ema_rate, max(0.0, 1.0 - 1.0 / (EMA_SPAN_FRACTION * steps)))


def groups_up_to(model: VDVAE, max_resolution: int) -> int:
    """K: how many leading latent groups (top-down order) have resolution <= max_resolution."""
    resolutions = model.decoder.group_resolutions
    k = 0
    while k < len(resolutions) and resolutions[k] <= max_resolution:
        k += 1
    if k == 0 or k == len(resolutions):
        raise UserError(
            f"--max_resolution={max_resolution} selects {k} of the {len(resolutions)} latent "
            f"groups (resolutions {sorted(set(resolutions))}); pick a resolution that keeps some "
            "groups and leaves some out.")
    return k


class DistortionObjective(FixedObjective):
    """D_K's decoder objective: the MSE of its reconstruction, nothing else (the inference path
    is frozen, so the rate is only logged)."""

    def __call__(self, model: MaskedCoder, images: torch.Tensor,
                 noise: NoiseShard | None = None) -> dict[str, torch.Tensor]:
        out = model(images, noise=noise)
        distortion = mse_per_image(out["output"], images).mean()
        return {"loss": distortion, "distortion": distortion, "rate": out["rate"].mean()}


def freeze_unused(model: MaskedCoder, images: torch.Tensor, seed: int) -> None:
    """Stop training the parameters the objective never reaches (the VDVAE's DMoL head and
    later groups, the new decoder's posterior blocks): one trial backward finds them, so Adam
    holds no state for them and DistributedDataParallel sees no unused parameters."""
    with seeded(seed, images.device):
        out = model(images)
        (out["rate"].sum() + out["output"].sum()).backward()
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
    model.zero_grad(set_to_none=True)


def first_groups_rate(model: VDVAE, images: np.ndarray, n_groups: int, batch_size: int,
                      seed: int = HELDOUT_SEED) -> tuple[float, dict]:
    """(R_K, all held-out metrics of the VDVAE): R_K = the sum of the first K groups' mean KLs
    per dimension over every image of `images`."""
    metrics = heldout_metrics(KINDS["vdvae"], model, images, batch_size, seed)
    return float(sum(metrics["group_rates"][:n_groups])), metrics


def run_progressive(vdvae_run: str | Path, out: str | Path, data_spec: str = "",
                    max_resolution: int = 0, steps: int = 0, quiet: bool = False,
                    overrides: dict | None = None) -> dict:
    """The whole experiment; re-running the same command continues its two training runs."""
    if not out:
        raise UserError("Pass --out=DIR, the folder for the experiment's runs and table.")
    # Join torchrun's process group before choosing a device: each rank then takes its own
    # GPU (not every rank GPU 0) and the held-out evaluations below are shared out.
    timeout = apply_overrides(Config(), {key: value for key, value in (overrides or {}).items()
                                         if key == "dist_timeout"}, "the command line")
    dist.setup(timeout.dist_timeout)
    device = default_device()
    config, vdvae, info = load_model(vdvae_run, device)
    if info["kind"] is not KINDS["vdvae"]:
        raise UserError(f"--run='{vdvae_run}' is a {info['kind'].name} run; the progressive-coding "
                        "experiment needs a plain VDVAE run (python -m progvae vdvae).")
    if not info["finished"]:
        raise UserError(f"The VDVAE run '{vdvae_run}' stopped at step {info['step']} of "
                        f"{config.steps}; finish it first by re-running its command.")
    # Architecture from the VDVAE run; training length and any other field from the flags.
    config = apply_overrides(config, {"data": data_spec or config.data,
                                      "steps": steps or max(1, config.steps // 2),
                                      **(overrides or {})}, "the command line")
    if "ema_rate" not in (overrides or {}):
        config = dataclasses.replace(config, ema_rate=experiment_ema_rate(config.ema_rate,
                                                                          config.steps))
    dist.set_cpu_threads(config.num_threads)
    max_resolution = max_resolution or max(1, config.image_size // 8)
    n_groups = groups_up_to(vdvae, max_resolution)
    out = Path(out)

    def check_data(data: ImageData) -> None:
        if (data.image_size, data.channels) != (config.image_size, config.image_channels):
            raise UserError(f"The VDVAE run '{vdvae_run}' models {config.image_size}x"
                            f"{config.image_size} images with {config.image_channels} channel(s) "
                            f"but --data={config.data} does not; pass the data it was trained on.")

    started = time.perf_counter()
    data = load_data_for(config)
    check_data(data)
    rate_k, conventional = first_groups_rate(vdvae, data.test, n_groups, config.eval_batch_size)
    if not rate_k > 0:
        raise UserError(f"The VDVAE's first {n_groups} latent groups carry no information "
                        f"(R_K = {rate_k:.3g} nats/dim: posterior collapse), so there is no rate "
                        "to target; train it longer or pick a larger --max_resolution.")
    dist.print0(f"K = {n_groups} of {vdvae.n_groups} latent groups (resolution <= "
                f"{max_resolution}); R_K = {rate_k:.5f} nats/dim on the held-out split.")

    # D_K: a new masked decoder on z_{1:K} from the frozen VDVAE.
    coder_config = dataclasses.replace(config, latent_groups=n_groups)

    def with_vdvae(trainable: bool):
        def prepare(coder: MaskedCoder, data: ImageData) -> None:
            coder.inference.load_state_dict(vdvae.state_dict())
            coder.inference.requires_grad_(trainable)
            probe = to_model_input(torch.from_numpy(data.test[:config.batch_size]))
            freeze_unused(coder, probe, config.seed)
        return prepare

    decoder_summary, decoder_trainer = train_run(
        KINDS["progressive_decoder"], coder_config, out / "conventional_decoder",
        StageParts(DistortionObjective(), check_data=check_data, prepare_model=with_vdvae(False),
               quiet=quiet))

    # Gamma-optimal: the VDVAE's inference path, now trainable, paired with a masked decoder
    # from the same fresh initialisation, trained jointly on min D s.t. R <= R_K. Both
    # decoders thus get exactly `steps` updates; only the rate-constrained q differs.
    gamma_overrides = {"controller": "rate", "rate_target": rate_k,
                       "multiplier_init": (config.multiplier_init
                                           if "multiplier_init" in (overrides or {})
                                           else GAMMA_MULTIPLIER_INIT)}
    gamma_config = continued_gamma_config(dataclasses.replace(coder_config, **gamma_overrides),
                                          out / "gamma_optimal")

    def train_gamma(settings: Config):
        controller = build_controller(settings)
        summary, trainer = train_run(
            KINDS["progressive_gamma"], settings, out / "gamma_optimal",
            StageParts(Stage1Objective(controller), check_data=check_data,
                       prepare_model=with_vdvae(True), quiet=quiet,
                       summary=controller_summary(controller, settings.constraint_tolerance)))
        return summary, trainer, controller

    base_steps, round_steps = config.steps, max(1, config.steps // 4)
    gamma_summary, gamma_trainer, controller = train_gamma(gamma_config)
    # The controller holds the *training* batch rate at its target, but R'_K is the EMA
    # weights' held-out rate, which can differ by several percent (held-out crops code more
    # cheaply, and the EMA lags). While R'_K misses R_K by more than SAME_RATE, rescale the
    # training target by R_K / R'_K and train a quarter of --steps more; each round is kept in
    # the run's config.json, so re-running the command continues from the last one.
    while ((gamma_config.steps - base_steps) // round_steps < CORRECTION_ROUNDS
           and abs(gamma_summary["rate"] / rate_k - 1.0) > SAME_RATE
           and gamma_summary["rate"] > 0):
        gamma_config = dataclasses.replace(
            gamma_config, rate_target=gamma_config.rate_target * rate_k / gamma_summary["rate"],
            steps=gamma_config.steps + round_steps)
        dist.print0(f"R'_K = {gamma_summary['rate']:.5f} is "
                    f"{100 * (gamma_summary['rate'] / rate_k - 1):+.1f}% from R_K: training "
                    f"target {gamma_config.rate_target:.5f}, {gamma_config.steps} steps in all.")
        gamma_summary, gamma_trainer, controller = train_gamma(gamma_config)

    gap = gamma_summary["rate"] / rate_k - 1.0
    table = {
        "data": data.name, "vdvae_run": str(vdvae_run), "vdvae_steps": info["step"],
        "vdvae_elbo": conventional["elbo"], "vdvae_bpd": conventional["bpd"],
        "max_resolution": max_resolution, "K": n_groups, "n_groups": vdvae.n_groups,
        "R_K": rate_k, "D_K": decoder_summary["mse"],
        "R_prime_K": gamma_summary["rate"], "lambda_star_upper": gamma_summary["mse"],
        "rate_gap": gap, "at_the_same_rate": abs(gap) <= SAME_RATE,
        "D_T": conventional["mse"],
        "gamma_multiplier": controller.multiplier,
        "gamma_training_target": gamma_config.rate_target,
        "correction_rounds": (gamma_config.steps - base_steps) // round_steps,
        "decoder_steps": decoder_trainer.step, "decoder_seconds": round(decoder_trainer.elapsed, 1),
        "gamma_steps": gamma_trainer.step, "gamma_seconds": round(gamma_trainer.elapsed, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if dist.is_main():
        atomic_write_json(table, out / "table.json")
        (out / "table.md").write_text(table_markdown(table))
        write_figure(decoder_trainer.ema_model, gamma_trainer.ema_model, data,
                     out / "reconstructions.png", config.seed)
    dist.barrier()
    return table


def continued_gamma_config(config: Config, run_dir: Path) -> Config:
    """The gamma-optimal run's config: `config`, or where that run already went through target
    corrections (its config.json records more steps), the last of them, so that re-running the
    experiment continues where it stopped instead of starting the corrections again."""
    recorded = run_dir / "config.json"
    if not recorded.is_file():
        return config
    _, previous = read_run_config(recorded, fix="restore it, or pass a new --out")
    if previous.steps > config.steps:
        return dataclasses.replace(config, steps=previous.steps,
                                   rate_target=previous.rate_target)
    return config


def table_markdown(table: dict) -> str:
    """Table 1 of paper 003 for one dataset, with the run's facts underneath. The bound on
    lambda* is shown only where R'_K came within SAME_RATE of R_K; otherwise the table says how
    far it is instead of comparing distortions at unequal rates."""
    gap = table.get("rate_gap", table["R_prime_K"] / table["R_K"] - 1.0)
    same_rate = abs(gap) <= SAME_RATE
    bound = (f"**{table['lambda_star_upper']:.4f}**" if same_rate
             else f"– (R'_K {100 * gap:+.1f}% from R_K)")
    verdict = (f"R'_K is within {100 * SAME_RATE:.0f}% of its target R_K ({100 * gap:+.1f}%), so "
               "D_K and the bound on lambda* are compared at the same rate."
               if same_rate else
               f"R'_K ended {100 * gap:+.1f}% from its target R_K, beyond the "
               f"{100 * SAME_RATE:.0f}% at which the two distortions count as being at the same "
               f"rate, so no bound on lambda* is given (the gamma-optimal coder's MSE was "
               f"{table['lambda_star_upper']:.4f}); train it longer with --steps.")
    return "\n".join([
        "| Dataset | R_K | D_K | R'_K | >= lambda* |",
        "| --- | --- | --- | --- | --- |",
        f"| {table['data']} | {table['R_K']:.4f} | {table['D_K']:.4f} | "
        f"{table['R_prime_K']:.4f} | {bound} |",
        "",
        verdict,
        "",
        f"K = {table['K']} of {table['n_groups']} latent groups (resolution <= "
        f"{table['max_resolution']}). Conventional: a VDVAE trained by the ELBO for "
        f"{table['vdvae_steps']} steps (held-out ELBO {table['vdvae_elbo']:.4f} nats/dim, "
        f"{table['vdvae_bpd']:.4f} bits/dim, full-model MSE D_T = {table['D_T']:.4f}); D_K from "
        f"a new decoder trained {table['decoder_steps']} steps on z_1:K "
        f"({table['decoder_seconds']:.0f} s). Gamma-optimal: the VDVAE's inference path and a "
        f"fresh masked decoder trained together with rate target R_K for "
        f"{table['gamma_steps']} steps ({table['gamma_seconds']:.0f} s"
        + (f"; its training target corrected to {table['gamma_training_target']:.4f} in "
           f"{table['correction_rounds']} round(s) so that its held-out rate meets R_K"
           if table.get("correction_rounds") else "") + "). Rates in nats per "
        "dimension, distortions in MSE per dimension on the [-1, 1] scale, all on the "
        "held-out split.",
        ""])


@torch.no_grad()
def write_figure(conventional: MaskedCoder, gamma: MaskedCoder, data: ImageData, path: Path,
                 seed: int) -> None:
    """Fig. 1: held-out originals, the conventional reconstructions from z_{1:K} and the
    gamma-optimal ones, as aligned rows."""
    device = next(conventional.parameters()).device
    with seeded(seed, device):
        originals = data.test[:N_FIGURE]
        x = to_model_input(torch.from_numpy(originals)).to(device)
        rows = [originals] + [to_uint8_images(model.reconstruct(x).cpu())
                              for model in (conventional, gamma)]
    write_comparison(rows, path)
