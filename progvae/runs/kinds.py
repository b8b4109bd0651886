"""The kinds of run progvae trains, in one table.

Every command that trains, loads, samples, scores or reports a run looks its kind up here, and
no other module compares kind names. A kind says which network its run directory holds, how
that network is scored on held-out images (the per-image terms that the one held-out evaluator,
`progvae.runs.heldout`, averages), how it samples and reconstructs, and how it is described.

| kind     | network in checkpoint.pt            | scored and sampled as            | likelihood |
| -------- | ----------------------------------- | -------------------------------- | ---------- |
| stage1   | VDVAE, linear mean head             | itself (mean decodings)          | no         |
| vdvae    | VDVAE, DMoL head                    | itself (DMoL samples)            | yes        |
| stage2   | conditional VDVAE, DMoL head        | Pipeline with its stage-one run  | yes        |
| joint    | Pipeline (both networks)            | itself                           | yes        |
| progressive_decoder, progressive_gamma | MaskedCoder: a VDVAE's first K groups and a new decoder (the `progressive` experiment) | itself (mean decodings) | no |

A new kind is one entry in `KINDS` (plus its tests); the commands need no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.models.heads import mse_per_image
from progvae.models.masked_coder import MaskedCoder
from progvae.models.pipeline import Pipeline, composite_terms
from progvae.models.vdvae import VDVAE, latent_log_ratio

Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RunKind:
    """One kind of run. `scored` models are what `terms`, `sample` and `reconstruct` take: the
    checkpointed network itself, or for stage two the Pipeline of it and its stage-one run."""

    name: str
    label: str                                          # how `report` names it
    description: str                                    # one line for messages and help
    build: Callable[[Config], nn.Module]                # the network checkpoint.pt holds
    terms: Callable[[nn.Module, torch.Tensor], Terms]   # per-image held-out terms, each (B,)
    # (model, n, temperature, stage1_temperature, pixel_temperature) -> images; the last two
    # are None for "the same as temperature" and matter only where there is a second stage or
    # a DMoL head
    sample: Callable[[nn.Module, int, float, float | None, float | None], torch.Tensor]
    reconstruct: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    has_likelihood: bool                                # reports an ELBO (and bits/dim)
    needs_stage1_run: bool = False                      # scored with config.stage1's network
    composite: bool = False                             # a two-stage model (Pipeline)
    # log p(x, z) - log q(z | x) in nats per image at one draw z ~ q, (B,): what the
    # importance-weighted bound averages; None for kinds without a likelihood
    log_weight: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    table2_role: str | None = None   # its column in paper 003 Table 2: conventional, two-stage


# ------------------------------------------------------------------------ per-image terms
def vdvae_terms(model: VDVAE, x: torch.Tensor, likelihood: bool) -> Terms:
    """rate (KL, nats/dim), mse of the head's mean, group_rates (B, groups) top group first,
    and with a likelihood head nll and elbo = -(nll + rate)."""
    out = model(x)
    terms = {"rate": out["rate"], "mse": mse_per_image(model.head.mean(out["output"]), x),
             "group_rates": torch.stack(out["kl"], dim=1) / model.dims_per_image}
    if likelihood:
        terms["nll"] = model.head.reconstruction_loss(out["output"], x)
        terms["elbo"] = -(terms["nll"] + out["rate"])
    return terms


def vdvae_log_weight(model: VDVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z) + log p(z) - log q(z | x) in nats, (B,), at one draw z ~ q(z | x)."""
    out = model(x)
    log_likelihood = -model.head.reconstruction_loss(out["output"], x) * model.dims_per_image
    return log_likelihood.double() - latent_log_ratio(out).double()


def pipeline_log_weight(pipeline: Pipeline, x: torch.Tensor) -> torch.Tensor:
    """The same for the two-stage model: both stages' latents, z and z_tilde, are drawn from
    their posteriors and scored under their priors (stage two's conditioned on x_tilde)."""
    terms = composite_terms(pipeline.stage1, pipeline.stage2, x)
    log_likelihood = -terms["nll"] * pipeline.stage2.dims_per_image
    return (log_likelihood.double() - latent_log_ratio(terms["stage1_out"]).double()
            - latent_log_ratio(terms["stage2_out"]).double())


