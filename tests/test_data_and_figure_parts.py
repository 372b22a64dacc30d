"""Shared parts of the SST and KdV stages, tested directly: the Dask scheduler choice
(smnn.data.dask_scheduler), the SST data commands' module (smnn.experiments.sst.commands) and
the figure modules (smnn.experiments.forecast_figures, sst.figures, kdv.figures)."""

from __future__ import annotations

import argparse
import resource
import sys

import dask
import dask.array as da
import numpy as np
import pytest

from smnn.config import ConfigError
from smnn.data.dask_scheduler import check_scheduler, dask_scheduler
from smnn.experiments import forecast_figures
from smnn.experiments.kdv import figures as kdv_figures
from smnn.experiments.sst import commands as sst_data
from smnn.experiments.sst import figures as sst_figures
from smnn.jobs import peak_rss_mb

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ dask_scheduler


def test_check_scheduler_names_the_keys():
    check_scheduler("threads", None, "kdv.generate")  # fine
    with pytest.raises(ConfigError, match=r"kdv\.generate\.scheduler must be one of"):
        check_scheduler("mpi", None, "kdv.generate")
    with pytest.raises(ConfigError, match=r"sst\.preprocess\.address is null"):
        check_scheduler("address", None, "sst.preprocess", source="c.yaml")


def test_threads_scheduler_computes_the_same_as_numpy():
    x = np.arange(10_000, dtype=np.float64).reshape(100, 100)
    with dask_scheduler("threads", 2) as name:
        assert isinstance(name, str) and name
        total = float(da.from_array(x, chunks=(10, 100)).sum().compute())
    assert total == float(x.sum())
    # the block leaves no scheduler behind
    assert dask.config.get("scheduler", None) in (None, "threads", "sync", "synchronous")


def test_unreachable_address_is_a_config_error():
    with pytest.raises(ConfigError, match="127.0.0.1:9"):
        with dask_scheduler("address", 1, "tcp://127.0.0.1:9", connect_timeout=2, key="x"):
            pass


# ------------------------------------------------------------------ sst_data (commands)


def test_sst_data_registers_its_commands_and_peak_rss_is_the_processes():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sst_data.add_parser(sub)
    args = parser.parse_args(["preprocess-sst", "--config", "c.yaml", "--out", "s.zarr"])
    assert args.func is sst_data.run_preprocess
    args = parser.parse_args(["synthesize-sst", "--config", "c.yaml", "--threads", "2"])
    assert args.func is sst_data.run_synthesize and args.threads == 2
    args = parser.parse_args(["download-sst", "--config", "c.yaml"])
    assert args.func is sst_data.run_download and args.threads is None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = peak / 1024.0 if sys.platform != "darwin" else peak / 2**20
    assert peak_rss_mb() >= expected * 0.99 and peak_rss_mb() > 10


def test_sst_data_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [not, an, int]\n")
    parser = argparse.ArgumentParser()
    sst_data.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synthesize-sst", "--config", str(bad)])
    assert args.func(args) == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------ figures


def test_forecast_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(3, 20))
    out = forecast_figures.plot_forecast_samples(
        rng.normal(size=(3, 8)), truth, {"model": truth + 0.1, "persistence": truth * 0},
        4, tmp_path / "samples.png", labels=["a", "b", "c"],
    )  # fmt: skip
    assert out.read_bytes()[:8] == PNG
    lead = forecast_figures.plot_error_by_lead(
        {"model": np.linspace(0.1, 1, 16), "persistence": np.ones(16)},
        tmp_path / "lead.png", log=True,
    )  # fmt: skip
    assert lead.read_bytes()[:8] == PNG


def test_sst_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(1)
    lat, lon = np.linspace(85, -85, 6), np.linspace(5, 355, 12)
    mask = (rng.random((6, 12)) > 0.3).astype(np.int8)
    maps = {"model": rng.random((6, 12)), "climatology": rng.random((6, 12))}
    assert sst_figures.plot_error_maps(lat, lon, maps, mask, tmp_path / "m.png").is_file()
    week = sst_figures.plot_forecast_week(
        lat, lon, rng.normal(size=(6, 12)), rng.normal(size=(6, 12)), mask, tmp_path / "w.png"
    )
    assert week.read_bytes()[:8] == PNG
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(3)]
    curves = {"mi": (history, [1.0, 0.5, 0.3])}
    losses = sst_figures.plot_training_losses(curves, tmp_path / "l.png")
    assert losses.read_bytes()[:8] == PNG


def test_kdv_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(2, 30, 16))
    x = np.tile(np.linspace(0, 120, 16, endpoint=False), (2, 1))
    t = np.tile(np.linspace(20, 50, 30), (2, 1))
    out = kdv_figures.plot_spacetime(truth, truth + 0.01, x, t, 10, tmp_path / "st.png")
    assert out.read_bytes()[:8] == PNG
    fig = kdv_figures.spacetime_figure(truth, truth + 0.01, x, t, 10)
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bars == ["u", "u", "u error"] * 2  # every colour bar says what it shows
    history = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "valid_loss": 1.2 / (e + 1), "lr": 1e-3}
        for e in range(4)
    ]
    assert kdv_figures.plot_training_curves(history, tmp_path / "c.png").read_bytes()[:8] == PNG
