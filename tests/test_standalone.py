"""`smnn standalone`: closed forms, solver accuracy, output files, the figure, --config and MLflow,
bad --out (real runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.image import imread

from smnn.cli import main
from smnn.solver.registry import solver_info
from smnn.standalone import EQUATIONS, OUTPUT_FILES, SOLVERS, ivp_solution, time_grid
from smnn.standalone.figure import CLOSED_FORM_LABEL, solutions_figure

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"

N_CASES = sum(len(ode.initial_conditions) for ode in EQUATIONS)


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """One real `smnn standalone` run with every solver."""
    out = tmp_path_factory.mktemp("standalone") / "out"
    assert main(["standalone", "--out", str(out)]) == 0
    return out


def _solver_cases(metrics: dict, solver: str) -> list[dict]:
    return [c for c in metrics["cases"] if c["solver"] == solver]


@pytest.mark.parametrize("ode", EQUATIONS, ids=[o.key for o in EQUATIONS])
def test_closed_form_matches_solve_ivp(ode):
    t = time_grid()
    for ic in ode.initial_conditions:
        closed = ode.closed_form(t, ic, ode.constants)
        ivp = ivp_solution(ode, ic, t)
        assert closed.shape == ivp.shape == (3, len(t))
        np.testing.assert_allclose(closed, ivp, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ode", EQUATIONS, ids=[o.key for o in EQUATIONS])
def test_closed_form_meets_initial_values(ode):
    t = time_grid()
    for ic in ode.initial_conditions:
        closed = ode.closed_form(t, ic, ode.constants)
        for k, value in enumerate(ic[:3]):
            assert closed[k, 0] == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("ode", EQUATIONS, ids=[o.key for o in EQUATIONS])
def test_linear_form_is_the_table_equation(ode):
    """The (a, r) given to the solvers describe the same equation as the table's formula."""
    a, r = ode.linear_form(ode.constants)
    assert len(a) == ode.order + 1
    rng = np.random.default_rng(0)
    z = rng.normal(size=(ode.order, 50))  # random lower-order values
    top = ode.top_derivative(z, ode.constants)
    lhs = sum(a[k] * z[k] for k in range(ode.order)) + a[ode.order] * top
    np.testing.assert_allclose(lhs, np.full(50, r), rtol=0, atol=1e-12)


