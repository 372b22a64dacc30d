"""The tiny pipeline through a real SLURM cluster with the workflow's SLURM profile.

Needs `sbatch` and a responding controller (`.ci/slurm-setup.sh` sets one up on Debian as root).
Without them the test is skipped, unless SMNN_REQUIRE_SLURM=1 (set by .ci/run): then it fails.
The override profile tests/profiles/slurm-ci (no GPU, status from squeue) is layered on top of
workflow/profiles/slurm.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from pipeline_support import (
    SLURM_CI_PROFILE,
    SLURM_PROFILE,
    TINY_CONFIG,
    check_pipeline_outputs,
    failure_report,
    make_workdir,
    run_snakemake,
    tiny_config,
)

pytestmark = pytest.mark.slow

SUBMITTED_RULES = ("standalone", "benchmark_solver", "generate_lorenz", "train",
                   "evaluate", "synthesize_sst", "preprocess_sst", "sst_scaling",
                   "generate_kdv")  # fmt: skip
# jobs of the tiny config: train and evaluate run once per experiment (lorenz, sst, kdv), train
# once more for SST's baseline
N_SUBMITTED_JOBS = len(SUBMITTED_RULES) + 2 * 2 + 1


def _slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when it can."""
    for tool in ("sbatch", "squeue", "sinfo"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (run .ci/slurm-setup.sh as root)"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if states.returncode != 0:
        return f"sinfo failed: {states.stderr.strip()}"
    usable = {"idle", "mix", "alloc", "comp"}
    if not usable & set(states.stdout.split()):
        return f"no usable SLURM node (sinfo states: {states.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("SMNN_REQUIRE_SLURM") == "1":
            pytest.fail(f"SMNN_REQUIRE_SLURM=1 but SLURM is not usable: {problem}")
        pytest.skip(f"SLURM not available: {problem}")


def test_tiny_pipeline_through_slurm(slurm, tmp_path):
    work = make_workdir(tmp_path / "slurm")
    args = [
        "--profile",
        str(SLURM_PROFILE),
        "--profile",
        str(SLURM_CI_PROFILE),
        "--configfile",
        str(TINY_CONFIG),
        "--cores",
        "1",
    ]
    run = run_snakemake(work, args, timeout=2400)
    assert run.proc.returncode == 0, failure_report(work, run)
    print(f"\ntiny pipeline through SLURM: {run.seconds:.0f} s")

    # every job but `all` went through sbatch: the plugin names a SLURM job id per job and keeps
    # the SLURM log of each (slurm-keep-successful-logs in the CI profile)
    for rule in SUBMITTED_RULES:
        assert f"(Rule: {rule})" in run.output, run.output
        logs = list((work / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob("*.log"))
        assert logs, f"no SLURM log for {rule}"
    assert run.output.count("has been submitted with SLURM jobid") == N_SUBMITTED_JOBS
    assert "localrule all" in run.output

    # the same outputs as the local run, passing the same checks
    check_pipeline_outputs(work, tiny_config())
