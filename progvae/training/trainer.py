"""The stage-agnostic training engine.

A stage hands the trainer a model and an objective (progvae.training.objective); the trainer
makes the updates (Adam, warm-up, clipping, skipping, the parameter EMA: progvae.training.updates)
and runs the loop with its progress bar, logs (progvae.training.run_log), checkpoints with exact
resumption (progvae.training.rng_state) and clean stops on a cluster's signals
(progvae.training.stopping). `progvae.runs.train.train_run` drives it and evaluates the
result. It is written for one process and stays correct under torchrun, where every rank makes
the same decisions (see progvae.training.dist).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from progvae.core.atomic import atomic_save
from progvae.core.config import Config
from progvae.core.errors import TrainingInterrupted
from progvae.data.loading import BatchSampler, ImageData, augment_batch, device_batch
from progvae.models.distributions import NoiseShard
from progvae.training import dist, history, performance
from progvae.training.checkpoint import CHECKPOINT
from progvae.training.objective import LossModule, Objective
from progvae.training.rng_state import capture_rng_state, restore_rng_state
from progvae.training.run_log import RunLog
from progvae.training.stopping import StopRequests, planned_fault
from progvae.training.updates import (FlatParameters, SkipRecord, learning_rate, skip_update,
                                      update_ema)

PROGRESS_KEYS = ("rate", "distortion", "multiplier", "nll")   # shown beside the progress bar
STOP_FLAG = "_stop_asked"
SKIP_FLAG = "_skipped"


class PendingValues:
    """One update's metrics on their way to the host: on CUDA a non-blocking copy into pinned
    memory and an event behind it, so reading waits for that copy alone."""

    def __init__(self, names: list[str], lr: float, values: torch.Tensor):
        self.names, self.lr = names, lr
        self.event = None
        if values.device.type == "cuda":
            values = values.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        self.values = values

    def read(self) -> dict[str, float]:
        if self.event is not None:
            self.event.synchronize()
        return dict(zip(self.names, self.values.tolist()))


class Trainer:
    def __init__(self, model: nn.Module, objective: Objective, config: Config, data: ImageData,
                 run_dir: Path, kind: str, quiet: bool = False):
        self.config = config
        self.objective = objective
        self.data = data
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.quiet = quiet
        self.device = dist.default_device()
        performance.configure_backends(self.device)
        self.autocast_dtype = performance.autocast_dtype(config, self.device)
        self.channels_last = performance.use_channels_last(config, self.device)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            for held in vars(objective).values():   # a frozen stage one takes the same layout
                if isinstance(held, nn.Module):
                    held.to(memory_format=torch.channels_last)
        if hasattr(objective, "to"):   # tensors its loss reads (a controller's multiplier)
            objective.to(self.device)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # Trainable parameters, their gradients, Adam's state and their EMA copies as views
        # into flat buffers (before DDP sees the parameters). The EMA lerps the flat buffer
        # and, per tensor, the parameters that do not train.
        pairs = list(zip(self.model.parameters(), self.ema_model.parameters()))
        trained = [(p, average) for p, average in pairs if p.requires_grad]
        fixed = [(p, average) for p, average in pairs if not p.requires_grad]
        self.parameters = [p for p, _ in trained]
        self.flat = FlatParameters(self.parameters, [average for _, average in trained], config)
        self.optimizer = self.flat.optimizer
        self.averaged = [self.flat.values, *(p for p, _ in fixed)]
        self.averages = [self.flat.averages, *(average for _, average in fixed)]
        self.loss_module: nn.Module = LossModule(self.model, objective)
        if dist.is_distributed():
            # Broadcasts rank 0's parameters, then averages gradients during backward and
            # copies the averages into the parameters' gradients, views of the flat buffer.
            self.loss_module = DistributedDataParallel(
                self.loss_module, gradient_as_bucket_view=False,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # What a training step calls: the loss module, compiled where that is switched on.
        self.step_module = performance.compiled_or_eager(
            self.loss_module, performance.use_compile(config, self.device))
        # The first call of a compiled step compiles it: the one call guarded by the fallback.
        self.compiling = self.step_module is not self.loss_module
        self.train_images = torch.from_numpy(data.train)
        self.noise = (NoiseShard(dist.rank(), dist.world_size()) if dist.is_distributed()
                      else None)
        self.sampler = BatchSampler(len(data.train), config.batch_size, config.seed,
                                    rank=dist.rank(), world_size=dist.world_size())
        self.skips = SkipRecord(config.skip_threshold)
        self.stops: StopRequests | None = None   # the signals recorded while fit() runs
        self.stop_asked = False   # by any rank, as of the last update collected
        self.pending: list[PendingValues] = []   # updates whose metrics the host has not read
        self.log = RunLog(self.run_dir, tensorboard=config.tensorboard)
        self.step = 0
        self.resumed_at = 0   # the step this process started from
        self.elapsed = 0.0   # training seconds summed over every (resumed) process
        # Called with the step every config.eval_every steps before the last (progvae.training.
        # loop evaluates the EMA weights there and logs and draws the result); None: nothing.
        self.evaluate_periodically: Callable[[int], None] | None = None

    @property
    def skipped(self) -> int:
        return self.skips.skipped

    # ---------------------------------------------------------------------------------------
    # checkpoints
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "config": self.config.to_dict(),
            "step": self.step,
            **self.skips.state_dict(),
            **self.log.state_dict(),
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema_model.state_dict(),
            "optimizer": self.flat.optimizer_state_dict(),
            "objective": self.objective.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
        }

    def save_checkpoint(self) -> None:
        self.drain()   # the skip count and the log window cover every update made
        state = self.state_dict()   # on every rank: it gathers each rank's generators
        if dist.is_main():
            atomic_save(state, self.checkpoint_path())
            if self.config.keep_checkpoints > 0:
                history.keep(self.run_dir, self.step, self.config.keep_checkpoints)
        dist.barrier()

    def resume(self, state: dict | None) -> bool:
        """Continue from a checkpoint's `state` (progvae.runs.prepare_run loaded and checked
        it), or start afresh with None; returns whether it continued. Log lines past the
        checkpoint (the interrupted process wrote them after it) are dropped, so the resumed
        run logs each step exactly once."""
        if state is None:
            self.log.keep_up_to(0)   # killed before its first checkpoint: its lines are replayed
            return False
        self.model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema"])
        self.flat.load_optimizer_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.sampler.load_state_dict(state["sampler"])
        self.skips.load_state_dict(state)
        self.log.load_state_dict(state)
        self.step = self.resumed_at = state["step"]
        self.elapsed = state.get("elapsed", 0.0)
        restore_rng_state(state["rng"])
        self.log.keep_up_to(self.step)
        dist.print0(f"Resuming {self.kind} from step {self.step} of {self.config.steps} "
                    f"({self.checkpoint_path()}).")
        return True

    # ---------------------------------------------------------------------------------------
    # one update
    def train_step(self) -> dict[str, float]:
        """One update and its metrics on the host (a synchronisation: the loop instead reads
        each update's values a step later, see `collect`)."""
        self.update()
        return self.collect()[-1]

    def update(self) -> None:
        """One update: `accumulate` micro-batches per rank, gradients averaged over ranks by
        DDP, metrics averaged over micro-batches and ranks, then one decision, the same on
        every rank, to apply or skip the update. The decision and everything it gates (Adam,
        the EMA, the controller's multiplier) stay on the device, so the host queues the next
        step without waiting for this one; the metrics follow to the host asynchronously and
        are read by `collect`."""
        config = self.config
        lr = learning_rate(config, self.step)
        self.model.train()
        self.flat.zero_grad()
        totals: dict[str, torch.Tensor] = {}
        for micro_step in range(config.accumulate):
            images = self.next_batch()
            last = micro_step == config.accumulate - 1
            # Gradients are all-reduced once, on the last micro-step only.
            sync = contextlib.nullcontext() if last or not dist.is_distributed() \
                else self.loss_module.no_sync()
            with sync:
                metrics = self.forward_backward(images)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / config.accumulate
        grad_norm = self.flat.clip_grad_norm(config.grad_clip)
        # One all-reduce per step: the batch metrics, the gradient norm (identical on every
        # rank after DDP, so its mean is itself) and whether a rank was asked to stop. The loss
        # is the rank mean, non-finite if any rank's is, so every rank decides the same.
        names = [*totals, "grad_norm", STOP_FLAG]
        stop_asked = torch.full((), float(self.stops is not None and bool(self.stops.received)),
                                device=grad_norm.device)
        local = torch.stack([*totals.values(), grad_norm.float(), stop_asked])
        reduced = dist.mean_across_ranks(local.to(dist.collective_device(local.device)))
        reduced = reduced.to(self.device, non_blocking=True)
        values = dict(zip(names, reduced.unbind()))
        skip = skip_update(values["loss"], values["grad_norm"], self.skips.skip_threshold)
        applied = ~skip
        self.flat.step(lr, skip)
        update_ema(self.averages, self.averaged, config.ema_rate, applied)
        self.objective.after_update(values, applied)
        self.step += 1
        record = torch.cat([reduced, skip.to(reduced.dtype)[None]])
        self.pending.append(PendingValues([*names, SKIP_FLAG], lr, record))

    def collect(self, keep: int = 0) -> list[dict[str, float]]:
        """The metrics of the updates made but not yet read, oldest first, all but the newest
        `keep`; their skip decisions and stop requests are recorded here. The loop keeps the
        newest one queued, so each value is read one step late: by then the device has long
        finished the update it belongs to and is busy with the next, and reading it costs
        nothing (on CUDA the copy was started when the update was queued)."""
        ready = self.pending[:max(0, len(self.pending) - keep)]
        del self.pending[:len(ready)]
        collected = []
        for pending in ready:
            values = pending.read()
            self.stop_asked = self.stop_asked or values.pop(STOP_FLAG) > 0
            self.skips.record(values.pop(SKIP_FLAG) > 0)
            values["lr"] = pending.lr
            collected.append(values)
        return collected

    def drain(self, keep: int = 0) -> None:
        """Add the collected updates' metrics to the log window (`collect`)."""
        for values in self.collect(keep):
            self.log.add(values)

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch on the device, as model input (pinned, non-blocking on CUDA)."""
        images = self.train_images[self.sampler.next_indices()]
        images = device_batch(augment_batch(images, self.config.augment,
                                            self.sampler.batch_generator()), self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward_backward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch through the step module (compiled if switched
        on). The first call of a compiled step, where the compiler works, is the one guarded:
        a compiler error in its forward or backward (and nothing else: out of memory or an NCCL
        error is not the compiler's) falls back to eager mode with a warning and runs the
        micro-batch again. Under torchrun every rank draws its slice of the global batch's
        noise (`NoiseShard`)."""
        if not self.compiling:
            return self._forward_backward(self.step_module, images)
        self.compiling = False
        try:
            return self._forward_backward(self.step_module, images)
        except performance.compiler_errors() as error:
            performance.warn_compile_failed(error)
            self.step_module = self.loss_module
            self.flat.zero_grad()   # the first micro-batch: none kept
            return self._forward_backward(self.loss_module, images)

    def _forward_backward(self, module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with performance.autocast(self.device, self.autocast_dtype):
            metrics = module(images, self.noise)
        (metrics["loss"] / self.config.accumulate).backward()
        return metrics

    # ---------------------------------------------------------------------------------------
    # the loop
    def run_facts(self) -> dict:
        """What every summary.json reports about the training itself."""
        return {
            "kind": self.kind,
            "data": self.data.name,
            "steps": self.step,
            "skipped": self.skipped,
            "train_seconds": round(self.elapsed, 2),
            "steps_per_second": round(self.step / max(self.elapsed, 1e-9), 3),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def fit(self) -> None:
        """Train to config.steps. SIGTERM, SIGINT and SIGUSR1 (what SLURM and Kubernetes send
        before a job is killed) stop it after the current update, with a checkpoint at that
        step, by raising TrainingInterrupted; the same command then resumes."""
        with StopRequests() as stops:
            self.stops = stops
            try:
                self._fit(stops)
            finally:
                self.stops = None

    def _fit(self, stops: StopRequests) -> None:
        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, dynamic_ncols=True,
                   desc=f"{self.kind} (batch means, live weights)",
                   disable=self.quiet or not dist.is_main(), file=sys.stdout, mininterval=1.0)
        first_step = self.step
        fault = planned_fault()
        started = time.perf_counter()
        offset = self.elapsed
        while self.step < config.steps:
            self.update()
            self.elapsed = offset + time.perf_counter() - started
            bar.update(1)
            evaluating = (self.evaluate_periodically is not None and config.eval_every > 0
                          and self.step % config.eval_every == 0 and self.step < config.steps)
            checkpointing = config.checkpoint_every > 0 and self.step % config.checkpoint_every == 0
            logging = self.step % config.log_every == 0 or self.step == config.steps
            # The previous update's values (this one's too where a log line, an evaluation or a
            # checkpoint needs every update so far: one wait per log_every steps).
            self.drain(keep=0 if logging or evaluating or checkpointing else 1)
            if logging:
                line = self.log.flush(self.step, {
                    **self.objective.log_values(), "skipped": self.skipped,
                    "lr": learning_rate(config, self.step - 1),
                    "time": round(self.elapsed, 3)})
                bar.set_postfix({key: f"{line[key]:.4g}" for key in PROGRESS_KEYS
                                 if key in line}, refresh=False)
            warning = self.skips.stall_warning(self.step)
            if warning is not None and dist.is_main():
                tqdm.write(warning, file=sys.stderr)
            if evaluating:
                self.evaluate_periodically(self.step)
            if checkpointing:
                self.save_checkpoint()
            if fault is not None:
                fault.after_update(self.step)
            # Under torchrun the signal number is agreed (one more collective) only when an
            # update's all-reduce said some rank was asked to stop; a signal that arrived after
            # it stops the run an update or two later.
            stop = stops.agreed_signal() if self.stop_asked or not dist.is_distributed() else 0
            if stop:
                bar.close()
                self.save_checkpoint()
                raise TrainingInterrupted(stop, self.step, config.steps, str(self.run_dir))
        bar.close()
        if self.step > first_step:   # a finished run started again is left as it was
            self.save_checkpoint()
