"""Helpers for the workflow and command tests: the tiny config, a scratch working directory,
running the real `snakemake` and `smnn` commands, and the checks that a finished tiny pipeline
must pass (local or SLURM).

One config: tests/configs/tiny.yaml (:data:`TINY_CONFIG`, every stage real, the pipeline in
minutes). The command tests (one `smnn` job at a time) use it at a smaller scale:
:data:`CLI_CONFIG`, the same file with :data:`CLI_SCALE` (Lorenz in seconds, SST and KdV off).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
SLURM_CI_PROFILE = REPO / "tests" / "profiles" / "slurm-ci"

# what the workflow needs in its working directory (the repo's data/ and results/ stay untouched)
WORKFLOW_FILES = (
    "Snakefile",
    "workflow",
    "config",
    "environment.yml",
    "environment.post-deploy.sh",
)

# the two dominant terms of each Lorenz equation: (equation, term) -> sign of the true coefficient
LORENZ_DOMINANT_SIGNS = {
    ("x", "x"): -1,
    ("x", "y"): +1,
    ("y", "x"): +1,
    ("y", "x z"): -1,
    ("z", "z"): -1,
    ("z", "x y"): +1,
}


def make_workdir(path: Path) -> Path:
    """A directory that runs the repo's workflow: symlinks to the Snakefile, workflow/, config/."""
    path.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        (path / name).symlink_to(REPO / name)
    return path


def tiny_config() -> dict:
    with open(TINY_CONFIG) as f:
        return yaml.safe_load(f)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge (override wins), on a deep copy of ``base``."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# the command tests' scale: a Lorenz job finishes in seconds on one core; SST and KdV off
CLI_SCALE: dict[str, Any] = {
    "benchmark": {"time_budget": 10},
    "lorenz": {
        "data": {"n_points": 400},
        "model": {"hidden": 16, "latent": 8, "threshold": 0.1},
        "train": {"cycles": 2, "epochs_per_cycle": 3, "batch_size": 32, "lr": 1.0e-3,
                  "max_windows": 96},
        "evaluate": {"simulate_points": 300},
    },
    "sst": {"enabled": False},
    "kdv": {"enabled": False},
}  # fmt: skip
CLI_CONFIG: dict[str, Any] = merge(tiny_config(), CLI_SCALE)


def write_config(directory: Path, override: dict | None = None, name: str = "config.yaml") -> Path:
    """Write :data:`CLI_CONFIG` (merged with ``override``) with paths inside ``directory``."""
    cfg = merge(CLI_CONFIG, override or {})
    cfg["paths"] = {"data": str(directory / "data"), "results": str(directory / "results")}
    path = directory / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def smnn_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no inherited MLflow URI, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def smnn_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "smnn", *map(str, args)]


