"""`smnn bench --quick` on a fresh install: numba compiles the lane kernels (minutes) before the
first timed step, and compilation never counts against the 1 s time budget, so S-MNN is
measured at every named shape (docs/solver.md section 9: compilation is never a measured step).

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
    assert (table["error_max"] < 1e-6).all()
