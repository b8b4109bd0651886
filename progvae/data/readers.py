"""Readers for datasets on disk: SVHN, CelebA-64, LSUN bedrooms and folders of images.

Each reader checks its source and returns a `Recipe` for the preprocessing cache
(progvae/data/cache.py): the source's fingerprint, its preprocessing in words, and a `build` that
decodes every image into the cache's arrays (in worker processes when there are many). Nothing
here is read at import time, and nothing downloads: users bring the files.

| spec         | files                                           | held out           | preprocessing                 |
| ------------ | ----------------------------------------------- | ------------------ | ----------------------------- |
| `svhn:DIR`   | train_32x32.mat, test_32x32.mat (+ extra)       | test_32x32.mat     | none                          |
| `celeba:DIR` | img_align_celeba/*.jpg, list_eval_partition.txt | the official test  | crop 148, resize to S         |
| `lsun:DIR`   | an LMDB (data.mdb) or exported images           | last 10,000 by key | square crop, resize to S      |
| `folder:DIR` | PNG/JPEG/BMP under DIR                          | DIR/test, or 10%   | none, or resize with --resize |

Resizes are antialiased bilinear; each reader's docstring says exactly what it does.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import sys
import tarfile
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from progvae.core.errors import UserError
from progvae.data.cache import CacheWriter, Recipe, fingerprint_files

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
LSUN_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS | {".webp"}  # LSUN's own export writes .webp files
SPLIT_SEED = 1234  # fixes the train/test permutation of `folder:` datasets (and `digits`)
FOLDER_TEST_FRACTION = 0.1
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
CELEBA_CROP = 148  # the common CelebA-64 crop of the 178×218 aligned faces
CELEBA_SPLITS = {"0": "train", "1": "valid", "2": "test"}  # list_eval_partition.txt's codes
LSUN_TEST_SIZE = 10_000  # held out from the end of the key order (a tenth when there are < 100k)
WORKER_CHUNK = 256  # images a worker process decodes per task
MAX_WORKERS = 16

# Bump a version whenever its reader's output changes: caches built before are then rebuilt.
SVHN_VERSION = 1
CELEBA_VERSION = 1
LSUN_VERSION = 1
FOLDER_VERSION = 1


# ---------------------------------------------------------------- SVHN


def svhn_recipe(directory: Path, image_size: int, extra: bool) -> Recipe:
    """SVHN's official "Format 2" .mat files: train (plus extra, if asked) and test."""
    if image_size != 32:
        raise UserError(f"SVHN images are 32x32 but the config asks for {image_size}x{image_size}; "
                        "pass --image_size=32.")
    parts = {"train": ["train", "extra"] if extra else ["train"], "test": ["test"]}
    files = {name: directory / SVHN_FILES[name] for names in parts.values() for name in names}
    for name, file in files.items():
        if not file.is_file():
            flag = " or drop --svhn_extra=True" if name == "extra" else ""
            raise UserError(f"The SVHN folder {directory} has no {file.name}; put the official "
                            f"{file.name} there{flag}.")

    def build(writer: CacheWriter) -> None:
        counts = {name: _svhn_count(file) for name, file in files.items()}
        with _progress(sum(counts.values()), "svhn") as bar:
            for split, names in parts.items():
                out = writer.array(split, (sum(counts[name] for name in names), 32, 32, 3))
                offset = 0
                for name in names:
                    images = _svhn_images(files[name])  # (32, 32, 3, N)
                    for start in range(0, images.shape[3], 8192):  # a chunk at a time: no 2nd copy
                        chunk = np.moveaxis(images[..., start : start + 8192], 3, 0)
                        out[offset : offset + len(chunk)] = chunk
                        offset += len(chunk)
                        bar.update(len(chunk))
                    del images

    used = ", ".join(file.name for file in files.values())
    return Recipe(
        kind="svhn", source=directory, options={"extra": extra}, version=SVHN_VERSION,
        preprocessing=f"the X arrays of {used} as (N, 32, 32, 3) uint8, labels dropped",
        fingerprint=fingerprint_files(list(files.values()), directory), build=build)


