"""The seeded generator of the LPSDA "easy" KdV distribution into ``data/kdv.zarr`` (Dask).

Distribution (per trajectory, ``kdv.generate``): ``u_t = -u u_x - u_xxx`` on the periodic domain
``[0, L)`` with ``n_x`` points ``x_j = j L / n_x`` (``dx = L / n_x``), ``L ~ U(115.2, 140.8]``,
``T_end ~ U(45, 55]``, ``n_times`` output times ``linspace(0, T_end, n_times)`` of which the last
``n_kept`` are stored (so ``t[0] = (n_times - n_kept) dt``, ``dt = T_end / (n_times - 1)``),
initial condition ``u0 = sum_i A_i sin(2 pi l_i x / L + phi_i)`` over ``n_sines`` sines with
``A_i ~ U(-0.5, 0.5)``, ``phi_i ~ U(0, 2 pi)``, ``l_i`` uniform in ``{1, 2}``.

Seeds: trajectory ``i`` of split ``s`` draws from its own stream,
``SeedSequence(seed, spawn_key=(SPLIT_KEYS[s], i))`` (the ``i``-th child of the ``s``-th child
of ``SeedSequence(seed)``), in the order L, T_end, A, phi, l. Splits never share a stream, any
subset of trajectories regenerates identically, and the result does not depend on the blocks,
the scheduler or the number of workers (every row of the batched solver is computed alone, see
:func:`smnn.data.kdv.spectral.solve_kdv`).

Parallelism: the rows (train, valid, test in order) are cut into blocks of ``block_size``; each
block is one Dask task solving its trajectories together (ETDRK4 vectorised over the block) and
is written as one chunk of ``u``; the scheduler is ``kdv.generate.scheduler``
(:mod:`smnn.data.dask_scheduler`).

Accuracy and cost of the default (``integrator: etdrk4``, ``etdrk4_steps: null``): the step
of every trajectory is chosen from its own initial amplitude
(:func:`smnn.data.kdv.spectral.substeps_for`), see :mod:`smnn.data.kdv.spectral`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smnn.config import Config, ConfigError
from smnn.data.dask_scheduler import SCHEDULERS, check_scheduler, dask_scheduler
from smnn.data.kdv.spectral import METHODS, output_times, solve_kdv
from smnn.data.kdv.store import build_kdv_dataset, write_kdv_store

__all__ = [
    "SPLIT_KEYS",
    "KdvGenerateSettings",
    "KdvParameters",
    "trajectory_seed",
    "sample_parameters",
    "initial_condition",
    "grid",
    "solve_parameters",
    "regenerate",
    "all_parameters",
    "generate_kdv",
]

log = logging.getLogger(__name__)

# the first spawn-key entry of each split's streams
SPLIT_KEYS = {"train": 0, "valid": 1, "test": 2}


@dataclass(frozen=True)
class KdvGenerateSettings:
    """Settings of the generator (config ``kdv.generate``, ``seed`` and ``threads``).

    Attributes:
        n_train, n_valid, n_test: trajectories per split.
        n_x: grid points.
        n_times: solver output times on ``[0, T_end]``; the last ``n_kept`` are stored.
        length_range, t_end_range: ``(low, high)``: ``L``, ``T_end ~ U(low, high]``.
        n_sines: sines in the initial condition.
        integrator: ``"etdrk4"`` (batched) or ``"radau"`` (scipy, 1e-9, row by row).
        dealias: the 2/3 rule on the nonlinear term (False: LPSDA's discretisation).
        etdrk4_steps: ETDRK4 substeps per output interval; None = chosen per trajectory
            (:func:`smnn.data.kdv.spectral.substeps_for`).
        block_size: trajectories per Dask task (and per chunk of the store).
        scheduler, address: the Dask scheduler (:mod:`smnn.data.dask_scheduler`).
        threads: Dask worker threads (the rule's threads).
        seed: the root seed.
    """

    n_train: int = 512
    n_valid: int = 512
    n_test: int = 512
    n_x: int = 256
    n_times: int = 250
    n_kept: int = 140
    length_range: tuple[float, float] = (115.2, 140.8)
    t_end_range: tuple[float, float] = (45.0, 55.0)
    n_sines: int = 10
    integrator: str = "etdrk4"
    dealias: bool = False
    etdrk4_steps: int | None = None
    block_size: int = 64
    scheduler: str = "threads"
    address: str | None = None
    threads: int = 1
    seed: int = 0
    connect_timeout: float = field(default=10.0, repr=False)

    def __post_init__(self) -> None:
        p = "kdv.generate."
        for name in ("n_train", "n_valid", "n_test", "n_sines", "block_size", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name} must be >= 1, got {getattr(self, name)}")
        if self.n_x < 8:
            raise ConfigError(f"{p}n_x must be >= 8, got {self.n_x}")
        if not 2 <= self.n_kept <= self.n_times:
            raise ConfigError(
                f"{p}n_kept ({self.n_kept}) must be between 2 and n_times ({self.n_times})"
            )
        for name in ("length_range", "t_end_range"):
            low, high = getattr(self, name)
            if not 0 < low < high:
                raise ConfigError(f"{p}{name} must be [low, high] with 0 < low < high")
        if self.integrator not in METHODS:
            raise ConfigError(f"{p}integrator must be one of {list(METHODS)}")
        if self.etdrk4_steps is not None and self.etdrk4_steps < 1:
            raise ConfigError(f"{p}etdrk4_steps must be >= 1 or null")
        check_scheduler(self.scheduler, self.address, "kdv.generate")

    @property
    def counts(self) -> dict[str, int]:
        """Trajectories per split, in the store's order."""
        return {"train": self.n_train, "valid": self.n_valid, "test": self.n_test}

    @classmethod
    def from_config(cls, config: Config) -> KdvGenerateSettings:
        p = "kdv.generate."
        scheduler = config.get_str(p + "scheduler", choices=SCHEDULERS)
        address = config.get_str(p + "address", allow_none=True)
        check_scheduler(scheduler, address, "kdv.generate", config.source)
        ranges = {}
        for name in ("length_range", "t_end_range"):
            low, high = config.get_float_list(p + name, length=2)
            if not 0 < low < high:
                raise ConfigError(
                    f"{config.source}: {p}{name} must be [low, high] with 0 < low < high, got "
                    f"{[low, high]}"
                )
            ranges[name] = (low, high)
        n_times = config.get_int(p + "n_times", min_value=2)
        n_kept = config.get_int(p + "n_kept", min_value=2)
        if n_kept > n_times:
            raise ConfigError(
                f"{config.source}: {p}n_kept ({n_kept}) must not exceed {p}n_times ({n_times})"
            )
        return cls(
            n_train=config.get_int(p + "n_train", min_value=1),
            n_valid=config.get_int(p + "n_valid", min_value=1),
            n_test=config.get_int(p + "n_test", min_value=1),
            n_x=config.get_int(p + "n_x", min_value=8),
            n_times=n_times,
            n_kept=n_kept,
            length_range=ranges["length_range"],
            t_end_range=ranges["t_end_range"],
            n_sines=config.get_int(p + "n_sines", min_value=1),
            integrator=config.get_str(p + "integrator", choices=METHODS),
            dealias=config.get_bool(p + "dealias"),
            etdrk4_steps=config.get_int(p + "etdrk4_steps", min_value=1, allow_none=True),
            block_size=config.get_int(p + "block_size", min_value=1),
            scheduler=scheduler,
            address=address,
            threads=config.get_int("threads", min_value=1),
            seed=config.get_int("seed"),
        )


@dataclass(frozen=True)
class KdvParameters:
    """The random parameters of a batch of trajectories.

    Attributes:
        split: (B,) the split of every trajectory.
        sample: (B,) int64, its index inside the split (its seed's child key).
        length: (B,) domain lengths L.
        t_end: (B,) end times.
        amplitude, phase: (B, n_sines) float64.
        wavenumber: (B, n_sines) int64, in {1, 2}.
    """

    split: np.ndarray
    sample: np.ndarray
    length: np.ndarray
    t_end: np.ndarray
    amplitude: np.ndarray
    phase: np.ndarray
    wavenumber: np.ndarray

    def __len__(self) -> int:
        return int(self.length.shape[0])

    def rows(self, start: int, stop: int) -> KdvParameters:
        """The trajectories ``start:stop``."""
        return KdvParameters(**{k: v[start:stop] for k, v in asdict(self).items()})

    @staticmethod
    def concatenate(parts: Sequence[KdvParameters]) -> KdvParameters:
        names = [f for f in KdvParameters.__dataclass_fields__]
        return KdvParameters(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})


def trajectory_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed sequence of trajectory ``index`` of ``split`` (module docstring)."""
    if split not in SPLIT_KEYS:
        raise ValueError(f"split must be one of {list(SPLIT_KEYS)}, got {split!r}")
    return np.random.SeedSequence(int(seed), spawn_key=(SPLIT_KEYS[split], int(index)))


def _uniform_left_open(rng: np.random.Generator, low: float, high: float, size=None):
    """U(low, high]: ``high - (high - low) * U[0, 1)``."""
    return high - (high - low) * rng.random(size)


def sample_parameters(
    seed: int,
    split: str,
    indices: Sequence[int] | np.ndarray,
    *,
    n_sines: int = 10,
    length_range: tuple[float, float] = (115.2, 140.8),
    t_end_range: tuple[float, float] = (45.0, 55.0),
) -> KdvParameters:
    """The parameters of trajectories ``indices`` of ``split``, each from its own stream.

    Returns:
        :class:`KdvParameters` of ``len(indices)`` trajectories; the same for an index whatever
        the other indices.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    b = indices.shape[0]
    length, t_end = np.empty(b), np.empty(b)
    amplitude, phase = np.empty((b, n_sines)), np.empty((b, n_sines))
    wavenumber = np.empty((b, n_sines), dtype=np.int64)
    for row, index in enumerate(indices):
        rng = np.random.default_rng(trajectory_seed(seed, split, int(index)))
        length[row] = _uniform_left_open(rng, *length_range)
        t_end[row] = _uniform_left_open(rng, *t_end_range)
        amplitude[row] = rng.uniform(-0.5, 0.5, n_sines)
        phase[row] = rng.uniform(0.0, 2.0 * np.pi, n_sines)
        wavenumber[row] = rng.integers(1, 3, n_sines)
    return KdvParameters(
        split=np.full(b, split), sample=indices, length=length, t_end=t_end,
        amplitude=amplitude, phase=phase, wavenumber=wavenumber,
    )  # fmt: skip


def grid(length: np.ndarray, n_x: int) -> np.ndarray:
    """(B, n_x) the grid points ``j L / n_x`` (``dx = L / n_x``; ``x = L`` is ``x = 0``)."""
    return np.arange(n_x)[None, :] * (np.asarray(length, dtype=np.float64)[:, None] / n_x)


def initial_condition(params: KdvParameters, n_x: int) -> np.ndarray:
    """(B, n_x) ``u0 = sum_i A_i sin(2 pi l_i x / L + phi_i)`` on :func:`grid`."""
    x = grid(params.length, n_x)  # (B, n_x)
    arg = (
        2.0 * np.pi * params.wavenumber[:, :, None] * x[:, None, :] / params.length[:, None, None]
        + params.phase[:, :, None]
    )
    return (params.amplitude[:, :, None] * np.sin(arg)).sum(axis=1)


def solve_parameters(
    params: KdvParameters,
    *,
    n_x: int = 256,
    n_times: int = 250,
    n_kept: int = 140,
    integrator: str = "etdrk4",
    dealias: bool = False,
    etdrk4_steps: int | None = None,
) -> np.ndarray:
    """Solve the trajectories of ``params`` (vectorised over them for ``etdrk4``).

    Returns:
        (B, n_kept, n_x) float64: the last ``n_kept`` of ``n_times`` output times on
        ``[0, t_end]``, as stored in the store's ``u``.
    """
    u0 = initial_condition(params, n_x)
    times = output_times(params.t_end, n_times)
    return solve_kdv(
        u0, params.length, times, method=integrator, dealias=dealias, steps=etdrk4_steps,
        keep_last=n_kept,
    )  # fmt: skip


def regenerate(settings: KdvGenerateSettings, split: str, indices: Sequence[int]) -> np.ndarray:
    """(len(indices), n_kept, n_x): trajectories ``indices`` of ``split`` exactly as
    :func:`generate_kdv` stores them with ``settings``."""
    params = sample_parameters(
        settings.seed, split, indices, n_sines=settings.n_sines,
        length_range=settings.length_range, t_end_range=settings.t_end_range,
    )  # fmt: skip
    return _solve_with(params, settings)


def _solve_with(params: KdvParameters, settings: KdvGenerateSettings) -> np.ndarray:
    return solve_parameters(
        params, n_x=settings.n_x, n_times=settings.n_times, n_kept=settings.n_kept,
        integrator=settings.integrator, dealias=settings.dealias,
        etdrk4_steps=settings.etdrk4_steps,
    )  # fmt: skip


def _solve_block(
    params: KdvParameters, settings: KdvGenerateSettings, block: int, n_blocks: int
) -> np.ndarray:
    """One Dask task: (rows, n_kept, n_x) for the block's trajectories, logging when done."""
    start = time.perf_counter()
    u = _solve_with(params, settings)
    if not np.isfinite(u).all():
        bad = int((~np.isfinite(u)).reshape(len(params), -1).any(axis=1).sum())
        raise FloatingPointError(
            f"KdV block {block + 1}/{n_blocks}: {bad} trajectory(ies) blew up (non-finite "
            f"values); use smaller steps (kdv.generate.etdrk4_steps) or integrator: radau"
        )
    log.info(
        "block %d/%d done: %d trajectories in %.2f s",
        block + 1, n_blocks, len(params), time.perf_counter() - start,
    )  # fmt: skip
    return u


def all_parameters(settings: KdvGenerateSettings) -> KdvParameters:
    """The parameters of every row of the store: train, valid, test in order."""
    return KdvParameters.concatenate(
        [
            sample_parameters(
                settings.seed,
                split,
                np.arange(n),
                n_sines=settings.n_sines,
                length_range=settings.length_range,
                t_end_range=settings.t_end_range,
            )  # fmt: skip
            for split, n in settings.counts.items()
        ]
    )


def generate_kdv(
    out: str | Path,
    settings: KdvGenerateSettings,
    *,
    on_phase: Callable[[str], None] | None = None,
) -> Path:
    """Generate every trajectory of ``settings`` and write the store ``out`` atomically.

    Blocks of ``block_size`` rows are Dask tasks on the scheduler of ``settings``; each is
    computed, written as one chunk of ``u`` and released (peak memory: a few blocks).

    Args:
        out: the Zarr store (replaced atomically when present).
        settings: the generator's settings.
        on_phase: called with a one-line description at the start of every phase.

    Returns:
        ``out``.

    Raises:
        ConfigError: the scheduler at ``address`` is unreachable.
        FloatingPointError: a trajectory blew up.
    """
    import dask
    import dask.array as da

    from smnn import __version__

    say = on_phase or log.info
    out = Path(out)
    params = all_parameters(settings)
    n_rows, n_x, n_kept = len(params), settings.n_x, settings.n_kept
    size = settings.block_size
    bounds = [(a, min(a + size, n_rows)) for a in range(0, n_rows, size)]
    blocks = [
        da.from_delayed(
            dask.delayed(_solve_block, pure=True)(params.rows(a, b), settings, k, len(bounds)),
            shape=(b - a, n_kept, n_x),
            dtype=np.float64,
        )
        for k, (a, b) in enumerate(bounds)
    ]
    u = da.concatenate(blocks, axis=0)
    times = output_times(params.t_end, settings.n_times)[:, -n_kept:]
    attrs: dict[str, Any] = {
        "title": 'KdV trajectories, the LPSDA "easy" distribution (generated, seeded)',
        "source": "generate",
        "equation": "u_t = -u u_x - u_xxx, periodic",
        "seed": int(settings.seed),
        "seed_scheme": "SeedSequence(seed, spawn_key=(split_key, sample)), split_key "
        + ", ".join(f"{s} {k}" for s, k in SPLIT_KEYS.items())
        + "; draws L, T_end, amplitude, phase, wavenumber",
        "integrator": settings.integrator,
        "dealias": bool(settings.dealias),
        "etdrk4_steps": settings.etdrk4_steps,
        "n_times": settings.n_times,
        "n_sines": settings.n_sines,
        "length_range": list(settings.length_range),
        "t_end_range": list(settings.t_end_range),
        "block_size": size,
        "smnn_version": __version__,
    }
    ds = build_kdv_dataset(
        u, split=params.split, sample=params.sample, x=grid(params.length, n_x),
        dx=params.length / n_x, t=times, dt=params.t_end / (settings.n_times - 1),
        attrs=attrs,
        initial_condition={
            "amplitude": params.amplitude, "phase": params.phase,
            "wavenumber": params.wavenumber,
        },
    )  # fmt: skip
    counts = ", ".join(f"{n} {s}" for s, n in settings.counts.items())
    with dask_scheduler(
        settings.scheduler, settings.threads, settings.address,
        connect_timeout=settings.connect_timeout, key="kdv.generate",
    ) as scheduler:  # fmt: skip
        say(f"dask scheduler: {scheduler}")
        say(
            f"solving {n_rows} trajectories ({counts}; {settings.integrator}"
            f"{', dealiased' if settings.dealias else ''}) in {len(bounds)} blocks of <= {size}"
            f" -> {out}"
        )
        write_kdv_store(ds, out.resolve(), chunk_rows=size)
    return out