def pipeline_terms(pipeline: Pipeline, x: torch.Tensor) -> Terms:
    """The composite ELBO of paper 003 §5 and its parts: elbo, nll, rate (stage two's KL),
    stage1_rate, mse (the final mean reconstruction), stage1_distortion (x_tilde's MSE)."""
    terms = composite_terms(pipeline.stage1, pipeline.stage2, x)
    return {"elbo": terms["elbo"], "nll": terms["nll"], "rate": terms["stage2_rate"],
            "stage1_rate": terms["stage1_rate"],
            "mse": mse_per_image(pipeline.stage2.head.mean(terms["output"]), x),
            "stage1_distortion": mse_per_image(terms["x_tilde"], x)}


# ------------------------------------------------------------------------------ sampling
def _mean_samples(model: VDVAE, n: int, temperature: float, _stage1_temperature,
                  _pixel_temperature) -> torch.Tensor:
    return model.sample(n, temperature)


def _dmol_samples(model: VDVAE, n: int, temperature: float, _stage1_temperature,
                  pixel_temperature: float | None) -> torch.Tensor:
    pixel_temperature = temperature if pixel_temperature is None else pixel_temperature
    return model.head.sample(model.decode(n=n, temperature=temperature), pixel_temperature)


def _pipeline_samples(pipeline: Pipeline, n: int, temperature: float,
                      stage1_temperature: float | None,
                      pixel_temperature: float | None) -> torch.Tensor:
    return pipeline.sample(n, temperature, stage1_temperature, pixel_temperature)


def _reconstruct(model: VDVAE, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    return model.reconstruct(x), None


def _pipeline_reconstruct(pipeline: Pipeline, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_tilde, final = pipeline.reconstruct_by_stage(x)
    return final, x_tilde


KINDS: dict[str, RunKind] = {kind.name: kind for kind in (
    RunKind("stage1", "stage one (distortion-targeted)", "stage one: VDVAE with a linear mean head, rate under a distortion target",
            build=lambda config: VDVAE(config, head="linear"),
            terms=lambda model, x: vdvae_terms(model, x, likelihood=False),
            sample=_mean_samples, reconstruct=_reconstruct, has_likelihood=False),
    RunKind("vdvae", "plain VDVAE (ELBO)", "plain VDVAE with a DMoL head, trained by the ELBO",
            build=lambda config: VDVAE(config, head="dmol"),
            terms=lambda model, x: vdvae_terms(model, x, likelihood=True),
            sample=_dmol_samples, reconstruct=_reconstruct, has_likelihood=True,
            log_weight=vdvae_log_weight),
    RunKind("stage2", "two-stage (progressive coding)", "stage two: conditional U-Net VDVAE on a frozen stage one",
            build=lambda config: VDVAE(config, head="dmol", conditional=True),
            terms=pipeline_terms, sample=_pipeline_samples, reconstruct=_pipeline_reconstruct,
            has_likelihood=True, needs_stage1_run=True, composite=True,
            table2_role="two-stage", log_weight=pipeline_log_weight),
    RunKind("joint", "conventional (joint ELBO)", "both stages trained end to end by the composite ELBO (the baseline)",
            build=lambda config: Pipeline(VDVAE(config, head="linear"),
                                          VDVAE(config, head="dmol", conditional=True)),
            terms=pipeline_terms, sample=_pipeline_samples, reconstruct=_pipeline_reconstruct,
            has_likelihood=True, composite=True, table2_role="conventional",
            log_weight=pipeline_log_weight),
    RunKind("progressive_decoder", "progressive: new decoder on z_1:K",
            "a new decoder on the first K groups of a frozen VDVAE (D_K, paper 003 §4.1)",
            build=MaskedCoder.from_config,
            terms=lambda model, x: vdvae_terms(model, x, likelihood=False),
            sample=_mean_samples, reconstruct=_reconstruct, has_likelihood=False),
    RunKind("progressive_gamma", "progressive: gamma-optimal coder",
            "a VDVAE's inference path and a new decoder at rate target R_K (R'_K, lambda*)",
            build=MaskedCoder.from_config,
            terms=lambda model, x: vdvae_terms(model, x, likelihood=False),
            sample=_mean_samples, reconstruct=_reconstruct, has_likelihood=False),
)}


def get_kind(name: str | None, where: str = "this run") -> RunKind:
    """The registry entry for `name`; an unknown name is a one-sentence UserError."""
    if name not in KINDS:
        raise UserError(f"{where} holds a run of unknown kind '{name}'; pass the --out of a "
                        f"{', '.join(KINDS)} run.")
    return KINDS[name]
