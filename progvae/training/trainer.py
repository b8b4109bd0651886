"""The stage-agnostic training engine.

A stage hands the trainer a model and an objective; the trainer owns the updates: Adam,
warm-up, clipping, update skipping, the parameter EMA, logs, checkpoints, exact resumption and
the progress bar. `progvae.training.loop.train_run` drives it and evaluates the result. It is written for one process and stays correct under
torchrun, where every rank makes the same decisions (see progvae.training.dist).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from progvae.training import dist, performance
from progvae.atomic import atomic_write_text
from progvae.training.checkpoint import CHECKPOINT, atomic_save
from progvae.config import Config
from progvae.errors import TrainingInterrupted
from progvae.data.loading import BatchSampler, ImageData, to_model_input
from progvae.models.distributions import NoiseShard

SKIP_WINDOW = 100        # recent updates inspected by the stall warning
SKIP_WARN_FRACTION = 0.5


class Objective(Protocol):
    """What a stage hands the trainer.

    `__call__(model, images, noise)` returns a dict of scalar tensors: "loss" (to minimise) and the
    batch means that are logged (e.g. "rate", "distortion"). `after_update(metrics)` sees the
    detached metrics of an applied update (a controller steps its multiplier there).
    `log_values()` adds values such as the multiplier to each log line.
    """

    def __call__(self, model: nn.Module, images: torch.Tensor,
                 noise: NoiseShard | None = None) -> dict[str, torch.Tensor]: ...
    def after_update(self, metrics: dict[str, float]) -> None: ...
    def log_values(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...



class FixedObjective:
    """Base of objectives with no state of their own (no multiplier): nothing to step after an
    update, log or checkpoint. Subclasses define only `__call__`."""

    def after_update(self, metrics: dict[str, float]) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank() if dist.is_distributed() else
                            torch.cuda.current_device())
    return torch.device("cpu")


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


class Trainer:
    def __init__(self, model: nn.Module, objective: Objective, config: Config, data: ImageData,
                 out_dir: Path, stage: str, quiet: bool = False):
        self.config = config
        self.objective = objective
        self.data = data
        self.out_dir = Path(out_dir)
        self.stage = stage
        self.quiet = quiet
        self.device = default_device()
        performance.configure_backends(self.device)
        self.autocast_dtype = performance.autocast_dtype(config, self.device)
        self.channels_last = performance.use_channels_last(config, self.device)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.loss_module: nn.Module = LossModule(self.model, objective)
        if dist.is_distributed():
            # Broadcasts rank 0's parameters, then averages gradients during backward.
            self.loss_module = DistributedDataParallel(
                self.loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # What a training step calls: the loss module, compiled where that is switched on.
        self.step_module = performance.compiled_or_eager(
            self.loss_module, performance.use_compile(config, self.device))
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            self.parameters, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, fused=True)   # one kernel, on CPU as on CUDA
        self.train_images = torch.from_numpy(data.train)
        self.noise = (NoiseShard(dist.rank(), dist.world_size()) if dist.is_distributed()
                      else None)
        self.sampler = BatchSampler(len(data.train), config.batch_size, config.seed,
                                    rank=dist.rank(), world_size=dist.world_size())
        self.step = 0
        self.skipped = 0
        self.recent_skips: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)
        self.window: dict[str, float] = collections.defaultdict(float)
        self.elapsed = 0.0   # training seconds summed over every (resumed) process
        # Held-out evaluation every config.eval_every steps (progvae.training.loop sets the one
        # held-out evaluator here); None: no periodic evaluation.
        self.evaluate_heldout: Callable[[], dict[str, float]] | None = None

    # ---------------------------------------------------------------------------------------
    # checkpoints
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "config": self.config.to_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "recent_skips": list(self.recent_skips),
            "window": dict(self.window),
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": _numpy_state_as_tensors(),
                "python": random.getstate(),
            },
        }

    def save_checkpoint(self) -> None:
        if dist.is_main():
            atomic_save(self.state_dict(), self.checkpoint_path())
        dist.barrier()

    def resume(self, state: dict | None) -> bool:
        """Continue from a checkpoint's `state` (progvae.runs.prepare_run loaded and checked
        it), or start afresh with None; returns whether it continued. Log lines past the
        checkpoint (the interrupted process wrote them after it) are dropped, so the resumed
        run logs each step exactly once."""
        path = self.checkpoint_path()
        if state is None:
            if dist.is_main():   # killed before its first checkpoint: its lines are replayed
                for name in ("metrics.jsonl", "heldout.jsonl"):
                    _truncate_log(self.out_dir / name, 0)
            dist.barrier()
            return False
        self.model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.skipped = state["skipped"]
        self.recent_skips.extend(state["recent_skips"])
        self.window = collections.defaultdict(float, state["window"])
        self.elapsed = state.get("elapsed", 0.0)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(_numpy_state_from_tensors(rng["numpy"]))
        random.setstate(rng["python"])
        # Lines the interrupted process logged after its last checkpoint are replayed now.
        if dist.is_main():
            for name in ("metrics.jsonl", "heldout.jsonl"):
                _truncate_log(self.out_dir / name, self.step)
        dist.barrier()
        dist.print0(f"Resuming {self.stage} from step {self.step} of {self.config.steps} "
                    f"({path}).")
        return True

    # ---------------------------------------------------------------------------------------
    # one update
    def learning_rate(self) -> float:
        if self.config.warmup_steps > 0:
            return self.config.lr * min(1.0, (self.step + 1) / self.config.warmup_steps)
        return self.config.lr

    def train_step(self) -> dict[str, float]:
        """One update: `accumulate` micro-batches per rank, gradients averaged over ranks by
        DDP, metrics averaged over micro-batches and ranks, then one decision, the same on
        every rank, to apply or skip the update."""
        config = self.config
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro_step in range(config.accumulate):
            images = self.next_batch()
            last = micro_step == config.accumulate - 1
            # Gradients are all-reduced once, on the last micro-step only.
            sync = contextlib.nullcontext() if last or not dist.is_distributed() \
                else self.loss_module.no_sync()
            with sync:
                with performance.autocast(self.device, self.autocast_dtype):
                    metrics = self.forward_loss(images)
                (metrics["loss"] / config.accumulate).backward()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / config.accumulate
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
        names = list(totals)
        reduced = dist.mean_across_ranks(torch.stack([totals[name] for name in names]))
        values = dict(zip(names, reduced.tolist()))
        # Gradients are identical on every rank after DDP, so is their norm; the loss is the
        # rank mean, non-finite if any rank's is. Every rank therefore decides the same.
        values["grad_norm"] = float(grad_norm)
        skip = (not math.isfinite(values["loss"]) or not math.isfinite(values["grad_norm"])
                or (config.skip_threshold > 0 and values["grad_norm"] > config.skip_threshold))
        if skip:
            self.skipped += 1
        else:
            self.optimizer.step()
            self.update_ema()
            self.objective.after_update(values)
        self.recent_skips.append(skip)
        self.step += 1
        values["lr"] = lr
        return values

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch on the device, as model input (pinned, non-blocking on CUDA)."""
        batch = self.train_images[self.sampler.next_indices()]
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        images = to_model_input(batch.to(self.device, non_blocking=True))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss computation, compiled if switched on; a compilation that fails at its first
        call falls back to eager mode with a warning instead of ending the run. Under torchrun
        every rank draws its slice of the global batch's noise (`NoiseShard`)."""
        if self.step_module is self.loss_module:
            return self.loss_module(images, self.noise)
        try:
            return self.step_module(images, self.noise)
        except Exception as error:  # noqa: BLE001 - any compiler failure: run eagerly
            performance.warn_compile_failed(error)
            self.step_module = self.loss_module
            return self.loss_module(images, self.noise)

    @torch.no_grad()
    def update_ema(self) -> None:
        ema_parameters = list(self.ema_model.parameters())
        parameters = list(self.model.parameters())
        torch._foreach_lerp_(ema_parameters, parameters, 1.0 - self.config.ema_rate)

    # ---------------------------------------------------------------------------------------
    # evaluation
    def run_facts(self) -> dict:
        """What every summary.json reports about the training itself."""
        return {
            "stage": self.stage,
            "data": self.data.name,
            "steps": self.step,
            "skipped": self.skipped,
            "train_seconds": round(self.elapsed, 2),
            "steps_per_second": round(self.step / max(self.elapsed, 1e-9), 3),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # ---------------------------------------------------------------------------------------
    # the loop
    def fit(self) -> None:
        """Train to config.steps. SIGTERM, SIGINT and SIGUSR1 (what SLURM and Kubernetes send
        before a job is killed) stop it after the current update, with a checkpoint at that
        step, by raising TrainingInterrupted; the same command then resumes."""
        received: list[int] = []
        handlers = {}
        for number in STOP_SIGNALS:
            try:
                handlers[number] = signal.signal(number, lambda got, frame: received.append(got))
            except ValueError:   # not the main thread: the caller handles signals
                break
        try:
            self._fit(received)
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)

    def _stop_signal(self, received: list[int]) -> int:
        """The signal to stop on (0: none), the same on every rank: the largest any rank got."""
        local = float(received[0]) if received else 0.0
        if not dist.is_distributed():
            return int(local)
        agreed = dist.max_across_ranks(torch.tensor([local], device=dist.collective_device()))
        return int(agreed.item())

    def _fit(self, received: list[int]) -> None:
        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, desc=self.stage, dynamic_ncols=True,
                   disable=self.quiet or not dist.is_main(), file=sys.stdout, mininterval=1.0)
        warned_at = -SKIP_WINDOW
        first_step = self.step
        started = time.perf_counter()
        offset = self.elapsed
        while self.step < config.steps:
            values = self.train_step()
            self.elapsed = offset + time.perf_counter() - started
            self.add_to_window(values)
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                line = self.flush_window(values["lr"])
                bar.set_postfix({key: f"{line[key]:.4g}" for key in
                                 ("rate", "distortion", "multiplier", "nll") if key in line},
                                refresh=False)
            if (len(self.recent_skips) == SKIP_WINDOW
                    and sum(self.recent_skips) > SKIP_WARN_FRACTION * SKIP_WINDOW
                    and self.step - warned_at >= SKIP_WINDOW):
                warned_at = self.step
                self.warn(f"WARNING: {sum(self.recent_skips)} of the last {SKIP_WINDOW} updates "
                          f"were skipped (grad norm over skip_threshold={config.skip_threshold} or "
                          "a non-finite loss); training is stalling. Lower lr, raise "
                          "skip_threshold, or check the data.")
            if (self.evaluate_heldout is not None and config.eval_every > 0
                    and self.step % config.eval_every == 0 and self.step < config.steps):
                self.log_heldout(self.evaluate_heldout())
            if config.checkpoint_every > 0 and self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
            _injected_fault(self.step)
            stop = self._stop_signal(received)
            if stop:
                bar.close()
                self.save_checkpoint()
                raise TrainingInterrupted(stop, self.step, config.steps, str(self.out_dir))
        bar.close()
        if self.step > first_step:   # a finished run started again is left as it was
            self.save_checkpoint()

    def add_to_window(self, values: dict[str, float]) -> None:
        """Add one update's metrics to the running sums of the next metrics.jsonl line."""
        self.window["count"] += 1
        for name, value in values.items():
            if name != "lr" and math.isfinite(value):
                self.window[name] += value
                self.window[name + "__n"] += 1

    def flush_window(self, lr: float) -> dict[str, float]:
        """Write one metrics.jsonl line: window means of the batch metrics since the last line."""
        line: dict[str, float] = {"step": self.step}
        for name in list(self.window):
            if name.endswith("__n") or name == "count":
                continue
            line[name] = self.window[name] / max(self.window[name + "__n"], 1)
        line.update(self.objective.log_values())
        line.update({"skipped": self.skipped, "lr": lr, "time": round(self.elapsed, 3)})
        self.window.clear()
        if dist.is_main():
            with open(self.out_dir / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(line) + "\n")
        return line

    def log_heldout(self, metrics: dict[str, float]) -> None:
        if dist.is_main():
            with open(self.out_dir / "heldout.jsonl", "a") as stream:
                stream.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def warn(self, message: str) -> None:
        if dist.is_main():
            tqdm.write(message, file=sys.stderr)


