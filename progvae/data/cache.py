"""The preprocessing cache: a dataset decoded once into uint8 .npy files, memory-mapped after.

A source (an SVHN folder, CelebA, LSUN, a folder of images) is described by a `Recipe`: what it
is, its preprocessing (a description and a version number), a fingerprint of its files and a
function that writes the arrays. `load_cached` finds the recipe's entry under the cache root,

    <root>/<kind>-<options>-<hash of kind, source path and options>/
        manifest.json        source, fingerprint, preprocessing, and per array: shape, size,
                             mtime and SHA-256 checksums
        train.npy, test.npy  (N, H, W, C) uint8, opened with np.load(mmap_mode="c")
        valid.npy            where the source has a validation split (CelebA)

and returns its arrays when the manifest matches the recipe and the files pass their checks.
Otherwise (no entry yet, a changed source, an older preprocessing, a corrupt or unreadable file)
it rebuilds the entry, saying why. Arrays are written to temporary files and renamed into place,
and the manifest is written last, so an interrupted build leaves no entry that looks complete.
Concurrent processes (e.g. the ranks of one torchrun job) take a lock on the entry: one builds,
the others wait and then load what it wrote.

Checks on every load: the manifest, the .npy headers against the recorded shapes, the file
sizes, and a SHA-256 of 16 evenly spaced 1 MiB blocks of each array (the whole array when it is
at most 16 MiB). When a file's mtime differs from the one recorded (it was written to, or
copied) the whole array is checksummed; `verify_cache` always checks every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from progvae.core.atomic import atomic_write_json
from progvae.core.errors import UserError

CACHE_FORMAT = 1  # the layout of an entry and its manifest; a different one is rebuilt
MANIFEST = "manifest.json"
SPOT_BLOCKS = 16  # blocks checksummed on every load ...
SPOT_BLOCK_BYTES = 1 << 20  # ... of 1 MiB each
HASH_CHUNK_BYTES = 64 << 20  # full checksums read this much at a time


@dataclass
class Recipe:
    """How one source becomes cached arrays.

    `build(writer)` decodes the source and fills arrays it gets from `writer.array(split, shape)`;
    it raises `UserError` for bad input. `fingerprint` comes from `fingerprint_files` and must
    change whenever the source does; `version` must be bumped whenever the preprocessing does.
    """

    kind: str  # "svhn", "celeba", "lsun", "folder"
    source: Path  # the resolved source path the user named
    options: dict[str, Any]  # everything besides the source that changes the arrays
    preprocessing: str  # what is done to each image, in words (kept in the manifest)
    version: int  # of the preprocessing
    fingerprint: dict[str, Any]
    build: Callable[["CacheWriter"], None]


@dataclass
class CacheEntry:
    """Where a dataset's cache lives and what loading it did."""

    directory: Path
    status: str  # "reused", "built" or "rebuilt (why)"
    manifest: dict[str, Any] = field(repr=False)

    @property
    def size_bytes(self) -> int:
        return sum(record["file_bytes"] for record in self.manifest["arrays"].values())


