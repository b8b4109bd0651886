"""The update rule's parts that are not Adam itself: the warm-up schedule, skipping of bad
updates (and the warning when most are skipped) and the parameter EMA."""

from __future__ import annotations

import collections

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
def update_ema(ema_model: nn.Module, model: nn.Module, rate: float,
               applied: torch.Tensor | None = None) -> None:
    """ema <- rate * ema + (1 - rate) * parameters, where `applied` (a 0-d bool tensor on the
    device; None: always): a skipped update leaves the EMA as it was, decided on the device."""
    averages, parameters = list(ema_model.parameters()), list(model.parameters())
    if applied is None:
        torch._foreach_lerp_(averages, parameters, 1.0 - rate)
        return
    # One weight tensor per parameter: a lone 0-d weight tensor would be read by the host.
    weight = applied.to(torch.float32) * (1.0 - rate)
    torch._foreach_lerp_(averages, parameters, [weight] * len(averages))


def skip_update(loss: torch.Tensor, grad_norm: torch.Tensor, threshold: float) -> torch.Tensor:
    """Whether to skip an update, as a 0-d bool tensor computed where its inputs are (no host
    synchronisation): a non-finite loss or gradient norm, or a norm over `threshold` (0: no
    threshold)."""
    skip = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
    if threshold > 0:
        skip = skip | (grad_norm > threshold)
    return skip


class SkipRecord:
    """Counts skipped updates (`skip_update` decides them on the device; the trainer records
    each decision when it reaches the host, a step later) and says when training is stalling.
    The decision's inputs are rank means and the synchronised gradient norm, so every rank
    decides the same."""

    def __init__(self, skip_threshold: float):
        self.skip_threshold = skip_threshold
        self.skipped = 0
        self.recent: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)
        self._warned_at: int | None = None

    def decide(self, loss: float, grad_norm: float) -> bool:
        """Whether to skip an update of this loss and gradient norm; recorded."""
        skip = bool(skip_update(torch.tensor(loss, dtype=torch.float64),
                                torch.tensor(grad_norm, dtype=torch.float64),
                                self.skip_threshold))
        self.record(skip)
        return skip

    def record(self, skip: bool) -> None:
        self.skipped += skip
        self.recent.append(skip)

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
