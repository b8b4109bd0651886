"""What a stage hands the trainer: the objective interface and the module that runs it.

A stage changes this file only when what an objective must provide changes; how updates are
made, logged or checkpointed lives in the trainer and its parts.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from progvae.models.distributions import NoiseShard


class Objective(Protocol):
    """The training loss of a kind of run.

    `__call__(model, images, noise)` returns a dict of scalar tensors: "loss" (to minimise) and the
    batch means that are logged (e.g. "rate", "distortion"). `after_update(metrics, applied)`
    sees every update's detached metrics (0-d tensors on the device, averaged over ranks) and
    the trainer's on-device decision whether the update was applied (a 0-d bool tensor): a
    controller steps its multiplier there, on the device, where `applied`.
    `log_values()` adds values such as the multiplier to each log line. An objective holding
    tensors the loss reads may also define `to(device)`; the trainer calls it with the
    training device.
    """

    def __call__(self, model: nn.Module, images: torch.Tensor,
                 noise: NoiseShard | None = None) -> dict[str, torch.Tensor]: ...
    def after_update(self, metrics: dict[str, torch.Tensor], applied: torch.Tensor) -> None: ...
    def log_values(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class FixedObjective:
    """Base of objectives with no state of their own (no multiplier): nothing to step after an
    update, log or checkpoint. Subclasses define only `__call__`."""

    def after_update(self, metrics: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossModule(nn.Module):
    """The model and its objective as one module, so DistributedDataParallel sees the whole
    loss computation in its forward and synchronises gradients on backward. The objective is a
    plain attribute: anything it holds (a frozen stage one) is not trained or synchronised."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images: torch.Tensor, noise: NoiseShard | None = None
                ) -> dict[str, torch.Tensor]:
        return self.objective(self.model, images, noise)
