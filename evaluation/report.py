"""`progvae report`: one Markdown page comparing runs side by side.

For each run directory it reads config.json, summary.json and, where `progvae evaluate` has
been run, eval.json (which wins where both describe the same step). It writes OUT/report.md:

- a table of every run: kind, data, steps, training time, ELBO, bits/dim, FID / fid_digits
  (with the sample count), LPIPS, rates and MSE;
- paper 003 Table 2's shape (conventional `joint` vs two-stage `stage2`: ELBO and FID) when
  both kinds are among the runs;
- Table 1 of every progressive-coding experiment folder given (`progvae progressive --out`);
- each run's image grids, linked and shown;
- with `sweep=DIR`: LPIPS against MSE across a distortion sweep's stage-one runs (Fig. 4),
  as lpips_mse.json and lpips_mse.png (needs the LPIPS AlexNet weights).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from progvae.core.atomic import atomic_path, atomic_write_json, atomic_write_text, writable_output
from progvae.core.errors import UserError
from progvae.core.untrusted import read_json, read_text
from progvae.evaluation.metrics.evaluate import read_eval
from progvae.runs.curves import write_curves
from progvae.runs.directory import recorded_kind
from progvae.runs.kinds import KINDS
from progvae.runs.load import run_summary

IMAGES = ("samples.png", "reconstructions.png", "rd.png", "multipliers.png")
EXPERIMENT = "progressive experiment"   # a folder of the progressive experiment, not a run


def read_run(path: Path) -> dict:
    """What the report shows of one run directory (or progressive-experiment folder)."""
    if (path / "table.json").is_file() and not (path / "config.json").is_file():
        return {"path": path, "kind": EXPERIMENT,
                "table": read_json(path / "table.json"),
                "table_md": read_text(path / "table.md") if (path / "table.md").is_file()
                else ""}
    if not (path / "config.json").is_file():
        raise UserError(f"'{path}' holds no config.json (nor a progressive table.json); pass "
                        "run directories written by progvae.")
    config = read_json(path / "config.json")
    summary = run_summary(path)
    evaluated = read_eval(path / "eval.json") if (path / "eval.json").is_file() else {}
    values = dict(summary)
    if evaluated and evaluated.get("step") == summary.get("steps", evaluated.get("step")):
        values.update(evaluated)
    return {"path": path, "kind": recorded_kind(config) or "?", "data": config.get("data"),
            "values": values, "evaluated": bool(evaluated)}


def _role(run: dict) -> str | None:
    kind = KINDS.get(run["kind"])
    return kind.table2_role if kind else None


def _label(run: dict) -> str:
    kind = KINDS.get(run["kind"])
    return kind.label if kind else run["kind"]


def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def runs_table(runs: list[dict]) -> list[str]:
    lines = ["| run | kind | data | steps | train s | ELBO | bits/dim | FID | fid_digits | "
             "LPIPS | rate | stage-1 rate | MSE | target met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    for run in runs:
        v = run["values"]
        n = v.get("fid_n_samples")
        fid = lambda key: (f"{_number(v.get(key), 2)} (n={n})"  # noqa: E731
                           if v.get(key) is not None else "–")
        mse = v.get("mse", v.get("distortion"))
        lines.append(
            f"| {run['path'].name} | {run['kind']} | {run['data']} | {_number(v.get('steps'))} "
            f"| {_number(v.get('train_seconds'), 0)} | {_number(v.get('elbo'))} "
            f"| {_number(v.get('bpd'))} | {fid('fid')} | {fid('fid_digits')} "
            f"| {_number(v.get('lpips'))} | {_number(v.get('rate'))} "
            f"| {_number(v.get('stage1_rate'))} | {_number(mse, 5)} "
            f"| {_met(v.get('constraint_met'))} |")
    return lines


def _met(value) -> str:
    """constraint_met as the table shows it (– for runs without a target)."""
    return "–" if value is None else ("yes" if value else "**no**")


def table2(runs: list[dict]) -> list[str]:
    """Paper 003 Table 2's shape for the first joint and the first stage2 run."""
    joint = next((run for run in runs if _role(run) == "conventional"), None)
    two_stage = next((run for run in runs if _role(run) == "two-stage"), None)
    if joint is None or two_stage is None:
        return []
    fid_key = next((key for key in ("fid", "fid_digits")
                    if joint["values"].get(key) is not None
                    and two_stage["values"].get(key) is not None), None)
    header = fid_key or "FID"
    cells = lambda run: (f"{_number(run['values'].get('elbo'))} | "  # noqa: E731
                         f"{_number(run['values'].get(fid_key), 2) if fid_key else '–'}")
    return ["## Conventional vs progressive coding (the shape of paper 003 Table 2)", "",
            f"| data | conventional ELBO | conventional {header} | progressive ELBO | "
            f"progressive {header} |", "| --- | --- | --- | --- | --- |",
            f"| {joint['data']} | {cells(joint)} | {cells(two_stage)} |", "",
            f"Conventional: `{joint['path'].name}` ({_number(joint['values'].get('steps'))} "
            f"steps); progressive: `{two_stage['path'].name}` "
            f"({_number(two_stage['values'].get('steps'))} stage-two steps). ELBO in nats per "
            "dimension on the held-out split.", ""]


