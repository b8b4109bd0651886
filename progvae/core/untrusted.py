"""Reading back files handed to progvae, which are untrusted: nothing is unpickled but tensors,
numbers, strings and containers, and a file that is not what it should be is one sentence
naming it (a UserError), never a traceback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from progvae.core.errors import UserError


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs, and nothing that can run code: checkpoints written by
    progvae before its RNG states became tensors hold numpy's random state as an array."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def refused_global(error: pickle.UnpicklingError) -> str:
    """What a weights-only load refused, from its error: the pickled global it would not run."""
    return str(error).split("Unsupported global: GLOBAL ")[-1].split(" ")[0][:80]


# What every checkpoint progvae ever wrote holds, and what loading one relies on first.
CHECKPOINT_FIELDS = {"step": int, "model": dict, "ema": dict}


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without unpickling anything but tensors, numbers,
    strings and containers (`weights_only=True`): a file handed to progvae cannot run code. A
    file holding anything else, or one that is not a readable checkpoint, is one sentence."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"'{path}' holds objects progvae refuses to load (for example "
                        f"{refused_global(error)}): it was not written by progvae or has been "
                        "altered; progvae never unpickles code, so use a checkpoint written "
                        "by progvae.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise UserError(f"'{path}' is not a readable checkpoint ({first_line}); it may be "
                        "truncated or corrupt, so restore it or start a new --out.") from None
    if not isinstance(state, dict):
        raise UserError(f"'{path}' does not hold a progvae checkpoint; pass the --out of a "
                        "progvae run.")
    for name, kind in CHECKPOINT_FIELDS.items():
        value = state.get(name)
        if (not isinstance(value, kind) or isinstance(value, bool)
                or kind is dict and not all(isinstance(v, torch.Tensor) for v in value.values())):
            raise UserError(f"'{path}' holds no valid \"{name}\" (it was altered or written by "
                            "something else); restore it, or resume from a kept checkpoint "
                            "with --resume_from=STEP.")
    return state


MAX_JSON_BYTES = 64 << 20   # a run's JSON files are kilobytes; a larger one is not progvae's
RESTORE = "restore it (or run the command that writes it again), or pass another run"


def read_text(path: str | Path, fix: str = RESTORE) -> str:
    """The UTF-8 text of `path`, a file progvae wrote earlier or a preset: missing, a folder,
    unreadable, larger than MAX_JSON_BYTES or not UTF-8 is one sentence naming the file and
    `fix`."""
    path = Path(path)
    where = f"'{path}'"
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{where} is {size:,} bytes, far larger than any file progvae "
                            f"writes; {fix}.")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where} is missing; {fix}.") from None
    except IsADirectoryError:
        raise UserError(f"{where} is a folder, not a file; {fix}.") from None
    except OSError as error:
        raise UserError(f"{where} cannot be read ({error.strerror}); {fix}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; {fix}.") from None


def read_json(path: str | Path, fields: dict[str, type] | None = None,
              fix: str = RESTORE) -> dict:
    """The JSON object in `path`, a file progvae wrote earlier (config.json, summary.json,
    eval.json, table.json, a manifest). A file that is missing, empty, larger than
    MAX_JSON_BYTES, not UTF-8, cut short, not JSON, not an object, or whose `fields` (name:
    type) are absent or of another type, is one sentence naming the file and `fix`."""
    path = Path(path)
    where = f"'{path}'"
    text = read_text(path, fix)
    if not text.strip():
        raise UserError(f"{where} is empty; {fix}.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        cut = " (it ends early: cut short?)" if error.pos >= len(text.rstrip()) else ""
        raise UserError(f"{where} is not valid JSON at line {error.lineno}, column "
                        f"{error.colno}{cut}; {fix}.") from None
    except RecursionError:
        raise UserError(f"{where} nests too deeply to be progvae's; {fix}.") from None
    if not isinstance(value, dict):
        raise UserError(f"{where} holds a JSON {_json_type(value)} where progvae writes an "
                        f"object; {fix}.")
    for name, kind in (fields or {}).items():
        if name not in value:
            raise UserError(f"{where} has no \"{name}\"; {fix}.")
        if not isinstance(value[name], kind) or isinstance(value[name], bool) != (kind is bool):
            raise UserError(f"{where} holds a {_json_type(value[name])} as \"{name}\" where "
                            f"progvae writes a {_json_type(kind())}; {fix}.")
    return value


def read_json_lines(path: str | Path) -> list[dict]:
    """The readable lines of a .jsonl log that have a "step" (metrics.jsonl, heldout.jsonl): a
    torn, hand-edited or non-UTF-8 line is skipped, and a missing log has none."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    lines = []
    for text in raw.split(b"\n"):
        try:
            line = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return lines


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "true/false",
            type(None): "null"}.get(type(value), "number")



def check_numbers(values: dict, names: tuple[str, ...], where: str, fix: str = RESTORE) -> dict:
    """`values` (read from the file `where`) with each of `names` that it holds a number or
    null, as progvae writes them; anything else is one sentence naming the field."""
    for name in names:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"'{where}' holds a {_json_type(value)} as \"{name}\" where progvae "
                            f"writes a number; {fix}.")
    return values
