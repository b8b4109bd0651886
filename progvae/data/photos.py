"""The built-in `photos` dataset: random crops of whole photographs that installed packages ship,
for training the codec (progvae/codec). Nothing is downloaded.

Training photographs (scikit-image's data folder and scikit-learn's sample images) and the
held-out ones are disjoint: the held-out split is crops of coffee, flower and matplotlib's
grace_hopper, the photographs the codec is judged on (docs/codec.md), so no held-out crop
shares a pixel with any training crop. Each photograph gives the same number of crops (drawn
uniformly over its positions), and half of them are mirrored. (Until the shipped weights' first
phase, crops were spread over every pixel, so that the 2-megapixel retina, mostly black, and
the dark Hubble field made 60% of them: training distortion met its target while held-out
distortion was 2.0 to 2.4 times it.)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from progvae.core.errors import UserError

PHOTOS_SEED = 2718          # fixes the crops and flips of `photos`
TRAIN_CROPS = 12_000
TEST_CROPS = 600
SMALLEST_SIDE = 300         # the smallest photograph's shorter side (chelsea)


@dataclass(frozen=True)
class Photo:
    """A photograph a package ships: the package, the file inside its data folder, what it
    shows and its licence (as the package documents it)."""

    name: str
    package: str
    file: str
    licence: str


TRAINING = (
    Photo("astronaut", "skimage", "data/astronaut.png", "public domain (NASA)"),
    Photo("chelsea", "skimage", "data/chelsea.png", "CC0 (Stefan van der Walt)"),
    Photo("rocket", "skimage", "data/rocket.jpg", "public domain (SpaceX)"),
    Photo("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", "public domain (NASA)"),
    Photo("immunohistochemistry", "skimage", "data/ihc.png", "no known copyright restrictions "
          "(CMMI)"),
    Photo("retina", "skimage", "data/retina.jpg", "CC0 (Mikael Häggström)"),
    Photo("motorcycle_left", "skimage", "data/motorcycle_left.png", "Middlebury 2014 stereo "
          "benchmark (Scharstein et al.), as scikit-image redistributes it"),
    Photo("motorcycle_right", "skimage", "data/motorcycle_right.png", "Middlebury 2014 stereo "
          "benchmark (Scharstein et al.), as scikit-image redistributes it"),
    Photo("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele)"),
)
HELD_OUT = (
    Photo("coffee", "skimage", "data/coffee.png", "CC0 (Rachel Michetti)"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion)"),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
          "public domain (US Navy)"),
)


def photo_path(photo: Photo) -> Path:
    """Where the installed package keeps the photograph (found without importing it)."""
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        install = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(photo.package,
                                                                             photo.package)
        raise UserError(f"The photos dataset reads {photo.name} from {install}, which is not "
                        f"installed; pip install {install}.")
    path = Path(spec.submodule_search_locations[0]) / photo.file
    if not path.is_file():
        raise UserError(f"{photo.name} is missing from the installed {photo.package} ({path}); "
                        f"reinstall {photo.package}.")
    return path


def read_photo(photo: Photo) -> np.ndarray:
    """The photograph as (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(photo_path(photo)) as image:
        return np.asarray(image.convert("RGB"))


def load_photos(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`photos` at `image_size`: (train, test), TRAIN_CROPS crops of the training photographs
    and TEST_CROPS of the held-out ones, (N, S, S, 3) uint8, the same on every call."""
    if image_size > SMALLEST_SIDE:
        raise UserError(f"The photos dataset supports image_size up to {SMALLEST_SIDE}, got "
                        f"{image_size}; pass a smaller --image_size.")
    rng = np.random.default_rng(PHOTOS_SEED)
    train, test = (_crops([read_photo(p) for p in photos], image_size, count, rng)
                   for photos, count in ((TRAINING, TRAIN_CROPS), (HELD_OUT, TEST_CROPS)))
    return train, test


def _crops(photos: list[np.ndarray], size: int, count: int, rng: np.random.Generator
           ) -> np.ndarray:
    """`count` crops of side `size`, each from a photo drawn uniformly, at a position drawn
    uniformly in it, half of them mirrored left to right."""
    which = rng.choice(len(photos), size=count)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for index, photo in enumerate(photos):
        chosen = np.flatnonzero(which == index)
        top = rng.integers(0, photo.shape[0] - size, size=len(chosen), endpoint=True)
        left = rng.integers(0, photo.shape[1] - size, size=len(chosen), endpoint=True)
        for slot, y, x in zip(chosen, top, left):
            out[slot] = photo[y:y + size, x:x + size]
    mirrored = rng.permutation(count)[:count // 2]
    out[mirrored] = out[mirrored, :, ::-1]
    return out
