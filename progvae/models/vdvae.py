"""The very deep VAE (Child 2020) as paper 003 A.1 configures it.

A bottom-up encoder turns the image into activations at every resolution; a top-down decoder
walks its blocks from 1x1 to full resolution, and each block owns one latent group z_i with a
diagonal Gaussian prior p(z_i | z_<i) and posterior q(z_i | z_<i, x). The decoder's last
activations go to a head (a 1x1 linear mean head for stage one, paper 003 A.3).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.models.activations import gelu
from progvae.models.blocks import (Block, BlockSpec, conv, match_channels, parse_block_string,
                                   parse_widths, residual_scale)
from progvae.models.distributions import (NoiseShard, box_gaussian_nll, gaussian_log_ratio,
                                          gaussian_sample, gaussian_sample_with_kl,
                                          precision_weighted_merge, quantized_latent,
                                          standard_normal_like, uniform_noise_like)
from progvae.models.heads import LinearHead


class Encoder(nn.Module):
    """Bottom-up pass: image -> {resolution: activation} (the last activation at each resolution)."""

    def __init__(self, in_channels: int, specs: list[BlockSpec], widths: dict[int, int],
                 bottleneck_multiple: float, checkpointing: bool = False, patch_size: int = 1,
                 fully_convolutional: bool = False):
        super().__init__()
        self.widths = widths
        self.checkpointing = checkpointing
        self.patch_size = patch_size
        self.first = first = specs[0].resolution
        self.in_conv = conv(in_channels * patch_size ** 2, widths[first], 3)
        scale = residual_scale(len(specs))
        self.blocks = nn.ModuleList()
        # Activations are keyed by their resolution on a training image (the block strings'
        # numbers), not by their measured size, so a fully convolutional model keys a larger
        # image's activations the same way.
        self.resolutions = []
        for spec in specs:
            width = widths[spec.resolution]
            self.blocks.append(Block(
                width, int(width * bottleneck_multiple), width,
                spatial=fully_convolutional or spec.resolution > 2,
                residual=True, down_rate=spec.down_rate, output_scale=scale))
            self.resolutions.append(spec.resolution // (spec.down_rate or 1))

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.patch_size > 1:   # (B, C, H, W) -> (B, C p^2, H/p, W/p)
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.in_conv(x)                                  # (B, width, H, W)
        activations = {self.first: h}
        for block, resolution in zip(self.blocks, self.resolutions):
            h = run_block(block, self.checkpointing, h)
            h = match_channels(h, self.widths[resolution])
            activations[resolution] = h
        return activations


# The codec's choice of a latent group: (prior mean, prior log std, posterior mean or None when
# decoding) -> the latent, each (B, zdim, r, r).
LatentRule = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class GroupOutput(NamedTuple):
    """What a decoder block returns for its latent group z_i, each (B, zdim, r, r) but the
    stream: the new stream (B, width, r, r), the latent it used, the elementwise KL and the
    posterior (mean, log std) when it inferred z_i from an encoder activation (else None), and
    its prior p(z_i | z_<i) as (mean, log std)."""

    stream: torch.Tensor
    latent: torch.Tensor
    kl: torch.Tensor | None
    posterior: tuple[torch.Tensor, torch.Tensor] | None
    prior: tuple[torch.Tensor, torch.Tensor]


class DecoderBlock(nn.Module):
    """One top-down step: prior and posterior of latent group z_i, then a residual block.

    The posterior block reads [stream, encoder activation] (channel concatenation, as VDVAE)
    and the prior block reads the stream. Both begin with GELU and a 1x1 convolution, so the
    concatenation is never built: the stream's GELU is computed once and one convolution makes
    the prior's first layer and the stream's part of the posterior's, while the encoder
    activation's part (`encoder_term`) comes from the decoder, which computes it for every
    block of a resolution in one convolution (`Decoder.encoder_terms`). The parameters and
    the function are VDVAE's; only the order of the sums differs (float rounding).
    """

    def __init__(self, spec: BlockSpec, width: int, zdim: int, bottleneck_multiple: float,
                 n_blocks: int, precision_weighted: bool, quantized: bool = False,
                 straight_through: bool = False, fully_convolutional: bool = False):
        super().__init__()
        self.quantized = quantized
        self.straight_through = straight_through
        self.resolution = spec.resolution
        self.mixin = spec.mixin
        self.width = width
        self.zdim = zdim
        self.precision_weighted = precision_weighted
        self.middle = middle = int(width * bottleneck_multiple)
        spatial = fully_convolutional or spec.resolution > 2
        scale = residual_scale(n_blocks)
        # q(z_i | stream, encoder activation): sees the stream and the bottom-up features.
        self.posterior = Block(2 * width, middle, 2 * zdim, spatial=spatial)
        # p(z_i | stream) plus a feature update of the stream; zero-initialised so every prior
        # starts as N(0, I) and the stream starts unchanged.
        self.prior = Block(width, middle, 2 * zdim + width, spatial=spatial, zero_last=True)
        self.latent_proj = conv(zdim, width, 1)
        with torch.no_grad():
            self.latent_proj.weight.mul_(scale)
        self.resnet = Block(width, middle, width, spatial=spatial, residual=True,
                            output_scale=scale)

    def forward(self, stream: torch.Tensor, encoder_term: torch.Tensor | None = None,
                given_latent: torch.Tensor | None = None, temperature: float = 1.0,
                noise: NoiseShard | None = None, latent_rule: LatentRule | None = None
                ) -> GroupOutput:
        """One step of the top-down pass (see `GroupOutput`). `encoder_term` (B, middle, r, r)
        is the encoder activation's contribution to the posterior's first convolution
        (`Decoder.encoder_terms`); without it z_i is not inferred. `noise` says which slice of
        the global batch's noise to draw under torchrun. A `latent_rule` (the codec's) picks
        the latent from the prior and, given an encoder term, the posterior mean."""
        activated = gelu(stream)
        first_prior = self.prior.convs[0]
        posterior_first = None
        if latent_rule is not None:
            # The codec computes the prior alike when encoding and decoding, so both sides
            # round its scales from the same arithmetic.
            prior_first = first_prior(activated)
            if encoder_term is not None:
                first_posterior = self.posterior.convs[0]
                posterior_first = F.conv2d(activated, first_posterior.weight[:, :self.width],
                                           first_posterior.bias) + encoder_term
        elif encoder_term is None:
            prior_first = first_prior(activated)
        else:   # both blocks' first layers on the stream in one convolution
            first_posterior = self.posterior.convs[0]
            weight = torch.cat([first_prior.weight, first_posterior.weight[:, :self.width]])
            bias = torch.cat([first_prior.bias, first_posterior.bias])
            prior_first, posterior_first = F.conv2d(activated, weight, bias).split(
                [self.middle, self.middle], dim=1)
            posterior_first = posterior_first + encoder_term
        prior_mean, prior_logstd, stream_update = self.prior.finish(stream, prior_first).split(
            [self.zdim, self.zdim, self.width], dim=1)
        kl = posterior = None
        if latent_rule is not None:
            posterior_mean = None
            if posterior_first is not None:
                posterior_mean, _ = self._posterior(posterior_first, prior_mean, prior_logstd)
            latent = latent_rule(prior_mean, prior_logstd, posterior_mean)
        elif posterior_first is not None:
            posterior_mean, posterior_logstd = self._posterior(posterior_first, prior_mean,
                                                               prior_logstd)
            if self.quantized:
                # Training: the posterior is U(mean - 1/2, mean + 1/2) (zero entropy), so the
                # KL is the code length of the noisy latent under the box-convolved prior;
                # evaluation codes the rounded latent and the KL is its exact code length.
                latent = (posterior_mean + uniform_noise_like(posterior_mean, noise)
                          if self.training else quantized_latent(posterior_mean, prior_mean))
                kl = box_gaussian_nll(latent.float(), prior_mean.float(), prior_logstd.float())
                if self.training and self.straight_through:
                    # Decode what coding decodes: the rounded latent, with rounding's
                    # gradient passed straight through to the posterior mean (the rate
                    # above stays the noisy latent's, CompressAI's "ste" mode).
                    rounded = quantized_latent(posterior_mean, prior_mean)
                    latent = posterior_mean + (rounded - posterior_mean).detach()
            else:
                # One autograd node; the KL in float32 even under reduced-precision autocast.
                latent, kl = gaussian_sample_with_kl(posterior_mean, posterior_logstd,
                                                     prior_mean, prior_logstd, shard=noise)
            posterior = (posterior_mean, posterior_logstd)
        elif given_latent is not None:
            latent = given_latent
        elif self.quantized:   # a symbol drawn from the discretised prior
            latent = prior_mean + torch.round(
                temperature * torch.exp(prior_logstd) * standard_normal_like(prior_mean, noise))
        else:
            latent = gaussian_sample(prior_mean, prior_logstd, temperature, shard=noise)
        stream = stream + stream_update + self.latent_proj(latent)
        return GroupOutput(self.resnet(stream), latent, kl, posterior, (prior_mean, prior_logstd))

    def _posterior(self, first_layer: torch.Tensor, prior_mean: torch.Tensor,
                   prior_logstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_i | stream, encoder activation) as (mean, log std), given the output of the
        posterior block's first convolution."""
        mean, logstd = self.posterior.finish(None, first_layer).chunk(2, 1)
        if self.precision_weighted:
            mean, logstd = precision_weighted_merge(mean, logstd, prior_mean, prior_logstd)
        return mean, logstd


