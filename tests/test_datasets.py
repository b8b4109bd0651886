"""SVHN, CelebA-64 and LSUN readers and the preprocessing cache, on tiny files made here."""

import io
import json
import os
import sys

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from progvae.__main__ import main
from progvae.core.config import load_config
from progvae.core.errors import UserError
from progvae.data import readers as datasets
from progvae.data.cache import cache_root, verify_cache
from progvae.data.loading import load_data, load_data_for, natural_image_size


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder, never the user's."""
    monkeypatch.setenv("PROGVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_OPEN_DATABASES", {})
    return tmp_path / "cache"


def random_images(count, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def framed(height, width, box, colour=255):
    """A black RGB image whose `box` (left, top, right, bottom) is filled with `colour`."""
    image = np.zeros((height, width, 3), np.uint8)
    left, top, right, bottom = box
    image[top:bottom, left:right] = colour
    return image


def encode(image, format="PNG", **options):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format, **options)
    return buffer.getvalue()


# ---------------------------------------------------------------- SVHN


def make_svhn(folder, counts=None):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for seed, (name, count) in enumerate((counts or {"train": 6, "test": 4}).items()):
        images = random_images(count, 32, 32, seed=seed)  # (N, 32, 32, 3)
        arrays[name] = images
        scipy.io.savemat(folder / f"{name}_32x32.mat",
                         {"X": np.moveaxis(images, 0, 3), "y": np.ones((count, 1), np.uint8)})
    return arrays


def test_svhn_splits_are_the_mat_files_images(tmp_path):
    arrays = make_svhn(tmp_path / "svhn")
    data = load_data(f"svhn:{tmp_path / 'svhn'}", 32)
    assert data.name == f"svhn:{tmp_path / 'svhn'}" and data.valid is None
    assert data.train.shape == (6, 32, 32, 3) and data.test.shape == (4, 32, 32, 3)
    assert data.train.dtype == np.uint8 and data.cache.status == "built"
    np.testing.assert_array_equal(data.train, arrays["train"])
    np.testing.assert_array_equal(data.test, arrays["test"])


def test_svhn_extra_joins_the_training_split(tmp_path):
    arrays = make_svhn(tmp_path, {"train": 6, "test": 4, "extra": 5})
    plain = load_data(f"svhn:{tmp_path}", 32)
    data = load_data(f"svhn:{tmp_path}", 32, svhn_extra=True)
    assert len(plain.train) == 6 and data.train.shape == (11, 32, 32, 3) and len(data.test) == 4
    np.testing.assert_array_equal(data.train, np.concatenate([arrays["train"], arrays["extra"]]))
    assert plain.cache.directory != data.cache.directory


@pytest.mark.parametrize("files, extra, message", [
    ({"train": 2}, False, "no test_32x32.mat"),
    ({"train": 2, "test": 2}, True, "no extra_32x32.mat.*--svhn_extra"),
])
def test_svhn_missing_file(tmp_path, files, extra, message):
    make_svhn(tmp_path, files)
    with pytest.raises(UserError, match=message):
        load_data(f"svhn:{tmp_path}", 32, svhn_extra=extra)


def test_svhn_bad_mat_files(tmp_path):
    make_svhn(tmp_path)
    with pytest.raises(UserError, match="32x32.*--image_size=32"):
        load_data(f"svhn:{tmp_path}", 64)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"images": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(UserError, match="test_32x32.mat holds no array named X"):
        load_data(f"svhn:{tmp_path}", 32)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 2), np.uint8)})
    with pytest.raises(UserError, match=r"shape \(28, 28, 2\)"):
        load_data(f"svhn:{tmp_path}", 32)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(UserError, match="Could not read .*test_32x32.mat"):
        load_data(f"svhn:{tmp_path}", 32)


# ---------------------------------------------------------------- CelebA


CELEBA_BOX = (15, 35, 163, 183)  # the 148x148 centre crop of a 178x218 aligned face


