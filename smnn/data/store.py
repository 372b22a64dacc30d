"""The pipeline's Zarr stores (xarray, Zarr format 3): atomic writes, checksums, clear read errors.

Writing (:func:`write_dataset_atomic`):

- A store is written to a hidden temporary directory next to its final path and renamed into place
  only when complete. A killed job therefore leaves at most a ``.<name>.tmp-<pid>`` directory
  (removed by the next write), never a half-written store at the final path that looks whole.
- Every array's codec chain ends with a ``crc32c`` checksum after the compressor
  (``bytes -> zstd -> crc32c``), so a damaged chunk is detected when read instead of being
  decompressed into wrong numbers (or failing with a bare "Zstd decompression error").
- When the store is complete, before it is renamed into place, its *manifest* is written beside
  the arrays (``.smnn_manifest.json`` in the store directory): the chunk files of every variable.
  Zarr reads a missing chunk as the array's fill value (NaN, 0), so a deleted chunk file would
  otherwise pass for data; :func:`open_dataset` compares the store with its manifest and stops
  with a :class:`StoreError` naming the store, the variable, the missing chunk and the remedy.
  Stores without a manifest (written before it existed, or by other tools) are not checked.
- ``source`` records what the store was made from (``generate``, ``lpsda``, ``synthetic`` ...) as
  the attribute :data:`SOURCE_ATTR`; every consumer checks it against its config with
  :func:`check_store_source`, so a store made from another source is never used silently.
- Fixed-length unicode arrays (numpy ``<U``, e.g. coordinate labels) are stored as Zarr's
  variable-length ``string`` data type: the fixed-length type has no Zarr v3 specification and
  zarr warns about it. They read back as numpy ``StringDType`` arrays (same values).

Reading (:func:`open_dataset`, :func:`load_variables`, :func:`store_read_errors`):

- Every failure (missing store, broken metadata, a chunk failing its checksum or decompression)
  becomes a :class:`StoreError` naming the store, the variable when known, and the remedy. Each
  caller passes its own remedy, naming the stage that writes the store, e.g.
  ``"rerun the stage that writes it: snakemake --forcerun generate_lorenz"``.
- Snakemake writes a ``.snakemake_timestamp`` file into directory outputs; zarr would warn that
  it is not part of the hierarchy. Stores are opened through a :class:`zarr.storage.LocalStore`
  that leaves exactly that file out of directory listings, so there is no warning to filter.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xarray as xr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from smnn.io import StoreError, fsync_dir

__all__ = [
    "StoreError",
    "DEFAULT_REMEDY",
    "FOREIGN_FILES",
    "MANIFEST_NAME",
    "SOURCE_ATTR",
    "store_manifest",
    "check_manifest",
    "check_store_source",
    "write_dataset_atomic",
    "checksummed_encoding",
    "open_dataset",
    "load_variables",
    "store_read_errors",
]

DEFAULT_REMEDY = "rerun the stage that writes it"
MANIFEST_NAME = ".smnn_manifest.json"
MANIFEST_VERSION = 1
SOURCE_ATTR = "smnn_source"
# files other tools (and the manifest) put into a store directory: Snakemake's marker of
# directory() outputs
FOREIGN_FILES = frozenset({".snakemake_timestamp", MANIFEST_NAME})


# ------------------------------------------------------------------ writing


def _stale_temporaries(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.tmp-*")) + sorted(
        path.parent.glob(f".{path.name}.old-*")
    )


def _remove_tree(path: Path, attempts: int = 10) -> None:
    """Remove a directory, also when workers that were still writing into it recreate files
    (dask tasks in flight when another task failed)."""
    for attempt in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05 * (attempt + 1))


def _with_checksum(compressors: Any) -> tuple:
    """``compressors`` (one codec, a sequence, or None) with ``crc32c`` appended when absent."""
    if compressors is None:
        codecs: list = []
    elif isinstance(compressors, (list, tuple)):
        codecs = list(compressors)
    else:
        codecs = [compressors]
    if not any(isinstance(c, Crc32cCodec) for c in codecs):
        codecs.append(Crc32cCodec())
    return tuple(codecs)


def checksummed_encoding(
    ds: xr.Dataset, encoding: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[xr.Dataset, dict[str, dict[str, Any]]]:
    """The dataset and encoding :func:`write_dataset_atomic` hands to ``to_zarr``.

    Every variable (data and coordinates) gets ``compressors = (zstd, crc32c)``, or its given
    compressors with ``crc32c`` appended; fixed-length unicode variables become variable-length
    strings. ``ds`` itself is not modified (a shallow copy is returned).
    """
    out = ds.copy(deep=False)
    given = {k: dict(v) for k, v in (encoding or {}).items()}
    for name, var in out.variables.items():
        if var.dtype.kind == "U":
            out[name] = var.astype(object)
    for name, var in out.variables.items():
        if name in given:
            enc = given[name]
            enc["compressors"] = _with_checksum(enc.get("compressors", (ZstdCodec(),)))
        else:
            # the variable's own encoding stays in force (xarray drops keys zarr cannot use)
            enc = dict(var.encoding)
            enc.pop("compressor", None)  # a Zarr v2 key
            enc["compressors"] = _with_checksum(enc.get("compressors", (ZstdCodec(),)))
            var.encoding = enc
    return out, given


def _chunk_files(store: Path) -> dict[str, list[str]]:
    """``{variable: sorted chunk keys}`` of the arrays of a flat Zarr v3 store (chunk files under
    ``<variable>/c``; a 0-d array's single chunk is the file ``<variable>/c``)."""
    out: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(store), key=lambda e: e.name):
        if not entry.is_dir() or not (Path(entry.path) / "zarr.json").is_file():
            continue
        root = Path(entry.path) / "c"
        if root.is_file():
            out[entry.name] = ["c"]
            continue
        keys = []
        for dirpath, _, files in os.walk(root):
            rel = Path(dirpath).relative_to(Path(entry.path))
            keys.extend(str(rel / f) for f in files)
        out[entry.name] = sorted(keys)
    return out


