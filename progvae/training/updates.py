"""The update rule's parts that are not Adam itself: the warm-up schedule, skipping of bad
updates (and the warning when most are skipped) and the parameter EMA."""

from __future__ import annotations

import collections
import math

import torch
from torch import nn

from progvae.config import Config

SKIP_WINDOW = 100        # recent updates inspected by the stall warning
SKIP_WARN_FRACTION = 0.5


def warmup_learning_rate(config: Config, step: int) -> float:
    """The learning rate of update `step` (0-based): linear warm-up over warmup_steps."""
    if config.warmup_steps > 0:
        return config.lr * min(1.0, (step + 1) / config.warmup_steps)
    return config.lr


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * parameters."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - rate)


class SkipRecord:
    """Decides whether an update is skipped (a non-finite loss or gradient norm, or a norm over
    skip_threshold), counts the skips and says when training is stalling. Its inputs are rank
    means and the synchronised gradient norm, so every rank decides the same."""

    def __init__(self, skip_threshold: float):
        self.skip_threshold = skip_threshold
        self.skipped = 0
        self.recent: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)
        self._warned_at: int | None = None

    def decide(self, loss: float, grad_norm: float) -> bool:
        """Whether to skip this update; recorded."""
        skip = (not math.isfinite(loss) or not math.isfinite(grad_norm)
                or (self.skip_threshold > 0 and grad_norm > self.skip_threshold))
        self.skipped += skip
        self.recent.append(skip)
        return skip

    def stall_warning(self, step: int) -> str | None:
        """A warning when over half of the last SKIP_WINDOW updates were skipped, at most once
        per SKIP_WINDOW steps; else None."""
        count = sum(self.recent)
        if (len(self.recent) < SKIP_WINDOW or count <= SKIP_WARN_FRACTION * SKIP_WINDOW
                or (self._warned_at is not None and step - self._warned_at < SKIP_WINDOW)):
            return None
        self._warned_at = step
        return (f"WARNING: {count} of the last {SKIP_WINDOW} updates were skipped (grad norm "
                f"over skip_threshold={self.skip_threshold} or a non-finite loss); training is "
                "stalling. Lower lr, raise skip_threshold, or check the data.")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "recent_skips": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]
        self.recent.clear()
        self.recent.extend(state["recent_skips"])
