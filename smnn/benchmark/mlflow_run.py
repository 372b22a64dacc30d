"""The benchmark's MLflow run: one run in the experiment ``benchmark`` per benchmark job.

- tags: the caller's (:func:`smnn.tracking.job_tags`: git commit, rule, config file ...);
- params: the effective settings as ``bench.<name>`` (``bench.methods``, ``bench.repeats``,
  ``bench.device`` ...: after flags, config and defaults are combined), the machine's
  environment as ``env.<name>``, and the whole config (flattened, ``benchmark.quick`` ...,
  as every job logs it) when the job read one;
- metrics, per measured row ``<method>.<dtype>.<case>``: ``time_ms``, ``min_time_ms``,
  ``max_time_ms``, ``peak_mb``; ``error_median`` and ``error_max`` (against the float64
  reference solve, :mod:`smnn.benchmark.accuracy`) wherever measured; for every method that is
  not S-MNN, ``time_ratio`` and ``memory_ratio`` (its time and peak over those of the best
  S-MNN method of the case); ``converged`` (1 or 0) for iterative methods (MNN CG: 0 when a
  forward or backward solve stopped at its iteration cap); the floors as
  ``floor_ms.<dtype>.<case>`` and ``floor_ratio...``, and the machine's rates; with
  ``--contention``, ``contention_ms.<method>.<dtype>.<case>.<load>.t<threads>`` (median) and
  ``contention_max_ms...`` (worst step);
- artifacts: the output files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smnn.solver.mnn import converged_flag
from smnn.tracking import RunTracker, TrackingTarget

__all__ = ["EXPERIMENT", "benchmark_metrics", "log_benchmark_run"]

EXPERIMENT = "benchmark"


def _finite(value) -> bool:
    return value is not None and value == value and abs(value) != float("inf")


def benchmark_metrics(table, floors, contention=None) -> dict[str, float]:
    """The metrics of the module docstring from the table, the floors and the contention
    table (:func:`smnn.benchmark.contention.run_contention`, optional)."""
    metrics: dict[str, float] = {}
    for _, r in table.iterrows():
        key = f"{r['method']}.{r['dtype']}.{r['case']}"
        for column in ("error_median", "error_max"):
            if _finite(r.get(column)):
                metrics[f"{column}.{key}"] = r[column]
    for _, r in table[table["status"] == "ok"].iterrows():
        key = f"{r['method']}.{r['dtype']}.{r['case']}"
        metrics[f"time_ms.{key}"] = r["median_ms"]
        metrics[f"min_time_ms.{key}"] = r["min_ms"]
        if _finite(r.get("max_ms")):
            metrics[f"max_time_ms.{key}"] = r["max_ms"]
        metrics[f"peak_mb.{key}"] = r["peak_mb"]
        converged = converged_flag(r.get("converged"))
        if converged is not None:
            metrics[f"converged.{key}"] = float(converged)
        if r["family"] != "smnn":
            for name, column in (
                ("time_ratio", "time_vs_best_smnn"),
                ("memory_ratio", "memory_vs_best_smnn"),
            ):
                if _finite(r[column]):
                    metrics[f"{name}.{key}"] = r[column]
        if _finite(r["max_rel_diff_vs_smnn"]):
            metrics[f"max_rel_diff_vs_smnn.{key}"] = r["max_rel_diff_vs_smnn"]
    if floors is not None and not floors.empty:
        for _, r in floors.iterrows():
            metrics[f"floor_ms.{r['dtype']}.{r['case']}"] = r["floor_ms"]
            if _finite(r["ratio"]):
                metrics[f"floor_ratio.{r['dtype']}.{r['case']}"] = r["ratio"]
        for dtype, rates in floors.groupby("dtype").first().iterrows():
            metrics[f"machine.bandwidth_gb_s.{dtype}"] = rates["bandwidth_gb_s"]
            metrics[f"machine.gflops.{dtype}"] = rates["gflops"]
    if contention is not None:
        for _, r in contention[contention["status"] == "ok"].iterrows():
            key = f"{r['method']}.{r['dtype']}.{r['case']}.{r['load']}.t{r['threads']}"
            metrics[f"contention_ms.{key}"] = r["median_ms"]
            metrics[f"contention_max_ms.{key}"] = r["max_ms"]
    return metrics


def log_benchmark_run(
    target: TrackingTarget,
    out: Path,
    files: Sequence[str],
    table,
    floors,
    params: Mapping[str, Any],
    environment: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    config_data: Mapping[str, Any] | None = None,
    run_name: str = "bench",
    contention=None,
) -> str:
    """One finished run in experiment ``benchmark``; returns its run id."""
    with RunTracker.start(target, EXPERIMENT, run_name, tags=dict(tags or {})) as tracker:
        if config_data is not None:
            tracker.log_config(config_data)
        tracker.log_params({f"bench.{k}": v for k, v in params.items()})
        tracker.log_params({f"env.{k}": v for k, v in (environment or {}).items()})
        tracker.log_metrics(benchmark_metrics(table, floors, contention))
        for name in files:
            if (out / name).exists():
                tracker.log_artifact(out / name)
    return tracker.run_id
