"""Import of LPSDA's KdV HDF5 files into ``data/kdv.zarr`` (``kdv.source: lpsda``).

LPSDA (Brandstetter et al.) writes one file per split, by default ``KdV_train_512_easy.h5``,
``KdV_valid_easy.h5`` and ``KdV_test_easy.h5``; each has one group named after the split with
the datasets

- ``pde_{n_kept}-{n_x}`` (N, n_kept, n_x) float64: the solution at the stored times
  (``pde_140-256`` for the "easy" set: the name follows the shape),
- ``x`` (N, n_x), ``dx`` (N,), ``t`` (N, n_kept), ``dt`` (N,).

The import reads ``pde`` with h5py in chunks of trajectories (never a whole file at once),
checks every file (the group, the datasets, their shapes and one N across them, finite values),
finds the all-zero trajectories (a failed LPSDA solve is left as zeros) and drops them
(``zero_trajectories: skip``, counted per split in the attributes and the log) or stops
(``refuse``), and writes the store of :mod:`smnn.data.kdv.store` atomically (``source:
lpsda``, ``sample`` = the row in the file, the files' names and sha256 in the attributes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smnn.config import Config, ConfigError
from smnn.data.kdv.store import DEFAULT_CHUNK_ROWS, SPLITS, build_kdv_dataset, write_kdv_store
from smnn.errors import UserError

__all__ = [
    "DEFAULT_FILES",
    "ZERO_MODES",
    "KdvFileError",
    "KdvLpsdaSettings",
    "LpsdaFile",
    "check_lpsda_file",
    "import_lpsda",
]

log = logging.getLogger(__name__)

DEFAULT_FILES = {
    "train": "KdV_train_512_easy.h5",
    "valid": "KdV_valid_easy.h5",
    "test": "KdV_test_easy.h5",
}
ZERO_MODES = ("skip", "refuse")
PDE_PATTERN = re.compile(r"^pde_(\d+)-(\d+)$")
# trajectories per h5py read of `pde` (140 x 256 float64 each: 18 MB per read)
READ_ROWS = 64
COORDS = ("x", "dx", "t", "dt")


class KdvFileError(UserError, ValueError):
    """An LPSDA HDF5 file is missing, unreadable or not in LPSDA's layout, or holds trajectories
    the import refuses. The message names the file, what is wrong and what to do.

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class KdvLpsdaSettings:
    """Settings of the import (config ``kdv.lpsda`` and ``threads``).

    Attributes:
        directory: where the files are.
        files: the file name of every split.
        zero_trajectories: ``"skip"`` (drop all-zero trajectories) or ``"refuse"`` (stop).
        chunk_rows: trajectories per chunk of the store's ``u``.
        threads: Dask threads for reading and writing.
    """

    directory: Path
    files: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FILES))
    zero_trajectories: str = "skip"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    threads: int = 1

    def __post_init__(self) -> None:
        if self.zero_trajectories not in ZERO_MODES:
            raise ConfigError(f"kdv.lpsda.zero_trajectories must be one of {list(ZERO_MODES)}")
        missing = [s for s in SPLITS if s not in self.files]
        if missing:
            raise ConfigError(f"kdv.lpsda.files lacks the split(s) {missing}")
        if self.chunk_rows < 1 or self.threads < 1:
            raise ConfigError("chunk_rows and threads must be >= 1")

    def path(self, split: str) -> Path:
        """The file of ``split``."""
        return Path(self.directory) / self.files[split]

    def existing_files(self) -> list[Path]:
        """The file of every split, for the workflow (``kdv.source: lpsda``: no rule writes
        them, so they must be there before the run starts).

        Raises:
            KdvFileError: naming every missing file and where the import looks for them.
        """
        paths = [self.path(split) for split in SPLITS]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise KdvFileError(
                f"kdv.source is 'lpsda' but LPSDA's file(s) {', '.join(missing)} do not exist; "
                f"{_remedy(self)}, or set kdv.source to generate",
                Path(missing[0]),
            )
        return paths

    @classmethod
    def from_config(cls, config: Config, directory: str | Path | None = None) -> KdvLpsdaSettings:
        """The settings of ``config``; ``directory`` (e.g. ``--directory``) overrides
        ``kdv.lpsda.directory`` (null there = ``{paths.data}/raw/kdv``)."""
        p = "kdv.lpsda."
        if directory is None:
            directory = config.get_str(p + "directory", allow_none=True)
        if directory is None:
            directory = Path(config.get_str("paths.data")) / "raw" / "kdv"
        files = {s: config.get_str(f"{p}files.{s}") for s in SPLITS}
        return cls(
            directory=Path(directory),
            files=files,
            zero_trajectories=config.get_str(p + "zero_trajectories", choices=ZERO_MODES),
            threads=config.get_int("threads", min_value=1),
        )


