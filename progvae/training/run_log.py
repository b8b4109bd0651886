"""The run's logs: `metrics.jsonl` (one line per `log_every` updates, the window means of the
batch metrics), `heldout.jsonl` (one line per periodic held-out evaluation) and the same
numbers, with image grids, as TensorBoard events under `OUT/tb/` (`train/`, `heldout/` and
`images/` tags; `tensorboard --logdir runs`).

Each step is logged exactly once across interruptions: on resume the lines an interrupted
process wrote after its last checkpoint are dropped (they are replayed), and so is a torn line
a crash cut short. The open window is part of the checkpoint, so a resumed line averages the
same updates an uninterrupted one would. TensorBoard's own purge does the same for the
events: a resumed writer hides the interrupted process's points past the checkpoint.
"""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from progvae.core.atomic import atomic_write_text
from progvae.training import dist

METRICS_LOG = "metrics.jsonl"
HELDOUT_LOG = "heldout.jsonl"
TENSORBOARD = "tb"


class RunLog:
    """Writes the run directory's logs (rank 0 only; every rank keeps the same window)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.window: dict[str, float] = collections.defaultdict(float)
        self.tensorboard = tensorboard
        self.writer = None   # the TensorBoard writer, opened at the first event on rank 0
        self.started = False   # keep_up_to has run: events may be written
        self.purge_from: int | None = None   # events of earlier processes from this step hidden

    def state_dict(self) -> dict:
        return {"window": dict(self.window)}

    def load_state_dict(self, state: dict) -> None:
        self.window = collections.defaultdict(float, state["window"])

    def keep_up_to(self, step: int) -> None:
        """Drop log lines past `step` (0: all), those a killed process wrote after the
        checkpoint it is resumed from, and torn lines."""
        if dist.is_main():
            for name in (METRICS_LOG, HELDOUT_LOG):
                truncate_log(self.run_dir / name, step)
            # Events of steps after `step` were written by a process that died: hidden.
            self.purge_from = step + 1 if (self.run_dir / TENSORBOARD).exists() else None
            self.started = True
        dist.barrier()

    def _events(self):
        """The TensorBoard writer, opened at the first event (a finished run re-run writes
        none); None where events are off, on ranks other than 0, or before keep_up_to."""
        if self.writer is None and self.tensorboard and self.started:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD), flush_secs=30,
                                        purge_step=self.purge_from)
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

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
        self.scalars("train", step, line)
        return line

    def heldout(self, step: int, metrics: dict[str, float]) -> None:
        self._append(HELDOUT_LOG, {"step": step, **metrics})
        self.scalars("heldout", step, metrics)

    def scalars(self, group: str, step: int, values: dict) -> None:
        """TensorBoard scalars `group/name`; a list (the per-group rates) becomes
        `group/name/K` for each entry."""
        writer = self._events()
        if writer is None:
            return
        for name, value in values.items():
            if name in ("step", "time"):
                continue
            if isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if isinstance(item, (int, float)) and math.isfinite(item):
                        writer.add_scalar(f"{group}/{name}/{index:02d}", item, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"{group}/{name}", value, step)

    def images(self, step: int, pictures: dict) -> None:
        """TensorBoard images `images/name` of uint8 (H, W, C) pictures."""
        writer = self._events()
        if writer is None:
            return
        for name, picture in pictures.items():
            writer.add_image(f"images/{name}", picture, step, dataformats="HWC")
        writer.flush()

    def _append(self, name: str, line: dict) -> None:
        if dist.is_main():
            with open(self.run_dir / name, "a") as stream:
                stream.write(json.dumps(line) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the lines of steps up to `last_step`; a torn line (a write cut short by a crash) is
    dropped with a warning."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            if not isinstance(step, int):
                raise TypeError(step)
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            tqdm.write(f"WARNING: dropped a torn line of {path.name} (a write cut short): "
                       f"{line.strip()[:60]!r}", file=sys.stderr)
            continue
        if step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text("".join(kept), path)
