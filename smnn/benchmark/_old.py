"""Scaling benchmark of the solvers: forward+backward time and peak memory (EXPERIMENTS.md 5).

For every method x dtype x shape we build random well-conditioned inputs (all four with
``requires_grad``), and time one training-like step: ``u = solve(c, b, u0, h)``,
``(u ** 2).sum().backward()`` into the coefficients, right-hand sides, initial values and steps.

Shapes (``B`` systems of ``T`` steps, ``D`` states, ``R`` orders; always ``E = D`` equations and
one initial step ``S = 1`` holding the order-0 values, ``K = 1``):

- the named shapes of SOLVER_SPEC section 9 (:data:`NAMED_SHAPES`): lorenz, kdv, sst, long at
  T = 16384 and T = 65536, coupled;
- a sweep over T = 2^6 .. 2^16 at B = 8, D = 1, R = 3 (:func:`t_sweep`);
- a sweep over B = 2^0 .. 2^14 at T = 256, D = 1, R = 3 (:func:`batch_sweep`).

Measurement:

- Time: one warm-up step on the same shape (it also triggers compilation), then ``repeats``
  timed steps; the CSV holds the median and the minimum in ms. ``torch.cuda.synchronize`` closes
  the timed region on CUDA. ``--threads`` sets ``torch.set_num_threads`` (the compiled S-MNN
  kernels follow torch's thread count).
- Peak memory: :func:`smnn.memory.measure_peak_memory` around one more step after the timed
  ones (it returns freed memory to the operating system before the step, which would slow a
  timed step down); the CSV holds that peak in MB (10^6 bytes), above the memory in use before
  the step (inputs excluded).
- MNN dense is run only where its dense matrix fits: ``B * (1 + T*D*R)^2 * itemsize * 3`` must be
  at most ``--max-dense-bytes`` (default a quarter of the physical memory).
- Time budget: once a case of a method and dtype takes longer than ``--time-budget`` seconds per
  step (default 60, 2 with ``--quick``), every later case of that method and dtype with as many
  unknowns ``B*T*D*R`` or more is skipped (the baselines grow quickly: MNN dense as T^3, MNN CG
  with 200 iterations per solve). Cases run in ascending order of unknowns, so each method stops
  at its first size over the budget; the outputs list them in grid order (named shapes, T sweep,
  batch sweep).
- Every case not run is a CSV row with ``status = skipped`` and the reason in ``note``; a case
  that raises (e.g. a non-positive pivot in float32) gets ``status = failed`` and the error.
- MNN CG runs at most 200 iterations; ``converged`` is False when the forward or the backward
  CG solve stopped before its tolerance (its warnings are recorded, not printed).

``--quick`` (the CI/demo run, meant to stay well under 2 minutes on 2 quiet cores): no warm-up
on the measured shape (only on a tiny shape of the same D and R, for compilation), one timed
step, time budget 2 s, ``--max-dense-bytes`` at most 5e8, the T sweep cut to 2^6, 2^8, 2^10,
2^12 (B = 8) and the batch sweep to B = 1, 4, 16, 64 (T = 256). The named shapes keep T, D and
R but their batch is scaled down so that B*T*D <= 2^12 (at least 1: the long shapes and coupled
run one system); the CSV holds the batch actually run, ``full_B`` the published one, and
``note`` says so. Reference timings and speedups in ``bench.md`` are shown only for shapes run
at their full size, so quick runs give none.

Outputs in ``--out``: ``bench.csv`` (tidy: one row per method x dtype x case), ``bench.md``,
``scaling_T.png`` and ``scaling_batch.png`` (log-log time and memory, one line per
method/dtype) and, on CPU when a named shape was measured with an S-MNN method, ``floors.csv``
(the lower bounds of :mod:`smnn.roofline`, also a section of ``bench.md``). With
``--mlflow-uri`` (or ``MLFLOW_TRACKING_URI`` set) one MLflow run in the experiment
``benchmark``: the options as params, each measured row as metrics
``time_ms.<method>.<dtype>.<case>``, ``min_time_ms...``, ``peak_mb...``, the floors as
``floor_ms.<dtype>.<case>`` and ``floor_ratio...`` with the machine's rates, and the files as
artifacts.

Adding a method is one entry in :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from smnn.memory import cpu_peak_method, measure_peak_memory
from smnn.standalone import prepare_output_dir

__all__ = [
    "Method",
    "METHODS",
    "DEFAULT_METHODS",
    "Shape",
    "NAMED_SHAPES",
    "REFERENCE_MS",
    "t_sweep",
    "batch_sweep",
    "default_grid",
    "make_inputs",
    "dense_matrix_bytes",
    "run_benchmark",
    "add_parser",
]

MB = 1_000_000
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A solver under test.

    ``solve(c, b, u0, h)`` returns ``(u (B, T, D, R), info)``; ``info`` may hold ``converged``
    (bool). ``dense`` marks methods that build the dense (1 + T*D*R)^2 matrix per system.
    """

    name: str
    solve: Callable[..., tuple[torch.Tensor, dict]]
    dense: bool = False
    description: str = ""


