"""Lorenz experiment: data store, library printing, the ODE layer, training and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from pipeline_support import merge, run_smnn, train_args, write_config

from smnn.config import Config, ConfigError
from smnn.data.lorenz import (
    LorenzParams,
    generate_lorenz,
    load_lorenz,
    lorenz_rhs,
    window_starts,
)
from smnn.data.store import StoreError, open_dataset, write_dataset_atomic
from smnn.experiments.library import PolynomialLibrary
from smnn.experiments.lorenz.evaluation import coefficient_metrics, simulate
from smnn.experiments.lorenz.models import (
    LorenzModel,
    WindowOde,
    lorenz_library,
    true_coefficients,
)

# ------------------------------------------------------------------ data store


@pytest.fixture(scope="module")
def lorenz_store(tmp_path_factory):
    """A store written by the real CLI from a small config."""
    d = tmp_path_factory.mktemp("lorenz_data")
    config = write_config(d, {"seed": 7, "lorenz": {"data": {"n_points": 600}}})
    out = d / "data" / "lorenz.zarr"
    proc = run_smnn("generate-lorenz", "--config", config, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return config, out


def test_store_contents_and_provenance(lorenz_store):
    config, out = lorenz_store
    ds = xr.open_zarr(out, zarr_format=3, consolidated=False)
    assert (out / "zarr.json").is_file()  # a Zarr v3 store
    assert ds["clean"].dims == ("time", "component")
    assert ds["clean"].shape == (600, 3)
    assert list(ds["component"].values) == ["x", "y", "z"]
    np.testing.assert_allclose(ds["time"].values, 0.01 * np.arange(600), atol=1e-12)
    np.testing.assert_array_equal(ds["clean"].values[0], [1.0, 1.0, 1.0])
    # noise 0: the observations are the clean trajectory
    np.testing.assert_array_equal(ds["observed"].values, ds["clean"].values)
    attrs = ds.attrs
    assert attrs["seed"] == 7
    assert attrs["param_sigma"] == 10.0 and attrs["param_rho"] == 28.0
    assert math.isclose(attrs["param_beta"], 8 / 3)
    assert attrs["param_n_points"] == 600 and attrs["param_dt"] == 0.01
    assert attrs["param_initial_state"] == [1.0, 1.0, 1.0]
    assert "solve_ivp" in attrs["generator"]
    from smnn import __version__

    assert attrs["smnn_version"] == __version__
    # no temporary directories left next to the store
    assert sorted(p.name for p in out.parent.iterdir()) == ["lorenz.zarr"]


def _rk4_step(x: np.ndarray, dt: float, substeps: int = 10) -> np.ndarray:
    """Advance states ``(..., 3)`` by ``dt`` with classical RK4 (independent of scipy)."""
    h = dt / substeps

    def f(s):
        return lorenz_rhs(s, 10.0, 28.0, 8 / 3)

    for _ in range(substeps):
        k1 = f(x)
        k2 = f(x + 0.5 * h * k1)
        k3 = f(x + 0.5 * h * k2)
        k4 = f(x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_store_trajectory_obeys_the_lorenz_equations(lorenz_store):
    _, out = lorenz_store
    x = load_lorenz(out)["clean"].values
    # every stored point follows from the previous one by the Lorenz equations
    np.testing.assert_allclose(_rk4_step(x[:-1], 0.01), x[1:], atol=1e-6, rtol=0)
    # and the trajectory is on the attractor (chaotic, bounded), not a fixed point
    assert x[:, 2].max() > 30 and x[:, 0].min() < -10


def test_noise_is_seeded_and_scaled():
    p = LorenzParams(n_points=500, noise=0.05)
    a = generate_lorenz(p, seed=1)
    b = generate_lorenz(p, seed=1)
    c = generate_lorenz(p, seed=2)
    np.testing.assert_array_equal(a["observed"].values, b["observed"].values)
    assert not np.array_equal(a["observed"].values, c["observed"].values)
    resid = a["observed"].values - a["clean"].values
    ratio = resid.std(axis=0) / a["clean"].values.std(axis=0)
    np.testing.assert_allclose(ratio, 0.05, rtol=0.15)


def test_load_rejects_store_made_with_other_settings(lorenz_store):
    _, out = lorenz_store
    with pytest.raises(StoreError, match="rho: store 28.0 vs config 30.0"):
        load_lorenz(out, LorenzParams(n_points=600, rho=30.0))
    with pytest.raises(StoreError, match="does not exist"):
        open_dataset(out.parent / "missing.zarr")


def _dataset(values: np.ndarray) -> xr.Dataset:
    return xr.Dataset({"v": (("t",), values)}, attrs={"tag": "x"})


def test_atomic_write_leaves_no_half_store_on_failure(tmp_path):
    import dask.array as da

    path = tmp_path / "store.zarr"

    def explode(block):
        if block[0] >= 30:  # the second chunk fails after the first was written
            raise RuntimeError("generator crashed")
        return block

    bad = da.arange(60, chunks=30, dtype=float).map_blocks(explode, dtype=float)
    with pytest.raises(RuntimeError, match="generator crashed"):
        write_dataset_atomic(xr.Dataset({"v": (("t",), bad)}), path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []

    # an existing store survives a failed rewrite untouched
    write_dataset_atomic(_dataset(np.arange(5.0)), path)
    with pytest.raises(RuntimeError):
        write_dataset_atomic(xr.Dataset({"v": (("t",), bad)}), path)
    np.testing.assert_array_equal(open_dataset(path)["v"].values, np.arange(5.0))

    # leftovers of a killed writer are cleaned up by the next write; rewriting replaces
    (tmp_path / ".store.zarr.tmp-999999").mkdir()
    write_dataset_atomic(_dataset(np.arange(3.0)), path)
    np.testing.assert_array_equal(open_dataset(path)["v"].values, np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]


def test_window_starts():
    np.testing.assert_array_equal(window_starts(10, 4, None), np.arange(7))
    s = window_starts(1000, 50, 10)
    assert len(s) == 10 and s[0] == 0 and s[-1] == 950
    assert np.all(np.diff(s) > 0)
    with pytest.raises(ValueError, match="longer than the trajectory"):
        window_starts(10, 11, None)


# ------------------------------------------------------------------ library


def test_library_terms_and_printing():
    lib = lorenz_library()
    assert lib.names == ("1", "x", "y", "z", "x^2", "x y", "x z", "y^2", "y z", "z^2")
    truth = true_coefficients(lib, LorenzParams())
    assert lib.equations(truth) == [
        "dx/dt = -10.000 x + 10.000 y",
        "dy/dt = 28.000 x - 1.000 y - 1.000 x z",
        "dz/dt = -2.667 z + 1.000 x y",
    ]
    xi = np.zeros((10, 3))
    xi[0, 0] = 1.5
    xi[9, 0] = -0.25
    assert lib.equations(xi, precision=2) == ["dx/dt = 1.50 - 0.25 z^2", "dy/dt = 0", "dz/dt = 0"]
    assert lib.equations(torch.from_numpy(truth))[2] == "dz/dt = -2.667 z + 1.000 x y"


def test_library_evaluate_and_rhs_match_lorenz():
    lib = lorenz_library()
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 5, 3))
    theta = lib.evaluate(s)
    x, y, z = s[..., 0], s[..., 1], s[..., 2]
    expected = np.stack([np.ones_like(x), x, y, z, x * x, x * y, x * z, y * y, y * z, z * z], -1)
    np.testing.assert_allclose(theta, expected)
    np.testing.assert_allclose(lib.evaluate(torch.from_numpy(s)).numpy(), expected)
    truth = true_coefficients(lib, LorenzParams())
    np.testing.assert_allclose(lib.rhs(s, truth), lorenz_rhs(s, 10.0, 28.0, 8 / 3), atol=1e-12)


def test_library_other_shapes_and_errors():
    lib = PolynomialLibrary(("a", "b"), degree=3, include_constant=False)
    assert lib.names == ("a", "b", "a^2", "a b", "b^2", "a^3", "a^2 b", "a b^2", "b^3")
    with pytest.raises(ValueError, match=r"last axis, got shape \(4, 3\)"):
        lib.evaluate(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(n_terms, n_vars\) = \(9, 2\), got \(9, 3\)"):
        lib.equations(np.zeros((9, 3)))
    with pytest.raises(KeyError, match="no term 'c'"):
        lib.term_index("c")
    with pytest.raises(ValueError, match="distinct"):
        PolynomialLibrary(("a", "a"))


# ------------------------------------------------------------------ model pieces


@pytest.mark.parametrize("solver", ["smnn", "mnn_dense", "mnn_cg"])
def test_window_ode_integrates_known_rhs(solver):
    """u' = cos(t) on a window, u(0) = u0 -> u = u0 + sin(t), with each solver."""
    import warnings

    from smnn.solver import MNNConvergenceWarning

    warnings.simplefilter("ignore", MNNConvergenceWarning)  # CG's tol 1e-12 is out of reach
    T, dt = 50, 0.01
    ode = WindowOde(solver, T, dt, torch.float64, torch.device("cpu"))
    t = dt * torch.arange(T, dtype=torch.float64)
    amp = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)  # (B=2, V=3)
    rhs = amp[:, None, :] * torch.cos(t)[None, :, None]  # (2, T, 3)
    u0 = torch.tensor([[0.1, 0.2, 0.3], [-1.0, 5.0, 2.0]], dtype=torch.float64)
    u = ode(rhs, u0)
    exact = u0[:, None, :] + amp[:, None, :] * torch.sin(t)[None, :, None]
    assert u.shape == (2, T, 3)
    assert (u - exact).abs().max() < 1e-4
    with pytest.raises(ValueError, match="rhs must be"):
        ode(rhs[:, :10], u0)
    with pytest.raises(ValueError, match="unknown solver 'rk4'; choose one of smnn"):
        WindowOde("rk4", T, dt, torch.float64, torch.device("cpu"))


