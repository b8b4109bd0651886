"""Datasets, pixel conversions, the resumable batch sampler and image grids."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from progvae.core.errors import UserError
from progvae.data.images import save_grid, save_rows
from progvae.data.loading import (BatchSampler, ImageData, augment_batch, load_data, to_model_input,
                                  to_uint8_images)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """`folder:` data is cached: in a folder of each test's own, never the user's."""
    monkeypatch.setenv("PROGVAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)


def random_images(count, size, channels, seed=0):
    shape = (count, size, size) if channels == 1 else (count, size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------- built-in datasets


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_shapes_split_and_range(image_size):
    data = load_data("digits", image_size)
    assert isinstance(data, ImageData) and data.name == "digits"
    assert data.train.shape == (1500, image_size, image_size, 1)
    assert data.test.shape == (297, image_size, image_size, 1)
    assert data.train.dtype == np.uint8 and data.test.dtype == np.uint8
    assert data.image_size == image_size and data.channels == 1
    assert data.train.min() == 0 and data.train.max() == 255


def test_digits_is_deterministic():
    first, second = load_data("digits", 16), load_data("digits", 16)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.test, second.test)


def test_digits_rejects_unsupported_size():
    with pytest.raises(UserError, match="image_size 8, 16 or 32"):
        load_data("digits", 28)


def test_patches_shapes_content_and_determinism():
    data = load_data("patches", 32)
    assert data.train.shape == (6000, 32, 32, 3) and data.test.shape == (600, 32, 32, 3)
    assert data.train.dtype == np.uint8 and data.channels == 3
    assert data.train.std() > 20 and data.test.std() > 20  # real photo content, not a constant
    again = load_data("patches", 32)
    np.testing.assert_array_equal(data.train, again.train)
    np.testing.assert_array_equal(data.test, again.test)
    # crops from disjoint regions: no test crop equals a train crop
    train_keys = {crop.tobytes() for crop in data.train}
    assert not any(crop.tobytes() in train_keys for crop in data.test)


def test_the_patches_held_out_split_is_as_detailed_as_the_training_split():
    """Held-out rates and distortions stand for training's only if the held-out crops are
    alike: their mean absolute pixel difference and spread are within 5% of training's (a
    held-out region at the photos' right edge was 21% smoother, and a model's held-out rate
    then sat 11% under its training rate)."""
    data = load_data("patches", 32)

    def detail(images):
        return np.abs(np.diff(images.astype(np.float32), axis=1)).mean()

    assert detail(data.test) / detail(data.train) == pytest.approx(1.0, abs=0.05)
    assert data.test.std() / data.train.std() == pytest.approx(1.0, abs=0.05)


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(UserError, match="digits, patches, photos, folder:PATH, npz:PATH"):
        load_data("mnist", 32)


# ---------------------------------------------------------------- folder:PATH


def test_folder_grayscale_split(tmp_path):
    for index, image in enumerate(random_images(20, 16, 1)):
        write_png(tmp_path / "nested" / f"{index:02d}.png", image)
    data = load_data(f"folder:{tmp_path}", 16)
    assert data.train.shape == (18, 16, 16, 1) and data.test.shape == (2, 16, 16, 1)
    assert data.name == f"folder:{tmp_path.resolve()}"
    again = load_data(f"folder:{tmp_path}", 16)
    np.testing.assert_array_equal(data.test, again.test)


def test_folder_is_cached_and_rebuilt_when_it_changes(tmp_path):
    images = random_images(10, 8, 3)
    for index, image in enumerate(images):
        write_png(tmp_path / "images" / f"{index}.png", image)
    first = load_data(f"folder:{tmp_path / 'images'}", 8)
    again = load_data(f"folder:{tmp_path / 'images'}", 8)
    assert (first.cache.status, again.cache.status) == ("built", "reused")
    np.testing.assert_array_equal(first.train, again.train)
    assert sorted(map(bytes, np.concatenate([again.train, again.test]))) == sorted(map(bytes, images))
    write_png(tmp_path / "images" / "10.png", random_images(1, 8, 3, seed=9)[0])
    grown = load_data(f"folder:{tmp_path / 'images'}", 8)
    assert grown.cache.status.startswith("rebuilt") and len(grown.train) + len(grown.test) == 11


def test_folder_rgb_rgba_and_mixed_channels(tmp_path):
    write_png(tmp_path / "a.png", random_images(1, 8, 3)[0])
    write_png(tmp_path / "b.PNG", random_images(1, 8, 4)[0])  # alpha is dropped
    write_png(tmp_path / "c.png", random_images(1, 8, 1)[0])  # grayscale becomes RGB
    data = load_data(f"folder:{tmp_path}", 8)
    assert data.channels == 3 and len(data.train) + len(data.test) == 3


def test_folder_train_test_subfolders(tmp_path):
    for index, image in enumerate(random_images(5, 8, 3)):
        write_png(tmp_path / "train" / f"{index}.png", image)
    write_png(tmp_path / "test" / "only.png", random_images(1, 8, 3, seed=1)[0])
    data = load_data(f"folder:{tmp_path}", 8)
    assert len(data.train) == 5 and len(data.test) == 1
    np.testing.assert_array_equal(data.test[0], random_images(1, 8, 3, seed=1)[0])


def test_folder_resize(tmp_path):
    write_png(tmp_path / "big.png", random_images(1, 40, 3)[0])
    write_png(tmp_path / "wide.png", np.zeros((20, 30, 3), np.uint8))
    data = load_data(f"folder:{tmp_path}", 16, resize=True)
    assert data.train.shape[1:] == (16, 16, 3) and data.test.shape[1:] == (16, 16, 3)


def test_folder_missing_path(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        load_data(f"folder:{tmp_path / 'nowhere'}", 32)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=f"{tmp_path}.*holds 0"):
        load_data(f"folder:{tmp_path}", 32)


def test_folder_unreadable_image(tmp_path):
    write_png(tmp_path / "good.png", random_images(1, 8, 3)[0])
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_data(f"folder:{tmp_path}", 8)


def test_folder_wrong_size_suggests_fix(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name, random_images(1, 28, 1)[0])
    with pytest.raises(UserError, match=r"a\.png is 28x28.*expects 32x32.*--image_size=28.*--resize=True"):
        load_data(f"folder:{tmp_path}", 32)


def test_folder_differing_sizes_names_two_files(tmp_path):
    write_png(tmp_path / "a.png", random_images(1, 8, 3)[0])
    write_png(tmp_path / "b.png", random_images(1, 12, 3)[0])
    with pytest.raises(UserError, match=r"a\.png.*b\.png"):
        load_data(f"folder:{tmp_path}", 8)


# ---------------------------------------------------------------- npz:PATH


def test_npz_rgb_and_grayscale(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, train=random_images(10, 8, 3), test=random_images(4, 8, 3, seed=1))
    data = load_data(f"npz:{path}", 8)
    assert data.train.shape == (10, 8, 8, 3) and data.test.shape == (4, 8, 8, 3)
    np.savez(path, train=random_images(10, 8, 1), test=random_images(4, 8, 1))  # NHW
    assert load_data(f"npz:{path}", 8).channels == 1


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"train": np.zeros((2, 8, 8, 3), np.uint8)}, "no array under the key 'test'"),
        ({"train": np.zeros((2, 8, 8, 3)), "test": np.zeros((2, 8, 8, 3), np.uint8)}, "float64.*uint8"),
        ({"train": np.zeros((2, 8, 8, 3, 1), np.uint8), "test": np.zeros((2, 8, 8, 3), np.uint8)}, "has shape"),
        ({"train": np.zeros((2, 16, 16, 3), np.uint8), "test": np.zeros((2, 16, 16, 3), np.uint8)}, "--image_size=16"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=f"bad.npz.*{message}"):
        load_data(f"npz:{path}", 8)


def test_npz_missing_or_unreadable(tmp_path):
    with pytest.raises(UserError, match="absent.npz does not exist"):
        load_data(f"npz:{tmp_path / 'absent.npz'}", 8)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.npz"):
        load_data(f"npz:{tmp_path / 'junk.npz'}", 8)


# ---------------------------------------------------------------- pixel conversions


def test_model_input_round_trip_is_exact():
    every_value = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8, 1).repeat(1, 1, 1, 3)  # (B, H, W, C)
    model_input = to_model_input(every_value)
    assert model_input.shape == (4, 3, 8, 8) and model_input.dtype == torch.float32
    assert model_input.min() == -1 and model_input.max() == 1
    np.testing.assert_array_equal(to_uint8_images(model_input), every_value.numpy())
    clipped = to_uint8_images(torch.tensor([-3.0, 3.0]).reshape(1, 1, 1, 2))
    assert clipped.ravel().tolist() == [0, 255]


# ---------------------------------------------------------------- BatchSampler


def test_sampler_covers_each_index_once_per_epoch():
    sampler = BatchSampler(n=20, batch_size=4, seed=0)
    epochs = [np.concatenate([sampler.next_indices() for _ in range(5)]) for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(20))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_sampler_without_drop_last_keeps_the_remainder():
    sampler = BatchSampler(n=10, batch_size=4, seed=1, drop_last=False)
    batches = [sampler.next_indices() for _ in range(3)]
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))


def test_sampler_resume_continues_identical_sequence():
    uninterrupted = BatchSampler(n=23, batch_size=5, seed=3)
    expected = [uninterrupted.next_indices() for _ in range(12)]
    first = BatchSampler(n=23, batch_size=5, seed=3)
    seen = [first.next_indices() for _ in range(6)]
    resumed = BatchSampler(n=23, batch_size=5, seed=3)
    resumed.load_state_dict(first.state_dict())
    seen += [resumed.next_indices() for _ in range(6)]
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got, want)


def test_channel_augmentation_reorders_each_images_colours_and_resumes_identically():
    """--augment=channels: every image keeps its pixels, its colour channels in one of the six
    orders; the draws depend only on the seed and the batch's place, so a resumed sampler
    augments its batches exactly as the uninterrupted one did."""
    images = torch.arange(3, dtype=torch.uint8).reshape(1, 1, 1, 3).repeat(32, 4, 4, 1)
    images[:, 0, 0] += torch.arange(32, dtype=torch.uint8)[:, None] * 3   # tell images apart
    sampler = BatchSampler(n=32, batch_size=32, seed=0)
    sampler.next_indices()
    out = augment_batch(images, "channels", sampler.batch_generator())
    assert torch.equal(augment_batch(images, "none", sampler.batch_generator()), images)
    orders = set()
    for before, after in zip(images, out):
        order = tuple(int(after[1, 1, c]) for c in range(3))
        assert sorted(order) == [0, 1, 2]
        assert torch.equal(after, before[..., list(order)])
        orders.add(order)
    assert len(orders) > 2

    def draws(sampler, batches):
        return [(sampler.next_indices(), sampler.batch_generator().integers(0, 6, size=5))
                for _ in range(batches)]

    expected = draws(BatchSampler(n=23, batch_size=5, seed=3), 12)
    first = BatchSampler(n=23, batch_size=5, seed=3)
    seen = draws(first, 6)
    resumed = BatchSampler(n=23, batch_size=5, seed=3)
    resumed.load_state_dict(first.state_dict())
    seen += draws(resumed, 6)
    for (indices, orders), (want_indices, want_orders) in zip(seen, expected):
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_array_equal(orders, want_orders)
    assert len({tuple(orders) for _, orders in expected[:4]}) == 4   # every batch draws afresh


def test_sampler_ranks_are_disjoint():
    ranks = [BatchSampler(n=24, batch_size=3, seed=5, rank=rank, world_size=2) for rank in range(2)]
    for _ in range(4):  # one epoch
        rank0, rank1 = (sampler.next_indices() for sampler in ranks)
        assert len(rank0) == len(rank1) == 3 and not set(rank0) & set(rank1)


def test_sampler_rejects_dataset_smaller_than_a_batch():
    with pytest.raises(UserError, match="--batch_size"):
        BatchSampler(n=3, batch_size=4, seed=0)


# ---------------------------------------------------------------- image grids


def test_save_grid_grayscale_and_rgb(tmp_path):
    save_grid(np.zeros((5, 8, 8, 1), np.uint8), tmp_path / "gray.png")
    gray = iio.imread(tmp_path / "gray.png")
    # 8x8 enlarged 8x to 64x64 cells, 3 columns x 2 rows, 1-pixel padding
    assert gray.shape == (2 * 65 + 1, 3 * 65 + 1)
    save_grid(np.full((4, 80, 80, 3), 200, np.uint8), tmp_path / "rgb.png", ncols=4, padding=2)
    rgb = iio.imread(tmp_path / "rgb.png")
    assert rgb.shape == (80 + 4, 4 * 82 + 2, 3) and rgb[2, 2].tolist() == [200, 200, 200]
    assert not (tmp_path / "rgb.png.tmp").exists()


def test_save_rows_stacks_rows(tmp_path):
    originals, reconstructions = np.zeros((6, 64, 64, 1), np.uint8), np.zeros((6, 64, 64, 3), np.uint8)
    save_rows([originals, reconstructions], tmp_path / "sub" / "rows.png", padding=0)
    assert iio.imread(tmp_path / "sub" / "rows.png").shape == (128, 384, 3)