def _smnn(c, b, u0, h, *, method: str) -> tuple[torch.Tensor, dict]:
    from smnn.solver.api import ode_forward

    return ode_forward(c, b, u0, h, method=method), {}


def _mnn_dense(c, b, u0, h) -> tuple[torch.Tensor, dict]:
    from smnn.solver.mnn import mnn_dense

    return mnn_dense(c, b, u0, h), {}


def _mnn_cg(c, b, u0, h) -> tuple[torch.Tensor, dict]:
    from smnn.solver.mnn import mnn_cg

    u, info = mnn_cg(c, b, u0, h, return_info=True)  # its warnings: see _timed_step
    return u, {"converged": bool(torch.as_tensor(info["converged"]).all())}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("smnn", partial(_smnn, method="auto"), description="S-MNN, ode_forward default"),
        Method("smnn_sequential", partial(_smnn, method="sequential"),
               description="S-MNN, sequential block LDL^T"),
        Method("smnn_cyclic", partial(_smnn, method="cyclic"),
               description="S-MNN, block cyclic reduction"),
        Method("mnn_dense", _mnn_dense, dense=True, description="original MNN, dense Cholesky"),
        Method("mnn_cg", _mnn_cg, description="original MNN, conjugate gradient"),
    )
}
DEFAULT_METHODS = ("smnn", "smnn_cyclic", "mnn_dense", "mnn_cg")


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One benchmark case: ``B`` systems of ``T`` steps, ``D`` states, ``R`` orders.

    ``group`` is ``"named"``, ``"T_sweep"`` or ``"batch_sweep"``; ``full_B`` is the batch of the
    published shape when ``B`` was scaled down (quick mode), else equal to ``B``.
    """

    case: str
    group: str
    B: int
    T: int
    D: int
    R: int
    full_B: int = field(default=0)

    def __post_init__(self) -> None:
        if self.full_B == 0:
            object.__setattr__(self, "full_B", self.B)
        for name in ("B", "T", "D", "R"):
            if getattr(self, name) < (2 if name == "T" else 1):
                raise ValueError(f"shape {self.case}: {name} must be >= {2 if name == 'T' else 1}")

    @property
    def unknowns(self) -> int:
        """B * T * D * R: the size by which the time budget orders cases."""
        return self.B * self.T * self.D * self.R

    @property
    def scaled(self) -> bool:
        return self.B != self.full_B


NAMED_SHAPES: tuple[Shape, ...] = (
    Shape("lorenz", "named", 1536, 50, 1, 3),
    Shape("kdv", "named", 8192, 10, 1, 5),
    Shape("sst", "named", 12960, 208, 1, 3),
    Shape("long_T16384", "named", 8, 16384, 1, 3),
    Shape("long_T65536", "named", 8, 65536, 1, 3),
    Shape("coupled", "named", 64, 1000, 3, 3),
)

# the authors' published solver, forward+backward, float64 (EXPERIMENTS/SOLVER_SPEC section 9)
REFERENCE_MS: dict[str, float] = {
    "lorenz": 159.0,
    "kdv": 246.0,
    "sst": 12_200.0,
    "long_T16384": 1_550.0,
    "long_T65536": 7_840.0,
    "coupled": 975.0,
}


def t_sweep(exponents: Sequence[int] = range(6, 17), B: int = 8, D: int = 1, R: int = 3):
    """Shapes with T = 2^e for each exponent (ascending), named ``T<T>``."""
    return [Shape(f"T{2**e}", "T_sweep", B, 2**e, D, R) for e in sorted(exponents)]


def batch_sweep(exponents: Sequence[int] = range(0, 15), T: int = 256, D: int = 1, R: int = 3):
    """Shapes with B = 2^e for each exponent (ascending), named ``B<B>``."""
    return [Shape(f"B{2**e}", "batch_sweep", 2**e, T, D, R) for e in sorted(exponents)]


GROUPS = ("named", "T_sweep", "batch_sweep")
QUICK_MAX_ELEMENTS = 2**12  # quick mode: named shapes scaled so that B*T*D <= this
QUICK_MAX_DENSE_BYTES = 5 * 10**8  # quick mode default of --max-dense-bytes
TIME_BUDGET_S = 60.0  # default --time-budget
QUICK_TIME_BUDGET_S = 2.0  # default --time-budget with --quick


def _quick_named(shape: Shape) -> Shape:
    if shape.B * shape.T * shape.D <= QUICK_MAX_ELEMENTS:
        return shape
    B = max(1, QUICK_MAX_ELEMENTS // (shape.T * shape.D))
    return Shape(shape.case, shape.group, B, shape.T, shape.D, shape.R, full_B=shape.B)


def default_grid(quick: bool) -> list[Shape]:
    """Named shapes, T sweep and batch sweep; trimmed and scaled in quick mode (module doc)."""
    if quick:
        return [
            *(_quick_named(s) for s in NAMED_SHAPES),
            *t_sweep(range(6, 13, 2)),
            *batch_sweep(range(0, 7, 2)),
        ]
    return [*NAMED_SHAPES, *t_sweep(), *batch_sweep()]


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random well-conditioned inputs, all leaf tensors with ``requires_grad``.

    Returns coefficients ``(B, T, D, D, R)`` (small random entries plus 1 on the highest order
    of state e in equation e), rhs ``(B, T, D)``, init_vars ``(B, 1, D, 1)`` and steps
    ``(B, T-1)`` uniform in [0.05, 0.15].
    """
    B, T, D, R = shape.B, shape.T, shape.D, shape.R
    g = torch.Generator().manual_seed(seed)
    c = 0.1 * torch.randn(B, T, D, D, R, generator=g, dtype=torch.float64)
    idx = torch.arange(D)
    c[:, :, idx, idx, R - 1] += 1.0
    b = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    u0 = torch.randn(B, 1, D, 1, generator=g, dtype=torch.float64)
    h = 0.05 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(True) for x in (c, b, u0, h))


