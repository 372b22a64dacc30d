"""`smnn standalone`: closed forms, solver accuracy, output files and bad --out (real runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from smnn.cli import main
from smnn.standalone import EQUATIONS, SOLVERS, ivp_solution, time_grid

N_CASES = sum(len(ode.initial_conditions) for ode in EQUATIONS)


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
