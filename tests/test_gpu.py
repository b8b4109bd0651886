"""The CUDA paths, run only on a GPU host with PROGVAE_TEST_GPU=1 (the default suite is pinned
to the CPU by conftest.py): `auto` switches on bf16, channels_last and compilation there, and a
short stage-one run and its resume must still work."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    os.environ.get("PROGVAE_TEST_GPU") != "1" or not torch.cuda.is_available(),
    reason="GPU checks run with PROGVAE_TEST_GPU=1 on a machine with CUDA")]

ARGS = ["stage1", "--config=digits", "--distortion_target=0.05", "--log_every=5",
        "--checkpoint_every=10", "--n_grid=4", "--quiet=True"]


def test_a_stage_one_run_on_cuda_trains_resumes_and_evaluates(tmp_path):
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "progvae", *ARGS, "--steps=20",
                            f"--out={out}"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "progvae", *ARGS, "--steps=30",
                            f"--out={out}"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "Resuming stage1 from step 20 of 30" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["mse"] < 1.0
    evaluated = subprocess.run([sys.executable, "-m", "progvae", "evaluate", f"--run={out}",
                                "--metrics=elbo,mse"], capture_output=True, text=True,
                               timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr
    # Another process may pick other cuDNN algorithms: the same MSE to float rounding (on the
    # H200, 0.6110077 against 0.6110121), where on the CPU it is the same bits.
    assert json.loads((out / "eval.json").read_text())["mse"] == pytest.approx(summary["mse"],
                                                                                rel=1e-4)


def test_a_cuda_update_never_waits_for_the_host(tmp_path):
    """The skip decision, Adam, the EMA and the multiplier all stay on the GPU: under CUDA's
    synchronisation debug mode set to "error", two updates (after the first, which creates
    Adam's state) make no synchronising call; their metrics wait, queued, for `collect`."""
    from progvae.core.config import load_config
    from progvae.data.loading import load_data_for
    from progvae.runs.kinds import KINDS
    from progvae.stages.stage1 import Stage1Objective
    from progvae.training.controllers import build_controller
    from progvae.training.trainer import Trainer

    config = load_config("digits", {"steps": 10, "compile": "false", "image_channels": 1,
                                    "distortion_target": 0.05, "tensorboard": False})
    trainer = Trainer(KINDS["stage1"].build(config), Stage1Objective(build_controller(config)),
                      config, load_data_for(config), tmp_path, "stage1", quiet=True)
    assert trainer.device.type == "cuda"
    trainer.train_step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.update()
        trainer.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(trainer.pending) == 2 and len(trainer.collect()) == 2
