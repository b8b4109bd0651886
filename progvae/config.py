"""Typed configuration: one dataclass, presets as JSON files in `configs/`, CLI overrides.

The defaults are the "original" VDVAE setup of paper 003 (Shu & Ermon), appendix A.1, and the
Lagrangian settings of its appendix A.5. A preset file lists only the fields that differ.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from progvae.errors import UserError


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------------
    data: str = "digits"            # digits | patches | folder:PATH | npz:PATH
    image_size: int = 32            # square images; the data must match (or pass --resize)
    image_channels: int = 3         # filled in from the data when a run starts
    resize: bool = False            # folder: data only: resize every image to image_size
    svhn_extra: bool = False        # svhn: data only: also train on extra_32x32.mat (531,131 images)
    cache_dir: str = ""             # where decoded datasets are cached ("": $PROGVAE_CACHE, else
                                    #   $XDG_CACHE_HOME/progvae or ~/.cache/progvae)
    data_workers: int = 0           # processes decoding images while a cache is built (0: one per core)

    # --- VDVAE architecture (Child 2020; paper 003 A.1) ---------------------------------------
    enc_blocks: str = "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3"   # bottom-up encoder
    dec_blocks: str = "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21"  # top-down decoder
    width: int = 384                # channels of the residual stream
    custom_width: str = ""          # per-resolution widths, e.g. "32:64,16:128"
    zdim: int = 16                  # channels of each latent group
    bottleneck_multiple: float = 0.25  # bottleneck width of residual blocks / width
    precision_weighted_merge: bool = False  # Sonderby et al. 2016 posterior (paper 002 A.1)
    n_mixtures: int = 10            # components of the DMoL head (stage two, vdvae)

    # --- optimisation (paper 003 A.1, VDVAE defaults) -----------------------------------------
    batch_size: int = 16            # per process; global batch = batch_size x world size x accumulate
    accumulate: int = 1             # gradient-accumulation micro-steps per update
    lr: float = 2e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0           # linear learning-rate warm-up (paper: 0)
    grad_clip: float = 200.0        # gradient-norm clipping (VDVAE default)
    skip_threshold: float = 500.0   # skip the update when the grad norm exceeds this (<=0: never)
    ema_rate: float = 0.9999        # EMA of parameters, used for evaluation and sampling
    steps: int = 800_000            # optimizer updates (paper: 800K)
    seed: int = 0

    # --- stage-one constraint (paper 003 A.5, paper 002 B.2) ----------------------------------
    controller: str = "lagrangian"
    distortion_target: float = 0.0  # MSE per dimension on the [-1, 1] scale; stage one needs > 0
    multiplier_init: float = 0.9999
    multiplier_min: float = 1e-4
    multiplier_max: float = 0.9999
    multiplier_lr: float = 2e-4     # Adam on the multiplier, betas (0, 0.999)
    multiplier_beta2: float = 0.999
    distortion_ema: float = 0.99    # EMA of D that drives the multiplier
    # controllers other than the default (progvae/controllers.py; --controller=NAME):
    rate_target: float = 0.0        # rate: KL target in nats/dim (paper 003 A.5, last sentence)
    geco_init: float = 1.0          # geco: lam at step 0 (paper 004 Algorithm 1)
    geco_lr: float = 1.0            # geco: log lam += geco_lr * C_ma each update (Alg. 1 caption)
    geco_ema: float = 0.99          # geco: alpha of the constraint moving average (paper 004 §4.1)
    geco_min: float = 1e-4          # geco: lam clipped to [geco_min, geco_max] (not in the paper;
    geco_max: float = 1e4           #   the lagrangian's [1e-4, 0.9999] as odds lam / (1 - lam))
    dco_lr: float = 5e-3            # dco: SGD on log lam (paper 000 §4.1)
    dco_momentum: float = 0.99      # dco: SGD momentum, dampening equal to it (paper 000 §3.1.1)
    dco_max: float = 1e3            # dco: clip lam <= dco_max, and start there (paper 000 §3.1.1)
    hinge_weight: float = 1.0       # hinge: fixed lam of R + lam max(D/c - 1, 0) (paper 000 eq. 4)
    beta: float = 1.0               # beta: fixed weight of D + beta R (no target)
    constraint_tolerance: float = 0.05  # summary: met if held-out D (R) <= target * (1 + this)

    # --- stage two ----------------------------------------------------------------------------
    stage1: str = ""                # the stage-one run directory stage two is trained on
    latent_groups: int = 0          # progressive runs: the leading latent groups coded (K)

    # --- bookkeeping --------------------------------------------------------------------------
    log_every: int = 50             # steps between metrics.jsonl lines
    eval_every: int = 5000          # steps between held-out evaluations (0: only at the end)
    checkpoint_every: int = 5000    # steps between checkpoints (a final one is always written)
    eval_batch_size: int = 64
    n_grid: int = 64                # images in samples.png / reconstructions.png
    num_threads: int = 0            # torch CPU threads (0: torch's default)
    dist_timeout: float = 1800.0    # seconds a rank waits for its peers before the run fails

    # --- speed (progvae/performance.py); "auto" = on for CUDA, off for CPU -------------------
    precision: str = "auto"         # auto | fp32 | bf16 (autocast; KL and likelihood stay fp32)
    channels_last: str = "auto"     # auto | true | false: NHWC memory format for convolutions
    compile: str = "auto"           # auto | true | false: torch.compile the loss computation
    checkpoint_activations: bool = False  # recompute each block's activations in backward

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the config") -> "Config":
        return apply_overrides(cls(), values, source)


ARCHITECTURE_FIELDS = (
    "image_size", "image_channels", "enc_blocks", "dec_blocks", "width", "custom_width", "zdim",
    "bottleneck_multiple", "precision_weighted_merge", "n_mixtures", "latent_groups",
)


def preset_names() -> list[str]:
    folder = resources.files("progvae.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_preset(name: str) -> dict[str, Any]:
    path = Path(name)
    if name.endswith(".json") and path.is_file():
        text = path.read_text()
    else:
        preset = resources.files("progvae.configs") / f"{name}.json"
        if not preset.is_file():
            raise UserError(
                f"Unknown config preset '{name}'; choose one of {', '.join(preset_names())} "
                "or pass the path of a .json file."
            )
        text = preset.read_text()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"Config preset '{name}' is not valid JSON ({error}); fix the file.")
    values.pop("_comment", None)
    return values


def _coerce(name: str, kind: type, value: Any, source: str) -> Any:
    """Check a value against a field's type, converting only where nothing is lost."""
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, bool):  # fire turns --flag=True (or a bare --flag) into a bool
            return str(value).lower()
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, tuple):  # fire parses "a,b" into a tuple
            return ",".join(str(v) for v in value)
    raise UserError(
        f"Config field '{name}' in {source} expects {expected[kind]}, got {value!r}; "
        f"pass e.g. --{name}={Config.__dataclass_fields__[name].default!r}."
    )


def apply_overrides(config: Config, overrides: dict[str, Any], source: str) -> Config:
    """Return a copy of `config` with `overrides` applied; unknown fields and wrong types fail."""
    kinds = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[f.type]
             for f in fields(Config)}
    values = {}
    for name, value in overrides.items():
        if name not in kinds:
            close = difflib.get_close_matches(name, kinds, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"Unknown config field '{name}' in {source}{hint}; "
                            "see progvae/config.py for the fields.")
        values[name] = _coerce(name, kinds[name], value, source)
    return dataclasses.replace(config, **values)


def load_config(preset: str, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset file, then command-line overrides."""
    config = apply_overrides(Config(), _read_preset(preset), f"preset '{preset}'")
    return apply_overrides(config, overrides or {}, "the command line")
