"""Training curves of a run directory as one figure, `OUT/curves.png`: the batch rate and
distortion (with the target), the multiplier, and the held-out numbers at each evaluation.

Training rewrites it at each held-out evaluation and at the end; `python -m progvae plot
--run=OUT` draws it for any run, finished or not.
"""

from __future__ import annotations

from pathlib import Path

from progvae.core.atomic import atomic_path, writable_output
from progvae.core.errors import UserError
from progvae.core.untrusted import read_json, read_json_lines
from progvae.runs.directory import recorded_kind

CURVES = "curves.png"


def _panels(config: dict, train: list[dict], heldout: list[dict]) -> list[dict]:
    """What to draw: one panel per quantity the run logged."""
    constrained = recorded_kind(config) == "stage1"   # the other kinds have no target
    target = (config.get("distortion_target") or None) if constrained else None
    rate_target = (config.get("rate_target") or None) if constrained else None
    candidates = [
        ("rate", "rate (nats/dim)", "rate", rate_target if config.get("controller") == "rate"
         else None),
        ("distortion", "distortion (MSE/dim)", "mse", target
         if config.get("controller", "lagrangian") != "rate" else None),
        ("elbo", "ELBO (nats/dim)", "elbo", None),
        ("nll", "nll (nats/dim)", "nll", None),
        ("multiplier", "multiplier", None, None),
        ("grad_norm", "gradient norm", None, None),
    ]
    panels = []
    for key, title, heldout_key, line in candidates:
        points = [(entry["step"], entry[key]) for entry in train
                  if isinstance(entry.get(key), (int, float))]
        held = [(entry["step"], entry[heldout_key]) for entry in heldout
                if heldout_key and isinstance(entry.get(heldout_key), (int, float))]
        if points or held:
            panels.append({"title": title, "train": points, "heldout": held, "target": line})
    return panels


def write_curves(run: str | Path, out: str | Path | None = None,
                 final: dict | None = None) -> Path:
    """Draw the run's curves to `out` (default RUN/curves.png); `final` adds the end-of-training
    held-out numbers (summary.json's) as the last held-out points. Returns the path."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise UserError(f"'{run}' has no metrics.jsonl; pass the --out of a training run.")
    config_path = run / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    train = read_json_lines(run / "metrics.jsonl")
    heldout = read_json_lines(run / "heldout.jsonl")
    if final is not None and train:
        heldout = heldout + [{"step": train[-1]["step"], **final}]
    panels = _panels(config, train, heldout)
    if not panels:
        raise UserError(f"'{run / 'metrics.jsonl'}' holds no readable line with a step yet: a run "
                        "logs one every log_every steps (if it had, the file is damaged; "
                        "restore it).")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        if panel["train"]:
            axis.plot(*zip(*panel["train"]), lw=1, label="batch (live weights)")
        if panel["heldout"]:
            axis.plot(*zip(*panel["heldout"]), "o-", ms=3, label="held-out (EMA weights)")
        if panel["target"]:
            axis.axhline(panel["target"], color="k", ls="--", lw=1, label="target")
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        values = [value for _, value in panel["train"] + panel["heldout"]]
        if panel["target"]:
            values.append(panel["target"])
        if min(values) > 0 and max(values) > 20 * min(values):   # spans decades: log scale
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"{recorded_kind(config) or 'run'} '{run.name}' on {config.get('data', '?')}",
                    fontsize=11)
    # fixed margins: tight_layout would cost more than drawing the figure
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.86 if rows == 1 else 0.9,
                           wspace=0.3, hspace=0.45)
    out = Path(out) if out else run / CURVES
    with atomic_path(out) as temporary, open(temporary, "wb") as stream:
        figure.savefig(stream, format="png", dpi=90)
    return out


def plot_run(run: str | Path, out: str | Path = "") -> Path:
    """`progvae plot`: the curves of the run directory `run` to `out` (default RUN/curves.png),
    with the end-of-training held-out numbers once it has finished; returns the path."""
    from progvae.runs.load import run_summary

    if not run:
        raise UserError("Pass --run=RUN, the directory of a training run.")
    if not Path(str(run)).is_dir():
        raise UserError(f"Run directory '{run}' does not exist; pass the --out of a training "
                        "run.")
    target = writable_output(out or Path(str(run)) / CURVES, "--out", ".png")
    return write_curves(run, target, final=run_summary(run) or None)