def store_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the complete store ``path``: ``{"version", "chunks": {variable: [chunk
    keys]}}`` (what :func:`write_dataset_atomic` records and :func:`check_manifest` checks)."""
    return {"version": MANIFEST_VERSION, "chunks": _chunk_files(Path(path))}


def check_manifest(path: str | Path, remedy: str = DEFAULT_REMEDY) -> None:
    """Compare the store ``path`` with the manifest written when it was completed.

    Raises:
        StoreError: a variable's chunk file is missing (zarr would read fill values), an
            unexpected chunk file appeared, a variable's directory is gone, or the manifest
            itself is unreadable; naming the store, the variable, the chunk and ``remedy``.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_NAME
    if not manifest_file.exists():
        return  # written before manifests existed, or by another tool
    try:
        manifest = json.loads(manifest_file.read_text())
        expected: dict[str, list[str]] = manifest["chunks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"Zarr store {path}: its manifest {MANIFEST_NAME} is unreadable ({exc}); {remedy}",
            path, None, remedy,
        ) from None  # fmt: skip
    present = _chunk_files(path)
    for variable, keys in expected.items():
        have = set(present.get(variable, ()))
        missing = [k for k in keys if k not in have]
        if variable not in present:
            raise StoreError(
                f"variable {variable!r} of Zarr store {path} is missing (its directory is gone; "
                f"the store is damaged); {remedy}",
                path, variable, remedy,
            )  # fmt: skip
        if missing:
            raise StoreError(
                f"variable {variable!r} of Zarr store {path} is damaged: {len(missing)} of its "
                f"{len(keys)} chunk file(s) are missing (e.g. {variable}/{missing[0]}; zarr would "
                f"read fill values instead); {remedy}",
                path, variable, remedy,
            )  # fmt: skip
        extra = sorted(have - set(keys))
        if extra:
            raise StoreError(
                f"variable {variable!r} of Zarr store {path} has {len(extra)} chunk file(s) it "
                f"was not written with (e.g. {variable}/{extra[0]}); {remedy}",
                path, variable, remedy,
            )  # fmt: skip


