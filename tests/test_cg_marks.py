"""Non-convergence of the MNN CG baseline is marked wherever its numbers appear (issue 18, Build
item 6): the shared label, the Lorenz evaluation (metrics.json, summary, figures), the SST
scaling study (CSV, Markdown, figure) and the benchmark (bench.md, figures). Each runs the real
code on tiny inputs where CG stops at its 200-iteration cap, and checks that S-MNN rows carry no
mark."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pandas as pd
import pytest
import torch
from PIL import Image
from pipeline_support import run_smnn, train_args, write_config

from smnn.benchmark.catalog import Shape
from smnn.benchmark.figures import accuracy_figure, scaling_figure
from smnn.benchmark.report import markdown_report, method_label
from smnn.benchmark.run import run_benchmark
from smnn.config import Config
from smnn.experiments.sst.scaling import (
    ScalingSettings,
    paper_comparison,
    run_study,
    scaling_metrics,
    write_outputs,
)
from smnn.experiments.sst.scaling import scaling_figure as sst_scaling_figure
from smnn.solver.mnn import (
    NOT_CONVERGED,
    ConvergenceRecord,
    MNNConvergenceWarning,
    converged_flag,
    convergence_label,
    record_convergence,
)

CPU = torch.device("cpu")
MARK = f"({NOT_CONVERGED})"
CG_MARKED = f"mnn_cg {MARK}"


def _legend_labels(fig) -> list[str]:
    return [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]


# ------------------------------------------------------------------ the shared label


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        (False, False), (True, True), (0.0, False), (1.0, True), (math.nan, None), (None, None),
        ("False", False), ("true", True), ("", None), (torch.tensor(False).numpy(), False),
    ],
)  # fmt: skip
def test_converged_flag_reads_every_recorded_form(value, flag):
    assert converged_flag(value) is flag


@pytest.mark.parametrize("value", ["maybe", 0.5, object()])
def test_converged_flag_refuses_other_values(value):
    with pytest.raises(ValueError, match="not a convergence flag"):
        converged_flag(value)


def test_label_marks_only_non_convergence():
    assert convergence_label("mnn_cg", False) == CG_MARKED
    assert convergence_label("mnn_cg", 0.0) == CG_MARKED
    assert convergence_label("mnn_cg", True) == "mnn_cg"
    assert convergence_label("smnn", None) == "smnn"


def test_merged_metrics_never_hide_an_earlier_failure():
    """An evaluation that solved nothing (record empty) keeps the training's 'not converged'."""
    empty = ConvergenceRecord()
    training = {"cg_converged": 0.0, "cg_unconverged_solves": 12.0,
                "cg_worst_relative_residual": 0.3}  # fmt: skip
    assert empty.merged_metrics(training) == training
    assert empty.merged_metrics({}) == empty.as_metrics()
    failed = ConvergenceRecord()
    failed.add(MNNConvergenceWarning("x", "forward", 2, 4, 0.5, 200, 1e-12))
    merged = failed.merged_metrics({"cg_converged": 1.0, "cg_unconverged_solves": 0.0})
    assert merged == {"cg_converged": 0.0, "cg_unconverged_solves": 1.0,
                      "cg_worst_relative_residual": 0.5}  # fmt: skip


def test_record_convergence_into_one_record_across_blocks():
    record = ConvergenceRecord()
    for _ in range(3):
        with record_convergence(into=record) as same:
            assert same is record
            w = MNNConvergenceWarning("w", "backward", 1, 2, 0.1, 200, 1e-12)
            warnings.warn(w, stacklevel=1)
    assert record.solves == 3 and record.by_pass == {"backward": 3} and not record.converged


# ------------------------------------------------------------------ the benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """smnn and mnn_cg at T = 8 and 64 (CG stops at its cap at 64, as the issue found)."""
    out = tmp_path_factory.mktemp("bench_cg")
    shapes = [Shape("T8", "T_sweep", 2, 8, 1, 3), Shape("T64", "T_sweep", 2, 64, 1, 3)]
    table = run_benchmark(out, ("smnn", "mnn_cg"), ("float64",), shapes, repeats=1,
                          progress=False)  # fmt: skip
    return out, table


