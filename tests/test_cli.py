"""The command line as a separate process: the run-directory contract, help, and bad input ending
the process with one sentence and exit status 2 (every known bad input: tests/test_bad_input.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

QUICK = ["--steps=2", "--log_every=1", "--checkpoint_every=0", "--n_grid=4", "--quiet=True"]


def progvae(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "progvae", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_one_sentence_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("progvae: error:") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def stage1(*args: str) -> subprocess.CompletedProcess:
    return progvae("stage1", "--config=digits", "--distortion_target=0.02", *QUICK, *args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny stage-one run that bad commands must leave exactly as it is."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = stage1(f"--out={out}")
    assert result.returncode == 0, result.stderr
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_short_run_writes_the_run_directory_contract(finished_run):
    names = set(snapshot(finished_run))
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json",
            "reconstructions.png", "samples.png"} <= names
    line = json.loads((finished_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "rate", "distortion", "multiplier", "grad_norm", "skipped",
            "lr"} <= set(line)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert {"rate", "mse", "psnr", "multiplier", "target"} <= set(summary)
    assert "distortion" not in summary   # the MSE is reported once, as mse


def test_sample_writes_a_grid(finished_run, tmp_path):
    out = tmp_path / "s.png"
    result = progvae("sample", f"--run={finished_run}", "--n=5", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert iio.imread(out).ndim >= 2


@pytest.mark.parametrize("command, own_process", [("stage1", True), ("stage2", False),
                                                  ("sweep", False)])
def test_help_shows_the_command_instead_of_reading_a_config_field(command, own_process,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("PAGER", "cat")
    if own_process:
        result = subprocess.run([sys.executable, "-m", "progvae", command, "--help"],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        shown = result.stdout + result.stderr   # fire writes help to stderr off a terminal
    else:
        from progvae.__main__ import main

        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert not done.value.code
        captured = capsys.readouterr()
        shown = captured.out + captured.err
    assert f"progvae {command}" in shown and "Unknown config field" not in shown
    # every config field, with its default, help and range
    assert "--ema_rate=0.9999" in shown and "used for evaluation and sampling" in shown
    assert "--steps=800000" in shown and "[>= 1]" in shown
    assert not any(tmp_path.iterdir())   # asking for help trains nothing


class _Payload:
    """A pickle that runs code when loaded: it would create the file named by `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["sample", "resume"])   # the rest: test_bad_input
def test_a_checkpoint_with_a_planted_payload_is_refused_and_never_runs(finished_run, tmp_path,
                                                                       command):
    import shutil

    import torch

    planted = tmp_path / "planted"
    shutil.copytree(finished_run, planted)
    marker = tmp_path / "payload-ran"
    state = torch.load(planted / "checkpoint.pt", weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, planted / "checkpoint.pt")
    before = snapshot(planted)
    arguments = {"sample": ["sample", f"--run={planted}", f"--out={tmp_path / 's.png'}"],
                 "evaluate": ["evaluate", f"--run={planted}", "--metrics=mse"],
                 "stage2": ["stage2", f"--stage1={planted}", f"--out={tmp_path / 's2'}"],
                 "resume": ["stage1", "--config=digits", "--distortion_target=0.02",
                            "--steps=4", "--quiet=True", f"--out={planted}"]}[command]
    result = progvae(*arguments)
    assert_one_sentence_error(result, "refuses to load", "never unpickles code")
    assert result.returncode == 2
    assert not marker.exists(), "the planted payload ran"
    assert snapshot(planted) == before


def test_a_checkpoint_of_the_previous_format_still_loads(finished_run, tmp_path):
    """Checkpoints written before the RNG states became tensors hold numpy's state as an array:
    loaded safely (numpy arrays only) and resumed."""
    import shutil

    import numpy as np
    import torch

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()
    del state["rng"]["per_rank"]          # nor were the generators kept per rank
    state["rng"]["cuda"] = None
    torch.save(state, old / "checkpoint.pt")
    result = progvae("stage1", "--config=digits", "--distortion_target=0.02", *QUICK[1:],
                     "--steps=3", f"--out={old}")
    assert result.returncode == 0, result.stderr
    assert torch.load(old / "checkpoint.pt", weights_only=True)["step"] == 3
