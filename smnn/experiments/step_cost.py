"""What one training step of a model costs: time, peak memory, and whether MNN dense would fit.

Shared by the long-sequence studies (SST ``sst_scaling``, KdV): a study builds, for one case (a
solver and a size), a *step* -- a callable that runs one whole training step (forward, loss,
backward, optimiser update) on fixed inputs -- and :func:`measure_case` measures it:

1. memory check first, without running anything: when a prediction of the case's memory is
   given (:func:`smnn.memory.solver_step_bytes`) and exceeds the budget
   (:func:`smnn.memory.memory_budget_bytes`), the case is ``out_of_memory`` and its step is
   never built;
2. ``warmup`` untimed steps (first-call costs: numba compilation, allocations, page faults, the
   optimiser's state; the first one's time is ``warmup_ms``); a warm-up step longer than
   :data:`SLOW_WARMUP_FACTOR` times the time budget ends the case as ``skipped_slow``;
3. one step under :func:`smnn.memory.measure_peak_memory` (it collects garbage and hands freed
   memory back to the operating system before the step; the step alone is timed): ``peak_mb``
   is the peak memory in use during the step above the memory in use just before it, so the
   model's parameters, the optimiser's state and the inputs are not counted; on CUDA the
   caching allocator's tensor statistics, on CPU the process's resident-set high-water mark
   (see :mod:`smnn.memory`). When this step takes longer than the time budget, one more step is
   timed; when that one does too, these two are the timed steps (``repeats`` = 2, said in
   ``note``): the case is measured at the cost of three steps, and the caller can stop there
   (one slow step alone may be another process taking the core);
4. otherwise ``repeats`` timed steps, each between ``torch.cuda.synchronize`` calls on CUDA,
   and more while the timed steps add up to less than ``min_timed_s`` (at most
   :data:`MAX_REPEATS`): a fast step is repeated until one stray slow step (another process
   taking the core) can no longer move the median; ``time_ms`` is their median, ``min_ms``
   their minimum.

An exception while building or measuring the step is recorded, not raised: ``out_of_memory``
for ``torch.OutOfMemoryError`` or the CPU allocator's "can't allocate memory" (the case did
not fit after all),
``failed`` with the message otherwise. Warnings raised by the step (e.g. MNN CG's
``MNNConvergenceWarning``) are collected into ``note`` instead of being printed every step.

The memory predictor for MNN dense: its forward pass assembles the dense normal matrix of
``n = 1 + T*D*R`` unknowns per system, ``batch * n^2`` numbers
(:func:`smnn.memory.dense_system_bytes`), and
factorizes it into a second matrix of the same size (the Cholesky factor, kept for the backward
pass). Measured with torch's profiler, the peak of a forward+backward step is 2.0 to 2.1 times
that; the resident set (LAPACK workspace, allocator granularity) reaches 2 to 4.3 times at small
sizes. The prediction is three dense matrices (:data:`smnn.memory.DENSE_COPIES`,
:func:`smnn.memory.solver_step_bytes`), the one estimate the solver benchmark and the training
jobs use too, so they all agree on which cases are too big.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from smnn.memory import (
    DEFAULT_BUDGET_FRACTION,
    DENSE_COPIES,
    measure_peak_memory,
)
from smnn.timing import release, summary_ms, timed_call

__all__ = [
    "MB",
    "STATUSES",
    "DEFAULT_BUDGET_FRACTION",
    "DENSE_COPIES",
    "MAX_REPEATS",
    "SLOW_WARMUP_FACTOR",
    "StepCost",
    "measure_step",
    "measure_case",
]

MB = 1_000_000
# ok: measured; out_of_memory: predicted (or found) too big for the budget, not run;
# skipped_slow: not run because this or a smaller case of the solver exceeded the time budget;
# failed: raised (the message is in note)
STATUSES = ("ok", "out_of_memory", "skipped_slow", "failed")
MAX_REPEATS = 50  # timed steps at most when repeating a fast step up to min_timed_s
# a warm-up step longer than this many time budgets ends the case (first-call costs such as
# compilation make a warm-up step slower than the steps after it, so not at one budget)
SLOW_WARMUP_FACTOR = 5.0
_NOTE_LIMIT = 300


@dataclass(frozen=True)
class StepCost:
    """The cost of one training step of one case.

    Attributes:
        status: one of :data:`STATUSES`.
        time_ms: median of the timed steps (NaN unless ``ok``).
        min_ms: fastest timed step (NaN unless ``ok``).
        warmup_ms: the first warm-up step (NaN when not run).
        peak_mb: peak memory of a step above the memory in use before it, in MB (10^6 bytes)
            (NaN unless ``ok``).
        predicted_mb: the predicted memory the budget was checked against (NaN when there was
            no prediction).
        repeats: number of timed steps.
        note: why a case was not measured, the error, or the step's warnings.
    """

    status: str
    time_ms: float = math.nan
    min_ms: float = math.nan
    warmup_ms: float = math.nan
    peak_mb: float = math.nan
    predicted_mb: float = math.nan
    repeats: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def as_row(self) -> dict[str, Any]:
        """The fields as a flat dict (one table row)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _run_timed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``step`` (:func:`smnn.timing.timed_call`)."""
    return timed_call(step, device)[0]


def _warning_note(caught: list[warnings.WarningMessage]) -> str:
    """``"MNNConvergenceWarning x8: <first message>"`` per distinct category."""
    seen: dict[str, tuple[int, str]] = {}
    for w in caught:
        name = type(w.message).__name__ if isinstance(w.message, Warning) else w.category.__name__
        count, first = seen.get(name, (0, str(w.message)))
        seen[name] = (count + 1, first)
    return "; ".join(f"{name} x{count}: {first}" for name, (count, first) in seen.items())


def measure_step(
    step: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int = 3,
    warmup: int = 1,
    time_budget_s: float = math.inf,
    min_timed_s: float = 0.0,
) -> StepCost:
    """Warm-up, one memory-measured (and timed) step, then ``repeats`` timed steps of ``step``
    (more while they add up to less than ``min_timed_s``; module docstring, items 2 to 4).
    Exceptions propagate (see :func:`measure_case`).

    Args:
        step: one whole training step on fixed inputs; its return value is ignored.
        device: where the step runs (what is synchronised and whose memory is measured).
        repeats: timed steps at least (>= 1); ``time_ms`` is their median.
        warmup: untimed steps first (>= 1).
        time_budget_s: seconds per step: a warm-up step over :data:`SLOW_WARMUP_FACTOR` times
            this ends the case as ``skipped_slow``; the memory-measured step and the next one
            both over it are the only timed steps.
        min_timed_s: keep timing steps until they add up to this (at most :data:`MAX_REPEATS`
            steps).

    Returns:
        ``ok`` with the times and the peak memory, or ``skipped_slow``.
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be >= 1, got {repeats} and {warmup}")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first_s = math.nan
        for i in range(warmup):
            seconds = _run_timed(step, device)
            first_s = seconds if i == 0 else first_s
            if seconds > SLOW_WARMUP_FACTOR * time_budget_s:
                return StepCost(
                    "skipped_slow", warmup_ms=1e3 * first_s,
                    note=f"warm-up step took {seconds:.1f} s > {SLOW_WARMUP_FACTOR:g} x time "
                         f"budget {time_budget_s:g} s",
                )  # fmt: skip
        seconds, peak = measure_peak_memory(_run_timed, step, device, device=device)
        times = [] if seconds <= time_budget_s else [seconds, _run_timed(step, device)]
        if times and min(times) > time_budget_s:
            notes.append(f"two timed steps: a step took {min(times):.1f} s > time budget "
                         f"{time_budget_s:g} s")  # fmt: skip
        else:  # (one step over the budget and the next within it: a stray slow step)
            times = times[1:]
            while len(times) < repeats or (sum(times) < min_timed_s and len(times) < MAX_REPEATS):
                times.append(_run_timed(step, device))
    notes.append(_warning_note(caught))
    time_ms, min_ms, _ = summary_ms(times)
    return StepCost(
        "ok",
        time_ms=time_ms,
        min_ms=min_ms,
        warmup_ms=1e3 * first_s,
        peak_mb=peak / MB,
        repeats=len(times),
        note="; ".join(n for n in notes if n)[:_NOTE_LIMIT],
    )


