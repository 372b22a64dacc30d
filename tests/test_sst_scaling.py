"""The per-solver step cost (smnn.experiments.step_cost) and the SST long-sequence study
(smnn.experiments.sst.scaling, ``smnn sst-scaling``): real models, real solvers, a real MLflow
SQLite store in a temporary directory."""

from __future__ import annotations

import copy
import math
import time
import warnings

import pandas as pd
import pytest
import torch
import yaml
from pipeline_support import CLI_CONFIG, merge

from smnn.benchmark.catalog import Shape, make_inputs
from smnn.config import Config
from smnn.experiments.sst.scaling import (
    COLUMNS,
    OUTPUT_FILES,
    ScalingSettings,
    identifier_training_step,
    log_scaling_run,
    paper_comparison,
    run_study,
    write_outputs,
)
from smnn.experiments.step_cost import StepCost, measure_case, measure_step
from smnn.memory import (
    DENSE_COPIES,
    dense_system_bytes,
    measure_peak_memory_profiler,
    memory_budget_bytes,
    solver_step_bytes,
)
from smnn.solver.mnn import mnn_dense
from smnn.tracking import job_tags, resolve_tracking

CPU = torch.device("cpu")

# a complete, tiny sst section (every key the settings read)
SST_SECTION = {
    "enabled": True,
    "solvers": ["smnn"],
    "baselines": [],
    "source": "synthetic",
    "files": {"sst": None, "mask": None},
    "download": {
        "sst_url": "https://downloads.psl.noaa.gov/Datasets/noaa.oisst.v2/sst.wkmean.1990-present.nc",
        "mask_url": "https://downloads.psl.noaa.gov/Datasets/noaa.oisst.v2/lsmask.nc",
        "sst_sha256": None, "mask_sha256": None, "retries": 2, "timeout": 10,
    },
    "synthetic": {"n_weeks": 120, "n_lat": 4, "n_lon": 8, "encoding": "netcdf4"},
    "preprocess": {"land": "all", "test_weeks": 40, "chunk_lat": 2, "chunk_lon": 4,
                   "scheduler": "threads", "address": None},
    "model": {
        "window": 16, "n_dct": 4, "encoder_hidden": 8, "encoder_layers": 1, "latents": 4,
        "shared_latents": 2, "decoder_hidden": 8, "n_init": 3, "neighbour_offsets": [-2, 2],
    },
    "train": {
        "epochs": 1, "batch_size": 4, "lr": 1.0e-3, "alignment_weight": 10.0, "beta": 1.0,
        "dtype": "float32", "windows_per_epoch": None,
    },
    "evaluate": {"encode_weeks": 16, "forecast_weeks": 16, "sample_cells": 1},
    "scaling": {
        "enabled": True, "lengths": [16, 32], "batch_size": 8,
        "solvers": ["smnn", "mnn_dense", "mnn_cg"], "repeats": 2, "memory_budget_gb": None,
    },
}  # fmt: skip


