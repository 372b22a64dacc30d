"""scripts/gpu_check.py at tiny sizes on CPU (``--cpu-smoke``), as on a bare GPU image.

One run of the whole script (all parts, each in its own subprocess) with the packages a bare GPU
image lacks refused at import (mlflow, matplotlib, snakemake, tqdm, ...): it must finish, write
gpu_check.csv and gpu_check.md, and every row must say what it measured. Takes about 2.5 min.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# packages of the workflow and dev extras that a bare GPU image does not have
ABSENT = "mlflow,matplotlib,snakemake,tqdm,jsonschema,requests,pygments,netCDF4"

# find_spec, not importorskip: importing triton here, before tests/test_triton.py sets
# TRITON_INTERPRET, would leave triton's library compiled-only for the whole session
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(out),
            "--cpu-smoke",
            "--block",
            ABSENT,
            "--budget",
            "900",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return out, proc


def _rows(out: Path) -> list[dict]:
    with (out / "gpu_check.csv").open() as f:
        return list(csv.DictReader(f))


def test_smoke_run_finishes_and_writes_both_files(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "gpu_check.csv").is_file()
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Parts", "## Named shapes", "## SST long-sequence study",
                    "## Training steps", "## CUDA-marked tests", "## KdV"):  # fmt: skip
        assert heading in md, heading
    assert "cpu smoke" in md


def test_every_solver_row_is_measured_and_accurate(smoke):
    out, _ = smoke
    rows = _rows(out)
    solver = [r for r in rows if r["part"] == "solver"]
    methods = {r["method"] for r in solver}
    assert {"triton", "torch_graphs", "cyclic"} <= methods
    assert {r["dtype"] for r in solver} == {"float32", "float64"}
    for r in solver:
        assert r["status"] == "ok", r
        assert float(r["time_ms"]) > 0
        tol = 1e-9 if r["dtype"] == "float64" else 2e-2
        assert float(r["rel_err"]) < tol, r


def test_sst_and_training_rows(smoke):
    out, _ = smoke
    rows = _rows(out)
    sst = [r for r in rows if r["part"] == "sst"]
    assert {r["method"] for r in sst} == {"smnn", "smnn_triton", "mnn_dense"}
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 for r in sst)
    train = {r["case"]: r for r in rows if r["part"] == "train"}
    assert set(train) == {"lorenz paper config", "sst paper config", "kdv paper config"}
    for case, r in train.items():
        assert r["status"] == "ok", (case, r["note"])
        assert math.isfinite(float(r["time_ms"]))
    tests = [r for r in rows if r["part"] == "tests"]
    assert len(tests) == 1 and tests[0]["status"] == "ok"
    (kdv,) = [r for r in rows if r["part"] == "kdv"]
    assert kdv["status"] == "ok", kdv["note"]
    nmse = float(kdv["metric"].removeprefix("nmse40="))
    assert math.isfinite(nmse) and nmse > 0
    assert "0.0011" in kdv["note"]  # the authors' figure beside ours


def test_a_blocked_package_is_refused_in_the_parts(tmp_path):
    """--block really refuses a module the training part needs: the row says so, the
    script still writes its files."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path),
            "--cpu-smoke",
            "--parts",
            "train",
            "--block",
            "zarr",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = _rows(tmp_path)
    assert len(train) == 3
    assert all(r["status"] == "skipped" and "zarr" in r["note"] for r in train)


def test_rollout_nmse_is_the_kdv_evaluation_protocol():
    """The script's rollout and NMSE (it cannot import smnn.experiments.kdv.evaluation on a
    bare image: that module imports matplotlib) against the pipeline's, on a fixed
    forecaster."""
    import importlib.util

    import numpy as np
    import torch

    from smnn.experiments.kdv.evaluation import rollout, score_rollout

    spec = importlib.util.spec_from_file_location("_gpu_check_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    window, g = 4, torch.Generator().manual_seed(0)
    truth = 1.0 + torch.rand(5, 15, 6, generator=g, dtype=torch.float64)
    mix = torch.rand(6, 6, generator=g, dtype=torch.float64) / 3

    class Forecaster:
        def predict(self, x):
            return torch.tanh(x @ mix).roll(1, dims=1)

    model = Forecaster()
    model.window = window
    nmse, per_trajectory = script.rollout_nmse(model.predict, window, truth, batch_size=2)
    reference = score_rollout(rollout(model, truth, 2), truth.numpy(), window)
    assert nmse == pytest.approx(reference.nmse, rel=1e-12)
    np.testing.assert_allclose(per_trajectory, reference.per_trajectory, rtol=1e-12)
