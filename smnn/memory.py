"""Peak memory of one function call, above the level before the call.

:func:`measure_peak_memory` runs ``fn(*args, **kwargs)`` once and returns its result and the peak
number of bytes in use during the call minus the number in use just before it.

How the peak is measured:

- CUDA (``device`` is a CUDA device): the caching allocator's statistics.
  ``torch.cuda.reset_peak_memory_stats`` before, ``torch.cuda.max_memory_allocated`` after, minus
  ``torch.cuda.memory_allocated`` before, with ``torch.cuda.synchronize`` on both sides. This counts
  tensor memory only (not the allocator's cached-but-free blocks, not the CUDA context).
- CPU, method ``"rss"`` (the default on Linux): the kernel's resettable high-water mark of the
  resident set. Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` in
  ``/proc/self/status`` to the current ``VmRSS``; after the call ``VmHWM`` is the peak resident set
  of the whole process during the call. It counts every allocation that was touched (torch, numpy,
  numba, Python objects), in page granularity, and only pages actually written: ``torch.empty``
  that is never filled does not count. Checked on the development machine (Linux 6.x): the reset
  works for an unprivileged process.
- CPU, method ``"profiler"`` (the fallback when ``/proc/self/clear_refs`` is missing or not
  writable, e.g. macOS or a locked-down container): ``torch.profiler`` with
  ``profile_memory=True`` records every allocation and free of torch's CPU allocator with a
  timestamp; the peak of the running sum of those events is the peak above the start. It sees torch
  tensors only (not numpy or numba arrays) and slows the call down; it does not depend on glibc.

Caveat for ``"rss"``: glibc keeps freed heap memory for reuse, so a call that reuses memory freed
earlier does not raise the resident set and would be under-counted. Before the call we run
``gc.collect()`` and glibc's ``malloc_trim(0)`` (when available) so freed memory goes back to the
operating system first. Other threads of the process count too: measure in a quiet process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "measure_peak_memory",
    "measure_peak_memory_rss",
    "measure_peak_memory_profiler",
    "measure_peak_memory_cuda",
    "cpu_peak_method",
]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _read_status_kb(field: str) -> int:
    """The value of ``field`` (e.g. ``"VmHWM"``) in /proc/self/status, in kB."""
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not found in {_STATUS}")


def _reset_rss_peak() -> None:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0)."""
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")


def _rss_method_works() -> bool:
    try:
        _reset_rss_peak()
        _read_status_kb("VmHWM")
        _read_status_kb("VmRSS")
    except OSError:
        return False
    return True


def cpu_peak_method() -> str:
    """``"rss"`` when the resettable peak RSS is available here, else ``"profiler"``."""
    return "rss" if _rss_method_works() else "profiler"


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap memory back to the OS (when possible)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def measure_peak_memory_rss(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """CPU peak via /proc/self (see the module docstring). Raises OSError when unavailable."""
    _release_free_memory()
    _reset_rss_peak()
    before_kb = _read_status_kb("VmRSS")
    result = fn(*args, **kwargs)
    peak_kb = _read_status_kb("VmHWM")
    return result, max(0, peak_kb - before_kb) * 1024


def measure_peak_memory_profiler(
    fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, int]:
    """CPU peak of torch allocations via ``torch.profiler`` memory events (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    sizes = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    ]
    sizes.sort(key=lambda s: s[0])
    running = 0
    peak = 0
    for _, nbytes in sizes:
        running += nbytes
        peak = max(peak, running)
    return result, peak


def measure_peak_memory_cuda(
    fn: Callable[..., Any], *args: Any, device: torch.device, **kwargs: Any
) -> tuple[Any, int]:
    """CUDA peak of tensor memory on ``device`` above its level before the call."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return result, max(0, peak - before)


def _infer_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return value.device
    return torch.device("cpu")


def measure_peak_memory(
    fn: Callable[..., Any],
    *args: Any,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)``; return ``(result, peak_bytes)``.

    ``peak_bytes`` is the peak memory in use during the call minus the amount in use right before
    it (never negative). ``device`` selects what is measured: a CUDA device -> CUDA tensor memory;
    ``"cpu"`` -> process memory (peak RSS on Linux, torch profiler elsewhere; see the module
    docstring). ``None`` picks the device of the first CUDA tensor among the arguments, else CPU.
    """
    dev = _infer_device(args, kwargs) if device is None else torch.device(device)
    if dev.type == "cuda":
        return measure_peak_memory_cuda(fn, *args, device=dev, **kwargs)
    if dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {dev}")
    if _rss_method_works():
        return measure_peak_memory_rss(fn, *args, **kwargs)
    return measure_peak_memory_profiler(fn, *args, **kwargs)
