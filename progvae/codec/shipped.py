"""The codec's shipped weights: one model per `--quality` level, inside the package
(progvae/codec/weights/quality_N.safetensors, float16, made by the recipe in
progvae/codec/weights/MODEL_CARD.md), so `compress` and `decompress` work with no `--run` and
no training.

One model per distortion target, each trained by stage one's Lagrangian controller (paper 003's
objective: the least rate that meets the target), rather than one model conditioned on the
target (QARV): the project's own training makes them with no new machinery, and each level is
a plain exported run that `--run` also accepts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from progvae.codec.coder import Codec, read_header
from progvae.core.errors import UserError

# --quality -> the stage-one distortion target it was trained to (MSE/dim on the [-1, 1]
# scale; 27, 31 and 35 dB on training crops)
QUALITY_TARGETS = {1: 0.007981, 2: 0.003178, 3: 0.001265}
DEFAULT_QUALITY = 2


def shipped_path(quality: int) -> Path:
    """The file of one quality level."""
    if isinstance(quality, bool) or quality not in QUALITY_TARGETS:
        raise UserError(f"--quality must be one of {', '.join(map(str, QUALITY_TARGETS))} (the "
                        f"shipped models, 1 the smallest files), got {quality!r}.")
    path = Path(str(resources.files("progvae.codec") / "weights" /
                    f"quality_{quality}.safetensors"))
    if not path.is_file():
        raise UserError(f"The shipped weights {path} are missing from this install; reinstall "
                        "progvae, or pass --run=RUN, a model of your own.")
    return path


def shipped_codec(quality: int) -> Codec:
    """The Codec of a shipped quality level."""
    from progvae.codec.files import load_codec

    return load_codec(str(shipped_path(quality)), f"the shipped quality {quality} model")


def codec_for_file(data: bytes, source: str) -> Codec:
    """The shipped model that wrote a .pvc file (its header names the weights' hash)."""
    header = read_header(data, source)
    for quality in QUALITY_TARGETS:
        codec = shipped_codec(quality)
        if codec.model_hash == header.model_hash:
            return codec
    raise UserError(f"{source} was not made by a shipped model (weights "
                    f"{header.model_hash.hex()}); pass --run=RUN, the model that compressed it.")