def _svhn_count(file: Path) -> int:
    """Number of images in a .mat file, from its header alone."""
    import scipy.io

    try:
        variables = {name: shape for name, shape, _ in scipy.io.whosmat(file)}
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        raise UserError(f"{file} is a MATLAB v7.3 (HDF5) file; use the official SVHN file or save "
                        "it with MATLAB's -v7 option.") from None
    except Exception as error:  # scipy raises several types for a damaged file
        raise UserError(f"Could not read {file} as a MATLAB .mat file ({error}); replace it with "
                        "the official SVHN file.") from None
    if "X" not in variables:
        raise UserError(f"{file} holds no array named X (it has {', '.join(variables) or 'none'}); "
                        "use the official SVHN 32x32 .mat file.")
    shape = variables["X"]
    if len(shape) != 4 or tuple(shape[:3]) != (32, 32, 3) or shape[3] < 1:
        raise UserError(f"{file} holds X of shape {tuple(shape)} but SVHN's is (32, 32, 3, N); use "
                        "the official SVHN 32x32 .mat file.")
    return int(shape[3])


def _svhn_images(file: Path) -> np.ndarray:
    import scipy.io

    try:
        images = scipy.io.loadmat(file, variable_names=["X"])["X"]
    except Exception as error:
        raise UserError(f"Could not read the array X from {file} ({error}); replace it with the "
                        "official SVHN file.") from None
    if images.dtype != np.uint8:
        raise UserError(f"{file} holds X as {images.dtype} but SVHN's is uint8; use the official "
                        "SVHN 32x32 .mat file.")
    return images


# ---------------------------------------------------------------- CIFAR-10

CIFAR10_VERSION = 1
CIFAR10_RECORD = 1 + 32 * 32 * 3   # a label byte, then the red, green and blue planes
CIFAR10_FILES = {"train": [f"data_batch_{index}.bin" for index in range(1, 6)],
                 "test": ["test_batch.bin"]}
CIFAR10_MAX_RECORDS = 100_000      # per file: the official ones hold 10,000
CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def cifar10_recipe(path: Path, image_size: int) -> Recipe:
    """CIFAR-10's binary release: `cifar-10-binary.tar.gz` itself, its extracted
    `cifar-10-batches-bin/` folder, or a folder holding that. Read without unpickling anything:
    the Python release (pickled batches) is refused."""
    if image_size != 32:
        raise UserError(f"CIFAR-10 images are 32x32 but the config asks for {image_size}x"
                        f"{image_size}; pass --image_size=32.")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UserError(f"{path} is not a tar archive; pass cifar-10-binary.tar.gz or the "
                            "folder it extracts to.")
        read_batches = functools.partial(_cifar10_archive_batches, path)
        files = [path]
    else:
        folder = next((candidate for candidate in (path, path / "cifar-10-batches-bin")
                       if (candidate / "test_batch.bin").is_file()), None)
        if folder is None:
            _refuse_cifar10_python(path, [item.name for item in path.iterdir()]
                                   + [item.name for item in (path / "cifar-10-batches-py").glob("*")])
            raise UserError(f"{path} holds no CIFAR-10 binary batches (test_batch.bin, "
                            "data_batch_1.bin, ...); pass the folder cifar-10-binary.tar.gz "
                            f"extracts to (from {CIFAR10_BINARY_URL}).")
        names = {name: folder / name for split in CIFAR10_FILES.values() for name in split}
        missing = [name for name, file in names.items() if not file.is_file()]
        if missing:
            raise UserError(f"The CIFAR-10 folder {folder} has no {missing[0]}; extract the "
                            "whole cifar-10-binary.tar.gz there.")
        read_batches = lambda: {name: file.read_bytes() for name, file in names.items()}  # noqa: E731
        files = list(names.values())

    def build(writer: CacheWriter) -> None:
        batches_by_name = read_batches()
        with _progress(60_000, "cifar10") as bar:
            for split, parts in CIFAR10_FILES.items():
                batches = [_cifar10_images(batches_by_name[name], name) for name in parts]
                out = writer.array(split, (sum(len(batch) for batch in batches), 32, 32, 3))
                offset = 0
                for batch in batches:
                    out[offset:offset + len(batch)] = batch
                    offset += len(batch)
                    bar.update(len(batch))

    return Recipe(
        kind="cifar10", source=path, options={}, version=CIFAR10_VERSION,
        preprocessing="the binary release's records as (N, 32, 32, 3) uint8, labels dropped; "
                      "train = data_batch_1-5, test = test_batch",
        fingerprint=fingerprint_files(files, path.parent if path.is_file() else path),
        build=build)


