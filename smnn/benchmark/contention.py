"""Threads under contention (``smnn bench --contention``): 1 and 2 threads, on a quiet machine
and with a busy process beside the solver (docs/solver.md, "Complexity and performance targets":
with one core taken, 2 threads must be no slower than 1, median and worst case).

For every named shape of the plan, dtype and S-MNN method (family ``smnn``, available in this
install), :func:`run_contention`:

1. compiles (:func:`smnn.benchmark.measure.compile_steps`, never timed) and makes the inputs;
2. for each load of :data:`LOADS`: ``quiet`` (nothing started here; other processes of the
   machine still count: bench.md records the load average) and ``busy`` (one busy-loop process,
   :func:`busy_process`, running for the whole phase, pinned nowhere, at the same priority): one
   untimed step per thread count, then ``repeats`` rounds of one timed step per thread count of
   :data:`THREAD_COUNTS`, alternating (1, 2 then 2, 1 ...), so that both thread counts see the
   same machine;
3. one row per method, dtype, case, load and thread count: median, minimum and maximum
   (the worst case) of its timed steps (``contention.csv``, bench.md, MLflow).

The thread count is ``torch.set_num_threads`` before each step (outside the timed region); the
lane kernels follow it (:func:`smnn.solver.fused.n_workers`).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from smnn.benchmark.catalog import DTYPES, Method, Shape, make_inputs
from smnn.benchmark.measure import compile_steps, timed_step
from smnn.timing import summary_ms

__all__ = [
    "CONTENTION_COLUMNS",
    "CONTENTION_FILE",
    "CONTENTION_REPEATS",
    "LOADS",
    "THREAD_COUNTS",
    "busy_process",
    "contention_lines",
    "run_contention",
]

CONTENTION_FILE = "contention.csv"
CONTENTION_COLUMNS = [
    "method",
    "dtype",
    "case",
    "B",
    "T",
    "D",
    "R",
    "full_B",
    "load",
    "threads",
    "median_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "status",
    "note",
]
LOADS = ("quiet", "busy")
THREAD_COUNTS = (1, 2)
CONTENTION_REPEATS = 15  # rounds per load (quick mode: 9)
QUICK_CONTENTION_REPEATS = 9
# the busy process: it says it runs, then spins until it is killed
_BUSY_LOOP = "import sys\nsys.stdout.write('busy\\n')\nsys.stdout.flush()\nwhile True:\n    pass\n"


@contextmanager
def busy_process():
    """A Python process spinning on one core for the duration of the block (started and
    running when the block begins, killed when it ends)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUSY_LOOP],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        if proc.stdout.readline().strip() != b"busy":
            raise RuntimeError("the busy-loop process of --contention did not start")
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@contextmanager
def _load(name: str):
    if name == "busy":
        with busy_process():
            yield
    else:
        yield


def _measure(method: Method, inputs, device, repeats: int) -> dict[int, list[float]]:
    """Alternating timed steps at each thread count (module docstring, step 2)."""
    for threads in THREAD_COUNTS:  # untimed: first-call costs of this thread count
        timed_step(method, inputs, device, threads=threads)
    times: dict[int, list[float]] = {t: [] for t in THREAD_COUNTS}
    for r in range(repeats):
        order = THREAD_COUNTS if r % 2 == 0 else THREAD_COUNTS[::-1]
        for threads in order:
            seconds, _ = timed_step(method, inputs, device, threads=threads)
            times[threads].append(seconds)
    return times


def run_contention(
    methods: Sequence[Method],
    dtypes: Sequence[str],
    shapes: Sequence[Shape],
    repeats: int,
    device: torch.device,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
):
    """The contention table (module docstring) for the named shapes among ``shapes`` and the
    S-MNN methods among ``methods`` (a DataFrame with :data:`CONTENTION_COLUMNS`)."""
    import pandas as pd

    if repeats < 1:
        raise ValueError(f"contention repeats must be >= 1, got {repeats}")
    named = [s for s in shapes if s.group == "named"]
    ours = [m for m in methods if m.family == "smnn" and not m.unavailable]
    before = torch.get_num_threads()
    rows = []
    try:
        for shape in named:
            for name in dtypes:
                dtype = DTYPES[name]
                for method in ours:
                    base = {
                        "method": method.name,
                        "dtype": name,
                        "case": shape.case,
                        "B": shape.B,
                        "T": shape.T,
                        "D": shape.D,
                        "R": shape.R,
                        "full_B": shape.full_B,
                        "repeats": repeats,
                    }
                    for load in LOADS:
                        rows += _case_rows(
                            method, shape, dtype, device, seed, repeats, load, base, progress
                        )
    finally:
        torch.set_num_threads(before)
    return pd.DataFrame(rows, columns=CONTENTION_COLUMNS)