def check_store_source(
    ds: xr.Dataset,
    expected: str,
    *,
    store: str | Path,
    key: str,
    remedy: str = DEFAULT_REMEDY,
    attr: str = SOURCE_ATTR,
) -> None:
    """Check that the store was made from the source the config names.

    Args:
        ds: the opened store.
        expected: the config's source (e.g. ``config["kdv"]["source"]``).
        store: the store's path (for the message).
        key: the config key naming the source (e.g. ``"kdv.source"``).
        remedy: what to do, naming the stage that writes the store from that source.
        attr: the attribute holding the source (default :data:`SOURCE_ATTR`, set by
            :func:`write_dataset_atomic`'s ``source``).

    Raises:
        StoreError: the store records another source, or none.
    """
    recorded = ds.attrs.get(attr)
    if recorded is None:
        raise StoreError(
            f"Zarr store {store} records no source (attribute {attr!r}), so it cannot be checked "
            f"against {key}: {expected!r}; {remedy}",
            store, None, remedy,
        )  # fmt: skip
    if str(recorded) != str(expected):
        raise StoreError(
            f"Zarr store {store} was made from source {recorded!r}, but {key} is {expected!r}; "
            f"it is stale: {remedy}",
            store, None, remedy,
        )  # fmt: skip


def write_dataset_atomic(
    ds: xr.Dataset,
    path: str | Path,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    source: str | None = None,
) -> Path:
    """Write ``ds`` to the Zarr v3 store ``path`` atomically (temporary directory + rename),
    with a ``crc32c`` checksum on every chunk and a manifest of its chunk files (see the module
    docstring).

    An existing store at ``path`` is replaced. Chunking follows the dataset's dask chunks, or
    ``encoding[var]["chunks"]`` when given.

    Args:
        source: what the data were made from, recorded as the attribute :data:`SOURCE_ATTR`
            (checked by consumers with :func:`check_store_source`); None records nothing.

    Returns:
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(path):
        shutil.rmtree(stale, ignore_errors=True)
    ds, enc = checksummed_encoding(ds, encoding)
    if source is not None:
        ds.attrs = {**ds.attrs, SOURCE_ATTR: str(source)}
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=enc)
        manifest = json.dumps(store_manifest(tmp), sort_keys=True)
        with open(tmp / MANIFEST_NAME, "w") as f:
            f.write(manifest)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_tree(tmp)
        raise
    if path.exists():
        # a directory cannot be renamed over a non-empty one: move the old store aside first
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


# ------------------------------------------------------------------ reading


class _PipelineStore(LocalStore):
    """A read-only local store whose directory listings leave out :data:`FOREIGN_FILES`."""

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        async for key in super().list_dir(prefix):
            if key not in FOREIGN_FILES:
                yield key


def _damaged(path: Path, variable: str | None, exc: BaseException, remedy: str) -> StoreError:
    what = f"variable {variable!r} of Zarr store {path}" if variable else f"Zarr store {path}"
    return StoreError(
        f"{what} cannot be read: the store is damaged or unreadable "
        f"({type(exc).__name__}: {exc}); {remedy}",
        path, variable, remedy,
    )  # fmt: skip


@contextmanager
def store_read_errors(
    store: str | Path, variable: str | None = None, remedy: str = DEFAULT_REMEDY
) -> Iterator[None]:
    """Turn a failure to read chunks inside the block (checksum mismatch, decompression error,
    unreadable file) into a :class:`StoreError` naming ``store``, ``variable`` and ``remedy``.

    For lazy (dask) work on a store: wrap the ``compute()``/``load()`` that reads it.
    """
    try:
        yield
    except StoreError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:  # zarr and its codecs raise ValueError, RuntimeError, OSError ...
        raise _damaged(Path(store), variable, exc, remedy) from exc


def _find_unreadable_coordinate(path: Path) -> str | None:
    """After a failed open: the first one-dimensional array (index coordinates are read when a
    store is opened) whose chunks cannot be read, or None."""
    import zarr

    try:
        group = zarr.open_group(_PipelineStore(path, read_only=True), mode="r", zarr_format=3)
        arrays = sorted(group.arrays(), key=lambda item: item[0])
    except Exception:
        return None
    for name, array in arrays:
        if array.ndim <= 1:
            try:
                array[...]
            except Exception:
                return name
    return None


def open_dataset(
    path: str | Path,
    required_vars: Iterable[str] = (),
    remedy: str = DEFAULT_REMEDY,
    load: bool = False,
) -> xr.Dataset:
    """Open the Zarr v3 store at ``path``: lazily (dask-backed), or into memory with ``load``.

    Args:
        path: the store directory.
        required_vars: data variables that must be present.
        remedy: what the error messages tell the user to do, naming the stage that writes
            this store (e.g. ``"rerun the stage that writes it: snakemake --forcerun
            generate_lorenz"``).
        load: read every variable now (small stores), through :func:`load_variables`, so a
            damaged chunk is reported here, naming its variable.

    Raises:
        StoreError: naming the path and the remedy when the store is missing, unreadable,
            damaged or lacks a variable.
    """
    path = Path(path)
    required = tuple(required_vars)
    if not path.exists():
        raise StoreError(
            f"Zarr store {path} does not exist; {remedy}", path, None, remedy
        )  # fmt: skip
    check_manifest(path, remedy)
    try:
        ds = xr.open_zarr(_PipelineStore(path, read_only=True), zarr_format=3, consolidated=False)
    except Exception as exc:  # zarr raises several types for a broken store
        variable = _find_unreadable_coordinate(path)
        if variable is not None:
            raise _damaged(path, variable, exc, remedy) from exc
        raise StoreError(
            f"{path} is not a readable Zarr v3 store ({type(exc).__name__}: {exc}); {remedy}",
            path, None, remedy,
        ) from exc  # fmt: skip
    missing = [v for v in required if v not in ds.data_vars]
    if missing:
        raise StoreError(
            f"Zarr store {path} lacks variable(s) {missing}; it has {sorted(ds.data_vars)}; "
            f"{remedy}",
            path, missing[0], remedy,
        )  # fmt: skip
    if load:
        ds = load_variables(ds, None, store=path, remedy=remedy)
    return ds


def load_variables(
    ds: xr.Dataset,
    names: Iterable[str] | None = None,
    *,
    store: str | Path,
    remedy: str = DEFAULT_REMEDY,
) -> xr.Dataset:
    """Read the variables ``names`` (default: all, coordinates included) of a lazily opened
    store into memory, one at a time, so a damaged chunk is reported naming its variable.

    Returns:
        ``ds`` with those variables held in memory as numpy arrays.

    Raises:
        StoreError: naming ``store``, the variable and ``remedy`` when a chunk cannot be read
            (checksum mismatch, decompression error, unreadable file).
    """
    wanted = list(ds.variables) if names is None else list(names)
    unknown = [n for n in wanted if n not in ds.variables]
    if unknown:
        raise StoreError(
            f"Zarr store {store} lacks variable(s) {unknown}; {remedy}", store, unknown[0], remedy
        )
    out = ds.copy(deep=False)  # new Variable objects: loading them in place leaves ds lazy
    for name in wanted:
        with store_read_errors(store, name, remedy):
            out.variables[name].load()
    return out
