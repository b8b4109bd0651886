"""The two-stage model as one hierarchical VAE: stage one (z) then stage two (z_tilde).

Generative story (paper 003 §5, paper 002 §4 eqs 5-6): z ~ p(z); x_tilde = stage one's mean
decoding of z; z_tilde ~ p(z_tilde | x_tilde); x ~ p(x | z_tilde, x_tilde) (a DMoL). Inference
uses q(z | x) from stage one and q(z_tilde | x, x_tilde) from stage two, so the composite ELBO is

    E[ln p(x | z, z_tilde)] - KL(q(z|x) || p(z)) - KL(q(z_tilde|x, x_tilde) || p(z_tilde|x_tilde)),

all in nats per dimension here.
"""

from __future__ import annotations

import torch
from torch import nn

from progvae.models.distributions import NoiseShard
from progvae.models.vdvae import VDVAE


def composite_terms(stage1: VDVAE, stage2: VDVAE, x: torch.Tensor,
                    noise: NoiseShard | None = None) -> dict:
    """Per-image terms of the composite ELBO, each (B,) in nats per dimension.

    Gradients flow through x_tilde into stage one unless the caller runs stage one frozen.
    Returns {"nll", "stage1_rate", "stage2_rate", "elbo", "x_tilde", "output", "stage1_out",
    "stage2_out"}, the last two the stages' whole forward outputs (latents, distributions).
    """
    first = stage1(x, noise=noise)
    x_tilde = stage1.head.mean(first["output"])           # (B, C, H, W)
    second = stage2(x, condition_image=x_tilde, noise=noise)
    nll = stage2.head.reconstruction_loss(second["output"], x)
    elbo = -(nll + first["rate"] + second["rate"])
    return {"nll": nll, "stage1_rate": first["rate"], "stage2_rate": second["rate"],
            "elbo": elbo, "x_tilde": x_tilde, "output": second["output"],
            "stage1_out": first, "stage2_out": second}


class Pipeline(nn.Module):
    """Stage one and stage two chained: sample, reconstruct, composite ELBO, progressive decoding.

    Works on CPU and GPU and needs no dataset to sample. Load one from run directories with
    `progvae.runs.load_pipeline`.
    """

    def __init__(self, stage1: VDVAE, stage2: VDVAE):
        super().__init__()
        if stage2.image_size != stage1.image_size or \
                stage2.image_channels != stage1.image_channels:
            raise ValueError("stage one and stage two must model images of the same shape")
        self.stage1 = stage1
        self.stage2 = stage2

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0,
               stage1_temperature: float | None = None,
               pixel_temperature: float | None = None) -> torch.Tensor:
        """n images (n, C, H, W) on the 256-level grid in [-1, 1]: z ~ p(z) (at
        `stage1_temperature`), x_tilde = its mean decoding, then z_tilde ~ p(z_tilde | x_tilde)
        at `temperature` and x ~ p(x | z_tilde, x_tilde) at `pixel_temperature` (0: each
        pixel's most probable value). Both default to `temperature`."""
        stage1_temperature = temperature if stage1_temperature is None else stage1_temperature
        pixel_temperature = temperature if pixel_temperature is None else pixel_temperature
        x_tilde = self.stage1.head.mean(self.stage1.decode(n=n, temperature=stage1_temperature))
        params = self.stage2.decode(temperature=temperature, condition_image=x_tilde)
        return self.stage2.head.sample(params, pixel_temperature)

    @torch.no_grad()
    def reconstruct_by_stage(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_tilde, final): stage one's reconstruction from z ~ q(z|x) alone, then stage two's
        mean reconstruction given z_tilde ~ q(z_tilde | x, x_tilde)."""
        terms = composite_terms(self.stage1, self.stage2, x)
        return terms["x_tilde"], self.stage2.head.mean(terms["output"])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The two-stage model's mean reconstruction of x (B, C, H, W) on [-1, 1], same shape
        (stage one's alone is `reconstruct_by_stage(x)[0]`)."""
        return self.reconstruct_by_stage(x)[1]

    @torch.no_grad()
    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Composite ELBO per image, (B,) in nats per dimension (bits/dim = -elbo / ln 2)."""
        return composite_terms(self.stage1, self.stage2, x)["elbo"]
