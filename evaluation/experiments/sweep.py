"""Rate-distortion sweeps: one stage-one run per target, and the figures that compare them.

`run_sweep(config, targets, out)` trains a stage-one model for every target in `out/target_T/`
(one after another), then writes into `out`:

| file                | holds                                                                  |
| ------------------- | ---------------------------------------------------------------------- |
| `rd.json`           | per target: held-out distortion, PSNR, rate, final multiplier,          |
|                     | constraint_met, the first logged step that reached the target, and    |
|                     | the logged step from which it stayed within 10% of it                 |
| `rd.png`            | rate against distortion, one point per target (paper 003 Fig. 2)       |
| `multipliers.png`   | the multiplier over training, one curve per target (paper 000 Fig. 3)  |
| `reconstructions.png` | the same held-out images: a row of originals, then a row per target |

A target whose run has finished (its summary.json covers the configured steps) is skipped; an
unfinished one continues from its checkpoint, so running the same command again completes a
killed sweep. The targets are whatever the controller is steered by: distortion targets for
the distortion-constrained controllers, rate targets for `rate`, and beta for `beta`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from progvae.core.atomic import atomic_path, atomic_write_json
from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.core.untrusted import read_json_lines
from progvae.data.images import save_rows
from progvae.data.loading import load_data_for, to_model_input, to_uint8_images
from progvae.runs.heldout import seeded
from progvae.runs.load import load_model, run_summary
from progvae.stages.stage1 import train_stage1
from progvae.training import dist
from progvae.training.controllers import (CONTROLLERS, TARGET_FIELDS, build_controller,
                                          check_controller_name, check_same_controller)
from progvae.training.dist import default_device

N_RECONSTRUCTIONS = 10   # held-out images per row of reconstructions.png
SETTLE_TOLERANCE = 0.1   # "settled": every later logged value within 10% of the target


def parse_targets(targets) -> list[float]:
    """--targets as fire hands it over (a number, a tuple of numbers, or a comma-separated
    string) -> distinct positive floats, largest (loosest) first."""
    if isinstance(targets, str):
        targets = [part for part in re.split(r"[,\s]+", targets) if part]
    elif isinstance(targets, (int, float)) and not isinstance(targets, bool):
        targets = [targets]
    elif targets is None:
        targets = []
    values = []
    for target in targets:
        try:
            value = float(target)
        except (TypeError, ValueError):
            raise UserError(f"--targets must be comma-separated numbers, e.g. "
                            f"--targets=0.0512,0.0256; got {target!r}.") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"Every sweep target must be a positive number; got {target!r} in "
                            "--targets.")
        values.append(value)
    if not values:
        raise UserError("Pass the sweep's targets as --targets=T1,T2,... (e.g. "
                        "--targets=0.0512,0.0256,0.0128).")
    return sorted(set(values), reverse=True)


def run_directory(out: str | Path, target: float) -> Path:
    return Path(out) / f"target_{target:g}"


def run_sweep(config: Config, targets: list[float], out: str | Path, quiet: bool = True) -> dict:
    """Train (or finish) one stage-one run per target under `out`, then write rd.json and the
    figures. Returns the contents of rd.json."""
    if not out:
        raise UserError("Pass --out=DIR, the folder that holds the sweep's runs.")
    out = Path(str(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out='{out}' is a file; pass a directory.")
    check_controller_name(config.controller)
    field = TARGET_FIELDS[config.controller]
    configs = [dataclasses.replace(config, **{field: target}) for target in targets]
    for run_config, target in zip(configs, targets):   # every bad input fails before a write
        build_controller(run_config)
        check_same_controller(run_directory(out, target), run_config)

    for index, (run_config, target) in enumerate(zip(configs, targets), start=1):
        run_dir = run_directory(out, target)
        if _finished(run_dir, run_config):
            dist.print0(f"[{index}/{len(targets)}] {field}={target:g}: finished in {run_dir}, "
                        "skipped.")
            continue
        dist.print0(f"[{index}/{len(targets)}] {field}={target:g}: training {run_dir}")
        train_stage1(run_config, run_dir, quiet=quiet)

    result = {"controller": config.controller, "data": config.data, "target_field": field,
              "constrained": CONTROLLERS[config.controller].constrained,
              "runs": [_run_row(out, target) for target in targets]}
    if dist.is_main():
        started = time.perf_counter()
        plot_rate_distortion(result, out / "rd.png")
        plot_multipliers(result, out, out / "multipliers.png")
        write_reconstructions(config, [run_directory(out, t) for t in targets],
                              out / "reconstructions.png")
        result["figures_seconds"] = round(time.perf_counter() - started, 2)
        result["reconstruction_rows"] = ["originals"] + [row["run"] for row in result["runs"]]
        atomic_write_json(result, out / "rd.json")
    dist.barrier()
    return result


def _finished(run_dir: Path, config: Config) -> bool:
    return run_summary(run_dir).get("steps", 0) >= config.steps


def _read_metrics(run_dir: Path) -> list[dict]:
    return read_json_lines(run_dir / "metrics.jsonl")


def _run_row(out: Path, target: float) -> dict:
    """One target's line of rd.json, from its summary.json and metrics.jsonl."""
    run_dir = run_directory(out, target)
    summary = run_summary(run_dir)
    quantity = summary.get("constrained")
    reached_at = settled_at = None
    if quantity is not None:
        values = [(line["step"], line.get(quantity, math.inf)) for line in _read_metrics(run_dir)]
        # The first logged step whose window-mean training value met the target ...
        reached_at = next((step for step, value in values if value <= target), None)
        # ... and the first from which every logged value stayed within SETTLE_TOLERANCE.
        for index in range(len(values) - 1, -1, -1):
            if abs(values[index][1] / target - 1) > SETTLE_TOLERANCE:
                break
            settled_at = values[index][0]
    return {"target": target, "run": run_dir.name, "steps": summary["steps"],
            "distortion": summary["mse"], "psnr": summary["psnr"],
            "rate": summary["rate"], "multiplier": summary["multiplier"],
            "constraint_met": summary.get("constraint_met"),
            "relative_error": summary.get("relative_error"),
            "saturated_fraction": summary.get("saturated_fraction"),
            "steps_to_target": reached_at, "steps_to_settle": settled_at,
            "train_seconds": summary.get("train_seconds")}


