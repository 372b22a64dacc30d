"""Time windows of gridded series read from a Zarr store (shared by SST and KdV).

A store variable with dims ``(time, *space)`` becomes one in-memory tensor ``series`` of shape
``(T, n_cells)``: every grid point is one time series, the spatial dims flattened row-major (for
``(time, lat, lon)``: ``cell = i_lat * n_lon + i_lon``). Windows are gathered from it in one
indexing operation per batch (no Python loop per window):

- :func:`read_series`: a time slice of a variable as ``(T, n_cells)``;
- :func:`random_starts`, :func:`gather_windows`: random window starts and the windows
  ``(B, length)`` at given (start, cell) pairs;
- :func:`gather_trajectory_windows`: for stores of many trajectories ``(trajectory, time,
  *space)`` held as one tensor (KdV), the time windows ``(B, length, *space)`` at given
  (trajectory, start) pairs;
- :class:`RowPartners`: for each cell of a ``(rows, cols)`` grid, a random partner in the same
  row at a column offset in ``[lo, hi] \\ {0}``, wrapping around (periodic columns, e.g.
  longitude), optionally restricted to allowed cells (e.g. ocean);
- :func:`seeded_generator`: a CPU ``torch.Generator`` seeded from a base seed and labels, so
  each use (training draw, evaluation pairs) has its own reproducible stream.

Draws take an optional ``torch.Generator`` (CPU; the results are moved to the series' device), so
the same seed gives the same windows on CPU and CUDA.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from smnn.data.store import DEFAULT_REMEDY, StoreError, open_dataset, store_read_errors

__all__ = [
    "read_series",
    "random_starts",
    "gather_windows",
    "gather_trajectory_windows",
    "RowPartners",
    "seeded_generator",
]


def seeded_generator(seed: int, *labels: int | str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``labels`` (ints or strings, e.g.
    ``("evaluate", "pairs")``): different labels give independent streams, the same ones the
    same stream on every machine (strings enter through their CRC-32, never Python's ``hash``)."""
    words = [int(seed) % 2**32]
    for label in labels:
        words.append(zlib.crc32(label.encode()) if isinstance(label, str) else int(label) % 2**32)
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def read_series(
    path: str | Path,
    variable: str,
    time_slice: slice = slice(None),
    *,
    dataset: xr.Dataset | None = None,
    time_dim: str = "time",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    remedy: str = DEFAULT_REMEDY,
) -> torch.Tensor:
    """The steps ``time_slice`` of ``variable`` as ``(T, n_cells)`` (spatial dims flattened
    row-major), read into memory.

    Args:
        path: the Zarr store (named in errors).
        variable: a variable with ``time_dim`` first.
        time_slice: positions along ``time_dim`` (a ``slice`` of integers).
        dataset: the store already opened (lazily) from ``path``; opened here when None.
        dtype, device: of the result.
        remedy: what a read error tells the user to do.

    Raises:
        StoreError: the store or variable is missing or damaged, the variable's first dim is not
            ``time_dim``, or the slice is empty.
    """
    ds = open_dataset(path, [variable], remedy=remedy) if dataset is None else dataset
    if variable not in ds.data_vars:
        raise StoreError(f"Zarr store {path} lacks variable {variable!r}; {remedy}", path, variable)
    var = ds[variable]
    if var.dims[0] != time_dim:
        raise StoreError(
            f"variable {variable!r} of {path} has dims {var.dims}; expected {time_dim!r} first",
            path, variable, remedy,
        )  # fmt: skip
    part = var.isel({time_dim: time_slice})
    if part.shape[0] == 0:
        raise StoreError(
            f"the time slice {time_slice} of {variable!r} in {path} is empty "
            f"({var.shape[0]} steps)",
            path, variable, remedy,
        )  # fmt: skip
    with store_read_errors(path, variable, remedy):
        values = np.asarray(part.values)
    values = values.reshape(values.shape[0], -1)
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype=dtype, device=device)


