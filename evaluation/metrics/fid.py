"""FID (Heusel et al. 2017) through torch-fidelity, and `fid_digits` on the digit features.

    FID = |mu_1 - mu_2|^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)),

with (mu, Sigma) the mean and covariance of a feature extractor's activations on each image
set: Inception-v3's 2048-d pool features for `fid` (paper 003 Table 2), the digit classifier's
64-d penultimate features for `fid_digits` (`evaluation.digits_features`). torch-fidelity
extracts the features and computes the distance; the reference set's statistics are cached in
progvae's cache folder under a hash of its pixels and of the extractor's weights, so a dataset
is only ever passed through the extractor once. Grayscale images are replicated to 3 channels.
FID is biased in the number of samples: always report it with the count.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from progvae.errors import UserError
from progvae.evaluation.metrics.weights import cache_dir, file_fingerprint, inception_weights

INCEPTION = "inception-v3-compat"   # torch-fidelity's name for its FID Inception
FID_KEY = "frechet_inception_distance"  # torch-fidelity's result key (whatever the extractor)


class ImageArray(Dataset):
    """uint8 NHWC images as torch-fidelity wants them: (3, H, W) uint8 tensors."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} "
                             f"{images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), by torch-fidelity's
    implementation (the one every FID here uses)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    as_stats = lambda mu, sigma: {"mu": np.asarray(mu, np.float64),  # noqa: E731
                                  "sigma": np.asarray(sigma, np.float64)}
    return fid_statistics_to_metric(as_stats(mu1, sigma1), as_stats(mu2, sigma2),
                                    verbose=False)[FID_KEY]


class FidScorer:
    """FID of image sets against a reference set, with one feature extractor built once.

    `FidScorer("inception", weights)` is the standard FID (`weights`: a local torch-fidelity
    Inception file, else torch's hub cache or a download); `FidScorer("digits")` gives
    `fid_digits`. A missing or wrong weights file raises a UserError at construction, before
    any work is done.
    """

    def __init__(self, extractor: str = "inception", weights: str | Path | None = None,
                 batch_size: int = 64):
        from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

        if extractor == "inception":
            self.name, self.metric = INCEPTION, "fid"
            weights_path = inception_weights(weights)
        elif extractor == "digits":
            from progvae.evaluation.metrics.digits_features import (classifier_path,
                                                            register_with_torch_fidelity)
            self.name, self.metric = register_with_torch_fidelity(), "fid_digits"
            weights_path = Path(weights) if weights else classifier_path()
        else:
            raise ValueError(f"unknown feature extractor '{extractor}'")
        self.options = {
            "fid": True, "feature_extractor": self.name,
            "feature_extractor_weights_path": str(weights_path),
            "cuda": torch.cuda.is_available(), "batch_size": batch_size, "verbose": False,
            "save_cpu_ram": True,         # no DataLoader worker processes
            "cache": True, "cache_root": str(cache_dir() / "fid_statistics"),
        }
        self.weights_fingerprint = file_fingerprint(weights_path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.layer = resolve_feature_layer_for_metric("fid", **self.options)
                self.extractor = create_feature_extractor(self.name, [self.layer],
                                                          **self.options)
        except Exception as error:   # a file of the wrong architecture or not a state dict
            raise UserError(f"'{weights_path}' could not be loaded as the {self.metric} feature "
                            f"extractor's weights ({type(error).__name__}); pass the right "
                            "file.") from None

    def reference_key(self, reference: np.ndarray) -> str:
        """Cache name of a reference set's statistics: its pixels and the extractor weights."""
        digest = hashlib.sha1(str(reference.shape).encode())
        digest.update(np.ascontiguousarray(reference).tobytes())
        return f"progvae-{digest.hexdigest()[:16]}-{self.weights_fingerprint}"

    @torch.no_grad()
    def features(self, samples: np.ndarray) -> torch.Tensor:
        """The extractor's features (N, D) of uint8 NHWC images, on the CPU."""
        from torch_fidelity.utils import get_featuresdict_from_dataset

        with contextlib.redirect_stdout(io.StringIO()):
            features = get_featuresdict_from_dataset(
                ImageArray(samples), self.extractor, self.options["batch_size"],
                self.options["cuda"], self.options["save_cpu_ram"], False)
        return features[self.layer].cpu()

    @torch.no_grad()
    def score_features(self, features: torch.Tensor, reference: np.ndarray) -> float:
        """FID between images given by their `features` (all of them: under DDP, every rank's
        gathered) and the uint8 NHWC `reference` set (its statistics cached)."""
        from torch_fidelity.metric_fid import (fid_features_to_statistics,
                                               fid_input_id_to_statistics_cached,
                                               fid_statistics_to_metric)

        _check_sizes(len(features), len(reference))
        Path(self.options["cache_root"]).mkdir(parents=True, exist_ok=True)
        options = {**self.options, "input2": ImageArray(reference),
                   "input2_cache_name": self.reference_key(reference)}
        with contextlib.redirect_stdout(io.StringIO()):
            reference_statistics = fid_input_id_to_statistics_cached(
                2, self.extractor, self.layer, **options)
            statistics = fid_features_to_statistics(features)
            return float(fid_statistics_to_metric(statistics, reference_statistics,
                                                  False)[FID_KEY])

    def __call__(self, samples: np.ndarray, reference: np.ndarray) -> float:
        """FID between uint8 NHWC `samples` and `reference` (statistics cached)."""
        _check_sizes(len(samples), len(reference))
        return self.score_features(self.features(samples), reference)


def _check_sizes(n_samples: int, n_reference: int) -> None:
    if n_samples < 2 or n_reference < 2:
        raise UserError(f"FID needs at least 2 images in each set, got {n_samples} samples and "
                        f"{n_reference} reference images; pass a larger --n_samples.")
