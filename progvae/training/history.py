"""Checkpoint history: with `keep_checkpoints=N` every checkpoint is also kept as
OUT/checkpoints/step_STEP.pt (the newest N of them), so a run that went wrong late can go back:
`--resume_from=STEP` continues from one of them.

Going back never deletes what the abandoned continuation wrote: its later checkpoints, latest
checkpoint, summary and the lines of its logs past STEP are set aside in
OUT/checkpoints/abandoned_after_STEP_<time>/.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

from progvae.core.atomic import atomic_path
from progvae.core.errors import UserError
from progvae.core.untrusted import load_checkpoint
from progvae.training.checkpoint import CHECKPOINT

HISTORY = "checkpoints"
_KEPT = re.compile(r"step_(\d+)\.pt")


def kept_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / HISTORY / f"step_{step:08d}.pt"


def kept_steps(run_dir: Path) -> list[int]:
    """The steps of the kept checkpoints, in order."""
    folder = Path(run_dir) / HISTORY
    if not folder.is_dir():
        return []
    return sorted(int(match.group(1)) for path in folder.iterdir()
                  if (match := _KEPT.fullmatch(path.name)) and path.is_file())


def keep(run_dir: Path, step: int, count: int) -> None:
    """Keep the just-written OUT/checkpoint.pt as step `step` (a hard link: no copy where the
    file system allows), then remove all but the newest `count` kept checkpoints."""
    target = kept_path(run_dir, step)
    target.parent.mkdir(exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(Path(run_dir) / CHECKPOINT, temporary)
    except OSError:   # a file system without hard links
        shutil.copyfile(Path(run_dir) / CHECKPOINT, temporary)
    os.replace(temporary, target)
    for old in kept_steps(run_dir)[:-count]:
        kept_path(run_dir, old).unlink(missing_ok=True)


def load_kept(run_dir: Path, step: int) -> dict:
    """The kept checkpoint of `step`, loaded (weights only) and checked; one sentence if there
    is none."""
    path = kept_path(run_dir, step)
    if not path.is_file():
        steps = kept_steps(run_dir)
        have = (f"the kept steps are {', '.join(map(str, steps))}" if steps else
                "it keeps none (train with --keep_checkpoints=N to keep them)")
        raise UserError(f"--resume_from={step}: '{run_dir}' has no checkpoint of step {step}; "
                        f"{have}.")
    state = load_checkpoint(path)
    if state.get("step") != step:
        raise UserError(f"'{path}' holds step {state.get('step')}, not {step}; it was renamed or "
                        "altered, so pick another --resume_from.")
    return state


def rewind(run_dir: Path, step: int) -> Path:
    """Make the kept checkpoint of `step` the latest, setting aside what came after it; returns
    the folder it was set aside in. Called by the run directory's lock holder."""
    run_dir = Path(run_dir)
    aside = run_dir / HISTORY / f"abandoned_after_{step:08d}_{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for later in kept_steps(run_dir):
        if later > step:
            os.replace(kept_path(run_dir, later), aside / kept_path(run_dir, later).name)
    for name in (CHECKPOINT, "summary.json", "eval.json"):
        if (run_dir / name).is_file():
            os.replace(run_dir / name, aside / name)
    for name in ("metrics.jsonl", "heldout.jsonl"):   # resuming drops their lines past `step`
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, aside / name)
    with atomic_path(run_dir / CHECKPOINT) as temporary:
        shutil.copyfile(kept_path(run_dir, step), temporary)
    return aside
