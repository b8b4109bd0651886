"""`python -m progvae sweep`: one run per target, the R-D report and figures, finished targets
skipped, unfinished ones continued, bad input refused in one sentence."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from progvae.__main__ import main
from progvae.core.errors import UserError
from progvae.evaluation.experiments.sweep import parse_targets

# A tiny model and a few steps: the sweep's bookkeeping is under test, not the R-D curve.
QUICK = ["--config=digits", "--width=8", "--zdim=4", "--enc_blocks=16d2,8d2,4d4,1x1",
         "--dec_blocks=1x1,4m1,8m4,16m8", "--log_every=5", "--checkpoint_every=0",
         "--n_grid=4", "--num_threads=1"]


def sweep(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "progvae", "sweep", *QUICK, f"--out={out}",
                           *args], capture_output=True, text=True, timeout=600, env=env)


def test_targets_as_fire_hands_them_over():
    assert parse_targets(0.05) == [0.05]
    assert parse_targets((0.0256, 0.0512)) == [0.0512, 0.0256]     # loosest first
    assert parse_targets("0.01, 0.02,0.01") == [0.02, 0.01]
    for bad in (None, "", (), "0.1,abc", (0.1, -0.2), 0):
        with pytest.raises(UserError):
            parse_targets(bad)


def test_a_sweep_writes_its_report_skips_finished_targets_and_continues_unfinished_ones(tmp_path):
    out = tmp_path / "sweep"
    args = ["--targets=0.08,0.04", "--steps=10", "--controller=dco", "--checkpoint_every=5"]
    # killed (SIGKILL) at update 7 of the first target, two past its checkpoint at 5
    killed = sweep(out, *args, env={**os.environ, "PROGVAE_TEST_KILL_AT": "7"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "target_0.08" / "summary.json").exists()
    assert not (out / "target_0.04").exists()

    first = sweep(out, *args)   # the same command again continues the killed target
    assert first.returncode == 0, first.stderr
    assert "Resuming stage1 from step 5 of 10" in first.stdout
    logged = [json.loads(line)["step"] for line in
              (out / "target_0.08" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [5, 10]                 # each step once, the killed one's lines replaced
    report = json.loads((out / "rd.json").read_text())
    assert report["controller"] == "dco" and report["target_field"] == "distortion_target"
    assert [run["target"] for run in report["runs"]] == [0.08, 0.04]
    for run in report["runs"]:
        assert {"distortion", "psnr", "rate", "multiplier", "constraint_met",
                "steps_to_target", "steps_to_settle"} <= set(run)
        summary = json.loads((out / run["run"] / "summary.json").read_text())
        assert summary["target"] == run["target"] and summary["controller"] == "dco"
        assert run["distortion"] == summary["mse"] and run["rate"] == summary["rate"]
    for name in ("rd.png", "multipliers.png"):
        assert iio.imread(out / name).ndim == 3
    # an originals row and a row per target, each image enlarged to at least 64 pixels
    assert iio.imread(out / "reconstructions.png").shape[0] >= 3 * 64
    assert "0.08" in first.stdout and "0.04" in first.stdout

    finished = {target: (out / f"target_{target}" / "summary.json").stat().st_mtime_ns
                for target in ("0.08", "0.04")}
    second = sweep(out, "--targets=0.02,0.04,0.08", "--steps=10", "--controller=dco")
    assert second.returncode == 0, second.stderr
    assert "distortion_target=0.08: finished" in second.stdout
    assert "distortion_target=0.04: finished" in second.stdout
    for target, mtime in finished.items():
        assert (out / f"target_{target}" / "summary.json").stat().st_mtime_ns == mtime
    report = json.loads((out / "rd.json").read_text())
    assert [run["target"] for run in report["runs"]] == [0.08, 0.04, 0.02]


@pytest.mark.parametrize("args, needle", [
    (["--targets=0.05", "--controller=gecko"], "Unknown controller 'gecko'"),
    (["--controller=geco"], "--targets"),
    (["--targets=0.05,-1"], "positive"),
    (["--targets=0.05", "--data=folder:/nonexistent"], "nonexistent"),
])
def test_bad_sweeps_fail_in_one_sentence_before_writing(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:      # the CLI in this process: no torch start-up
        main(["sweep", *QUICK, f"--out={tmp_path / 'sweep'}", *args])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("progvae: error:") and "\n" not in message, message
    assert needle in message
    assert not (tmp_path / "sweep").exists()
