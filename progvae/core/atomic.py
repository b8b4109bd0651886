"""Writing a file so that a reader (or a crash) sees the old version or the new one, never half
of one: the one helper every writer in progvae uses."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from progvae.core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside `path` (same folder, so the rename is atomic; a
    unique name, so concurrent writers never share it). When the block ends normally the file
    is flushed to disk and renamed over `path`; when it raises, the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created by the writer with the usual permissions (mkstemp's would be owner-only).
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def atomic_write_json(values: dict, path: str | Path, indent: int = 2) -> None:
    """Valid JSON always: a NaN or infinity (which json.dumps would write as the non-JSON
    `NaN`) becomes null; `flag_non_finite` is how a result says which values those were."""
    atomic_write_text(json.dumps(_finite_or_null(values), indent=indent, allow_nan=False) + "\n",
                      path)


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def flag_non_finite(values: dict, what: str) -> dict:
    """A result with its NaN or infinite numbers named: they become None (null in JSON), the
    key "non_finite" lists them, and a warning says so on stderr. Unchanged if all are finite."""
    bad = sorted(key for key, value in values.items()
                 if isinstance(value, float) and not math.isfinite(value))
    if not bad:
        return values
    print(f"WARNING: {what} has non-finite values ({', '.join(bad)}); they are written as null "
          "and listed under non_finite. The model or the data produce NaN or Inf.",
          file=sys.stderr, flush=True)
    return {**{key: None if key in bad else value for key, value in values.items()},
            "non_finite": bad}


def writable_output(path, flag: str, suffix: str | None = None) -> Path:
    """Check, before any work, that the file `path` (given as `flag`) can be written: the right
    suffix, not a folder, its folder creatable and writable. Returns it as a Path."""
    path = Path(str(path))
    if suffix is not None and path.suffix.lower() != suffix:
        raise UserError(f"{flag} must name a {suffix} file, got '{path}'.")
    if path.is_dir():
        raise UserError(f"{flag}='{path}' is a folder; pass the name of a {suffix or ''} file "
                        "to write.".replace("  ", " "))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{flag}='{path}' cannot be written: its folder cannot be created "
                        f"({error.strerror}); pass a path you can write to.") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag}='{path}' cannot be written (no permission); pass a path you "
                        "can write to.")
    return path


def writable_folder(path, flag: str) -> Path:
    """Check, before any work, that the folder `path` (given as `flag`) exists or can be made,
    and can be written to. Returns it as a Path."""
    path = Path(str(path))
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}='{path}' is a file; pass a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{flag}='{path}' cannot be created ({error.strerror}); pass a folder "
                        "you can write to.") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag}='{path}' cannot be written (no permission); pass a folder you "
                        "can write to.")
    return path


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through `progvae.core.atomic.atomic_path`: a kill at any moment leaves either the
    old file or the new one, never half of one. A write that fails (a full disk, a quota or
    file-size limit) leaves the old one too, and is one sentence saying so."""
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            torch.save(obj, temporary)
    except (OSError, RuntimeError) as error:   # torch's writer reports a failed write as a
        # RuntimeError without the cause; say what there is, and how much room is left
        cause = error.strerror if isinstance(error, OSError) and error.strerror else \
            "the write failed"
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2 ** 30:.1f} GiB free there"
        except OSError:
            free = "free space unknown"
        raise UserError(f"Could not write '{path}' ({cause}; {free}): the previous checkpoint is "
                        "intact, so free space (or raise the file-size limit) and run the same "
                        "command again to continue from it.") from None
