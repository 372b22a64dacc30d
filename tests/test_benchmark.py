"""`smnn bench` on tiny grids: outputs, skipped dense rows, time budget, MLflow, bad arguments.

Timings are never asserted against numbers (they depend on the machine), only that they exist,
are finite and positive, and that the files agree with each other.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from matplotlib.image import imread

from smnn.benchmark import (
    DEFAULT_METHODS,
    METHODS,
    NAMED_SHAPES,
    QUICK_MAX_ELEMENTS,
    REFERENCE_MS,
    Shape,
    batch_sweep,
    default_grid,
    dense_matrix_bytes,
    make_inputs,
    markdown_report,
    run_benchmark,
    t_sweep,
)
from smnn.cli import main

TINY = [
    Shape("tiny", "named", 3, 12, 2, 3),
    *t_sweep(exponents=[3, 4], B=2),
    *batch_sweep(exponents=[0, 1], T=8),
]
OUTPUTS = ("bench.csv", "bench.md", "scaling_T.png", "scaling_batch.png")


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    table = run_benchmark(
        out, DEFAULT_METHODS, ("float64", "float32"), TINY, repeats=2, progress=False
    )
    return out, table


def test_tiny_grid_outputs(tiny_run):
    out, table = tiny_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0
    csv = pd.read_csv(out / "bench.csv")
    assert len(csv) == len(TINY) * 2 * len(DEFAULT_METHODS)
    for col in ("method", "dtype", "case", "B", "T", "D", "R", "median_ms", "min_ms",
                "peak_mb", "status", "note"):
        assert col in csv.columns
    assert (csv["status"] == "ok").all(), csv[csv["status"] != "ok"][["method", "case", "note"]]
    assert (csv["median_ms"] > 0).all() and csv["median_ms"].map(math.isfinite).all()
    assert (csv["min_ms"] > 0).all() and (csv["min_ms"] <= csv["median_ms"]).all()
    assert (csv["peak_mb"] >= 0).all() and csv["peak_mb"].map(math.isfinite).all()
    assert (csv["repeats"] == 2).all()
    # the shape columns hold the shape that was run
    tiny = csv[csv["case"] == "tiny"]
    assert set(tiny["B"]) == {3} and set(tiny["T"]) == {12} and set(tiny["D"]) == {2}
    # MNN CG records convergence, the direct methods do not
    cg = csv[csv["method"] == "mnn_cg"]
    assert cg["converged"].notna().all()
    assert csv[csv["method"] == "smnn"]["converged"].isna().all()
    # csv and returned table agree
    pd.testing.assert_series_equal(
        csv["median_ms"].reset_index(drop=True), table["median_ms"].reset_index(drop=True)
    )
    md = (out / "bench.md").read_text()
    for case in ("tiny", "T8", "T16", "B1", "B2"):
        assert f"| {case} |" in md
    assert "smnn float64" in md and "mnn_cg float32" in md
    for name in ("scaling_T.png", "scaling_batch.png"):
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[1] > 600


def test_dense_rows_skipped_when_limit_is_tiny(tmp_path):
    table = run_benchmark(
        tmp_path, ("smnn", "mnn_dense"), ("float64",), TINY[:2], repeats=1,
        max_dense_bytes=1000, progress=False,
    )
    dense = table[table["method"] == "mnn_dense"]
    assert len(dense) == 2
    assert (dense["status"] == "skipped").all()
    assert dense["note"].str.contains("max-dense-bytes").all()
    assert dense["median_ms"].isna().all()
    assert (table[table["method"] == "smnn"]["status"] == "ok").all()
    csv = pd.read_csv(tmp_path / "bench.csv")
    assert (csv[csv["method"] == "mnn_dense"]["status"] == "skipped").all()
    assert "skipped" in (tmp_path / "bench.md").read_text()


def test_dense_limit_is_the_documented_estimate(tmp_path):
    """A limit exactly at the estimate runs the case; one byte less skips it."""
    shape = TINY[1]
    need = dense_matrix_bytes(shape, make_inputs(shape, *_cpu64())[0].dtype)
    at = run_benchmark(tmp_path / "a", ("mnn_dense",), ("float64",), [shape], repeats=1,
                       max_dense_bytes=need, progress=False)
    below = run_benchmark(tmp_path / "b", ("mnn_dense",), ("float64",), [shape], repeats=1,
                          max_dense_bytes=need - 1, progress=False)
    assert at["status"].tolist() == ["ok"]
    assert below["status"].tolist() == ["skipped"]


def _cpu64():
    import torch

    return torch.float64, torch.device("cpu")


def test_time_budget_skips_larger_sweep_cases(tmp_path):
    shapes = t_sweep(exponents=[3, 4, 5], B=1)
    table = run_benchmark(
        tmp_path, ("smnn",), ("float64",), shapes, repeats=1, time_budget_s=0.0, progress=False
    )
    assert table["status"].tolist() == ["ok", "skipped", "skipped"]
    assert table["note"].iloc[1].startswith(f"skipped: T8 ({shapes[0].unknowns} unknowns) took")


def test_cases_run_smallest_first_and_are_listed_in_grid_order(tmp_path):
    shapes = t_sweep(exponents=[3, 5], B=1)[::-1]  # T32 listed before T8
    table = run_benchmark(tmp_path, ("smnn",), ("float64",), shapes, repeats=1,
                          time_budget_s=0.0, progress=False)
    assert table["case"].tolist() == ["T32", "T8"]
    assert table["status"].tolist() == ["skipped", "ok"]
    assert "T8" in table["note"].iloc[0] and "time budget" in table["note"].iloc[0]


def test_inputs_require_grad_and_gradients_reach_them():
    c, b, u0, h = make_inputs(Shape("x", "named", 2, 6, 2, 3), *_cpu64())
    assert c.shape == (2, 6, 2, 2, 3) and b.shape == (2, 6, 2)
    assert u0.shape == (2, 1, 2, 1) and h.shape == (2, 5)
    u, _ = METHODS["smnn"].solve(c, b, u0, h)
    (u**2).sum().backward()
    for x in (c, b, u0, h):
        assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_quick_grid_is_scaled_and_recorded():
    grid = default_grid(quick=True)
    named = [s for s in grid if s.group == "named"]
    assert [s.case for s in named] == [s.case for s in NAMED_SHAPES]
    for small, full in zip(named, NAMED_SHAPES, strict=True):
        assert (small.T, small.D, small.R, small.full_B) == (full.T, full.D, full.R, full.B)
        assert small.B * small.T * small.D <= max(QUICK_MAX_ELEMENTS, full.T * full.D)
        assert small.B <= full.B
    assert len(grid) < len(default_grid(quick=False))


def test_floors_cover_every_named_case_and_dtype(tiny_run):
    out, table = tiny_run
    floors = pd.read_csv(out / "floors.csv")
    assert sorted(zip(floors["case"], floors["dtype"], strict=True)) == [
        ("tiny", "float32"), ("tiny", "float64")
    ]
    for _, r in floors.iterrows():
        ours = table[(table["case"] == r["case"]) & (table["dtype"] == r["dtype"])
                     & table["method"].str.startswith("smnn")]
        assert r["best_ms"] == pytest.approx(ours["median_ms"].min())
        assert r["floor_ms"] > 0 and r["ratio"] == pytest.approx(r["best_ms"] / r["floor_ms"])
        # a measured step can never beat the floor by much (rates are best-of, the counts minimal)
        assert r["ratio"] > 0.5
    assert "## Floors" in (out / "bench.md").read_text()


def test_markdown_speedup_uses_the_measured_time():
    rows = []
    for case, B, full_B in (("lorenz", 1536, 1536), ("sst", 10, 12960)):
        rows.append({"method": "smnn", "dtype": "float64", "case": case, "group": "named",
                     "B": B, "T": 50, "D": 1, "R": 3, "median_ms": 12.5, "min_ms": 12.0,
                     "peak_mb": 3.0, "status": "ok", "note": "", "converged": None,
                     "repeats": 1, "full_B": full_B, "device": "cpu", "threads": 2})
    md = markdown_report(pd.DataFrame(rows))
    lorenz = next(line for line in md.splitlines() if line.startswith("| lorenz |"))
    assert f"{REFERENCE_MS['lorenz'] / 12.5:.1f}x" in lorenz
    sst = next(line for line in md.splitlines() if line.startswith("| sst |"))
    assert "n/a (batch scaled)" in sst


def test_mlflow_run_is_logged_and_readable(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    table = run_benchmark(out, ("smnn", "mnn_cg"), ("float64",), TINY[:2], repeats=1,
                          mlflow_uri=uri, progress=False)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("benchmark")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["methods"] == "smnn,mnn_cg"
    assert run.data.params["repeats"] == "1"
    for _, r in table.iterrows():
        key = f"{r['method']}.{r['dtype']}.{r['case']}"
        assert run.data.metrics[f"time_ms.{key}"] == pytest.approx(r["median_ms"])
        assert run.data.metrics[f"peak_mb.{key}"] == pytest.approx(r["peak_mb"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(OUTPUTS) <= artifacts
    local = client.download_artifacts(run.info.run_id, "bench.csv", str(tmp_path / "dl"))
    assert pd.read_csv(local).shape == pd.read_csv(out / "bench.csv").shape


def test_mlflow_uri_from_environment(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "o"
    assert main(["bench", "--out", str(out), "--quick", "--methods", "smnn", "--groups",
                 "T_sweep", "--dtypes", "float32", "--time-budget", "0"]) == 0
    csv = pd.read_csv(out / "bench.csv")
    assert set(csv["group"]) == {"T_sweep"}
    assert csv["status"].iloc[0] == "ok" and (csv["status"].iloc[1:] == "skipped").all()
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("benchmark")
    runs = MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert any(k.startswith("time_ms.smnn.float32.") for k in runs[0].data.metrics)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "smnn,rk45"], "rk45"),
        (["--methods", ","], "--methods"),
        (["--dtypes", "float16"], "float16"),
        (["--repeats", "0"], "--repeats"),
        (["--threads", "0"], "--threads"),
        (["--max-dense-bytes", "-5"], "--max-dense-bytes"),
        (["--device", "tpu"], "--device"),
        (["--groups", "named,long"], "--groups"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert main(["bench", "--out", str(out), "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not out.exists()  # refused before any work or output


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "f.csv"
    target.write_text("x")
    assert main(["bench", "--out", str(target), "--quick"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_shape_validation():
    with pytest.raises(ValueError, match="T must be >= 2"):
        Shape("bad", "named", 1, 1, 1, 3)
