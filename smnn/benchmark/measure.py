"""Measuring the grid: one forward+backward step, one case, the time budget, the whole grid.

One step is one training-like call: ``u = solve(c, b, u0, h)``, ``(u ** 2).sum().backward()``
into the coefficients, right-hand sides, initial values and steps (all four ``requires_grad``).

One case (a method, a dtype, a shape), :func:`measure_case`:

1. once per method, dtype, D and R: steps on two tiny shapes, one with 2 systems and one with
   64 (:data:`COMPILE_BATCHES`: the lane engine runs 8-lane kernels below 64 systems and 32-lane
   ones from 64 on, :func:`smnn.solver.fused.kernels_for`), so that every kernel a case can
   use is compiled (numba, minutes on a fresh install) before anything is timed. Compilation is
   never timed and never counts against the time budget;
2. a warm-up step on the measured shape itself (first-call costs: allocations, page faults,
   caches), not timed into the median (its time is ``warmup_ms``). It also gives the peak
   memory (:func:`smnn.memory.measure_peak_memory`, which hands freed memory back to the
   operating system first and so would slow a timed step down), in MB (10^6 bytes) above the
   memory in use before the step (inputs excluded), and the solution whose error against the
   float64 reference solve goes into ``error_median`` and ``error_max``
   (:mod:`smnn.benchmark.accuracy`). A warm-up step longer than the time budget may still be a
   first-call cost (a kernel compiled for a layout the tiny shapes did not reach): one more
   step decides; when it too is over the budget the case ends there (``skipped``, larger cases
   too: see below), with its error still reported;
3. ``repeats`` timed steps (at least 3 by default, also in quick mode); the row holds their
   median, minimum and maximum in ms. ``torch.cuda.synchronize`` closes the timed region on
   CUDA. Every step, warm-up included, runs with the grid's thread count
   (``torch.set_num_threads`` outside the timed region).

For a peer (:mod:`smnn.benchmark.peer`) the warm-up step's output is also compared with the
S-MNN solver's on the same inputs (``max_rel_diff_vs_smnn``: max |u_peer - u_smnn| / max
|u_smnn|), so a peer fed the wrong layout shows up instead of giving a meaningless ratio.

The grid, :func:`run_grid`: cases run in ascending order of unknowns ``B*T*D*R``. MNN dense runs
only where its dense matrix fits (``B * (1 + T*D*R)^2 * itemsize * 3 <= max_dense_bytes``); a
method this install lacks (``Method.unavailable``, e.g. ``smnn_qr`` before the solver has
``method="qr"``) is skipped with that reason. Once a case of a method and dtype takes longer than
the time budget per step (its median, or its warm-up step and the step after it), every later
case of that method and dtype with as many unknowns or more is skipped (each method stops at its
first size over the budget). A case that raises (e.g. a
non-positive pivot in float32) is recorded as ``failed`` with the error; the rest go on. MNN CG runs
at most 200 iterations; ``converged`` is False when its forward or backward solve stopped before
its tolerance (its warnings are recorded, not printed). Every case prints one progress line
(flushed) when it is done.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from smnn.benchmark.accuracy import reference_solution, relative_errors
from smnn.benchmark.catalog import (
    DTYPES,
    METHODS,
    Method,
    Shape,
    dtype_name,
    make_inputs,
)
from smnn.memory import (
    cpu_peak_method,
    measure_peak_memory,
    physical_memory_bytes,
    solver_step_bytes,
)
from smnn.timing import summary_ms, timed_call

__all__ = [
    "MB",
    "COLUMNS",
    "COMPILE_BATCHES",
    "GridOptions",
    "timed_step",
    "measure_case",
    "run_grid",
    "default_max_dense_bytes",
    "environment",
    "load_average",
    "progress_line",
]

MB = 1_000_000

COLUMNS = [
    "method",
    "family",
    "dtype",
    "case",
    "group",
    "B",
    "T",
    "D",
    "R",
    "median_ms",
    "min_ms",
    "peak_mb",
    "warmup_ms",
    "status",
    "note",
    "converged",
    "repeats",
    "full_B",
    "device",
    "threads",
    "max_rel_diff_vs_smnn",
    "max_ms",
    "error_median",
    "error_max",
]
# the batches of the compile steps: the lane engine's 8-lane kernels (fewer than 64 systems)
# and its 32-lane ones (smnn.solver.fused.kernels_for)
COMPILE_BATCHES = (2, 64)
# the families whose solution is the S-MNN function (the MNN baselines solve another system)
_SAME_FUNCTION = ("smnn", "peer")


def timed_step(
    method: Method,
    inputs: tuple,
    device: torch.device,
    keep_output: bool = False,
    threads: int | None = None,
) -> tuple[float, dict]:
    """One forward+backward step; returns (seconds, solver info).

    Convergence warnings (MNN CG) are recorded rather than shown: ``info["converged"]`` from
    the forward solve, ``info["backward_converged"]`` False when the backward solve warned.
    With ``keep_output`` the detached solution is in ``info["u"]``. ``threads`` is set with
    ``torch.set_num_threads`` before the step (outside the timed region): a solver that changes
    the process's thread count (numba's OpenMP layer shares it with torch) cannot change the
    next step's (:func:`smnn.timing.timed_call`).
    """
    for x in inputs:
        x.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds, (u, info) = timed_call(_forward_backward, device, method, inputs, threads=threads)
    info = dict(info)
    for w in caught:
        if type(w.message).__name__ == "MNNConvergenceWarning" and "backward" in str(w.message):
            info["backward_converged"] = False
        elif type(w.message).__name__ != "MNNConvergenceWarning":
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if "converged" in info:
        info.setdefault("backward_converged", True)
    for x in inputs:  # a non-finite gradient means the measurement is meaningless
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            raise FloatingPointError("missing or non-finite gradient")
    if keep_output:
        info["u"] = u.detach()
    return seconds, info


def _forward_backward(method: Method, inputs: tuple) -> tuple[torch.Tensor, dict]:
    """The step: solve, then the gradient of sum(u^2) into the four inputs."""
    u, info = method.solve(*inputs)
    (u**2).sum().backward()
    return u, info


def _diff_vs_smnn(u: torch.Tensor, inputs: tuple) -> float:
    """max |u - u_smnn| / max |u_smnn| on the same inputs (S-MNN forward only)."""
    with torch.no_grad():
        ref, _ = METHODS["smnn"].solve(*(x.detach() for x in inputs))
        scale = float(ref.abs().max()) or 1.0
        return float((u.to(ref.dtype) - ref).abs().max()) / scale


def measure_case(
    method: Method,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    seed: int = 0,
    threads: int | None = None,
    time_budget_s: float = math.inf,
    reference: torch.Tensor | None = None,
) -> dict:
    """Warm-up step (it also gives the peak memory and the solution), then ``repeats`` timed
    steps on ``shape``; a partial row. ``threads``: torch's thread count for every step
    (default: the current one). ``reference``: the float64 reference solution (B, T, D, R) of
    the case (:func:`smnn.benchmark.accuracy.reference_solution`); with it the row holds the
    errors of the warm-up step's solution. A warm-up step longer than ``time_budget_s`` is
    followed by one more step; when that one is over the budget too, the case ends there:
    status ``skipped``, the warm-up time in ``warmup_ms``, the later step's in the note and in
    ``over_budget_ms`` (not a column)."""
    threads = torch.get_num_threads() if threads is None else threads
    inputs = make_inputs(shape, dtype, device, seed)
    (warmup_s, info), peak = measure_peak_memory(
        timed_step, method, inputs, device, True, threads, device=device
    )
    u = info.pop("u")
    diff = _diff_vs_smnn(u, inputs) if method.family == "peer" else math.nan
    row = {"warmup_ms": 1e3 * warmup_s, "peak_mb": peak / MB, "max_rel_diff_vs_smnn": diff}
    if reference is not None:
        row["error_median"], row["error_max"] = relative_errors(u, reference)
    del u
    if warmup_s > time_budget_s:
        again_s, _ = timed_step(method, inputs, device, threads=threads)
        if again_s > time_budget_s:
            return {
                **row,
                "status": "skipped",
                "over_budget_ms": 1e3 * again_s,
                "note": f"skipped: warm-up step took {warmup_s:.1f} s and the next one "
                f"{again_s:.1f} s > time budget {time_budget_s:g} s",
            }
    times, converged = [], []
    for _ in range(repeats):
        seconds, info = timed_step(method, inputs, device, threads=threads)
        times.append(seconds)
        if "converged" in info:
            converged.append(info["converged"] and info["backward_converged"])
    torch.set_num_threads(threads)
    median_ms, min_ms, max_ms = summary_ms(times)
    row.update(
        {
            "median_ms": median_ms,
            "min_ms": min_ms,
            "max_ms": max_ms,
            "status": "ok",
            "converged": all(converged) if converged else None,
        }
    )
    if converged and not all(converged):
        row["note"] = "CG did not converge in 200 iterations (forward or backward solve)"
    return row


def compile_steps(
    method: Method, shape: Shape, dtype: torch.dtype, device, seed: int, threads: int
) -> None:
    """One step on each tiny shape of :data:`COMPILE_BATCHES` systems with ``shape``'s D and R
    (compiles every kernel width; errors are left to the measured case, with its own shape)."""
    for batch in COMPILE_BATCHES:
        tiny = Shape("compile", "compile", batch, 8, shape.D, shape.R)
        try:
            timed_step(method, make_inputs(tiny, dtype, device, seed), device, threads=threads)
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridOptions:
    """How the grid is run (validated by :func:`smnn.benchmark.run.plan_benchmark`);
    ``threads`` None: torch's thread count when the grid starts."""

    repeats: int
    max_dense_bytes: int
    time_budget_s: float
    device: torch.device
    seed: int = 0
    threads: int | None = None