def random_starts(
    n_time: int, length: int, n: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` uniform window starts ``(n,)`` (int64, CPU) in ``0 .. n_time - length``."""
    if not 1 <= length <= n_time:
        raise ValueError(f"a window of {length} steps does not fit into {n_time} steps")
    return torch.randint(0, n_time - length + 1, (n,), generator=generator)


def gather_windows(
    series: torch.Tensor, starts: torch.Tensor, cells: torch.Tensor, length: int
) -> torch.Tensor:
    """The windows ``series[starts[i] : starts[i] + length, cells[i]]`` as ``(B, length)``.

    Args:
        series: ``(T, n_cells)``.
        starts, cells: ``(B,)`` integer tensors (any device; moved to ``series``' device).
        length: steps per window.
    """
    if series.ndim != 2:
        raise ValueError(f"series must be (T, n_cells), got shape {tuple(series.shape)}")
    if starts.shape != cells.shape or starts.ndim != 1:
        raise ValueError(
            f"starts and cells must be (B,), got {tuple(starts.shape)} and {tuple(cells.shape)}"
        )
    dev = series.device
    starts, cells = starts.to(dev), cells.to(dev)
    if starts.numel() and (int(starts.min()) < 0 or int(starts.max()) + length > series.shape[0]):
        raise IndexError(f"a window of {length} steps leaves the {series.shape[0]} steps")
    rows = starts.unsqueeze(1) + torch.arange(length, device=dev)
    return series[rows, cells.unsqueeze(1)]


def gather_trajectory_windows(
    data: torch.Tensor, trajectories: torch.Tensor, starts: torch.Tensor, length: int
) -> torch.Tensor:
    """The windows ``data[trajectories[i], starts[i] : starts[i] + length]`` as
    ``(B, length, *space)``.

    Args:
        data: ``(n_trajectories, T, *space)``.
        trajectories, starts: ``(B,)`` integer tensors (any device; moved to ``data``'s).
        length: steps per window.

    Raises:
        ValueError: wrong shapes; IndexError: a window leaves the data.
    """
    if data.ndim < 2:
        raise ValueError(f"data must be (n_trajectories, T, ...), got {tuple(data.shape)}")
    if trajectories.shape != starts.shape or starts.ndim != 1:
        raise ValueError(
            f"trajectories and starts must be (B,), got {tuple(trajectories.shape)} and "
            f"{tuple(starts.shape)}"
        )
    dev = data.device
    trajectories, starts = trajectories.to(dev), starts.to(dev)
    if starts.numel():
        if int(starts.min()) < 0 or int(starts.max()) + length > data.shape[1]:
            raise IndexError(f"a window of {length} steps leaves the {data.shape[1]} steps")
        if int(trajectories.min()) < 0 or int(trajectories.max()) >= data.shape[0]:
            raise IndexError(f"trajectories must be in 0..{data.shape[0] - 1}")
    rows = starts.unsqueeze(1) + torch.arange(length, device=dev)
    return data[trajectories.unsqueeze(1), rows]


class RowPartners:
    """Random partner cells on a ``(rows, cols)`` grid: the same row, a column offset in
    ``[lo, hi]`` other than 0, columns periodic (longitude wraps around).

    Args:
        shape: ``(rows, cols)``; cells are numbered ``row * cols + col``.
        offsets: ``(lo, hi)``, inclusive, ``lo <= hi``.
        allowed: ``(rows * cols,)`` bool, the cells that may take part (e.g. ocean), or None
            for all. A cell takes part only when it is allowed and has an allowed partner.

    Attributes:
        candidates: ``(n_cells, n_offsets)`` partner index of each cell at each offset.
        valid: ``(n_cells, n_offsets)`` whether that candidate may be drawn (allowed, and not
            the cell itself, which happens when an offset is a multiple of ``cols``).
        pairable: ``(n_cells,)`` bool, allowed cells with at least one valid candidate.
        pairable_cells: ``(n_pairable,)`` their indices, ascending.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        offsets: Sequence[int],
        allowed: torch.Tensor | np.ndarray | None = None,
    ):
        rows, cols = (int(s) for s in shape)
        lo, hi = (int(o) for o in offsets)
        if rows < 1 or cols < 1:
            raise ValueError(f"grid shape must be positive, got {shape}")
        if lo > hi:
            raise ValueError(f"offsets must be (lo, hi) with lo <= hi, got {tuple(offsets)}")
        steps = torch.tensor([o for o in range(lo, hi + 1) if o != 0], dtype=torch.int64)
        if steps.numel() == 0:
            raise ValueError(f"offsets {tuple(offsets)} hold no offset other than 0")
        n = rows * cols
        cell = torch.arange(n, dtype=torch.int64)
        row, col = cell // cols, cell % cols
        self.shape = (rows, cols)
        self.offsets = (lo, hi)
        self.candidates = row.unsqueeze(1) * cols + (col.unsqueeze(1) + steps) % cols
        if allowed is None:
            ok = torch.ones(n, dtype=torch.bool)
        else:
            ok = torch.as_tensor(np.asarray(allowed)).reshape(-1).to(torch.bool)
            if ok.numel() != n:
                raise ValueError(f"allowed must have {n} entries (grid {shape}), got {ok.numel()}")
        self.valid = ok[self.candidates] & (self.candidates != cell.unsqueeze(1))
        self.pairable = ok & self.valid.any(dim=1)
        self.pairable_cells = torch.nonzero(self.pairable).squeeze(1)

    @property
    def n_cells(self) -> int:
        return self.shape[0] * self.shape[1]

    def draw(self, cells: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One uniformly drawn valid partner for each of ``cells`` ``(B,)`` -> ``(B,)`` (CPU).

        Raises:
            ValueError: a cell is out of range or not pairable.
        """
        cells = cells.to("cpu", torch.int64)
        if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= self.n_cells):
            raise ValueError(f"cells must be in 0..{self.n_cells - 1}")
        if not bool(self.pairable[cells].all()):
            bad = cells[~self.pairable[cells]][:5].tolist()
            raise ValueError(f"cells {bad} have no allowed partner (or are not allowed)")
        valid = self.valid[cells]
        scores = torch.rand(valid.shape, generator=generator, dtype=torch.float64)
        choice = scores.masked_fill(~valid, -1.0).argmax(dim=1)
        return self.candidates[cells, choice]
