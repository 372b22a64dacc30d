"""SST models, training tasks and evaluation: DCT, windows and partners, the Mechanistic
Identifier and Ada-GVAE, training through the shared Trainer, the forecast protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.fft
import torch
import xarray as xr

from smnn.config import Config, ConfigError
from smnn.data.store import write_dataset_atomic
from smnn.data.windows import (
    RowPartners,
    gather_windows,
    random_starts,
    read_series,
    seeded_generator,
)
from smnn.experiments.dct import Dct, dct_matrix
from smnn.experiments.sst import EXPERIMENT
from smnn.experiments.sst.evaluation import (
    persistence_forecast,
    seasonal_climatology,
    week_of_year,
)
from smnn.experiments.sst.models import AdaGVAE, MechanisticIdentifier
from smnn.experiments.sst.settings import SstSettings, section_problems
from smnn.experiments.sst.store import open_store
from smnn.io import atomic_torch_save
from smnn.training import Trainer, TrainerSettings, seed_everything

N_WEEKS, N_LAT, N_LON, TEST_WEEKS = 300, 6, 12, 60
WINDOW, N_INIT = 30, 5

SST_SECTION = {
    "enabled": True,
    "solvers": ["smnn"],
    "baselines": ["adagvae"],
    "source": "synthetic",
    "synthetic": {"n_weeks": N_WEEKS, "n_lat": N_LAT, "n_lon": N_LON, "encoding": "netcdf4"},
    "preprocess": {"land": "all", "test_weeks": TEST_WEEKS, "chunk_lat": 3, "chunk_lon": 6},
    "model": {
        "window": WINDOW, "n_dct": 10, "encoder_hidden": 32, "encoder_layers": 2, "latents": 6,
        "shared_latents": 3, "decoder_hidden": 32, "n_init": N_INIT,
        "neighbour_offsets": [-5, 4],
    },
    "train": {
        "epochs": 4, "batch_size": 16, "lr": 3.0e-3, "alignment_weight": 10.0,
        "beta": 1.0, "dtype": "float64", "windows_per_epoch": None,
    },
    "evaluate": {"encode_weeks": WINDOW, "forecast_weeks": WINDOW, "sample_cells": 2},
    "scaling": {"enabled": False},
}  # fmt: skip


def make_config(**overrides) -> Config:
    section = json.loads(json.dumps(SST_SECTION))
    for key, value in overrides.items():
        node = section
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return Config({"seed": 3, "device": "cpu", "sst": section}, source="test")


def settings_of(config: Config) -> SstSettings:
    return EXPERIMENT.settings(config)


def make_settings(**overrides) -> SstSettings:
    """The experiment's settings of :func:`make_config` (what the job's edge builds)."""
    return settings_of(make_config(**overrides))


def write_store(path, land: str = "all", seed: int = 0):
    """A small store in the contract's layout: seasonal cycle + slow drift + noise per cell."""
    rng = np.random.default_rng(seed)
    t = np.arange(N_WEEKS)
    lat = np.linspace(75.0, -75.0, N_LAT).astype(np.float32)
    lon = np.linspace(15.0, 345.0, N_LON).astype(np.float32)
    amp = 1.0 + np.abs(lat)[:, None] / 40.0 + 0.2 * rng.random((N_LAT, N_LON))
    phase = 2 * np.pi * t[:, None, None] / 52.18 + 0.3 * rng.random((N_LAT, N_LON))
    degc = 15 + amp * np.sin(phase) + 0.1 * rng.standard_normal((N_WEEKS, N_LAT, N_LON))
    mask = np.ones((N_LAT, N_LON), dtype=np.int8)
    mask[2, 3:6] = 0  # a small continent
    mask[4, :] = 0
    mask[4, 7] = 1  # an ocean cell without an ocean neighbour on its latitude
    keep = mask == 1 if land == "ocean" else np.ones_like(mask, dtype=bool)
    mean, std = float(degc[:, keep].mean()), float(degc[:, keep].std())
    sst = ((degc - mean) / std).astype(np.float32)
    if land == "ocean":
        sst[:, ~keep] = np.nan
    times = np.datetime64("1989-12-31") + 7 * t.astype("timedelta64[D]")
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), sst), "mask": (("lat", "lon"), mask)},
        coords={"time": times.astype("datetime64[ns]"), "lat": lat, "lon": lon},
        attrs={
            "mean_degc": mean, "std_degc": std, "n_train_weeks": N_WEEKS - TEST_WEEKS,
            "n_test_weeks": TEST_WEEKS, "land": land, "source": "synthetic", "synthetic": True,
            "source_url": "test", "sst_sha256": "", "mask_sha256": "", "smnn_version": "test",
            "n_ocean_cells": int(mask.sum()),
        },
    )  # fmt: skip
    return write_dataset_atomic(ds, path)


