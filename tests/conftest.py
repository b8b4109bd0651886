"""Every test, and every command a test starts in a subprocess, caches decoded datasets in a
temporary folder, never in the user's own cache."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_dataset_cache(tmp_path_factory):
    patcher = pytest.MonkeyPatch()
    patcher.setenv("PROGVAE_CACHE", str(tmp_path_factory.mktemp("progvae-cache")))
    yield
    patcher.undo()
