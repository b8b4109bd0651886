"""Stage two, the pipeline and the joint baseline, on a very small digits model."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from progvae.core.config import load_config
from progvae.models.pipeline import Pipeline
from progvae.runs.directory import prepare_run
from progvae.runs.kinds import KINDS
from progvae.runs.load import load_model, load_pipeline
from progvae.stages.joint import train_joint
from progvae.stages.stage1 import train_stage1
from progvae.stages.stage2 import CompositeObjective, train_stage2
from progvae.training.trainer import Trainer

SMALL = {"width": 8, "zdim": 4, "n_mixtures": 3, "enc_blocks": "16d2,8d2,4d4,1x1",
         "dec_blocks": "1x1,4m1,8m4,16m8", "log_every": 1, "checkpoint_every": 0, "n_grid": 4,
         "steps": 3, "batch_size": 8}


def small_config(**extra):
    return load_config("digits", {**SMALL, **extra})


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s1") / "stage1"
    train_stage1(small_config(), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def stage2_run(stage1_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s2") / "stage2"
    train_stage2(small_config(), stage1_run, out, quiet=True)
    return out


def test_conditional_model_shapes():
    config = small_config(image_channels=1)
    model = KINDS["stage2"].build(config)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = model(x, condition_image=x)
    assert out["output"].shape == (2, model.head.proj.out_channels, 16, 16)
    assert out["rate"].shape == (2,)
    assert model.encoder.in_conv.in_channels == 2          # sees [x, x_tilde]
    assert model.condition_encoder.in_conv.in_channels == 1  # sees x_tilde alone


def test_joint_has_exactly_the_two_stage_parameters():
    config = small_config(image_channels=1)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(KINDS["joint"].build(config)) == \
        count(KINDS["stage1"].build(config)) + count(KINDS["stage2"].build(config))


def test_composite_elbo_matches_a_monte_carlo_estimate_from_log_densities():
    """Independent of how composite_terms adds its parts: the ELBO with analytic KLs equals, on
    average over latent draws, log p(x | z, z_tilde) + log p(z) + log p(z_tilde | x_tilde)
    - log q(z | x) - log q(z_tilde | x, x_tilde) evaluated at the drawn latents from the
    densities the two stages return (a Monte Carlo estimate of the same expectation)."""
    from progvae.runs.kinds import pipeline_log_weight

    config = small_config(image_channels=1)
    torch.manual_seed(0)
    pipeline = Pipeline(KINDS["stage1"].build(config), KINDS["stage2"].build(config)).eval()
    x = (torch.randint(0, 256, (2, 1, 16, 16)) / 127.5 - 1).repeat(256, 1, 1, 1)
    with torch.no_grad():
        analytic = pipeline.elbo(x).double()                     # (B,) nats/dim
        sampled = pipeline_log_weight(pipeline, x) / (16 * 16)   # one draw per row
    for image in range(2):
        rows = slice(image, None, 2)
        difference = sampled[rows] - analytic[rows]
        standard_error = float(difference.std()) / math.sqrt(len(difference))
        assert abs(float(difference.mean())) < 4 * standard_error + 1e-4
    assert float(analytic.mean()) < 0


def test_gradients_reach_stage_one_in_joint_training_and_never_in_stage_two():
    config = small_config(image_channels=1)
    torch.manual_seed(0)
    pipeline = KINDS["joint"].build(config)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    CompositeObjective()(pipeline, x)["loss"].backward()     # joint: end to end through x_tilde
    reached = [p.grad is not None and bool(p.grad.abs().sum() > 0)
               for p in pipeline.stage1.decoder.parameters()]
    assert sum(reached) > len(reached) // 2        # the decoder that makes x_tilde learns
    assert pipeline.stage1.head.proj.weight.grad.abs().sum() > 0
    pipeline.zero_grad(set_to_none=True)
    frozen = pipeline.stage1.eval().requires_grad_(False)
    CompositeObjective(frozen)(pipeline.stage2, x)["loss"].backward()   # two-stage
    assert all(p.grad is None for p in frozen.parameters())
    assert any(p.grad is not None for p in pipeline.stage2.parameters())


def test_stage_one_is_bit_identical_after_stage_two_steps(stage1_run, tmp_path):
    _, stage1, _ = load_model(stage1_run)
    before = copy.deepcopy(stage1.state_dict())
    prepared = prepare_run(small_config(steps=4), tmp_path / "s2", "stage2")
    config, data, out = prepared.config, prepared.data, prepared.run_dir
    model = KINDS["stage2"].build(config)
    trainer = Trainer(model, CompositeObjective(stage1), config, data, out, "stage2", quiet=True)
    trainer.fit()
    optimised = {id(p) for p in trainer.parameters}   # views of the one buffer Adam steps
    flat = trainer.flat.values.untyped_storage().data_ptr()
    assert not any(id(p) in optimised or p.untyped_storage().data_ptr() == flat
                   for p in stage1.parameters())
    assert not stage1.training
    for name, value in stage1.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trainer.skipped < 4


def test_stage2_run_and_pipeline(stage2_run):
    pipeline = load_pipeline(stage2_run)
    assert isinstance(pipeline, Pipeline)
    torch.manual_seed(3)
    first = pipeline.sample(4)
    torch.manual_seed(3)
    again = pipeline.sample(4)
    assert torch.equal(first, again)                               # reproducible under a seed
    assert first.shape == (4, 1, 16, 16) and first.min() >= -1 and first.max() <= 1
    levels = (first + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)     # on the 256-level grid
    x = first
    x_tilde, final = pipeline.reconstruct_by_stage(x)
    assert x_tilde.shape == final.shape == x.shape
    assert pipeline.elbo(x).shape == (4,) and bool((pipeline.elbo(x) < 0).all())
    for name in ("summary.json", "samples.png", "reconstructions.png", "checkpoint.pt"):
        assert (stage2_run / name).is_file()


def test_pixel_temperature_reaches_only_the_dmol_draw(stage2_run):
    """pixel_temperature=0 keeps the latents' draw (same seed, same z and z_tilde) and puts each
    pixel at the DMoL's most probable value, as the demo's samples.png shows them."""
    pipeline = load_pipeline(stage2_run)
    torch.manual_seed(3)
    modes = pipeline.sample(4, pixel_temperature=0.0)
    torch.manual_seed(3)
    with torch.no_grad():
        x_tilde = pipeline.stage1.head.mean(pipeline.stage1.decode(n=4, temperature=1.0))
        params = pipeline.stage2.decode(temperature=1.0, condition_image=x_tilde)
    assert torch.equal(modes, pipeline.stage2.head.sample(params, 0.0))
    torch.manual_seed(3)
    assert not torch.equal(modes, pipeline.sample(4))               # pixels drawn at 1


def test_joint_trains_and_samples(tmp_path):
    summary = train_joint(small_config(), tmp_path / "joint", quiet=True)
    assert summary["elbo"] < 0 and summary["steps"] == 3
    pipeline = load_pipeline(tmp_path / "joint")
    assert pipeline.sample(2).shape == (2, 1, 16, 16)


def progvae(*args):
    return subprocess.run([sys.executable, "-m", "progvae", *args], capture_output=True,
                          text=True, timeout=300)


def test_sample_command_on_a_stage_two_run_with_npz(stage2_run, tmp_path):
    import numpy as np

    result = progvae("sample", f"--run={stage2_run}", "--n=6", f"--out={tmp_path / 'g.png'}",
                     f"--npz={tmp_path / 's.npz'}", "--seed=1")
    assert result.returncode == 0, result.stderr
    images = np.load(tmp_path / "s.npz")["samples"]
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8


def _error_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return result.stderr.strip()


def test_stage2_bad_input(stage1_run, tmp_path):
    # a stage-one run whose images differ from the data
    message = _error_line(progvae("stage2", f"--stage1={stage1_run}", "--data=patches",
                                  "--image_size=16", f"--out={tmp_path / 'a'}"))
    assert "channel" in message and not (tmp_path / "a").exists()
    # a stage-one directory whose training has not finished
    unfinished = tmp_path / "unfinished"
    train_stage1(small_config(steps=2), unfinished, quiet=True)
    config_path = unfinished / "config.json"
    config_path.write_text(config_path.read_text().replace('"steps": 2', '"steps": 50'))
    assert "finish it first" in _error_line(
        progvae("stage2", f"--stage1={unfinished}", f"--out={tmp_path / 'b'}"))
    # a directory without a checkpoint
    (tmp_path / "empty").mkdir()
    assert "checkpoint" in _error_line(
        progvae("stage2", f"--stage1={tmp_path / 'empty'}", f"--out={tmp_path / 'c'}"))


def test_sample_on_a_run_of_unknown_kind(stage1_run, tmp_path):
    import shutil

    strange = tmp_path / "strange"
    shutil.copytree(stage1_run, strange)
    state = torch.load(strange / "checkpoint.pt", weights_only=True)
    state["kind"] = "mystery"
    torch.save(state, strange / "checkpoint.pt")
    assert "unknown kind" in _error_line(
        progvae("sample", f"--run={strange}", f"--out={tmp_path / 'x.png'}"))


def _state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _log(out: Path) -> list[dict]:
    import json

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key != "time"} for line in lines]


@pytest.mark.parametrize("kind", ["stage2", "joint", "vdvae"])
def test_a_run_continued_from_its_checkpoint_equals_an_uninterrupted_one(kind, stage1_run,
                                                                           tmp_path):
    """Stopped after 3 of 6 steps and continued by the same command: the weights, EMA,
    optimizer state and log equal those of a run that went straight through."""
    from progvae.stages.vdvae import train_vdvae

    def train(out: Path, steps: int) -> dict:
        config = small_config(steps=steps)
        if kind == "stage2":
            return train_stage2(config, stage1_run, out, quiet=True)
        return (train_joint if kind == "joint" else train_vdvae)(config, out, quiet=True)

    straight = train(tmp_path / "straight", 6)
    train(tmp_path / "split", 3)
    continued = train(tmp_path / "split", 6)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert str(a["optimizer"]) == str(b["optimizer"])
    assert _log(tmp_path / "straight") == _log(tmp_path / "split")
    assert straight["elbo"] == continued["elbo"]


def test_stage_two_records_its_stage_one_and_refuses_to_continue_on_a_changed_one(tmp_path):
    """Continuing a stage-one run after stage two started on it would change what a resumed
    stage two models: refused in one sentence naming both steps, nothing written."""
    stage1_dir, stage2_dir = tmp_path / "s1", tmp_path / "s2"
    train_stage1(small_config(steps=2), stage1_dir, quiet=True)
    train_stage2(small_config(steps=2), stage1_dir, stage2_dir, quiet=True)
    import hashlib
    import json

    recorded = json.loads((stage2_dir / "config.json").read_text())
    assert recorded["stage1_step"] == 2
    assert recorded["stage1_sha256"] == hashlib.sha256(
        (stage1_dir / "checkpoint.pt").read_bytes()).hexdigest()
    train_stage1(small_config(steps=3), stage1_dir, quiet=True)       # stage one trained on
    before = {p.name: p.read_bytes() for p in stage2_dir.iterdir() if p.is_file()}
    message = _error_line(progvae("stage2", f"--stage1={stage1_dir}", f"--out={stage2_dir}",
                                  "--steps=4"))
    assert "stage-one run changed" in message and "step 2 and is now at step 3" in message
    assert {p.name: p.read_bytes() for p in stage2_dir.iterdir() if p.is_file()} == before


def test_stage_two_warns_when_its_stage_one_missed_the_target(tmp_path, capsys):
    stage1_dir = tmp_path / "s1"
    train_stage1(small_config(steps=2, distortion_target=1e-6), stage1_dir, quiet=True)
    capsys.readouterr()
    train_stage2(small_config(steps=1), stage1_dir, tmp_path / "s2", quiet=True)
    warning = capsys.readouterr().err
    assert f"WARNING: stage one ({stage1_dir}): its distortion target 1e-06 MSE/dim was not met" \
        in warning.replace("\n", " ")
