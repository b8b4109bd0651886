"""LPIPS (Zhang et al. 2018) between held-out images and their reconstructions, through the
`lpips` package with its AlexNet trunk (paper 003 §6, Fig. 4).

`lpips` ships its calibrated linear layers but takes the AlexNet trunk from torchvision's
ImageNet download. Here the trunk is built untrained and then filled from a torchvision AlexNet
state dict: `--lpips_weights=PATH`, else torch's hub cache, else a download; offline without
the file the metric stops with one sentence (`evaluation.weights`).

AlexNet needs inputs of at least ~32 pixels a side, so smaller images (the 16x16 digits) are
upsampled bilinearly to `MIN_SIDE` first; grayscale is replicated to 3 channels. Inputs are on
progvae's [-1, 1] scale, which is the scale `lpips` expects.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from progvae.core.errors import UserError
from progvae.evaluation.metrics.weights import alexnet_weights, load_state_dict_file

MIN_SIDE = 64


class LpipsScorer:
    """Callable: (x, y) both (B, C, H, W) in [-1, 1] -> (B,) LPIPS distances (AlexNet, v0.1)."""

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu"):
        import lpips

        path = alexnet_weights(weights)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")   # lpips calls torchvision's deprecated `pretrained`
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        state = load_state_dict_file(path, "--lpips_weights",
                                     "torchvision's AlexNet state dict alexnet-owt-7be5be79.pth")
        try:
            # lpips splits AlexNet's `features` into five slices that keep the layer indices,
            # so torchvision's "features.{i}.weight" is layer i of some slice.
            for index in range(1, model.net.N_slices + 1):
                for name, layer in getattr(model.net, f"slice{index}").named_children():
                    layer.load_state_dict({key: state[f"features.{name}.{key}"]
                                           for key in layer.state_dict()})
        except Exception as error:
            raise UserError(f"'{path}' could not be loaded as a torchvision AlexNet state dict "
                            f"({type(error).__name__}); pass the file alexnet-owt-7be5be79.pth "
                            "as --lpips_weights.") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = (prepare(t.to(self.device)) for t in (x, y))
        return self.model(x, y).flatten()


def prepare(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, H', W') with H', W' >= MIN_SIDE."""
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    side = min(x.shape[-2:])
    if side < MIN_SIDE:
        scale = MIN_SIDE / side
        x = F.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)),
                          mode="bilinear", align_corners=False)
    return x
