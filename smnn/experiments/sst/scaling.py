"""The SST long-sequence study (rule ``sst_scaling``): cost of a training step against length.

For each sequence length T of ``sst.scaling.lengths`` (weeks; the paper: 52, 104, 208, 416,
1727) and each solver of ``sst.scaling.solvers`` (``smnn``, ``mnn_dense``, ``mnn_cg``), the
Mechanistic Identifier is built with window = T and ``n_dct = T // 4`` DCT coefficients (its
other sizes from ``sst.model.*``) and one training step -- forward, loss, backward, Adam update
-- is measured on random (seeded) input windows of ``sst.scaling.batch_size`` systems, with
:func:`smnn.experiments.step_cost.measure_case`: median time of ``sst.scaling.repeats`` timed
steps (or more, until they add up to :data:`MIN_TIMED_S`; column ``repeats`` has the count)
after a warm-up step (synchronised on CUDA), and the peak memory of a step above the
memory in use before it (CUDA: the allocator's tensor statistics; CPU: the process's resident-set
high-water mark). ``dtype`` is ``sst.train.dtype``, the device ``device`` (auto: CUDA when
present).

Statuses (column ``status``):

- ``ok``: measured;
- ``out_of_memory``: the solver's predicted memory (:func:`smnn.memory.solver_step_bytes`:
  MNN dense's three dense matrices, S-MNN's and MNN CG's measured factors; column
  ``predicted_mb``) exceeds
  the budget ``sst.scaling.memory_budget_gb`` (null: 80 % of the machine's RAM, or of the GPU's
  memory on CUDA); the case is not run, so the workflow never crashes on it. Also when a run
  itself hit the allocator's limit;
- ``skipped_slow``: once a case of a solver takes longer than the time budget per step, the
  solver's longer lengths are not run (:data:`TIME_BUDGET_S` seconds by default;
  ``sst.scaling.time_budget`` or ``--time-budget``). The case over the budget is still measured,
  from two timed steps (``repeats`` 2, said in ``note``); only a warm-up step over five budgets
  ends a case unmeasured (``skipped_slow`` itself). This keeps the demo within about a minute on
  a CPU, where MNN dense's O(T^3) factorization and MNN CG's 200 iterations grow fast;
- ``failed``: the case raised; the message is in ``note``; the study goes on.

Convergence (column ``converged``): for a solver that reports it (``mnn_cg``), whether every CG
solve of the case's measured steps (warm-up included) reached its tolerance, collected with
:func:`smnn.solver.mnn.record_convergence`; empty for direct solvers and for cases not run.
A case that did not converge is measured like any other, but its label reads ``mnn_cg (not
converged)`` (:func:`smnn.solver.mnn.convergence_label`) in the progress line, the Markdown
table and the figure's legend: its time is that of 200 iterations that stop short of a solution.

Outputs (in ``out``): ``scaling.csv`` (one row per length and solver: length, solver, status,
converged, time_ms, min_ms, warmup_ms, peak_mb, predicted_mb, device, dtype, threads,
batch_size, repeats, note), ``scaling.png`` (log-log time and memory against length, one line
per solver, cases out of memory marked at their predicted memory), ``scaling.md`` (the table,
and the smnn / mnn_dense
time and memory ratios at 208 weeks beside the paper's: 4.9x faster with half the memory; MNN
dense out of memory beyond 104 weeks on an 80 GB GPU at the paper's batch) and one MLflow run in
the experiment ``sst``.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from smnn.config import Config, ConfigError
from smnn.data.windows import RowPartners, seeded_generator
from smnn.experiments.sst.settings import N_ORDERS, SstSettings
from smnn.experiments.sst.tasks import MiTask, PairSampler
from smnn.experiments.step_cost import MB, StepCost, measure_case
from smnn.memory import memory_budget_bytes, solver_step_bytes
from smnn.solver.mnn import (
    ConvergenceRecord,
    converged_flag,
    convergence_label,
    record_convergence,
)
from smnn.solver.registry import solver_info, solver_names

__all__ = [
    "MLFLOW_EXPERIMENT",
    "OUTPUT_FILES",
    "COLUMNS",
    "TIME_BUDGET_S",
    "QUICK_TIME_BUDGET_S",
    "MIN_TIMED_S",
    "PAPER_LENGTH",
    "PAPER_SPEEDUP",
    "PAPER_MEMORY_RATIO",
    "PAPER_BATCH",
    "ScalingSettings",
    "StepFactory",
    "identifier_training_step",
    "run_study",
    "paper_comparison",
    "scaling_metrics",
    "scaling_markdown",
    "scaling_figure",
    "write_outputs",
    "log_scaling_run",
]

MLFLOW_EXPERIMENT = "sst"
OUTPUT_FILES = ("scaling.csv", "scaling.md", "scaling.png")
COLUMNS = [
    "length", "solver", "status", "converged", "time_ms", "min_ms", "warmup_ms", "peak_mb",
    "predicted_mb", "device", "dtype", "threads", "batch_size", "repeats", "note",
]  # fmt: skip
TIME_BUDGET_S = 2.0
QUICK_TIME_BUDGET_S = 0.5
MIN_TIMED_S = 0.25  # fast cases: timed steps repeated until they add up to this
_GRID = (4, 16)  # the random series' grid: 64 cells
# the paper's statement (EXPERIMENTS: SST): at 208 weeks S-MNN is 4.9x faster than MNN dense
# with half its memory; MNN dense runs out of memory beyond 104 weeks on an 80 GB GPU at the
# paper's batch of 6480 pairs (12,960 systems)
PAPER_LENGTH = 208
PAPER_SPEEDUP = 4.9
PAPER_MEMORY_RATIO = 0.5
PAPER_BATCH = 12960
PAPER_GPU_GB = 80.0


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingSettings:
    """The study's settings: ``sst.scaling.*``, and the model and training settings of
    ``sst.model.*`` / ``sst.train.*`` (:class:`smnn.experiments.sst.SstSettings`; window and
    ``n_dct`` follow the length, the batch is ``batch_size`` systems = ``batch_size / 2``
    pairs).

    Attributes:
        lengths: sequence lengths T (ascending, each > ``sst.model.n_init`` and >= 4).
        solvers: names of :mod:`smnn.solver.registry`.
        batch_size: systems per step (even: two views per pair).
        repeats: timed steps per case.
        memory_budget_gb: budget for predicted memory (None: 80 % of the device's memory).
        time_budget_s: seconds per step after which a solver's longer lengths are skipped.
        device: ``auto``, ``cpu`` or ``cuda``.
        model: the SST settings (dtype ``sst.train.dtype``, Adam's ``sst.train.lr``, seed).
        quick: quick mode (one timed step, a shorter time budget; outputs marked).
    """

    lengths: tuple[int, ...]
    solvers: tuple[str, ...]
    batch_size: int
    repeats: int
    memory_budget_gb: float | None
    time_budget_s: float
    device: str
    model: SstSettings
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("sst.scaling.lengths must hold at least one length")
        low = max(4, self.model.n_init + 1)
        bad = [t for t in self.lengths if isinstance(t, bool) or not isinstance(t, int) or t < low]
        if bad:
            raise ValueError(
                f"sst.scaling.lengths must be integers >= {low} (4 weeks for n_dct = T // 4 >= 1 "
                f"and more than sst.model.n_init = {self.model.n_init}), got {bad}"
            )
        for name in self.solvers:
            solver_info(name)  # ValueError listing the known names
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(
                "sst.scaling.batch_size counts systems, two views per pair: it must be even and "
                f">= 2, got {self.batch_size}"
            )
        if not self.time_budget_s > 0:
            raise ValueError(f"the time budget must be > 0 seconds, got {self.time_budget_s}")

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        model: SstSettings | None = None,
        quick: bool = False,
        time_budget_s: float | None = None,
    ) -> ScalingSettings:
        """Read the settings; ``model``: the job's SST settings (built from ``config`` when
        not given); ``time_budget_s`` (a flag) overrides ``sst.scaling.time_budget``
        (optional key), whose default is :data:`TIME_BUDGET_S` (:data:`QUICK_TIME_BUDGET_S`
        in quick mode). Quick mode times one step per case."""
        lengths = config.raw("sst.scaling.lengths")
        if not isinstance(lengths, list):
            raise ConfigError(f"{config.source}: sst.scaling.lengths must be a list of integers")
        if time_budget_s is None and config.raw("sst.scaling.time_budget", None) is not None:
            time_budget_s = config.get_float("sst.scaling.time_budget", positive=True)
        if time_budget_s is None:
            time_budget_s = QUICK_TIME_BUDGET_S if quick else TIME_BUDGET_S
        return cls(
            lengths=tuple(sorted(lengths)),
            solvers=tuple(config.get_str_list("sst.scaling.solvers", choices=solver_names())),
            batch_size=config.get_int("sst.scaling.batch_size", min_value=1),
            repeats=1 if quick else config.get_int("sst.scaling.repeats", min_value=1),
            memory_budget_gb=config.get_float(
                "sst.scaling.memory_budget_gb", positive=True, allow_none=True
            ),
            time_budget_s=float(time_budget_s),
            device=config.get_str("device", choices=("auto", "cpu", "cuda")),
            model=SstSettings.from_config(config) if model is None else model,
            quick=quick,
        )

    @property
    def dtype(self) -> str:
        return self.model.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.model.torch_dtype

    def params(self) -> dict[str, Any]:
        """The effective settings, flat (MLflow params ``scaling.<name>``; the model's settings
        are in the logged config)."""
        out = {k: v for k, v in asdict(self).items() if k != "model"}
        out.update(lengths=list(self.lengths), solvers=list(self.solvers), dtype=self.dtype)
        # the smnn solver's solve: sst.model.solve_dtype (null: the model's dtype) and method
        out.update(solve_dtype=self.model.solve_dtype or self.dtype,
                   solve_method=self.model.solve_method)  # fmt: skip
        return out


# --------------------------------------------------------------------------------------------
# The training step of one case
# --------------------------------------------------------------------------------------------

# (solver, length, settings, device) -> the case's training step (a callable, no arguments)
StepFactory = Callable[[str, int, "ScalingSettings", torch.device], Callable[[], Any]]


def identifier_training_step(
    solver: str,
    length: int,
    settings: ScalingSettings,
    device: torch.device,
) -> Callable[[], float]:
    """One training step of the Mechanistic Identifier at window ``length`` with ``solver``:
    :meth:`smnn.experiments.sst.MiTask.training_step` (forward and loss: DCT MSE plus the
    alignment term) on ``batch_size / 2`` random pairs, backward, Adam update -- what
    :class:`smnn.training.Trainer` does per step.

    The model has window = ``length``, ``n_dct = length // 4`` and the other sizes of
    ``sst.model.*``; it is initialised from torch's generator seeded with ``sst`` 's seed. The
    pairs come from :class:`smnn.experiments.sst.PairSampler` on a seeded random standardised
    series ``(2 * length, 64)`` (a 4 x 16 grid, partners at ``sst.model.neighbour_offsets``),
    new windows every step, as in training.
    """
    n_pairs = settings.batch_size // 2
    mi = replace(settings.model, window=length, n_dct=max(1, length // 4), batch_size=n_pairs,
                 windows_per_epoch=n_pairs)  # fmt: skip
    g = seeded_generator(mi.seed, "sst_scaling", length)
    series = torch.randn(2 * length, _GRID[0] * _GRID[1], generator=g, dtype=torch.float64)
    sampler = PairSampler(
        series.to(device=device, dtype=mi.torch_dtype),
        RowPartners(_GRID, mi.neighbour_offsets),
        mi.window,
        mi.windows_per_epoch,
    )
    torch.manual_seed(mi.seed)
    task = MiTask(mi, sampler, None, solver, device)  # the store: not read by training steps
    optimizer, _ = task.configure_optimizers()
    indices = torch.arange(n_pairs)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.training_step(indices)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def _mb(nbytes: int | None) -> float:
    return math.nan if nbytes is None else nbytes / MB


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _progress_line(row: Mapping[str, Any], done: int, total: int, elapsed_s: float) -> str:
    """``[sst-scaling 3/15 0:12] mnn_dense T=208: 812 ms (median of 3), 310 MB``."""
    minutes, seconds = divmod(int(elapsed_s), 60)
    name = convergence_label(row["solver"], row.get("converged"))
    head = f"[sst-scaling {done}/{total} {minutes}:{seconds:02d}] {name} T={row['length']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row['note']})"
    text = f"{head}: {row['time_ms']:.4g} ms (median of {row['repeats']}), {row['peak_mb']:.4g} MB"
    return f"{text}; {row['note']}" if row["note"] else text


def _recorded_case(
    make_step: StepFactory,
    solver: str,
    length: int,
    settings: ScalingSettings,
    device: torch.device,
    record: ConvergenceRecord,
) -> Callable[[], Callable[[], Any]]:
    """The case's step factory for :func:`measure_case`: the steps of a solver that reports
    convergence (``mnn_cg``) collect their CG convergence warnings into ``record`` (one summary
    per case instead of a warning per solve, and never lost in the step's warning note);
    other solvers' steps are returned as they are."""

    def build() -> Callable[[], Any]:
        step = make_step(solver, length, settings, device)
        if not solver_info(solver).reports_convergence:
            return step  # a direct solver: its timed step untouched

        def run() -> Any:
            with record_convergence(into=record):
                return step()

        return run

    return build


def _compile(
    make_step: StepFactory,
    solver: str,
    settings: ScalingSettings,
    device: torch.device,
) -> None:
    """One step of ``solver`` at the shortest length with 2 systems, untimed: compiles the
    solver's kernels, so compilation never counts against the time budget of a case. Errors are
    left to the measured cases, which report their own."""
    small = replace(settings, batch_size=min(2, settings.batch_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            make_step(solver, settings.lengths[0], small, device)()
        except Exception:  # the measured case reports it
            pass


def run_study(
    settings: ScalingSettings,
    device: torch.device,
    *,
    make_step: StepFactory = identifier_training_step,
    progress: Callable[[str], None] | None = _print,
):
    """Measure every length x solver (module docstring); a pandas DataFrame with
    :data:`COLUMNS`, rows by length (ascending), then solver in the given order.

    Args:
        settings: the study's settings.
        device: where the steps run.
        make_step: ``(solver, length, settings, device) -> step``, the training step of a case.
        progress: called with one line per case (default: stderr, flushed); None for silence.
    """
    import pandas as pd

    budget = memory_budget_bytes(device, settings.memory_budget_gb)
    threads = torch.get_num_threads()
    slow: dict[str, str] = {}  # solver -> why its longer lengths are skipped
    for solver in settings.solvers:
        _compile(make_step, solver, settings, device)
    rows: list[dict[str, Any]] = []
    total = len(settings.lengths) * len(settings.solvers)
    start = time.perf_counter()
    for length in settings.lengths:
        for solver in settings.solvers:
            # every solver's predicted peak (MNN dense: 3 dense matrices; banded and CG:
            # measured factors), so each is out_of_memory when over the budget, not only dense
            predicted = solver_step_bytes(
                solver, settings.batch_size, length, 1, N_ORDERS, settings.torch_dtype
            )
            converged = None  # not run, or nothing to converge
            if solver in slow and not (predicted is not None and predicted > budget):
                cost = StepCost("skipped_slow", predicted_mb=_mb(predicted), note=slow[solver])
            else:
                cg = ConvergenceRecord()  # the case's CG solves, warm-up included
                cost = measure_case(
                    _recorded_case(make_step, solver, length, settings, device, cg),
                    device,
                    repeats=settings.repeats,
                    time_budget_s=settings.time_budget_s,
                    min_timed_s=MIN_TIMED_S,
                    predicted_bytes=predicted,
                    budget_bytes=budget,
                )
                if cost.status == "ok" and (cg.solves or solver_info(solver).reports_convergence):
                    converged = cg.converged
                    if not converged:
                        note = "; ".join(filter(None, [cost.note, cg.summary()]))
                        cost = replace(cost, note=note)
                took_ms = cost.time_ms if cost.status == "ok" else cost.warmup_ms
                if took_ms > 1e3 * settings.time_budget_s:  # NaN: False
                    slow[solver] = (
                        f"skipped: a step at T={length} took {took_ms / 1e3:.1f} s > time budget "
                        f"{settings.time_budget_s:g} s"
                    )
            row = {
                "length": length,
                "solver": solver,
                **cost.as_row(),
                "converged": converged,
                "device": str(device),
                "dtype": settings.dtype,
                "threads": threads,
                "batch_size": settings.batch_size,
            }
            rows.append(row)
            if progress is not None:
                progress(_progress_line(row, len(rows), total, time.perf_counter() - start))
    table = pd.DataFrame(rows)
    table["memory_budget_mb"] = budget / MB
    return table[[*COLUMNS, "memory_budget_mb"]]


# --------------------------------------------------------------------------------------------
# Comparison with the paper, metrics
# --------------------------------------------------------------------------------------------


def _ok_row(table, solver: str, length: int):
    part = table[(table["solver"] == solver) & (table["length"] == length)]
    if part.empty or part["status"].iloc[0] != "ok":
        return None
    return part.iloc[0]


def paper_comparison(table, length: int = PAPER_LENGTH) -> dict[str, Any]:
    """smnn / mnn_dense at ``length``: ``time_ratio`` (time of smnn over mnn_dense; the paper:
    1 / 4.9), ``speedup`` (its inverse; the paper: 4.9), ``memory_ratio`` (peak of smnn over
    mnn_dense; the paper: 0.5), NaN when either case was not measured (``reason`` says why).
    ``dense_limit``: the longest length at which mnn_dense was measured (None if none)."""
    out: dict[str, Any] = {"length": length, "time_ratio": math.nan, "speedup": math.nan,
                           "memory_ratio": math.nan, "reason": ""}  # fmt: skip
    smnn, dense = _ok_row(table, "smnn", length), _ok_row(table, "mnn_dense", length)
    if smnn is None or dense is None:
        missing = [
            f"{name} at T={length} is {_status(table, name, length)}"
            for name, row in (("smnn", smnn), ("mnn_dense", dense))
            if row is None
        ]
        out["reason"] = "; ".join(missing)
    else:
        out["time_ratio"] = smnn["time_ms"] / dense["time_ms"]
        out["speedup"] = dense["time_ms"] / smnn["time_ms"]
        out["memory_ratio"] = smnn["peak_mb"] / dense["peak_mb"]
    ok_dense = table[(table["solver"] == "mnn_dense") & (table["status"] == "ok")]
    out["dense_limit"] = int(ok_dense["length"].max()) if not ok_dense.empty else None
    return out


def _status(table, solver: str, length: int) -> str:
    part = table[(table["solver"] == solver) & (table["length"] == length)]
    return "not in the study" if part.empty else str(part["status"].iloc[0])


def scaling_metrics(table, comparison: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``time_ms_<solver>_T<len>``, ``min_ms_...``, ``peak_mb_...`` of the
    measured cases, ``predicted_mb_mnn_dense_T<len>``, the comparison at the paper's length
    (``time_ratio_smnn_over_mnn_dense_T208``, ``speedup_smnn_vs_mnn_dense_T208``,
    ``memory_ratio_smnn_over_mnn_dense_T208``, with ``paper_...`` beside them), counts per
    status (``n_ok``, ``n_out_of_memory`` ...) and ``converged_<solver>_T<len>`` (1/0) of the
    measured cases of a solver that reports convergence (``mnn_cg``)."""
    metrics: dict[str, float] = {}
    for _, r in table.iterrows():
        key = f"{r['solver']}_T{r['length']}"
        if r["status"] == "ok":
            metrics[f"time_ms_{key}"] = float(r["time_ms"])
            metrics[f"min_ms_{key}"] = float(r["min_ms"])
            metrics[f"peak_mb_{key}"] = float(r["peak_mb"])
        if math.isfinite(r["predicted_mb"]):
            metrics[f"predicted_mb_{key}"] = float(r["predicted_mb"])
        flag = converged_flag(r.get("converged"))
        if flag is not None:  # mnn_cg's measured cases: 1 converged, 0 stopped at the cap
            metrics[f"converged_{key}"] = float(flag)
    suffix = f"smnn_over_mnn_dense_T{comparison['length']}"
    for name in ("time_ratio", "memory_ratio"):
        if math.isfinite(comparison[name]):
            metrics[f"{name}_{suffix}"] = float(comparison[name])
    if math.isfinite(comparison["speedup"]):
        metrics[f"speedup_smnn_vs_mnn_dense_T{comparison['length']}"] = comparison["speedup"]
    metrics["paper_speedup_smnn_vs_mnn_dense_T208"] = PAPER_SPEEDUP
    metrics["paper_memory_ratio_smnn_over_mnn_dense_T208"] = PAPER_MEMORY_RATIO
    for status, count in table["status"].value_counts().items():
        metrics[f"n_{status}"] = float(count)
    return metrics


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _fmt(value: float, unit: str = "") -> str:
    return "" if not math.isfinite(value) else f"{value:.4g}{unit}"


def scaling_markdown(
    table, comparison: Mapping[str, Any], settings: ScalingSettings, environment: Mapping
) -> str:
    """``scaling.md``: the settings, the table and the comparison with the paper."""
    device = str(table["device"].iloc[0]) if len(table) else "?"
    budget_gb = float(table["memory_budget_mb"].iloc[0]) / 1e3 if len(table) else math.nan
    lines = [
        "# SST long-sequence study: one training step against sequence length",
        "",
        f"Mechanistic Identifier, window = T and n_dct = T // 4, batch {settings.batch_size} "
        f"systems, {settings.dtype}, device {device}, {table['threads'].iloc[0]} thread(s); "
        f"median of at least {settings.repeats} timed step(s) (fast steps repeated until "
        f"{MIN_TIMED_S:g} s) after a warm-up step; peak memory of a step "
        "above the memory in use before it (CPU: resident-set high-water mark; CUDA: allocated "
        f"tensors). Memory budget {budget_gb:.3g} GB, time budget {settings.time_budget_s:g} s "
        "per step. Timings on a shared machine are noisy.",
        "",
    ]
    if settings.quick:
        lines += ["**Quick mode: one timed step per case, indicative only.**", ""]
    lines += [
        "| T (weeks) | solver | status | time (ms) | peak (MB) | predicted (MB) | note |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for _, r in table.iterrows():
        note = str(r["note"]).replace("|", "/")
        name = convergence_label(r["solver"], r.get("converged"))
        lines.append(
            f"| {r['length']} | {name} | {r['status']} | {_fmt(r['time_ms'])} | "
            f"{_fmt(r['peak_mb'])} | {_fmt(r['predicted_mb'])} | {note} |"
        )
    length = comparison["length"]
    lines += ["", f"## smnn against mnn_dense at {length} weeks, beside the paper", ""]
    if math.isfinite(comparison["time_ratio"]):
        lines += [
            "| | this run | paper |",
            "|---|---:|---:|",
            f"| smnn speed-up over mnn_dense (time mnn_dense / smnn) | "
            f"{comparison['speedup']:.3g}x | {PAPER_SPEEDUP:g}x |",
            f"| time ratio smnn / mnn_dense | {comparison['time_ratio']:.3g} | "
            f"{1 / PAPER_SPEEDUP:.3g} |",
            f"| memory ratio smnn / mnn_dense | {comparison['memory_ratio']:.3g} | "
            f"{PAPER_MEMORY_RATIO:g} |",
        ]
    else:
        lines.append(
            f"Not available: {comparison['reason']}. The paper: smnn {PAPER_SPEEDUP:g}x faster "
            f"than mnn_dense (time ratio {1 / PAPER_SPEEDUP:.3g}), memory ratio "
            f"{PAPER_MEMORY_RATIO:g}."
        )
    limit = comparison["dense_limit"]
    paper_bytes = solver_step_bytes(
        "mnn_dense", PAPER_BATCH, PAPER_LENGTH, 1, N_ORDERS, torch.float32
    )
    paper_gb = paper_bytes / 1e9
    lines += [
        "",
        f"MNN dense measured up to {limit if limit is not None else 'no'} weeks here; the paper "
        f"reports it out of memory beyond 104 weeks on an {PAPER_GPU_GB:g} GB GPU at its batch "
        f"of {PAPER_BATCH} systems (our dense solver's prediction there at {PAPER_LENGTH} "
        f"weeks, float32: {paper_gb:.3g} GB).",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()),
        "",
    ]
    return "\n".join(lines)


def scaling_figure(table, quick: bool = False):
    """Time (left) and peak memory (right) against length, log-log, one line per solver; cases
    out of memory drawn as crosses at their predicted memory (right) and a dotted line at their
    length (left); the memory budget as a horizontal line when a case comes within a factor
    100 of it."""
    from smnn.plotting import QUICK_NOTE, mark_quick, new_figure

    fig, (ax_t, ax_m) = new_figure(1, 2, size=(11, 4.4))
    for i, (solver, part) in enumerate(table.groupby("solver", sort=False)):
        color = f"C{i % 10}"
        ok = part[part["status"] == "ok"].sort_values("length")
        unconverged = any(converged_flag(c) is False for c in ok.get("converged", []))
        label = convergence_label(solver_info(solver).label, False if unconverged else None)
        ax_t.plot(ok["length"], ok["time_ms"], "o-", color=color, ms=4, label=label)
        ax_m.plot(ok["length"], ok["peak_mb"].clip(lower=1e-3), "o-", color=color, ms=4,
                  label=label)  # fmt: skip
        oom = part[part["status"] == "out_of_memory"]
        if not oom.empty:
            ax_m.plot(oom["length"], oom["predicted_mb"], "x", color=color, ms=9, mew=2,
                      label=f"{label}: out of memory (predicted)")  # fmt: skip
            for t in oom["length"]:
                ax_t.axvline(t, color=color, ls=":", lw=1)
            ax_t.plot([], [], ":", color=color, label=f"{label}: out of memory")
        slow = part[part["status"] == "skipped_slow"]
        if not slow.empty:
            ax_t.plot([], [], " ", label=f"{label}: skipped (slow) at T >= {slow['length'].min()}")
    budget_mb = float(table["memory_budget_mb"].iloc[0]) if len(table) else math.nan
    highest = table[["peak_mb", "predicted_mb"]].max().max() if len(table) else math.nan
    if (table["status"] == "out_of_memory").any() or highest > budget_mb / 100:
        ax_m.axhline(budget_mb, color="0.5", ls="--", lw=1,
                     label="memory budget")  # fmt: skip
    # a log axis needs a positive value: with no case measured (e.g. every case out of
    # memory) the time panel says so and stays linear
    measured = bool((table["status"] == "ok").any())
    drawn_memory = measured or bool(((table["status"] == "out_of_memory")
                                     & (table["predicted_mb"] > 0)).any())  # fmt: skip
    panels = ((ax_t, "training step time (ms, median)", measured),
              (ax_m, "peak memory (MB)", drawn_memory))  # fmt: skip
    for ax, ylabel, has_data in panels:
        ax.set_xscale("log")
        if has_data:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no measured cases", ha="center", transform=ax.transAxes)
        ax.set_xlabel("sequence length T (weeks)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    title = "SST: Mechanistic Identifier training step against sequence length"
    if len(table):
        title += f" (batch {table['batch_size'].iloc[0]}, {table['dtype'].iloc[0]}, "
        title += f"{table['device'].iloc[0]})"
    fig.suptitle(title + (f"\n{QUICK_NOTE}" if quick else ""), fontsize=10)
    return mark_quick(fig) if quick else fig


def write_outputs(
    table,
    out: Path,
    settings: ScalingSettings,
    environment: Mapping[str, Any],
) -> dict[str, Any]:
    """Write :data:`OUTPUT_FILES` into ``out``; returns the comparison with the paper."""
    from smnn.io import atomic_write, atomic_write_text
    from smnn.plotting import save_figure

    out = Path(out)
    comparison = paper_comparison(table)
    atomic_write(out / "scaling.csv", lambda f: table.to_csv(f, index=False))
    atomic_write_text(
        scaling_markdown(table, comparison, settings, environment), out / "scaling.md"
    )
    save_figure(scaling_figure(table, settings.quick), out / "scaling.png", dpi=110)
    return comparison


def log_scaling_run(
    target,
    out: Path,
    table,
    comparison: Mapping[str, Any],
    settings: ScalingSettings,
    environment: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    config_data: Mapping[str, Any] | None = None,
    run_name: str = "sst_scaling",
) -> str:
    """One finished run in the MLflow experiment ``sst``: tags (:func:`smnn.tracking.job_tags`),
    params (the config flattened, ``scaling.<name>``, ``env.<name>``), the metrics of
    :func:`scaling_metrics` and the output files as artifacts; returns its run id."""
    from smnn.tracking import RunTracker

    with RunTracker.start(target, MLFLOW_EXPERIMENT, run_name, tags=dict(tags or {})) as tracker:
        if config_data is not None:
            tracker.log_config(config_data)
        tracker.log_params({f"scaling.{k}": v for k, v in settings.params().items()})
        tracker.log_params({f"env.{k}": v for k, v in environment.items()})
        tracker.log_metrics(scaling_metrics(table, comparison))
        for name in OUTPUT_FILES:
            tracker.log_artifact(Path(out) / name)
    return tracker.run_id