def _link(target: Path, out: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()


def write_report(run_paths: list[str], out: str | Path, sweep: str = "",
                 lpips_weights: str = "") -> Path:
    """Write OUT/report.md (and the sweep figure if asked); returns the report's path."""
    if not run_paths and not sweep:
        raise UserError("Pass --runs=RUN,RUN,... (run directories) and/or --sweep=DIR.")
    if not out:
        raise UserError("Pass --out=DIR, the folder for report.md.")
    for path in run_paths:
        if not Path(path).is_dir():
            raise UserError(f"Run directory '{path}' does not exist; pass the --out of a run.")
    out = Path(str(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out='{out}' is a file; pass a folder for report.md.")
    writable_output(out / "report.md", "--out")
    entries = [read_run(Path(path)) for path in run_paths]
    sweep_rows = lpips_against_mse(Path(sweep), lpips_weights) if sweep else None
    out.mkdir(parents=True, exist_ok=True)

    runs = [entry for entry in entries if entry["kind"] != EXPERIMENT]
    experiments = [entry for entry in entries if entry["kind"] == EXPERIMENT]
    lines = ["# progvae report", ""]
    if runs:
        lines += ["## Runs", "", *runs_table(runs), "",
                  "ELBO and rates in nats per dimension, MSE per dimension on the [-1, 1] scale, "
                  "all on the held-out split; FID with its sample count. Values come from "
                  "eval.json where `progvae evaluate` was run, else from summary.json. "
                  "fid_digits uses digit-classifier features and is not comparable with FID.",
                  ""]
        missing = [run["path"].name for run in runs if not run["evaluated"]]
        if missing:
            lines += [f"Not yet evaluated (no FID/LPIPS): {', '.join(missing)} — run "
                      "`python -m progvae evaluate --run=RUN`.", ""]
        lines += table2(runs)
    for experiment in experiments:
        lines += [f"## Progressive coding: `{experiment['path'].name}` (the shape of paper 003 "
                  "Table 1)", "", experiment["table_md"]]
        figure = experiment["path"] / "reconstructions.png"
        if figure.is_file():
            lines += [f"![originals / conventional / gamma-optimal]({_link(figure, out)})", ""]
    if sweep_rows is not None:
        lines += ["## LPIPS against MSE across the sweep (paper 003 Fig. 4)", "",
                  "| run | MSE | LPIPS | rate |", "| --- | --- | --- | --- |"]
        lines += [f"| {row['run']} | {row['mse']:.5f} | {row['lpips']:.4f} | {row['rate']:.4f} |"
                  for row in sweep_rows]
        lines += ["", f"![LPIPS against MSE]({_link(Path(sweep) / 'lpips_mse.png', out)})", ""]
    for run in runs:
        images = [run["path"] / name for name in IMAGES if (run["path"] / name).is_file()]
        if (run["path"] / "metrics.jsonl").is_file():   # its training curves, drawn here
            try:
                images.insert(0, write_curves(run["path"],
                                              out / f"{run['path'].name}_curves.png",
                                              final=run["values"] or None))
            except UserError:   # nothing logged yet
                pass
        if images:
            lines += [f"### {run['path'].name} ({_label(run)})", ""]
            lines += [f"[{image.name}]({_link(image, out)})  \n"
                      f"![{image.name}]({_link(image, out)})" for image in images]
            lines.append("")
    path = out / "report.md"
    atomic_write_text("\n".join(lines), path)
    return path


def lpips_against_mse(sweep: Path, lpips_weights: str = "") -> list[dict]:
    """Held-out MSE, LPIPS and rate of every stage-one run of a sweep (its target_* folders),
    written as lpips_mse.json and plotted as lpips_mse.png inside the sweep folder."""
    import torch

    from progvae.data.loading import load_data_for, to_model_input
    from progvae.evaluation.metrics.evaluate import mean_lpips, reconstructions
    from progvae.evaluation.metrics.lpips_metric import LpipsScorer
    from progvae.runs.heldout import seeded
    from progvae.runs.load import load_scored
    from progvae.training.dist import default_device

    run_dirs = sorted(path for path in sweep.glob("target_*") if path.is_dir())
    if not run_dirs:
        raise UserError(f"'{sweep}' holds no target_* runs; pass the --out of a sweep.")
    device = default_device()
    scorer = LpipsScorer(lpips_weights or None, device)
    rows = []
    for run_dir in run_dirs:
        config, model, info = load_scored(run_dir, device)
        data = load_data_for(config)
        with seeded(config.seed, device):
            reconstructed, _ = reconstructions(info["kind"], model, data.test,
                                               config.eval_batch_size)
        originals = to_model_input(torch.from_numpy(data.test))
        summary = run_summary(run_dir)
        rows.append({"run": run_dir.name, "target": summary.get("target"),
                     "mse": float((reconstructed - originals).pow(2).mean()),
                     "lpips": mean_lpips(scorer, originals, reconstructed,
                                         config.eval_batch_size),
                     "rate": summary.get("rate")})
    atomic_write_json({"runs": rows}, sweep / "lpips_mse.json")
    plot_lpips_against_mse(rows, sweep / "lpips_mse.png")
    return rows


def plot_lpips_against_mse(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.8), layout="constrained")
    axes = figure.subplots()
    rows = sorted(rows, key=lambda row: row["mse"])
    axes.plot([row["mse"] for row in rows], [row["lpips"] for row in rows], "o-")
    for row in rows:
        axes.annotate(row["run"].removeprefix("target_"), (row["mse"], row["lpips"]),
                      fontsize=8, xytext=(4, 4), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("MSE per dimension ([-1, 1] scale), held-out")
    axes.set_ylabel("LPIPS (AlexNet), held-out")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
