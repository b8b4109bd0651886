"""FID (Heusel et al. 2017) through torch-fidelity, and `fid_digits` on the digit features.

    FID = |mu_1 - mu_2|^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)),

with (mu, Sigma) the mean and covariance of a feature extractor's activations on each image
set: Inception-v3's 2048-d pool features for `fid` (paper 003 Table 2), the digit classifier's
64-d penultimate features for `fid_digits` (`evaluation.digits_features`). torch-fidelity
extracts the features and computes the distance; the reference set's statistics are cached in
progvae's cache folder under a hash of its pixels and of the extractor's weights, so a dataset
is only ever passed through the extractor once. Grayscale images are replicated to 3 channels.

Nothing here is unpickled: the statistics are `.npz` files (arrays `mu` and `sigma`, the format
of published FID statistics) read without pickle, their headers checked before anything is
allocated; the Inception weights are read as a plain state dict and handed to torch-fidelity as
a copy progvae wrote (torch-fidelity itself would unpickle the file it is given).
FID is biased in the number of samples: always report it with the count.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from progvae.core.atomic import atomic_path
from progvae.core.errors import UserError
from progvae.data.readers import npy_header
from progvae.evaluation.metrics.weights import (cache_dir, file_fingerprint, inception_weights,
                                                load_state_dict_file)
from progvae.training import dist

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
            state = load_state_dict_file(weights_path, "--inception_weights",
                                         "torch-fidelity's Inception-v3 weights")
        elif extractor == "digits":
            from progvae.evaluation.metrics.digits_features import (classifier_path,
                                                                    register_with_torch_fidelity)
            self.name, self.metric = register_with_torch_fidelity(), "fid_digits"
            weights_path = Path(weights) if weights else classifier_path()
        else:
            raise ValueError(f"unknown feature extractor '{extractor}'")
        self.options = {
            "fid": True, "feature_extractor": self.name,
            "cuda": torch.cuda.is_available(), "batch_size": batch_size, "verbose": False,
            "save_cpu_ram": True,         # no DataLoader worker processes
            "cache": False,               # statistics are cached here, as .npz
        }
        self.statistics_dir = cache_dir() / "fid_statistics"
        self.weights_fingerprint = file_fingerprint(weights_path)
        source = weights_path
        with tempfile.TemporaryDirectory() as folder:
            if extractor == "inception":   # torch-fidelity unpickles: give it our own copy
                weights_path = Path(folder) / "inception.pt"
                torch.save(state, weights_path)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    self.layer = resolve_feature_layer_for_metric("fid", **self.options)
                    self.extractor = create_feature_extractor(
                        self.name, [self.layer], feature_extractor_weights_path=str(weights_path),
                        **self.options)
            except Exception as error:   # a state dict of the wrong architecture
                raise UserError(f"'{source}' could not be loaded as the "
                                f"{self.metric} feature extractor's weights "
                                f"({type(error).__name__}); pass the right file.") from None

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

    def reference_statistics(self, reference: np.ndarray) -> dict[str, np.ndarray]:
        """mu and sigma of the extractor's features on `reference`, cached as .npz. Under
        torchrun (every rank calls this) a cache miss is computed once in all: each rank
        extracts the features of its share of the images, the shares are gathered in order,
        and rank 0 writes the file."""
        from torch_fidelity.metric_fid import fid_features_to_statistics

        path = self.statistics_dir / f"{self.reference_key(reference)}.npz"
        if dist.all_ranks_agree(path.is_file()):
            return read_statistics(path)
        features = dist.gather_rows(self.features(reference[dist.shard(len(reference))]))
        statistics = fid_features_to_statistics(features)
        if dist.is_main():
            write_statistics(statistics, path)
        return statistics

    @torch.no_grad()
    def score_features(self, features: torch.Tensor, reference: np.ndarray,
                       statistics: dict[str, np.ndarray] | None = None) -> float:
        """FID between images given by their `features` (all of them: under DDP, every rank's
        gathered) and the uint8 NHWC `reference` set (its statistics cached), or the given
        reference `statistics` (e.g. published ones, from `read_statistics`)."""
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        if statistics is None:
            _check_sizes(len(features), len(reference))
            statistics = self.reference_statistics(reference)
        elif len(features) < 2:
            _check_sizes(len(features), 2)
        if statistics["mu"].shape[0] != features.shape[1]:
            raise UserError(f"The reference statistics have {statistics['mu'].shape[0]} features "
                            f"but {self.metric}'s extractor gives {features.shape[1]}; pass "
                            "statistics of the same extractor.")
        with contextlib.redirect_stdout(io.StringIO()):
            return float(fid_statistics_to_metric(_float64(fid_features_to_statistics(features)),
                                                  _float64(statistics), False)[FID_KEY])

    def __call__(self, samples: np.ndarray, reference: np.ndarray) -> float:
        """FID between uint8 NHWC `samples` and `reference` (statistics cached)."""
        _check_sizes(len(samples), len(reference))
        return self.score_features(self.features(samples), reference)


def _check_sizes(n_samples: int, n_reference: int) -> None:
    if n_samples < 2 or n_reference < 2:
        raise UserError(f"FID needs at least 2 images in each set, got {n_samples} samples and "
                        f"{n_reference} reference images; pass a larger --n_samples.")


def _float64(statistics: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(statistics[name], np.float64) for name in ("mu", "sigma")}


MAX_FEATURES = 8192   # the largest feature dimension read back (Inception's is 2048)


def write_statistics(statistics: dict[str, np.ndarray], path: Path) -> None:
    """FID statistics as .npz (arrays mu and sigma, no pickle), written atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, mu=np.asarray(statistics["mu"], np.float64),
                 sigma=np.asarray(statistics["sigma"], np.float64))


def read_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """FID statistics from an .npz with arrays mu (D,) and sigma (D, D), D <= MAX_FEATURES: no
    pickle, and the array headers are checked before anything is allocated."""
    path = Path(path)
    problem = _statistics_problem(path)
    if problem:
        raise UserError(f"'{path}' is not usable FID statistics ({problem}); pass an .npz with "
                        "arrays mu and sigma, or delete it if it is in progvae's cache.")
    with np.load(path, allow_pickle=False) as stored:
        mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"'{path}' holds NaN or Inf FID statistics; recompute them.")
    return {"mu": mu, "sigma": sigma}


def _statistics_problem(path: Path) -> str:
    """Why `path` cannot be read as FID statistics, or '' if it can."""
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for name in ("mu", "sigma"):
                with archive.open(f"{name}.npy") as stream:
                    shape, dtype = npy_header(stream)
                if dtype.kind != "f":
                    return f"{name} is {dtype}, not floating point"
                shapes[name] = shape
    except KeyError as error:
        return f"no array {error}"
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return (str(error).splitlines() or [type(error).__name__])[0][:120]
    features = shapes["mu"][0] if len(shapes["mu"]) == 1 else -1
    if not 0 < features <= MAX_FEATURES or shapes["sigma"] != (features, features):
        return f"shapes {shapes['mu']} and {shapes['sigma']}, not (D,) and (D, D) with D <= " \
               f"{MAX_FEATURES}"
    return ""
