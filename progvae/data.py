"""Datasets as uint8 NHWC arrays, the conversion to model pixels, and a resumable batch sampler.

A dataset is named by a spec string (the `--data` flag):

| spec          | what it is                                                                  |
| ------------- | --------------------------------------------------------------------------- |
| `digits`      | scikit-learn's bundled 8×8 handwritten digits, upsampled; 1 channel         |
| `patches`     | crops of scikit-learn's two bundled photographs (china, flower); 3 channels |
| `folder:PATH` | PNG/JPEG/BMP files under PATH (split 90/10, or PATH/train and PATH/test)    |
| `npz:PATH`    | a .npz holding uint8 arrays under the keys `train` and `test`               |

Every split is fixed: the held-out images never change with the training seed, so runs with
different seeds are evaluated on the same images. Nothing is cached on disk.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from progvae.errors import UserError

VALID_SPECS = "digits, patches, folder:PATH, npz:PATH"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
SPLIT_SEED = 1234  # fixes the train/test permutation of `digits` and `folder:` datasets
PATCHES_SEED = 4321  # fixes the crop positions and flips of `patches`
DIGITS_TEST_SIZE = 297  # 1797 digits = 1500 train + 297 test
PATCHES_PER_IMAGE_TRAIN = 3000
PATCHES_PER_IMAGE_TEST = 300
PATCHES_TRAIN_FRACTION = 0.8  # train crops come from the left 80% of each photo's width
FOLDER_TEST_FRACTION = 0.1


@dataclass
class ImageData:
    """A dataset held in memory: uint8 images in (N, H, W, C) layout, C in {1, 3}."""

    train: np.ndarray  # (N, H, W, C) uint8
    test: np.ndarray  # (M, H, W, C) uint8, the held-out split, never empty
    name: str  # the resolved spec, e.g. "digits" or "folder:/abs/path"

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return int(self.train.shape[1])

    @property
    def channels(self) -> int:
        """Number of colour channels: 1 (grayscale) or 3 (RGB)."""
        return int(self.train.shape[3])


def load_data(spec: str, image_size: int, seed: int = 0, resize: bool = False) -> ImageData:
    """Load the dataset named by `spec` at `image_size`×`image_size` pixels.

    `seed` is accepted so callers can pass their run seed, but no split depends on it (see the
    module docstring). `resize=True` lets a `folder:` dataset whose images are not
    `image_size`×`image_size` be resized (bilinear, antialiased). Raises `UserError` with one
    sentence naming the problem and the fix for any bad input.
    """
    del seed  # every split is fixed on purpose
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}; pass e.g. --image_size=32.")
    if spec == "digits":
        return _load_digits(image_size)
    if spec == "patches":
        return _load_patches(image_size)
    prefix, _, path_text = spec.partition(":")
    if prefix in ("folder", "npz"):
        path = _existing_path(path_text, prefix)
        if prefix == "folder":
            return _load_folder(path, image_size, resize)
        return _load_npz(path, image_size)
    raise UserError(f"Unknown dataset {spec!r}; pass --data as one of {VALID_SPECS}.")


def to_model_input(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 → (B, C, H, W) float32 in [−1, 1] by v ↦ v/127.5 − 1."""
    return batch_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


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


