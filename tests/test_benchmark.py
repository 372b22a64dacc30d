"""`smnn bench` on tiny grids: outputs, skipped dense rows, time budget, warm-up and median, peers
and their ratios, --config, MLflow, progress lines, the quick mark, bad arguments.

Timings are never asserted against numbers (they depend on the machine), only that they exist,
are finite and positive, and that the files agree with each other.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from matplotlib.image import imread

from smnn.benchmark import (
    DEFAULT_METHODS,
    METHODS,
    NAMED_SHAPES,
    OUTPUT_FILES,
    PEER_TARGET,
    QUICK_MAX_ELEMENTS,
    Method,
    Shape,
    batch_sweep,
    default_grid,
    make_inputs,
    make_table,
    markdown_report,
    measure_case,
    options_from_config,
    parse_peer,
    plan_benchmark,
    run_benchmark,
    t_sweep,
)
from smnn.benchmark.accuracy import reference_method, reference_solution, relative_errors
from smnn.benchmark.contention import (
    CONTENTION_COLUMNS,
    busy_process,
    contention_lines,
    run_contention,
)
from smnn.benchmark.figures import accuracy_figure, scaling_figure
from smnn.benchmark.measure import COLUMNS, COMPILE_BATCHES
from smnn.benchmark.report import method_label
from smnn.cli import main
from smnn.config import Config
from smnn.memory import solver_step_bytes
from smnn.plotting import QUICK_NOTE
from smnn.solver import METHODS as SOLVER_METHODS
from smnn.solver import dense_reference

TINY = [
    Shape("tiny", "named", 3, 12, 2, 3),
    *t_sweep(exponents=[3, 4], B=2),
    *batch_sweep(exponents=[0, 1], T=8),
]
CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
CPU64 = (torch.float64, torch.device("cpu"))

PEER_SOURCE = '''\
"""A peer for the tests: the dense reference under the published signature."""
from smnn.solver import dense_reference

CALLS = []


def ode_forward(coefficients, rhs_equation, init_vars, steps, n_steps=None,
                n_init_var_steps=None, is_step_dim_first=False):
    CALLS.append(tuple(steps.shape))
    return dense_reference(coefficients, rhs_equation, init_vars, steps)


def transposed(coefficients, rhs_equation, init_vars, steps):
    return dense_reference(coefficients, rhs_equation, init_vars, steps).transpose(-3, -4)
'''


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def peer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("peer") / "smnn.py"  # the authors' file name, on purpose
    path.write_text(PEER_SOURCE)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    table = run_benchmark(
        out, DEFAULT_METHODS, ("float64", "float32"), TINY, repeats=2, progress=lines.append
    )
    return out, table, lines


def test_tiny_grid_outputs(tiny_run):
    out, table, _ = tiny_run
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0
    csv = pd.read_csv(out / "bench.csv")
    assert len(csv) == len(TINY) * 2 * len(DEFAULT_METHODS)
    for col in (*COLUMNS, "best_smnn_method", "time_vs_best_smnn", "memory_vs_best_smnn"):
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
    assert set(csv["family"]) == {"smnn", "baseline"}
    # csv and returned table agree
    pd.testing.assert_series_equal(
        csv["median_ms"].reset_index(drop=True), table["median_ms"].reset_index(drop=True)
    )
    md = (out / "bench.md").read_text()
    for case in ("tiny", "T8", "T16", "B1", "B2"):
        assert f"| {case} |" in md
    assert "smnn float64" in md and "mnn_cg float32" in md
    assert QUICK_NOTE not in md  # not a quick run
    for name in ("scaling_T.png", "scaling_batch.png", "accuracy_T.png"):
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[1] > 600


def test_ratios_against_the_best_smnn_method(tiny_run):
    _, table, _ = tiny_run
    for _, part in table.groupby(["case", "dtype"]):
        ours = part[part["family"] == "smnn"]
        best = ours.loc[ours["median_ms"].idxmin()]
        assert (part["best_smnn_method"] == best["method"]).all()
        for _, r in part.iterrows():
            assert r["time_vs_best_smnn"] == pytest.approx(r["median_ms"] / best["median_ms"])
            if best["peak_mb"] > 0:
                assert r["memory_vs_best_smnn"] == pytest.approx(r["peak_mb"] / best["peak_mb"])
        assert ours["time_vs_best_smnn"].min() == pytest.approx(1.0)


def test_progress_line_per_case_and_a_summary(tiny_run):
    out, table, lines = tiny_run
    case_lines = [line for line in lines if line.startswith("[bench ") and "/" in line[:14]]
    assert len(case_lines) == len(table)
    for line in case_lines:
        assert re.search(r": [\d.e+-]+ ms \(median of 2\), [\d.e+-]+ MB", line), line
    for _, r in table.iterrows():
        assert any(
            f"] {r['method']} {r['dtype']} {r['case']} B={r['B']}" in line for line in case_lines
        )
    assert lines[0].startswith(f"[bench] {len(table)} cases")
    assert "done in" in lines[-1] and str(out.resolve()) in lines[-1]
    assert all(name in lines[-1] for name in OUTPUT_FILES)


def test_cli_progress_is_flushed_to_stderr(tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        main(
            [
                "bench",
                "--out",
                str(out),
                "--methods",
                "smnn",
                "--dtypes",
                "float64",
                "--quick",
                "--cases",
                "T64,B1",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "[bench 1/2 " in captured.err and "smnn float64 T64 B=8" in captured.err
    assert "[bench 2/2 " in captured.err and "smnn float64 B1 B=1" in captured.err
    assert "outputs in" in captured.err and "outputs in" in captured.out
    assert "## Sweep over T" in captured.out


def test_dense_rows_skipped_when_limit_is_tiny(tmp_path):
    table = run_benchmark(
        tmp_path,
        ("smnn", "mnn_dense"),
        ("float64",),
        TINY[:2],
        repeats=1,
        max_dense_bytes=1000,
        progress=False,
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
    dtype = make_inputs(shape, *CPU64)[0].dtype
    need = solver_step_bytes("mnn_dense", shape.B, shape.T, shape.D, shape.R, dtype)
    at = run_benchmark(
        tmp_path / "a",
        ("mnn_dense",),
        ("float64",),
        [shape],
        repeats=1,
        max_dense_bytes=need,
        progress=False,
    )
    below = run_benchmark(
        tmp_path / "b",
        ("mnn_dense",),
        ("float64",),
        [shape],
        repeats=1,
        max_dense_bytes=need - 1,
        progress=False,
    )
    assert at["status"].tolist() == ["ok"]
    assert below["status"].tolist() == ["skipped"]


def _sleepy(seconds_per_step: float, fast_first_call: bool = False) -> Method:
    """A method whose step takes ``seconds_per_step * T / 8`` (T: the shape's steps); with
    ``fast_first_call`` the first call on each shape (the warm-up) does not sleep."""
    seen: set[tuple] = set()

    def solve(c, b, u0, h):
        if not fast_first_call or tuple(h.shape) in seen:
            time.sleep(seconds_per_step * (h.shape[-1] + 1) / 8)
        seen.add(tuple(h.shape))
        return METHODS["smnn"].solve(c, b, u0, h)

    return Method("sleepy", solve, family="smnn")


def test_time_budget_skips_larger_sweep_cases(tmp_path):
    # T8 takes 0.05 s (in budget), T16 0.1 s (over: measured, then the budget closes), T32 and
    # T64 are skipped without running
    shapes = t_sweep(exponents=[3, 4, 5, 6], B=1)
    table = run_benchmark(
        tmp_path,
        (),
        ("float64",),
        shapes,
        repeats=1,
        time_budget_s=0.075,
        peers=[_sleepy(0.05, fast_first_call=True)],
        progress=False,
    )
    assert table["status"].tolist() == ["ok", "ok", "skipped", "skipped"]
    assert table["note"].iloc[2].startswith(f"skipped: T16 ({shapes[1].unknowns} unknowns) took")
    assert "time budget 0.075 s" in table["note"].iloc[3]


def test_a_warm_up_over_the_budget_ends_the_case_and_the_larger_ones(tmp_path):
    shapes = t_sweep(exponents=[3, 5, 6], B=1)  # 0.02 s, 0.08 s, 0.16 s per step
    table = run_benchmark(
        tmp_path,
        (),
        ("float64",),
        shapes,
        repeats=3,
        time_budget_s=0.05,
        peers=[_sleepy(0.02)],
        progress=False,
    )
    assert table["status"].tolist() == ["ok", "skipped", "skipped"]
    assert table["note"].iloc[1].startswith("skipped: warm-up step took 0.")
    assert table["warmup_ms"].iloc[1] >= 80 and table["median_ms"].isna().tolist()[1:] == [
        True,
        True,
    ]
    assert "T32" in table["note"].iloc[2] and "warm-up took" in table["note"].iloc[2]
    assert math.isnan(table["warmup_ms"].iloc[2])  # never ran


def test_cases_run_smallest_first_and_are_listed_in_grid_order(tmp_path):
    shapes = t_sweep(exponents=[3, 5], B=1)[::-1]  # T32 listed before T8
    table = run_benchmark(
        tmp_path,
        (),
        ("float64",),
        shapes,
        repeats=1,
        time_budget_s=0.01,
        peers=[_sleepy(0.02)],
        progress=False,
    )
    assert table["case"].tolist() == ["T32", "T8"]
    assert table["status"].tolist() == ["skipped", "skipped"]
    assert table["note"].iloc[1].startswith("skipped: warm-up step took")  # T8 ran first
    assert "T8" in table["note"].iloc[0] and "time budget" in table["note"].iloc[0]


def test_cases_option_keeps_named_cases():
    plan = plan_benchmark(("smnn",), ("float64",), quick=True, cases=["lorenz", "T1024"])
    assert [s.case for s in plan.shapes] == ["lorenz", "T1024"]
    with pytest.raises(ValueError, match="--cases: unknown \\['T65536'\\]"):
        plan_benchmark(("smnn",), ("float64",), quick=True, cases=["T65536"])


def test_inputs_require_grad_and_gradients_reach_them():
    c, b, u0, h = make_inputs(Shape("x", "named", 2, 6, 2, 3), *CPU64)
    assert c.shape == (2, 6, 2, 2, 3) and b.shape == (2, 6, 2)
    assert u0.shape == (2, 1, 2, 1) and h.shape == (2, 5)
    u, _ = METHODS["smnn"].solve(c, b, u0, h)
    (u**2).sum().backward()
    for x in (c, b, u0, h):
        assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_seed_changes_the_inputs_and_dtypes_share_them():
    shape = Shape("x", "named", 2, 6, 1, 3)
    a = make_inputs(shape, *CPU64, seed=0)
    b = make_inputs(shape, *CPU64, seed=1)
    again = make_inputs(shape, *CPU64, seed=0)
    single = make_inputs(shape, torch.float32, torch.device("cpu"), seed=0)
    assert not torch.equal(a[0], b[0])
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert torch.equal(single[1], a[1].float())


def test_methods_come_from_the_solver_registry():
    from smnn.solver.registry import SOLVERS

    assert set(SOLVERS) <= set(METHODS)
    assert {m for m, v in METHODS.items() if v.family == "smnn"} == {
        "smnn",
        "smnn_sequential",
        "smnn_cyclic",
        "smnn_qr",
    }
    from smnn.solver import METHODS as SOLVER_METHODS

    # smnn_qr runs exactly where the installed solver has method="qr"
    assert (METHODS["smnn_qr"].unavailable == "") == ("qr" in SOLVER_METHODS)
    assert ("smnn_qr" in DEFAULT_METHODS) == ("qr" in SOLVER_METHODS)
    assert {"smnn", "smnn_sequential", "smnn_cyclic"} <= set(DEFAULT_METHODS)
    for name, info in SOLVERS.items():
        assert METHODS[name].dense == info.dense and METHODS[name].label == info.label


def test_quick_grid_is_scaled_and_recorded():
    grid = default_grid(quick=True)
    named = [s for s in grid if s.group == "named"]
    assert [s.case for s in named] == [s.case for s in NAMED_SHAPES]
    for small, full in zip(named, NAMED_SHAPES, strict=True):
        assert (small.T, small.D, small.R, small.full_B) == (full.T, full.D, full.R, full.B)
        assert small.B * small.T * small.D <= max(QUICK_MAX_ELEMENTS, full.T * full.D)
        assert small.B <= full.B
    assert len(grid) < len(default_grid(quick=False))


# --------------------------------------------------------------------------------------------
# Warm-up, median, quick mode
# --------------------------------------------------------------------------------------------


def _slow_first_call_method(first_call_s: float) -> tuple[Method, list[float]]:
    """A method whose first call is slow (a first-call cost) and whose later calls are fast."""
    calls: list[float] = []

    def solve(c, b, u0, h):
        if not calls:
            time.sleep(first_call_s)
        calls.append(time.perf_counter())
        return METHODS["smnn"].solve(c, b, u0, h)

    return Method("slow_first", solve, family="smnn"), calls


def test_warm_up_step_on_the_measured_shape_is_not_timed():
    method, calls = _slow_first_call_method(0.5)
    row = measure_case(method, Shape("x", "T_sweep", 2, 16, 1, 3), *CPU64, repeats=3)
    assert len(calls) == 1 + 3  # warm-up (it also measures the peak memory), timed repeats
    assert row["status"] == "ok" and row["median_ms"] < 400  # the 500 ms first call is not in
    assert row["warmup_ms"] >= 500 and row["peak_mb"] >= 0


def test_quick_mode_warms_up_and_takes_a_median_of_at_least_three(tmp_path):
    assert plan_benchmark(("smnn",), ("float64",), quick=True).grid.repeats >= 3
    assert plan_benchmark(("smnn",), ("float64",), quick=False).grid.repeats >= 3
    method, calls = _slow_first_call_method(0.5)
    table = run_benchmark(
        tmp_path,
        (),
        ("float64",),
        [Shape("x", "T_sweep", 2, 16, 1, 3)],
        quick=True,
        peers=[method],
        progress=False,
    )
    csv = pd.read_csv(tmp_path / "bench.csv")
    assert (csv["repeats"] >= 3).all() and (csv["status"] == "ok").all()
    assert table["median_ms"].iloc[0] < 400
    # compile steps on the tiny shapes, warm-up (and memory) on the measured one, 3 timed
    assert len(calls) == len(COMPILE_BATCHES) + 1 + 3
    md = (tmp_path / "bench.md").read_text()
    assert QUICK_NOTE in md


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [fig.get_suptitle()]


def test_quick_mode_is_marked_on_the_plots(tiny_run):
    _, table, _ = tiny_run
    quick = scaling_figure(table, "T_sweep", "T", quick=True)
    assert QUICK_NOTE in quick.get_suptitle()
    for ax in quick.axes:  # every panel carries the stamp
        assert any(getattr(t, "smnn_quick", False) and t.get_text() == QUICK_NOTE for t in ax.texts)
    full = scaling_figure(table, "T_sweep", "T", quick=False)
    assert not any(QUICK_NOTE in text for text in _texts(full))
    # one line per method and dtype on both panels
    for ax in full.axes:
        labels = {line.get_label() for line in ax.get_lines()}
        # (mnn_cg labelled "mnn_cg (not converged)" where its CG stopped at the cap)
        assert labels == {
            f"{method_label(table, m)} {d}" for m in DEFAULT_METHODS for d in ("float64", "float32")
        }


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, target, function, label",
    [
        ("/x/smnn.py:ode_forward", "/x/smnn.py", "ode_forward", "smnn.ode_forward"),
        ("~/c/smnn.py:ode_forward=authors", "~/c/smnn.py", "ode_forward", "authors"),
        ("torchode.solve:fn", "torchode.solve", "fn", "torchode.solve.fn"),
        ("pkg.mod:fn=a-b_1.0", "pkg.mod", "fn", "a-b_1.0"),
    ],
)
def test_parse_peer(text, target, function, label):
    spec = parse_peer(text)
    assert (spec.target, spec.function, spec.label) == (target, function, label)


@pytest.mark.parametrize("text", ["smnn.py", "x.py:", "x.py:1fn", "x.py:f=smnn", "x.py:f=a b"])
def test_parse_peer_refuses(text):
    with pytest.raises(ValueError, match="--peer"):
        parse_peer(text)


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory, peer_file):
    from mlflow import MlflowClient

    from smnn.tracking import TrackingTarget

    out = tmp_path_factory.mktemp("peer_out")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    shapes = [Shape("lorenz", "named", 2, 10, 1, 3), Shape("coupled", "named", 1, 8, 2, 3)]
    table = run_benchmark(
        out,
        ("smnn", "smnn_cyclic"),
        ("float64",),
        shapes,
        repeats=3,
        peers=[f"{peer_file}:ode_forward=ref"],
        progress=False,
        tracking=TrackingTarget(uri, (out / "art").as_uri(), "test"),
    )
    return out, table, MlflowClient(tracking_uri=uri)


def test_peer_runs_on_every_shape_with_the_same_inputs(peer_run, peer_file):
    import sys

    out, table, _ = peer_run
    peer = table[table["method"] == "ref"]
    assert len(peer) == 2 and (peer["status"] == "ok").all(), peer["note"].tolist()
    assert (peer["family"] == "peer").all()
    # the dense reference computes the same function: it agrees with S-MNN on the same inputs
    assert (peer["max_rel_diff_vs_smnn"] < 1e-8).all()
    assert table[table["family"] != "peer"]["max_rel_diff_vs_smnn"].isna().all()
    # loaded under a private name: the test's smnn.py shadows nothing
    assert sys.modules["smnn"].__file__ != str(peer_file)
    module = sys.modules["_smnn_peer_ref"]
    assert (2, 9) in module.CALLS and (1, 7) in module.CALLS  # batch-first steps (B, T-1)


def test_peer_ratios_in_csv_markdown_and_mlflow(peer_run):
    out, table, client = peer_run
    csv = pd.read_csv(out / "bench.csv")
    for case in ("lorenz", "coupled"):
        rows = csv[csv["case"] == case]
        ours = rows[rows["family"] == "smnn"]
        best = ours.loc[ours["median_ms"].idxmin()]
        peer = rows[rows["method"] == "ref"].iloc[0]
        assert peer["best_smnn_method"] == best["method"]
        assert peer["time_vs_best_smnn"] == pytest.approx(peer["median_ms"] / best["median_ms"])
        if best["peak_mb"] > 0:
            assert peer["memory_vs_best_smnn"] == pytest.approx(peer["peak_mb"] / best["peak_mb"])
    md = (out / "bench.md").read_text()
    assert "## Side by side" in md
    lorenz = next(line for line in md.splitlines() if line.startswith("| lorenz | float64 |"))
    ratio = csv[(csv["case"] == "lorenz") & (csv["method"] == "ref")].iloc[0]["time_vs_best_smnn"]
    assert f"time {ratio:.3g}x" in lorenz
    assert f"at least {PEER_TARGET:g}x faster than ref on every named shape, float64" in md
    assert "not measured: kdv, sst, long_T16384, long_T65536" in md
    exp = client.get_experiment_by_name("benchmark")
    run = client.search_runs([exp.experiment_id])[0]
    metrics = run.data.metrics
    peer = table[(table["method"] == "ref") & (table["case"] == "lorenz")].iloc[0]
    assert metrics["time_ratio.ref.float64.lorenz"] == pytest.approx(peer["time_vs_best_smnn"])
    assert "time_ms.ref.float64.coupled" in metrics
    assert run.data.params["bench.peers"].endswith(":ode_forward=ref")
    assert run.data.params["bench.methods"] == "smnn,smnn_cyclic"


def test_peer_target_verdict_in_markdown():
    def row(method, family, case, ms, B=8, full_B=8):
        return {
            "method": method,
            "family": family,
            "dtype": "float64",
            "case": case,
            "group": "named",
            "B": B,
            "T": 50,
            "D": 1,
            "R": 3,
            "median_ms": ms,
            "min_ms": ms,
            "peak_mb": 2.0,
            "status": "ok",
            "note": "",
            "converged": None,
            "repeats": 3,
            "full_B": full_B,
            "device": "cpu",
            "threads": 2,
            "max_rel_diff_vs_smnn": math.nan,
        }

    met = make_table(
        [
            row("smnn", "smnn", "lorenz", 10.0),
            row("authors", "peer", "lorenz", 150.0),
            row("smnn", "smnn", "kdv", 1.0),
            row("authors", "peer", "kdv", 12.0),
        ]
    )
    md = markdown_report(met)
    assert "than authors on every named shape, float64: met (smallest: 12x on kdv)" in md
    lorenz = next(line for line in md.splitlines() if line.startswith("| lorenz | float64 |"))
    assert "time 15x, memory 1x" in lorenz
    short = make_table(
        [
            row("smnn", "smnn", "lorenz", 10.0),
            row("authors", "peer", "lorenz", 50.0, B=4, full_B=1536),
        ]
    )
    md = markdown_report(short)
    assert "NOT met (smallest: 5x on lorenz)" in md and "batch scaled" in md


def test_peer_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "my_peer_mod.py").write_text(PEER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    table = run_benchmark(
        tmp_path / "o",
        ("smnn",),
        ("float64",),
        TINY[1:2],
        repeats=1,
        peers=["my_peer_mod:ode_forward"],
        progress=False,
    )
    peer = table[table["method"] == "my_peer_mod.ode_forward"]
    assert peer["status"].tolist() == ["ok"] and peer["family"].tolist() == ["peer"]


def test_peer_with_a_wrong_layout_fails_clearly(tmp_path, peer_file):
    table = run_benchmark(
        tmp_path,
        ("smnn",),
        ("float64",),
        [Shape("x", "named", 2, 6, 2, 3)],
        repeats=1,
        peers=[f"{peer_file}:transposed=bad"],
        progress=False,
    )
    bad = table[table["method"] == "bad"].iloc[0]
    assert bad["status"] == "failed" and "expected a tensor (2, 6, 2, 3)" in bad["note"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/nonexistent/peer.py:ode_forward", "does not exist"),
        ("{file}:no_such_function", "no_such_function"),
        ("no_such_module_xyz:f", "cannot import"),
    ],
)
def test_bad_peer_is_refused_before_any_work(tmp_path, capsys, peer_file, spec, message):
    out = tmp_path / "o"
    assert main(["bench", "--out", str(out), "--quick", "--peer", spec.format(file=peer_file)]) == 2
    err = capsys.readouterr().err
    assert "--peer" in err and message in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Floors, MLflow, --config
# --------------------------------------------------------------------------------------------


def test_floors_cover_every_named_case_and_dtype(tiny_run):
    out, table, _ = tiny_run
    floors = pd.read_csv(out / "floors.csv")
    assert sorted(zip(floors["case"], floors["dtype"], strict=True)) == [
        ("tiny", "float32"),
        ("tiny", "float64"),
    ]
    for _, r in floors.iterrows():
        ours = table[
            (table["case"] == r["case"])
            & (table["dtype"] == r["dtype"])
            & (table["family"] == "smnn")
        ]
        assert r["best_ms"] == pytest.approx(ours["median_ms"].min())
        assert r["floor_ms"] > 0 and r["ratio"] == pytest.approx(r["best_ms"] / r["floor_ms"])
        # a measured step can never beat the floor by much (rates are best-of, the counts minimal)
        assert r["ratio"] > 0.5
    assert "## Floors" in (out / "bench.md").read_text()


def test_floors_csv_is_written_even_without_named_shapes(tmp_path):
    run_benchmark(tmp_path, ("smnn",), ("float64",), TINY[1:2], repeats=1, progress=False)
    floors = pd.read_csv(tmp_path / "floors.csv")
    assert floors.empty and "floor_ms" in floors.columns


def test_mlflow_run_is_logged_and_readable(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    assert (
        main(
            [
                "bench",
                "--out",
                str(out),
                "--methods",
                "smnn,mnn_cg",
                "--dtypes",
                "float64",
                "--cases",
                "T64",
                "--quick",
                "--time-budget",  # any machine load: the test checks the files, not the speed
                "600",
                "--repeats",
                "1",
                "--mlflow-uri",
                uri,
                "--rule",
                "benchmark_solver",
            ]
        )
        == 0
    )
    table = pd.read_csv(out / "bench.csv")
    assert (table["status"] == "ok").all()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("benchmark")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["bench.methods"] == "smnn,mnn_cg"
    assert run.data.params["bench.repeats"] == "1"
    assert "env.torch" in run.data.params
    assert run.data.tags["smnn.rule"] == "benchmark_solver"
    assert run.data.tags["smnn.job"] == "benchmark"
    assert run.data.tags["device"] == "cpu"
    for _, r in table[table["status"] == "ok"].iterrows():
        key = f"{r['method']}.{r['dtype']}.{r['case']}"
        assert run.data.metrics[f"time_ms.{key}"] == pytest.approx(r["median_ms"])
        assert run.data.metrics[f"peak_mb.{key}"] == pytest.approx(r["peak_mb"])
        if r["method"] == "mnn_cg":
            assert run.data.metrics[f"time_ratio.{key}"] == pytest.approx(r["time_vs_best_smnn"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(OUTPUT_FILES) <= artifacts
    local = client.download_artifacts(run.info.run_id, "bench.csv", str(tmp_path / "dl"))
    assert pd.read_csv(local).shape == table.shape


def test_mlflow_uri_from_environment(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "o"
    assert (
        main(
            [
                "bench",
                "--out",
                str(out),
                "--quick",
                "--methods",
                "smnn",
                "--groups",
                "T_sweep",
                "--dtypes",
                "float32",
                "--cases",
                "T64,T256",
                "--time-budget",  # any machine load: the test checks the files, not the speed
                "600",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    csv = pd.read_csv(out / "bench.csv")
    assert set(csv["group"]) == {"T_sweep"} and csv["case"].tolist() == ["T64", "T256"]
    assert (csv["status"] == "ok").all()
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("benchmark")
    runs = MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert any(k.startswith("time_ms.smnn.float32.") for k in runs[0].data.metrics)


def _config(tmp_path: Path, benchmark: dict, **top) -> Path:
    data = yaml.safe_load(CONFIG.read_text())
    data["benchmark"].update(benchmark)
    data["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    data.update(top)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_drives_the_run_and_the_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    before = torch.get_num_threads()
    cfg = _config(
        tmp_path,
        {"quick": True, "methods": ["smnn", "mnn_cg"], "dtypes": ["float32"], "time_budget": 1e-6},
        seed=7,
        threads=1,
        device="cpu",
    )
    out = tmp_path / "out"
    try:
        assert (
            main(["bench", "--config", str(cfg), "--out", str(out), "--rule", "benchmark_solver"])
            == 0
        )
        csv = pd.read_csv(out / "bench.csv")
        assert set(csv["method"]) == {"smnn", "mnn_cg"} and set(csv["dtype"]) == {"float32"}
        assert set(csv["group"]) == {"named", "T_sweep", "batch_sweep"}
        assert set(csv["threads"]) == {1} and set(csv["device"]) == {"cpu"}
        assert set(csv["repeats"]) == {3}  # quick mode default
        assert "Machine load" in (out / "bench.md").read_text()
        # time budget 1e-6 s: the smallest case (B1) of each method ends after its warm-up,
        # and every larger case is skipped without running
        assert (csv["status"] == "skipped").all()
        b1 = csv[csv["case"] == "B1"]
        assert b1["note"].str.startswith("skipped: warm-up step took").all()
        assert b1["warmup_ms"].notna().all() and csv["warmup_ms"].notna().sum() == 2
        # the default store of resolve_tracking: <paths.results>/mlflow.db
        db = tmp_path / "results" / "mlflow.db"
        assert db.is_file()
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        run = client.search_runs([client.get_experiment_by_name("benchmark").experiment_id])[0]
        assert run.data.tags["smnn.rule"] == "benchmark_solver"
        assert run.data.tags["config_file"] == str(cfg.resolve())
        assert "git_commit" in run.data.tags
        assert run.data.params["bench.seed"] == "7" and run.data.params["seed"] == "7"
        assert run.data.params["benchmark.quick"] == "true"
        assert float(run.data.params["bench.time_budget_s"]) == 1e-6
        assert run.info.artifact_uri.startswith((tmp_path / "results" / "mlartifacts").as_uri())
    finally:
        torch.set_num_threads(before)


def test_flags_override_the_config(tmp_path):
    cfg = _config(
        tmp_path,
        {"quick": True, "methods": ["mnn_cg"], "dtypes": ["float32"], "time_budget": 1e-6},
        seed=3,
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "bench",
                "--config",
                str(cfg),
                "--out",
                str(out),
                "--methods",
                "smnn",
                "--dtypes",
                "float64",
                "--cases",
                "T64",
                "--repeats",
                "1",
                "--seed",
                "5",
                "--time-budget",
                "60",
                "--no-mlflow",
            ]
        )
        == 0
    )
    csv = pd.read_csv(out / "bench.csv")
    assert set(csv["method"]) == {"smnn"} and set(csv["dtype"]) == {"float64"}
    assert set(csv["repeats"]) == {1} and csv["status"].tolist() == ["ok"]
    assert not (tmp_path / "results" / "mlflow.db").exists()


def test_options_from_config_reads_the_documented_keys(tmp_path):
    cfg = Config(
        {
            "seed": 11,
            "threads": 2,
            "device": "cpu",
            "benchmark": {
                "quick": False,
                "methods": ["smnn_cyclic"],
                "dtypes": ["float64"],
                "time_budget": None,
                "max_dense_bytes": 1000,
                "peers": ["/p/smnn.py:ode_forward=authors"],
            },
        }
    )
    opts = options_from_config(cfg)
    assert opts == {
        "seed": 11,
        "threads": 2,
        "device": "cpu",
        "quick": False,
        "methods": ["smnn_cyclic"],
        "dtypes": ["float64"],
        "max_dense_bytes": 1000,
        "peers": ["/p/smnn.py:ode_forward=authors"],
    }
    plan = plan_benchmark(
        opts.pop("methods"), opts.pop("dtypes"), **{k: v for k, v in opts.items() if k != "peers"}
    )
    assert plan.grid.seed == 11 and plan.grid.time_budget_s == 60.0
    assert plan.grid.max_dense_bytes == 1000


@pytest.mark.parametrize(
    "section, key",
    [
        ({"methods": ["smnn", "rk45"]}, "benchmark.methods"),
        ({"quick": "yes"}, "benchmark.quick"),
        ({"time_budget": -1}, "benchmark.time_budget"),
        ({"dtypes": ["float16"]}, "benchmark.dtypes"),
    ],
)
def test_bad_config_values_are_named(tmp_path, capsys, section, key):
    cfg = _config(tmp_path, section)
    out = tmp_path / "o"
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert key in err and "config.yaml" in err
    assert not out.exists()


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
        (["--seed", "-1"], "--seed"),
        (["--cases", "lorenz,nope"], "nope"),
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


def test_help_describes_every_argument(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "--config",
        "--rule",
        "--quick",
        "--methods",
        "--dtypes",
        "--groups",
        "--cases",
        "--peer",
        "--repeats",
        "--time-budget",
        "--max-dense-bytes",
        "--seed",
        "--threads",
        "--device",
        "--mlflow-uri",
        "--no-mlflow",
    ):
        assert flag in text
    assert "benchmark.time_budget" in text and "floors.csv" in text
    assert "PATH_OR_MODULE:FUNC[=LABEL]" in text


# --------------------------------------------------------------------------------------------
# Accuracy against the float64 reference solve
# --------------------------------------------------------------------------------------------


def test_relative_errors_per_system_then_median_and_max():
    ref = torch.zeros(3, 4, 1, 2, dtype=torch.float64)
    ref[:, 0, 0, 0] = torch.tensor([1.0, 10.0, 100.0])  # scale of each system
    u = ref.clone()
    u[0, 2, 0, 1] += 1e-3  # system 0: 1e-3 / 1
    u[1, 3, 0, 0] -= 1e-3  # system 1: 1e-3 / 10
    u[2, 1, 0, 1] += 1e-1  # system 2: 1e-1 / 100
    median, worst = relative_errors(u.float(), ref)
    assert median == pytest.approx(1e-3, rel=1e-4) and worst == pytest.approx(1e-3, rel=1e-4)
    u[2, 1, 0, 1] += 1.0  # system 2: 1.1 / 100
    median, worst = relative_errors(u, ref)
    assert median == pytest.approx(1e-3) and worst == pytest.approx(1.1e-2)
    u[1, 0, 0, 0] = math.nan
    assert all(math.isnan(v) for v in relative_errors(u, ref))
    with pytest.raises(ValueError, match="shape"):
        relative_errors(u[:2], ref)


def test_reference_solution_is_the_least_squares_solution():
    shape = Shape("x", "named", 3, 9, 2, 3)
    ref = reference_solution(shape, seed=4)
    c, b, u0, h = (x.detach() for x in make_inputs(shape, *CPU64, seed=4))
    dense = dense_reference(c, b, u0, h)
    assert ref.dtype == torch.float64 and ref.shape == (3, 9, 2, 3)
    assert relative_errors(ref, dense)[1] < 1e-10
    assert reference_method() == ("qr" if "qr" in SOLVER_METHODS else "sequential")


def test_errors_in_the_table_markdown_and_figure(tiny_run):
    out, table, lines = tiny_run
    csv = pd.read_csv(out / "bench.csv")
    ours = csv[csv["family"] == "smnn"]
    assert ours["error_median"].notna().all() and ours["error_max"].notna().all()
    assert (ours["error_median"] <= ours["error_max"]).all()
    assert (ours[ours["dtype"] == "float64"]["error_max"] < 1e-8).all()
    assert (ours[ours["dtype"] == "float32"]["error_max"] < 0.1).all()
    if "qr" in SOLVER_METHODS:  # the orthogonal solve: float32 errors far below LDL^T's
        single = ours[ours["dtype"] == "float32"].set_index(["case", "method"])["error_median"]
        for case in ours["case"].unique():
            assert 10 * single[case, "smnn_qr"] < single[case, "smnn_sequential"], case
    # float32 inputs are the float64 problem rounded: clearly less accurate than float64
    for method in ours["method"].unique():
        rows = ours[ours["method"] == method]
        assert (
            rows[rows["dtype"] == "float32"]["error_median"].min()
            > rows[rows["dtype"] == "float64"]["error_median"].max()
        )
    # the MNN baselines solve another system: no error against the S-MNN reference
    assert csv[csv["family"] == "baseline"]["error_median"].isna().all()
    assert (csv["max_ms"] >= csv["median_ms"]).all()
    md = (out / "bench.md").read_text()
    assert "## Accuracy on the named shapes" in md
    first = ours[(ours["case"] == "tiny")].iloc[0]
    assert (
        f"| tiny | 3 | {first['dtype']} | {first['method']} | {first['median_ms']:.4g} | "
        f"{first['error_median']:.2e} | {first['error_max']:.2e} |"
    ) in md
    assert f"float64 {reference_method()} solve" in md
    assert any("error " in line for line in lines if "smnn float64 tiny" in line)
    fig = accuracy_figure(table)
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    for m in ("smnn", "smnn_sequential"):
        assert {f"{m} float64", f"{m} float32"} <= labels
    assert not any(label.startswith("mnn_") for label in labels)


def test_an_unavailable_method_is_skipped_with_its_reason(tmp_path):
    missing = Method(
        "smnn_future",
        lambda *a: 1 / 0,
        family="smnn",
        unavailable="method='future' is not in smnn.solver.METHODS",
    )
    table = run_benchmark(
        tmp_path, ("smnn",), ("float64",), TINY[:1], repeats=1, peers=[missing], progress=False
    )
    row = table[table["method"] == "smnn_future"].iloc[0]
    assert row["status"] == "skipped" and "not in smnn.solver.METHODS" in row["note"]
    assert table[table["method"] == "smnn"]["status"].tolist() == ["ok"]


def test_a_slow_first_step_on_the_measured_shape_is_not_a_skip(tmp_path):
    """Compilation inside the warm-up step (a kernel the compile steps did not reach): the
    warm-up is over the budget, the next step is not, so the case is measured."""
    seen: set[tuple] = set()

    def solve(c, b, u0, h):
        if tuple(h.shape) not in seen:
            seen.add(tuple(h.shape))
            time.sleep(0.4)
        return METHODS["smnn"].solve(c, b, u0, h)

    method = Method("compiles_late", solve, family="smnn")
    shapes = t_sweep(exponents=[3, 4], B=1)
    table = run_benchmark(
        tmp_path,
        (),
        ("float64",),
        shapes,
        repeats=2,
        time_budget_s=0.3,
        peers=[method],
        progress=False,
    )
    assert table["status"].tolist() == ["ok", "ok"], table["note"].tolist()
    assert (table["warmup_ms"] >= 400).all() and (table["median_ms"] < 300).all()


def test_mlflow_metrics_hold_the_errors(tiny_run):
    from smnn.benchmark.mlflow_run import benchmark_metrics

    _, table, _ = tiny_run
    metrics = benchmark_metrics(table, None)
    r = table[(table["method"] == "smnn") & (table["dtype"] == "float32")].iloc[0]
    key = f"smnn.float32.{r['case']}"
    assert metrics[f"error_median.{key}"] == pytest.approx(r["error_median"])
    assert metrics[f"error_max.{key}"] == pytest.approx(r["error_max"])
    assert metrics[f"max_time_ms.{key}"] == pytest.approx(r["max_ms"])
    assert not any(k.startswith("error_median.mnn_") for k in metrics)


# --------------------------------------------------------------------------------------------
# Contention
# --------------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_busy_process_spins_while_the_block_runs_and_is_gone_after():
    with busy_process() as proc:
        start = _cpu_seconds(proc.pid)
        deadline = time.monotonic() + 10  # a loaded machine gives it a share only
        while _cpu_seconds(proc.pid) - start < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None
        assert _cpu_seconds(proc.pid) - start >= 0.2  # it burns CPU, it does not sleep
    assert proc.poll() is not None


def test_contention_rows_for_each_load_and_thread_count(tmp_path):
    shapes = [Shape("lorenz", "named", 2, 8, 1, 3), *t_sweep(exponents=[3], B=1)]
    methods = [METHODS["smnn"], METHODS["mnn_cg"]]
    table = run_contention(methods, ["float64"], shapes, repeats=2, device=torch.device("cpu"))
    assert list(table.columns) == CONTENTION_COLUMNS
    # named shapes only, S-MNN methods only: 2 loads x 2 thread counts
    assert set(table["case"]) == {"lorenz"} and set(table["method"]) == {"smnn"}
    assert sorted(zip(table["load"], table["threads"], strict=True)) == [
        ("busy", 1),
        ("busy", 2),
        ("quiet", 1),
        ("quiet", 2),
    ]
    assert (table["status"] == "ok").all()
    assert ((table["min_ms"] <= table["median_ms"]) & (table["median_ms"] <= table["max_ms"])).all()
    assert (table["min_ms"] > 0).all() and (table["repeats"] == 2).all()
    lines = "\n".join(contention_lines(table))
    assert (
        "## Threads under contention" in lines and "| lorenz | 2 | float64 | smnn | busy |" in lines
    )


def test_contention_verdict():
    def row(load, threads, median, worst):
        return {
            "method": "smnn",
            "dtype": "float64",
            "case": "lorenz",
            "B": 8,
            "T": 50,
            "D": 1,
            "R": 3,
            "full_B": 1536,
            "load": load,
            "threads": threads,
            "median_ms": median,
            "min_ms": median / 2,
            "max_ms": worst,
            "repeats": 15,
            "status": "ok",
            "note": "",
        }

    good = pd.DataFrame(
        [
            row("quiet", 1, 10, 12),
            row("quiet", 2, 5, 7),
            row("busy", 1, 11, 14),
            row("busy", 2, 9, 13),
        ],
        columns=CONTENTION_COLUMNS,
    )
    text = "\n".join(contention_lines(good))
    assert "| 8 (of 1536) |" in text and "| 0.50 | 0.58 |" in text
    assert "no slower than 1, median and worst case: met in 1 of 1 cases" in text
    bad = good.copy()
    bad.loc[3, "max_ms"] = 80.0  # the worst 2-thread step of the busy phase
    assert "worst case: NOT met in 0 of 1 cases" in "\n".join(contention_lines(bad))


def test_contention_option_from_flag_and_config(tmp_path, capsys):
    assert plan_benchmark(("smnn",), ("float64",), quick=True, contention=True).contention
    assert not plan_benchmark(("smnn",), ("float64",), quick=True).contention
    opts = options_from_config(
        Config({"seed": 0, "threads": 1, "device": "cpu", "benchmark": {"contention": True}})
    )
    assert opts["contention"] is True
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "--contention" in text and "benchmark.contention" in text and "busy-loop" in text
