"""Training behaviour a user relies on: the target is met, and a killed run resumes exactly."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from progvae.core.config import load_config
from progvae.models.vdvae import VDVAE
from progvae.stages.stage1 import train_stage1

RESUME_ARGS = ["stage1", "--config=digits", "--distortion_target=0.02", "--steps=60",
               "--checkpoint_every=10", "--log_every=5", "--n_grid=4", "--quiet=True"]


# A small network for the runs that are interrupted and resumed: exact resumption is under
# test, not the model, and each of these runs starts a fresh interpreter twice.
SMALL = ["--width=8", "--zdim=4", "--enc_blocks=16d2,8d2,4d4,1x1",
         "--dec_blocks=1x1,4m1,8m4,16m8", "--num_threads=1"]


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "progvae", *RESUME_ARGS, *SMALL, f"--out={out}"]


def in_process(args: list[str], *more: str) -> str:
    """Run the command line in this process (no interpreter start-up); returns its stdout."""
    import contextlib
    import io

    from progvae.__main__ import main

    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main([*args, *more])
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def final_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def metrics_without_time(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("time")
    return lines


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The 60-step run the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(command(out), check=True, capture_output=True, timeout=600)
    return out


def assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = final_state(straight), final_state(resumed)
    assert a["step"] == b["step"] == 60
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["objective"] == b["objective"]          # the multiplier and its Adam state
    assert metrics_without_time(straight) == metrics_without_time(resumed)
    assert json.loads((straight / "summary.json").read_text())["mse"] == \
        json.loads((resumed / "summary.json").read_text())["mse"]
    assert not list(resumed.glob("*.tmp")), "a temporary file was left behind"


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(straight, tmp_path):
    killed = tmp_path / "killed"
    # Killed (SIGKILL, at a known step: no sleeps, no race) 5 updates after its checkpoint at
    # step 10, so resuming has work to redo and log lines to replace.
    killed_run = subprocess.run(command(killed), capture_output=True, timeout=600,
                                env={**os.environ, "PROGVAE_TEST_KILL_AT": "15"})
    assert killed_run.returncode == -signal.SIGKILL
    interrupted_at = final_state(killed)["step"]
    assert interrupted_at == 10
    assert max(json.loads(line)["step"] for line in
               (killed / "metrics.jsonl").read_text().splitlines()) == 15

    resumed = subprocess.run(command(killed), check=True, capture_output=True, text=True,
                             timeout=600)
    assert f"Resuming stage1 from step {interrupted_at}" in resumed.stdout

    assert_same_run(straight, killed)


@pytest.mark.parametrize("name, code", [   # one signal by default: the same handler
    ("TERM", 143), pytest.param("INT", 130, marks=pytest.mark.slow),
    pytest.param("USR1", 138, marks=pytest.mark.slow)])
def test_a_signal_checkpoints_the_current_step_and_the_run_resumes_exactly(straight, tmp_path,
                                                                           name, code):
    """SIGTERM (what SLURM and Kubernetes send), SIGINT (Ctrl-C) and SIGUSR1 after update 15:
    a checkpoint at step 15, one line saying how to resume, exit status 128 + the signal;
    the same command then finishes with the uninterrupted run's weights and log."""
    out = tmp_path / name
    stopped = subprocess.run(command(out), capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PROGVAE_TEST_KILL_AT": "15",
                                  "PROGVAE_TEST_SIGNAL": name})
    assert stopped.returncode == code, stopped.stderr
    message = stopped.stderr.strip().splitlines()[-1]
    assert message == (f"progvae: stopped by SIG{name} at step 15 of 60; the checkpoint in "
                       f"'{out}' is saved: run the same command again to continue.")
    assert "Traceback" not in stopped.stderr
    assert final_state(out)["step"] == 15
    if name != "TERM":
        return   # the same path as SIGTERM from here; resumed once, below
    resumed = subprocess.run(command(out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming stage1 from step 15 of 60" in resumed.stdout
    assert_same_run(straight, out)


@pytest.mark.slow   # end to end, about 12 s on 2 cores: keeps the default suite under 6 min
def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    out = tmp_path / "early"
    early = [*RESUME_ARGS[:3], "--n_grid=4", "--steps=8", "--checkpoint_every=0", "--log_every=2",
             "--quiet=True"]
    args = [sys.executable, "-m", "progvae", *early, f"--out={out}"]
    killed = subprocess.run(args, capture_output=True, timeout=600,
                            env={**os.environ, "PROGVAE_TEST_KILL_AT": "5"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").is_file()
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    assert [line["step"] for line in metrics_without_time(out)] == [2, 4, 6, 8]


def test_a_run_stopped_before_its_first_log_line_finishes_at_the_step_it_reached(tmp_path):
    """What `codec_weights` does with a wall-clock budget: SIGTERM, then --steps=the step
    reached, which evaluates and writes summary.json (it ended in "has no metrics.jsonl")."""
    out = tmp_path / "stopped"
    args = [sys.executable, "-m", "progvae", *RESUME_ARGS[:3], *SMALL, "--n_grid=4",
            "--log_every=50", "--checkpoint_every=0", "--quiet=True", f"--out={out}"]
    stopped = subprocess.run([*args, "--steps=100"], capture_output=True, timeout=600,
                             env={**os.environ, "PROGVAE_TEST_KILL_AT": "3",
                                  "PROGVAE_TEST_SIGNAL": "TERM"})
    assert stopped.returncode == 143 and not (out / "metrics.jsonl").exists()
    finished = subprocess.run([*args, "--steps=3"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow   # end to end, about 16 s on 2 cores: keeps the default suite under 6 min
def test_a_torn_log_line_and_stale_temporary_files_are_cleaned_up_on_resume(tmp_path):
    out = tmp_path / "torn"
    args = [sys.executable, "-m", "progvae", *RESUME_ARGS[:3], "--n_grid=4", "--steps=4",
            "--checkpoint_every=0", "--log_every=2", "--quiet=True", f"--out={out}"]
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    with open(out / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 6, "loss": 0.')          # power lost mid-write
    stale = out / "checkpoint.pt.12345.0badcafe.tmp"
    stale.write_bytes(b"half a checkpoint")
    more = subprocess.run([*args[:-1], "--steps=6", args[-1]], capture_output=True, text=True,
                          timeout=600)
    assert more.returncode == 0, more.stderr
    assert "dropped a torn line of metrics.jsonl" in more.stderr
    assert [line["step"] for line in metrics_without_time(out)] == [2, 4, 6]
    assert not stale.exists()


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    from progvae.runs.directory import lock_run_directory

    out = tmp_path / "busy"
    out.mkdir()
    holder = lock_run_directory(out)     # this test process plays the first writer
    try:
        result = subprocess.run([sys.executable, "-m", "progvae", *RESUME_ARGS[:-4],
                                 "--steps=2", "--quiet=True", f"--out={out}"],
                                capture_output=True, text=True, timeout=600)
    finally:
        holder.close()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"is being written by progvae pid {os.getpid()}" in result.stderr
    assert not (out / "config.json").exists()


@pytest.mark.slow   # the whole demo: about 4 minutes on 2 cores
def test_the_demo_meets_its_distortion_target_and_stage_two_improves_on_it(tmp_path):
    """The built-in demo lands within 10% of its stage-one target on held-out data, and stage
    two's reconstructions beat stage one's distortion."""
    result = subprocess.run([sys.executable, "-m", "progvae", "demo", f"--out={tmp_path / 'demo'}",
                             "--quiet=True"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    demo = tmp_path / "demo"
    summary = json.loads((demo / "stage1" / "summary.json").read_text())
    assert abs(summary["mse"] / summary["target"] - 1) <= 0.10, summary
    assert summary["skipped"] < summary["steps"] // 10
    stage2 = json.loads((demo / "stage2" / "summary.json").read_text())
    # stage two models what stage one left out: its reconstructions are closer to the data
    assert stage2["mse"] < summary["mse"], (stage2, summary)
    assert stage2["elbo"] < 0 and stage2["skipped"] < stage2["steps"] // 10
    for path in ("stage1/reconstructions.png", "stage1/samples.png", "stage2/samples.png",
                 "stage2/reconstructions.png", "samples.png"):
        assert (demo / path).stat().st_size > 0


def test_a_short_demo_runs_every_step_and_a_rerun_only_reevaluates(tmp_path):
    """The demo's flow end to end (stage one, stage two, samples, ELBO and fid_digits) at a few
    steps; running it again finds both checkpoints finished and trains nothing."""
    command = [sys.executable, "-m", "progvae", "demo", f"--out={tmp_path / 'demo'}",
               "--steps=4", "--stage2_steps=2", "--quiet=True"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    demo = tmp_path / "demo"
    evaluated = json.loads((demo / "stage2" / "eval.json").read_text())
    summary = json.loads((demo / "stage2" / "summary.json").read_text())
    assert f"ELBO {summary['elbo']:.4f} nats/dim" in first.stdout
    assert f"fid_digits {evaluated['fid_digits']:.2f}" in first.stdout
    assert evaluated["fid_n_samples"] == 1000
    checkpoints = {stage: (demo / stage / "checkpoint.pt").read_bytes()
                   for stage in ("stage1", "stage2")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "Resuming stage1 from step 4 of 4" in again.stdout
    assert "Resuming stage2 from step 2 of 2" in again.stdout
    for stage, content in checkpoints.items():
        assert (demo / stage / "checkpoint.pt").read_bytes() == content, stage
    assert len((demo / "stage1" / "metrics.jsonl").read_text().splitlines()) == 1


def test_updates_over_the_skip_threshold_are_skipped_counted_and_warned_about(tmp_path, capsys):
    config = load_config("digits", {
        "steps": 101, "skip_threshold": 1e-12, "multiplier_init": 0.5, "width": 8, "log_every": 50,
        "checkpoint_every": 0, "n_grid": 4, "dec_blocks": "1x1,4m1,8m4,16m8",
        "enc_blocks": "16d2,8d2,4d4,1x1"})
    torch.manual_seed(config.seed)
    initial = VDVAE(dataclasses.replace(config, image_channels=1)).state_dict()
    summary = train_stage1(config, tmp_path / "run", quiet=True)
    assert summary["skipped"] == 101
    assert summary["multiplier"] == config.multiplier_init    # skipped updates move nothing
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for weights in ("model", "ema"):     # nor the parameters or their average
        assert all(torch.equal(initial[name], final[weights][name]) for name in initial)
    adam = final["optimizer"]["state"]   # and Adam counted no step (found_inf undoes it)
    assert adam and all(float(state["step"]) == 0 for state in adam.values())
    assert "updates were skipped" in capsys.readouterr().err.replace("\n", " ")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["skipped"] == 101
    assert all(json.loads(line)["multiplier"] == config.multiplier_init for line in lines)


def test_the_skip_rule_and_its_stall_warning_at_most_once_per_window():
    from progvae.training.updates import SKIP_WINDOW, SkipRecord

    record = SkipRecord(skip_threshold=10.0)
    assert record.decide(float("nan"), 1.0) and record.decide(1.0, float("inf"))
    assert record.decide(1.0, 10.5) and not record.decide(1.0, 10.0)
    assert record.skipped == 3
    record = SkipRecord(skip_threshold=0.0)            # 0: no threshold, only non-finite skips
    assert not record.decide(1.0, 1e30)
    half = SKIP_WINDOW // 2
    for step in range(1, SKIP_WINDOW):
        record.decide(float("nan") if step <= half else 1.0, 1.0)
        assert record.stall_warning(step) is None      # window not yet full, then only half
    record.decide(float("nan"), 1.0)                   # half + 1 of the last SKIP_WINDOW
    assert "training is stalling" in record.stall_warning(SKIP_WINDOW)
    warned = []
    for step in range(SKIP_WINDOW + 1, 3 * SKIP_WINDOW + 1):
        record.decide(float("nan"), 1.0)
        if record.stall_warning(step) is not None:
            warned.append(step)
    assert warned == [2 * SKIP_WINDOW, 3 * SKIP_WINDOW]
    restored = SkipRecord(0.0)
    restored.load_state_dict(record.state_dict())
    assert restored.skipped == record.skipped and list(restored.recent) == list(record.recent)


class _ScalarReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host that pass through the dispatcher:
    item(), float(t), int(t), bool(t) (each an aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("controller", ["lagrangian", "geco", "dco"])
def test_an_update_never_waits_for_the_host_and_its_metrics_are_read_a_step_later(
        tmp_path, monkeypatch, controller):
    """The skip decision, Adam, the EMA and the controller's multiplier step all stay on the
    device: an update reads no value back (on CUDA each such read would stall the GPU until the
    step is done). Its metrics reach the host only when collected, a step later in the loop."""
    from progvae.stages.stage1 import Stage1Objective
    from progvae.training.controllers import build_controller

    trainer, _ = _tiny_trainer(tmp_path, controller=controller, distortion_target=0.05)
    trainer.objective = Stage1Objective(build_controller(trainer.config))
    trainer.loss_module.objective = trainer.objective
    trainer.train_step()                                 # the first: Adam creates its state
    listed = []
    original_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self: listed.append(1) or original_tolist(self))
    with _ScalarReads() as reads:
        trainer.update()
        trainer.update()
    assert (reads.count, len(listed)) == (0, 0)
    first, second = trainer.pending
    assert [values["lr"] for values in trainer.collect(keep=1)] == [first.lr]
    assert trainer.pending == [second] and len(listed) == 1
    assert trainer.step == 3 and trainer.objective.controller.updates == 3


def _tiny_trainer(tmp_path, **fields):
    import copy as copy_module

    from progvae.data.loading import load_data_for
    from progvae.runs.kinds import KINDS
    from progvae.stages.stage1 import Stage1Objective
    from progvae.training.controllers import LagrangianController
    from progvae.training.trainer import Trainer

    config = load_config("digits", {"width": 8, "zdim": 4, "enc_blocks": "16d2,8d2,4d4,1x1",
                                    "dec_blocks": "1x1,4m1,8m4,16m8", "batch_size": 8,
                                    "steps": 10, "image_channels": 1, **fields})
    torch.manual_seed(0)
    model = KINDS["stage1"].build(config)
    initial = copy_module.deepcopy(model.state_dict())
    trainer = Trainer(model, Stage1Objective(LagrangianController(0.05, init=0.5)), config,
                      load_data_for(config), tmp_path, "stage1", quiet=True)
    return trainer, initial


def test_the_ema_moves_toward_the_weights_by_one_minus_its_rate_each_applied_update(tmp_path):
    trainer, initial = _tiny_trainer(tmp_path, ema_rate=0.75)
    trainer.train_step()
    after_one = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    ema = trainer.ema_model.state_dict()
    for name, value in initial.items():
        if value.is_floating_point():
            expected = 0.75 * value + 0.25 * after_one[name]
            assert torch.allclose(ema[name], expected, atol=1e-7), name
    changed = sum(not torch.equal(initial[name], after_one[name]) for name in initial)
    assert changed > 0


def test_a_skipped_update_after_applied_ones_leaves_weights_ema_adam_and_multiplier(tmp_path):
    """Decided on the device, a skip must still gate everything: after an applied update the EMA
    differs from the weights, so an EMA step that ignored the skip would show."""
    trainer, _ = _tiny_trainer(tmp_path, ema_rate=0.75)
    trainer.train_step()                                     # applied: all of them move
    before = {"model": {key: value.clone() for key, value in trainer.model.state_dict().items()},
              "ema": {key: value.clone() for key, value in trainer.ema_model.state_dict().items()}}
    adam_steps = [float(state["step"]) for state in trainer.optimizer.state.values()]
    controller = trainer.objective.controller
    multiplier, updates = controller.multiplier, controller.updates
    trainer.skips.skip_threshold = 1e-12                     # every norm is over it now
    values = trainer.train_step()
    assert values["grad_norm"] > 1e-12 and trainer.skipped == 1
    for name, module in (("model", trainer.model), ("ema", trainer.ema_model)):
        now = module.state_dict()
        assert all(torch.equal(now[key], value) for key, value in before[name].items()), name
    assert [float(state["step"]) for state in trainer.optimizer.state.values()] == adam_steps
    assert (controller.multiplier, controller.updates) == (multiplier, updates)


class _FailsInBackward(torch.autograd.Function):
    """Identity forward; its backward raises what a compiler that compiles backward lazily
    would raise there."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch._dynamo.exc.InternalTorchDynamoError("the backward compiler failed here")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiler_error_at_the_first_step_falls_back_to_eager_with_a_warning(tmp_path,
                                                                                capsys, where):
    trainer, _ = _tiny_trainer(tmp_path)

    def compiled(images, noise):
        if where == "forward":
            raise torch._dynamo.exc.InternalTorchDynamoError("the compiler failed here")
        metrics = trainer.loss_module(images, noise)
        return {**metrics, "loss": _FailsInBackward.apply(metrics["loss"])}

    trainer.step_module, trainer.compiling = compiled, True
    values = trainer.train_step()
    assert trainer.step_module is trainer.loss_module          # eager from now on
    assert trainer.step == 1 and values["loss"] == values["loss"]
    assert "compiler failed here" in capsys.readouterr().err


def test_only_compiler_errors_of_the_first_step_fall_back(tmp_path):
    """Out of memory at the first step is not the compiler's; a compiler error at a later step
    (a recompile) is not hidden by an eager retry: both end the step with their own error."""
    trainer, _ = _tiny_trainer(tmp_path)

    def out_of_memory(images, noise):
        raise torch.OutOfMemoryError("CUDA out of memory")

    trainer.step_module, trainer.compiling = out_of_memory, True
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step()
    calls = []

    def recompiles(images, noise):
        calls.append(1)
        if len(calls) > 1:
            raise torch._dynamo.exc.InternalTorchDynamoError("a later recompile failed")
        return trainer.loss_module(images, noise)

    trainer.step_module, trainer.compiling = recompiles, True
    trainer.train_step()
    with pytest.raises(torch._dynamo.exc.InternalTorchDynamoError):
        trainer.train_step()


def test_gradients_are_clipped_to_grad_clip_and_the_log_keeps_the_norm_before(tmp_path):
    trainer, _ = _tiny_trainer(tmp_path, grad_clip=1e-3, skip_threshold=0.0)
    values = trainer.train_step()
    norm = torch.cat([p.grad.flatten() for p in trainer.parameters]).norm().item()
    assert values["grad_norm"] > 1e-3                  # the logged norm is the one before
    assert norm == pytest.approx(1e-3, rel=1e-4)        # what the optimizer stepped on


def test_kept_checkpoints_let_a_run_go_back_and_continue_exactly(tmp_path, capsys):
    from progvae.__main__ import main

    out = tmp_path / "run"
    args = ["stage1", "--config=digits", "--distortion_target=0.02", "--steps=6",
            "--checkpoint_every=2", "--keep_checkpoints=2", "--log_every=1", "--n_grid=4",
            "--quiet=True", f"--out={out}"]
    main(args)
    kept = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert kept == ["step_00000004.pt", "step_00000006.pt"]          # the newest 2
    first_end = torch.load(out / "checkpoint.pt", weights_only=True)
    first_log = metrics_without_time(out)
    with pytest.raises(SystemExit) as refused:
        main([*args, "--resume_from=2"])
    assert refused.value.code == 2 and "the kept steps are 4, 6" in capsys.readouterr().err
    main([*args, "--resume_from=4"])
    assert "Going back to step 4" in capsys.readouterr().out
    again = torch.load(out / "checkpoint.pt", weights_only=True)
    assert again["step"] == 6 and all(torch.equal(first_end["model"][name], value)
                                      for name, value in again["model"].items())
    assert metrics_without_time(out) == first_log              # steps 5, 6 logged once
    aside, = [path for path in (out / "checkpoints").iterdir() if path.is_dir()]
    assert {"step_00000006.pt", "checkpoint.pt", "summary.json", "metrics.jsonl"} <= {
        path.name for path in aside.iterdir()}                 # nothing of the old branch lost
    assert metrics_without_time(aside) == first_log


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_the_run_resumes(tmp_path):
    """A full disk, met as a file-size limit (RLIMIT_FSIZE) smaller than the checkpoint: the
    write fails with one sentence, the step-2 checkpoint survives byte for byte, no temporary
    file is left, and the same command without the limit continues from step 2."""
    import resource

    out = tmp_path / "run"
    args = [sys.executable, "-m", "progvae", "stage1", "--config=digits", "--width=8",
            "--distortion_target=0.02", "--checkpoint_every=2", "--log_every=1", "--n_grid=4",
            "--quiet=True", f"--out={out}"]
    in_process(args[3:], "--steps=2")   # only the limited run needs a process of its own
    before = (out / "checkpoint.pt").read_bytes()

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    full = subprocess.run([*args, "--steps=4"], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "Could not write" in full.stderr and "previous checkpoint is intact" in full.stderr
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))
    assert "Resuming stage1 from step 2 of 4" in in_process(args[3:], "--steps=4")
    assert [line["step"] for line in metrics_without_time(out)] == [1, 2, 3, 4]


def test_a_watched_run_writes_tensorboard_events_step_grids_and_curves_once_per_step(tmp_path):
    """Killed after update 3 (its held-out evaluation at 3 already flushed to TensorBoard, the
    checkpoint at 2), then resumed: the events show every step once, the grids of each
    evaluation are labelled PNGs, and curves.png is drawn."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [sys.executable, "-m", "progvae", "stage1", "--config=digits", "--width=8",
            "--distortion_target=0.02", "--steps=6", "--checkpoint_every=2", "--eval_every=3",
            "--log_every=1", "--n_grid=4", "--quiet=True", f"--out={out}"]
    killed = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PROGVAE_TEST_KILL_AT": "3"})
    assert killed.returncode == -signal.SIGKILL
    in_process(args[3:])
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert {"train/rate", "train/distortion", "train/multiplier", "train/grad_norm",
            "heldout/mse", "heldout/rate", "heldout/group_rates/00"} <= set(
        events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("heldout/mse")] == [3, 6]
    assert {"images/reconstructions", "images/samples"} <= set(events.Tags()["images"])
    grids = sorted(path.name for path in (out / "images").iterdir())
    assert grids == ["step_000003_reconstructions.png", "step_000003_samples.png"]
    assert (out / "curves.png").stat().st_size > 10_000


def test_flat_updates_equal_adam_clipping_and_the_ema_per_tensor_and_resume_from_either():
    """Clipping, Adam and the EMA run on flat buffers; they must make the updates that
    torch's per-tensor clip_grad_norm_, fused Adam and lerp make (channels_last weights
    included), and checkpoints keep torch.optim.Adam's per-parameter format both ways."""
    from progvae.training.updates import FlatParameters, update_ema

    config = load_config("digits", {"lr": 0.01, "adam_beta2": 0.99, "weight_decay": 0.001})
    torch.manual_seed(0)

    def network():
        torch.manual_seed(1)
        layers = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.GELU(),
                                     torch.nn.Conv2d(5, 2, 1), torch.nn.Flatten(),
                                     torch.nn.Linear(2 * 6 * 6, 3))
        layers[:3].to(memory_format=torch.channels_last)
        return layers, [p.detach().clone() for p in layers.parameters()]

    def loss(layers, seed):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(4, 3, 8, 8, generator=generator)
        return (layers(images) ** 2).sum() * 50   # gradients well over the clip

    reference, reference_averages = network()
    adam = torch.optim.Adam(reference.parameters(), lr=config.lr, fused=True,
                            betas=(config.adam_beta1, config.adam_beta2),
                            weight_decay=config.weight_decay)
    flat_model, flat_averages = network()
    flat = FlatParameters(list(flat_model.parameters()), flat_averages, config)
    applied = torch.tensor(True)
    for seed in range(3):
        adam.zero_grad()
        loss(reference, seed).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        adam.found_inf = torch.zeros(())
        adam.step()
        update_ema(reference_averages, [p.detach() for p in reference.parameters()], 0.9,
                   applied)
        flat.zero_grad()
        loss(flat_model, seed).backward()
        assert flat.clip_grad_norm(1.0).item() == pytest.approx(norm.item(), rel=1e-6)
        flat.step(config.lr, ~applied)
        update_ema([flat.averages], [flat.values], 0.9, applied)
    for mine, theirs in zip([*flat_model.parameters(), *flat_averages],
                            [*reference.parameters(), *reference_averages]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    saved, expected = flat.optimizer_state_dict(), adam.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(saved["state"][index][name], value, rtol=1e-4, atol=1e-8)
    # a per-tensor checkpoint resumes on flat buffers: the next update is the reference's
    resumed_model, resumed_averages = network()
    resumed = FlatParameters(list(resumed_model.parameters()), resumed_averages, config)
    with torch.no_grad():
        for mine, theirs in zip(resumed_model.parameters(), reference.parameters()):
            mine.copy_(theirs)
    resumed.load_optimizer_state_dict(expected)
    adam.zero_grad()
    loss(reference, 9).backward()
    adam.step()
    resumed.zero_grad()
    loss(resumed_model, 9).backward()
    resumed.step(config.lr, ~applied)
    for mine, theirs in zip(resumed_model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
