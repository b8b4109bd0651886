"""Controllers own the multiplier of a constrained rate-distortion objective, and nothing else.

The interface every controller keeps:

- `loss(rate, distortion)`: the scalar to minimise; the multiplier enters as a constant (no
  gradient flows into it from the model's loss).
- `update(rate, distortion)`: one multiplier step from the (detached, batch-mean) rate and
  distortion of the update the trainer just applied.
- `multiplier`: the current value, for logs and summaries.
- `at_bound()`: whether the multiplier sits at one of its limits.
- `state_dict()` / `load_state_dict()`: everything needed to resume exactly.

Units: rate in nats per dimension, distortion as MSE per dimension on the [-1, 1] scale.
"""

from __future__ import annotations

import copy

import torch

from progvae.config import Config
from progvae.errors import UserError


class LagrangianController:
    """Projected Lagrangian of paper 003 A.5 (= paper 002 B.2), distortion-targeted training.

    Model objective (eq. 10): minimise (1 - lam) * R + lam * D, lam held constant.
    Multiplier objective (eq. 11): maximise lam * (D_ema - target), by Adam with betas
    (0, 0.999), where D_ema is an exponential moving average (rate `distortion_ema`, 0.99 in the
    paper) of the batch distortion, detached from the model. After each step lam is projected
    onto [multiplier_min, multiplier_max] = [1e-4, 0.9999]; it starts at 0.9999, which weights
    rate by only 1e-4 at first and so mimics KL annealing.

    D_ema > target raises lam (more weight on distortion); D_ema < target lowers it.
    """

    name = "lagrangian"

    def __init__(self, target: float, init: float = 0.9999, minimum: float = 1e-4,
                 maximum: float = 0.9999, lr: float = 2e-4, beta2: float = 0.999,
                 ema: float = 0.99):
        self.target = target
        self.minimum, self.maximum = minimum, maximum
        self.ema = ema
        self.lam = torch.tensor(float(init), dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.lam], lr=lr, betas=(0.0, beta2))
        self.tracked: float | None = None   # EMA of the constrained quantity

    @property
    def multiplier(self) -> float:
        return float(self.lam.detach())

    def constrained_value(self, rate: float, distortion: float) -> float:
        """The quantity held to the target: distortion here; rate for rate targeting."""
        return distortion

    def loss(self, rate: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
        lam = self.multiplier
        return (1.0 - lam) * rate + lam * distortion

    def update(self, rate: float, distortion: float) -> None:
        value = self.constrained_value(float(rate), float(distortion))
        if self.tracked is None:
            self.tracked = value
        else:
            self.tracked = self.ema * self.tracked + (1.0 - self.ema) * value
        self.optimizer.zero_grad(set_to_none=True)
        # Maximise lam * (tracked - target) == minimise its negative.
        (-(self.lam * (self.tracked - self.target))).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.lam.clamp_(self.minimum, self.maximum)

    def at_bound(self) -> bool:
        lam = self.multiplier
        return lam <= self.minimum * (1 + 1e-6) or lam >= self.maximum * (1 - 1e-9)

    def state_dict(self) -> dict:
        return {"name": self.name, "lam": self.multiplier, "tracked": self.tracked,
                # a copy: Adam's state tensors are updated in place by later steps
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lam.fill_(state["lam"])
        self.tracked = state["tracked"]
        self.optimizer.load_state_dict(state["optimizer"])


CONTROLLERS = {"lagrangian": LagrangianController}


def build_controller(config: Config) -> LagrangianController:
    """The controller named by `config.controller`, targeting `config.distortion_target`."""
    if config.controller not in CONTROLLERS:
        raise UserError(f"Unknown controller '{config.controller}'; choose one of "
                        f"{', '.join(sorted(CONTROLLERS))}.")
    if not config.distortion_target > 0:
        raise UserError(
            f"The distortion target must be a positive MSE per dimension on the [-1, 1] scale "
            f"(e.g. --distortion_target=0.01); got {config.distortion_target}.")
    return LagrangianController(
        config.distortion_target, init=config.multiplier_init, minimum=config.multiplier_min,
        maximum=config.multiplier_max, lr=config.multiplier_lr, beta2=config.multiplier_beta2,
        ema=config.distortion_ema)
