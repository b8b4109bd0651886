"""What every test runs under.

- The default suite is pinned to the CPU in fp32 without compilation: CUDA is hidden from this
  process and every command a test starts (so `auto` never switches on bf16, compile, TF32 or
  cuDNN autotuning, and exact-resume and DDP tolerances hold on a GPU host too). The GPU checks
  live in `test_gpu.py`, which runs only with PROGVAE_TEST_GPU=1 on a machine with CUDA.
- Decoded datasets are cached in a temporary folder, never in the user's own cache.
"""

import os

import pytest

GPU_RUN = os.environ.get("PROGVAE_TEST_GPU") == "1"
if not GPU_RUN:
    # Before torch initialises CUDA (on first use): torch then sees no device, here and in
    # every subprocess, which inherits the environment.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True, scope="session")
def private_dataset_cache(tmp_path_factory):
    patcher = pytest.MonkeyPatch()
    patcher.setenv("PROGVAE_CACHE", str(tmp_path_factory.mktemp("progvae-cache")))
    yield
    patcher.undo()


@pytest.fixture(autouse=True, scope="session")
def pinned_to_the_cpu():
    import torch

    assert GPU_RUN or not torch.cuda.is_available(), "the default suite must run on the CPU"
    yield
