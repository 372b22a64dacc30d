"""Writing result files safely, in one place: atomic writes (temporary file + rename) and JSON.

A file written here is either the complete new content or what was there before, never a
half-written file that looks whole: the content goes to a temporary file in the same directory,
is flushed to disk and renamed over the target (``os.replace`` is atomic on POSIX file systems).
The temporary file is removed again when writing fails.

Reading torch files back (:func:`verify_torch_file`, :func:`load_torch_verified`): ``torch.save``
writes a zip archive whose members each carry a CRC-32, but ``torch.load`` never checks them, so
a flipped byte inside a tensor loads as a wrong number. Every checkpoint and model file is
therefore read through :func:`load_torch_verified`, which first reads the whole archive and checks
every member's CRC-32 (``zipfile.ZipFile.testzip``) and raises :class:`StoreError` naming the file
and what rewrites it. That costs one extra read of the file (CRC-32 runs at several GB/s) and
needs nothing written beside the file, so it also covers files written before this check existed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "StoreError",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "fsync_dir",
    "json_safe",
    "read_json",
    "sha256_file",
    "verify_torch_file",
    "load_torch_verified",
]


class StoreError(OSError):
    """Something stored that a job reads is missing, damaged or not what it must be: a Zarr
    store (:mod:`smnn.data.store`), a checkpoint or model file (:func:`load_torch_verified`), the
    MLflow tracking store (:mod:`smnn.tracking`).

    The commands report it in one line (``error: ...``, exit code 2).

    Attributes:
        store: the path (or URI) of what failed.
        variable: the variable that failed, when known.
        remedy: what to do about it (e.g. which workflow stage to rerun).
    """

    def __init__(
        self, message: str, store: str | Path | None = None, variable: str | None = None,
        remedy: str | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.store = None if store is None else Path(store)
        self.variable = variable
        self.remedy = remedy

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry to disk (so a rename survives a crash); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    Returns the path written. The parent directory is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text))


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as python numbers and lists, tuples as lists,
    and non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(data: Any, path: str | Path, indent: int = 2) -> Path:
    """Write ``data`` as JSON (keys sorted, numpy values converted by :func:`json_safe`) to
    ``path`` atomically."""
    text = json.dumps(json_safe(data), indent=indent, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(text, path)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file, with an error naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except ValueError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


HASH_BLOCK_BYTES = 4 * 2**20


def sha256_file(path: str | Path) -> str:
    """The SHA-256 (hex) of a file, read in blocks of 4 MiB (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def verify_torch_file(path: str | Path, remedy: str = "rewrite it") -> None:
    """Check that ``path`` is a complete ``torch.save`` zip archive whose every member matches
    its CRC-32.

    Args:
        path: the file.
        remedy: what the error tells the user to do (e.g. ``"rerun the rule that writes it:
            snakemake --forcerun train_lorenz_smnn"``).

    Raises:
        FileNotFoundError: the file does not exist.
        StoreError: the file is not a zip archive (truncated, another format) or a member's
            bytes do not match their CRC-32 (flipped bytes), naming the file and the member.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {remedy}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise StoreError(
            f"{path} is damaged: not a complete torch archive ({exc}); {remedy}", path, None, remedy
        ) from None
    if bad is not None:
        raise StoreError(
            f"{path} is damaged: member {bad} does not match its CRC-32 checksum; {remedy}",
            path, bad, remedy,
        )  # fmt: skip


def load_torch_verified(
    path: str | Path, map_location: Any = "cpu", remedy: str = "rewrite it"
) -> Any:
    """:func:`verify_torch_file`, then ``torch.load(path, map_location, weights_only=False)``.

    Raises:
        FileNotFoundError, StoreError: see :func:`verify_torch_file` (also when ``torch.load``
            fails on an archive whose checksums match, e.g. a file of another torch version).
    """
    import pickle

    import torch

    verify_torch_file(path, remedy)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
        raise StoreError(
            f"{path} cannot be loaded ({type(exc).__name__}: {exc}); {remedy}", path, None, remedy
        ) from None
