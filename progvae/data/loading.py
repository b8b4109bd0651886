"""Datasets as uint8 NHWC arrays, the conversion to model pixels, and a resumable batch sampler.

A dataset is named by a spec string (the `--data` flag):

| spec          | what it is                                                                  |
| ------------- | --------------------------------------------------------------------------- |
| `digits`      | scikit-learn's bundled 8×8 handwritten digits, upsampled; 1 channel         |
| `patches`     | crops of scikit-learn's two bundled photographs (china, flower); 3 channels |
| `photos`      | crops of eleven photographs scikit-image, scikit-learn and matplotlib ship (the codec's data; progvae/data/photos.py) |
| `folder:PATH` | PNG/JPEG/BMP files under PATH (split 90/10, or PATH/train and PATH/test)    |
| `npz:PATH`    | a .npz holding uint8 arrays under the keys `train` and `test`               |
| `svhn:DIR`    | SVHN's train_32x32.mat / test_32x32.mat (+ extra_32x32.mat)                 |
| `celeba:DIR`  | CelebA's img_align_celeba/ and list_eval_partition.txt, as CelebA-64        |
| `lsun:DIR`    | an LSUN LMDB (e.g. bedroom_train_lmdb) or a folder of exported images       |
| `cifar10:PATH` | CIFAR-10's binary release: cifar-10-binary.tar.gz or its extracted folder  |
| `imagenet32:DIR`, `imagenet64:DIR` | downsampled ImageNet: VDVAE's .npy files or the official .npz batches |

Every split is fixed: the held-out images never change with the training seed, so runs with
different seeds are evaluated on the same images. The on-disk datasets (all but `npz:`) are
decoded once into a cache of memory-mapped uint8 arrays (progvae/data/readers.py reads them,
progvae/data/cache.py keeps them); the built-in datasets and `npz:` are read directly.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from progvae.core.errors import UserError
from progvae.data.cache import CacheEntry, load_cached
from progvae.data.readers import (SPLIT_SEED, celeba_recipe, cifar10_recipe, folder_recipe,
                                  imagenet_recipe, list_images, lsun_recipe, svhn_recipe)

BUILT_IN = ("digits", "patches", "photos")   # the datasets `load_data` makes itself
PATH_HINTS = {  # what each on-disk spec's path names, for the message when it is left out
    "folder": "a folder of images",
    "npz": "a .npz file with train and test arrays",
    "svhn": "the folder holding train_32x32.mat and test_32x32.mat",
    "celeba": "the folder holding img_align_celeba/ and list_eval_partition.txt",
    "lsun": "an LSUN LMDB folder (e.g. bedroom_train_lmdb) or a folder of exported images",
    "cifar10": "cifar-10-binary.tar.gz or the folder it extracts to",
    "imagenet32": "the folder holding imagenet32-train.npy and imagenet32-valid.npy (or the "
                  "official .npz batches)",
    "imagenet64": "the folder holding imagenet64-train.npy and imagenet64-valid.npy (or the "
                  "official .npz batches)",
}
# Every spec `load_data` dispatches on, as error messages list them.
VALID_SPECS = ", ".join([*BUILT_IN, *(
    f"{prefix}:{'PATH' if prefix in ('folder', 'npz', 'cifar10') else 'DIR'}"
    for prefix in PATH_HINTS)])
NATURAL_SIZES = {"digits": 16, "patches": 32, "photos": 64, "svhn": 32, "celeba": 64, "lsun": 64,
                 "cifar10": 32, "imagenet32": 32, "imagenet64": 64}
PATCHES_SEED = 4321  # fixes the crop positions and flips of `patches`
DIGITS_TEST_SIZE = 297  # 1797 digits = 1500 train + 297 test
PATCHES_PER_IMAGE_TRAIN = 3000
PATCHES_PER_IMAGE_TEST = 300
PATCHES_HELD_OUT_EVERY = 5  # a fifth of each photo's tiles hold the held-out crops
PATCHES_MIN_TILES = 5  # tiles per photo, so that at least one is held out


@dataclass
class ImageData:
    """A dataset: uint8 images in (N, H, W, C) layout, C in {1, 3}, in memory or memory-mapped
    from the cache (plain ndarrays either way: index them, or wrap them with torch.from_numpy)."""

    train: np.ndarray  # (N, H, W, C) uint8
    test: np.ndarray  # (M, H, W, C) uint8, the held-out split, never empty
    name: str  # the resolved spec, e.g. "digits" or "folder:/abs/path"
    valid: np.ndarray | None = None  # a validation split, where the dataset defines one (CelebA)
    cache: CacheEntry | None = None  # where a cached dataset lives and whether it was rebuilt

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return int(self.train.shape[1])

    @property
    def channels(self) -> int:
        """Number of colour channels: 1 (grayscale) or 3 (RGB)."""
        return int(self.train.shape[3])


def load_data(spec: str, image_size: int, resize: bool = False, *,
              svhn_extra: bool = False, cache_dir: str | Path = "", workers: int = 0) -> ImageData:
    """Load the dataset named by `spec` at `image_size`×`image_size` pixels.

    No split depends on a run's seed (see the module docstring). `resize=True` lets a `folder:` dataset whose images are not
    `image_size`×`image_size` be resized (bilinear, antialiased). `svhn_extra=True` adds SVHN's
    extra_32x32.mat to its training split. `cache_dir` overrides where cached datasets live
    (see progvae.data.cache.cache_root) and `workers` how many processes decode images while a cache
    is built (0: one per core). Raises `UserError` with one sentence naming the problem and the
    fix for any bad input.
    """
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}; pass e.g. --image_size=32.")
    image_size = int(image_size)
    if spec in BUILT_IN:
        return {"digits": _load_digits, "patches": _load_patches,
                "photos": _load_photos}[spec](image_size)
    prefix, _, path_text = spec.partition(":")
    if prefix not in PATH_HINTS:
        raise UserError(f"Unknown dataset {spec!r}; pass --data as one of {VALID_SPECS}.")
    path = _existing_path(path_text, prefix)
    if prefix == "npz":
        return _load_npz(path, image_size)
    if prefix == "cifar10":
        recipe = cifar10_recipe(path, image_size)
        arrays, entry = load_cached(recipe, cache_dir)
        return ImageData(train=arrays["train"], test=arrays["test"], name=f"{prefix}:{path}",
                         cache=entry)
    if prefix != "folder" and not path.is_dir():
        raise UserError(f"The data path {path} is not a folder; pass {PATH_HINTS[prefix]} as --data={prefix}:DIR.")
    if prefix == "svhn":
        recipe = svhn_recipe(path, image_size, svhn_extra)
    elif prefix == "celeba":
        recipe = celeba_recipe(path, image_size, workers)
    elif prefix == "lsun":
        recipe = lsun_recipe(path, image_size, workers)
    elif prefix in ("imagenet32", "imagenet64"):
        recipe = imagenet_recipe(path, image_size, NATURAL_SIZES[prefix])
    else:
        recipe = folder_recipe(path, image_size, resize, workers)
    arrays, entry = load_cached(recipe, cache_dir)
    return ImageData(train=arrays["train"], test=arrays["test"], valid=arrays.get("valid"),
                     name=f"{prefix}:{path}", cache=entry)


def load_data_for(config) -> ImageData:
    """`load_data` with every data field of a `progvae.core.config.Config`: data, image_size,
    resize, svhn_extra, cache_dir and data_workers. Commands that load a run's data call this,
    so a new data field reaches all of them."""
    return load_data(config.data, config.image_size, resize=config.resize,
                     svhn_extra=config.svhn_extra, cache_dir=config.cache_dir,
                     workers=config.data_workers)


def natural_image_size(spec: str) -> int:
    """The image size a dataset comes at, for commands where the user need not know it: 64 for
    CelebA-64, LSUN-64 and ImageNet-64, 32 for SVHN, CIFAR-10, ImageNet-32 and `patches`, 16 for
    `digits` (the size its preset and the demo train at), the stored size for `npz:`, and the
    first image's size for a `folder:` of square images."""
    prefix, _, path_text = spec.partition(":")
    if prefix in NATURAL_SIZES:
        return NATURAL_SIZES[prefix]
    if prefix not in PATH_HINTS:
        raise UserError(f"Unknown dataset {spec!r}; pass --data as one of {VALID_SPECS}.")
    path = _existing_path(path_text, prefix)
    if prefix == "npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                shape = archive["train"].shape if "train" in archive.files else ()
        except (OSError, ValueError, zipfile.BadZipFile):
            shape = ()
        return int(shape[1]) if len(shape) >= 3 else 32  # load_data names any problem
    files = list_images(path / "train" if (path / "train").is_dir() else path) if path.is_dir() else []
    if not files:
        return 32  # load_data names the problem
    from PIL import Image

    try:
        with Image.open(files[0]) as image:
            width, height = image.size
    except Exception:
        return 32  # load_data names the unreadable file
    if width != height:
        raise UserError(f"{files[0]} is {width}x{height}, not square; pass --image_size=N --resize=True.")
    return width