def _skip_reason(method: Method, shape: Shape, dtype, opts: GridOptions, over_budget) -> str:
    if method.unavailable:
        return f"skipped: {method.unavailable}"
    if method.dense:
        need = solver_step_bytes("mnn_dense", shape.B, shape.T, shape.D, shape.R, dtype)
        if need > opts.max_dense_bytes:
            return (
                f"skipped: dense matrix needs ~{need / 1e9:.3g} GB "
                f"> --max-dense-bytes {opts.max_dense_bytes / 1e9:.3g} GB"
            )
    unknowns, reason = over_budget.get((method.name, dtype_name(dtype)), (0, ""))
    return reason if reason and shape.unknowns >= unknowns else ""


def progress_line(row: dict, done: int, total: int, elapsed_s: float) -> str:
    """``[bench 12/96 0:42] smnn float64 lorenz B=1536 T=50 D=1 R=3: 12.3 ms, 4.5 MB``
    (then the error against the reference, when measured)."""
    minutes, seconds = divmod(int(elapsed_s), 60)
    head = (
        f"[bench {done}/{total} {minutes}:{seconds:02d}] {row['method']} {row['dtype']} "
        f"{row['case']} B={row['B']} T={row['T']} D={row['D']} R={row['R']}"
    )
    if row["status"] != "ok":
        note = row["note"].replace("skipped: ", "")
        return f"{head}: {row['status']} ({note})"
    text = (
        f"{head}: {row['median_ms']:.4g} ms (median of {row['repeats']}), {row['peak_mb']:.4g} MB"
    )
    if row["converged"] is False:
        text += ", CG not converged"
    if not math.isnan(row["max_rel_diff_vs_smnn"]):
        text += f", max rel diff vs smnn {row['max_rel_diff_vs_smnn']:.1e}"
    if not math.isnan(row["error_median"]):
        text += f", error {row['error_median']:.1e} (median; max {row['error_max']:.1e})"
    return text


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_grid(
    methods: Sequence[Method],
    dtypes: Sequence[str],
    shapes: Sequence[Shape],
    opts: GridOptions,
    progress: Callable[[str], None] | None = _print,
) -> list[dict]:
    """Measure every method x dtype x shape (module docstring); rows in grid order
    (shapes as given, then dtypes, then methods)."""
    rows: dict[tuple[int, int, int], dict] = {}  # (shape, dtype, method) index -> row
    # (method, dtype) -> (unknowns of the smallest case over the time budget, skip reason)
    over_budget: dict[tuple[str, str], tuple[int, str]] = {}
    compiled: set[tuple[str, str, int, int]] = set()
    references: dict[int, torch.Tensor | str] = {}  # shape index -> reference u, or the error
    total = len(shapes) * len(dtypes) * len(methods)
    threads = opts.threads or torch.get_num_threads()
    start = time.perf_counter()
    # smallest cases first, so the time budget stops a method at its first slow size
    run_order = sorted(range(len(shapes)), key=lambda i: shapes[i].unknowns)
    for i_shape in run_order:
        shape = shapes[i_shape]
        for i_dtype, name_of_dtype in enumerate(dtypes):
            dtype = DTYPES[name_of_dtype]
            for i_method, method in enumerate(methods):
                row = _empty_row(method, shape, name_of_dtype, opts, threads)
                reason = _skip_reason(method, shape, dtype, opts, over_budget)
                if reason:
                    row["note"] = reason
                else:
                    try:
                        key = (method.name, name_of_dtype, shape.D, shape.R)
                        if key not in compiled:
                            compile_steps(method, shape, dtype, opts.device, opts.seed, threads)
                            compiled.add(key)
                        reference = None
                        if method.family in _SAME_FUNCTION:
                            reference = _reference(references, i_shape, shape, opts.seed)
                            if isinstance(reference, str):
                                row["note"] = reference
                                reference = None
                        row.update(
                            measure_case(
                                method,
                                shape,
                                dtype,
                                opts.device,
                                opts.repeats,
                                opts.seed,
                                threads,
                                opts.time_budget_s,
                                reference,
                            )
                        )
                    except Exception as exc:  # recorded, the benchmark goes on
                        row["status"] = "failed"
                        row["note"] = f"{type(exc).__name__}: {exc}"[:300]
                    budget = opts.time_budget_s
                    took = (
                        row["median_ms"]
                        if row["status"] == "ok"
                        else row.get("over_budget_ms", row["warmup_ms"])
                    )
                    if took > 1e3 * budget:  # NaN (failed before the warm-up ended): False
                        previous = over_budget.get((method.name, name_of_dtype))
                        if previous is None or shape.unknowns < previous[0]:
                            what = "took" if row["status"] == "ok" else "warm-up took"
                            over_budget[(method.name, name_of_dtype)] = (
                                shape.unknowns,
                                f"skipped: {shape.case} ({shape.unknowns} unknowns) {what} "
                                f"{took / 1e3:.1f} s > time budget {budget:g} s",
                            )
                if shape.scaled:
                    scale = f"quick: batch scaled from {shape.full_B}"
                    row["note"] = f"{scale}; {row['note']}" if row["note"] else scale
                rows[(i_shape, i_dtype, i_method)] = row
                if progress is not None:
                    progress(progress_line(row, len(rows), total, time.perf_counter() - start))
    return [rows[k] for k in sorted(rows)]


