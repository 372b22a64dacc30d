"""`smnn bench --quick` on a fresh install: numba compiles the lane kernels (minutes) before the
first timed step, and compilation never counts against the time budget, so S-MNN is
measured at every named shape (docs/solver.md, "Complexity and performance targets": compilation is
never a measured step).

A real subprocess with empty numba and smnn caches (NUMBA_CACHE_DIR, SMNN_CACHE_DIR in a
temporary directory), restricted to the named shapes, float64 and the S-MNN solver, so that it
compiles as little as a fresh install's first benchmark must.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from smnn.benchmark import NAMED_SHAPES


@pytest.mark.slow
def test_quick_benchmark_with_a_cold_cache_measures_every_named_shape(tmp_path):
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    env["SMNN_CACHE_DIR"] = str(tmp_path / "smnn")
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "smnn",
        "bench",
        "--quick",
        "--groups",
        "named",
        "--dtypes",
        "float64",
        "--methods",
        "smnn",
        "--repeats",
        "1",
        # far below a cold compilation (minutes) but above a loaded machine's SST step
        "--time-budget",
        "10",
        "--out",
        str(out),
        "--no-mlflow",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    # the caches were empty: the kernels were compiled in this run, into the temporary ones
    assert any((tmp_path / "numba").rglob("*.nbi"))
    table = pd.read_csv(out / "bench.csv")
    assert sorted(table["case"]) == sorted(s.case for s in NAMED_SHAPES)
    assert (table["status"] == "ok").all(), table[["case", "status", "note"]].to_string()
    assert table["median_ms"].notna().all() and table["error_median"].notna().all()
    # float64 LDL^T against the float64 QR reference: the KdV shape's worst system is at
    # about 4e-5 (cond(A)^2 eps), the medians at 1e-7 or below
    assert (table["error_median"] < 1e-6).all(), table[["case", "error_median"]].to_string()
    assert (table["error_max"] < 1e-3).all(), table[["case", "error_max"]].to_string()
