"""The command line on bad input: one sentence, a non-zero exit, no traceback, nothing lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imageio.v3 as iio

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
    assert {"rate", "distortion", "psnr", "multiplier", "target"} <= set(summary)


def test_sample_writes_a_grid(finished_run, tmp_path):
    out = tmp_path / "s.png"
    result = progvae("sample", f"--run={finished_run}", "--n=5", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert iio.imread(out).ndim >= 2


def test_missing_data_path(tmp_path):
    result = stage1(f"--out={tmp_path / 'o'}", f"--data=folder:{tmp_path / 'missing'}")
    assert_one_sentence_error(result, "missing")
    assert not (tmp_path / "o").exists()


def test_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    result = stage1(f"--out={tmp_path / 'o'}", f"--data=folder:{tmp_path / 'empty'}")
    assert_one_sentence_error(result, "empty")


def test_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        iio.imwrite(folder / f"ok{i}.png", np.zeros((16, 16), np.uint8))
    (folder / "broken.png").write_bytes(b"not a png at all")
    result = stage1(f"--out={tmp_path / 'o'}", f"--data=folder:{folder}")
    assert_one_sentence_error(result, "broken.png")


def test_images_of_the_wrong_size(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        iio.imwrite(folder / f"im{i}.png", np.zeros((20, 20), np.uint8))
    result = stage1(f"--out={tmp_path / 'o'}", f"--data=folder:{folder}")
    assert_one_sentence_error(result, "20", "16")


@pytest.mark.parametrize("flag, needle", [
    ("--steps=0", "'steps'"), ("--steps=-5", "'steps'"), ("--ema_rate=5", "'ema_rate'"),
    ("--log_every=0", "'log_every'"), ("--eval_batch_size=0", "'eval_batch_size'"),
    ("--n_grid=0", "'n_grid'"), ("--accumulate=0", "'accumulate'"), ("--width=0", "'width'"),
    ("--batch_size=0", "'batch_size'"), ("--precision=fp16", "'precision'")])
def test_values_out_of_range_are_refused_before_anything_is_written(finished_run, flag, needle):
    before = snapshot(finished_run)
    assert_one_sentence_error(stage1(f"--out={finished_run}", flag), needle)
    assert snapshot(finished_run) == before


def test_unknown_preset_and_field_and_bad_type(tmp_path, finished_run):
    before = snapshot(finished_run)
    assert_one_sentence_error(
        progvae("stage1", "--config=nosuch", f"--out={finished_run}"), "nosuch")
    assert_one_sentence_error(stage1(f"--out={finished_run}", "--wdith=3"), "wdith")
    assert_one_sentence_error(stage1(f"--out={finished_run}", "--steps=lots"), "steps")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("target", ["0", "-0.5"])
def test_non_positive_distortion_target(finished_run, target):
    before = snapshot(finished_run)
    result = progvae("stage1", "--config=digits", f"--distortion_target={target}",
                     f"--out={finished_run}", *QUICK)
    assert_one_sentence_error(result, "distortion")
    assert snapshot(finished_run) == before


def test_changed_architecture_on_an_existing_run(finished_run):
    before = snapshot(finished_run)
    assert_one_sentence_error(stage1(f"--out={finished_run}", "--width=16"), "width")
    assert snapshot(finished_run) == before


def test_sample_without_a_checkpoint(tmp_path):
    (tmp_path / "norun").mkdir()
    result = progvae("sample", f"--run={tmp_path / 'norun'}", f"--out={tmp_path / 'x.png'}")
    assert_one_sentence_error(result, "checkpoint")
    assert_one_sentence_error(
        progvae("sample", f"--run={tmp_path / 'nowhere'}", f"--out={tmp_path / 'x.png'}"),
        "nowhere")


@pytest.mark.parametrize("command", ["stage1", "stage2", "sweep"])
def test_help_shows_the_command_instead_of_reading_a_config_field(command, tmp_path):
    result = subprocess.run([sys.executable, "-m", "progvae", command, "--help"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PAGER": "cat"})
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr   # fire writes help to stderr when not on a terminal
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


@pytest.mark.parametrize("command", ["sample", "evaluate", "stage2", "resume"])
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


def test_a_truncated_checkpoint_is_one_sentence(finished_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(finished_run, broken)
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    assert_one_sentence_error(progvae("sample", f"--run={broken}", f"--out={tmp_path / 'x.png'}"),
                              "not a readable checkpoint")


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
    torch.save(state, old / "checkpoint.pt")
    result = progvae("stage1", "--config=digits", "--distortion_target=0.02", *QUICK[1:],
                     "--steps=3", f"--out={old}")
    assert result.returncode == 0, result.stderr
    assert torch.load(old / "checkpoint.pt", weights_only=True)["step"] == 3