def _numpy_state_as_tensors() -> dict:
    """numpy's global RNG state as tensors and numbers, which a weights-only load accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(state) -> tuple:
    if isinstance(state, tuple):   # checkpoints written before the state became tensors
        return state
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["position"],
            state["has_gauss"], state["cached"])


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
FAULT_VARIABLE = "PROGVAE_TEST_KILL_AT"
FAULT_SIGNAL_VARIABLE = "PROGVAE_TEST_SIGNAL"


def _injected_fault(step: int) -> None:
    """Deterministic fault injection for the tests: with PROGVAE_TEST_KILL_AT=STEP (or
    STEP:RANK) the process (of that rank) sends itself SIGKILL (or the signal named by
    PROGVAE_TEST_SIGNAL, e.g. TERM) right after finishing update STEP, on the first attempt of
    a torchrun job only, so a restarted job runs through."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    at_step, _, at_rank = spec.partition(":")
    if step == int(at_step) and (not at_rank or int(at_rank) == dist.rank()):
        sys.stdout.flush()
        number = getattr(signal, "SIG" + os.environ.get(FAULT_SIGNAL_VARIABLE, "KILL"))
        os.kill(os.getpid(), number)


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the lines of steps up to `last_step`; a torn line (a write cut short by a crash) is
    dropped with a warning."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            tqdm.write(f"WARNING: dropped a torn line of {path.name} (a write cut short): "
                       f"{line.strip()[:60]!r}", file=sys.stderr)
            continue
        if step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text("".join(kept), path)
