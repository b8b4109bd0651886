"""Writing a file so that a reader (or a crash) sees the old version or the new one, never half
of one: the one helper every writer in progvae uses."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator


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
    atomic_write_text(json.dumps(values, indent=indent) + "\n", path)


def writable_output(path, flag: str, suffix: str | None = None) -> Path:
    """Check, before any work, that the file `path` (given as `flag`) can be written: the right
    suffix, not a folder, its folder creatable and writable. Returns it as a Path."""
    from progvae.errors import UserError

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
