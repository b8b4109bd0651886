"""Stopping a run cleanly when the cluster asks: SIGTERM, SIGINT and SIGUSR1 (what SLURM and
Kubernetes send before a job is killed) are recorded while training, and every rank agrees on
whether to stop after the current update. Also the tests' deterministic fault injection.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import torch

from progvae.training import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
FAULT_VARIABLE = "PROGVAE_TEST_KILL_AT"
FAULT_SIGNAL_VARIABLE = "PROGVAE_TEST_SIGNAL"


class StopRequests:
    """A context in which the stop signals are recorded instead of ending the process; the
    previous handlers come back on exit. In a thread other than the main one (where handlers
    cannot be installed) nothing is recorded and the caller's handling stands."""

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        for number in STOP_SIGNALS:
            try:
                self._previous[number] = signal.signal(
                    number, lambda got, frame: self.received.append(got))
            except ValueError:   # not the main thread
                break
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def agreed_signal(self) -> int:
        """The signal to stop on (0: none), the same on every rank: the largest any rank got."""
        local = float(self.received[0]) if self.received else 0.0
        if not dist.is_distributed():
            return int(local)
        agreed = dist.max_across_ranks(torch.tensor([local], device=dist.collective_device()))
        return int(agreed.item())


@dataclass(frozen=True)
class PlannedFault:
    """Deterministic fault injection for the tests: with PROGVAE_TEST_KILL_AT=STEP (or
    STEP:RANK) the process (of that rank) sends itself SIGKILL (or the signal named by
    PROGVAE_TEST_SIGNAL, e.g. TERM; RAISE: it raises an error instead) right after finishing
    update STEP, on the first attempt of a torchrun job only, so a restarted job runs through.
    Read from the environment once, when training starts (`planned_fault`)."""

    step: int
    rank: int | None
    signal_name: str

    def after_update(self, step: int) -> None:
        if step != self.step or (self.rank is not None and self.rank != dist.rank()):
            return
        sys.stdout.flush()
        if self.signal_name == "RAISE":
            raise RuntimeError(f"injected failure after step {step} on rank {dist.rank()}")
        os.kill(os.getpid(), getattr(signal, "SIG" + self.signal_name))


def planned_fault() -> PlannedFault | None:
    """The fault the environment asks the tests' training run to suffer, or None (always, in
    a user's run and in a restarted torchrun job)."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    at_step, _, at_rank = spec.partition(":")
    return PlannedFault(int(at_step), int(at_rank) if at_rank else None,
                        os.environ.get(FAULT_SIGNAL_VARIABLE, "KILL"))
