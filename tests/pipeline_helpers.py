"""Helpers for the pipeline tests (config files, running the real ``smnn`` CLI in a subprocess)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# A complete config at toy scale (every key: `smnn` commands validate the whole file): jobs
# finish in seconds on one core.
TINY_CONFIG: dict[str, Any] = {
    "device": "cpu",
    "seed": 0,
    "threads": 1,
    "paths": {"data": "data", "results": "results"},
    "mlflow": {"tracking_uri": None, "artifact_location": None},
    "standalone": {"enabled": True},
    "benchmark": {
        "enabled": True,
        "quick": True,
        "methods": ["smnn"],
        "dtypes": ["float64"],
        "time_budget": 10,
    },
    "lorenz": {
        "enabled": True,
        "solvers": ["smnn"],
        "data": {
            "n_points": 400,
            "dt": 0.01,
            "initial_state": [1.0, 1.0, 1.0],
            "sigma": 10.0,
            "rho": 28.0,
            "beta": 8.0 / 3.0,
            "window": 20,
            "noise": 0.0,
        },
        "model": {"hidden": 16, "latent": 8, "threshold": 0.1},
        "train": {
            "cycles": 2,
            "epochs_per_cycle": 3,
            "batch_size": 32,
            "lr": 1.0e-3,
            "dtype": "float64",
            "max_windows": 96,
        },
        "evaluate": {"simulate_points": 300},
    },
}


# SST and KdV at the tiny scale of tests/configs/tiny.yaml (one definition), off unless a test
# enables them
for _name in ("sst", "kdv"):
    TINY_CONFIG[_name] = {
        **yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())[_name],
        "enabled": False,
    }


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge (override wins), on a deep copy of ``base``."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_config(directory: Path, override: dict | None = None, name: str = "config.yaml") -> Path:
    """Write TINY_CONFIG (merged with ``override``) with paths inside ``directory``."""
    cfg = merge(TINY_CONFIG, override or {})
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