def _config(tmp_path=None, **scaling) -> Config:
    section = copy.deepcopy(SST_SECTION)
    section["scaling"].update(scaling)
    data = {"device": "cpu", "seed": 0, "threads": 1, "sst": section}
    if tmp_path is not None:
        data["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
        data["mlflow"] = {"tracking_uri": None, "artifact_location": None}
    return Config(data, source="test")


# ------------------------------------------------------------------ the dense prediction


def test_dense_prediction_is_the_dense_system_mnn_dense_builds():
    """mnn_dense's torch allocations in a forward+backward step peak at two dense systems (the
    normal matrix and its Cholesky factor); the prediction is three, so it covers the measured
    peak and is within a factor 1.5 of it."""
    B, T, R = 4, 60, 3
    system = dense_system_bytes(B, T, 1, R, torch.float64)
    assert system == B * (1 + T * R) ** 2 * 8
    assert solver_step_bytes("mnn_dense", B, T, 1, R, torch.float64) == DENSE_COPIES * system
    inputs = make_inputs(Shape("t", "t", B, T, 1, R), torch.float64, CPU)

    def step():
        (mnn_dense(*inputs) ** 2).sum().backward()

    step()
    _, peak = measure_peak_memory_profiler(step)
    assert 1.9 * system <= peak <= 2.3 * system, peak / system
    predicted = solver_step_bytes("mnn_dense", B, T, 1, R, torch.float64)
    assert peak <= predicted <= 1.5 * peak


def test_dense_prediction_is_monotone_and_checks_its_arguments():
    lengths = [4, 16, 52, 104, 208, 416, 1727]
    values = [solver_step_bytes("mnn_dense", 64, t, 1, 3, torch.float32) for t in lengths]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert solver_step_bytes("mnn_dense", 128, 208, 1, 3, torch.float32) == 2 * values[4]
    assert solver_step_bytes("mnn_dense", 64, 208, 1, 3, torch.float64) == 2 * values[4]
    with pytest.raises(ValueError, match="n_steps"):
        solver_step_bytes("mnn_dense", 4, 1, 1, 3, torch.float32)
    assert memory_budget_bytes(CPU, 2.5) == 2_500_000_000
    assert memory_budget_bytes(CPU) > 0
    with pytest.raises(ValueError, match="memory budget"):
        memory_budget_bytes(CPU, -1.0)


# ------------------------------------------------------------------ step cost


def test_step_cost_is_the_median_of_the_timed_repeats():
    """Warm-up and memory steps first (untimed), then the timed repeats: 30, 10, 20 ms."""
    durations = iter([0.0, 0.0, 0.030, 0.010, 0.020])

    def step():
        time.sleep(next(durations))
        warnings.warn("tiny warning", UserWarning, stacklevel=1)

    cost = measure_step(step, CPU, repeats=3)
    assert cost.status == "ok" and cost.repeats == 3
    assert 20.0 <= cost.time_ms < 28.0
    assert 10.0 <= cost.min_ms < 18.0
    assert math.isfinite(cost.peak_mb) and cost.peak_mb >= 0
    assert "UserWarning x5: tiny warning" in cost.note
    # a fast step is repeated until the timed steps add up to min_timed_s
    fast = measure_step(lambda: time.sleep(0.01), CPU, repeats=2, min_timed_s=0.05)
    assert 5 <= fast.repeats <= 6 and 10.0 <= fast.time_ms < 18.0


def test_step_cost_statuses():
    slow = measure_step(lambda: time.sleep(0.08), CPU, repeats=2, time_budget_s=0.01)
    assert slow.status == "skipped_slow" and slow.warmup_ms >= 80 and "time budget" in slow.note
    # over the budget but not over five: measured from two timed steps
    over = measure_step(lambda: time.sleep(0.05), CPU, repeats=3, time_budget_s=0.03)
    assert over.status == "ok" and over.repeats == 2 and over.time_ms >= 50
    assert "two timed steps" in over.note
    # one stray slow step (the memory-measured one) over the budget: measured as usual
    stray = iter([0.0, 0.05])
    spiky = measure_step(lambda: time.sleep(next(stray, 0.0)), CPU, repeats=3, time_budget_s=0.03)
    assert spiky.repeats == 3 and spiky.time_ms < 30 and spiky.note == ""

    built = []

    def make():
        built.append(True)
        return lambda: None

    oom = measure_case(make, CPU, predicted_bytes=2 * 10**9, budget_bytes=10**9)
    assert oom.status == "out_of_memory" and not built and oom.predicted_mb == 2000.0

    def broken():
        raise FloatingPointError("loss is nan")

    failed = measure_case(lambda: broken, CPU)
    assert failed.status == "failed" and "FloatingPointError: loss is nan" in failed.note
    with pytest.raises(ValueError, match="status"):
        StepCost("done")


# ------------------------------------------------------------------ the study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study (lengths 16 and 32, 8 systems, 2 repeats) with a memory budget between
    MNN dense's predictions at 16 and 32 weeks, its outputs and one MLflow run."""
    root = tmp_path_factory.mktemp("sst_scaling")
    budget_gb = (
        0.5
        * (
            solver_step_bytes("mnn_dense", 8, 16, 1, 3, torch.float32)
            + solver_step_bytes("mnn_dense", 8, 32, 1, 3, torch.float32)
        )
        / 1e9
    )
    config = _config(root, memory_budget_gb=budget_gb)
    settings = ScalingSettings.from_config(config, time_budget_s=60.0)
    built: list[tuple[str, int]] = []

    def make_step(solver, length, s, device):
        built.append((solver, length))
        return identifier_training_step(solver, length, s, device)

    lines: list[str] = []
    table = run_study(settings, CPU, make_step=make_step, progress=lines.append)
    out = root / "out"
    env = {"torch": torch.__version__}
    comparison = write_outputs(table, out, settings, env)
    target = resolve_tracking(config, environ={})
    tags = job_tags("sst_scaling", "sst_scaling", None, device="cpu")
    run_id = log_scaling_run(target, out, table, comparison, settings, env, tags=tags,
                             config_data=config.data)  # fmt: skip
    return {"table": table, "out": out, "built": built, "lines": lines, "target": target,
            "run_id": run_id, "comparison": comparison}  # fmt: skip


def test_study_table_and_csv(study):
    table, out = study["table"], study["out"]
    csv = pd.read_csv(out / "scaling.csv")
    assert list(csv.columns[: len(COLUMNS)]) == COLUMNS
    assert [(int(r.length), r.solver) for r in csv.itertuples()] == [
        (t, s) for t in (16, 32) for s in ("smnn", "mnn_dense", "mnn_cg")
    ]
    ok = csv[csv["status"] == "ok"]
    assert len(ok) == 5
    for column in ("time_ms", "min_ms", "peak_mb"):
        assert ok[column].map(math.isfinite).all() and (ok[column] >= 0).all()
    assert (ok["time_ms"] > 0).all() and (ok["repeats"] >= 2).all()
    assert set(csv["device"]) == {"cpu"} and set(csv["dtype"]) == {"float32"}
    assert (csv["threads"] >= 1).all() and (csv["batch_size"] == 8).all()
    # MNN dense at 32 weeks: predicted above the budget, marked and never built
    oom = csv[csv["status"] == "out_of_memory"]
    assert [(int(r.length), r.solver) for r in oom.itertuples()] == [(32, "mnn_dense")]
    assert float(oom["predicted_mb"].iloc[0]) > float(csv["memory_budget_mb"].iloc[0])
    assert ("mnn_dense", 32) not in study["built"] and ("mnn_dense", 16) in study["built"]
    dense16 = csv[(csv["solver"] == "mnn_dense") & (csv["length"] == 16)]
    assert float(dense16["predicted_mb"].iloc[0]) < float(csv["memory_budget_mb"].iloc[0])
    assert len(study["lines"]) == 6 and "mnn_dense T=32: out_of_memory" in study["lines"][4]
    assert len(table) == 6


def test_study_outputs_and_comparison(study):
    out, comparison = study["out"], study["comparison"]
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "scaling.md").read_text()
    assert "| 32 | mnn_dense | out_of_memory |" in text
    assert "4.9x" in text  # the paper's speed-up beside ours
    # 208 weeks is not in the tiny study: no ratio there, and the table says why
    assert math.isnan(comparison["time_ratio"]) and "not in the study" in comparison["reason"]
    at16 = paper_comparison(study["table"], length=16)
    assert at16["speedup"] == pytest.approx(1 / at16["time_ratio"])
    # (RSS pages: a tiny smnn step may reuse resident memory and measure 0 MB)
    assert at16["memory_ratio"] >= 0 and at16["dense_limit"] == 16


