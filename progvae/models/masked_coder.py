"""A lossy coder on the first K latent groups of a VDVAE (paper 003 §3.1 and A.2): the network
of the progressive-coding experiment's two training runs."""

from __future__ import annotations

import torch
from torch import nn

from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.models.distributions import NoiseShard
from progvae.models.vdvae import VDVAE


class MaskedCoder(nn.Module):
    """`inference` gives q(z_{1:K} | x) and p(z_{1:K}) (a VDVAE's encoder and the top of its
    top-down path); `decoder` and `head` (a second VDVAE's decoder and linear head) decode
    z_{1:K} with the later groups drawn from their prior (`masked="sample"`, the paper's: VDVAE's
    forward_manual_latents samples every group it is not given) or at its mean ("mean").

    `forward(x)` returns {"output": x_hat (B, C, H, W), "rate": (B,) KL of the first K groups
    in nats per dimension, "kl", "latents"}; `head` is the linear head, so stage one's
    rate-distortion objective and terms apply unchanged.
    """

    def __init__(self, inference: VDVAE, decoder_source: VDVAE, n_groups: int,
                 masked: str = "sample"):
        super().__init__()
        self.masked_temperature = {"sample": 1.0, "mean": 0.0}[masked]
        self.inference = inference
        self.decoder = decoder_source.decoder
        self.head = decoder_source.head
        self.n_groups = n_groups

    @classmethod
    def from_config(cls, config: Config) -> "MaskedCoder":
        """The architecture a progressive run records: a plain VDVAE (DMoL head) as the
        inference path, a fresh decoder with a linear head, K = config.latent_groups."""
        if config.latent_groups < 1:
            raise UserError("This progressive run does not record how many latent groups it "
                            "codes (an older progvae wrote it); run `progvae progressive` again "
                            "on a new --out to recreate it.")
        return cls(VDVAE(config, head="dmol"), VDVAE(config, head="linear"), config.latent_groups,
                   config.masked)

    @property
    def dims_per_image(self) -> int:
        return self.inference.dims_per_image

    def forward(self, x: torch.Tensor, noise: NoiseShard | None = None) -> dict:
        inferred = self.inference(x, noise=noise)
        latents, kl = inferred["latents"][:self.n_groups], inferred["kl"][:self.n_groups]
        rate = torch.stack(kl, dim=1).sum(1) / self.dims_per_image
        features = self.decoder.decode_latents(latents, self.masked_temperature, noise=noise,
                                               n=x.shape[0])["features"]
        return {"output": self.head(features), "rate": rate, "kl": kl, "latents": latents}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.mean(self.forward(x)["output"])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Mean decodings of z_{1:K} ~ p(z_{1:K}) at `temperature` (later groups as in
        training): (n, C, H, W) in [-1, 1]."""
        latents = self.inference.decoder.sample(n, temperature)["latents"]
        features = self.decoder.decode_latents(latents[:self.n_groups], self.masked_temperature,
                                               n=n)["features"]
        return self.head.mean(self.head(features))
