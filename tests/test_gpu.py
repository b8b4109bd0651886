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
    assert summary["steps"] == 30 and summary["distortion"] < 1.0
    evaluated = subprocess.run([sys.executable, "-m", "progvae", "evaluate", f"--run={out}",
                                "--metrics=elbo,mse"], capture_output=True, text=True,
                               timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((out / "eval.json").read_text())["mse"] == summary["mse"]