def to_model_input(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 → (B, C, H, W) float32 in [−1, 1] by v ↦ v/127.5 − 1."""
    return batch_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


CHANNEL_ORDERS = np.array([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])


def augment_batch(images: torch.Tensor, augment: str, rng: np.random.Generator) -> torch.Tensor:
    """uint8 NHWC training images, augmented as --augment says (`none`: as they are;
    `channels`: each image's colour channels in one of the six orders, drawn from `rng`)."""
    if augment == "none" or images.shape[-1] != 3:
        return images
    orders = torch.from_numpy(CHANNEL_ORDERS[rng.integers(0, len(CHANNEL_ORDERS),
                                                          size=len(images))])
    return torch.gather(images, 3, orders[:, None, None, :].expand_as(images))


def device_batch(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 NHWC images (an array or a tensor) as model input on `device`: the uint8 pixels
    travel (from pinned memory, without blocking, on CUDA) and are converted there, a quarter
    of the bytes of float32 and no conversion on the host."""
    device = torch.device(device)
    pixels = images if isinstance(images, torch.Tensor) else \
        torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    return to_model_input(pixels.to(device, non_blocking=True))


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float on the [−1, 1] scale → (B, H, W, C) uint8, clamped and rounded.

    The exact inverse of `to_model_input` on its outputs.
    """
    pixels = (x.detach().float() + 1.0).mul(127.5).clamp(0, 255).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class BatchSampler:
    """Seeded per-epoch shuffling that can stop and resume at any batch.

    Each epoch is a permutation drawn from `(seed, epoch)` alone, so the sequence of batches
    depends only on the seed and a resumed sampler continues exactly where it stopped.
    `batch_size` is per rank: each step consumes a global batch of `batch_size * world_size`
    indices from the permutation and rank r takes the r-th slice, so ranks never overlap.
    With `drop_last=False` the last, short global batch is padded (by wrapping round to the start
    of the permutation) to a multiple of `world_size`, so every rank gets an equal, non-empty batch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        global_batch = batch_size * world_size
        if batch_size < 1 or n < 1 or (drop_last and n < global_batch):
            raise UserError(
                f"The dataset has {n} training images, fewer than one batch of {global_batch} "
                f"({batch_size} per process × {world_size} processes); lower --batch_size."
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = global_batch
        self.batches_per_epoch = n // global_batch if drop_last else math.ceil(n / global_batch)
        self.epoch = 0
        self.position = 0  # global batches already taken in the current epoch
        self._permutation = self._epoch_permutation(0)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> np.ndarray:
        """Indices of this rank's next batch; moves to a fresh shuffle at the end of an epoch."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._permutation = self._epoch_permutation(self.epoch)
        start = self.position * self.global_batch
        global_indices = self._permutation[start : start + self.global_batch]
        self.position += 1
        if len(global_indices) < self.global_batch:  # only with drop_last=False, at epoch end
            per_rank = math.ceil(len(global_indices) / self.world_size)
            padding = np.resize(self._permutation, per_rank * self.world_size - len(global_indices))
            global_indices = np.concatenate([global_indices, padding])
        else:
            per_rank = self.batch_size
        return global_indices[self.rank * per_rank : (self.rank + 1) * per_rank].copy()

    def batch_generator(self) -> np.random.Generator:
        """A generator for the batch `next_indices` last gave (augmentation's draws): seeded by
        the seed, the epoch, the batch's place in it and the rank, so a resumed run draws the
        same."""
        return np.random.default_rng([self.seed, self.epoch, self.position, self.rank, 1])

    def state_dict(self) -> dict:
        """The epoch and position in it; with the seed that is all a resume needs."""
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the exact index sequence of the sampler that wrote `state`."""
        if state.get("n", self.n) != self.n:
            raise UserError(
                f"The checkpoint was trained on a dataset of {state['n']} images but this one has "
                f"{self.n}; resume with the same --data."
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._permutation = self._epoch_permutation(self.epoch)


# ---------------------------------------------------------------- built-in datasets


def _load_digits(image_size: int) -> ImageData:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    if image_size not in (8, 16, 32):
        raise UserError(
            f"The digits dataset supports image_size 8, 16 or 32, got {image_size}; pass --image_size=32."
        )
    digits = torch.from_numpy(load_digits().images).float().mul(255.0 / 16.0)[:, None]  # (N, 1, 8, 8)
    if image_size != 8:
        digits = F.interpolate(digits, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = digits.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, S, S, 1)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    train, test = images[order[:-DIGITS_TEST_SIZE]], images[order[-DIGITS_TEST_SIZE:]]
    return ImageData(train=train, test=test, name="digits")


def _load_photos(image_size: int) -> ImageData:
    from progvae.data.photos import load_photos

    train, test = load_photos(image_size)
    return ImageData(train=train, test=test, name="photos")


def _load_patches(image_size: int) -> ImageData:
    """Crops of the two photographs. Each photo is cut into square tiles 1.5 crops wide; a crop
    lies inside one tile, so no held-out crop shares a pixel with a training crop. The held-out
    tiles are every fifth tile in order of detail (mean absolute vertical difference), so the
    held-out split is as detailed as the training split. (Earlier versions held out the photos'
    right-hand fifth, 21% smoother than the rest, so held-out rates and distortions were
    unlike training's.)"""
    from sklearn.datasets import load_sample_images  # china.jpg and flower.jpg, 427×640 RGB

    photos = load_sample_images().images
    height, width, _ = photos[0].shape
    tile = image_size + image_size // 2
    if (height // tile) * (width // tile) < PATCHES_MIN_TILES:
        largest = max(size for size in range(1, height + 1)
                      if (height // (size + size // 2)) * (width // (size + size // 2))
                      >= PATCHES_MIN_TILES)
        raise UserError(f"The patches dataset supports image_size up to {largest}, got "
                        f"{image_size}; pass a smaller --image_size.")
    rng = np.random.default_rng(PATCHES_SEED)
    train, test = [], []
    for photo in photos:
        rows, columns = height // tile, width // tile
        top, left = (height - rows * tile) // 2, (width - columns * tile) // 2
        corners = np.array([(top + row * tile, left + column * tile)
                            for row in range(rows) for column in range(columns)])
        detail = [np.abs(np.diff(photo[y:y + tile, x:x + tile].astype(np.int16), axis=0)).mean()
                  for y, x in corners]
        held_out = np.zeros(len(corners), dtype=bool)
        held_out[np.argsort(detail, kind="stable")[2::PATCHES_HELD_OUT_EVERY]] = True
        # every (y, x) corner of a crop, as a view: (H-S+1, W-S+1, C, S, S)
        windows = np.lib.stride_tricks.sliding_window_view(photo, (image_size, image_size), axis=(0, 1))
        for crops, count, tiles in ((train, PATCHES_PER_IMAGE_TRAIN, corners[~held_out]),
                                    (test, PATCHES_PER_IMAGE_TEST, corners[held_out])):
            chosen = tiles[rng.integers(0, len(tiles), size=count)]
            offsets = rng.integers(0, tile - image_size, size=(count, 2), endpoint=True)
            corner = chosen + offsets
            crops.append(windows[corner[:, 0], corner[:, 1]].transpose(0, 2, 3, 1))  # (count, S, S, C)
    splits = []
    for crops in (np.concatenate(train), np.concatenate(test)):
        flipped = rng.permutation(len(crops))[: len(crops) // 2]
        crops[flipped] = crops[flipped, :, ::-1]
        splits.append(np.ascontiguousarray(crops))
    return ImageData(train=splits[0], test=splits[1], name="patches")


# ---------------------------------------------------------------- files on disk


def _existing_path(path_text: str, prefix: str) -> Path:
    if not path_text:
        raise UserError(f"--data={prefix} needs a path; pass --data={prefix}:PATH with {PATH_HINTS[prefix]}.")
    path = Path(path_text).expanduser().resolve()
    if not path.exists():
        raise UserError(f"The data path {path} does not exist; check the path given in --data={prefix}:PATH.")
    return path


def _load_npz(path: Path, image_size: int) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("train", "test") if key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"Could not read {path} as a .npz archive ({error}); save it with numpy.savez.") from None
    splits = []
    for key in ("train", "test"):
        if key not in arrays:
            raise UserError(
                f"{path} has no array under the key {key!r}; save it with numpy.savez(path, train=..., test=...)."
            )
        images = arrays[key]
        if images.dtype != np.uint8:
            raise UserError(
                f"{path}[{key!r}] holds {images.dtype} values but must be uint8; convert it with .astype(np.uint8)."
            )
        if images.ndim == 3:
            images = images[..., None]  # (N, H, W) grayscale
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise UserError(
                f"{path}[{key!r}] has shape {arrays[key].shape} but must be (N, H, W, C) with C 1 or 3, "
                f"or (N, H, W); store images channels-last."
            )
        if len(images) == 0:
            raise UserError(f"{path}[{key!r}] holds no images; store at least one image in each split.")
        if images.shape[1:3] != (image_size, image_size):
            raise UserError(
                f"{path}[{key!r}] holds {images.shape[2]}x{images.shape[1]} images but the config expects "
                f"{image_size}x{image_size}; pass --image_size={images.shape[1]} or resize the arrays."
            )
        splits.append(images)
    if splits[0].shape[3] != splits[1].shape[3]:
        raise UserError(
            f"{path} has {splits[0].shape[3]}-channel train but {splits[1].shape[3]}-channel test images; "
            f"store both with the same number of channels."
        )
    return ImageData(train=splits[0], test=splits[1], name=f"npz:{path}")


# ---------------------------------------------------------------- inspecting a dataset


def describe(data: ImageData, sample: int = 10_000) -> list[str]:
    """Lines telling what a dataset holds: per split its count, shape, dtype and pixel range
    (over up to `sample` evenly spaced images, so a memory-mapped split is not read whole), and
    where its cache lives."""
    splits = {"train": data.train, "valid": data.valid, "test": data.test}
    lines = [data.name, f"  {'split':<6} {'images':>10}  {'image shape':<13} {'dtype':<6} {'pixel range':<12} mean"]
    for split, images in splits.items():
        if images is None:
            continue
        picked = images[evenly_spaced(len(images), sample)]
        note = "" if len(picked) == len(images) else f"  (of {len(picked):,} evenly spaced images)"
        lines.append(f"  {split:<6} {len(images):>10,}  {str(tuple(images.shape[1:])):<13} {str(images.dtype):<6} "
                     f"{f'{picked.min()}..{picked.max()}':<12} {picked.mean():.1f}{note}")
    lines.append("  held-out split: test" + (" (valid is also held out; training uses train only)"
                                             if data.valid is not None else ""))
    if data.cache is None:
        lines.append("  cache: none (read directly)")
    else:
        manifest = data.cache.manifest
        lines.append(f"  cache: {data.cache.directory} ({data.cache.status}; {data.cache.size_bytes / 1e6:,.1f} MB; "
                     f"built {manifest['built_at']} in {manifest['build_seconds']:.1f} s)")
        lines.append(f"  preprocessing (version {manifest['preprocessing']['version']}): "
                     f"{manifest['preprocessing']['description']}")
    return lines


def evenly_spaced(count: int, most: int) -> np.ndarray:
    """Up to `most` indices spread evenly over range(count), in order."""
    return np.unique(np.linspace(0, count - 1, min(count, most)).round().astype(np.int64))