def _reference(cache: dict, index: int, shape: Shape, seed: int) -> torch.Tensor | str:
    """The reference solution of shape ``index`` (computed once; a note when it fails)."""
    if index not in cache:
        try:
            cache[index] = reference_solution(shape, seed)
        except Exception as exc:  # e.g. a pivot error: the rows still get their times
            cache[index] = f"no error: the reference solve failed ({type(exc).__name__}: {exc})"[
                :300
            ]
    return cache[index]


def _empty_row(method: Method, shape: Shape, dtype: str, opts: GridOptions, threads: int) -> dict:
    return {
        "method": method.name,
        "family": method.family,
        "dtype": dtype,
        "case": shape.case,
        "group": shape.group,
        "B": shape.B,
        "T": shape.T,
        "D": shape.D,
        "R": shape.R,
        "median_ms": math.nan,
        "min_ms": math.nan,
        "peak_mb": math.nan,
        "warmup_ms": math.nan,
        "status": "skipped",
        "note": "",
        "converged": None,
        "repeats": opts.repeats,
        "full_B": shape.full_B,
        "device": str(opts.device),
        "threads": threads,
        "max_rel_diff_vs_smnn": math.nan,
        "max_ms": math.nan,
        "error_median": math.nan,
        "error_max": math.nan,
    }


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def default_max_dense_bytes() -> int:
    """A quarter of the physical memory (8 GB when unknown)."""
    return physical_memory_bytes() // 4 or 8 * 10**9


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where unknown)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def environment() -> dict:
    """Versions and settings that affect the timings (MLflow params)."""
    env = {
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_peak_method": cpu_peak_method(),
        "load_average_1min": load_average(),
    }
    try:
        import numba

        env["numba"] = numba.__version__
        env["numba_threading_layer_config"] = numba.config.THREADING_LAYER
    except ImportError:
        env["numba"] = "missing"
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    return env
