"""Output heads: map the decoder's last activations to a distribution over images.

Every head offers the same four calls, so a model does not care which one it carries:
`forward(features) -> params`, `mean(params)`, `sample(params, temperature)` and
`reconstruction_loss(params, x) -> (B,)` per dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from progvae.models.blocks import conv


class LinearHead(nn.Module):
    """A 1x1 convolution predicting the image mean (paper 003 A.3, stage one).

    Its reconstruction loss is the distortion D: the mean squared error per dimension on the
    [-1, 1] pixel scale.
    """

    def __init__(self, width: int, image_channels: int, patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        # With patches, each feature vector predicts a p x p patch (still linear in it).
        self.proj = conv(width, image_channels * patch_size ** 2, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, width, H, W) -> (B, C, H, W)
        if self.patch_size > 1:
            return F.pixel_shuffle(self.proj(features), self.patch_size)
        return self.proj(features)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def sample(self, params: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """A mean-prediction head has no observation noise: its sample is its mean."""
        return params

    def reconstruction_loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mse_per_image(params, x)


def mse_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per dimension of each image: (B, C, H, W) x2 -> (B,)."""
    return (x_hat.float() - x.float()).pow(2).flatten(1).mean(1)
