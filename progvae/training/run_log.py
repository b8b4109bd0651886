"""The run's logs: `metrics.jsonl` (one line per `log_every` updates, the window means of the
batch metrics) and `heldout.jsonl` (one line per periodic held-out evaluation).

Each step is logged exactly once across interruptions: on resume the lines an interrupted
process wrote after its last checkpoint are dropped (they are replayed), and so is a torn line
a crash cut short. The open window is part of the checkpoint, so a resumed line averages the
same updates an uninterrupted one would.
"""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from progvae.atomic import atomic_write_text
from progvae.training import dist

METRICS_LOG = "metrics.jsonl"
HELDOUT_LOG = "heldout.jsonl"


class RunLog:
    """Writes the run directory's logs (rank 0 only; every rank keeps the same window)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.window: dict[str, float] = collections.defaultdict(float)

    def state_dict(self) -> dict:
        return {"window": dict(self.window)}

    def load_state_dict(self, state: dict) -> None:
        self.window = collections.defaultdict(float, state["window"])

    def keep_up_to(self, step: int) -> None:
        """Drop log lines past `step` (0: all), those a killed process wrote after the
        checkpoint it is resumed from, and torn lines."""
        if dist.is_main():
            for name in (METRICS_LOG, HELDOUT_LOG):
                truncate_log(self.out_dir / name, step)
        dist.barrier()

    def add(self, values: dict[str, float]) -> None:
        """Add one update's metrics to the running sums of the next metrics.jsonl line."""
        self.window["count"] += 1
        for name, value in values.items():
            if name != "lr" and math.isfinite(value):
                self.window[name] += value
                self.window[name + "__n"] += 1

    def flush(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """Write one metrics.jsonl line: the window means of the batch metrics since the last
        line, then `extra` (the multiplier, skipped count, learning rate, time)."""
        line: dict[str, float] = {"step": step}
        for name in list(self.window):
            if name.endswith("__n") or name == "count":
                continue
            line[name] = self.window[name] / max(self.window[name + "__n"], 1)
        line.update(extra)
        self.window.clear()
        self._append(METRICS_LOG, line)
        return line

    def heldout(self, step: int, metrics: dict[str, float]) -> None:
        self._append(HELDOUT_LOG, {"step": step, **metrics})

    def _append(self, name: str, line: dict) -> None:
        if dist.is_main():
            with open(self.out_dir / name, "a") as stream:
                stream.write(json.dumps(line) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
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
