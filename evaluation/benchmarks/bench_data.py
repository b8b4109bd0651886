"""How fast the data layer is: images/s the training loop's data path delivers, and the time
the preprocessing cache takes to build.

`benchmark_loader` times exactly what the trainer does each step: a `BatchSampler` batch of
indices, a gather from one tensor over the (memory-mapped) training split, and
`to_model_input` (uint8 NHWC → float NCHW in [−1, 1]), optionally followed by the copy to a GPU.

    python -m progvae.evaluation.benchmarks.bench_data --svhn_images=10000 --celeba_images=5000

makes a synthetic SVHN-shaped .mat and a CelebA-like folder of JPEGs in a temporary folder,
builds their caches (timed, reported per 10k images) and benchmarks loading from them.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from progvae.data.loading import BatchSampler, ImageData, load_data, to_model_input


def benchmark_loader(data: ImageData, batch_size: int = 64, seconds: float = 3.0,
                     threads: int | None = 1, device: str = "cpu", seed: int = 0) -> dict:
    """Images per second from `data.train` through the training transform, for `seconds`.

    `threads` sets torch's CPU threads while timing (None keeps the current setting). One is
    the honest default: a batch is a few small tensor ops that gain nothing from more threads,
    and on cores shared with other work OpenMP threads that wait for each other make them many
    times slower. `device="cuda"` adds the host-to-GPU copy, with a synchronise per batch so
    the copy is counted. Batches are random as in training, so a split bigger than the page
    cache is read from disk at random."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        images = torch.from_numpy(data.train)  # as the trainer does, once
        sampler = BatchSampler(len(data.train), batch_size, seed, drop_last=False)
        target = torch.device(device)

        def one_batch() -> int:
            batch = to_model_input(images[sampler.next_indices()]).to(target, non_blocking=True)
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            return len(batch)

        one_batch()  # warm-up: first-touch allocations, CUDA context
        count = batches = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            count += one_batch()
            batches += 1
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    image_bytes = int(np.prod(data.train.shape[1:]))
    return {
        "dataset": data.name,
        "image_shape": list(data.train.shape[1:]),
        "batch_size": batch_size,
        "threads": threads or previous_threads,
        "device": device,
        "seconds": round(elapsed, 3),
        "batches": batches,
        "images": count,
        "images_per_second": round(count / elapsed, 1),
        "uint8_megabytes_per_second": round(count * image_bytes / elapsed / 1e6, 1),
    }


def drop_page_cache(data: ImageData) -> bool:
    """Ask the kernel to forget the cached pages of `data`'s cache files, so the next reads come
    from disk (a cold start); returns whether it could."""
    if data.cache is None or not hasattr(os, "posix_fadvise"):
        return False
    for path in data.cache.directory.glob("*.npy"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return True


# ---------------------------------------------------------------- synthetic sources


def make_svhn_like(folder: Path, train: int, test: int, seed: int = 0) -> None:
    """SVHN-shaped .mat files: X (32, 32, 3, N) uint8, as the official ones."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("test", test)):
        images = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": images, "y": np.ones((count, 1), np.uint8)})


def make_celeba_like(folder: Path, count: int, seed: int = 0) -> None:
    """`count` 178×218 JPEGs of smooth random content (about the size of CelebA's files) and a
    list_eval_partition.txt splitting them 80/10/10 like the official one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(1, count + 1):
        coarse = Image.fromarray(rng.integers(0, 256, size=(14, 12, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((178, 218), Image.Resampling.BICUBIC)).astype(np.int16)
        pixels = np.clip(pixels + rng.integers(-6, 7, size=pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{number:06d}.jpg", quality=90)
        code = 0 if number <= 0.8 * count else 1 if number <= 0.9 * count else 2
        lines.append(f"{number:06d}.jpg {code}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def benchmark_synthetic(svhn_images: int = 10_000, celeba_images: int = 5_000, seconds: float = 3.0,
                        batch_sizes: str = "8,64", threads: str = "1,2", data_workers: int = 1,
                        workdir: str = "", device: str = "cpu", out: str = "") -> dict:
    """Build synthetic SVHN and CelebA caches (timed) and benchmark loading from them; prints
    as it goes, returns the numbers and writes them to `out` as JSON if given."""
    sizes, thread_counts = (
        [int(value) for value in str(text).strip("()").split(",") if value.strip()]
        for text in (batch_sizes, threads))
    report: dict = {"cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "data_workers": data_workers, "builds": {}, "loaders": []}
    with tempfile.TemporaryDirectory(dir=workdir or None) as scratch:
        root = Path(scratch)
        svhn_test = max(1, svhn_images // 5)
        started = time.perf_counter()
        make_svhn_like(root / "svhn", svhn_images, svhn_test)
        make_celeba_like(root / "celeba", celeba_images)
        print(f"made the synthetic sources in {time.perf_counter() - started:.1f} s")
        for spec, size, total in ((f"svhn:{root / 'svhn'}", 32, svhn_images + svhn_test),
                                  (f"celeba:{root / 'celeba'}", 64, celeba_images)):
            kind = spec.split(":")[0]
            started = time.perf_counter()
            data = load_data(spec, size, cache_dir=root / "cache", workers=data_workers)
            build = time.perf_counter() - started
            started = time.perf_counter()
            data = load_data(spec, size, cache_dir=root / "cache", workers=data_workers)
            reload = time.perf_counter() - started
            report["builds"][kind] = {"images": total, "build_seconds": round(build, 2),
                                      "seconds_per_10k_images": round(build * 10_000 / total, 2),
                                      "cached_load_seconds": round(reload, 4)}
            print(f"{kind}: cache of {total} images built in {build:.2f} s "
                  f"({build * 10_000 / total:.2f} s per 10k); loaded again in {reload * 1000:.1f} ms")
            for batch_size, thread_count, cold in itertools.product(sizes, thread_counts, (False, True)):
                if not cold or drop_page_cache(data):
                    result = benchmark_loader(data, batch_size, seconds, thread_count, device)
                    result["page_cache"] = "dropped first" if cold else "warm"
                    report["loaders"].append(result)
                    print(f"  batch {batch_size:>3}, {thread_count} thread(s), page cache "
                          f"{result['page_cache']}: {result['images_per_second']:,.0f} images/s "
                          f"({result['uint8_megabytes_per_second']} MB/s of uint8)")
            del data
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(**options) -> None:
    benchmark_synthetic(**options)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