def _load_patches(image_size: int) -> ImageData:
    from sklearn.datasets import load_sample_images  # china.jpg and flower.jpg, 427×640 RGB

    photos = load_sample_images().images
    height, width, _ = photos[0].shape
    split_column = int(width * PATCHES_TRAIN_FRACTION)
    if image_size > min(height, width - split_column):
        raise UserError(
            f"The patches dataset supports image_size up to {width - split_column}, got {image_size}; "
            f"pass a smaller --image_size."
        )
    rng = np.random.default_rng(PATCHES_SEED)
    train, test = [], []
    for photo in photos:
        # every (y, x) corner of a crop, as a view: (H-S+1, W-S+1, C, S, S)
        windows = np.lib.stride_tricks.sliding_window_view(photo, (image_size, image_size), axis=(0, 1))
        for crops, count, (x_low, x_high) in (
            (train, PATCHES_PER_IMAGE_TRAIN, (0, split_column - image_size)),
            (test, PATCHES_PER_IMAGE_TEST, (split_column, width - image_size)),
        ):
            corner_y = rng.integers(0, height - image_size, size=count, endpoint=True)
            corner_x = rng.integers(x_low, x_high, size=count, endpoint=True)
            crops.append(windows[corner_y, corner_x].transpose(0, 2, 3, 1))  # (count, S, S, C)
    splits = []
    for crops in (np.concatenate(train), np.concatenate(test)):
        flipped = rng.permutation(len(crops))[: len(crops) // 2]
        crops[flipped] = crops[flipped, :, ::-1]
        splits.append(np.ascontiguousarray(crops))
    return ImageData(train=splits[0], test=splits[1], name="patches")


# ---------------------------------------------------------------- files on disk


def _existing_path(path_text: str, prefix: str) -> Path:
    if not path_text:
        raise UserError(f"--data={prefix}: needs a path; pass --data={prefix}:/path/to/data.")
    path = Path(path_text).expanduser().resolve()
    if not path.exists():
        raise UserError(f"The data path {path} does not exist; check the path given in --data={prefix}:PATH.")
    return path


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _load_folder(folder: Path, image_size: int, resize: bool) -> ImageData:
    if not folder.is_dir():
        raise UserError(f"The data path {folder} is not a folder; pass a folder of images as --data=folder:PATH.")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        split_files = [_list_images(folder / "train"), _list_images(folder / "test")]
        for subfolder, files in zip(("train", "test"), split_files):
            if not files:
                raise UserError(f"The folder {folder / subfolder} holds no PNG, JPEG or BMP images; add some.")
        images = _read_images(split_files[0] + split_files[1], image_size, resize)
        train, test = images[: len(split_files[0])], images[len(split_files[0]) :]
    else:
        files = _list_images(folder)
        if len(files) < 2:
            raise UserError(
                f"The folder {folder} holds {len(files)} PNG, JPEG or BMP images but needs at least 2 "
                f"(one to train on, one to test on); add images to it."
            )
        images = _read_images(files, image_size, resize)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
        test_count = max(1, int(len(images) * FOLDER_TEST_FRACTION))
        train, test = images[order[:-test_count]], images[order[-test_count:]]
    return ImageData(train=train, test=test, name=f"folder:{folder}")


def _read_images(files: list[Path], image_size: int, resize: bool) -> np.ndarray:
    """Read, check and stack image files into (N, S, S, C) uint8; C is 3 if any file is colour."""
    import imageio.v3 as iio

    images = []
    for file in files:
        try:
            with warnings.catch_warnings():  # imageio warns while it tries fallback plugins
                warnings.simplefilter("ignore")
                image = np.asarray(iio.imread(file))
        except Exception:  # imageio raises many types, with plugin-install advice that misleads here
            raise UserError(
                f"Could not read {file} as an image (it is corrupt or not really a PNG, JPEG or BMP); "
                f"remove or replace the file."
            ) from None
        image = _as_uint8_hwc(image, file)
        if resize:
            image = _resize(image, image_size)
        elif image.shape[:2] != (image_size, image_size):
            if images:
                raise UserError(
                    f"Images differ in size: {files[0]} is {_size_text(images[0])} but {file} is "
                    f"{_size_text(image)}; make them one size or pass --resize=True."
                )
            suggestion = f"--image_size={image.shape[0]} or " if image.shape[0] == image.shape[1] else ""
            raise UserError(
                f"{file} is {_size_text(image)} but the config expects {image_size}x{image_size}; "
                f"pass {suggestion}--resize=True."
            )
        images.append(image)
    if len({image.shape[2] for image in images}) > 1:  # mixed grayscale and colour: all colour
        images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
    return np.stack(images)


def _as_uint8_hwc(image: np.ndarray, file: Path) -> np.ndarray:
    """Any decoded image → (H, W, C) uint8 with C in {1, 3}: alpha dropped, 16-bit scaled down."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise UserError(f"{file} has an unsupported pixel layout {image.shape}; save it as grayscale or RGB.")
    image = image[:, :, :1] if image.shape[2] == 2 else image[:, :, :3]  # drop alpha
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        raise UserError(f"{file} has {image.dtype} pixels; save it with 8-bit channels.")
    return image


def _resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, C) uint8 → (S, S, C) uint8, bilinear with antialiasing (aspect ratio not kept)."""
    if image.shape[:2] == (image_size, image_size):
        return image
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    pixels = F.interpolate(
        pixels, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )
    return pixels[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _size_text(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"  # width x height


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
