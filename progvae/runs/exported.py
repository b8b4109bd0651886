"""Sharing a trained model without pickles: one safetensors file (the format model hubs use;
it holds tensors and text only, so loading it cannot run code) with a run's EMA weights, its
config, kind, step and summary, and for a stage-two run its stage one as well.

`python -m progvae export --run=RUN --out=MODEL.safetensors` writes it; `sample`, `evaluate`
and `stage2 --stage1=` accept it wherever they accept a run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from progvae.core.atomic import atomic_path
from progvae.core.config import Config
from progvae.core.errors import UserError
from progvae.runs.directory import config_fields

SUFFIX = ".safetensors"
FORMAT = "progvae-model"
VERSION = "1"
STAGE1_PREFIX = "stage1."
MODEL_PREFIX = "model."


def is_exported(path: str | Path) -> bool:
    """Whether `path` names an exported model (a .safetensors file) rather than a run folder."""
    return Path(str(path)).suffix == SUFFIX


@dataclass
class ExportedNetwork:
    """One network of an exported file: its kind's name, config, step, summary and weights."""

    kind: str
    config: Config
    step: int
    summary: dict
    weights: dict[str, torch.Tensor]


def write_exported(path: str | Path, network: ExportedNetwork,
                   stage1: ExportedNetwork | None = None) -> None:
    """Write `network` (and the stage one it models on, for a stage-two run) to `path`."""
    from safetensors.torch import save_file

    tensors = {MODEL_PREFIX + name: value.detach().cpu().contiguous().clone()
               for name, value in network.weights.items()}
    metadata = {"format": FORMAT, "version": VERSION, **_describe(network, "")}
    if stage1 is not None:
        tensors.update({STAGE1_PREFIX + name: value.detach().cpu().contiguous().clone()
                        for name, value in stage1.weights.items()})
        metadata.update(_describe(stage1, "stage1_"))
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def _describe(network: ExportedNetwork, prefix: str) -> dict[str, str]:
    return {prefix + "kind": network.kind, prefix + "step": str(network.step),
            prefix + "config": json.dumps(network.config.to_dict()),
            prefix + "summary": json.dumps(network.summary)}


def read_exported(path: str | Path, weights_of: tuple[str, ...] = (MODEL_PREFIX, STAGE1_PREFIX)
                  ) -> tuple[ExportedNetwork, ExportedNetwork | None]:
    """The network of an exported file and, if it holds one, its stage one. Only the tensors of
    the parts named in `weights_of` (MODEL_PREFIX, STAGE1_PREFIX) are read; the others come
    with empty weights (`()`: the header alone, for a config or a summary). Anything that is
    not a progvae export is refused with one sentence."""
    from safetensors import SafetensorError, safe_open

    path = Path(str(path))
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass a file written by `progvae export`.")
    try:
        # safetensors checks that the header is bounded and that every tensor lies inside the
        # file, so a header cannot make it allocate more than the file holds.
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
            tensors = {name: stream.get_tensor(name) for name in stream.keys()
                       if name.startswith(tuple(weights_of))}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise UserError(f"'{path}' is not a readable safetensors file ({first_line}); export "
                        "the run again with `progvae export`.") from None
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise UserError(f"'{path}' is a safetensors file but not a progvae model (format "
                        f"{metadata.get('format')!r}, version {metadata.get('version')!r}); "
                        "pass a file written by `progvae export`.")
    network = _network(path, metadata, tensors, "", MODEL_PREFIX)
    stage1 = (_network(path, metadata, tensors, "stage1_", STAGE1_PREFIX)
              if "stage1_kind" in metadata else None)
    return network, stage1


def _network(path: Path, metadata: dict, tensors: dict, key: str, prefix: str
             ) -> ExportedNetwork:
    try:
        config = json.loads(metadata[key + "config"])
        summary = json.loads(metadata.get(key + "summary", "{}"))
        step = int(metadata[key + "step"])
        kind = metadata[key + "kind"]
    except (KeyError, ValueError) as error:
        raise UserError(f"'{path}' has a damaged header ({type(error).__name__}: {error}); "
                        "export the run again.") from None
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise UserError(f"'{path}' has a damaged header (its config is not an object); export "
                        "the run again.")
    config = config_fields(config)
    weights = {name[len(prefix):]: value for name, value in tensors.items()
               if name.startswith(prefix)}
    return ExportedNetwork(kind, Config.from_dict(config, source=f"'{path}'"), step, summary,
                           weights)