class Decoder(nn.Module):
    """Top-down pass over the decoder block string; see `forward` for the three ways to run it."""

    def __init__(self, specs: list[BlockSpec], widths: dict[int, int], zdim: int,
                 bottleneck_multiple: float, image_size: int, precision_weighted: bool,
                 checkpointing: bool = False, quantized: bool = False,
                 straight_through: bool = False, fully_convolutional: bool = False):
        super().__init__()
        self.image_size = image_size   # in the block strings' units (pixels / patch size)
        self.checkpointing = checkpointing
        self.widths = widths
        self.quantized = quantized
        self.fully_convolutional = fully_convolutional
        self.blocks = nn.ModuleList([
            DecoderBlock(spec, widths[spec.resolution], zdim, bottleneck_multiple, len(specs),
                         precision_weighted, quantized, straight_through, fully_convolutional)
            for spec in specs])
        resolutions = sorted({spec.resolution for spec in specs})
        self.blocks_by_resolution = {r: [i for i, spec in enumerate(specs) if spec.resolution == r]
                                     for r in resolutions}
        # A learned starting stream per resolution (zero-initialised), as in VDVAE; a fully
        # convolutional decoder learns one vector per resolution, broadcast to the image's
        # size (QRes-VAE's learned bias).
        self.stream_init = nn.ParameterDict({
            str(r): nn.Parameter(torch.zeros(1, widths[r], *((1, 1) if fully_convolutional
                                                             else (r, r))))
            for r in resolutions})
        # A fully convolutional decoder upsamples a coarser stream by a learned 1x1 convolution
        # to factor^2 times the channels and a pixel shuffle, starting as nearest-neighbour.
        self.upsamplers = nn.ModuleDict({
            str(index): _upsampler(widths[spec.mixin], widths[spec.resolution],
                                   spec.resolution // spec.mixin)
            for index, spec in enumerate(specs) if fully_convolutional and spec.mixin})
        self.out_gain = nn.Parameter(torch.ones(1, widths[image_size], 1, 1))
        self.out_bias = nn.Parameter(torch.zeros(1, widths[image_size], 1, 1))

    @property
    def group_resolutions(self) -> list[int]:
        """Spatial resolution of each latent group, top (first) to bottom (last)."""
        return [block.resolution for block in self.blocks]

    # Four ways to run the decoder top-down, one method each (openai/vdvae names its
    # `forward_uncond` and `forward_manual_latents`); all return {"features": (B, width, H, W),
    # "latents": [z_i], "kl": [(B, zdim, r, r)], "posteriors": [(mean, log std)], "priors":
    # [(mean, log std)]}: the groups' inferred posteriors (one per KL) and every group's prior.
    # `condition` (stage two's U-Net) adds {resolution: activation} to the stream wherever a
    # resolution starts; `noise` selects this rank's slice of the global batch's noise.
    def forward(self, encoder_activations: dict[int, torch.Tensor],
                condition: dict[int, torch.Tensor] | None = None,
                noise: NoiseShard | None = None) -> dict:
        """Inference: every z_i ~ q(z_i | z_<i, x), and the KL of each group."""
        batch = next(iter(encoder_activations.values())).shape[0]
        grid = tuple(encoder_activations[self.image_size].shape[-2:])
        return self._top_down(batch, self.encoder_terms(encoder_activations), [], 1.0,
                              condition, noise, None, grid)

    def sample(self, n: int, temperature: float = 1.0,
               condition: dict[int, torch.Tensor] | None = None,
               noise: NoiseShard | None = None, grid: tuple[int, int] | None = None) -> dict:
        """An unconditional draw of n images' latents from the prior at `temperature` (its
        mean at 0); `grid` is the finest resolution's (height, width) (a fully convolutional
        decoder's image size over the patch size; else the training size)."""
        return self._top_down(n, None, [], temperature, condition, noise, None, grid)

    def decode_latents(self, latents: list[torch.Tensor], temperature: float = 1.0,
                       condition: dict[int, torch.Tensor] | None = None,
                       noise: NoiseShard | None = None, n: int | None = None) -> dict:
        """The first K groups as given (`latents`, top first), the rest from the prior at
        `temperature` (its mean at 0). `n` is the batch when no group is given."""
        batch = latents[0].shape[0] if latents else n
        if batch is None:
            raise ValueError("decode_latents needs at least one latent group or a count n.")
        grid = None
        if latents:
            stride = self.image_size // self.blocks[0].resolution
            grid = (latents[0].shape[-2] * stride, latents[0].shape[-1] * stride)
        return self._top_down(batch, None, latents, temperature, condition, noise, None, grid)

    def run_with_rule(self, latent_rule: Callable[[int], LatentRule],
                      encoder_activations: dict[int, torch.Tensor] | None = None,
                      n: int | None = None, grid: tuple[int, int] | None = None) -> dict:
        """The codec's pass: `latent_rule(i)` returns the rule that picks group i's latent
        from its prior (and, encoding, its posterior mean): with `encoder_activations` when
        encoding, with a count `n` (and the finest `grid`, see `sample`) when decoding."""
        if encoder_activations is not None:
            batch = next(iter(encoder_activations.values())).shape[0]
            terms = self.encoder_terms(encoder_activations)
            grid = tuple(encoder_activations[self.image_size].shape[-2:])
        else:
            batch, terms = n, None
        return self._top_down(batch, terms, [], 1.0, None, None, latent_rule, grid)

    def _top_down(self, batch: int, terms: list[torch.Tensor] | None,
                  given: list[torch.Tensor], temperature: float,
                  condition: dict[int, torch.Tensor] | None, noise: NoiseShard | None,
                  latent_rule: Callable[[int], LatentRule] | None,
                  grid: tuple[int, int] | None = None) -> dict:
        streams: dict[int, torch.Tensor] = {}
        terms = terms if terms is not None else [None] * len(self.blocks)
        height, width = grid or (self.image_size, self.image_size)
        all_latents, kls, posteriors, priors = [], [], [], []
        for index, block in enumerate(self.blocks):
            r = block.resolution
            if r not in streams:
                stride = self.image_size // r
                stream = self.stream_init[str(r)].expand(batch, -1, height // stride,
                                                         width // stride)
                if condition is not None:
                    stream = stream + condition[r]
                streams[r] = stream
            stream = streams[r]
            if block.mixin is not None:
                upsampler = self.upsamplers[str(index)] if self.fully_convolutional else None
                if upsampler is not None:
                    upsampled = F.pixel_shuffle(upsampler(streams[block.mixin]),
                                                r // block.mixin)
                else:
                    upsampled = match_channels(F.interpolate(
                        streams[block.mixin], scale_factor=r // block.mixin, mode="nearest"),
                        block.width)
                stream = stream + upsampled
            given_latent = given[index] if index < len(given) else None
            rule = latent_rule(index) if latent_rule is not None else None
            group = run_block(block, self.checkpointing, stream, terms[index], given_latent,
                              temperature, noise, rule)
            streams[r] = group.stream
            all_latents.append(group.latent)
            priors.append(group.prior)
            if group.kl is not None:
                kls.append(group.kl)
                posteriors.append(group.posterior)
        features = streams[self.image_size] * self.out_gain + self.out_bias
        return {"features": features, "latents": all_latents, "kl": kls,
                "posteriors": posteriors, "priors": priors}

    def encoder_terms(self, encoder_activations: dict[int, torch.Tensor]
                      ) -> list[torch.Tensor]:
        """Each block's encoder term: W_a GELU(a_r), the part of its posterior's first 1x1
        convolution (weight [W_stream | W_a] on GELU([stream, a_r])) that reads the encoder
        activation a_r of its resolution. a_r is the same for every block of that resolution,
        so its GELU and the convolutions of all those blocks are done once, as one
        convolution with their W_a stacked: (B, middle, r, r) per block, top to bottom."""
        terms: list[torch.Tensor] = [None] * len(self.blocks)
        for resolution, indices in self.blocks_by_resolution.items():
            blocks = [self.blocks[i] for i in indices]
            weight = torch.cat([block.posterior.convs[0].weight[:, block.width:]
                                for block in blocks])
            stacked = F.conv2d(gelu(encoder_activations[resolution]), weight)
            for index, term in zip(indices, stacked.split([b.middle for b in blocks], dim=1)):
                terms[index] = term
        return terms


class VDVAE(nn.Module):
    """Encoder + decoder + head. `forward(x)` is the training pass; `decode` and `sample`
    generate. All images are (B, C, H, W) on the [-1, 1] scale.

    `head` is "linear" (stage one's 1x1 mean head) or "dmol" (a discretized mixture of
    logistics with `config.n_mixtures` components).
    With `conditional=True` this is stage two's conditional VDVAE (paper 003 A.4, paper 002
    A.2): the posterior encoder sees [x, x_tilde] (channel concatenation), and a second encoder
    of the same shape sees x_tilde alone and hands its activation at every resolution to the
    decoder (a U-Net), so the prior p(z | x_tilde) and the decoder are both conditioned on it.
    """

    def __init__(self, config: Config, head: str = "linear", conditional: bool = False):
        super().__init__()
        encoder_specs = parse_block_string(config.enc_blocks)
        decoder_specs = parse_block_string(config.dec_blocks)
        patch = config.patch_size
        if config.image_size % patch:
            raise UserError(f"image_size {config.image_size} is not a multiple of patch_size "
                            f"{patch}; pick a patch size that divides it.")
        if patch > 1 and head != "linear":
            raise UserError(f"patch_size {patch} needs the linear head (stage one); this model's "
                            f"head is {head}, so leave patch_size at 1.")
        size = config.image_size // patch   # the block strings count patches
        where = f"the image size {size}" + (f" (in {patch}x{patch} patches)" if patch > 1 else "")
        if encoder_specs[0].resolution != size or decoder_specs[-1].resolution != size:
            raise UserError(
                f"Block strings must start (enc_blocks) and end (dec_blocks) at {where}; got "
                f"enc_blocks='{config.enc_blocks}' and dec_blocks='{config.dec_blocks}'.")
        resolutions = {s.resolution for s in encoder_specs + decoder_specs}
        widths = parse_widths(config.width, config.custom_width, resolutions | {1})
        missing = {s.resolution for s in decoder_specs} - _encoder_resolutions(encoder_specs)
        if missing:
            raise UserError(f"dec_blocks uses resolutions {sorted(missing)} that enc_blocks never "
                            "produces; make the two block strings cover the same resolutions.")
        channels = config.image_channels
        self.image_size = config.image_size
        self.image_channels = channels
        self.patch_size = patch
        self.fully_convolutional = convolutional = config.fully_convolutional
        self.conditional = conditional
        memory_saving = config.checkpoint_activations
        self.encoder = Encoder(2 * channels if conditional else channels, encoder_specs, widths,
                               config.bottleneck_multiple, memory_saving, patch, convolutional)
        self.condition_encoder = (Encoder(channels, encoder_specs, widths,
                                          config.bottleneck_multiple, memory_saving, patch,
                                          convolutional)
                                  if conditional else None)
        self.decoder = Decoder(decoder_specs, widths, config.zdim, config.bottleneck_multiple, size,
                               config.precision_weighted_merge, memory_saving,
                               quantized=config.latents == "quantized",
                               straight_through=config.quantized_training == "ste",
                               fully_convolutional=convolutional)
        self.head = build_head(head, widths[size], channels, config.n_mixtures, patch)

    @property
    def n_groups(self) -> int:
        return len(self.decoder.blocks)

    @property
    def dims_per_image(self) -> int:
        return self.image_channels * self.image_size ** 2

    def _condition(self, condition_image: torch.Tensor | None) -> dict[int, torch.Tensor] | None:
        if self.conditional != (condition_image is not None):
            raise ValueError("A conditional VDVAE needs condition_image; a plain one takes none.")
        return None if condition_image is None else self.condition_encoder(condition_image)

    def forward(self, x: torch.Tensor, condition_image: torch.Tensor | None = None,
                noise: NoiseShard | None = None) -> dict:
        """Infer z ~ q(z | x [, x_tilde]) top-down and decode it.

        Returns {"output": head parameters, "rate": (B,) KL in nats per dimension,
        "kl": [(B,) nats per group], "latents": [z_i], "posteriors": [(mean, log std)],
        "priors": [(mean, log std)]}: every group's posterior q(z_i | z_<i, x) and prior
        p(z_i | z_<i) at the drawn latents' parents, so evaluation can score the latents
        (`latent_log_ratio`) without reaching into the blocks.
        """
        condition = self._condition(condition_image)
        encoder_input = x if condition_image is None else torch.cat([x, condition_image], dim=1)
        decoded = self.decoder(self.encoder(encoder_input), condition=condition, noise=noise)
        kl_per_group = [kl.flatten(1).sum(1) for kl in decoded["kl"]]
        rate = torch.stack(kl_per_group, dim=1).sum(1) / x[0].numel()
        return {"output": self.head(decoded["features"]), "rate": rate, "kl": kl_per_group,
                "latents": decoded["latents"], "posteriors": decoded["posteriors"],
                "priors": decoded["priors"]}

    def decode(self, latents: list[torch.Tensor] | None = None, n: int | None = None,
               temperature: float = 1.0, condition_image: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Head parameters from the first K given latent groups; the rest from the prior
        (its mean at temperature 0, else a sample at `temperature`)."""
        if n is None and condition_image is not None:
            n = condition_image.shape[0]
        condition = self._condition(condition_image)
        if latents:
            decoded = self.decoder.decode_latents(latents, temperature, condition)
        else:
            decoded = self.decoder.sample(n, temperature, condition)
        return self.head(decoded["features"])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Mean images of n draws z ~ p(z): (n, C, H, W) in [-1, 1] (not clamped)."""
        return self.head.mean(self.decode(n=n, temperature=temperature))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, condition_image: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The head's mean given z ~ q(z | x [, x_tilde])."""
        return self.head.mean(self.forward(x, condition_image)["output"])


def latent_log_ratio(out: dict) -> torch.Tensor:
    """log q(z | x) - log p(z) in nats per image, (B,), at the latents a forward pass drew:
    summed over every group and dimension from the posteriors and priors it returns (a
    one-sample estimate of its KL, which the importance-weighted bound needs)."""
    total = 0.0
    for latent, (q_mean, q_logstd), (p_mean, p_logstd) in zip(
            out["latents"], out["posteriors"], out["priors"]):
        ratio = gaussian_log_ratio(latent.float(), q_mean.float(), q_logstd.float(),
                                   p_mean.float(), p_logstd.float())
        total = total + ratio.flatten(1).sum(1)
    return total


def run_block(block: nn.Module, checkpointing: bool, *inputs):
    """block(*inputs); with `checkpointing` (and gradients on) its activations are not kept but
    recomputed in backward, trading compute for memory. The RNG state is restored for the
    recomputation, so a latent sampled inside the block is drawn identically both times."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def build_head(kind: str, width: int, image_channels: int, n_mixtures: int,
               patch_size: int = 1) -> nn.Module:
    if kind == "linear":
        return LinearHead(width, image_channels, patch_size)
    if kind == "dmol":
        from progvae.models.dmol import DmolHead
        return DmolHead(width, image_channels, n_mixtures)
    raise ValueError(f"unknown head '{kind}'")


def _encoder_resolutions(specs: list[BlockSpec]) -> set[int]:
    resolutions = set()
    for spec in specs:
        resolutions.add(spec.resolution)
        if spec.down_rate:
            resolutions.add(spec.resolution // spec.down_rate)
    return resolutions


def _upsampler(in_width: int, out_width: int, factor: int) -> nn.Conv2d:
    """A 1x1 convolution to out_width * factor^2 channels for a pixel shuffle by `factor`,
    initialised so that the pair is nearest-neighbour upsampling (with `match_channels`)."""
    layer = conv(in_width, out_width * factor ** 2, 1)
    with torch.no_grad():
        layer.weight.zero_()
        for channel in range(min(in_width, out_width)):
            layer.weight[channel * factor ** 2:(channel + 1) * factor ** 2, channel] = 1.0
    return layer
