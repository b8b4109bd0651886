"""Typed configuration: one dataclass, presets as JSON files in `configs/`, CLI overrides.

The defaults are the "original" VDVAE setup of paper 003 (Shu & Ermon), appendix A.1, and the
Lagrangian settings of its appendix A.5. A preset file lists only the fields that differ.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from progvae.core.errors import UserError


def option(default: Any, help: str, *, minimum: float | None = None,
           maximum: float | None = None, above: float | None = None,
           below: float | None = None, choices: tuple | None = None):
    """A config field with its metadata: the default, one line of help, and what values are
    allowed (minimum/maximum inclusive, above/below exclusive, or a tuple of choices)."""
    return field(default=default, metadata={
        "help": help, "minimum": minimum, "maximum": maximum, "above": above, "below": below,
        "choices": choices})


@dataclass
class Config:
    """Every setting of a run. Each field is declared with `option`: its default, its help text
    (shown by `--help` and in the README's table) and its allowed range or choices (checked by
    `validate` whenever a config is loaded)."""

    # --- data -------------------------------------------------------------------------------
    data: str = option("digits", "the dataset: digits | patches | photos | folder:PATH | npz:PATH | "
                       "svhn:DIR | celeba:DIR | lsun:DIR")
    image_size: int = option(32, "square images of this many pixels a side; the data must "
                             "match (or pass --resize)", minimum=1)
    image_channels: int = option(3, "filled in from the data when a run starts", choices=(1, 3))
    resize: bool = option(False, "folder: data only: resize every image to image_size")
    svhn_extra: bool = option(False, "svhn: data only: also train on extra_32x32.mat "
                              "(531,131 images)")
    cache_dir: str = option("", "where decoded datasets are cached (empty: $PROGVAE_CACHE, "
                            "else $XDG_CACHE_HOME/progvae or ~/.cache/progvae)")
    data_workers: int = option(0, "processes decoding images while a cache is built (0: one "
                               "per core)", minimum=0)

    # --- VDVAE architecture (Child 2020; paper 003 A.1) ---------------------------------------
    enc_blocks: str = option("32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
                             "bottom-up encoder block string")
    dec_blocks: str = option("1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21",
                             "top-down decoder block string (one latent group per block)")
    width: int = option(384, "channels of the residual stream", minimum=1)
    custom_width: str = option("", 'per-resolution widths, e.g. "32:64,16:128"')
    zdim: int = option(16, "channels of each latent group", minimum=1)
    bottleneck_multiple: float = option(0.25, "bottleneck width of residual blocks / width",
                                        above=0)
    precision_weighted_merge: bool = option(False, "Sonderby et al. 2016 posterior "
                                            "(paper 002 A.1)")
    latents: str = option("gaussian", "gaussian: reparameterised Gaussian latents and the "
                          "analytic KL; quantized: uniform noise in training, rounded latents "
                          "coded under the box-integrated prior (a real codec's rate)",
                          choices=("gaussian", "quantized"))
    n_mixtures: int = option(10, "components of the DMoL head (stage two, vdvae)", minimum=1)
    patch_size: int = option(1, "p: the encoder starts by folding p x p pixel patches into "
                             "channels and the linear head ends by unfolding them (a stride-p "
                             "patch embedding, as learned codecs use); block strings then count "
                             "image_size / p at the top", minimum=1)
    fully_convolutional: bool = option(False, "each resolution's stream starts from a learned "
                                       "bias broadcast to the image's size and coarser streams "
                                       "are upsampled by a learned convolution, so an image of "
                                       "any size (sides a multiple of the largest stride) runs "
                                       "in one pass (the codec's presets)")
    quantized_training: str = option("noise", "quantized latents in training: noise (the "
                                     "decoder sees the noisy latent) or ste (the decoder sees "
                                     "the rounded latent it is given when decoding, rounding's "
                                     "gradient passed straight through; the rate is the noisy "
                                     "latent's either way)", choices=("noise", "ste"))
    augment: str = option("none", "training batches: none, or channels (each image's colour "
                          "channels in a random order, drawn from the seed and the batch's "
                          "place, so a resumed run sees the same batches: the codec's preset, "
                          "whose nine photographs alone teach too few colours)",
                          choices=("none", "channels"))

    # --- optimisation (paper 003 A.1, VDVAE defaults) -----------------------------------------
    batch_size: int = option(16, "images per process per micro-step; global batch = batch_size "
                             "x processes x accumulate", minimum=1)
    accumulate: int = option(1, "gradient-accumulation micro-steps per update", minimum=1)
    lr: float = option(2e-4, "Adam learning rate", above=0)
    adam_beta1: float = option(0.9, "Adam beta1", minimum=0, below=1)
    adam_beta2: float = option(0.9, "Adam beta2 (VDVAE's 0.9)", minimum=0, below=1)
    weight_decay: float = option(0.0, "Adam weight decay", minimum=0)
    warmup_steps: int = option(0, "linear learning-rate warm-up (paper: 0)", minimum=0)
    lr_decay_steps: int = option(0, "the last N updates of --steps train at a tenth of --lr "
                                 "(the final decay learned codecs train with; 0: none)",
                                 minimum=0)
    grad_clip: float = option(200.0, "gradient-norm clipping (VDVAE default)", above=0)
    skip_threshold: float = option(500.0, "skip the update when the gradient norm exceeds this "
                                   "(<= 0: never)")
    ema_rate: float = option(0.9999, "EMA of the parameters, used for evaluation and sampling",
                             minimum=0, maximum=1)
    steps: int = option(800_000, "optimizer updates (paper: 800K)", minimum=1)
    init_from: str = option("", "a run directory or exported model (.safetensors) whose EMA "
                            "weights a new run starts from (fine-tuning; the architecture must "
                            "match); a resumed run continues from its own checkpoint")
    seed: int = option(0, "seed of the initial weights, the data order and the noise")

    # --- stage-one constraint (paper 003 A.5, paper 002 B.2) ----------------------------------
    controller: str = option("lagrangian", "how the rate-distortion multiplier is set: "
                             "lagrangian | geco | dco | hinge | beta | rate")
    distortion_target: float = option(0.0, "MSE per dimension on the [-1, 1] scale; stage one "
                                      "needs > 0", minimum=0)
    multiplier_init: float = option(0.9999, "lagrangian, rate: the multiplier's start",
                                    minimum=0, maximum=1)
    multiplier_min: float = option(1e-4, "lagrangian, rate: the multiplier's lower limit",
                                   minimum=0, maximum=1)
    multiplier_max: float = option(0.9999, "lagrangian, rate: the multiplier's upper limit",
                                   minimum=0, maximum=1)
    multiplier_lr: float = option(2e-4, "lagrangian: Adam on the multiplier, betas "
                                  "(0, multiplier_beta2)", above=0)
    multiplier_beta2: float = option(0.999, "lagrangian: that Adam's beta2",
                                     minimum=0, below=1)
    distortion_ema: float = option(0.99, "lagrangian: EMA of D that drives the "
                                   "multiplier", minimum=0, below=1)
    rate_target: float = option(0.0, "rate: KL target in nats/dim (paper 003 A.5, last "
                                "sentence)", minimum=0)
    rate_integral_gain: float = option(0.1, "rate: the integral term of log(odds of eta / "
                                       "D_ema) grows by this times the relative rate error "
                                       "each update", above=0)
    rate_proportional_gain: float = option(1.0, "rate: log(odds of eta / D_ema) = integral + "
                                           "this times the relative rate error", minimum=0)
    rate_ema: float = option(0.9, "rate: EMA of the batch rate and distortion that drive eta",
                             minimum=0, below=1)
    geco_init: float = option(1.0, "geco: λ at step 0 (paper 004 Algorithm 1)", above=0)
    geco_lr: float = option(1.0, "geco: log λ += geco_lr * C_ma each update (Alg. 1 "
                            "caption)", above=0)
    geco_ema: float = option(0.99, "geco: alpha of the constraint moving average (paper 004 "
                             "§4.1)", minimum=0, below=1)
    geco_min: float = option(1e-4, "geco: λ clipped below (not in the paper; the "
                             "lagrangian's 1e-4 as odds)", above=0)
    geco_max: float = option(1e4, "geco: λ clipped above (the lagrangian's 0.9999 as odds "
                             "λ / (1 - λ))", above=0)
    dco_lr: float = option(5e-3, "dco: SGD on log λ (paper 000 §4.1)", above=0)
    dco_momentum: float = option(0.99, "dco: SGD momentum, dampening equal to it (paper 000 "
                                 "§3.1.1)", minimum=0, below=1)
    dco_max: float = option(1e3, "dco: clip λ <= dco_max, and start there (paper 000 "
                            "§3.1.1)", above=0)
    hinge_weight: float = option(1.0, "hinge: fixed λ of R + λ max(D/c - 1, 0) (paper 000 "
                                 "eq. 4)", above=0)
    beta: float = option(1.0, "beta: fixed weight of D + beta R (no target)", minimum=0)
    constraint_tolerance: float = option(0.05, "summary: the target counts as met if held-out "
                                         "D (R) <= target * (1 + this)", minimum=0)

    # --- stage two and the progressive experiment ----------------------------------------------
    stage1: str = option("", "stage two: the stage-one run directory it is trained on (set by "
                         "--stage1)")
    stage1_sha256: str = option("", "stage two: SHA-256 of that run's checkpoint when stage two "
                                "started (set by stage2; a changed stage one is refused)")
    stage1_step: int = option(0, "stage two: the step of that checkpoint (set by stage2)",
                              minimum=0)
    latent_groups: int = option(0, "progressive runs: the leading latent groups coded (K; set "
                                "by the experiment)", minimum=0)
    masked: str = option("sample", "progressive runs: the groups after K, drawn from their "
                         "prior (sample, as paper 003 A.2 via VDVAE's forward_manual_latents) or "
                         "at its mean (mean)", choices=("sample", "mean"))

    # --- bookkeeping --------------------------------------------------------------------------
    log_every: int = option(50, "steps between metrics.jsonl lines", minimum=1)
    eval_every: int = option(5000, "steps between held-out evaluations (0: only at the end)",
                             minimum=0)
    checkpoint_every: int = option(5000, "steps between checkpoints (0: only the final one, "
                                   "which is always written)", minimum=0)
    keep_checkpoints: int = option(0, "checkpoints kept besides the latest, as "
                                   "OUT/checkpoints/step_STEP.pt (the newest N; see "
                                   "--resume_from)", minimum=0)
    tensorboard: bool = option(True, "write TensorBoard events (scalars, image grids) under "
                               "OUT/tb/")
    eval_batch_size: int = option(64, "images per batch of held-out evaluation", minimum=1)
    n_grid: int = option(64, "images in samples.png and reconstructions.png", minimum=1)
    num_threads: int = option(0, "torch CPU threads (0: torch's default)", minimum=0)
    dist_timeout: float = option(1800.0, "seconds a rank waits for its peers before the run "
                                 "fails", above=0)

    # --- speed (progvae/training/performance.py); "auto" = on for CUDA, off for CPU -------------------
    precision: str = option("auto", "autocast precision (KL and likelihood stay fp32); auto: "
                            "bf16 on GPUs of compute capability >= 8.0, else fp32",
                            choices=("auto", "fp32", "bf16"))
    channels_last: str = option("auto", "NHWC memory format for convolutions",
                                choices=("auto", "true", "false"))
    compile: str = option("auto", "torch.compile the loss computation",
                          choices=("auto", "true", "false"))
    checkpoint_activations: bool = option(False, "recompute each block's activations in "
                                          "backward (less memory, more compute)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the config") -> "Config":
        return apply_overrides(cls(), values, source)


ARCHITECTURE_FIELDS = (
    "image_size", "image_channels", "enc_blocks", "dec_blocks", "width", "custom_width", "zdim",
    "bottleneck_multiple", "precision_weighted_merge", "n_mixtures", "latent_groups", "latents",
    "masked", "patch_size", "fully_convolutional",
)


def preset_names() -> list[str]:
    folder = resources.files("progvae.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_preset(name: str) -> dict[str, Any]:
    path = Path(name)
    if name.endswith(".json") and path.is_file():
        from progvae.core.untrusted import read_text
        text = read_text(path, "fix the file, or pass another --config")
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
    if not isinstance(values, dict):
        raise UserError(f"Config preset '{name}' holds a JSON {type(values).__name__}, not an "
                        'object of fields; write it as {"field": value, ...}.')
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
        _check_allowed(name, values[name], source)
    return dataclasses.replace(config, **values)


def allowed(name: str) -> str:
    """What values field `name` allows, in words ("" when any value of its type is fine)."""
    meta = Config.__dataclass_fields__[name].metadata
    if meta.get("choices"):
        return "one of " + ", ".join(str(choice) for choice in meta["choices"])
    bounds = []
    for key, symbol in (("minimum", ">="), ("above", ">"), ("maximum", "<="), ("below", "<")):
        if meta.get(key) is not None:
            bounds.append(f"{symbol} {meta[key]:g}")
    return " and ".join(bounds)


def _check_allowed(name: str, value: Any, source: str) -> None:
    meta = Config.__dataclass_fields__[name].metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"Config field '{name}' in {source} must be a finite number, got "
                        f"{value!r}; pass e.g. --{name}={Config.__dataclass_fields__[name].default}.")
    choices = meta.get("choices")
    inside = value in choices if choices else all((
        meta.get("minimum") is None or value >= meta["minimum"],
        meta.get("above") is None or value > meta["above"],
        meta.get("maximum") is None or value <= meta["maximum"],
        meta.get("below") is None or value < meta["below"]))
    if not inside:
        raise UserError(f"Config field '{name}' in {source} must be {allowed(name)}, got "
                        f"{value!r}; pass e.g. --{name}={Config.__dataclass_fields__[name].default}.")


def describe_fields() -> str:
    """Every config field as `--name=default  help [allowed]`, for `--help`."""
    lines = ["Config fields (each can be set as --name=value):"]
    for item in fields(Config):
        rule = allowed(item.name)
        lines.append(f"  --{item.name}={item.default!r}\n      {item.metadata['help']}"
                     + (f" [{rule}]" if rule else ""))
    return "\n".join(lines)


def fields_markdown() -> str:
    """The README's table of config fields, generated from their declarations."""
    rows = ["| field | default | allowed | what |", "| --- | --- | --- | --- |"]
    for item in fields(Config):
        default = repr(item.default) if isinstance(item.default, str) else str(item.default)
        rows.append(f"| `{item.name}` | `{default}` | {allowed(item.name) or 'any'} | "
                    f"{item.metadata['help'].replace('|', '/')} |")
    return "\n".join(rows)


def load_config(preset: str, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset file, then command-line overrides."""
    config = apply_overrides(Config(), _read_preset(preset), f"preset '{preset}'")
    return apply_overrides(config, overrides or {}, "the command line")