def _is_out_of_memory(exc: Exception) -> bool:
    """CUDA's allocator error, or the CPU allocator's (a RuntimeError naming the failure)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def measure_case(
    make_step: Callable[[], Callable[[], Any]],
    device: torch.device,
    *,
    repeats: int = 3,
    warmup: int = 1,
    time_budget_s: float = math.inf,
    min_timed_s: float = 0.0,
    predicted_bytes: int | None = None,
    budget_bytes: int | None = None,
) -> StepCost:
    """Measure one case end to end, never raising for the case's own failures (module
    docstring).

    Args:
        make_step: builds the case (model, optimiser, inputs) and returns its step; called
            only when the memory check passes.
        device: where the step runs.
        repeats, warmup, time_budget_s, min_timed_s: as :func:`measure_step`.
        predicted_bytes: predicted memory of the case (e.g. :func:`smnn.memory.solver_step_bytes`),
            or None for no check.
        budget_bytes: the memory budget (:func:`smnn.memory.memory_budget_bytes`); None: no check.

    Returns:
        The case's :class:`StepCost` (``predicted_mb`` filled when a prediction was given).
    """
    predicted_mb = math.nan if predicted_bytes is None else predicted_bytes / MB
    if predicted_bytes is not None and budget_bytes is not None and predicted_bytes > budget_bytes:
        return StepCost(
            "out_of_memory", predicted_mb=predicted_mb,
            note=f"predicted {predicted_bytes / 1e9:.3g} GB > memory budget "
                 f"{budget_bytes / 1e9:.3g} GB (not run)",
        )  # fmt: skip
    step: Callable[[], Any] | None = None
    try:
        step = make_step()
        cost = measure_step(
            step,
            device,
            repeats=repeats,
            warmup=warmup,
            time_budget_s=time_budget_s,
            min_timed_s=min_timed_s,
        )
    except Exception as exc:  # recorded, the study goes on
        status = "out_of_memory" if _is_out_of_memory(exc) else "failed"
        what = "ran out of memory: " if status == "out_of_memory" else f"{type(exc).__name__}: "
        cost = StepCost(status, note=f"{what}{exc}"[:_NOTE_LIMIT])
    finally:
        del step
        release(device)
    return StepCost(**{**cost.as_row(), "predicted_mb": predicted_mb})
