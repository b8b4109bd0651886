"""Every command run end to end through the command line, on one tiny trained run of each kind
(shared by the whole module), with its output checked against independent computations."""

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from progvae.__main__ import main
from progvae.data.loading import load_data, to_model_input
from progvae.runs.load import load_model, load_scored

TINY = ["--config=digits", "--width=8", "--zdim=4", "--n_mixtures=3",
        "--enc_blocks=16d2,8d2,4d4,1x1", "--dec_blocks=1x1,4m1,8m4,16m8", "--steps=3",
        "--batch_size=8", "--log_every=1", "--checkpoint_every=0", "--n_grid=4",
        "--eval_batch_size=100", "--num_threads=1", "--quiet=True"]


def progvae(*args: str) -> subprocess.CompletedProcess:
    """The command line in this process (tests/test_cli.py runs it as a separate one): fire
    parses the same arguments, without a second interpreter's start-up each time."""
    threads = torch.get_num_threads()   # --num_threads must not leak into the other tests
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(list(args))
    except SystemExit as done:
        code = done.code or 0
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr.getvalue()
    return subprocess.CompletedProcess(["progvae", *args], code, stdout.getvalue(),
                                       stderr.getvalue())


STAGE1_CHECKPOINT: list[bytes] = []   # the stage-one checkpoint before stage two trained


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One run of every kind, each trained by its own command: stage1, stage2 (with --config
    left to default to the stage-one run's own), joint and vdvae."""
    root = tmp_path_factory.mktemp("commands")
    progvae("stage1", *TINY, "--distortion_target=0.05", f"--out={root / 'stage1'}")
    STAGE1_CHECKPOINT.append((root / "stage1" / "checkpoint.pt").read_bytes())
    progvae("stage2", f"--stage1={root / 'stage1'}", "--steps=2", "--quiet=True",
            f"--out={root / 'stage2'}")
    progvae("joint", *TINY, f"--out={root / 'joint'}")
    progvae("vdvae", *TINY, f"--out={root / 'vdvae'}")
    return {name: root / name for name in ("stage1", "stage2", "joint", "vdvae")}


def test_stage2_defaults_to_the_stage_one_runs_configuration(runs):
    first, second = read(runs["stage1"] / "config.json"), read(runs["stage2"] / "config.json")
    for name in ("width", "zdim", "enc_blocks", "dec_blocks", "data", "batch_size", "lr"):
        assert second[name] == first[name], name
    assert second["steps"] == 2 and second["kind"] == "stage2"
    assert Path(second["stage1"]) == runs["stage1"].resolve()


@pytest.mark.parametrize("kind", ["stage1", "stage2", "joint", "vdvae"])
def test_evaluate_agrees_exactly_with_the_summary_of_the_same_checkpoint(runs, kind):
    """One held-out evaluator: training's summary.json and evaluate's eval.json are the same
    numbers for the same weights."""
    progvae("evaluate", f"--run={runs[kind]}", "--metrics=elbo,mse", "--num_threads=1")
    summary, evaluated = read(runs[kind] / "summary.json"), read(runs[kind] / "eval.json")
    assert evaluated["kind"] == kind and evaluated["n_images"] == 297
    names = ["rate", "mse"] + (["elbo", "nll", "bpd"] if kind != "stage1" else [])
    for name in names:
        assert evaluated[name] == summary[name], name
    if kind == "stage1":
        assert summary["mse"] == evaluated["mse"]


def test_evaluated_mse_and_rates_match_an_independent_computation(runs):
    """The stage-one run's held-out MSE recomputed here with numpy from its reconstructions,
    and its rate as the sum of its per-group rates."""
    progvae("evaluate", f"--run={runs['stage1']}", "--metrics=elbo,mse", "--num_threads=1")
    evaluated = read(runs["stage1"] / "eval.json")
    _, model, _ = load_model(runs["stage1"])
    images = load_data("digits", 16).test
    torch.manual_seed(0)
    with torch.no_grad():
        squared = []
        for start in range(0, len(images), 100):
            x = to_model_input(torch.from_numpy(images[start:start + 100]))
            reconstruction = model.head.mean(model(x)["output"]).numpy().astype(np.float64)
            squared.append(((reconstruction - x.numpy()) ** 2).reshape(len(x), -1).mean(1))
    assert evaluated["mse"] == pytest.approx(float(np.concatenate(squared).mean()), rel=1e-6)
    assert sum(evaluated["group_rates"]) == pytest.approx(evaluated["rate"], rel=1e-6)
    assert evaluated["psnr"] == pytest.approx(10 * math.log10(4 / evaluated["mse"]))


def test_sample_grid_npz_seed_and_temperature(runs, tmp_path):
    def draw(name: str, *flags: str) -> np.ndarray:
        progvae("sample", f"--run={runs['stage2']}", "--n=5", f"--out={tmp_path / name}.png",
                f"--npz={tmp_path / name}.npz", *flags)
        return np.load(tmp_path / f"{name}.npz")["samples"]

    first = draw("a", "--seed=1")
    assert first.shape == (5, 16, 16, 1) and first.dtype == np.uint8
    # 5 images: 3 columns and 2 rows of 64-pixel cells (16 pixels enlarged 4x), 1-pixel gaps
    assert iio.imread(tmp_path / "a.png").shape[:2] == (2 * 65 + 1, 3 * 65 + 1)
    assert np.array_equal(draw("b", "--seed=1"), first)                 # --seed reproduces
    assert not np.array_equal(draw("c", "--seed=2"), first)
    assert not np.array_equal(draw("d", "--seed=1", "--temperature=0.3"), first)
    colder = draw("e", "--seed=1", "--temperature=0.3", "--stage1_temperature=1.0")
    assert not np.array_equal(colder, draw("d", "--seed=1", "--temperature=0.3"))
    assert not np.array_equal(draw("f", "--seed=1", "--pixel_temperature=0"), first)
    result = progvae("sample", f"--run={runs['stage2']}", "--n=2", f"--out={tmp_path / 'g.png'}",
                     "--pixel_temperature=0")
    assert "(latents at temperature 1, each pixel at its most probable value)" in result.stdout


@pytest.mark.parametrize("kind", ["stage1", "joint", "vdvae"])
def test_every_kind_samples_through_the_command_line(runs, kind, tmp_path):
    result = progvae("sample", f"--run={runs[kind]}", "--n=4", f"--out={tmp_path / 's.png'}",
                     f"--npz={tmp_path / 's.npz'}")
    assert f"Wrote 4 {kind} samples" in result.stdout
    assert np.load(tmp_path / "s.npz")["samples"].shape == (4, 16, 16, 1)


def test_progressive_then_report_end_to_end(runs, tmp_path):
    out = tmp_path / "progressive"
    result = progvae("progressive", f"--run={runs['vdvae']}", f"--out={out}", "--steps=2",
                     "--max_resolution=4", "--quiet=True", "--num_threads=1")
    table = read(out / "table.json")
    assert table["K"] == 2 and table["n_groups"] == 4      # the 1x1 and 4x4 groups
    # R_K is the first K entries of the VDVAE's per-group rates, as evaluate reports them
    progvae("evaluate", f"--run={runs['vdvae']}", "--metrics=elbo,mse", "--num_threads=1")
    group_rates = read(runs["vdvae"] / "eval.json")["group_rates"]
    assert table["R_K"] == pytest.approx(sum(group_rates[:2]), rel=1e-9)
    # D_K, R'_K and the lambda* bound are the held-out numbers of the two runs it trained,
    # which are ordinary run directories: evaluate and sample work on them
    decoder, gamma = out / "conventional_decoder", out / "gamma_optimal"
    assert table["D_K"] == read(decoder / "summary.json")["mse"]
    assert table["R_prime_K"] == read(gamma / "summary.json")["rate"]
    assert table["lambda_star_upper"] == read(gamma / "summary.json")["mse"]
    # the EMA spans at most 5% of a short run (2 steps: none, the final weights), and the
    # same for both decoders
    assert read(decoder / "config.json")["ema_rate"] == 0.0
    assert read(gamma / "config.json")["ema_rate"] == 0.0
    progvae("evaluate", f"--run={decoder}", "--metrics=mse", "--num_threads=1")
    assert read(decoder / "eval.json")["mse"] == table["D_K"]
    progvae("sample", f"--run={gamma}", "--n=4", f"--out={tmp_path / 'g.png'}")
    # the same command again finds both runs finished: it trains nothing, the table stands
    again = progvae("progressive", f"--run={runs['vdvae']}", f"--out={out}", "--steps=2",
                    "--max_resolution=4", "--quiet=True", "--num_threads=1")
    assert "Resuming progressive_decoder from step 2 of 2" in again.stdout
    assert "Resuming progressive_gamma from step 2 of 2" in again.stdout
    rerun = read(out / "table.json")
    assert {k: v for k, v in rerun.items() if "seconds" not in k} == \
        {k: v for k, v in table.items() if "seconds" not in k}
    assert f"{table['R_K']:.4f} | {table['D_K']:.4f}" in result.stdout

    for kind in ("stage2", "joint"):
        progvae("evaluate", f"--run={runs[kind]}", "--metrics=elbo,mse", "--num_threads=1")
    report_dir = tmp_path / "report"
    progvae("report", f"--runs={runs['stage2']},{runs['joint']},{runs['vdvae']},{out}",
            f"--out={report_dir}")
    text = (report_dir / "report.md").read_text()
    for kind in ("stage2", "joint", "vdvae"):
        elbo = read(runs[kind] / "eval.json")["elbo"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {kind} | {kind} |"))
        assert f"{elbo:.4f}" in row, row
    joint, two = (read(runs[kind] / "eval.json")["elbo"] for kind in ("joint", "stage2"))
    assert f"| digits | {joint:.4f} |" in text and f"| {two:.4f} |" in text   # Table 2
    assert f"{table['R_K']:.4f}" in text                                      # Table 1
    for kind in ("stage2", "joint", "vdvae"):                                 # their curves
        assert f"![{kind}_curves.png]({kind}_curves.png)" in text
        assert (report_dir / f"{kind}_curves.png").stat().st_size > 10_000
    assert "| target met |" in text


def test_plot_draws_any_runs_curves(runs, tmp_path):
    progvae("plot", f"--run={runs['stage1']}", f"--out={tmp_path / 'curves.png'}")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_stage_two_keeps_stage_one_frozen_and_scores_it_as_one_pipeline(runs):
    """The stage-one checkpoint is untouched by stage two's training, and the pipeline the
    stage-two run is scored with holds that stage one's weights."""
    assert (runs["stage1"] / "checkpoint.pt").read_bytes() == STAGE1_CHECKPOINT[0]
    _, stage1, _ = load_model(runs["stage1"])
    _, pipeline, info = load_scored(runs["stage2"])
    assert info["kind"].needs_stage1_run
    for name, value in stage1.state_dict().items():
        assert torch.equal(pipeline.stage1.state_dict()[name], value), name


@pytest.mark.parametrize("kind", ["stage1", "stage2", "joint", "vdvae"])
def test_an_exported_model_samples_and_evaluates_as_its_run_does(runs, kind, tmp_path):
    exported = tmp_path / f"{kind}.safetensors"
    progvae("export", f"--run={runs[kind]}", f"--out={exported}")
    assert exported.read_bytes()[8:9] == b"{"          # a safetensors header: JSON, no pickle
    progvae("evaluate", f"--run={exported}", "--metrics=elbo,mse", "--num_threads=1")
    summary, evaluated = read(runs[kind] / "summary.json"), read(tmp_path / f"{kind}.eval.json")
    for name in ["rate", "mse"] + (["elbo", "bpd"] if kind != "stage1" else []):
        assert evaluated[name] == summary[name], name
    for source, name in ((runs[kind], "run"), (exported, "file")):
        progvae("sample", f"--run={source}", "--n=3", "--seed=4",
                f"--out={tmp_path / name}.png", f"--npz={tmp_path / name}.npz")
    assert np.array_equal(np.load(tmp_path / "run.npz")["samples"],
                          np.load(tmp_path / "file.npz")["samples"])


def test_stage_two_trains_on_an_exported_stage_one(runs, tmp_path):
    exported = tmp_path / "stage1.safetensors"
    progvae("export", f"--run={runs['stage1']}", f"--out={exported}")
    progvae("stage2", f"--stage1={exported}", "--steps=1", "--quiet=True",
            f"--out={tmp_path / 'stage2'}")
    config = read(tmp_path / "stage2" / "config.json")
    assert config["width"] == 8 and Path(config["stage1"]) == exported.resolve()
    _, pipeline, _ = load_scored(tmp_path / "stage2")
    _, stage1, _ = load_model(runs["stage1"])
    assert all(torch.equal(pipeline.stage1.state_dict()[name], value)
               for name, value in stage1.state_dict().items())


def test_progressive_joins_the_process_group_before_it_chooses_a_device(runs, tmp_path,
                                                                         monkeypatch):
    """Under torchrun (here a group of one), a device chosen before joining the group would be
    GPU 0 on every rank: every device choice must come after the group exists."""
    import socket

    from progvae.evaluation.experiments import progressive
    from progvae.training import dist

    chosen_in_group = []
    choose = progressive.default_device
    monkeypatch.setattr(progressive, "default_device",
                        lambda: chosen_in_group.append(dist.is_distributed()) or choose())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        progressive.run_progressive(runs["vdvae"], tmp_path / "p", steps=1, max_resolution=4,
                                    quiet=True)
    finally:
        dist.cleanup()
    assert chosen_in_group and all(chosen_in_group)
