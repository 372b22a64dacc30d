"""The timing core shared by the solver benchmark (:mod:`smnn.benchmark.measure`, its contention
study :mod:`smnn.benchmark.contention`) and the step-cost studies
(:mod:`smnn.experiments.step_cost`): one timed call, synchronised on CUDA, with the thread count
set outside the timed region; memory handed back between cases; medians in ms.

What each harness does around it (warm-up steps, the memory-measured step, the time budget,
the rows it writes) stays in its own module; they time a step the same way.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["release", "summary_ms", "sync", "timed_call"]


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(
    fn: Callable[..., Any], device: torch.device, *args: Any, threads: int | None = None
) -> tuple[float, Any]:
    """``fn(*args)`` timed: (seconds, its result).

    The clock starts after ``device``'s queued work is done and stops when the call's work is
    (:func:`sync`). ``threads``: torch's thread count, set before the call, outside the timed
    region (a solver that changes the process's thread count, as numba's OpenMP layer can,
    cannot change the next call's); None leaves it.
    """
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sync(device)
    start = time.perf_counter()
    result = fn(*args)
    sync(device)
    return time.perf_counter() - start, result


def release(device: torch.device) -> None:
    """Collect garbage and, on CUDA, return the allocator's cached blocks (between cases)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(median, minimum, maximum) of timed calls ``seconds``, in ms."""
    if not seconds:
        raise ValueError("summary_ms needs at least one timed call")
    return 1e3 * statistics.median(seconds), 1e3 * min(seconds), 1e3 * max(seconds)