def make_celeba(folder, codes=(0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2)):
    """Aligned-size images, white inside the centre crop and black outside, one per code."""
    (folder / "img_align_celeba").mkdir(parents=True)
    lines = []
    for number, code in enumerate(codes, start=1):
        name = f"{number:06d}.jpg"
        # PNG bytes under a .jpg name: exact pixels, so the crop's position can be checked
        (folder / "img_align_celeba" / name).write_bytes(encode(framed(218, 178, CELEBA_BOX, 255 - number)))
        lines.append(f"{name} {code}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_official_partition_and_centre_crop(tmp_path):
    make_celeba(tmp_path)
    data = load_data(f"celeba:{tmp_path}", 64)
    assert data.train.shape == (6, 64, 64, 3) and data.valid.shape == (2, 64, 64, 3)
    assert data.test.shape == (3, 64, 64, 3) and data.train.dtype == np.uint8
    # every output pixel comes from inside the 148x148 crop: the black frame never shows
    for split, first_number in (("train", 1), ("valid", 7), ("test", 9)):
        images = getattr(data, split)
        expected = 255 - (first_number + np.arange(len(images)))
        np.testing.assert_array_equal(images.min(axis=(1, 2, 3)), expected)
        np.testing.assert_array_equal(images.max(axis=(1, 2, 3)), expected)
    assert load_data(f"celeba:{tmp_path}", 32).train.shape == (6, 32, 32, 3)


def test_celeba_real_jpeg_keeps_orientation_and_range(tmp_path):
    make_celeba(tmp_path, codes=(0, 0, 2))
    ramp = np.clip((np.arange(178) - 15) * 255 / 147, 0, 255).round().astype(np.uint8)  # 0..255 across the crop
    image = np.repeat(np.broadcast_to(ramp[None, :, None], (218, 178, 1)), 3, axis=2)
    (tmp_path / "img_align_celeba" / "000001.jpg").write_bytes(encode(image, "JPEG", quality=95))
    columns = load_data(f"celeba:{tmp_path}", 64).train[0].astype(int).mean(axis=(0, 2))  # (64,)
    assert columns[0] < 10 and columns[-1] > 245 and np.all(np.diff(columns) > 0)


def test_celeba_bad_input(tmp_path):
    with pytest.raises(UserError, match="no img_align_celeba/ folder"):
        load_data(f"celeba:{tmp_path}", 64)
    make_celeba(tmp_path)
    partition = tmp_path / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    partition.write_text("\n".join(lines[:1] + ["000002.jpg 7"] + lines[2:]))
    with pytest.raises(UserError, match="Line 2 of .*list_eval_partition.txt"):
        load_data(f"celeba:{tmp_path}", 64)
    partition.unlink()
    with pytest.raises(UserError, match="no list_eval_partition.txt"):
        load_data(f"celeba:{tmp_path}", 64)
    partition.write_text("\n".join(lines))
    (tmp_path / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(UserError, match="1 of the images .* missing .*000003.jpg"):
        load_data(f"celeba:{tmp_path}", 64)
    (tmp_path / "img_align_celeba" / "000003.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(UserError, match="000003.jpg is not a readable image"):
        load_data(f"celeba:{tmp_path}", 64)


def test_celeba_failed_build_leaves_no_cache(tmp_path, cache):
    make_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000011.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match="000011.jpg"):
        load_data(f"celeba:{tmp_path}", 64)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------- LSUN


def lsun_image(index):
    """A landscape or portrait image whose centred square is one grey level, framed in black."""
    height, width = (30, 40) if index % 2 else (44, 36)
    side = min(height, width)
    left, top = (width - side) // 2, (height - side) // 2
    return framed(height, width, (left, top, left + side, top + side), 10 + 10 * index)


def make_lsun_lmdb(folder, count=20):
    lmdb = pytest.importorskip("lmdb")
    environment = lmdb.open(str(folder / "bedroom_train_lmdb"), map_size=1 << 24)
    with environment.begin(write=True) as transaction:
        for index in reversed(range(count)):  # LMDB sorts the keys whatever the insertion order
            transaction.put(f"{index:040x}".encode(), encode(lsun_image(index), "WEBP", lossless=True))
    environment.close()


def check_lsun(data, count=20, image_size=16):
    test_count = count // 10  # a tenth of a small set (10,000 of a large one)
    assert data.train.shape == (count - test_count, image_size, image_size, 3)
    assert data.test.shape == (test_count, image_size, image_size, 3)
    levels = np.concatenate([data.train, data.test]).reshape(count, -1)
    np.testing.assert_array_equal(levels.min(axis=1), 10 + 10 * np.arange(count))  # key order,
    np.testing.assert_array_equal(levels.max(axis=1), 10 + 10 * np.arange(count))  # no frame


def test_lsun_lmdb(tmp_path):
    make_lsun_lmdb(tmp_path)
    data = load_data(f"lsun:{tmp_path}", 16)
    check_lsun(data)
    assert load_data(f"lsun:{tmp_path / 'bedroom_train_lmdb'}", 16).train.shape == data.train.shape


def test_lsun_folder_of_exported_images(tmp_path):
    for index in range(20):  # nested as LSUN's export tool writes them; name order is key order
        path = tmp_path / f"{index % 3}" / f"{index:040x}.webp"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode(lsun_image(index), "WEBP", lossless=True))
    check_lsun(load_data(f"lsun:{tmp_path}", 16))


def test_lsun_corrupt_entry_is_named(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    make_lsun_lmdb(tmp_path, count=4)
    environment = lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 24)
    with environment.begin(write=True) as transaction:
        transaction.put(b"0badc0ffee", b"not an image")
    environment.close()
    with pytest.raises(UserError, match="entry '0badc0ffee' of the LMDB .*bedroom_train_lmdb"):
        load_data(f"lsun:{tmp_path}", 16)


def test_lsun_without_the_lmdb_package(tmp_path, monkeypatch):
    (tmp_path / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb now raises ImportError
    with pytest.raises(UserError, match=r"needs the lmdb package.*progvae\[lsun\]"):
        load_data(f"lsun:{tmp_path}", 16)


def test_lsun_empty_folder(tmp_path):
    with pytest.raises(UserError, match="neither an LSUN LMDB"):
        load_data(f"lsun:{tmp_path}", 64)


# ---------------------------------------------------------------- the cache


def manifest_of(data):
    return data.cache.directory / "manifest.json"


def test_second_load_reuses_the_cache_without_reading_the_source(tmp_path, monkeypatch):
    make_svhn(tmp_path)
    first = load_data(f"svhn:{tmp_path}", 32)
    written = manifest_of(first).stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(scipy.io, "loadmat", no_reading)
    second = load_data(f"svhn:{tmp_path}", 32)
    assert second.cache.status == "reused" and manifest_of(second).stat().st_mtime_ns == written
    np.testing.assert_array_equal(first.train, second.train)
    assert verify_cache(second.cache) == []


def test_a_changed_source_rebuilds_the_cache(tmp_path):
    make_svhn(tmp_path)
    load_data(f"svhn:{tmp_path}", 32)
    source = tmp_path / "train_32x32.mat"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    assert load_data(f"svhn:{tmp_path}", 32).cache.status.startswith("rebuilt (is out of date")
    arrays = make_svhn(tmp_path, {"train": 3, "test": 4})  # replaced
    data = load_data(f"svhn:{tmp_path}", 32)
    assert data.cache.status.startswith("rebuilt") and len(data.train) == 3
    np.testing.assert_array_equal(data.train, arrays["train"])


def test_a_new_preprocessing_rebuilds_with_a_note(tmp_path, monkeypatch, capsys):
    make_svhn(tmp_path)
    load_data(f"svhn:{tmp_path}", 32)
    monkeypatch.setattr(datasets, "SVHN_VERSION", datasets.SVHN_VERSION + 1)
    data = load_data(f"svhn:{tmp_path}", 32)
    assert "older preprocessing" in data.cache.status
    assert "was written by an older preprocessing" in capsys.readouterr().out
    assert load_data(f"svhn:{tmp_path}", 32).cache.status == "reused"


def corrupt_byte(path, keep_mtime):
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(stat.st_size - 7)
        value = file.read(1)
        file.seek(stat.st_size - 7)
        file.write(bytes([value[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("damage", ["byte", "byte, mtime kept", "truncated", "manifest", "header"])
def test_a_corrupt_cache_is_rebuilt_not_trusted(tmp_path, damage):
    arrays = make_svhn(tmp_path)
    data = load_data(f"svhn:{tmp_path}", 32)
    train_file = data.cache.directory / "train.npy"
    if damage.startswith("byte"):
        corrupt_byte(train_file, keep_mtime="kept" in damage)
    elif damage == "truncated":
        train_file.write_bytes(train_file.read_bytes()[:-100])
    elif damage == "manifest":
        manifest_of(data).write_text("{ not json")
    else:
        np.save(train_file, np.zeros((6, 32, 32, 1), np.uint8))
    del data
    again = load_data(f"svhn:{tmp_path}", 32)
    assert again.cache.status.startswith("rebuilt (")
    assert "corrupt" in again.cache.status or "unreadable" in again.cache.status
    np.testing.assert_array_equal(again.train, arrays["train"])


def test_a_copied_cache_is_checked_whole_once(tmp_path):
    make_svhn(tmp_path)
    data = load_data(f"svhn:{tmp_path}", 32)
    train_file = data.cache.directory / "train.npy"
    os.utime(train_file, ns=(0, 10**18))  # as after a copy that does not keep mtimes
    assert load_data(f"svhn:{tmp_path}", 32).cache.status == "reused"
    assert json.loads(manifest_of(data).read_text())["arrays"]["train"]["mtime_ns"] == 10**18


def test_cached_arrays_are_copy_on_write_memory_maps(tmp_path):
    arrays = make_svhn(tmp_path)
    data = load_data(f"svhn:{tmp_path}", 32)
    assert type(data.train) is np.ndarray and not data.train.flags.owndata
    # the trainer's path: one tensor over the whole split, indexed by numpy index arrays
    indices = np.array([4, 0, 4])
    batch = torch.from_numpy(data.train)[indices]
    np.testing.assert_array_equal(batch.numpy(), arrays["train"][indices])
    data.train[0] = 0  # stays in this process: the file is untouched
    np.testing.assert_array_equal(load_data(f"svhn:{tmp_path}", 32).train[0], arrays["train"][0])


def test_config_fields_reach_the_loader(tmp_path):
    make_svhn(tmp_path, {"train": 6, "test": 4, "extra": 5})
    config = load_config("svhn", {"data": f"svhn:{tmp_path}", "svhn_extra": True,
                                  "cache_dir": str(tmp_path / "mine"), "data_workers": 1})
    data = load_data_for(config)
    assert len(data.train) == 11 and data.cache.directory.parent == tmp_path / "mine"


def test_cache_location(tmp_path, monkeypatch):
    data = tmp_path / "svhn"
    make_svhn(data)
    assert load_data(f"svhn:{data}", 32).cache.directory.parent == tmp_path / "cache"  # $PROGVAE_CACHE
    chosen = load_data(f"svhn:{data}", 32, cache_dir=tmp_path / "mine")
    assert chosen.cache.directory.parent == tmp_path / "mine" and chosen.cache.status == "built"
    monkeypatch.delenv("PROGVAE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "progvae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "progvae"


def test_an_unwritable_cache_folder(tmp_path):
    make_svhn(tmp_path)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(UserError, match="Cannot create the cache folder .*--cache_dir"):
        load_data(f"svhn:{tmp_path}", 32, cache_dir=tmp_path / "file" / "cache")


def test_worker_processes_decode_the_same_images(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "WORKER_CHUNK", 4)  # 40 images: 10 tasks for 2 processes
    for index, image in enumerate(random_images(40, 8, 8)):
        Image.fromarray(image).save(tmp_path / f"{index:02d}.png")
    serial = load_data(f"folder:{tmp_path}", 8, workers=1, cache_dir=tmp_path / "one")
    parallel = load_data(f"folder:{tmp_path}", 8, workers=2, cache_dir=tmp_path / "two")
    np.testing.assert_array_equal(serial.train, parallel.train)
    np.testing.assert_array_equal(serial.test, parallel.test)
    (tmp_path / "33.png").write_bytes(b"damaged")  # an error in a worker reaches the user as is
    with pytest.raises(UserError, match="33.png"):
        load_data(f"folder:{tmp_path}", 8, workers=2, cache_dir=tmp_path / "two")


def test_worker_processes_read_the_lmdb_themselves(tmp_path, monkeypatch):
    make_lsun_lmdb(tmp_path)
    monkeypatch.setattr(datasets, "WORKER_CHUNK", 4)
    check_lsun(load_data(f"lsun:{tmp_path}", 16, workers=2))


# ---------------------------------------------------------------- python -m progvae data


def test_data_command_prints_splits_and_writes_a_preview(tmp_path, capsys):
    make_celeba(tmp_path / "celeba")
    preview = tmp_path / "preview.png"
    main(["data", f"--data=celeba:{tmp_path / 'celeba'}", f"--out={preview}", "--verify=True"])
    out = capsys.readouterr().out
    for text in ("train           6  (64, 64, 3)", "valid           2", "test            3",
                 "uint8", "cache: ", "(built;", "centre crop 148x148", "verified", "Wrote 6"):
        assert text in out
    assert Image.open(preview).size[0] > 64
    main(["data", f"--data=celeba:{tmp_path / 'celeba'}", f"--out={preview}"])
    assert "(reused;" in capsys.readouterr().out


def test_data_command_finds_the_image_size_itself(tmp_path, capsys):
    for index, image in enumerate(random_images(4, 12, 12)):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    assert natural_image_size(f"folder:{tmp_path}") == 12 and natural_image_size("celeba:/any") == 64
    main(["data", f"--data=folder:{tmp_path}", f"--out={tmp_path / 'p.png'}"])
    assert "train           3  (12, 12, 3)" in capsys.readouterr().out


def test_data_command_bad_input_is_one_sentence(tmp_path, capsys):
    make_svhn(tmp_path, {"train": 2})
    with pytest.raises(SystemExit) as exit_info:
        main(["data", f"--data=svhn:{tmp_path}", f"--out={tmp_path / 'p.png'}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("progvae: error:") and "test_32x32.mat" in error and "\n" not in error
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------- CIFAR-10 and ImageNet
def _cifar10_batch(count: int, first: int) -> bytes:
    """`count` binary CIFAR-10 records: label, then the R, G and B planes; image k's red plane
    is (first + k + position) % 256, green 1, blue 2."""
    records = []
    for k in range(count):
        red = (np.arange(1024) + first + k) % 256
        planes = np.concatenate([red, np.full(1024, 1), np.full(1024, 2)]).astype(np.uint8)
        records.append(bytes([k % 10]) + planes.tobytes())
    return b"".join(records)


def _cifar10_release(folder) -> None:
    bins = folder / "cifar-10-batches-bin"
    bins.mkdir(parents=True)
    for index in range(1, 6):
        (bins / f"data_batch_{index}.bin").write_bytes(_cifar10_batch(2, 10 * index))
    (bins / "test_batch.bin").write_bytes(_cifar10_batch(3, 100))


def test_cifar10_binary_release_from_the_archive_and_from_its_folder(tmp_path):
    import tarfile

    _cifar10_release(tmp_path / "extracted")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as packed:
        packed.add(tmp_path / "extracted" / "cifar-10-batches-bin", "cifar-10-batches-bin")
    for spec in (f"cifar10:{archive}", f"cifar10:{tmp_path / 'extracted'}"):
        data = load_data(spec, 32)
        assert data.train.shape == (10, 32, 32, 3) and data.test.shape == (3, 32, 32, 3)
        # row-major planes: pixel (row, column) of image 1 of data_batch_1 has red 10+1+32r+c
        assert data.train[1, 2, 5, 0] == (10 + 1 + 2 * 32 + 5) % 256
        assert (data.train[..., 1] == 1).all() and (data.test[..., 2] == 2).all()
        assert data.test[0, 0, 0, 0] == 100
    (tmp_path / "extracted" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"x" * 50)
    with pytest.raises(UserError, match="not a whole number of CIFAR-10 records"):
        load_data(f"cifar10:{tmp_path / 'extracted'}", 32)


def test_cifar10_python_release_is_refused_as_pickles(tmp_path):
    python = tmp_path / "cifar-10-batches-py"
    python.mkdir()
    (python / "data_batch_1").write_bytes(b"\x80\x04pickled")
    with pytest.raises(UserError, match="pickles that progvae never loads.*binary release"):
        load_data(f"cifar10:{tmp_path}", 32)


@pytest.mark.parametrize("layout", ["vdvae", "official"])
def test_downsampled_imagenet_in_both_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    train, valid = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (7, 3))
    if layout == "vdvae":
        np.save(tmp_path / "imagenet32-train.npy", train)
        np.save(tmp_path / "imagenet32-valid.npy", valid)
    else:   # rows of channel planes, in batches
        rows = lambda images: images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # noqa: E731
        for index, part in enumerate((train[:4], train[4:]), 1):
            np.savez(tmp_path / f"train_data_batch_{index}.npz", data=rows(part),
                     labels=np.zeros(len(part)))
        np.savez(tmp_path / "val_data.npz", data=rows(valid), labels=np.zeros(3))
    data = load_data(f"imagenet32:{tmp_path}", 32)
    assert np.array_equal(data.train, train) and np.array_equal(data.test, valid)
    with pytest.raises(UserError, match="32x32 but the config asks for 64x64"):
        load_data(f"imagenet32:{tmp_path}", 64)


def test_downsampled_imagenet_of_the_wrong_shape_is_refused_from_its_header(tmp_path):
    np.save(tmp_path / "imagenet64-train.npy", np.zeros((2, 32, 32, 3), np.uint8))
    np.save(tmp_path / "imagenet64-valid.npy", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="not imagenet64 images"):
        load_data(f"imagenet64:{tmp_path}", 64)


@pytest.mark.parametrize("preset, size", [("cifar10", 32), ("imagenet32", 32), ("imagenet64", 64)])
def test_the_vdvae_dataset_presets_carry_its_published_settings(preset, size):
    config = load_config(preset)
    assert config.data == preset and config.image_size == size
    assert config.weight_decay == 0.01 and config.warmup_steps == 100
    assert config.width == (384 if preset == "cifar10" else 512)
