"""The plain VDVAE trained by the ELBO with its DMoL head (`progvae vdvae`)."""

import json
import math

import pytest
import torch

from progvae.core.config import load_config
from progvae.runs.kinds import KINDS
from progvae.runs.load import load_model, load_scored
from progvae.stages.vdvae import ElboObjective, train_vdvae

SMALL = {"width": 8, "zdim": 4, "n_mixtures": 3, "enc_blocks": "16d2,8d2,4d4,1x1",
         "dec_blocks": "1x1,4m1,8m4,16m8", "log_every": 1, "checkpoint_every": 0, "n_grid": 4,
         "steps": 3, "batch_size": 8}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more torch threads only contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_objective_is_the_negative_elbo_per_dimension():
    config = load_config("digits", {**SMALL, "image_channels": 1})
    torch.manual_seed(0)
    model = KINDS["vdvae"].build(config)
    x = torch.randint(0, 256, (4, 1, 16, 16)).float() / 127.5 - 1
    torch.manual_seed(1)
    metrics = ElboObjective()(model, x)
    torch.manual_seed(1)   # the same latent draws, part by part
    out = model(x)
    nll = -model.head.log_prob(out["output"], x).flatten(1).sum(1) / (16 * 16)
    expected = (nll + torch.stack(out["kl"], 1).sum(1) / (16 * 16)).mean()
    assert torch.allclose(metrics["loss"], expected)
    assert torch.allclose(metrics["elbo"], -expected)


def test_a_short_run_writes_its_summary_and_samples(tmp_path):
    out = tmp_path / "vdvae"
    summary = train_vdvae(load_config("digits", SMALL), out, quiet=True)
    assert {"elbo", "bpd", "rate", "nll", "mse", "psnr", "steps", "train_seconds"} <= set(summary)
    assert summary["bpd"] == pytest.approx(-summary["elbo"] / math.log(2))
    assert summary["elbo"] == pytest.approx(-(summary["nll"] + summary["rate"]), rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["elbo"] == summary["elbo"]
    for name in ("samples.png", "reconstructions.png", "checkpoint.pt", "metrics.jsonl"):
        assert (out / name).is_file()
    _, model, info = load_model(out)
    assert info["kind"].name == "vdvae" and info["finished"]
    _, scored, info = load_scored(out)
    images = info["kind"].sample(scored, 3, 1.0, None, None)
    assert info["kind"].name == "vdvae" and images.shape == (3, 1, 16, 16)
    levels = (images + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)     # DMoL samples on the grid
