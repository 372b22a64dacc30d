"""The Lorenz system: trajectory generation (scipy) into a Zarr store, and training windows.

Store layout (``data/lorenz.zarr``, Zarr format 3):

- ``clean`` (time, component) float64: the integrated trajectory;
- ``observed`` (time, component) float64: ``clean`` plus Gaussian noise of standard deviation
  ``noise * std(clean, per component)`` (identical to ``clean`` when ``noise == 0``);
- coordinates ``time`` (n_points,) = ``dt * arange(n_points)``, ``component`` = x, y, z (stored
  as variable-length strings);
- attributes: the generator parameters, seed, integrator settings, package version.

Every chunk carries a ``crc32c`` checksum (:mod:`smnn.data.store`); a damaged store is reported as
a :class:`~smnn.data.store.StoreError` telling the user to rerun ``generate_lorenz``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from scipy.integrate import solve_ivp

from smnn.config import Config, SettingsError
from smnn.data.store import StoreError, open_dataset, write_dataset_atomic

__all__ = [
    "LorenzParams",
    "lorenz_rhs",
    "generate_lorenz",
    "write_lorenz_store",
    "load_lorenz",
    "window_starts",
    "make_windows",
    "COMPONENTS",
    "REMEDY",
]

COMPONENTS = ("x", "y", "z")
# integrator settings: tight enough that the stored trajectory is the exact one to ~1e-9
RTOL = 1e-10
ATOL = 1e-10
METHOD = "DOP853"
# what a damaged, missing or outdated store's error tells the user to do
REMEDY = (
    "rerun the stage that writes it, e.g. `snakemake --forcerun generate_lorenz` "
    "(or `smnn generate-lorenz --config ... --out ...`)"
)


@dataclass(frozen=True)
class LorenzParams:
    """Generator parameters (config section ``lorenz.data``)."""

    n_points: int = 10050
    dt: float = 0.01
    initial_state: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sigma: float = 10.0
    rho: float = 28.0
    beta: float = 8.0 / 3.0
    window: int = 50
    noise: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> LorenzParams:
        p = "lorenz.data."
        params = cls(
            n_points=config.get_int(p + "n_points", min_value=2),
            dt=config.get_float(p + "dt", positive=True),
            initial_state=tuple(config.get_float_list(p + "initial_state", length=3)),
            sigma=config.get_float(p + "sigma"),
            rho=config.get_float(p + "rho"),
            beta=config.get_float(p + "beta"),
            window=config.get_int(p + "window", min_value=2),
            noise=config.get_float(p + "noise", non_negative=True),
        )
        if params.window > params.n_points:
            raise SettingsError(
                config.source,
                [
                    f"config key 'lorenz.data.window': {params.window} is larger than "
                    f"lorenz.data.n_points ({params.n_points})"
                ],
            )
        return params


def lorenz_rhs(state: np.ndarray, sigma: float, rho: float, beta: float) -> np.ndarray:
    """Time derivative of the Lorenz system; ``state`` ``(..., 3)`` -> ``(..., 3)``."""
    x, y, z = state[..., 0], state[..., 1], state[..., 2]
    return np.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], axis=-1)


def generate_lorenz(params: LorenzParams, seed: int) -> xr.Dataset:
    """Integrate the Lorenz system and build the dataset described in the module docstring."""
    times = params.dt * np.arange(params.n_points)
    sol = solve_ivp(
        lambda t, s: lorenz_rhs(s, params.sigma, params.rho, params.beta),
        (0.0, float(times[-1])),
        np.asarray(params.initial_state, dtype=np.float64),
        method=METHOD,
        t_eval=times,
        rtol=RTOL,
        atol=ATOL,
    )
    if not sol.success:
        raise RuntimeError(f"integrating the Lorenz system failed: {sol.message}")
    clean = sol.y.T.copy()  # (n_points, 3)
    rng = np.random.default_rng(seed)
    observed = clean + params.noise * clean.std(axis=0) * rng.standard_normal(clean.shape)
    from smnn import __version__

    attrs = {
        f"param_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()
    }
    attrs.update(
        {
            "title": "Lorenz system trajectory",
            "equations": "dx/dt = sigma (y - x); dy/dt = x (rho - z) - y; dz/dt = x y - beta z",
            "generator": f"scipy.integrate.solve_ivp(method={METHOD}, rtol={RTOL}, atol={ATOL})",
            "seed": int(seed),
            "smnn_version": __version__,
        }
    )
    dims = ("time", "component")
    return xr.Dataset(
        {"clean": (dims, clean), "observed": (dims, observed)},
        coords={"time": times, "component": list(COMPONENTS)},
        attrs=attrs,
    )


def write_lorenz_store(params: LorenzParams, seed: int, out: str | Path) -> Path:
    """Generate the data and write it atomically to the Zarr v3 store ``out``."""
    ds = generate_lorenz(params, seed)
    n = params.n_points
    encoding = {v: {"chunks": (n, 3)} for v in ("clean", "observed")}
    return write_dataset_atomic(ds, out, encoding=encoding)


def load_lorenz(path: str | Path, params: LorenzParams | None = None) -> xr.Dataset:
    """Open the store and load it into memory (it is small).

    When ``params`` is given, the store's generator attributes must match them: a store made
    with other settings is an error naming the differing keys (regenerate it).

    Raises:
        StoreError: naming the store, the variable and :data:`REMEDY` when the store is missing,
            damaged (a chunk fails its checksum or decompression) or made with other settings.
    """
    ds = open_dataset(path, required_vars=("clean", "observed"), remedy=REMEDY, load=True)
    if ds["observed"].shape[-1] != 3 or ds["observed"].dims != ("time", "component"):
        raise StoreError(
            f"{path}: 'observed' must have dims (time, component=3), got "
            f"{ds['observed'].dims} {ds['observed'].shape}; {REMEDY}",
            path, "observed", REMEDY,
        )  # fmt: skip
    if params is not None:
        diffs = []
        for key, want in asdict(params).items():
            have = ds.attrs.get(f"param_{key}")
            want_v = list(want) if isinstance(want, tuple) else want
            if have is None or not np.allclose(np.asarray(have, float), np.asarray(want_v, float)):
                diffs.append(f"{key}: store {have!r} vs config {want_v!r}")
        if diffs:
            raise StoreError(
                f"{path} was generated with other lorenz.data settings ({'; '.join(diffs)}); "
                f"{REMEDY}",
                path, None, REMEDY,
            )  # fmt: skip
    return ds


def window_starts(n_points: int, window: int, max_windows: int | None) -> np.ndarray:
    """Start indices of the training windows.

    Every start ``0 .. n_points - window`` (``n_points - window + 1`` windows); with
    ``max_windows`` set, that many starts spread evenly over the whole trajectory.
    """
    n_all = n_points - window + 1
    if n_all < 1:
        raise ValueError(f"window {window} is longer than the trajectory ({n_points} points)")
    if max_windows is None or max_windows >= n_all:
        return np.arange(n_all)
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    return np.unique(np.round(np.linspace(0, n_all - 1, max_windows)).astype(np.int64))


def make_windows(series: np.ndarray, starts: np.ndarray, window: int) -> torch.Tensor:
    """Windows ``(n_windows, window, 3)`` of ``series`` ``(n_points, 3)`` at ``starts``."""
    idx = starts[:, None] + np.arange(window)[None, :]
    return torch.from_numpy(np.ascontiguousarray(series[idx]))