def test_study_mlflow_run(study):
    from mlflow import MlflowClient

    client = MlflowClient(study["target"].tracking_uri)
    run = client.get_run(study["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "sst"
    assert (
        run.data.tags["smnn.rule"] == "sst_scaling" and run.data.tags["smnn.job"] == "sst_scaling"
    )
    metrics = run.data.metrics
    for solver in ("smnn", "mnn_cg"):
        for length in (16, 32):
            assert metrics[f"time_ms_{solver}_T{length}"] > 0
            assert metrics[f"peak_mb_{solver}_T{length}"] >= 0
    assert "time_ms_mnn_dense_T32" not in metrics
    assert metrics["predicted_mb_mnn_dense_T32"] > 0
    assert metrics["n_out_of_memory"] == 1 and metrics["n_ok"] == 5
    assert metrics["paper_speedup_smnn_vs_mnn_dense_T208"] == 4.9
    assert run.data.params["scaling.lengths"] == "[16, 32]"
    assert run.data.params["sst.scaling.batch_size"] == "8"
    artifacts = {a.path for a in client.list_artifacts(study["run_id"])}
    assert set(OUTPUT_FILES) <= artifacts


def test_slow_solver_skips_its_longer_lengths():
    settings = ScalingSettings.from_config(
        _config(lengths=[16, 32, 48], solvers=["smnn"]), time_budget_s=0.01
    )

    def make_step(solver, length, s, device):
        return lambda: time.sleep(0.02)

    table = run_study(settings, CPU, make_step=make_step, progress=None)
    assert list(table["status"]) == ["ok", "skipped_slow", "skipped_slow"]
    assert table["repeats"].iloc[0] == 2 and "two timed steps" in table["note"].iloc[0]
    assert "a step at T=16 took" in table["note"].iloc[1]


def test_banded_and_cg_cases_over_the_budget_are_out_of_memory_too():
    """Issue 18: not only MNN dense is refused before it allocates; S-MNN and MNN CG cases whose
    predicted peak (smnn.memory.solver_step_bytes) exceeds the budget are out_of_memory."""

    per = {s: [solver_step_bytes(s, 8, t, 1, 3, torch.float32) for t in (16, 64)]
           for s in ("smnn", "mnn_cg")}  # fmt: skip
    budget = max(v[0] for v in per.values()) + 1
    assert all(v[1] > budget for v in per.values())
    settings = ScalingSettings.from_config(
        _config(lengths=[16, 64], solvers=["smnn", "mnn_cg"], memory_budget_gb=budget / 1e9),
        time_budget_s=60.0,
    )
    built: list[tuple[str, int, int]] = []

    def make_step(solver, length, s, device):
        built.append((solver, length, s.batch_size))
        return lambda: None

    table = run_study(settings, CPU, make_step=make_step, progress=None)
    assert list(table["status"]) == ["ok", "ok", "out_of_memory", "out_of_memory"]
    assert all(length == 16 for _, length, _ in built)  # the T=64 cases never built
    assert (table["predicted_mb"] > 0).all()


def test_settings_errors():
    with pytest.raises(ValueError, match="even"):
        ScalingSettings.from_config(_config(batch_size=7))
    with pytest.raises(ValueError, match="lengths must be integers >= 4"):
        ScalingSettings.from_config(_config(lengths=[3, 16]))
    with pytest.raises(ValueError, match="solver"):
        ScalingSettings.from_config(_config(solvers=["smnn", "nope"]))
    quick = ScalingSettings.from_config(_config(), quick=True)
    assert quick.repeats == 1 and quick.time_budget_s < 2.0


# ------------------------------------------------------------------ the command


def test_command_end_to_end(tmp_path, capsys):
    """``smnn sst-scaling`` as the rule runs it, through the CLI's parser in this process."""
    from smnn.cli import main

    section = copy.deepcopy(SST_SECTION)
    section["scaling"].update(lengths=[16], solvers=["smnn", "mnn_dense"], repeats=1)
    cfg = merge(CLI_CONFIG, {"sst": section})
    cfg["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "results" / "sst" / "scaling"
    threads = torch.get_num_threads()
    try:  # the MLflow run is checked in test_study_mlflow_run
        code = main(["sst-scaling", "--config", str(config), "--out", str(out),
                     "--rule", "sst_scaling", "--no-mlflow"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "[sst-scaling 2/2" in captured.err
    assert str(out / "scaling.csv") in captured.out and "MLflow run" not in captured.out
    assert len(pd.read_csv(out / "scaling.csv")) == 2
    assert main(["sst-scaling", "--config", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