@pytest.fixture(scope="module")
def store_all(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("sst") / "sst.zarr", "all")


@pytest.fixture(scope="module")
def store_ocean(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("sst_ocean") / "sst.zarr", "ocean")


# ------------------------------------------------------------------ DCT


def test_dct_orthonormal_inverse_and_scipy():
    n = 37
    d = dct_matrix(n)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = Dct(n)
    y = layer(x)
    np.testing.assert_allclose(y.numpy(), scipy.fft.dct(x.numpy(), type=2, norm="ortho"),
                               atol=1e-12)  # fmt: skip
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-12, rtol=0)
    kept = Dct(n, 5)
    assert kept(x).shape == (4, 5)
    torch.testing.assert_close(kept(x), y[:, :5])
    assert "matrix" not in kept.state_dict()  # recomputed, not saved
    with pytest.raises(ValueError, match="37 points"):
        layer(torch.zeros(3, 36))


# ------------------------------------------------------------------ windows and partners


def test_read_series_and_gather(store_all):
    ds = xr.open_zarr(store_all, zarr_format=3, consolidated=False)
    series = read_series(store_all, "sst", slice(10, 50), dtype=torch.float64)
    assert series.shape == (40, N_LAT * N_LON)
    np.testing.assert_array_equal(
        series.numpy(), ds["sst"].values[10:50].reshape(40, -1).astype(np.float64)
    )
    starts = random_starts(40, 7, 9, generator=torch.Generator().manual_seed(1))
    cells = torch.randint(0, N_LAT * N_LON, (9,), generator=torch.Generator().manual_seed(2))
    w = gather_windows(series, starts, cells, 7)
    assert w.shape == (9, 7)
    for i in range(9):
        torch.testing.assert_close(w[i], series[starts[i] : starts[i] + 7, cells[i]])
    with pytest.raises(IndexError):
        gather_windows(series, torch.tensor([35]), torch.tensor([0]), 7)


def test_seeded_generator_streams():
    a = torch.rand(3, generator=seeded_generator(5, "x"))
    b = torch.rand(3, generator=seeded_generator(5, "x"))
    c = torch.rand(3, generator=seeded_generator(5, "y"))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("with_mask", [False, True])