def _cifar10_archive_batches(archive: Path) -> dict[str, bytes]:
    """The binary batches in the archive, by file name, read in one pass through it (only when
    the cache is built: a gzipped tar is read from its start for every lookup)."""
    wanted = {name for parts in CIFAR10_FILES.values() for name in parts}
    found: dict[str, bytes] = {}
    with tarfile.open(archive) as opened:
        for member in opened:
            name = Path(member.name).name
            if not member.isfile():
                continue
            _refuse_cifar10_python(archive, [name])
            if name in wanted:
                if member.size > CIFAR10_MAX_RECORDS * CIFAR10_RECORD:
                    raise UserError(f"{member.name} in {archive} is {member.size} bytes, more "
                                    "than a CIFAR-10 batch; pass the official "
                                    "cifar-10-binary.tar.gz.")
                found[name] = opened.extractfile(member).read()
    missing = sorted(wanted - set(found))
    if missing:
        raise UserError(f"{archive} has no {missing[0]}; pass the official "
                        f"cifar-10-binary.tar.gz ({CIFAR10_BINARY_URL}).")
    return found


def _refuse_cifar10_python(source: Path, names: list[str]) -> None:
    """The Python release's batches are pickles, which progvae never loads."""
    if any(name in ("data_batch_1", "test_batch") for name in names):
        raise UserError(f"{source} is CIFAR-10's Python release, whose batches are pickles "
                        "that progvae never loads; download the binary release "
                        f"cifar-10-binary.tar.gz ({CIFAR10_BINARY_URL}) and pass that.")


def _cifar10_images(data: bytes, name: str) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from a binary batch's records."""
    if len(data) == 0 or len(data) % CIFAR10_RECORD or len(data) > CIFAR10_MAX_RECORDS * \
            CIFAR10_RECORD:
        raise UserError(f"{name} is {len(data)} bytes, not a whole number of CIFAR-10 records "
                        f"({CIFAR10_RECORD} bytes each); replace it with the official file.")
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR10_RECORD)
    return np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


# ---------------------------------------------------------------- downsampled ImageNet

IMAGENET_VERSION = 1
IMAGENET_URL = "https://image-net.org/download-images (Downsampled ImageNet 32x32 / 64x64)"


