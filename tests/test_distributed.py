"""DDP on CPU (gloo, 2 processes under torchrun): equivalence, logging, elastic restart, timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

COMMON = ["--config=digits", "--distortion_target=0.02", "--num_threads=1", "--quiet=True",
          "--n_grid=4", "--multiplier_init=0.5", "--multiplier_lr=0.01", "--log_every=2"]


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """torchrun on one machine; --standalone lets it bind a free port itself (port 0), so no
    port is chosen here and released for another process to take first."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *extra, "-m", "progvae", *args]


SMALL_MODEL = ["--width=8", "--zdim=4", "--enc_blocks=16d2,8d2,4d4,1x1",
               "--dec_blocks=1x1,4m1,8m4,16m8", "--eval_batch_size=100"]


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("accumulate", [2])   # accumulate=1: the kinds' test below
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path, accumulate):
    """Also with gradient accumulation, where DDP skips the all-reduce (no_sync) on all but the
    last micro-step."""
    steps = ["--steps=8", "--checkpoint_every=0", f"--accumulate={accumulate}", *SMALL_MODEL]
    single = subprocess.run([sys.executable, "-m", "progvae", "stage1", *COMMON, *steps,
                             "--batch_size=16", f"--out={tmp_path / 'one'}"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(torchrun("stage1", *COMMON, *steps, "--batch_size=8",
                                     f"--out={tmp_path / 'two'}"),
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    worst = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert worst < 1e-5, f"parameters differ by {worst}"
    worst_ema = max((one["ema"][k] - two["ema"][k]).abs().max().item() for k in one["ema"])
    assert worst_ema < 1e-5
    multiplier_one = one["objective"]["controller"]["multiplier"]
    multiplier_two = two["objective"]["controller"]["multiplier"]
    assert multiplier_one != 0.5 and multiplier_one == pytest.approx(multiplier_two, abs=1e-6)
    # rank 0 alone logs: each step once, in order
    steps_logged = [json.loads(line)["step"]
                    for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [2, 4, 6, 8]
    assert double.stdout.count("Stage one, held-out split") == 1


TINY = ["--config=digits", "--width=8", "--zdim=4", "--n_mixtures=3",
        "--enc_blocks=16d2,8d2,4d4,1x1", "--dec_blocks=1x1,4m1,8m4,16m8", "--num_threads=1",
        "--quiet=True", "--n_grid=4", "--steps=4", "--checkpoint_every=0", "--log_every=2",
        "--eval_batch_size=100"]


def one_and_two_processes(tmp_path, kind: str, *flags: str) -> tuple[dict, dict]:
    single = subprocess.run([sys.executable, "-m", "progvae", kind, *TINY, *flags,
                             "--batch_size=16", f"--out={tmp_path / 'one'}"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(torchrun(kind, *TINY, *flags, "--batch_size=8",
                                     f"--out={tmp_path / 'two'}"),
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    return checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")


@pytest.mark.slow   # end to end, about 58 s on 2 cores: keeps the default suite under 6 min
@pytest.mark.parametrize("kind", ["vdvae", "joint", "stage2"])
def test_the_elbo_kinds_under_ddp_match_one_process(tmp_path, kind):
    flags = []
    if kind == "stage2":   # on a frozen stage one trained here, in one process
        stage1 = subprocess.run([sys.executable, "-m", "progvae", "stage1", *TINY,
                                 "--distortion_target=0.05", f"--out={tmp_path / 's1'}"],
                                capture_output=True, text=True, timeout=300)
        assert stage1.returncode == 0, stage1.stderr
        flags = [f"--stage1={tmp_path / 's1'}"]
    one, two = one_and_two_processes(tmp_path, kind, *flags)
    for key in ("model", "ema"):
        worst = max((one[key][k] - two[key][k]).abs().max().item() for k in one[key])
        assert worst < 1e-5, f"{key} differs by {worst}"
    assert two["skipped"] == 0


@pytest.mark.slow   # end to end, about 19 s on 2 cores: keeps the default suite under 6 min
def test_every_rank_skips_the_same_updates(tmp_path):
    """A skip threshold no gradient can stay under: both ranks skip every update together (a
    rank that stepped alone would leave the replicas apart or hang at the next collective)."""
    one, two = one_and_two_processes(tmp_path, "stage1", "--distortion_target=0.05",
                                     "--skip_threshold=1e-12")
    assert one["skipped"] == two["skipped"] == 4
    for name in one["model"]:
        assert torch.equal(one["model"][name], two["model"][name]), name
    assert one["objective"] == two["objective"]     # the multiplier never moved either


@pytest.mark.slow   # end to end, about 18 s on 2 cores: keeps the default suite under 6 min
def test_a_killed_worker_is_restarted_and_the_run_finishes(tmp_path):
    """Rank 1 is killed (SIGKILL) after update 12, two past the checkpoint at 10; torchrun
    restarts both workers, which resume from step 10 and finish."""
    out = tmp_path / "elastic"
    result = subprocess.run(
        torchrun("stage1", *COMMON, "--steps=20", "--checkpoint_every=5", "--batch_size=8",
                 f"--out={out}", extra=("--max-restarts=1",)),
        capture_output=True, text=True, timeout=400,
        env={**os.environ, "PROGVAE_TEST_KILL_AT": "12:1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "exitcode: -9" in output and "Resuming stage1 from step 10 of 20" in output
    assert checkpoint(out)["step"] == 20
    steps_logged = [json.loads(line)["step"]
                    for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(2, 21, 2))


@pytest.mark.slow
def test_a_rank_that_raises_ends_every_rank_with_its_message(tmp_path):
    """Rank 1 raises after update 3 (one past the checkpoint at 2): rank 0, waiting for it in
    the next collective, ends too (a hang would end in TimeoutExpired, failing the test), the
    error names what happened, and the checkpoint at step 2 is intact."""
    out = tmp_path / "raised"
    result = subprocess.run(
        torchrun("stage1", *COMMON, *SMALL_MODEL, "--steps=10", "--checkpoint_every=2",
                 f"--out={out}"),
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "PROGVAE_TEST_KILL_AT": "3:1", "PROGVAE_TEST_SIGNAL": "RAISE"})
    assert result.returncode != 0
    assert "injected failure after step 3 on rank 1" in result.stdout + result.stderr
    assert checkpoint(out)["step"] == 2


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes(tmp_path):
    """SIGTERM reaches rank 1 alone after update 3; the ranks learn it from update 4's
    all-reduce, so both stop after update 4 with a checkpoint there; the same command then
    finishes the run, logging every step once."""
    out = tmp_path / "signalled"
    command = torchrun("stage1", *COMMON, *SMALL_MODEL, "--steps=8", "--checkpoint_every=0",
                       "--log_every=1", f"--out={out}")
    stopped = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PROGVAE_TEST_KILL_AT": "3:1",
                                  "PROGVAE_TEST_SIGNAL": "TERM"})
    assert stopped.returncode != 0
    assert "stopped by SIGTERM at step 4 of 8" in stopped.stderr
    assert checkpoint(out)["step"] == 4
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert checkpoint(out)["step"] == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow   # end to end, about 8 s on 2 cores: keeps the default suite under 6 min
def test_a_missing_peer_ends_the_run_at_its_timeout_instead_of_hanging(tmp_path):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}   # the store binds a free port
    # a hang would end in subprocess's TimeoutExpired, failing the test
    result = subprocess.run([sys.executable, "-m", "progvae", "stage1", *COMMON, "--steps=2",
                             "--dist_timeout=5", f"--out={tmp_path / 'alone'}"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "process group" in result.stderr


def test_gather_rows_concatenates_uneven_shares_in_rank_order(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(
        "import sys, torch\n"
        "from progvae.training import dist\n"
        "dist.setup(60)\n"
        "first = 10 * dist.rank()\n"
        "rows = torch.arange(first, first + 3 + dist.rank()).double().unsqueeze(1).repeat(1, 2)\n"
        "gathered = dist.gather_rows(rows)\n"
        "assert dist.shard(7) == (slice(0, 3) if dist.rank() == 0 else slice(3, 7))\n"
        "if dist.is_main():\n"
        "    torch.save(gathered, sys.argv[1])\n"
        "dist.cleanup()\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script),
                             str(tmp_path / "gathered.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    gathered = torch.load(tmp_path / "gathered.pt")
    expected = torch.tensor([0, 1, 2, 10, 11, 12, 13], dtype=torch.float64)
    assert torch.equal(gathered, expected.unsqueeze(1).repeat(1, 2))


@pytest.mark.slow   # end to end, about 24 s on 2 cores: keeps the default suite under 6 min
def test_evaluate_under_torchrun_counts_every_image_once(tmp_path):
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "progvae", "stage1", *COMMON, "--steps=4",
                              "--checkpoint_every=0", "--batch_size=8", f"--out={run}"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    # the run is positional: torchrun's own parser would take --run=... for its --run-path
    flags = [str(run), "--metrics=elbo,mse,fid_digits", "--n_samples=64", "--num_threads=1"]
    single = subprocess.run([sys.executable, "-m", "progvae", "evaluate", *flags],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    one = json.loads((run / "eval.json").read_text())
    double = subprocess.run(torchrun("evaluate", *flags), capture_output=True, text=True,
                            timeout=300)
    assert double.returncode == 0, double.stderr
    two = json.loads((run / "eval.json").read_text())
    assert double.stdout.count("fid_digits") == 1          # rank 0 alone reports
    assert two["n_images"] == one["n_images"] == 297 and two["fid_n_samples"] == 64
    # different latent draws, the same images: the means agree to sampling noise
    assert two["rate"] == pytest.approx(one["rate"], rel=0.05)
    assert two["mse"] == pytest.approx(one["mse"], rel=0.05)
    assert 0 < two["fid_digits"] < 10 * one["fid_digits"]


def test_each_rank_resumes_its_own_generators_from_the_checkpoint(tmp_path):
    """The ranks' generators differ; rank 0 alone writes the checkpoint, every rank reads it
    back: each must continue its own stream, not rank 0's."""
    script = tmp_path / "generators.py"
    script.write_text(
        "import sys, torch\n"
        "from progvae.training import dist\n"
        "from progvae.training.rng_state import capture_rng_state, restore_rng_state\n"
        "dist.setup(60)\n"
        "torch.manual_seed(100 + dist.rank())\n"
        "state = capture_rng_state()\n"
        "expected = torch.rand(4)\n"
        "if dist.is_main():\n"
        "    torch.save(state, sys.argv[1])\n"
        "dist.barrier()\n"
        "torch.manual_seed(7)\n"
        "restore_rng_state(torch.load(sys.argv[1], weights_only=True))\n"
        "assert torch.equal(torch.rand(4), expected), f'rank {dist.rank()} drew another stream'\n"
        "dist.cleanup()\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), str(tmp_path / "rng.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(torch.load(tmp_path / "rng.pt", weights_only=True)["per_rank"]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow   # end to end, about 27 s on 2 cores: keeps the default suite under 6 min
def test_rank_zero_decides_the_resume_when_other_ranks_cannot_see_the_run(tmp_path):
    """Two nodes without a shared --out, played by two processes with different --out: rank 0's
    holds a checkpoint at step 4, rank 1's is empty. Every rank resumes from step 4 (rank 1
    is sent the checkpoint) and the run ends where an uninterrupted one does."""
    args = ["stage1", *COMMON, *SMALL_MODEL, "--batch_size=8", "--checkpoint_every=0"]
    straight, shared = tmp_path / "straight", tmp_path / "node0"
    for out, steps in ((straight, 6), (shared, 4)):
        result = subprocess.run(torchrun(*args, f"--steps={steps}", f"--out={out}"),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    port = _free_port()
    processes = []
    for rank, out in ((0, shared), (1, tmp_path / "node1")):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "progvae", *args, "--steps=6", "--dist_timeout=30",
             f"--out={out}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=200) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]
    assert "Resuming stage1 from step 4 of 6" in outputs[0][0]
    resumed, uninterrupted = checkpoint(shared), checkpoint(straight)
    assert resumed["step"] == 6
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name


@pytest.mark.slow
def test_fid_reference_statistics_are_computed_once_shared_over_the_ranks(tmp_path):
    """On a cache miss under torchrun each rank extracts its share of the reference features;
    gathered, they give the statistics one process computes from all of them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from progvae.data.loading import load_data
    from progvae.evaluation.metrics.fid import FidScorer

    scorer = FidScorer("digits")            # trains the digit classifier here if need be
    reference = load_data("digits", 16).test[:101]
    script = tmp_path / "reference.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from progvae.training import dist\n"
        "from progvae.data.loading import load_data\n"
        "from progvae.evaluation.metrics.fid import FidScorer\n"
        "dist.setup(60)\n"
        "scorer = FidScorer('digits')\n"
        "extract = scorer.features\n"
        "def counted(images):\n"
        "    print(f'rank {dist.rank()} extracted {len(images)}', flush=True)\n"
        "    return extract(images)\n"
        "scorer.features = counted\n"
        "statistics = scorer.reference_statistics(load_data('digits', 16).test[:101])\n"
        "if dist.is_main():\n"
        "    np.savez(sys.argv[1], **statistics)\n"
        "dist.cleanup()\n")
    cached = scorer.statistics_dir / f"{scorer.reference_key(reference)}.npz"
    cached.unlink(missing_ok=True)           # a cache miss
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), str(tmp_path / "stats.npz")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 extracted 50" in result.stdout and "rank 1 extracted 51" in result.stdout
    shared = np.load(tmp_path / "stats.npz")
    alone = fid_features_to_statistics(scorer.features(reference))
    assert np.allclose(shared["mu"], alone["mu"], atol=1e-5)
    assert np.allclose(shared["sigma"], alone["sigma"], atol=1e-5)
    assert np.array_equal(np.load(cached)["mu"], shared["mu"])   # rank 0 wrote the cache


@pytest.mark.parametrize("requested, environ, cores, expected", [
    (0, {}, 16, 0),                                                   # one process: torch's own
    (0, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 16, 8),    # torchrun's default "1"
    (0, {"LOCAL_WORLD_SIZE": "4"}, 16, 4),
    (0, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 2, 1),     # this machine: 1 each
    (0, {"LOCAL_WORLD_SIZE": "3"}, 2, 1),                             # never 0 threads
    (0, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 16, 0),    # the user's OMP setting
    (5, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 16, 5),    # --num_threads wins
])
def test_processes_on_one_machine_share_its_cores(requested, environ, cores, expected):
    from progvae.training.dist import cpu_threads
    assert cpu_threads(requested, environ, cores) == expected