def run_smnn(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``python -m smnn ARGS`` to completion; returns the CompletedProcess (text)."""
    return subprocess.run(
        smnn_command(*args),
        env=env or smnn_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_args(config: Path, data: Path, out: Path, solver: str = "smnn", *extra: str) -> list:
    return [
        "train", "--experiment", "lorenz", "--solver", solver, "--config", config,
        "--data", data, "--out", out, *extra,
    ]  # fmt: skip


def snakemake_env() -> dict[str, str]:
    """This interpreter's bin/ first on PATH (so jobs find `smnn`), no outside MLflow server."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def snakemake_command() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("snakemake")
    assert found, "the snakemake command is not installed"
    return [found]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    seconds: float

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr


def run_snakemake(
    workdir: Path, args: list[str], timeout: float = 1800, env: dict[str, str] | None = None
) -> Run:
    """Run `snakemake ARGS` in `workdir` (no profile of the user's home applies); `env` adds
    environment variables."""
    start = time.monotonic()
    proc = subprocess.run(
        [*snakemake_command(), *args],
        cwd=workdir,
        env={**snakemake_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(proc, time.monotonic() - start)


def failure_report(workdir: Path, run: Run) -> str:
    """Snakemake's output and the tail of every job log, for an assertion message."""
    parts = [f"exit code {run.proc.returncode}", run.output[-6000:]]
    for log in sorted((workdir / "results" / "logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(workdir)}\n" + log.read_text()[-3000:])
    for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(workdir)}\n" + log.read_text()[-3000:])
    return "\n".join(parts)


def expected_outputs(config: dict) -> list[str]:
    """Files (relative to the working directory) that the pipeline must produce for `config`."""
    files = [
        "results/config/effective.yaml",
        "results/mlflow.db",
        "results/standalone/metrics.json",
        "results/standalone/errors.csv",
        "results/standalone/errors.md",
        "results/standalone/solutions.png",
        "results/benchmark/bench.csv",
        "results/benchmark/bench.md",
        "results/benchmark/scaling_T.png",
        "results/benchmark/scaling_batch.png",
        "data/lorenz.zarr/zarr.json",
        "results/logs/standalone.log",
        "results/logs/benchmark.log",
        "results/logs/lorenz/generate.log",
    ]
    for solver in config["lorenz"]["solvers"]:
        files += [
            f"results/lorenz/{solver}/model.pt",
            f"results/lorenz/{solver}/train_metrics.json",
            f"results/lorenz/{solver}/eval/metrics.json",
            f"results/logs/lorenz/train_{solver}.log",
            f"results/logs/lorenz/evaluate_{solver}.log",
        ]
    if config["sst"]["enabled"]:
        files += ["data/sst.zarr/zarr.json", "results/logs/sst/preprocess.log"]
        for solver in config["sst"]["solvers"]:
            files += [
                f"results/sst/{solver}/model.pt",
                f"results/sst/{solver}/eval/metrics.json",
                f"results/logs/sst/evaluate_{solver}.log",
            ]
        for baseline in config["sst"]["baselines"]:
            files.append(f"results/sst/baseline_{baseline}/model.pt")
        if config["sst"]["scaling"]["enabled"]:
            files += [f"results/sst/scaling/{n}" for n in ("scaling.csv", "scaling.md")]
    if config["kdv"]["enabled"]:
        files += ["data/kdv.zarr/zarr.json", "results/logs/kdv/generate.log"]
        for solver in config["kdv"]["solvers"]:
            files += [
                f"results/kdv/{solver}/model.pt",
                f"results/kdv/{solver}/eval/metrics.json",
                f"results/logs/kdv/train_{solver}.log",
            ]
    return files


def check_kdv_outputs(workdir: Path, config: dict) -> None:
    """KdV end to end: the rollout NMSE of the model and of persistence, finite and per step,
    over the test trajectories asked for; plots."""
    kdv = config["kdv"]
    for solver in kdv["solvers"]:
        ev = json.loads((workdir / f"results/kdv/{solver}/eval/metrics.json").read_text())
        assert ev["experiment"] == "kdv" and ev["solver"] == solver
        assert ev["source"] == kdv["source"]
        assert set(ev["models"]) == {"model", "persistence"}, sorted(ev["models"])
        n_scored = kdv["generate"]["n_kept"] - kdv["model"]["window"]
        for name, score in ev["models"].items():
            assert math.isfinite(score["nmse"]) and score["nmse"] > 0, (name, score)
            assert len(score["nmse_by_step"]) == n_scored, (name, len(score["nmse_by_step"]))
        wanted = kdv["evaluate"]["n_trajectories"] or kdv["generate"]["n_test"]
        assert ev["data"]["n_trajectories_scored"] == wanted
        plots = sorted((workdir / f"results/kdv/{solver}/eval/plots").glob("*.png"))
        assert len(plots) >= 2, plots


def check_sst_outputs(workdir: Path, config: dict) -> None:
    """SST end to end: every model and baseline scored with finite MSEs, synthetic data said
    so, plots, and a scaling row for every (length, solver)."""
    sst = config["sst"]
    expected_models = {"mechanistic_identifier", "climatology", "persistence"}
    expected_models |= set(sst["baselines"])
    for solver in sst["solvers"]:
        ev = json.loads((workdir / f"results/sst/{solver}/eval/metrics.json").read_text())
        assert ev["experiment"] == "sst" and ev["solver"] == solver
        assert ev["synthetic"] is (sst["source"] == "synthetic")
        assert set(ev["models"]) == expected_models, sorted(ev["models"])
        bad = [(k, v) for k, v in _finite_numbers(ev["models"]) if not math.isfinite(v)]
        assert not bad, f"non-finite SST metrics for {solver}: {bad[:5]}"
        for model in expected_models:
            assert ev["models"][model]["mse_norm"] > 0, (model, ev["models"][model])
            assert len(ev["models"][model]["mse_by_lead_norm"]) > 0
        plots = sorted((workdir / f"results/sst/{solver}/eval/plots").glob("*.png"))
        assert len(plots) >= 4, plots
        for png in plots:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    if sst["scaling"]["enabled"]:
        import pandas as pd

        table = pd.read_csv(workdir / "results/sst/scaling/scaling.csv")
        pairs = set(zip(table["length"], table["solver"], strict=True))
        wanted = {(n, s) for n in sst["scaling"]["lengths"] for s in sst["scaling"]["solvers"]}
        assert pairs == wanted, sorted(pairs)
        ok = table[table["status"] == "ok"]
        assert len(ok) and (ok["time_ms"] > 0).all() and ok["time_ms"].map(math.isfinite).all()


def _finite_numbers(obj, where="") -> list[tuple[str, float]]:
    """Every number inside a JSON value, with its path."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _finite_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append((where, float(obj)))
    return out


def check_pipeline_outputs(workdir: Path, config: dict) -> dict:
    """Assert what a finished tiny pipeline must show; returns the Lorenz eval metrics by solver."""
    missing = [f for f in expected_outputs(config) if not (workdir / f).is_file()]
    assert not missing, f"missing outputs: {missing}"
    empty = [f for f in expected_outputs(config) if (workdir / f).stat().st_size == 0]
    assert not empty, f"empty outputs: {empty}"

    # the jobs ran with exactly the validated config of this run
    with open(workdir / "results/config/effective.yaml") as f:
        assert yaml.safe_load(f) == config

    # plots are real PNG files
    pngs = [
        workdir / "results/standalone/solutions.png",
        workdir / "results/benchmark/scaling_T.png",
    ]
    for solver in config["lorenz"]["solvers"]:
        plots = sorted((workdir / f"results/lorenz/{solver}/eval/plots").glob("*.png"))
        assert plots, f"no evaluation plots for {solver}"
        pngs += plots
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"

    # standalone: every error finite, S-MNN accurate on y (observed 1e-6..3e-4 in the paper)
    standalone = json.loads((workdir / "results/standalone/metrics.json").read_text())
    bad = [(k, v) for k, v in _finite_numbers(standalone) if not math.isfinite(v)]
    assert not bad, f"non-finite standalone metrics: {bad[:5]}"
    smnn_cases = [c for c in standalone["cases"] if c["solver"] == "smnn"]
    assert len(smnn_cases) >= 6
    for case in smnn_cases:
        y_err = case["vs_closed_form"]["y"]["max"]
        assert y_err < 1e-2, f"S-MNN error on y too large for {case['equation']}: {y_err}"

    # benchmark: the table has measured S-MNN cases with positive finite times
    import pandas as pd

    bench = pd.read_csv(workdir / "results/benchmark/bench.csv")
    ok = bench[bench["status"] == "ok"]
    assert len(ok) > 0, "no benchmark case was measured"
    assert (ok["median_ms"] > 0).all() and ok["median_ms"].map(math.isfinite).all()
    assert "smnn" in set(ok["method"])

    if config["sst"]["enabled"]:
        check_sst_outputs(workdir, config)
    if config["kdv"]["enabled"]:
        check_kdv_outputs(workdir, config)

    # lorenz: finite metrics, the sign pattern of every true term recovered
    evals = {}
    for solver in config["lorenz"]["solvers"]:
        train = json.loads((workdir / f"results/lorenz/{solver}/train_metrics.json").read_text())
        bad = [(k, v) for k, v in _finite_numbers(train) if not math.isfinite(v)]
        assert not bad, f"non-finite training metrics for {solver}: {bad[:5]}"
        ev = json.loads((workdir / f"results/lorenz/{solver}/eval/metrics.json").read_text())
        assert ev["solver"] == solver
        bad = [(k, v) for k, v in _finite_numbers(ev["metrics"]) if not math.isfinite(v)]
        assert not bad, f"non-finite evaluation metrics for {solver}: {bad[:5]}"
        check_lorenz_signs(ev)
        evals[solver] = ev
    return evals


def check_lorenz_signs(ev: dict) -> None:
    """The dominant terms of every Lorenz equation are recovered with their true sign."""
    terms = ev["terms"]
    coef = ev["coefficients"]  # (n_terms, 3): column j = the equation of variable j
    variables = ["x", "y", "z"]
    problems = []
    for (eq, term), sign in LORENZ_DOMINANT_SIGNS.items():
        got = coef[terms.index(term)][variables.index(eq)]
        if not got * sign > 0:
            problems.append(f"d{eq}/dt term {term!r}: {got:.4g}, true sign {sign:+d}")
    truth = ev["true_coefficients"]
    for (eq, term), sign in LORENZ_DOMINANT_SIGNS.items():
        assert truth[terms.index(term)][variables.index(eq)] * sign > 0, "truth table mismatch"
    assert not problems, (
        "Lorenz sign pattern not recovered:\n  "
        + "\n  ".join(problems)
        + (f"\nrecovered: {ev.get('equations')}")
    )