def imagenet_recipe(directory: Path, image_size: int, resolution: int) -> Recipe:
    """Downsampled ImageNet at `resolution` (32 or 64), from either layout: VDVAE's
    imagenet{R}-train.npy and imagenet{R}-valid.npy (N, R, R, 3), or the official .npz batches
    (train_data_batch_K.npz and val_data.npz, each a `data` array of (N, 3*R*R) rows). The
    official validation set is the held-out split (VDVAE's test set). Read without pickle."""
    if image_size != resolution:
        raise UserError(f"imagenet{resolution} images are {resolution}x{resolution} but the "
                        f"config asks for {image_size}x{image_size}; pass "
                        f"--image_size={resolution}.")
    vdvae = {split: directory / f"imagenet{resolution}-{name}.npy"
             for split, name in (("train", "train"), ("test", "valid"))}
    if all(file.is_file() for file in vdvae.values()):
        sources = {split: [file] for split, file in vdvae.items()}
    else:
        train = sorted(directory.rglob("train_data_batch_*.npz"),
                       key=lambda file: int(file.stem.rsplit("_", 1)[-1])
                       if file.stem.rsplit("_", 1)[-1].isdigit() else 0)
        valid = sorted(directory.rglob("val_data.npz"))
        if not train or not valid:
            raise UserError(f"{directory} holds neither imagenet{resolution}-train.npy and "
                            f"imagenet{resolution}-valid.npy nor the official "
                            "train_data_batch_K.npz and val_data.npz; put either there (from "
                            f"{IMAGENET_URL}).")
        sources = {"train": train, "test": valid[:1]}
    shapes = {split: [_imagenet_count(file, resolution) for file in files]
              for split, files in sources.items()}

    def build(writer: CacheWriter) -> None:
        with _progress(sum(map(sum, shapes.values())), f"imagenet{resolution}") as bar:
            for split, files in sources.items():
                out = writer.array(split, (sum(shapes[split]), resolution, resolution, 3))
                offset = 0
                for file in files:
                    images = _imagenet_images(file, resolution)
                    for start in range(0, len(images), 16384):   # a chunk at a time
                        chunk = images[start:start + 16384]
                        if chunk.ndim == 2:   # official rows: channel planes
                            chunk = chunk.reshape(-1, 3, resolution, resolution)
                            chunk = chunk.transpose(0, 2, 3, 1)
                        out[offset:offset + len(chunk)] = chunk
                        offset += len(chunk)
                        bar.update(len(chunk))
                    del images

    every = [file for files in sources.values() for file in files]
    return Recipe(
        kind=f"imagenet{resolution}", source=directory, options={}, version=IMAGENET_VERSION,
        preprocessing=f"(N, {resolution}, {resolution}, 3) uint8 as stored, labels dropped; "
                      "test = the official validation set",
        fingerprint=fingerprint_files(every, directory), build=build)