def test_benchmark_marks_mnn_cg_in_csv_report_and_figures(bench):
    out, table = bench
    csv = pd.read_csv(out / "bench.csv")
    cg = csv[csv["method"] == "mnn_cg"].set_index("case")
    assert converged_flag(cg.loc["T64", "converged"]) is False, cg
    assert csv[csv["method"] == "smnn"]["converged"].isna().all()

    report = (out / "bench.md").read_text()
    assert f"{CG_MARKED} float64" in report  # the column header
    rows = [line for line in report.splitlines() if line.startswith("| T64 |")]
    assert rows and all(MARK in line for line in rows), rows
    # the S-MNN header and the S-MNN cells carry no mark
    header = next(line for line in report.splitlines() if line.startswith("| case | B | T |"))
    assert "| smnn float64 |" in header
    assert markdown_report(table[table["method"] == "smnn"]).count(NOT_CONVERGED) == 0

    assert method_label(table, "mnn_cg") == CG_MARKED
    assert method_label(table, "smnn") == "smnn"
    from smnn.benchmark.mlflow_run import benchmark_metrics

    metrics = benchmark_metrics(table, None)  # what the benchmark's MLflow run logs
    assert metrics["converged.mnn_cg.float64.T64"] == 0.0
    assert not any(k.startswith("converged.smnn.") for k in metrics)  # a direct solver
    labels = _legend_labels(scaling_figure(table, "T_sweep", "T"))
    assert f"{CG_MARKED} float64" in labels and "smnn float64" in labels
    labels = _legend_labels(accuracy_figure(table))
    assert "smnn float64" in labels and not any(NOT_CONVERGED in x for x in labels if "smnn " in x)
    # the written figure says so too (its legend is in the image; its title names no method)
    assert (out / "scaling_T.png").stat().st_size > 10_000


def test_benchmark_without_a_failure_has_no_mark(bench):
    _, table = bench
    converged_rows = table[(table["method"] == "mnn_cg") & (table["case"] == "T8")].copy()
    if converged_flag(converged_rows["converged"].iloc[0]) is False:
        pytest.skip("CG did not converge at T = 8 either on this machine")
    part = table[table["case"] == "T8"]
    assert method_label(part, "mnn_cg") == "mnn_cg"
    assert NOT_CONVERGED not in markdown_report(part)


# ------------------------------------------------------------------ the SST scaling study

SST = {
    "enabled": True, "solvers": ["smnn"], "baselines": [], "source": "synthetic",
    "files": {"sst": None, "mask": None},
    "download": {"sst_url": "http://127.0.0.1:9/a.nc", "mask_url": "http://127.0.0.1:9/b.nc",
                 "sst_sha256": None, "mask_sha256": None, "retries": 1, "timeout": 5},
    "synthetic": {"n_weeks": 120, "n_lat": 4, "n_lon": 8, "encoding": "netcdf4"},
    "preprocess": {"land": "all", "test_weeks": 40, "chunk_lat": 2, "chunk_lon": 4,
                   "scheduler": "threads", "address": None},
    "model": {"window": 16, "n_dct": 4, "encoder_hidden": 8, "encoder_layers": 1, "latents": 4,
              "shared_latents": 2, "decoder_hidden": 8, "n_init": 3,
              "neighbour_offsets": [-2, 2]},
    "train": {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "alignment_weight": 10.0,
              "beta": 1.0, "dtype": "float32", "windows_per_epoch": None},
    "evaluate": {"encode_weeks": 16, "forecast_weeks": 16, "sample_cells": 1},
    "scaling": {"enabled": True, "lengths": [64], "batch_size": 2,
                "solvers": ["smnn", "mnn_cg"], "repeats": 1, "memory_budget_gb": None},
}  # fmt: skip