# ---------------------------------------------------------------------------------------------
# figures (matplotlib's object API with the Agg canvas: no pyplot, no global state)
def _figure(width: float = 5.5, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def plot_rate_distortion(result: dict, path: Path) -> None:
    """Held-out rate against held-out distortion, a point per target, filled where the
    constraint was met and hollow where not; dotted lines mark distortion targets."""
    figure, axes = _figure()
    runs = sorted(result["runs"], key=lambda run: run["distortion"])
    axes.plot([run["distortion"] for run in runs], [run["rate"] for run in runs], "-",
              color="0.6", zorder=1)
    for run in runs:
        hollow = run["constraint_met"] is False
        axes.scatter(run["distortion"], run["rate"], s=36, zorder=2, edgecolors="C0",
                     facecolors="none" if hollow else "C0")
        axes.annotate(f"{run['target']:g}", (run["distortion"], run["rate"]), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
        if result["constrained"] == "distortion":
            axes.axvline(run["target"], color="0.85", linestyle=":", zorder=0)
    axes.set_xlabel("distortion (MSE per dimension, [-1, 1] scale)")
    axes.set_ylabel("rate (nats per dimension)")
    axes.set_title(f"{result['controller']} on {result['data']}: points labelled by "
                   f"{result['target_field']}; hollow = not met", fontsize=9)
    _save(figure, path)


def plot_multipliers(result: dict, out: Path, path: Path) -> None:
    """The logged multiplier against the step, one curve per target (log scale)."""
    figure, axes = _figure()
    for run in result["runs"]:
        lines = [line for line in _read_metrics(out / run["run"]) if "multiplier" in line]
        axes.plot([line["step"] for line in lines], [line["multiplier"] for line in lines],
                  label=f"{run['target']:g}")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(f"multiplier ({result['controller']})")
    axes.legend(title=result["target_field"], fontsize=8, title_fontsize=8)
    _save(figure, path)


@torch.no_grad()
def write_reconstructions(config: Config, run_dirs: list[Path], path: Path,
                          n: int = N_RECONSTRUCTIONS) -> None:
    """The first n held-out images, then each run's reconstruction of them (its EMA weights,
    z ~ q(z | x) under the run's seed), one row per run in the given order."""
    device = default_device()
    data = load_data_for(config)
    rows: list[np.ndarray] = []
    for run_dir in run_dirs:
        run_config, model, _ = load_model(run_dir, device)
        with seeded(run_config.seed, device):
            originals = data.test[:n]
            x = to_model_input(torch.from_numpy(originals)).to(device)
            if not rows:
                rows.append(originals)
            rows.append(to_uint8_images(model.reconstruct(x).cpu()))
    save_rows(rows, path)


def format_sweep(result: dict, controller: str, out: str | Path) -> str:
    """What `sweep` prints: one row per target of rd.json's numbers, and the files written."""
    lines = [f"\nSweep of {len(result['runs'])} targets ({controller}), held-out split:",
             f"  {'target':>10} {'distortion':>10} {'PSNR':>7} {'rate':>9} {'multiplier':>10} "
             f"{'met':>5} {'reached at':>10} {'settled at':>10}"]
    for run in result["runs"]:
        lines.append(f"  {run['target']:>10g} {run['distortion']:>10.5f} {run['psnr']:>7.2f} "
                     f"{run['rate']:>9.5f} {run['multiplier']:>10.4g} "
                     f"{str(run['constraint_met']):>5} {str(run['steps_to_target']):>10} "
                     f"{str(run['steps_to_settle']):>10}")
    lines.append(f"Wrote {out}/rd.json, rd.png, multipliers.png, reconstructions.png "
                 f"(figures in {result['figures_seconds']:.1f} s).")
    return "\n".join(lines)