def test_thresholding_masks_small_terms_for_good():
    torch.manual_seed(0)
    model = LorenzModel(window=5, hidden=8, latent=4).double()
    with torch.no_grad():
        model.coefficient_net[-1].weight.zero_()
        bias = torch.full((30,), 0.05, dtype=torch.float64)
        bias[:4] = torch.tensor([2.0, -0.5, 0.11, -0.2])
        model.coefficient_net[-1].bias.copy_(bias)
    kept = model.apply_threshold(0.1)
    assert kept == 4
    xi = model.coefficients()
    assert (xi.flatten()[4:] == 0).all()
    np.testing.assert_allclose(xi.flatten()[:4].detach().numpy(), [2.0, -0.5, 0.11, -0.2])
    with torch.no_grad():  # a masked term stays masked even when it grows again
        model.coefficient_net[-1].bias.fill_(5.0)
    assert int((model.coefficients() != 0).sum()) == 4


def test_coefficient_metrics_and_simulation():
    lib = lorenz_library()
    truth = true_coefficients(lib, LorenzParams())
    xi = truth.copy()
    xi[lib.term_index("x"), 0] = -9.0  # off by 1
    xi[lib.term_index("z^2"), 1] = 0.3  # wrongly kept
    xi[lib.term_index("y"), 1] = 0.0  # wrongly dropped
    xi[lib.term_index("x y"), 2] = -1.0  # sign error
    m = coefficient_metrics(xi, truth, lib)
    assert m["n_wrongly_kept"] == 1 and m["n_wrongly_dropped"] == 1
    assert m["n_sign_errors"] == 2  # the dropped term has sign 0, the flipped one -1
    assert m["sign_pattern_recovered"] == 0.0
    assert m["coef_dx_x"] == -9.0 and m["coef_dz_xy"] == -1.0
    assert m["coef_max_abs_error"] == 2.0
    exact = coefficient_metrics(truth, truth, lib)
    assert exact["sign_pattern_recovered"] == 1.0 and exact["coef_max_abs_error"] == 0.0

    # the true equations simulated reproduce the generated data
    data = generate_lorenz(LorenzParams(n_points=200), seed=0)["clean"].values
    sim = simulate(lib, truth, data[0], 200, 0.01)
    np.testing.assert_allclose(sim, data, atol=1e-6)
    # a blowing-up system stops early instead of failing
    unstable = np.zeros((10, 3))
    unstable[lib.term_index("x^2"), 0] = 1.0
    short = simulate(lib, unstable, np.array([1.0, 0.0, 0.0]), 300, 0.01)
    assert short.shape[0] < 300


