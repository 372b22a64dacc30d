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

Predicting a job's peak before it runs (:func:`predict_step_bytes`, :func:`check_memory_budget`):
one estimator for every solver, shared by the training jobs, the solver benchmark and the
long-sequence studies, so a case that cannot fit is refused (or marked out of memory) before
anything is allocated:

- the model: parameters, their gradients and the optimiser's state (Adam: two more copies),
  counted without allocating (:func:`parameter_count` builds the model on torch's ``meta``
  device);
- the solver's forward+backward step on ``batch`` systems of T steps, D states and R orders
  (:func:`solver_step_bytes`): MNN dense three dense ``(1 + T*D*R)^2`` matrices per system (the
  normal matrix, its Cholesky factor, workspace); S-MNN and MNN CG a fixed multiple of the
  block-banded storage ``T * (D*R)^2`` per system (:data:`BANDED_STEP_FACTOR`,
  :data:`CG_STEP_FACTOR`, measured);
- whatever else the job knows it holds (activations, data), given by the caller.

Caveat for ``"rss"``: glibc keeps freed heap memory for reuse, so a call that reuses memory freed
earlier does not raise the resident set and would be under-counted. Before the call we run
``gc.collect()`` and glibc's ``malloc_trim(0)`` (when available) so freed memory goes back to the
operating system first. Other threads of the process count too: measure in a quiet process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from smnn.config import ConfigError