def test_partners_same_row_in_range_never_self(with_mask):
    rows, cols = 5, 12
    mask = np.ones((rows, cols), dtype=bool)
    mask[1, 2:9] = False
    mask[3, :] = False
    mask[3, 5] = True  # isolated: no allowed partner
    rule = RowPartners((rows, cols), (-5, 4), mask.reshape(-1) if with_mask else None)
    cells = rule.pairable_cells.repeat(20)
    partner = rule.draw(cells, torch.Generator().manual_seed(0))
    assert torch.equal(partner // cols, cells // cols)  # same latitude
    offset = (partner % cols - cells % cols) % cols  # wrapped offset in 0..cols-1
    assert bool(((offset >= cols - 5) | ((offset >= 1) & (offset <= 4))).all())
    assert bool((partner != cells).all())
    if with_mask:
        assert bool(torch.from_numpy(mask.reshape(-1))[partner].all())
        assert not bool(rule.pairable[3 * cols + 5])
        with pytest.raises(ValueError, match="no allowed partner"):
            rule.draw(torch.tensor([3 * cols + 5]))
    else:
        assert rule.pairable_cells.numel() == rows * cols
    # every offset of the range is drawn somewhere (wrapping included)
    assert len(set(offset.tolist())) == 9 if not with_mask else True


# ------------------------------------------------------------------ models


def mi(solver: str = "smnn", **kw) -> MechanisticIdentifier:
    args = dict(window=WINDOW, n_dct=10, encoder_hidden=16, encoder_layers=2, latents=6,
                shared_latents=3, decoder_hidden=16, n_init=N_INIT)  # fmt: skip
    args.update(kw)
    return MechanisticIdentifier(**args, solver=solver).double()


def test_model_shapes():
    torch.manual_seed(0)
    x = torch.randn(4, 2, WINDOW, dtype=torch.float64)
    out = mi()(x)
    assert out.latents.shape == out.shared.shape == (4, 2, 6)
    assert out.solution.shape == (4, 2, WINDOW)
    assert out.steps.shape == (4, 2, WINDOW - 1)
    assert bool(((out.steps >= 0.001) & (out.steps <= 0.999)).all())
    torch.testing.assert_close(out.steps, torch.full_like(out.steps, 0.1))  # initial step
    assert bool(torch.isfinite(out.solution).all())
    vae = AdaGVAE(WINDOW, 10, 16, 2, 6, 16, N_INIT).double()
    v = vae(x)
    assert v.reconstruction.shape == (4, 2, WINDOW)
    assert v.mean.shape == v.logvar.shape == (4, 2, 6) and v.shared.shape == (4, 6)
    with pytest.raises(ValueError, match=r"\(B, 2, 30\)"):
        mi()(torch.zeros(4, WINDOW))


def test_shared_latent_averaging():
    model = mi()
    z = torch.randn(5, 2, 6, dtype=torch.float64)
    s = model.share(z)
    torch.testing.assert_close(s[:, 0, :3], s[:, 1, :3])
    torch.testing.assert_close(s[:, 0, :3], z[:, :, :3].mean(dim=1))
    torch.testing.assert_close(s[:, :, 3:], z[:, :, 3:])
    assert bool((s[:, 0, 3:] != s[:, 1, 3:]).all())


def test_adagvae_adaptive_averaging():
    mean = torch.zeros(1, 2, 4, dtype=torch.float64)
    logvar = torch.zeros(1, 2, 4, dtype=torch.float64)
    mean[0, 1] = torch.tensor([0.0, 0.1, 3.0, 2.0])  # dims 2 and 3 differ a lot
    m, lv, shared = AdaGVAE.adapt(mean, logvar)
    # KL per dim = d^2 / 2 = (0, 0.005, 4.5, 2): midpoint 2.25 -> dims 0, 1 and 3 shared
    assert shared.tolist() == [[True, True, False, True]]
    torch.testing.assert_close(m[0, 0, :2], m[0, 1, :2])
    torch.testing.assert_close(m[0, :, 2], mean[0, :, 2])
    assert float(m[0, 0, 1]) == pytest.approx(0.05)


def test_mi_solves_match_the_row_by_row_systems():
    """The identifier's solve is the least-squares solution of the system built row by row from
    its decoded ODE: docs/solver.md, "The over-determined linear system" for ``smnn`` (dense
    reference), "Baselines from the original MNN" for ``mnn_dense`` (the original MNN's system, with
    a slack variable and central rows: another problem, so its solution differs from smnn's by
    design)."""
    from smnn.solver.reference import build_mnn_dense_system, dense_reference

    torch.manual_seed(1)
    models = {name: mi(name) for name in ("smnn", "mnn_dense")}
    models["mnn_dense"].load_state_dict(models["smnn"].state_dict())
    x = torch.randn(3, 2, WINDOW, dtype=torch.float64)
    with torch.no_grad():
        out = {name: m(x) for name, m in models.items()}
        z = out["smnn"].shared.flatten(0, 1)
        c, b, h = models["smnn"].decode(z)
        c, b = c.unsqueeze(-2).unsqueeze(-2), b.unsqueeze(-1)  # (N, T, 1, 1, 3), (N, T, 1)
        u0 = x[..., :N_INIT].reshape(-1, N_INIT, 1, 1)
        ref = dense_reference(c, b, u0, h)[..., 0, 0]
        C, r = build_mnn_dense_system(c, b, u0, h)
        zr = torch.linalg.lstsq(C, r.unsqueeze(-1)).solution.squeeze(-1)
        ref_mnn = zr[:, 1:].view(-1, WINDOW, 3)[..., 0]  # column 0 is the slack variable
    torch.testing.assert_close(out["smnn"].solution, ref.view(3, 2, WINDOW), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["mnn_dense"].solution, ref_mnn.view(3, 2, WINDOW), atol=1e-6,
                               rtol=0)  # fmt: skip


def test_float32_qr_solve_is_close_to_float64():
    """sst.model.solve_dtype float32 with the orthogonal solve, on a float64 model: inputs cast
    to float32, solutions back to float64, within 1e-4 of their scale of the float64 solve."""
    torch.manual_seed(1)
    model64 = mi()
    model32 = mi(solve_dtype=torch.float32, solve_method="qr")
    model32.load_state_dict(model64.state_dict())
    assert model32.layer.method == "qr" and model64.solve_dtype is None
    x = torch.randn(3, 2, WINDOW, dtype=torch.float64)
    with torch.no_grad():
        u64, u32 = model64(x).solution, model32(x).solution
    assert u32.dtype == torch.float64  # back in the model's dtype
    err = float((u32 - u64).abs().max() / u64.abs().max())
    assert 0 < err <= 1e-4, err  # solved in float32 (not bitwise float64), and close


def test_float32_qr_training_from_the_settings(store_all, tmp_path):
    """sst.train.dtype float32 with sst.model.solve_method qr: the identifier trains (finite,
    decreasing loss) and evaluate's load_model rebuilds its solve options."""
    config = make_config(**{"train.dtype": "float32", "train.epochs": 2})
    config.data["sst"]["model"].update(solve_dtype="float32", solve_method="qr")
    settings = settings_of(config)
    assert settings.solve_args() == {"solve_dtype": torch.float32, "solve_method": "qr"}
    seed_everything(3)
    task = EXPERIMENT.build_task(settings, "smnn", store_all, torch.device("cpu"), threads=1)
    assert task.model.layer.method == "qr" and task.model.solve_dtype == torch.float32
    assert task.model.layer.options["threads"] == 1  # the job's thread count reaches the layer
    result = _train(task, tmp_path, None)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    path = _save(task, result, tmp_path / "mi.pt")
    from smnn.experiments.sst.tasks import load_model

    args = settings.solve_args()
    model, _ = load_model(path, "mechanistic_identifier", dtype=torch.float32, solve_args=args)
    assert model.layer.method == "qr" and model.solve_dtype == torch.float32


# ------------------------------------------------------------------ settings


def test_settings_and_problems():
    s = SstSettings.from_config(make_config())
    assert s.window == WINDOW and s.neighbour_offsets == (-5, 4) and s.beta == 1.0
    assert s.baselines == ("adagvae",)
    assert section_problems(SST_SECTION) == []
    bad = json.loads(json.dumps(SST_SECTION))
    bad["model"].update(n_dct=40, n_init=WINDOW, shared_latents=9)
    bad["evaluate"].update(encode_weeks=20, forecast_weeks=50)
    problems = "\n".join(section_problems(bad))
    for key in ("model.n_dct", "model.n_init", "model.shared_latents", "evaluate.encode_weeks",
                "evaluate.forecast_weeks"):  # fmt: skip
        assert f"'sst.{key}'" in problems
    with pytest.raises(ConfigError, match="n_dct"):
        SstSettings.from_config(make_config(**{"model.n_dct": 40}))
    bad_config = make_config()
    bad_config.data["sst"] = bad
    assert EXPERIMENT.config_problems(bad_config) == section_problems(bad)
    assert EXPERIMENT.extra_targets(make_settings()) == []
    with_study = make_settings(**{"scaling.enabled": True})
    assert "sst/scaling/scaling.csv" in EXPERIMENT.extra_targets(with_study)
    # the solve: the model's dtype, method auto unless the optional keys say otherwise
    assert s.solve_args() == {"solve_dtype": None, "solve_method": "auto"}
    for key, value in (("solve_dtype", "float16"), ("solve_method", "lu")):
        config = make_config()
        config.data["sst"]["model"][key] = value
        with pytest.raises(ConfigError, match=rf"sst\.model\.{key}.*{value}"):
            SstSettings.from_config(config)


# ------------------------------------------------------------------ training


def _train(task, tmp_path, epochs: int | None):
    settings = TrainerSettings(
        checkpoint_dir=tmp_path / "ck", seed=3, device=torch.device("cpu"), progress=False,
        max_epochs=epochs,
    )  # fmt: skip
    trainer = Trainer(task, settings)
    with trainer:
        trainer.restore()
        return trainer.fit()


def _save(task, result, path):
    payload = EXPERIMENT.model_payload(task)
    payload.update(history=result.history, step_losses=result.step_losses,
                   final_metrics=result.final_metrics, run_id="run-x")  # fmt: skip
    atomic_torch_save(payload, path)
    return path


@pytest.fixture(scope="module")
def trained(store_ocean, tmp_path_factory):
    """Both models trained a few epochs on the land: ocean store."""
    d = tmp_path_factory.mktemp("trained")
    config = make_config(**{"preprocess.land": "ocean"})
    seed_everything(3)
    mi_task = EXPERIMENT.build_task(settings_of(config), "smnn", store_ocean, torch.device("cpu"))
    mi_result = _train(mi_task, d / "mi", None)
    seed_everything(3)
    cpu = torch.device("cpu")
    vae_task = EXPERIMENT.build_baseline_task(settings_of(config), "adagvae", store_ocean, cpu)
    vae_result = _train(vae_task, d / "vae", None)
    return {
        "config": config, "store": store_ocean, "dir": d,
        "mi": (mi_task, mi_result, _save(mi_task, mi_result, d / "mi.pt")),
        "vae": (vae_task, vae_result, _save(vae_task, vae_result, d / "vae.pt")),
    }  # fmt: skip


def test_training_loss_decreases(trained):
    for key, comp in (("mi", "loss_dct"), ("vae", "loss_reconstruction")):
        task, result, _ = trained[key]
        losses = [r["train_loss"] for r in result.history]
        assert len(losses) == 4 and all(np.isfinite(losses))
        assert losses[-1] < losses[0], (key, losses)
        assert comp in result.history[0]
    mi_task = trained["mi"][0]
    # land: ocean -> only ocean cells with an ocean partner are sampled
    store = open_store(trained["store"])
    assert mi_task.n_samples == int(mi_task.sampler.partners.pairable.sum())
    assert bool(torch.from_numpy(store.allowed)[mi_task.sampler.partners.pairable_cells].all())


def test_store_of_another_source_is_stale(store_all):
    """Issue 18: training and evaluation check data/sst.zarr's recorded source against
    sst.source (synthetic data never pass for NOAA's after the source changed)."""
    from smnn.data.store import StoreError

    assert open_store(store_all, make_settings()).synthetic  # synthetic store, synthetic config
    with pytest.raises(StoreError) as info:
        open_store(store_all, make_settings(source="noaa"))
    message = str(info.value)
    assert "source 'synthetic'" in message and "sst.source is 'noaa'" in message
    assert "snakemake --forcerun preprocess_sst" in message
    with pytest.raises(StoreError, match="sst.source is 'noaa'"):
        EXPERIMENT.build_task(make_settings(source="noaa"), "smnn", store_all, torch.device("cpu"))


def test_training_too_large_for_memory_stops_before_allocating(store_all):
    """Issue 18: a model or batch beyond the memory budget is refused with the keys to change."""
    from smnn.memory import MemoryBudgetError

    cpu = torch.device("cpu")
    with pytest.raises(
        MemoryBudgetError, match=r"sst.model.encoder_hidden.*sst.train.memory_budget_gb"
    ):
        EXPERIMENT.build_task(
            make_settings(**{"model.encoder_hidden": 10**7}), "smnn", store_all, cpu
        )
    with pytest.raises(MemoryBudgetError, match=r"solver .*sst.train.batch_size"):
        EXPERIMENT.build_task(
            make_settings(**{"train.memory_budget_gb": 1e-6}), "smnn", store_all, cpu
        )


def test_sampler_draws_pairs_from_training_period(store_all):
    config = make_config()
    seed_everything(0)
    task = EXPERIMENT.build_task(settings_of(config), "smnn", store_all, torch.device("cpu"))
    store = open_store(store_all)
    assert task.sampler.series.shape == (N_WEEKS - TEST_WEEKS, N_LAT * N_LON)
    torch.manual_seed(5)
    x = task.sampler.draw(torch.arange(8))
    torch.manual_seed(5)
    y = task.sampler.draw(torch.arange(8))
    assert x.shape == (8, 2, WINDOW) and torch.equal(x, y)  # drawn from the global generator
    train = store.dataset["sst"].values[: store.n_train].reshape(store.n_train, -1)
    # view 0 of sample i is a window of cell i; view 1 the same weeks of a cell on its row
    for i in range(8):
        v0, v1 = (x[i, v].numpy().astype(np.float32) for v in (0, 1))
        starts = [s for s in range(store.n_train - WINDOW + 1)
                  if np.array_equal(train[s : s + WINDOW, i], v0)]  # fmt: skip
        assert len(starts) == 1
        row = range((i // N_LON) * N_LON, (i // N_LON + 1) * N_LON)
        s = starts[0]
        assert [j for j in row if j != i and np.array_equal(train[s : s + WINDOW, j], v1)]


def test_model_payload_and_load(trained):
    from smnn.experiments.sst.tasks import load_model

    task, _, path = trained["mi"]
    model, payload = load_model(path, "mechanistic_identifier", solver="smnn")
    assert payload["kind"] == "mechanistic_identifier" and payload["summary"]
    for k, v in task.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v.double())
    with pytest.raises(ValueError, match="expected 'adagvae'"):
        load_model(path, "adagvae")
    with pytest.raises(FileNotFoundError, match="train first"):
        load_model(trained["dir"] / "nothing.pt", "adagvae")


# ------------------------------------------------------------------ evaluation


def test_evaluate_metrics_and_baselines(trained, tmp_path):
    config, store_path = trained["config"], trained["store"]
    out = tmp_path / "eval"
    ev = EXPERIMENT.evaluate(
        settings_of(config), "smnn", store_path, trained["mi"][2], out, torch.device("cpu"),
        baseline_models={"adagvae": trained["vae"][2]},
    )  # fmt: skip
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["models"]) == {"mechanistic_identifier", "adagvae", "climatology", "persistence"}
    assert doc["synthetic"] is True and doc["left_out"] == []
    for row in doc["models"].values():
        assert np.isfinite(row["mse_norm"]) and row["mse_norm"] >= 0
        assert len(row["mse_by_lead_norm"]) == WINDOW - N_INIT
    for short in ("mi", "adagvae", "climatology", "persistence"):
        assert np.isfinite(ev.metrics[f"mse_norm_{short}"])
    assert ev.tags["synthetic"] == "true" and ev.tags["train_run_id"] == "run-x"
    assert sorted(p.name for p in ev.plots) == sorted(
        ["forecast_samples.png", "mse_by_lead.png", "mse_map.png", "forecast_week.png", "loss.png"]
    )
    assert all(p.stat().st_size > 1000 for p in ev.plots)

    # climatology and persistence against plain numpy on the same arrays
    store = open_store(store_path)
    sst = store.dataset["sst"].values.reshape(N_WEEKS, -1).astype(np.float64)
    cells = np.flatnonzero(store.mask.reshape(-1) == 1)  # land: ocean
    assert doc["n_cells_scored"] == cells.size
    n_train, first = store.n_train, store.n_train + WINDOW
    truth = sst[first : first + WINDOW, cells]  # (F, N)
    weeks = week_of_year(store.times)
    clim = np.stack([sst[:n_train][weeks[:n_train] == w][:, cells].mean(axis=0)
                     for w in range(52)])  # fmt: skip
    clim_f = clim[weeks[first : first + WINDOW]]
    clim_mse = np.mean((clim_f[N_INIT:] - truth[N_INIT:]) ** 2)
    pers_mse = np.mean((truth[N_INIT - 1][None] - truth[N_INIT:]) ** 2)
    assert doc["models"]["climatology"]["mse_norm"] == pytest.approx(clim_mse, rel=1e-6)
    assert doc["models"]["persistence"]["mse_norm"] == pytest.approx(pers_mse, rel=1e-12)
    std2 = store.std_degc**2
    assert doc["models"]["persistence"]["mse_degc"] == pytest.approx(pers_mse * std2, rel=1e-12)

    # the same again: byte-identical metrics.json
    first_bytes = (out / "metrics.json").read_bytes()
    EXPERIMENT.evaluate(
        settings_of(config), "smnn", store_path, trained["mi"][2], out, torch.device("cpu"),
        baseline_models={"adagvae": trained["vae"][2]},
    )  # fmt: skip
    assert (out / "metrics.json").read_bytes() == first_bytes


def test_evaluate_without_baseline_on_every_cell(trained, store_all, tmp_path):
    """land: all: every cell is forecast (the ocean ones reported apart); a forecast window
    shorter than the model's; a missing Ada-GVAE file leaves it out with a warning."""
    ev = EXPERIMENT.evaluate(
        make_settings(**{"evaluate.forecast_weeks": 20}), "smnn", store_all, trained["mi"][2],
        tmp_path / "e", torch.device("cpu"), baseline_models={"adagvae": tmp_path / "missing.pt"},
    )  # fmt: skip
    doc = ev.document
    assert set(doc["models"]) == {"mechanistic_identifier", "climatology", "persistence"}
    assert doc["left_out"] == ["adagvae"] and doc["cells"] == "all"
    assert doc["n_cells_scored"] == N_LAT * N_LON
    assert doc["n_ocean_cells_scored"] == int(open_store(store_all).mask.sum())
    assert any("Ada-GVAE left out" in line for line in ev.summary)
    for row in doc["models"].values():
        assert np.isfinite(row["mse_norm_ocean"]) and row["mse_norm_ocean"] != row["mse_norm"]
        assert len(row["mse_by_lead_norm"]) == 20 - N_INIT


def test_week_of_year_and_baseline_helpers():
    days = ["2021-01-01", "2021-01-08", "2021-12-17", "2021-12-24", "2021-12-31", "2020-12-30"]
    # the last day or two of a year (its 53rd week) count as its 52nd week (index 51)
    assert week_of_year(np.array(days, dtype="datetime64[D]")).tolist() == [0, 1, 50, 51, 51, 51]
    series = np.arange(12.0).reshape(6, 2)
    clim = seasonal_climatology(series, np.array([0, 1, 0, 1, 0, 1]))
    np.testing.assert_allclose(clim[0], [4.0, 5.0])
    np.testing.assert_allclose(clim[1], [6.0, 7.0])
    np.testing.assert_allclose(clim[5], series.mean(axis=0))  # absent week: overall mean
    p = persistence_forecast(np.array([[1.0, 2.0, 3.0, 4.0]]), 2)
    np.testing.assert_array_equal(p, [[1.0, 2.0, 2.0, 2.0]])


def test_resume_mid_epoch_redraws_the_same_windows(store_all, tmp_path):
    """Interrupted by SIGTERM inside an epoch and resumed, training ends with the same weights
    as without the interruption: the draws come from the checkpointed global generator."""
    import os
    import signal

    from smnn.training import TrainingInterrupted

    config = make_config(**{"train.epochs": 2, "train.windows_per_epoch": 64})
    cpu = torch.device("cpu")

    def run(directory, stop_at: int | None):
        seed_everything(3)
        task = EXPERIMENT.build_task(settings_of(config), "smnn", store_all, cpu)
        calls = [0]
        step = task.training_step

        def counted(indices):
            calls[0] += 1
            if calls[0] == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(indices)

        task.training_step = counted
        settings = TrainerSettings(checkpoint_dir=directory, seed=3, device=cpu, progress=False)
        trainer = Trainer(task, settings)
        with trainer:
            trainer.restore()
            trainer.attach_run(None)
            try:
                trainer.fit()
            except TrainingInterrupted:
                return None
        return task.model.state_dict()

    whole = run(tmp_path / "a", None)
    assert run(tmp_path / "b", 6) is None  # stopped in epoch 1 (4 steps per epoch)
    resumed = run(tmp_path / "b", None)
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k


def test_store_errors(store_all, tmp_path):
    from smnn.data.store import StoreError

    with pytest.raises(StoreError, match="preprocess_sst"):
        open_store(tmp_path / "missing.zarr")
    with pytest.raises(StoreError, match="test_weeks"):
        open_store(store_all, make_settings(**{"preprocess.test_weeks": 100}))
    with pytest.raises(StoreError, match="land"):
        EXPERIMENT.build_task(
            make_settings(**{"preprocess.land": "ocean"}), "smnn", store_all, torch.device("cpu")
        )