def cache_root(cache_dir: str | Path = "") -> Path:
    """The cache folder: `cache_dir` if given, else $PROGVAE_CACHE, else
    $XDG_CACHE_HOME/progvae, else ~/.cache/progvae."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    if os.environ.get("PROGVAE_CACHE"):
        return Path(os.environ["PROGVAE_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return (base / "progvae").resolve()


def entry_directory(recipe: Recipe, root: Path) -> Path:
    """`<root>/<kind>-<options>-<12 hex digits>`, e.g. `celeba-64-…` or `svhn-extra-…`:
    readable, and unique per source and options."""
    identity = json.dumps([recipe.kind, str(recipe.source), recipe.options], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    # a true flag shows as its name, a false one not at all, anything else as its value
    options = [name if value is True else str(value)
               for name, value in sorted(recipe.options.items()) if value is not False]
    return root / "-".join([recipe.kind, *options, digest])


def fingerprint_files(files: list[str] | list[Path], root: Path) -> dict[str, Any]:
    """A fingerprint of the files a source is read from: their count, total size, and a SHA-256
    of every (path relative to `root`, size, mtime in ns). Touching or replacing any file, or
    adding or removing one, changes it; reading none of their contents keeps it cheap."""
    prefix = os.path.join(str(root), "")
    lines, total = [], 0
    for file in map(str, files):
        try:
            stat = os.stat(file)
        except OSError as error:
            raise UserError(f"Cannot read {file} ({error.strerror}); fix or remove it.") from None
        total += stat.st_size
        lines.append(f"{file.removeprefix(prefix)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"files": len(lines), "bytes": total, "sha256": digest}


def load_cached(recipe: Recipe, cache_dir: str | Path = "") -> tuple[dict[str, np.ndarray], CacheEntry]:
    """The recipe's arrays from the cache, built (or rebuilt) first when they are missing or
    cannot be trusted. Arrays are memory-mapped, copy-on-write: writing to one never reaches
    the file."""
    directory = entry_directory(recipe, cache_root(cache_dir))
    arrays, manifest, problem = _open_entry(directory, recipe)
    if arrays is not None:
        return arrays, CacheEntry(directory, "reused", manifest)
    created = not directory.exists()
    _make_folder(directory)
    try:
        with _locked(directory):
            arrays, manifest, problem = _open_entry(directory, recipe)  # built while we waited?
            if arrays is not None:
                return arrays, CacheEntry(directory, "reused", manifest)
            if problem != "no cache yet":
                print(f"progvae: the cache at {directory} {problem}; rebuilding it.", flush=True)
            _build(directory, recipe)
    except BaseException:
        if created and not (directory / MANIFEST).exists():  # leave no empty entry behind
            shutil.rmtree(directory, ignore_errors=True)
        raise
    arrays, manifest, after = _open_entry(directory, recipe)
    if arrays is None:
        raise UserError(f"The cache just written at {directory} does not read back ({after}); "
                        "check that disk, or pass --cache_dir=DIR to put the cache elsewhere.")
    status = "built" if problem == "no cache yet" else f"rebuilt ({problem})"
    return arrays, CacheEntry(directory, status, manifest)


def verify_cache(entry: CacheEntry) -> list[str]:
    """Check every byte of an entry's arrays against the manifest; returns the problems found."""
    problems = []
    for record in entry.manifest["arrays"].values():
        try:
            array = _open_array(entry.directory / record["file"], record)
        except (OSError, ValueError) as error:
            problems.append(f"{record['file']} is unreadable ({error})")
            continue
        if _checksum(array) != record["sha256"]:
            problems.append(f"{record['file']} fails its checksum")
    return problems


# ---------------------------------------------------------------- reading an entry