__all__ = [
    "BANDED_STEP_FACTOR",
    "CG_STEP_FACTOR",
    "DENSE_COPIES",
    "DEFAULT_BUDGET_FRACTION",
    "MemoryEstimate",
    "MemoryBudgetError",
    "parameter_count",
    "model_bytes",
    "dense_system_bytes",
    "solver_step_bytes",
    "predict_step_bytes",
    "physical_memory_bytes",
    "memory_budget_bytes",
    "check_memory_budget",
    "check_training_memory",
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


def check_training_memory(
    experiment: str,
    solver: str,
    device: torch.device | str,
    budget_gb: float | None,
    **step: Any,
) -> None:
    """Refuse an experiment's training job whose predicted step peak exceeds its budget, before
    it allocates anything: :func:`predict_step_bytes` of ``step`` (its keyword arguments, with
    ``solver``) against :func:`memory_budget_bytes` of ``device`` and ``budget_gb``, whose config
    key is ``<experiment>.train.memory_budget_gb``.

    Raises:
        MemoryBudgetError: naming the parts, their config keys (``step["keys"]``), the budget
            and the key that overrides it.
    """
    check_memory_budget(
        predict_step_bytes(solver=solver, **step),
        memory_budget_bytes(device, budget_gb),
        what=f"{experiment} training with {solver}",
        override_key=f"{experiment}.train.memory_budget_gb",
        device=device,
    )


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


# ------------------------------------------------------------------ predicting a job's peak

# MNN dense: the normal matrix, its Cholesky factor and headroom (LAPACK workspace, allocator):
# the profiler measured 2.0-2.1 x the normal matrix for a forward+backward step, the resident set
# 2-4.3 x at small sizes (smnn.experiments.step_cost)
DENSE_COPIES = 3
# S-MNN and MNN CG: peak of a forward+backward step over the block-banded storage
# batch * T * (D*R)^2 * itemsize. Measured (CPU, float64, resident set, measure_peak_memory):
# 2.1-6.7 x for B 2-16, T 512-16384, D 1-3, R 3; 8 keeps every case inside the prediction
BANDED_STEP_FACTOR = 8
# MNN CG keeps the bands of C^T C, their autograd graph and the CG vectors: 11 x measured for
# B 4, T 1024, D 3, R 3 (the test in tests/test_memory.py)
CG_STEP_FACTOR = 16
DEFAULT_BUDGET_FRACTION = 0.8
_ADAM_STATES = 2


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def parameter_count(build: Callable[[], torch.nn.Module]) -> int:
    """The number of parameters of the module ``build()`` makes, built on the ``meta`` device
    (shapes only: nothing is allocated, so a model of 10^12 parameters is counted in
    milliseconds)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def model_bytes(n_params: int, dtype: torch.dtype, optimizer_states: int = _ADAM_STATES) -> int:
    """Parameters, gradients and ``optimizer_states`` more copies (Adam: 2), in bytes."""
    return int(n_params) * _itemsize(dtype) * (2 + optimizer_states)


def dense_system_bytes(batch: int, n_steps: int, n_dims: int, n_orders: int,
                       dtype: torch.dtype) -> int:  # fmt: skip
    """Bytes of the dense normal matrices of MNN dense: ``batch * (1 + T*D*R)^2 * itemsize``."""
    _check_sizes(batch=batch, n_steps=n_steps, n_dims=n_dims, n_orders=n_orders)
    n = 1 + n_steps * n_dims * n_orders
    return batch * n * n * _itemsize(dtype)


def solver_step_bytes(
    solver: str, batch: int, n_steps: int, n_dims: int, n_orders: int, dtype: torch.dtype
) -> int:
    """Predicted peak of one forward+backward solve of ``batch`` systems (module docstring).

    Args:
        solver: ``mnn_dense``, or a banded solver (``smnn`` and its variants, ``mnn_cg``).
        batch: systems solved together; n_steps: T; n_dims: D; n_orders: R.
        dtype: the solve's dtype.
    """
    _check_sizes(batch=batch, n_steps=n_steps, n_dims=n_dims, n_orders=n_orders)
    if n_steps < 2:
        raise ValueError(f"n_steps must be an integer >= 2 (a solve has T >= 2), got {n_steps}")
    if solver == "mnn_dense":
        return DENSE_COPIES * dense_system_bytes(batch, n_steps, n_dims, n_orders, dtype)
    _check_sizes(batch=batch, n_steps=n_steps, n_dims=n_dims, n_orders=n_orders)
    m = n_dims * n_orders
    factor = CG_STEP_FACTOR if solver == "mnn_cg" else BANDED_STEP_FACTOR
    return factor * batch * n_steps * m * m * _itemsize(dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    """A predicted peak, by part.

    Attributes:
        parts: ``{what: bytes}`` (e.g. ``model``, ``solver``, ``activations``).
        keys: ``{what: the config keys that size it}``, for the messages.
    """

    parts: Mapping[str, int]
    keys: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        """``"model 4.0 TB (lorenz.model.hidden), solver 2.1 MB (...)"``, largest first."""
        items = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(
            f"{name} {_human(b)}" + (f" ({', '.join(self.keys[name])})" if self.keys.get(name)
                                     else "")
            for name, b in items
        )  # fmt: skip


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def predict_step_bytes(
    *,
    solver: str | None,
    batch: int,
    n_steps: int,
    n_dims: int,
    n_orders: int,
    dtype: torch.dtype,
    n_params: int = 0,
    n_solves: int = 1,
    extra: Mapping[str, int] | None = None,
    keys: Mapping[str, Sequence[str]] | None = None,
) -> MemoryEstimate:
    """The predicted peak of one training step: model (:func:`model_bytes`), ``n_solves``
    solver calls of ``batch`` systems each held at once (:func:`solver_step_bytes`; none when
    ``solver`` is None), and ``extra`` parts the caller knows (activations, data).

    Args:
        keys: ``{part: config keys}`` named in :class:`MemoryBudgetError` messages.
    """
    parts: dict[str, int] = {}
    if n_params:
        parts["model"] = model_bytes(n_params, dtype)
    if solver is not None:
        parts["solver"] = n_solves * solver_step_bytes(
            solver, batch, n_steps, n_dims, n_orders, dtype
        )
    parts.update({k: int(v) for k, v in (extra or {}).items()})
    return MemoryEstimate(parts, dict(keys or {}))


def physical_memory_bytes() -> int:
    """The machine's physical memory (0 when it does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_budget_bytes(
    device: torch.device | str, budget_gb: float | None = None,
    fraction: float = DEFAULT_BUDGET_FRACTION,
) -> int:  # fmt: skip
    """The memory a job may use: ``budget_gb`` * 10^9 bytes when given, else ``fraction`` of the
    device's memory (the GPU's total memory on CUDA, the physical memory on CPU; 10 GB when the
    machine does not say)."""
    if budget_gb is not None:
        if not (isinstance(budget_gb, (int, float)) and math.isfinite(budget_gb) and budget_gb > 0):
            raise ValueError(f"memory budget must be a number of GB > 0, got {budget_gb!r}")
        return int(budget_gb * 1e9)
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = physical_memory_bytes() or 10 * 10**9
    return int(fraction * total)


class MemoryBudgetError(ConfigError):
    """A job's predicted peak memory exceeds the budget (names the config keys that size it and
    the key that overrides the budget)."""

    def __init__(self, message: str, estimate: MemoryEstimate, budget: int):
        super().__init__(message)
        self.estimate = estimate
        self.budget = budget


def check_memory_budget(
    estimate: MemoryEstimate,
    budget: int,
    *,
    what: str,
    override_key: str,
    device: torch.device | str = "cpu",
) -> None:
    """Refuse a job whose predicted peak exceeds ``budget``, before it allocates anything.

    Args:
        estimate: :func:`predict_step_bytes`.
        budget: :func:`memory_budget_bytes`.
        what: the job, for the message (e.g. ``"lorenz training with mnn_dense"``).
        override_key: the config key that sets the budget (e.g. ``"memory_budget_gb"``).

    Raises:
        MemoryBudgetError: naming the parts, their config keys, the budget and the override.
    """
    if estimate.total <= budget:
        return
    kind = "GPU memory" if torch.device(device).type == "cuda" else "memory"
    raise MemoryBudgetError(
        f"{what} would need about {_human(estimate.total)} of {kind} ({estimate.describe()}), "
        f"more than the budget of {_human(budget)}; reduce those settings, or set "
        f"{override_key} if the machine really has the memory",
        estimate, budget,
    )  # fmt: skip