def test_outputs_exist_and_parse(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["config"]["n_steps"] == 1000
    assert len(_solver_cases(metrics, "closed_form")) == N_CASES
    for solver in SOLVERS:
        cases = _solver_cases(metrics, solver)
        assert len(cases) == N_CASES
        for case in cases:
            assert case["solve_time_s"] > 0
            for ref in ("vs_closed_form", "vs_ivp"):
                for order in ("y", "dy", "ddy"):
                    stats = case[ref][order]
                    assert np.isfinite(stats["max"]) and np.isfinite(stats["mean"])
                    assert 0 <= stats["mean"] <= stats["max"]
    cg = _solver_cases(metrics, "mnn_cg")
    assert all(isinstance(c["converged"], bool) for c in cg)

    table = pd.read_csv(full_run / "errors.csv")
    # 3 orders x (2 references per solver case + 1 for the closed form against solve_ivp)
    assert len(table) == 3 * N_CASES * (2 * len(SOLVERS) + 1)
    assert set(table["solver"]) == {*SOLVERS, "closed_form"}
    assert table["max_abs_err"].notna().all()

    md = (full_run / "errors.md").read_text()
    assert md.count("| S-MNN |") == N_CASES

    image = imread(full_run / "solutions.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 900


def test_smnn_error_of_y_below_1e3(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())
    cases = _solver_cases(metrics, "smnn")
    assert {c["equation"] for c in cases} == {o.key for o in EQUATIONS}
    for case in cases:
        assert case["vs_closed_form"]["y"]["max"] < 1e-3, case["equation"]
        # the closed form and solve_ivp agree far below that, so both comparisons must agree
        assert case["vs_ivp"]["y"]["max"] == pytest.approx(
            case["vs_closed_form"]["y"]["max"], rel=1e-2
        )


def test_csv_agrees_with_metrics(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())
    table = pd.read_csv(full_run / "errors.csv")
    case = _solver_cases(metrics, "mnn_dense")[-1]
    row = table[
        (table["solver"] == "mnn_dense")
        & (table["equation"] == case["equation"])
        & (table["initial_condition"] == case["initial_condition"])
        & (table["reference"] == "closed_form")
        & (table["order"] == "ddy")
    ]
    assert len(row) == 1
    assert row["max_abs_err"].iloc[0] == pytest.approx(case["vs_closed_form"]["ddy"]["max"])


def test_module_entry_point_subprocess(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "smnn", "standalone", "--out", str(out), "--solvers", "smnn"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "S-MNN" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert {c["solver"] for c in metrics["cases"]} == {"smnn", "closed_form"}
    assert (out / "solutions.png").stat().st_size > 10_000


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["standalone", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a directory" in err
    assert target.read_text() == "x"


def test_out_below_a_file_cannot_be_created(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["standalone", "--out", str(target / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create" in err


def test_out_not_writable(tmp_path, capsys):
    if os.geteuid() == 0:
        # root ignores permission bits; /proc/self is a directory nobody can create files in
        if not Path("/proc/self").is_dir():
            pytest.skip("needs /proc")
        target = Path("/proc/self")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    assert main(["standalone", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not writable" in err


def test_unknown_solver(tmp_path, capsys):
    assert main(["standalone", "--out", str(tmp_path / "o"), "--solvers", "smnn,rk4"]) == 2
    assert "rk4" in capsys.readouterr().err


def test_every_solver_is_drawn_with_its_own_style():
    t = time_grid()[:50]
    curves = {}
    for ode in EQUATIONS:
        curves[("closed", ode.key, 0)] = np.zeros((3, len(t)))
        for solver in SOLVERS:
            curves[(solver, ode.key, 0)] = np.ones((3, len(t)))
    fig = solutions_figure(t, curves, list(SOLVERS))
    axes = fig.axes
    assert len(axes) == 3 * len(EQUATIONS)
    want = {CLOSED_FORM_LABEL, *(solver_info(s).label for s in SOLVERS)}
    assert "MNN CG" in want
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == want
        styles = {(line.get_linestyle(), line.get_color()) for line in lines.values()}
        assert len(styles) == len(want)  # distinguishable
    legend = axes[0].get_legend()
    assert {text.get_text() for text in legend.get_texts()} == want
    noted = solutions_figure(t, curves, list(SOLVERS), {"mnn_cg": "not converged"})
    assert "MNN CG (not converged)" in {line.get_label() for line in noted.axes[0].get_lines()}


def test_help_describes_every_argument(capsys):
    with pytest.raises(SystemExit):
        main(["standalone", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "--config",
        "--solvers",
        "--device",
        "--threads",
        "--rule",
        "--mlflow-uri",
        "--no-mlflow",
    ):
        assert flag in text
    assert all(name in text for name in OUTPUT_FILES)


def test_config_and_mlflow_run(tmp_path, capsys):
    from mlflow import MlflowClient

    data = yaml.safe_load(CONFIG.read_text())
    data["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    data.update(threads=1, device="cpu")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    before = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        assert (
            main(
                [
                    "standalone",
                    "--config",
                    str(cfg),
                    "--out",
                    str(out),
                    "--solvers",
                    "smnn",
                    "--rule",
                    "standalone",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert err.count("[standalone] S-MNN ") == N_CASES  # one progress line per solve
    assert "outputs in" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["solvers"] == ["smnn"] and metrics["config"]["device"] == "cpu"
    db = tmp_path / "results" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("standalone")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["smnn.job"] == "standalone" and run.data.tags["smnn.rule"] == "standalone"
    assert run.data.tags["config_file"] == str(cfg.resolve())
    assert run.data.params["standalone.run_solvers"] == "smnn"
    case = next(c for c in metrics["cases"] if c["solver"] == "smnn")
    key = f"max_err.smnn.{case['equation']}.ic{case['initial_condition']}.y"
    assert run.data.metrics[key] == pytest.approx(case["vs_closed_form"]["y"]["max"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(OUTPUT_FILES) <= artifacts


def test_no_mlflow_and_unknown_config_solver(tmp_path, capsys):
    data = yaml.safe_load(CONFIG.read_text())
    data["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    data["device"] = "tpu"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["standalone", "--config", str(cfg), "--out", str(out), "--no-mlflow"]) == 2
    assert "device" in capsys.readouterr().err
    assert not out.exists()