# ------------------------------------------------------------------ config errors


def test_config_errors_name_the_key(tmp_path):
    cfg = Config(merge({}, {"lorenz": {"train": {"lr": "fast"}}}), "my.yaml")
    with pytest.raises(ConfigError, match=r"my.yaml: lorenz.train.lr must be a number > 0"):
        cfg.get_float("lorenz.train.lr", positive=True)
    with pytest.raises(ConfigError, match="my.yaml: lorenz.train.cycles is missing"):
        cfg.get_int("lorenz.train.cycles")

    config = write_config(tmp_path, {"lorenz": {"train": {"batch_size": 0}}})
    proc = run_smnn(*train_args(config, tmp_path / "none.zarr", tmp_path / "out"))
    assert proc.returncode == 2
    assert "config key 'lorenz.train.batch_size': 0 is less than the minimum of 1" in proc.stderr

    config = write_config(tmp_path, {}, name="ok.yaml")
    proc = run_smnn(*train_args(config, tmp_path / "none.zarr", tmp_path / "out"))
    assert proc.returncode == 2
    assert "none.zarr does not exist" in proc.stderr


# ------------------------------------------------------------------ train + evaluate


def test_tiny_training_recovers_dominant_signs_and_evaluates(tmp_path):
    override = {
        "lorenz": {
            "data": {"n_points": 2050},
            "model": {"hidden": 64, "threshold": 0.02},
            "train": {
                "cycles": 2,
                "epochs_per_cycle": 30,
                "batch_size": 32,
                "lr": 5.0e-3,
                "max_windows": 256,
            },
        }
    }
    config = write_config(tmp_path, override)
    data = tmp_path / "data" / "lorenz.zarr"
    assert run_smnn("generate-lorenz", "--config", config, "--out", data).returncode == 0
    out = tmp_path / "results" / "lorenz" / "smnn"
    proc = run_smnn(*train_args(config, data, out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.pt").is_file()
    train = json.loads((out / "train_metrics.json").read_text())
    assert len(train["history"]) == 60
    assert train["history"][-1]["train_loss"] < 0.5 * train["history"][0]["train_loss"]

    proc = run_smnn(
        "evaluate", "--experiment", "lorenz", "--solver", "smnn", "--config", config,
        "--data", data, "--model", out / "model.pt", "--out", out / "eval",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "eval" / "metrics.json").read_text())
    m = doc["metrics"]
    # the dominant terms of each equation have the right sign
    assert m["coef_dx_x"] < 0 < m["coef_dx_y"], doc["equations"]
    assert m["coef_dy_xz"] < 0 < m["coef_dy_x"], doc["equations"]
    assert m["coef_dz_z"] < 0 < m["coef_dz_xy"], doc["equations"]
    assert doc["true_equations"][0] == "dx/dt = -10.000 x + 10.000 y"
    assert len(doc["equations"]) == 3 and doc["equations"][0].startswith("dx/dt = ")
    for key in ("n_wrongly_kept", "n_wrongly_dropped", "simulation_rmse", "coef_rel_error"):
        assert key in m
    # metrics.json holds only what config and data determine; the run link is an MLflow tag
    assert "train_run_id" not in doc and doc["metrics"]["train_final_loss"] == pytest.approx(
        train["final_metrics"]["final_train_loss"]
    )
    for name in ("trajectories", "time_series", "loss", "coefficients"):
        png = out / "eval" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000