@dataclass(frozen=True)
class LpsdaFile:
    """What :func:`check_lpsda_file` found in one file.

    Attributes:
        path: the file.
        split: its split (= its group).
        dataset: the name of the solution dataset (``pde_{n_kept}-{n_x}``).
        n_rows, n_kept, n_x: its shape.
        zero_rows: (n_zero,) int64, the rows that are all zeros.
    """

    path: Path
    split: str
    dataset: str
    n_rows: int
    n_kept: int
    n_x: int
    zero_rows: np.ndarray

    @property
    def kept_rows(self) -> np.ndarray:
        """(n_rows - n_zero,) the rows that are not all zeros."""
        return np.setdiff1d(np.arange(self.n_rows), self.zero_rows)


def _remedy(settings: KdvLpsdaSettings | None) -> str:
    where = f" (now {settings.directory})" if settings is not None else ""
    return (
        f"put LPSDA's files there, or set kdv.lpsda.directory{where} (or --directory) and "
        f"kdv.lpsda.files to where they are and what they are called"
    )


def check_lpsda_file(path: str | Path, split: str) -> LpsdaFile:
    """Check the layout of one LPSDA file and find its all-zero trajectories (``pde`` read in
    chunks of :data:`READ_ROWS` trajectories).

    Raises:
        KdvFileError: naming the file and the problem: missing or not HDF5, no group ``split``,
            no ``pde_{n_kept}-{n_x}`` or ``x``/``dx``/``t``/``dt`` dataset, a shape that does not
            fit (or a ``pde`` name that does not match its shape), non-finite values.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise KdvFileError(
            f"LPSDA file of the {split} split not found: looked for {path}; {_remedy(None)}",
            path,
        )
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise KdvFileError(
            f"LPSDA file {path} cannot be opened as HDF5 ({exc}); is it a complete download?",
            path,
        ) from exc
    with f:
        if split not in f or not isinstance(f[split], h5py.Group):
            raise KdvFileError(
                f"LPSDA file {path} has no group {split!r} (its top level has "
                f"{sorted(f.keys())}); the group is named after the split: is kdv.lpsda.files."
                f"{split} the {split} file?",
                path,
            )
        group = f[split]
        names = sorted(group.keys())
        pde_names = [n for n in names if PDE_PATTERN.match(n)]
        if len(pde_names) != 1:
            raise KdvFileError(
                f"LPSDA file {path} group {split!r} has {len(pde_names)} solution datasets "
                f"named pde_{{n_kept}}-{{n_x}} (e.g. pde_140-256), expected one; it has {names}",
                path,
            )
        name = pde_names[0]
        missing = [n for n in ("x", "dx", "t", "dt") if n not in group]
        if missing:
            raise KdvFileError(
                f"LPSDA file {path} group {split!r} lacks the dataset(s) {missing}; it has {names}",
                path,
            )
        pde = group[name]
        if pde.ndim != 3:
            raise KdvFileError(
                f"LPSDA file {path}: {split}/{name} has shape {pde.shape}, expected (N, n_kept, "
                f"n_x)",
                path,
            )
        n_rows, n_kept, n_x = (int(s) for s in pde.shape)
        named = tuple(int(g) for g in PDE_PATTERN.match(name).groups())
        if named != (n_kept, n_x):
            raise KdvFileError(
                f"LPSDA file {path}: {split}/{name} has shape {pde.shape}, but its name says "
                f"{named[0]} times x {named[1]} points",
                path,
            )
        expected = {"x": (n_rows, n_x), "dx": (n_rows,), "t": (n_rows, n_kept), "dt": (n_rows,)}
        for key, shape in expected.items():
            if tuple(group[key].shape) != shape:
                raise KdvFileError(
                    f"LPSDA file {path}: {split}/{key} has shape {group[key].shape}, expected "
                    f"{shape} ({name} has {n_rows} trajectories of {n_kept} times x {n_x} "
                    f"points)",
                    path,
                )
        if n_rows < 1 or n_kept < 2 or n_x < 2:
            raise KdvFileError(f"LPSDA file {path}: {split}/{name} is empty ({pde.shape})", path)
        zero = []
        for start in range(0, n_rows, READ_ROWS):
            block = pde[start : start + READ_ROWS]
            if not np.isfinite(block).all():
                bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=(1, 2)))[0])
                raise KdvFileError(
                    f"LPSDA file {path}: {split}/{name} has non-finite values (trajectory "
                    f"{bad} the first); the file is damaged or the solve diverged",
                    path,
                )
            zero.extend(start + np.flatnonzero((block == 0).all(axis=(1, 2))))
        for key in ("x", "dx", "t", "dt"):
            if not np.isfinite(group[key][...]).all():
                raise KdvFileError(f"LPSDA file {path}: {split}/{key} has non-finite values", path)
        _check_grid(path, split, group)
    return LpsdaFile(
        path=path, split=split, dataset=name, n_rows=n_rows, n_kept=n_kept, n_x=n_x,
        zero_rows=np.asarray(zero, dtype=np.int64),
    )  # fmt: skip


GRID_RTOL = 0.05  # spacing vs step: catches swapped or mixed-up grids, not rounding


def _check_grid(path: Path, split: str, group) -> None:
    """The spacing of ``x`` ``(N, n_x)`` is ``dx`` ``(N,)`` and the steps of ``t`` ``(N, n_t)``
    are ``dt`` ``(N,)`` (within :data:`GRID_RTOL`): a file whose dx and dt are swapped, or whose
    grids belong to other trajectories, is refused instead of imported silently wrong.

    Raises:
        KdvFileError: naming the file, the split and the variables that disagree.
    """
    for coord, step, hint in (("x", "dx", "spacing"), ("t", "dt", "steps")):
        values = np.asarray(group[coord][...], dtype=np.float64)
        steps = np.asarray(group[step][...], dtype=np.float64).reshape(-1, 1)
        if values.ndim != 2 or values.shape[-1] < 2:
            continue
        if not np.allclose(np.diff(values, axis=-1), steps, rtol=GRID_RTOL, atol=0.0):
            raise KdvFileError(
                f"LPSDA file {path}: the {hint} of {split}/{coord} are not {split}/{step} "
                f"({coord} and {step} disagree; dx and dt swapped?)",
                path,
            )


def _read_rows(segments: list[tuple[str, str, str, np.ndarray]]) -> np.ndarray:
    """(sum of rows, n_kept, n_x): the ``pde`` rows of the segments ``(file, group, dataset,
    sorted rows)`` in order, each segment read as one range of trajectories."""
    import h5py

    parts = []
    for path, group, name, rows in segments:
        with h5py.File(path, "r") as f:
            data = f[group][name][int(rows[0]) : int(rows[-1]) + 1]
        parts.append(data[rows - rows[0]])
    return np.concatenate(parts, axis=0).astype(np.float64, copy=False)


def _read_small(info: LpsdaFile, rows: np.ndarray) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(info.path, "r") as f:
        group = f[info.split]
        return {
            k: np.asarray(group[k][...], dtype=np.float64)[rows] for k in ("x", "dx", "t", "dt")
        }


def import_lpsda(
    out: str | Path,
    settings: KdvLpsdaSettings,
    *,
    on_phase: Callable[[str], None] | None = None,
) -> Path:
    """Import the three LPSDA files of ``settings`` into the store ``out`` (module docstring).

    Returns:
        ``out``.

    Raises:
        KdvFileError: a file is missing or malformed (:func:`check_lpsda_file`), the files
            disagree on ``n_kept`` / ``n_x``, a split has all-zero trajectories and
            ``zero_trajectories`` is ``refuse``, or no trajectory is left in a split.
    """
    import dask
    import dask.array as da

    from smnn import __version__
    from smnn.io import sha256_file

    say = on_phase or log.info
    out = Path(out)
    infos: dict[str, LpsdaFile] = {}
    for split in SPLITS:
        path = settings.path(split)
        if not path.is_file():
            raise KdvFileError(
                f"LPSDA file of the {split} split not found: looked for {path} (kdv.lpsda."
                f"directory + kdv.lpsda.files.{split}); {_remedy(settings)}",
                path,
            )
        say(f"checking {path}")
        infos[split] = check_lpsda_file(path, split)
    shapes = {s: (i.n_kept, i.n_x) for s, i in infos.items()}
    if len(set(shapes.values())) != 1:
        raise KdvFileError(
            "the LPSDA files disagree on (n_kept, n_x): "
            + ", ".join(f"{infos[s].path} {shapes[s]}" for s in SPLITS)
            + "; use files of one data set",
            infos["train"].path,
        )
    skipped = {s: int(i.zero_rows.size) for s, i in infos.items()}
    for split, info in infos.items():
        if not skipped[split]:
            continue
        first = ", ".join(str(r) for r in info.zero_rows[:5])
        if settings.zero_trajectories == "refuse":
            raise KdvFileError(
                f"LPSDA file {info.path} has {skipped[split]} all-zero trajectory(ies) of "
                f"{info.n_rows} (rows {first}{', ...' if skipped[split] > 5 else ''}; a failed "
                f"LPSDA solve is left as zeros); set kdv.lpsda.zero_trajectories: skip to drop "
                f"them",
                info.path,
            )
        log.warning(
            "%s: skipping %d all-zero trajectory(ies) of %d in the %s split (rows %s%s)",
            info.path, skipped[split], info.n_rows, split, first,
            ", ..." if skipped[split] > 5 else "",
        )  # fmt: skip
        if skipped[split] == info.n_rows:
            raise KdvFileError(
                f"LPSDA file {info.path} has only all-zero trajectories ({info.n_rows}): "
                f"nothing to import in the {split} split",
                info.path,
            )
    kept = {s: i.kept_rows for s, i in infos.items()}
    # (split, row in file) of every store row, train, valid, test in order
    row_split = np.concatenate([np.full(kept[s].size, s) for s in SPLITS])
    row_sample = np.concatenate([kept[s] for s in SPLITS])
    small = [_read_small(infos[s], kept[s]) for s in SPLITS]
    coords = {k: np.concatenate([part[k] for part in small]) for k in ("x", "dx", "t", "dt")}
    n_rows = row_split.size
    n_kept, n_x = shapes["train"]
    size = settings.chunk_rows
    blocks = []
    for a in range(0, n_rows, size):
        b = min(a + size, n_rows)
        segments = []
        for split in SPLITS:
            sel = row_split[a:b] == split
            if sel.any():
                info = infos[split]
                segments.append(
                    (str(info.path.resolve()), split, info.dataset, row_sample[a:b][sel])
                )
        task = dask.delayed(_read_rows, pure=True)(segments)
        blocks.append(da.from_delayed(task, shape=(b - a, n_kept, n_x), dtype=np.float64))
    u = da.concatenate(blocks, axis=0)
    say("sha256 of the files")
    attrs: dict[str, Any] = {
        "title": 'KdV trajectories imported from LPSDA\'s HDF5 files ("easy" set layout)',
        "source": "lpsda",
        "equation": "u_t = -u u_x - u_xxx, periodic",
        "directory": str(Path(settings.directory).resolve()),
        "files": {s: settings.files[s] for s in SPLITS},
        "sha256": {s: sha256_file(infos[s].path) for s in SPLITS},
        "dataset": infos["train"].dataset,
        "rows_in_files": {s: infos[s].n_rows for s in SPLITS},
        "zero_trajectories": settings.zero_trajectories,
        "zero_trajectories_skipped": skipped,
        "smnn_version": __version__,
    }
    ds = build_kdv_dataset(
        u, split=row_split, sample=row_sample, x=coords["x"], dx=coords["dx"], t=coords["t"],
        dt=coords["dt"], attrs=attrs,
    )  # fmt: skip
    counts = ", ".join(f"{int((row_split == s).sum())} {s}" for s in SPLITS)
    say(
        f"writing {n_rows} trajectories ({counts}; skipped all-zero: "
        + ", ".join(f"{skipped[s]} {s}" for s in SPLITS)
        + f") -> {out}"
    )
    with dask.config.set(scheduler="threads", num_workers=settings.threads):
        write_kdv_store(ds, out.resolve(), chunk_rows=size)
    return out