def dense_matrix_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Estimated memory of MNN dense: B * (1 + T*D*R)^2 * itemsize * 3."""
    n = 1 + shape.T * shape.D * shape.R
    itemsize = torch.empty((), dtype=dtype).element_size()
    return shape.B * n * n * itemsize * 3


def physical_memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_max_dense_bytes() -> int:
    """A quarter of the physical memory (8 GB when unknown)."""
    return physical_memory_bytes() // 4 or 8 * 10**9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(method: Method, inputs: tuple, device: torch.device) -> tuple[float, dict]:
    """One forward+backward step; returns (seconds, solver info).

    Convergence warnings (MNN CG) are recorded rather than shown: ``info["converged"]`` from
    the forward solve, ``info["backward_converged"]`` False when the backward solve warned.
    """
    for x in inputs:
        x.grad = None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        u, info = method.solve(*inputs)
        (u**2).sum().backward()
        _sync(device)
        seconds = time.perf_counter() - start
    for w in caught:
        if type(w.message).__name__ == "MNNConvergenceWarning" and "backward" in str(w.message):
            info["backward_converged"] = False
        elif type(w.message).__name__ != "MNNConvergenceWarning":
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if "converged" in info:
        info.setdefault("backward_converged", True)
    for x in inputs:  # a non-finite gradient means the measurement is meaningless
        if not bool(torch.isfinite(x.grad).all()):
            raise FloatingPointError("non-finite gradient")
    return seconds, info


def _measure(
    method: Method,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    warmup: bool,
) -> dict:
    """Time and peak memory of ``repeats`` steps on ``shape``; a partial CSV row."""
    inputs = make_inputs(shape, dtype, device)
    if warmup:
        _timed_step(method, inputs, device)
    times, converged = [], []
    for _ in range(repeats):
        seconds, info = _timed_step(method, inputs, device)
        times.append(seconds)
        if "converged" in info:
            converged.append(info["converged"] and info["backward_converged"])
    # memory in one more step of its own: the measurement hands freed memory back to the
    # operating system first (gc, malloc_trim), which would slow a timed step down
    _, peak = measure_peak_memory(_timed_step, method, inputs, device, device=device)
    peaks = [peak]
    row = {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "peak_mb": max(peaks) / MB,
        "status": "ok",
        "converged": all(converged) if converged else None,
    }
    if converged and not all(converged):
        row["note"] = "CG did not converge in 200 iterations (forward or backward solve)"
    return row


def _warm_up_compilation(method: Method, shape: Shape, dtype: torch.dtype, device) -> None:
    """One step on a tiny shape with the same D and R (compiles the kernels)."""
    tiny = Shape("warmup", "warmup", 2, 8, shape.D, shape.R)
    try:
        _timed_step(method, make_inputs(tiny, dtype, device), device)
    except Exception:  # the measured step reports its own error, with its own shape
        pass


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

COLUMNS = [
    "method", "dtype", "case", "group", "B", "T", "D", "R", "median_ms", "min_ms", "peak_mb",
    "status", "note", "converged", "repeats", "full_B", "device", "threads",
]


def run_benchmark(
    out_dir: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    dtypes: Sequence[str] = ("float64", "float32"),
    shapes: Sequence[Shape] | None = None,
    *,
    quick: bool = False,
    groups: Sequence[str] | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    max_dense_bytes: int | None = None,
    time_budget_s: float | None = None,
    device: str = "auto",
    mlflow_uri: str | None = None,
    progress: bool = True,
):
    """Run the benchmark and write its outputs; returns the table as a pandas DataFrame.

    ``shapes`` defaults to :func:`default_grid` (``quick``); ``groups`` keeps only the shapes of
    those groups (``named``, ``T_sweep``, ``batch_sweep``); ``repeats`` defaults to 1 in quick
    mode, else 5. See the module docstring for what is measured.
    """
    import pandas as pd

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(
            f"--methods: unknown {unknown or 'empty list'}; choose from {list(METHODS)}"
        )
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--dtypes: unknown {bad or 'empty list'}; choose from {list(DTYPES)}")
    repeats = (1 if quick else 5) if repeats is None else repeats
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if max_dense_bytes is not None:
        max_dense = max_dense_bytes
    elif quick:
        max_dense = min(QUICK_MAX_DENSE_BYTES, default_max_dense_bytes())
    else:
        max_dense = default_max_dense_bytes()
    budget = (QUICK_TIME_BUDGET_S if quick else TIME_BUDGET_S) if time_budget_s is None else (
        time_budget_s
    )
    if not budget >= 0:
        raise ValueError(f"--time-budget must be >= 0 seconds, got {budget}")
    if max_dense < 0:
        raise ValueError(f"--max-dense-bytes must be >= 0, got {max_dense}")
    if groups is not None:
        bad = [g for g in groups if g not in GROUPS]
        if bad or not groups:
            raise ValueError(f"--groups: unknown {bad or 'empty list'}; choose from {GROUPS}")
    dev = _resolve_device(device)
    shapes = default_grid(quick) if shapes is None else list(shapes)
    if groups is not None:
        shapes = [s for s in shapes if s.group in groups]
    out = prepare_output_dir(out_dir)
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    rows: dict[tuple[int, int, int], dict] = {}  # (shape, dtype, method) index -> row
    # (method, dtype) -> (unknowns of the smallest case over the time budget, skip reason)
    over_budget: dict[tuple[str, str], tuple[int, str]] = {}
    compiled: set[tuple[str, str, int, int]] = set()
    # smallest cases first, so the time budget stops a method at its first slow size
    run_order = sorted(range(len(shapes)), key=lambda i: shapes[i].unknowns)
    for i_shape in run_order:
        shape = shapes[i_shape]
        for i_dtype, dtype_name in enumerate(dtypes):
            dtype = DTYPES[dtype_name]
            for i_method, name in enumerate(methods):
                method = METHODS[name]
                row = {
                    "method": name, "dtype": dtype_name, "case": shape.case,
                    "group": shape.group, "B": shape.B, "T": shape.T, "D": shape.D,
                    "R": shape.R, "median_ms": math.nan, "min_ms": math.nan,
                    "peak_mb": math.nan, "status": "skipped", "note": "", "converged": None,
                    "repeats": repeats, "full_B": shape.full_B, "device": str(dev),
                    "threads": torch.get_num_threads(),
                }
                reason = _skip_reason(method, shape, dtype, max_dense, over_budget)
                if reason:
                    row["note"] = reason
                else:
                    try:
                        key = (name, dtype_name, shape.D, shape.R)
                        if quick and key not in compiled:
                            _warm_up_compilation(method, shape, dtype, dev)
                        compiled.add(key)
                        row.update(_measure(method, shape, dtype, dev, repeats, not quick))
                    except Exception as exc:  # recorded, the benchmark goes on
                        row["status"] = "failed"
                        row["note"] = f"{type(exc).__name__}: {exc}"[:300]
                    if row["status"] == "ok" and row["median_ms"] > 1e3 * budget:
                        previous = over_budget.get((name, dtype_name))
                        if previous is None or shape.unknowns < previous[0]:
                            over_budget[(name, dtype_name)] = (
                                shape.unknowns,
                                f"skipped: {shape.case} ({shape.unknowns} unknowns) took "
                                f"{row['median_ms'] / 1e3:.1f} s > time budget {budget:g} s",
                            )
                if shape.scaled:
                    scale = f"quick: batch scaled from {shape.full_B}"
                    row["note"] = f"{scale}; {row['note']}" if row["note"] else scale
                rows[(i_shape, i_dtype, i_method)] = row
                if progress:
                    print(_progress_line(row), file=sys.stderr, flush=True)

    table = pd.DataFrame([rows[k] for k in sorted(rows)], columns=COLUMNS)  # grid order
    table.to_csv(out / "bench.csv", index=False)
    floors = floor_table(table, dev, quick)
    if floors is not None:
        floors.to_csv(out / "floors.csv", index=False)
    (out / "bench.md").write_text(markdown_report(table, quick=quick, floors=floors))
    _plot_sweep(table, "T_sweep", "T", out / "scaling_T.png")
    _plot_sweep(table, "batch_sweep", "B", out / "scaling_batch.png")
    if uri:
        _log_mlflow(uri, out, table, floors, {
            "methods": ",".join(methods), "dtypes": ",".join(dtypes), "quick": quick,
            "repeats": repeats, "threads": torch.get_num_threads(), "device": str(dev),
            "max_dense_bytes": max_dense, "time_budget_s": budget,
            "n_cases": len(shapes), **_environment(),
        })
    return table


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    return dev


def _skip_reason(method: Method, shape: Shape, dtype, max_dense: int, over_budget: dict) -> str:
    if method.dense:
        need = dense_matrix_bytes(shape, dtype)
        if need > max_dense:
            return (f"skipped: dense matrix needs ~{need / 1e9:.3g} GB "
                    f"> --max-dense-bytes {max_dense / 1e9:.3g} GB")
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    unknowns, reason = over_budget.get((method.name, dtype_name), (0, ""))
    return reason if reason and shape.unknowns >= unknowns else ""


def _progress_line(row: dict) -> str:
    head = f"[bench] {row['method']:>15} {row['dtype']:>7} {row['case']:>12} B={row['B']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} {row['note']}"
    return f"{head}: {row['median_ms']:.2f} ms, {row['peak_mb']:.1f} MB"


def _environment() -> dict:
    env = {"torch": torch.__version__, "cpu_count": os.cpu_count(),
           "cpu_peak_method": cpu_peak_method()}
    try:
        import numba

        env["numba"] = numba.__version__
        env["numba_threading_layer_config"] = numba.config.THREADING_LAYER
    except ImportError:
        env["numba"] = "missing"
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    return env


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _cell(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['median_ms']:.4g} ms, {row['peak_mb']:.4g} MB"


def floor_table(table, device: torch.device, quick: bool):
    """Per named shape and dtype measured with an S-MNN method: the floor of
    :mod:`smnn.roofline` on this machine, the best S-MNN time and their ratio (None when no
    such row exists or the device is not a CPU: the rates are measured on the CPU)."""
    import pandas as pd

    from smnn.roofline import floor_ms, measure_machine_rates, solver_step_cost

    ours = table[
        (table["group"] == "named")
        & (table["status"] == "ok")
        & table["method"].astype(str).str.startswith("smnn")
    ]
    if ours.empty or device.type != "cpu":
        return None
    rows = []
    for dtype_name, part in ours.groupby("dtype", sort=False):
        dtype = DTYPES[dtype_name]
        if quick:
            rates = measure_machine_rates(dtype, stream_mb=64, matmul_n=512, repeats=3)
        else:
            rates = measure_machine_rates(dtype)
        for case, rs in part.groupby("case", sort=False):
            best = rs.loc[rs["median_ms"].idxmin()]
            cost = solver_step_cost(
                int(best["B"]), int(best["T"]), int(best["D"]), int(best["R"]), dtype.itemsize
            )
            floor = floor_ms(cost, rates)
            rows.append({
                "case": case, "dtype": dtype_name, "B": int(best["B"]), "T": int(best["T"]),
                "D": int(best["D"]), "R": int(best["R"]), "mb_moved": cost.bytes / MB,
                "mflop": cost.flops / 1e6, "bandwidth_gb_s": rates.bandwidth / 1e9,
                "gflops": rates.flop_rate / 1e9, "floor_ms": floor,
                "best_method": best["method"], "best_ms": float(best["median_ms"]),
                "ratio": float(best["median_ms"]) / floor,
            })
    return pd.DataFrame(rows)


def _floor_lines(floors) -> list[str]:
    lines = [
        "", "## Floors (smnn.roofline)", "",
        "Unavoidable data movement and arithmetic of one forward+backward step over the "
        "machine's measured streaming bandwidth and matrix-multiply rate; the floor is the "
        "larger of the two times, the ratio is the best S-MNN method's median over it.", "",
        "| case | dtype | MB moved | MFLOP | GB/s | GFLOP/s | floor ms | best method | best ms "
        "| best / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in floors.iterrows():
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['mb_moved']:.4g} | {r['mflop']:.4g} | "
            f"{r['bandwidth_gb_s']:.3g} | {r['gflops']:.3g} | {r['floor_ms']:.3g} | "
            f"{r['best_method']} | {r['best_ms']:.4g} | {r['ratio']:.1f}x |"
        )
    return lines


def markdown_report(table, quick: bool = False, floors=None) -> str:
    """bench.md: one table per shape group, rows = shapes, columns = method/dtype (ms, MB).

    The named-shape table also gives the authors' float64 timings and the speedup of the best
    S-MNN method in float64 over them, for shapes run at their full size; ``floors`` (from
    :func:`floor_table`) adds the floors section.
    """
    lines = ["# Solver benchmark: forward + backward", ""]
    lines.append("Median wall time over the repeats and peak memory above the inputs "
                 f"(device {table['device'].iloc[0] if len(table) else '?'}, "
                 f"{table['threads'].iloc[0] if len(table) else '?'} threads"
                 f"{', quick mode' if quick else ''}).")
    columns = list(dict.fromkeys(zip(table["method"], table["dtype"], strict=True)))
    titles = {"named": "Named shapes (SOLVER_SPEC section 9)", "T_sweep": "Sweep over T",
              "batch_sweep": "Sweep over batch size"}
    for group, title in titles.items():
        part = table[table["group"] == group]
        if part.empty:
            continue
        lines += ["", f"## {title}", ""]
        if group == "named":
            lines += [
                "The authors' column holds their published float64 forward+backward timings "
                "of their solver on their machine (not measured here), so the speedup is "
                "indicative only; it is shown for shapes run at their full size.",
                "",
            ]
        header = ["case", "B", "T", "D", "R", *(f"{m} {d}" for m, d in columns)]
        if group == "named":
            header += ["authors' float64 ms", "speedup (best S-MNN float64)"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for case in dict.fromkeys(part["case"]):
            rows = part[part["case"] == case]
            first = rows.iloc[0]
            cells = [case, str(first["B"]), str(first["T"]), str(first["D"]), str(first["R"])]
            for m, d in columns:
                match = rows[(rows["method"] == m) & (rows["dtype"] == d)]
                cells.append(_cell(match.iloc[0]) if len(match) else "")
            if group == "named":
                cells += _reference_cells(case, rows, first)
            lines.append("| " + " | ".join(cells) + " |")
        notes = part[part["note"].astype(str) != ""]
        if not notes.empty:
            lines += ["", "Notes:"]
            for _, r in notes.iterrows():
                lines.append(f"- {r['method']} {r['dtype']} {r['case']}: {r['note']}")
    if floors is not None and not floors.empty:
        lines += _floor_lines(floors)
    return "\n".join(lines) + "\n"


def _reference_cells(case: str, rows, first) -> list[str]:
    ref = REFERENCE_MS.get(case)
    if ref is None:
        return ["", ""]
    if int(first["B"]) != int(first["full_B"]):
        return [f"{ref:,.0f}", "n/a (batch scaled)"]
    ours = rows[
        rows["method"].astype(str).str.startswith("smnn")
        & (rows["dtype"] == "float64")
        & (rows["status"] == "ok")
    ]
    if ours.empty:
        return [f"{ref:,.0f}", ""]
    best = ours.loc[ours["median_ms"].idxmin()]
    return [f"{ref:,.0f}", f"{ref / best['median_ms']:.1f}x ({best['method']})"]


def _plot_sweep(table, group: str, axis: str, path: Path) -> None:
    """Log-log time and memory against ``axis`` (``"T"`` or ``"B"``), one line per method/dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = table[(table["group"] == group) & (table["status"] == "ok")]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(table["method"]))}
    for (m, d), line in part.groupby(["method", "dtype"], sort=False):
        line = line.sort_values(axis)
        style = dict(color=colors[m], ls="-" if d == "float64" else "--", marker="o", ms=3,
                     label=f"{m} {d}")
        ax_t.plot(line[axis], line["median_ms"], **style)
        ax_m.plot(line[axis], line["peak_mb"].clip(lower=1e-3), **style)
    for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps T" if axis == "T" else "batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if part.empty:
        ax_t.text(0.5, 0.5, "no measured cases", ha="center", transform=ax_t.transAxes)
    else:
        ax_t.legend(fontsize=8)
    fixed = "B = 8" if axis == "T" else "T = 256"
    fig.suptitle(f"Solver scaling against {'T' if axis == 'T' else 'batch size'} ({fixed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


def _tracking_target(uri: str):
    """A :class:`smnn.tracking.TrackingTarget` for ``uri`` (artifacts beside a SQLite file)."""
    from smnn.tracking import TrackingTarget

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if "timeout=" not in uri:
            uri = f"{uri}{'&' if '?' in uri else '?'}timeout=60"
        return TrackingTarget(uri, (db.parent / "mlartifacts").resolve().as_uri(), "cli")
    return TrackingTarget(uri, None, "cli")


def _log_mlflow(uri: str, out: Path, table, floors, params: dict) -> str:
    """One run in experiment ``benchmark``; returns its run id."""
    from smnn.tracking import RunTracker

    tracker = RunTracker.start(_tracking_target(uri), "benchmark", "bench",
                               tags={"smnn.stage": "benchmark"})
    try:
        tracker.log_params(params)
        metrics = {}
        for _, r in table[table["status"] == "ok"].iterrows():
            key = f"{r['method']}.{r['dtype']}.{r['case']}"
            metrics[f"time_ms.{key}"] = r["median_ms"]
            metrics[f"min_time_ms.{key}"] = r["min_ms"]
            metrics[f"peak_mb.{key}"] = r["peak_mb"]
        if floors is not None:
            for _, r in floors.iterrows():
                metrics[f"floor_ms.{r['dtype']}.{r['case']}"] = r["floor_ms"]
                if r["best_ms"] == r["best_ms"]:  # not NaN
                    metrics[f"floor_ratio.{r['dtype']}.{r['case']}"] = r["ratio"]
            for dtype, rates in floors.groupby("dtype").first().iterrows():
                metrics[f"machine.bandwidth_gb_s.{dtype}"] = rates["bandwidth_gb_s"]
                metrics[f"machine.gflops.{dtype}"] = rates["gflops"]
        tracker.log_metrics(metrics)
        names = ["bench.csv", "bench.md", "scaling_T.png", "scaling_batch.png"]
        if floors is not None:
            names.append("floors.csv")
        for name in names:
            tracker.log_artifact(out / name)
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time and peak memory of the solvers (forward+backward) against T and batch",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="one repeat, trimmed sweeps, named shapes with scaled batch")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (default: %(default)s)")
    p.add_argument("--dtypes", default="float64,float32",
                   help="comma-separated, from float64,float32 (default: %(default)s)")
    p.add_argument("--groups", default=",".join(GROUPS),
                   help="comma-separated shape groups to run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per case (default: 5, or 1 with --quick)")
    p.add_argument("--max-dense-bytes", type=int, default=None,
                   help="largest MNN dense matrix estimate to run (default: 1/4 of RAM; "
                        "with --quick at most 5e8)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per step; once a case of a method and dtype takes longer, its "
                        f"cases with as many unknowns or more are skipped (default: "
                        f"{TIME_BUDGET_S:g}, or {QUICK_TIME_BUDGET_S:g} with --quick)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; none: no logging)")
    p.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    try:
        table = run_benchmark(
            args.out,
            methods=_csv_list(args.methods),
            dtypes=_csv_list(args.dtypes),
            quick=args.quick,
            groups=_csv_list(args.groups),
            repeats=args.repeats,
            threads=args.threads,
            max_dense_bytes=args.max_dense_bytes,
            time_budget_s=args.time_budget,
            device=args.device,
            mlflow_uri=args.mlflow_uri,
        )
    except ValueError as exc:
        print(f"smnn bench: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "bench.md").read_text(), end="")
    n_ok = int((table["status"] == "ok").sum())
    print(f"{n_ok} of {len(table)} cases measured; outputs in {args.out}")
    return 0
