"""VDVAE building blocks (Child 2020): block strings, bottleneck residual blocks, widths.

Stage one, stage two and the plain VDVAE are all assembled from the pieces in this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from progvae.core.errors import UserError
from progvae.models.activations import gelu


@dataclass(frozen=True)
class BlockSpec:
    """One entry of a block string: a block working at `resolution`.

    `down_rate` (encoder, "32d2") average-pools the block's output by that factor;
    `mixin` (decoder, "4m1") adds the upsampled stream of resolution `mixin` before the block.
    """

    resolution: int
    down_rate: int | None = None
    mixin: int | None = None


def parse_block_string(text: str) -> list[BlockSpec]:
    """Parse a VDVAE block string: "32x11" = 11 blocks at 32x32, "32d2" = a block at 32x32 that
    downsamples by 2, "4m1" = a block at 4x4 mixing in the 1x1 stream, "8" = one block at 8x8."""
    specs: list[BlockSpec] = []
    for part in text.replace(" ", "").split(","):
        try:
            if "x" in part:
                resolution, count = (int(v) for v in part.split("x"))
                specs += [BlockSpec(resolution)] * count
            elif "d" in part:
                resolution, rate = (int(v) for v in part.split("d"))
                specs.append(BlockSpec(resolution, down_rate=rate))
            elif "m" in part:
                resolution, mixin = (int(v) for v in part.split("m"))
                specs.append(BlockSpec(resolution, mixin=mixin))
            else:
                specs.append(BlockSpec(int(part)))
        except ValueError:
            raise UserError(
                f"Cannot read block string entry '{part}' in '{text}'; entries look like "
                "'32x11' (11 blocks at 32x32), '32d2' (downsample by 2) or '4m1' (mix in 1x1)."
            ) from None
    if not specs:
        raise UserError(f"Block string '{text}' has no blocks.")
    return specs


def scale_block_string(text: str, factor: int) -> str:
    """The block string of the same network on images `factor` times larger: every resolution
    (and mix-in) times `factor`, block counts and downsampling rates as they are."""
    parse_block_string(text)   # a clear error for an unreadable string
    parts = []
    for part in text.replace(" ", "").split(","):
        kind = next((k for k in "xdm" if k in part), "")
        head, _, tail = part.partition(kind) if kind else (part, "", "")
        tail = str(int(tail) * factor) if kind == "m" else tail
        parts.append(f"{int(head) * factor}{kind}{tail}")
    return ",".join(parts)


def parse_widths(width: int, custom_width: str, resolutions: set[int]) -> dict[int, int]:
    """Channels of the residual stream per resolution: `width` unless "res:width" overrides it."""
    widths = {resolution: width for resolution in resolutions}
    for item in filter(None, custom_width.replace(" ", "").split(",")):
        try:
            resolution, value = (int(v) for v in item.split(":"))
        except ValueError:
            raise UserError(f"Cannot read custom_width entry '{item}'; use e.g. '32:64,16:128'.")
        widths[resolution] = value
    return widths


def match_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad or truncate the channel axis so streams of different widths can be added."""
    have = t.shape[1]
    if have == channels:
        return t
    if have > channels:
        return t[:, :channels]
    return F.pad(t, (0, 0, 0, 0, 0, channels - have))


def conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A same-padded convolution whose bias starts at zero, as every convolution of VDVAE does
    (openai/vdvae `get_conv`); the weights keep PyTorch's default initialisation."""
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    nn.init.zeros_(layer.bias)
    return layer


class Block(nn.Module):
    """Bottleneck residual block: GELU-conv 1x1, 3x3, 3x3, 1x1 (3x3 become 1x1 at resolution <= 2).

    `output_scale` multiplies the last conv's initial weights (VDVAE uses sqrt(1 / n_blocks) so the
    residual stream's variance does not grow with depth); `zero_last` zero-initialises it (the prior
    of each decoder block starts as N(0, 1)).
    """

    def __init__(self, in_width: int, middle_width: int, out_width: int, *, spatial: bool = True,
                 residual: bool = False, down_rate: int | None = None,
                 output_scale: float = 1.0, zero_last: bool = False):
        super().__init__()
        kernel = 3 if spatial else 1
        self.residual = residual
        self.down_rate = down_rate
        self.convs = nn.ModuleList([
            conv(in_width, middle_width, 1),
            conv(middle_width, middle_width, kernel),
            conv(middle_width, middle_width, kernel),
            conv(middle_width, out_width, 1),
        ])
        last = self.convs[-1]
        with torch.no_grad():
            if zero_last:
                last.weight.zero_()
                last.bias.zero_()
            else:
                last.weight.mul_(output_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H/d, W/d)
        return self.finish(x, self.convs[0](gelu(x)))

    def finish(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        """The block after its first convolution, given that convolution's output h (a caller
        may compute it together with other blocks' first convolutions)."""
        for layer in self.convs[1:]:
            h = layer(gelu(h))
        if self.residual:
            h = x + h
        if self.down_rate:
            h = F.avg_pool2d(h, kernel_size=self.down_rate, stride=self.down_rate)
        return h


def residual_scale(n_blocks: int) -> float:
    return math.sqrt(1.0 / n_blocks)