def _case_rows(method, shape, dtype, device, seed, repeats, load, base, progress) -> list[dict]:
    try:
        compile_steps(method, shape, dtype, device, seed, max(THREAD_COUNTS))
        inputs = make_inputs(shape, dtype, device, seed)
        with _load(load):
            times = _measure(method, inputs, device, repeats)
    except Exception as exc:  # recorded, the rest goes on
        note = f"{type(exc).__name__}: {exc}"[:300]
        return [
            {
                **base,
                "load": load,
                "threads": t,
                "median_ms": math.nan,
                "min_ms": math.nan,
                "max_ms": math.nan,
                "status": "failed",
                "note": note,
            }
            for t in THREAD_COUNTS
        ]
    out = []
    for threads, seconds in times.items():
        median_ms, min_ms, max_ms = summary_ms(seconds)
        row = {
            **base,
            "load": load,
            "threads": threads,
            "median_ms": median_ms,
            "min_ms": min_ms,
            "max_ms": max_ms,
            "status": "ok",
            "note": "",
        }
        out.append(row)
        if progress is not None:
            progress(
                f"[bench contention] {method.name} {base['dtype']} {shape.case} "
                f"B={shape.B} {load}, {threads} thread{'s' if threads > 1 else ''}: "
                f"{row['median_ms']:.4g} ms median, {row['max_ms']:.4g} ms max"
            )
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and math.isfinite(a) and math.isfinite(b) else ""


def contention_lines(table) -> list[str]:
    """bench.md's contention section: per case, dtype, method and load, the median and worst
    step at 1 and 2 threads and their ratios (2 threads / 1 thread; below 1: 2 threads
    faster), and the check of docs/solver.md, "Complexity and performance targets"."""
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return []
    lines = [
        "",
        "## Threads under contention (--contention)",
        "",
        "Forward+backward step with 1 and 2 threads, alternating; load quiet: the machine as "
        "it is (nothing started here; see the load average above), busy: with one busy-loop "
        "process beside it. Median and worst (max) of "
        f"{int(ok['repeats'].iloc[0])} steps each. Ratio: 2 threads / 1 thread.",
        "",
        "| case | B | dtype | method | load | 1 thread ms (max) | 2 threads ms (max) | "
        "ratio median | ratio worst |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    keys = ["case", "dtype", "method", "load"]
    for (case, dtype, method, load), part in ok.groupby(keys, sort=False):
        one = part[part["threads"] == 1]
        two = part[part["threads"] == 2]
        if one.empty or two.empty:
            continue
        a, b = one.iloc[0], two.iloc[0]
        batch = str(a["B"]) + (f" (of {a['full_B']})" if a["B"] != a["full_B"] else "")
        lines.append(
            f"| {case} | {batch} | {dtype} | {method} | {load} | {a['median_ms']:.4g} "
            f"({a['max_ms']:.4g}) | {b['median_ms']:.4g} ({b['max_ms']:.4g}) | "
            f"{_ratio(b['median_ms'], a['median_ms'])} | {_ratio(b['max_ms'], a['max_ms'])} |"
        )
        if load == "busy":
            verdicts.append(b["median_ms"] <= a["median_ms"] and b["max_ms"] <= a["max_ms"])
    if verdicts:
        met = sum(verdicts)
        lines += [
            "",
            f"- Target: with one core taken, 2 threads no slower than 1, median and "
            f"worst case: {'met' if all(verdicts) else 'NOT met'} in {met} of "
            f"{len(verdicts)} cases.",
        ]
    return lines
