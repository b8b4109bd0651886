"""The update rule around the model: the warm-up schedule, skipping of bad updates (and the
warning when most are skipped), and the flat buffers through which clipping, Adam and the
parameter EMA each update every parameter at once."""

from __future__ import annotations

import collections

import torch
from torch import nn

from progvae.core.config import Config

SKIP_WINDOW = 100        # recent updates inspected by the stall warning
SKIP_WARN_FRACTION = 0.5


LR_DECAY = 0.1   # the learning rate's factor over the last lr_decay_steps updates


def learning_rate(config: Config, step: int) -> float:
    """The learning rate of update `step` (0-based): linear warm-up over warmup_steps, and a
    tenth of it over the last lr_decay_steps of `steps` (learned codecs' final decay)."""
    lr = config.lr
    if config.lr_decay_steps > 0 and step >= config.steps - config.lr_decay_steps:
        lr *= LR_DECAY
    if config.warmup_steps > 0:
        return lr * min(1.0, (step + 1) / config.warmup_steps)
    return lr


@torch.no_grad()
def update_ema(averages: list[torch.Tensor], parameters: list[torch.Tensor], rate: float,
               applied: torch.Tensor) -> None:
    """averages <- rate * averages + (1 - rate) * parameters, where `applied` (a 0-d bool
    tensor on the device): a skipped update leaves the EMA as it was, decided on the device."""
    # One weight tensor per parameter: a lone 0-d weight tensor would be read by the host.
    weight = applied.to(torch.float32) * (1.0 - rate)
    torch._foreach_lerp_(averages, parameters, [weight] * len(averages))


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)


def _view(flat: torch.Tensor, like: torch.Tensor, offset: int) -> torch.Tensor:
    """`like`'s shape and strides (channels_last included) over flat[offset:offset+numel]."""
    return torch.as_strided(flat, like.shape, like.stride(), offset)


class FlatParameters:
    """The trainable parameters, their gradients, Adam's moments and the EMA's copies of them,
    each set a view into one flat buffer, so that clipping, Adam and the EMA are one operation
    each instead of one per tensor. A VDVAE has hundreds to thousands of small tensors: per
    tensor, these three took 5.6 ms of a `tiny` step and 24 ms of an `svhn`-blocks step on one
    CPU thread, flat 0.3 and 1.7 ms.

    `optimizer` is torch.optim.Adam over the one flat parameter. Checkpoints keep the
    per-parameter format torch.optim.Adam over the model's parameters writes
    (`optimizer_state_dict`, `load_optimizer_state_dict`), so old and new checkpoints resume
    either way. The gradients stay views: they are zeroed in place, never set to None, and
    under DistributedDataParallel the averaged gradients are copied back into them
    (gradient_as_bucket_view=False)."""

    def __init__(self, parameters: list[nn.Parameter], averages: list[torch.Tensor],
                 config: Config):
        first = parameters[0]
        if any(p.dtype != first.dtype or p.device != first.device or not _dense(p)
               for p in [*parameters, *averages]):
            raise ValueError("FlatParameters needs dense parameters of one dtype on one device.")
        self.parameters = parameters
        self.offsets = [0]
        for parameter in parameters:
            self.offsets.append(self.offsets[-1] + parameter.numel())
        total = self.offsets[-1]
        self.values = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros_like(self.values)
        self.averages = torch.empty_like(self.values)
        with torch.no_grad():
            for parameter, average, offset in zip(parameters, averages, self.offsets):
                view = _view(self.values, parameter, offset)
                view.copy_(parameter)
                parameter.data = view
                parameter.grad = _view(self.grads, parameter, offset)
                average_view = _view(self.averages, average, offset)
                average_view.copy_(average)
                average.data = average_view
        self.flat = nn.Parameter(self.values)
        self.flat.grad = self.grads
        self.optimizer = torch.optim.Adam(
            [self.flat], lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, fused=True)   # one kernel, on CPU as on CUDA

    def zero_grad(self) -> None:
        self.grads.zero_()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients to norm at most `max_norm` as torch.nn.utils.clip_grad_norm_
        does; returns the norm before, on the device."""
        norm = torch.linalg.vector_norm(self.grads)
        self.grads.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def step(self, lr: float, skip: torch.Tensor) -> None:
        """One Adam step at `lr`; `skip` (a 0-d bool tensor on the device) leaves the
        parameters and Adam's state, its step count included, as they were."""
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.found_inf = skip.to(torch.float32)
        self.optimizer.step()

    # checkpoints: Adam's state per parameter, as torch.optim.Adam over them writes it
    def optimizer_state_dict(self) -> dict:
        flat = self.optimizer.state_dict()
        state = flat["state"].get(0)
        group = {**flat["param_groups"][0], "params": list(range(len(self.parameters)))}
        if state is None:
            return {"state": {}, "param_groups": [group]}
        per_parameter = {
            index: {"step": state["step"].clone(),
                    **{name: _view(state[name], parameter, offset)
                       for name in ("exp_avg", "exp_avg_sq")}}
            for index, (parameter, offset) in enumerate(zip(self.parameters, self.offsets))}
        return {"state": per_parameter, "param_groups": [group]}

    def load_optimizer_state_dict(self, saved: dict) -> None:
        saved_state, saved_group = saved["state"], saved["param_groups"][0]
        if len(saved_group["params"]) != len(self.parameters):
            raise ValueError(f"The checkpoint's optimizer holds {len(saved_group['params'])} "
                             f"parameters; this model trains {len(self.parameters)}.")
        group = {key: value for key, value in saved_group.items() if key != "params"}
        state = {}
        if saved_state:
            state = {"step": saved_state[saved_group["params"][0]]["step"].clone()}
            for name in ("exp_avg", "exp_avg_sq"):
                buffer = torch.zeros_like(self.values)
                for index, parameter, offset in zip(saved_group["params"], self.parameters,
                                                    self.offsets):
                    _view(buffer, parameter, offset).copy_(saved_state[index][name])
                state[name] = buffer
        self.optimizer.load_state_dict({"state": {0: state} if state else {},
                                        "param_groups": [{**group, "params": [0]}]})


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