def _open_entry(directory: Path, recipe: Recipe):
    """(arrays, manifest, None) for a trustworthy entry, else (None, None, why not)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None, None, "no cache yet"
    except (OSError, ValueError):
        return None, None, "has an unreadable manifest"
    try:
        return _check_entry(directory, recipe, manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return None, None, f"is corrupt ({type(error).__name__}: {error})"


def _check_entry(directory: Path, recipe: Recipe, manifest: dict):
    if manifest.get("format") != CACHE_FORMAT:
        return None, None, "was written by another version of progvae's cache"
    preprocessing = manifest["preprocessing"]
    if preprocessing != {"version": recipe.version, "description": recipe.preprocessing}:
        return None, None, (f"was written by an older preprocessing (version {preprocessing.get('version')}, "
                            f"now {recipe.version}: {recipe.preprocessing})")
    if manifest["source_fingerprint"] != recipe.fingerprint:
        return None, None, f"is out of date: {recipe.source} changed since it was built"
    arrays, refreshed = {}, False
    for split, record in manifest["arrays"].items():
        path = directory / record["file"]
        array = _open_array(path, record)
        stat = path.stat()
        if stat.st_size != record["file_bytes"]:
            return None, None, f"is corrupt: {record['file']} has the wrong size"
        if _spot_checksum(array) != record["spot_sha256"]:
            return None, None, f"is corrupt: {record['file']} fails its checksum"
        if stat.st_mtime_ns != record["mtime_ns"]:  # written to, or copied: check it all
            if _checksum(array) != record["sha256"]:
                return None, None, f"is corrupt: {record['file']} fails its checksum"
            record["mtime_ns"], refreshed = stat.st_mtime_ns, True
        arrays[split] = np.asarray(array)  # a plain ndarray view of the memory map
    if not {"train", "test"} <= set(arrays):
        return None, None, "is corrupt: it lacks the train or test split"
    if refreshed:  # remember the new mtimes, so the next load needs only the quick checks
        with contextlib.suppress(OSError):
            atomic_write_json(manifest, directory / MANIFEST, indent=1)
    return arrays, manifest, None


def _open_array(path: Path, record: dict) -> np.ndarray:
    array = np.load(path, mmap_mode="c", allow_pickle=False)
    if array.dtype != np.uint8 or list(array.shape) != record["shape"]:
        raise ValueError(f"{path.name} holds {array.dtype} {array.shape}, not uint8 {tuple(record['shape'])}")
    return array


def _flat_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1))


def _checksum(array: np.ndarray) -> str:
    data, digest = _flat_bytes(array), hashlib.sha256()
    for start in range(0, len(data), HASH_CHUNK_BYTES):
        digest.update(data[start : start + HASH_CHUNK_BYTES])
    return digest.hexdigest()


def _spot_checksum(array: np.ndarray) -> str:
    data, digest = _flat_bytes(array), hashlib.sha256()
    if len(data) <= SPOT_BLOCKS * SPOT_BLOCK_BYTES:
        digest.update(data)
    else:
        for start in np.linspace(0, len(data) - SPOT_BLOCK_BYTES, SPOT_BLOCKS).astype(np.int64):
            digest.update(data[int(start) : int(start) + SPOT_BLOCK_BYTES])
    return digest.hexdigest()


# ---------------------------------------------------------------- writing an entry


class CacheWriter:
    """Hands a recipe's `build` the arrays to fill: uint8 memory maps on temporary files in the
    entry's folder, renamed into place only once the whole build has succeeded."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.arrays: dict[str, np.memmap] = {}
        self.temporary: dict[str, Path] = {}

    def array(self, split: str, shape: tuple[int, ...]) -> np.ndarray:
        """A new (N, H, W, C) uint8 array for `split`; asking again replaces the earlier one."""
        self._drop(split)
        path = self.directory / f"{split}.npy.tmp-{os.getpid()}"
        self.temporary[split] = path
        self.arrays[split] = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(shape))
        return self.arrays[split]

    def _drop(self, split: str) -> None:
        self.arrays.pop(split, None)
        path = self.temporary.pop(split, None)
        if path is not None:
            path.unlink(missing_ok=True)  # a process still mapping it keeps its pages

    def commit(self) -> dict[str, dict]:
        """Flush, checksum and rename every array into place; returns their manifest records."""
        records = {}
        for split, array in self.arrays.items():
            array.flush()
            record = {"file": f"{split}.npy", "shape": list(array.shape), "dtype": "uint8",
                      "sha256": _checksum(array), "spot_sha256": _spot_checksum(array)}
            final = self.directory / record["file"]
            os.replace(self.temporary[split], final)
            stat = final.stat()
            record.update(file_bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
            records[split] = record
        self.arrays, self.temporary = {}, {}
        return records

    def discard(self) -> None:
        for split in list(self.temporary):
            self._drop(split)


def _build(directory: Path, recipe: Recipe) -> None:
    started = time.perf_counter()
    (directory / MANIFEST).unlink(missing_ok=True)  # the old arrays are untrusted from here on
    print(f"progvae: caching {recipe.kind} from {recipe.source} ({recipe.preprocessing}) "
          f"in {directory}", flush=True)
    writer = CacheWriter(directory)
    try:
        recipe.build(writer)
        records = writer.commit()
    except BaseException as error:
        writer.discard()
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            raise UserError(f"Could not write the cache in {directory} ({error.strerror or error}); "
                            "free space there or pass --cache_dir=DIR (or set PROGVAE_CACHE).") from None
        raise
    for stale in directory.glob("*.npy"):  # splits an older build had and this one has not
        if stale.name not in {record["file"] for record in records.values()}:
            stale.unlink()
    seconds = time.perf_counter() - started
    manifest = {
        "format": CACHE_FORMAT,
        "kind": recipe.kind,
        "source": str(recipe.source),
        "options": recipe.options,
        "preprocessing": {"version": recipe.version, "description": recipe.preprocessing},
        "source_fingerprint": recipe.fingerprint,
        "arrays": records,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 3),
    }
    atomic_write_json(manifest, directory / MANIFEST, indent=1)
    counts = ", ".join(f"{record['shape'][0]:,} {split}" for split, record in records.items())
    print(f"progvae: cached {counts} images in {seconds:.1f} s.", flush=True)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot create the cache folder {folder} ({error.strerror or error}); "
                        "pass --cache_dir=DIR or set PROGVAE_CACHE to a writable folder.") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on an entry (a file in it), waiting while another process does."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, concurrent builds of one entry are on the user
        yield
        return
    with open(directory / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"progvae: waiting for another process to finish the cache at {directory}.",
                  file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
