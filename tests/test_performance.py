"""Speed switches keep the numbers: bf16 autocast, compilation and activation checkpointing
against the fp32 eager step on CPU."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from progvae.core.config import load_config
from progvae.models.distributions import NoiseShard
from progvae.runs.kinds import KINDS
from progvae.stages.stage1 import Stage1Objective
from progvae.training.controllers import LagrangianController
from progvae.training.objective import LossModule

BATCH = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def small_model(**overrides):
    config = load_config("digits", {"width": 16, "image_channels": 1, **overrides})
    torch.manual_seed(0)
    return KINDS["stage1"].build(config)


def loss_and_gradient(module: torch.nn.Module, model: torch.nn.Module, bf16: bool = False,
                      noise=None, backward_thread: bool = False):
    """The loss and the flattened gradient; with `backward_thread`, backward (and so any
    recomputation of checkpointed blocks) runs on another thread, as autograd's device
    threads run it on CUDA."""
    torch.manual_seed(1)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        metrics = module(BATCH, noise)
    if backward_thread:
        import threading

        worker = threading.Thread(target=metrics["loss"].backward)
        worker.start()
        worker.join()
    else:
        metrics["loss"].backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    return metrics["loss"].item(), gradient


def relative(a, b):
    if isinstance(a, float):
        return abs(a - b) / abs(b)
    return ((a - b).norm() / b.norm()).item()


def objective():
    return Stage1Objective(LagrangianController(0.02, init=0.5))


def test_precision_bf16_runs_convolutions_in_bf16_and_stays_close_to_fp32():
    """progvae's own switch (precision=bf16 through progvae.training.performance), not a hand-made
    autocast: the convolutions really run in bf16, and the loss and gradient stay within
    about five times the error measured on this model (4e-5 and 0.4%)."""
    from progvae.training import performance

    model = small_model()
    module = LossModule(model, objective())
    loss, gradient = loss_and_gradient(module, model)
    config = load_config("digits", {"precision": "bf16"})
    dtype = performance.autocast_dtype(config, torch.device("cpu"))
    seen = []
    first_conv = next(m for m in model.decoder.blocks[-1].resnet.modules()
                      if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_hook(
        lambda module_, inputs, output: seen.append(output.dtype))
    torch.manual_seed(1)
    model.zero_grad()
    with performance.autocast(torch.device("cpu"), dtype):
        metrics = module(BATCH)
    metrics["loss"].backward()
    hook.remove()
    gradient_bf16 = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert seen == [torch.bfloat16]
    assert 0 < relative(metrics["loss"].item(), loss) < 5e-4
    assert 0 < relative(gradient_bf16, gradient) < 2e-2
    assert performance.autocast_dtype(load_config("digits", {"precision": "fp32"}),
                                      torch.device("cpu")) is None


@pytest.mark.parametrize("noise, backward_thread", [
    (None, False), (NoiseShard(rank=1, world_size=2), False),
    (NoiseShard(rank=1, world_size=2), True)])
def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients(
        noise, backward_thread):
    """Also as rank 1 of 2, where every draw is a slice of the global batch's noise: the
    recomputed blocks draw the same slice again (the shard is an argument, not ambient), also
    when the recomputation runs on another thread, as on CUDA."""
    model = small_model()
    saving = small_model(checkpoint_activations=True)
    saving.load_state_dict(model.state_dict())
    calls = {"plain": 0, "saving": 0}
    for name, network in (("plain", model), ("saving", saving)):
        network.decoder.blocks[-1].resnet.register_forward_pre_hook(
            lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    loss, gradient = loss_and_gradient(LossModule(model, objective()), model, noise=noise)
    loss_saving, gradient_saving = loss_and_gradient(LossModule(saving, objective()), saving,
                                                     noise=noise, backward_thread=backward_thread)
    assert calls == {"plain": 1, "saving": 2}       # recomputed in backward, not kept
    assert loss_saving == loss
    assert torch.allclose(gradient_saving, gradient, atol=1e-7)


def fixed_noise_like(t: torch.Tensor, shard=None) -> torch.Tensor:
    """Deterministic stand-in for N(0, 1) draws, the same under eager and compiled runs."""
    index = torch.arange(t.numel(), dtype=torch.float32, device=t.device).reshape(t.shape)
    return torch.sin(index * 1.7).to(t.dtype)


@pytest.mark.slow
def test_compiled_step_matches_eager(monkeypatch):
    """Stated tolerance: loss within 1e-4, gradient within 1e-3 (relative). Compiling takes a
    few minutes on 2 CPU cores, hence `slow`. Inductor draws random numbers its own way, so
    both runs use the same fixed noise for the posterior samples: what is compared is the
    arithmetic of the step, which is what compilation may change."""
    import progvae.models.distributions

    monkeypatch.setattr(progvae.models.distributions, "standard_normal_like", fixed_noise_like)
    model = small_model(width=8, dec_blocks="1x1,4m1,8m4,16m8", enc_blocks="16d2,8d2,4d4,1x1")
    module = LossModule(model, objective())
    loss, gradient = loss_and_gradient(module, model)
    loss_compiled, gradient_compiled = loss_and_gradient(torch.compile(module), model)
    assert relative(loss_compiled, loss) < 1e-4
    assert relative(gradient_compiled, gradient) < 1e-3


def test_unknown_precision_is_a_clear_error():
    from progvae.core.errors import UserError
    from progvae.training.performance import autocast_dtype

    config = dataclasses.replace(load_config("digits"), precision="fp8")
    with pytest.raises(UserError, match="precision"):
        autocast_dtype(config, torch.device("cpu"))


def test_auto_precision_is_bf16_only_where_gpus_run_it_natively():
    from progvae.training.performance import auto_dtype

    assert auto_dtype((8, 0)) is torch.bfloat16 and auto_dtype((9, 0)) is torch.bfloat16
    assert auto_dtype((7, 5)) is None and auto_dtype((7, 0)) is None   # T4, V100: fp32


def test_channels_last_also_puts_a_frozen_stage_one_in_that_layout(tmp_path):
    from progvae.core.config import load_config
    from progvae.data.loading import load_data_for
    from progvae.runs.kinds import KINDS
    from progvae.stages.stage2 import CompositeObjective
    from progvae.training.trainer import Trainer

    config = load_config("digits", {"width": 8, "zdim": 4, "enc_blocks": "16d2,8d2,4d4,1x1",
                                    "dec_blocks": "1x1,4m1,8m4,16m8", "image_channels": 1,
                                    "channels_last": "true"})
    stage1 = KINDS["stage1"].build(config).eval().requires_grad_(False)
    trainer = Trainer(KINDS["stage2"].build(config), CompositeObjective(stage1), config,
                      load_data_for(config), tmp_path, "stage2", quiet=True)
    convolutions = [module.weight for module in stage1.modules()
                    if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)]
    assert convolutions and all(weight.is_contiguous(memory_format=torch.channels_last)
                                for weight in convolutions)
    values = trainer.train_step()
    assert values["loss"] == values["loss"]                  # a finite step in that layout


FAULTS_PROBE = """
import resource, sys, torch
from progvae.training import performance
if sys.argv[1] == "keep":
    assert performance.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():                              # like a training step's activations: eight 16 MB
    kept = [torch.ones(4 * 2 ** 20) for _ in range(8)]   # maps alive at once, then all freed
    return sum(t[0] for t in kept)
for _ in range(3):                       # warm up: the heap reaches its size
    step()
before = faults()
for _ in range(10):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_on_the_cpu_freed_tensor_memory_is_reused_without_page_faults():
    """A CPU training step allocates and frees the same large activations every step; kept by
    malloc (`keep_freed_memory`, which the trainer calls on the CPU), they cost no page faults,
    where glibc's defaults hand them back and fault them in afresh each time."""
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True,
                              text=True, check=True)
        return int(done.stdout.split()[-1])

    # glibc's defaults fault the maps in afresh each step in some processes (327,360 faults
    # here, 4,096 pages for each of the 8 maps of each of the 10 steps) and not in others, so
    # only the kept case is asserted: fewer faults than one map's pages a step (a kept heap
    # has been seen to fault one map in once, 4,096 faults in all).
    assert faults("keep") < 10 * 4096
