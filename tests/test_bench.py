"""`bench` reports every figure it promises (never a timing goal: those live in its output)."""

import json
import subprocess
import sys

import pytest


def test_bench_writes_every_figure_and_a_profile(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "progvae", "bench", "--config=digits", "--model=stage1",
         "--steps=2", "--warmup=1", "--profile=1", "--width=8", "--batch=4",
         "--dec_blocks=1x1,4m1,8m4,16m8", "--enc_blocks=16d2,8d2,4d4,1x1", f"--out={out}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    rates = written["train_images_per_s"]
    assert 0 < rates["min"] <= rates["median"] <= rates["max"]
    for key in ("flops_per_step", "measured_peak_tflops", "fraction_of_peak", "peak_memory_mb",
                "sample_images_per_s", "loader_images_per_s"):
        assert written[key] > 0, key
    assert "convolution" in written["profile"] and "images/s" in result.stdout


@pytest.mark.parametrize("flag", ["--model=gan", "--profile=-1"])
def test_bench_rejects_bad_input_in_one_sentence(flag):
    result = subprocess.run([sys.executable, "-m", "progvae", "bench", "--config=digits", flag],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("progvae: error:"), result.stderr