def test_sst_scaling_marks_mnn_cg_in_csv_markdown_and_figure(tmp_path):
    config = Config({"device": "cpu", "seed": 0, "threads": 1, "sst": copy.deepcopy(SST)},
                    source="test")  # fmt: skip
    settings = ScalingSettings.from_config(config, time_budget_s=60.0)
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", MNNConvergenceWarning)  # none may escape the study
        table = run_study(settings, CPU, progress=lines.append)
    write_outputs(table, tmp_path, settings, {"torch": torch.__version__})

    csv = pd.read_csv(tmp_path / "scaling.csv")
    assert "converged" in csv.columns
    by_solver = csv.set_index("solver")
    assert by_solver.loc["mnn_cg", "status"] == "ok"
    assert converged_flag(by_solver.loc["mnn_cg", "converged"]) is False
    assert "did NOT converge" in by_solver.loc["mnn_cg", "note"]
    assert converged_flag(by_solver.loc["smnn", "converged"]) is None  # a direct solver

    md = (tmp_path / "scaling.md").read_text()
    assert f"| 64 | {CG_MARKED} | ok |" in md
    assert "| 64 | smnn | ok |" in md
    cg_line = next(line for line in lines if " mnn_cg" in line)
    assert CG_MARKED in cg_line
    assert NOT_CONVERGED not in next(line for line in lines if "] smnn " in line)

    labels = _legend_labels(sst_scaling_figure(table))
    assert labels.count(f"MNN CG {MARK}") == 2, labels  # the time and the memory panel
    assert labels.count("S-MNN") == 2 and sum(MARK in x for x in labels) == 2, labels
    assert Image.open(tmp_path / "scaling.png").format == "PNG"
    metrics = scaling_metrics(table, paper_comparison(table))  # the MLflow run's metrics
    assert metrics["converged_mnn_cg_T64"] == 0.0 and "converged_smnn_T64" not in metrics


# ------------------------------------------------------------------ the Lorenz evaluation

LORENZ = {
    "lorenz": {
        "data": {"n_points": 2050},
        "model": {"hidden": 16, "latent": 4},
        "train": {"cycles": 1, "epochs_per_cycle": 1, "batch_size": 16, "max_windows": 16},
        "evaluate": {"simulate_points": 100},
    }
}


@pytest.mark.slow
def test_lorenz_evaluation_marks_a_model_trained_with_unconverged_cg(tmp_path):
    config = write_config(tmp_path, LORENZ)
    data = tmp_path / "data" / "lorenz.zarr"
    proc = run_smnn("generate-lorenz", "--config", config, "--out", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {}
    for solver in ("mnn_cg", "smnn"):
        out = tmp_path / "results" / solver
        proc = run_smnn(*train_args(config, data, out, solver), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        train = json.loads((out / "train_metrics.json").read_text())
        proc = run_smnn(
            "evaluate", "--experiment", "lorenz", "--solver", solver, "--config", config,
            "--data", data, "--model", out / "model.pt", "--out", out / "eval",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        doc = json.loads((out / "eval" / "metrics.json").read_text())
        plots = sorted((out / "eval" / "plots").glob("*.png"))
        titles = {p.stem: Image.open(p).info.get("Title", "") for p in plots}
        docs[solver] = (train, doc, proc.stdout + proc.stderr, titles)

    train, doc, output, titles = docs["mnn_cg"]
    assert train["final_metrics"]["cg_converged"] == 0.0
    assert doc["converged"] is False
    # the training's record survives the evaluation (which itself solves nothing)
    assert doc["metrics"]["cg_converged"] == 0.0 and doc["cg_converged"] == 0.0
    assert doc["metrics"]["cg_unconverged_solves"] > 0
    assert f"solver {CG_MARKED}: recovered equations:" in output
    assert len(titles) == 4 and all(t == f"solver {CG_MARKED}" for t in titles.values()), titles

    _, doc, output, titles = docs["smnn"]
    assert "converged" not in doc and "cg_converged" not in doc["metrics"]
    assert NOT_CONVERGED not in output
    assert len(titles) == 4 and all(t == "solver smnn" for t in titles.values()), titles


@pytest.mark.slow
def test_pipeline_closing_summary_marks_mnn_cg(tmp_path):
    """The workflow's closing summary names the Lorenz result of mnn_cg ``mnn_cg (not
    converged)``, from the evaluation's metrics.json."""
    from pipeline_support import (
        failure_report,
        make_workdir,
        merge,
        run_snakemake,
        tiny_config,
        write_yaml,
    )

    work = make_workdir(tmp_path / "work")
    off = {"enabled": False}
    lorenz = merge(LORENZ["lorenz"], {"solvers": ["mnn_cg"]})
    config = write_yaml(
        work / "cg.yaml",
        merge(tiny_config(), {"standalone": off, "benchmark": off, "sst": off, "kdv": off,
                              "lorenz": lorenz}),
    )  # fmt: skip
    run = run_snakemake(work, ["--cores", "2", "--configfile", str(config)], timeout=1200)
    assert run.proc.returncode == 0, failure_report(work, run)
    doc = json.loads((work / "results/lorenz/mnn_cg/eval/metrics.json").read_text())
    assert doc["converged"] is False
    assert f"lorenz ({CG_MARKED}):" in run.output, run.output[-3000:]
