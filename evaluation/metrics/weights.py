"""Where the evaluation networks' weights come from, and progvae's on-disk cache.

FID's Inception-v3 (torch-fidelity) and LPIPS's AlexNet trunk (torchvision) are downloaded on
first use into torch's hub cache. On an offline machine neither download can happen, so each
metric takes a local file instead (`--inception_weights=PATH`, `--lpips_weights=PATH`), and
without one it stops with a sentence naming the file and the flag rather than a traceback.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from progvae.core.errors import UserError
from progvae.core.untrusted import refused_global
from progvae.data.cache import cache_root

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def cache_dir() -> Path:
    """Where evaluation keeps what it computes once (the digit classifier, FID reference
    statistics): `evaluation/` inside progvae's cache folder (`progvae.data.cache.cache_root`:
    $PROGVAE_CACHE, else $XDG_CACHE_HOME/progvae, else ~/.cache/progvae). Safe to delete."""
    return cache_root() / "evaluation"


def inception_weights(path: str | Path | None) -> Path:
    """The torch-fidelity Inception-v3 weights file: `path` if given, else torch's hub cache,
    downloading it there if it is not yet cached."""
    return _weights_file(path, INCEPTION_URL, "FID", "--inception_weights",
                         "torch-fidelity's Inception-v3 weights")


def alexnet_weights(path: str | Path | None) -> Path:
    """A torchvision AlexNet state dict (LPIPS's trunk): `path`, the hub cache, or a download."""
    return _weights_file(path, ALEXNET_URL, "LPIPS", "--lpips_weights",
                         "torchvision's ImageNet AlexNet state dict")


def _weights_file(path, url: str, metric: str, flag: str, what: str) -> Path:
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"{flag}='{path}' does not exist; pass the path of {what} "
                            f"({Path(url).name}).")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception:   # offline: URLError, HTTPError, timeouts, proxies ... all mean the same
        raise UserError(f"{metric} needs {what}, which could not be downloaded from {url}; "
                        f"download {Path(url).name} on a machine with internet access and pass "
                        f"{flag}=PATH (or leave {metric.lower()} out of --metrics).") from None
    return cached


def file_fingerprint(path: str | Path) -> str:
    """A short content hash of a file, so caches keyed by it notice a different file."""
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def load_state_dict_file(path: str | Path, flag: str, what: str) -> dict[str, torch.Tensor]:
    """A weights file given by path, as a plain state dict (names to tensors), loaded without
    unpickling anything but tensors and containers: a planted payload is refused, never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{flag}='{path}' holds objects progvae refuses to load (for example "
                        f"{refused_global(error)}); progvae never unpickles code, so pass {what}."
                        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise UserError(f"{flag}='{path}' is not a readable weights file ({first_line}); pass "
                        f"{what}.") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor)
                                              for value in state.values()):
        raise UserError(f"{flag}='{path}' is not a state dict (names to tensors); pass {what}.")
    return state
