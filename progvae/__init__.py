"""progvae: two-stage progressive hierarchical VAEs in PyTorch (Shu & Ermon, paper 003).

The handful of names a script needs, importable from `progvae` itself:

    import progvae

    config = progvae.load_config("digits", {"steps": 200, "distortion_target": 0.05})
    progvae.train("stage1", config, "runs/s1")               # stage one, to a distortion target
    progvae.train("stage2", config, "runs/s2", stage1="runs/s1")
    pipeline = progvae.load_pipeline("runs/s2")               # a run directory or exported file
    images = pipeline.sample(16)                              # (16, C, H, W) on [-1, 1]

| name | what it is |
| --- | --- |
| `load_config(preset, overrides)`, `Config` | a preset (or JSON file) with overrides; the typed config |
| `train(kind, config, out, stage1=...)` | train (or continue) a run of a kind: stage1, stage2, joint, vdvae |
| `load_model(run)` | a run's (config, network with EMA weights, facts); run directory or exported file |
| `load_pipeline(run)`, `Pipeline` | the two-stage model: `sample`, `reconstruct`, `elbo` |
| `VDVAE` | one stage's network: `sample`, `reconstruct`, `decode` |
| `load_codec(run)`, `Codec` | the progressive image codec: `compress(image)`, `decompress(data, groups)` |
| `read_image`, `to_model_input`, `to_uint8_images` | an image file as uint8; uint8 NHWC to [-1, 1] NCHW and back |

Names are imported when first used, so `import progvae` itself costs nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Config": "progvae.core.config",
    "load_config": "progvae.core.config",
    "train": "progvae.stages",
    "load_model": "progvae.runs.load",
    "load_pipeline": "progvae.runs.load",
    "Pipeline": "progvae.models.pipeline",
    "VDVAE": "progvae.models.vdvae",
    "load_codec": "progvae.codec.files",
    "Codec": "progvae.codec.coder",
    "read_image": "progvae.data.readers",
    "to_model_input": "progvae.data.loading",
    "to_uint8_images": "progvae.data.loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'progvae' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