def _imagenet_count(file: Path, resolution: int) -> int:
    """Images in a .npy or in an .npz's `data`, from the array header alone (checked against
    the resolution before anything is allocated)."""
    try:
        if file.suffix == ".npy":
            with open(file, "rb") as stream:
                shape, dtype = npy_header(stream)
            expected = (resolution, resolution, 3)
            ok = len(shape) == 4 and tuple(shape[1:]) == expected
        else:
            with zipfile.ZipFile(file) as archive, archive.open("data.npy") as stream:
                shape, dtype = npy_header(stream)
            ok = len(shape) == 2 and shape[1] == 3 * resolution * resolution
    except (KeyError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise UserError(f"Could not read {file} as downsampled ImageNet ({error}); replace it "
                        "with the original file.") from None
    if not ok or dtype != np.uint8 or shape[0] < 1:
        raise UserError(f"{file} holds {dtype} {tuple(shape)}, not imagenet{resolution} images; "
                        "replace it with the original file.")
    return int(shape[0])


def npy_header(stream) -> tuple[tuple, np.dtype]:
    """The shape and dtype a .npy array's header declares, read before anything is allocated
    (a header alone cannot make the reader allocate)."""
    version = np.lib.format.read_magic(stream)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(stream)
    return shape, dtype


def _imagenet_images(file: Path, resolution: int) -> np.ndarray:
    if file.suffix == ".npy":
        return np.load(file, mmap_mode="r", allow_pickle=False)
    with np.load(file, allow_pickle=False) as stored:
        return stored["data"]


# ---------------------------------------------------------------- CelebA


def celeba_recipe(directory: Path, image_size: int, workers: int = 0) -> Recipe:
    """CelebA's aligned faces with the official train/valid/test partition (0/1/2), each
    centre-cropped to 148×148 and resized to image_size (64 for CelebA-64)."""
    image_folder = _first_folder(directory, ["img_align_celeba", "Img/img_align_celeba"])
    if image_folder is None:
        hint = " (unzip img_align_celeba.zip there)" if (directory / "img_align_celeba.zip").exists() else ""
        raise UserError(f"The CelebA folder {directory} has no img_align_celeba/ folder{hint}; pass "
                        "the folder holding img_align_celeba/ and list_eval_partition.txt.")
    if (image_folder / "img_align_celeba").is_dir():  # some archives unpack into a nested folder
        image_folder = image_folder / "img_align_celeba"
    partition = next((directory / name for name in ("list_eval_partition.txt", "Eval/list_eval_partition.txt",
                                                    "list_eval_partition.csv")
                      if (directory / name).is_file()), None)
    if partition is None:
        raise UserError(f"The CelebA folder {directory} has no list_eval_partition.txt (the official "
                        "train/valid/test split); put it next to img_align_celeba/.")
    names = _read_partition(partition)
    present = set(os.listdir(image_folder))
    missing = [name for split in names.values() for name in split if name not in present]
    if missing:
        raise UserError(f"{len(missing)} of the images listed in {partition.name} are missing from "
                        f"{image_folder} (e.g. {missing[0]}); restore the full img_align_celeba/ folder.")
    # strings, not Paths: CelebA has 202,599 files and this runs on every load
    prefix = os.path.join(str(image_folder), "")
    files = {split: [prefix + name for name in split_names]
             for split, split_names in names.items()}
    decode = functools.partial(_decode_celeba, image_size=image_size)

    def build(writer: CacheWriter) -> None:
        _decode_splits(writer, files, decode, (image_size, image_size, 3), workers, "celeba")

    every_file = [partition] + [file for split in files.values() for file in split]
    return Recipe(
        kind="celeba", source=directory, options={"image_size": image_size}, version=CELEBA_VERSION,
        preprocessing=(f"centre crop {CELEBA_CROP}x{CELEBA_CROP}, antialiased bilinear resize (PIL) to "
                       f"{image_size}x{image_size}, RGB"),
        fingerprint=fingerprint_files(every_file, directory), build=build)


def _read_partition(partition: Path) -> dict[str, list[str]]:
    """list_eval_partition.txt ("000001.jpg 0" per line) or the .csv with an image_id header."""
    names: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for number, line in enumerate(partition.read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or (number == 1 and fields[0] == "image_id"):
            continue
        if len(fields) != 2 or fields[1] not in CELEBA_SPLITS:
            raise UserError(f"Line {number} of {partition} reads {line.strip()!r} but should be an image "
                            "name and 0, 1 or 2; use the official list_eval_partition.txt.")
        names[CELEBA_SPLITS[fields[1]]].append(fields[0])
    for split in ("train", "test"):
        if not names[split]:
            raise UserError(f"{partition} puts no image in the {split} split; use the official "
                            "list_eval_partition.txt.")
    return {split: split_names for split, split_names in names.items() if split_names}


def _decode_celeba(file: str, image_size: int) -> np.ndarray:
    with open(file, "rb") as stream:
        image = _open_rgb(stream.read(), file)
    width, height = image.size
    if min(width, height) < CELEBA_CROP:
        raise UserError(f"{file} is {width}x{height}, smaller than CelebA's {CELEBA_CROP}x{CELEBA_CROP} "
                        "centre crop; use the aligned images (img_align_celeba, 178x218).")
    left, top = (width - CELEBA_CROP) // 2, (height - CELEBA_CROP) // 2  # 15, 35 for 178×218
    return _crop_and_resize(image, (left, top, left + CELEBA_CROP, top + CELEBA_CROP), image_size)


# ---------------------------------------------------------------- LSUN


def lsun_recipe(directory: Path, image_size: int, workers: int = 0) -> Recipe:
    """LSUN (e.g. bedroom_train_lmdb) from its LMDB or a folder of exported images. LSUN's own
    validation set is 300 images, too few for FID, so the last LSUN_TEST_SIZE images in key order
    (file-name order for a folder) are held out; the keys are image hashes, so that is a fixed,
    effectively random slice."""
    database = _find_lmdb(directory)
    if database is not None:  # the LMDB is opened only to build: a cache needs no lmdb package
        fingerprint = fingerprint_files([database / "data.mdb"], directory)
        what = f"the LMDB {database.name}"
    else:
        files = list_images(directory, LSUN_IMAGE_EXTENSIONS)
        files.sort(key=lambda file: (os.path.basename(file), file))  # file names are the LMDB keys
        if len(files) < 2:
            raise UserError(f"{directory} holds neither an LSUN LMDB (data.mdb) nor at least 2 images; "
                            "pass the LMDB folder (e.g. bedroom_train_lmdb) or a folder of exported images.")
        fingerprint = fingerprint_files(files, directory)
        what = f"the image files under {directory.name}"

    def build(writer: CacheWriter) -> None:
        if database is not None:
            items: list = _lmdb_keys(database)
            decode = functools.partial(_decode_lsun_entry, database=str(database), image_size=image_size)
        else:
            items, decode = files, functools.partial(_decode_lsun_file, image_size=image_size)
        if len(items) < 2:
            raise UserError(f"The LMDB {database} holds {len(items)} entries; LSUN needs at least 2 "
                            "(one to train on, one to test on).")
        test_count = lsun_test_count(len(items))
        splits = {"train": items[:-test_count], "test": items[-test_count:]}
        _decode_splits(writer, splits, decode, (image_size, image_size, 3), workers, "lsun")

    return Recipe(
        kind="lsun", source=directory, options={"image_size": image_size}, version=LSUN_VERSION,
        preprocessing=(f"{what}; centre crop to a square of the shorter side, antialiased bilinear "
                       f"resize (PIL) to {image_size}x{image_size}, RGB; the last "
                       f"min({LSUN_TEST_SIZE}, N/10) in key order held out"),
        fingerprint=fingerprint, build=build)


def lsun_test_count(count: int) -> int:
    """Images LSUN holds out of `count`: LSUN_TEST_SIZE, or a tenth of a smaller set."""
    return min(LSUN_TEST_SIZE, max(1, count // 10))


def _find_lmdb(directory: Path) -> Path | None:
    if (directory / "data.mdb").is_file():
        return directory
    found = sorted(path.parent for path in directory.glob("*/data.mdb"))
    training = [path for path in found if path.name.endswith("_train_lmdb")]
    if len(found) == 1 or len(training) == 1:
        return (training or found)[0]
    if found:
        raise UserError(f"{directory} holds several LMDBs ({', '.join(path.name for path in found)}); "
                        "pass the one to train on as --data=lsun:PATH.")
    return None


def _import_lmdb(database: Path):
    try:
        import lmdb
    except ImportError:
        raise UserError(f"Reading the LMDB {database} needs the lmdb package; install it with "
                        "pip install 'progvae[lsun]', or pass a folder of exported images.") from None
    return lmdb


_OPEN_DATABASES: dict[str, Any] = {}  # one read-only environment per LMDB per process


def _open_lmdb(database: str):
    if database not in _OPEN_DATABASES:
        lmdb = _import_lmdb(Path(database))
        try:
            _OPEN_DATABASES[database] = lmdb.open(database, readonly=True, lock=False, readahead=False,
                                                  meminit=False)
        except lmdb.Error as error:
            raise UserError(f"Could not open {database} as an LMDB ({error}); re-download or "
                            "re-export it.") from None
    return _OPEN_DATABASES[database]


def _lmdb_keys(database: Path) -> list[bytes]:
    environment = _open_lmdb(str(database))
    with environment.begin() as transaction:
        keys = list(transaction.cursor().iternext(keys=True, values=False))
    environment.close()  # closed before any worker is forked from this process
    del _OPEN_DATABASES[str(database)]
    return keys


def _decode_lsun_entry(key: bytes, database: str, image_size: int) -> np.ndarray:
    with _open_lmdb(database).begin() as transaction:
        value = transaction.get(key)
    name = f"the entry {key.decode(errors='replace')!r} of the LMDB {database}"
    if value is None:
        raise UserError(f"{name} has no value; re-download or re-export the LMDB.")
    return _center_square(_open_rgb(value, name, fix="re-download or re-export the LMDB"), image_size)


def _decode_lsun_file(file: str, image_size: int) -> np.ndarray:
    with open(file, "rb") as stream:
        return _center_square(_open_rgb(stream.read(), file), image_size)


def _center_square(image, image_size: int) -> np.ndarray:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return _crop_and_resize(image, (left, top, left + side, top + side), image_size)


# ---------------------------------------------------------------- folder:


def folder_recipe(folder: Path, image_size: int, resize: bool, workers: int = 0) -> Recipe:
    """PNG/JPEG/BMP files under `folder`: `train/` and `test/` subfolders when both exist, else a
    fixed 90/10 split of every image (the permutation is seeded by SPLIT_SEED). Colour unless
    every image is grayscale; alpha is dropped and 16-bit pixels are scaled to 8 bits."""
    if not folder.is_dir():
        raise UserError(f"The data path {folder} is not a folder; pass a folder of images as --data=folder:PATH.")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        splits = {"train": list_images(folder / "train"), "test": list_images(folder / "test")}
        for split, files in splits.items():
            if not files:
                raise UserError(f"The folder {folder / split} holds no PNG, JPEG or BMP images; add some.")
        first = splits["train"][0]
    else:
        files = list_images(folder)
        if len(files) < 2:
            raise UserError(
                f"The folder {folder} holds {len(files)} PNG, JPEG or BMP images but needs at least 2 "
                f"(one to train on, one to test on); add images to it.")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
        test_count = max(1, int(len(files) * FOLDER_TEST_FRACTION))
        splits = {"train": [files[i] for i in order[:-test_count]],
                  "test": [files[i] for i in order[-test_count:]]}
        first = files[0]
    decode = functools.partial(_decode_folder_image, image_size=image_size, resize=resize, first=str(first))

    def build(writer: CacheWriter) -> None:
        decode(first)  # the first file in name order sets the size the others are checked against
        colour = _decode_splits(writer, splits, decode, (image_size, image_size, 3), workers, "folder")
        if not colour:  # every image was grayscale: keep one channel
            for split in splits:
                rgb = writer.arrays[split]
                writer.array(split, rgb.shape[:3] + (1,))[:] = rgb[..., :1]

    how = (f"antialiased bilinear resize (torch) to {image_size}x{image_size}, aspect ratio not kept"
           if resize else f"no resizing ({image_size}x{image_size} required)")
    every_file = [file for split in splits.values() for file in split]
    return Recipe(
        kind="folder", source=folder, options={"image_size": image_size, "resize": resize},
        version=FOLDER_VERSION,
        preprocessing=f"{how}; alpha dropped, 16-bit scaled to 8 bits; grayscale if every image is",
        fingerprint=fingerprint_files(every_file, folder), build=build)


def list_images(folder: Path, extensions: set[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Paths (strings: a large folder is listed on every load) of the image files under
    `folder`, recursively, in the order of their path components."""
    found = []
    ancestors: set[tuple[int, int]] = set()   # (device, inode) of the folders being walked

    def walk(directory: str) -> None:
        info = os.stat(directory)
        key = (info.st_dev, info.st_ino)
        if key in ancestors:   # a symbolic link back into a folder above it: endless
            raise UserError(f"'{directory}' is a symbolic link loop (it leads back to a folder "
                            f"above it) inside --data's folder '{folder}'; remove that link.")
        ancestors.add(key)
        with os.scandir(directory) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        for entry in listed:
            if entry.is_dir(follow_symlinks=True):
                walk(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                found.append(entry.path)
        ancestors.discard(key)

    walk(str(folder))
    return sorted(found, key=lambda file: file.split(os.sep))


def read_image(file: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, BMP, ...) as (H, W, C) uint8, C in {1, 3}."""
    import imageio.v3 as iio

    try:
        with warnings.catch_warnings():  # imageio warns while it tries fallback plugins
            warnings.simplefilter("ignore")
            image = np.asarray(iio.imread(file))
    except Exception:  # imageio raises many types, with plugin-install advice that misleads here
        raise UserError(
            f"Could not read {file} as an image (it is corrupt or not really a PNG, JPEG or BMP); "
            f"remove or replace the file.") from None
    return _as_uint8_hwc(image, str(file))


def _decode_folder_image(file: str, image_size: int, resize: bool, first: str) -> np.ndarray:
    image = read_image(file)
    if resize:
        return resize_image(image, image_size)
    if image.shape[:2] != (image_size, image_size):
        if str(file) != first:  # `build` has checked the first image is image_size × image_size
            raise UserError(
                f"Images differ in size: {first} is {image_size}x{image_size} but {file} is "
                f"{_size_text(image)}; make them one size or pass --resize=True.")
        suggestion = f"--image_size={image.shape[0]} or " if image.shape[0] == image.shape[1] else ""
        raise UserError(f"{file} is {_size_text(image)} but the config expects {image_size}x{image_size}; "
                        f"pass {suggestion}--resize=True.")
    return image


def _as_uint8_hwc(image: np.ndarray, file: str) -> np.ndarray:
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


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, C) uint8 → (S, S, C) uint8, bilinear with antialiasing (aspect ratio not kept)."""
    import torch
    import torch.nn.functional as F

    if image.shape[:2] == (image_size, image_size):
        return image
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True,
                           align_corners=False)
    return pixels[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _size_text(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"  # width x height


# ---------------------------------------------------------------- shared by the readers


def _first_folder(directory: Path, candidates: list[str]) -> Path | None:
    return next((directory / name for name in candidates if (directory / name).is_dir()), None)


def _open_rgb(data: bytes, name: str, fix: str = "remove or replace the file"):
    """Decode image bytes with PIL, fully, as RGB; a damaged image is a UserError naming it."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")  # decodes every pixel, so truncation shows up here
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise UserError(f"{name} is not a readable image ({error}); {fix}.") from None


def _crop_and_resize(image, box: tuple[int, int, int, int], image_size: int) -> np.ndarray:
    """PIL crop then bilinear resize, which PIL antialiases when shrinking: (S, S, 3) uint8."""
    from PIL import Image

    # crop first: resize(box=...) would let pixels outside the box into the edge pixels
    return np.asarray(image.crop(box).resize((image_size, image_size), Image.Resampling.BILINEAR))


def _decode_splits(writer: CacheWriter, splits: dict[str, list], decode: Callable[[Any], np.ndarray],
                   image_shape: tuple[int, int, int], workers: int, kind: str) -> bool:
    """Decode every split's items into a new cache array each; returns whether any decoded image
    had 3 channels (a 1-channel image fills all three)."""
    outputs = {split: writer.array(split, (len(items),) + image_shape) for split, items in splits.items()}
    every_item = [(split, index, item) for split, items in splits.items() for index, item in enumerate(items)]
    colour = False
    with _progress(len(every_item), kind) as bar:
        images = decode_all(decode, [item for _, _, item in every_item], workers)
        for (split, index, _), image in zip(every_item, images, strict=True):
            outputs[split][index] = image
            colour = colour or image.shape[2] == 3
            bar.update(1)
    return colour


def worker_count(workers: int) -> int:
    """`workers` if positive, else one per CPU core this process may use, at most MAX_WORKERS."""
    if workers > 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def decode_all(decode: Callable[[Any], np.ndarray], items: list, workers: int = 0) -> Iterator[np.ndarray]:
    """decode(item) for every item, in order: in this process for a few items or one worker, else
    in `worker_count(workers)` worker processes, WORKER_CHUNK items per task."""
    workers = worker_count(workers)
    if workers == 1 or len(items) < 2 * WORKER_CHUNK:
        yield from map(decode, items)
        return
    chunks = [items[start : start + WORKER_CHUNK] for start in range(0, len(items), WORKER_CHUNK)]
    # fork where there is one, as torch's DataLoader does: a spawned worker would first import
    # the parent's __main__ (and with it torch), seconds per worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_start_worker)
    try:
        for images in pool.map(functools.partial(_decode_chunk, decode), chunks):
            yield from images
    finally:  # on an error, stop the tasks not yet started instead of waiting for them
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker() -> None:
    """Make a forked worker safe: its own LMDB handles (LMDB forbids using a parent's), and one
    torch thread if torch is loaded (the workers already use every core between them)."""
    _OPEN_DATABASES.clear()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _decode_chunk(decode: Callable[[Any], np.ndarray], items: list) -> list[np.ndarray]:
    return [decode(item) for item in items]


def _progress(total: int, kind: str) -> tqdm:
    """A progress bar; redrawn every 30 s instead of twice a second when stderr is not a terminal."""
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=f"caching {kind}", unit="img", mininterval=interval, dynamic_ncols=True)
