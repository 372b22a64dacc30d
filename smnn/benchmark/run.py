"""A benchmark run: its options (from arguments or the config), the run and its output files.

Options, and the config keys they come from (``smnn bench --config``; flags override them):

=====================  ====================================  ==================================
option                 config key                            default
=====================  ====================================  ==================================
methods                ``benchmark.methods``                 :data:`DEFAULT_METHODS`
dtypes                 ``benchmark.dtypes``                  float64, float32
quick                  ``benchmark.quick``                   false
time_budget_s          ``benchmark.time_budget`` (null ok)   60 s, quick 1 s
repeats                ``benchmark.repeats`` (optional)      5, quick 3
groups                 ``benchmark.groups`` (optional)       named, T_sweep, batch_sweep
cases                  ``benchmark.cases`` (optional)        every case of those groups
max_dense_bytes        ``benchmark.max_dense_bytes`` (opt.)  1/4 of RAM, quick at most 5e8
peers                  ``benchmark.peers`` (optional)        none
contention             ``benchmark.contention`` (optional)   false
seed                   ``seed``                              0 (seeds the random inputs)
threads                ``threads``                           torch's default
device                 ``device``                            auto
=====================  ====================================  ==================================

Quick mode (the demo/CI run; about 2 minutes on 2 quiet cores with the default methods):
trimmed sweeps and named shapes with scaled batch (:func:`smnn.benchmark.catalog.default_grid`),
a median of 3 timed steps after a warm-up step on the same shape, time budget 1 s, dense matrix
at most 5e8 bytes. Its bench.md and figures say so (:data:`smnn.plotting.QUICK_NOTE`).

Compilation (numba, minutes on a fresh install) happens in untimed steps before each method's
first case and never counts against the time budget (:mod:`smnn.benchmark.measure`).

Contention (``--contention``): after the grid, the named shapes again with 1 and 2 threads, on a
quiet machine and beside a busy-loop process (:mod:`smnn.benchmark.contention`; 15 rounds, 9 in
quick mode), written to ``contention.csv`` and a section of bench.md.

Output files in the output directory (:data:`OUTPUT_FILES`, always all of them): ``bench.csv``,
``bench.md``, ``floors.csv`` (:mod:`smnn.benchmark.report`), ``scaling_T.png``,
``scaling_batch.png`` and ``accuracy_T.png`` (:mod:`smnn.benchmark.figures`); with
``--contention`` also ``contention.csv``; each written atomically. With a tracking target, one
MLflow run (:mod:`smnn.benchmark.mlflow_run`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smnn.benchmark.accuracy import reference_method
from smnn.benchmark.catalog import (
    DEFAULT_METHODS,
    DTYPES,
    GROUPS,
    METHODS,
    Method,
    Shape,
    default_grid,
)
from smnn.benchmark.contention import (
    CONTENTION_FILE,
    CONTENTION_REPEATS,
    QUICK_CONTENTION_REPEATS,
    run_contention,
)
from smnn.benchmark.figures import ACCURACY_FIGURE, write_figures
from smnn.benchmark.measure import (
    GridOptions,
    default_max_dense_bytes,
    environment,
    load_average,
    run_grid,
)
from smnn.benchmark.peer import load_peer
from smnn.benchmark.report import TABLE_COLUMNS, floor_table, make_table, markdown_report
from smnn.config import Config
from smnn.devices import resolve_device
from smnn.io import atomic_write, atomic_write_text
from smnn.tracking import TrackingTarget

__all__ = [
    "OUTPUT_FILES",
    "TIME_BUDGET_S",
    "QUICK_TIME_BUDGET_S",
    "QUICK_MAX_DENSE_BYTES",
    "BenchPlan",
    "plan_benchmark",
    "options_from_config",
    "run_plan",
    "run_benchmark",
]

OUTPUT_FILES = (
    "bench.csv",
    "bench.md",
    "floors.csv",
    "scaling_T.png",
    "scaling_batch.png",
    ACCURACY_FIGURE,
)
TIME_BUDGET_S = 60.0
QUICK_TIME_BUDGET_S = 1.0
REPEATS = 5
QUICK_REPEATS = 3
QUICK_MAX_DENSE_BYTES = 5 * 10**8

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchPlan:
    """A validated benchmark: what runs, how, and the options as given (for MLflow)."""

    methods: list[Method]
    dtypes: list[str]
    shapes: list[Shape]
    quick: bool
    grid: GridOptions
    threads: int | None
    peers: list[str] = field(default_factory=list)
    contention: bool = False

    def params(self) -> dict[str, Any]:
        """The effective settings (MLflow params)."""
        return {
            "methods": ",".join(m.name for m in self.methods if m.family != "peer"),
            "peers": ",".join(self.peers),
            "dtypes": ",".join(self.dtypes),
            "quick": self.quick,
            "repeats": self.grid.repeats,
            "threads": self.threads or torch.get_num_threads(),
            "device": str(self.grid.device),
            "max_dense_bytes": self.grid.max_dense_bytes,
            "time_budget_s": self.grid.time_budget_s,
            "seed": self.grid.seed,
            "n_cases": len(self.shapes) * len(self.dtypes) * len(self.methods),
            "accuracy_reference": f"float64 {reference_method()}",
            "contention": self.contention,
        }


def plan_benchmark(
    methods: Sequence[str] = DEFAULT_METHODS,
    dtypes: Sequence[str] = ("float64", "float32"),
    shapes: Sequence[Shape] | None = None,
    *,
    quick: bool = False,
    groups: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    max_dense_bytes: int | None = None,
    time_budget_s: float | None = None,
    device: str = "auto",
    peers: Sequence[str | Method] = (),
    seed: int = 0,
    contention: bool = False,
) -> BenchPlan:
    """Check every option (ValueError naming the flag) and load the peers; nothing runs yet.

    ``shapes`` defaults to :func:`~smnn.benchmark.catalog.default_grid` of the mode; ``groups``
    and ``cases`` (case names such as ``lorenz`` or ``T1024``) keep only those shapes."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not (methods or peers):
        raise ValueError(
            f"--methods: unknown {unknown or 'empty list'}; choose from {list(METHODS)}"
        )
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--dtypes: unknown {bad or 'empty list'}; choose from {list(DTYPES)}")
    repeats = (QUICK_REPEATS if quick else REPEATS) if repeats is None else repeats
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if max_dense_bytes is not None:
        max_dense = max_dense_bytes
    elif quick:
        max_dense = min(QUICK_MAX_DENSE_BYTES, default_max_dense_bytes())
    else:
        max_dense = default_max_dense_bytes()
    if max_dense < 0:
        raise ValueError(f"--max-dense-bytes must be >= 0, got {max_dense}")
    budget = (
        (QUICK_TIME_BUDGET_S if quick else TIME_BUDGET_S)
        if time_budget_s is None
        else (time_budget_s)
    )
    if not budget >= 0:
        raise ValueError(f"--time-budget must be >= 0 seconds, got {budget}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if groups is not None:
        bad = [g for g in groups if g not in GROUPS]
        if bad or not groups:
            raise ValueError(f"--groups: unknown {bad or 'empty list'}; choose from {GROUPS}")
    dev = resolve_device(device, what="--device")
    chosen = [METHODS[m] for m in dict.fromkeys(methods)]
    peer_methods = [p if isinstance(p, Method) else load_peer(p) for p in peers]
    names = [m.name for m in chosen + peer_methods]
    if len(set(names)) != len(names):
        raise ValueError(f"--peer: two methods share a name in {names}; give each peer =LABEL")
    grid = default_grid(quick) if shapes is None else list(shapes)
    if groups is not None:
        grid = [s for s in grid if s.group in groups]
    if cases is not None:
        names = [s.case for s in grid]
        bad = [c for c in cases if c not in names]
        if bad or not cases:
            raise ValueError(f"--cases: unknown {bad or 'empty list'}; choose from {names}")
        grid = [s for s in grid if s.case in cases]
    return BenchPlan(
        methods=chosen + peer_methods,
        dtypes=list(dtypes),
        shapes=grid,
        quick=quick,
        grid=GridOptions(repeats, max_dense, float(budget), dev, seed, threads),
        threads=threads,
        peers=[p.name if isinstance(p, Method) else str(p) for p in peers],
        contention=bool(contention),
    )


def _optional(config: Config, key: str, read: Callable[[str], Any]) -> Any:
    return read(key) if config.has(key) else None


def options_from_config(config: Config) -> dict[str, Any]:
    """Keyword arguments of :func:`plan_benchmark` from the config (keys in the module doc);
    keys that are absent are left out, so the defaults apply."""
    b = "benchmark"
    opts: dict[str, Any] = {
        "seed": config.get_int("seed", min_value=0),
        "threads": config.get_int("threads", min_value=1),
        "device": config.get_str("device", choices=("auto", "cpu", "cuda")),
        "quick": _optional(config, f"{b}.quick", config.get_bool),
        "methods": _optional(
            config, f"{b}.methods", lambda k: config.get_str_list(k, choices=list(METHODS))
        ),
        "dtypes": _optional(
            config, f"{b}.dtypes", lambda k: config.get_str_list(k, choices=list(DTYPES))
        ),
        "groups": _optional(
            config, f"{b}.groups", lambda k: config.get_str_list(k, choices=GROUPS)
        ),
        "cases": _optional(config, f"{b}.cases", config.get_str_list),
        "peers": _optional(config, f"{b}.peers", config.get_str_list),
        "contention": _optional(config, f"{b}.contention", config.get_bool),
        "time_budget_s": _optional(
            config,
            f"{b}.time_budget",
            lambda k: config.get_float(k, non_negative=True, allow_none=True),
        ),
        "repeats": _optional(
            config, f"{b}.repeats", lambda k: config.get_int(k, min_value=1, allow_none=True)
        ),
        "max_dense_bytes": _optional(
            config,
            f"{b}.max_dense_bytes",
            lambda k: config.get_int(k, min_value=0, allow_none=True),
        ),
    }
    return {k: v for k, v in opts.items() if v is not None}


def _busy_warning(load: float | None, threads: int) -> str:
    """A warning when other processes already keep the cores busy (None: no warning)."""
    cpus = os.cpu_count() or 1
    if load is None or load + threads <= cpus + 0.5:
        return ""
    return (
        f"load average {load:.1f} on {cpus} CPUs before the run: other processes compete "
        f"for the cores, so the timings (of parallel kernels with {threads} threads above "
        "all) are inflated and noisy; bench.md records the load"
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write_csv(frame, path: Path) -> None:
    atomic_write(path, lambda f: frame.to_csv(f, index=False))


def run_plan(
    plan: BenchPlan,
    out_dir: str | Path,
    *,
    tracking: TrackingTarget | None = None,
    tags: Mapping[str, str] | None = None,
    config_data: Mapping[str, Any] | None = None,
    progress: Progress | None = _stderr,
):
    """Measure ``plan``, write :data:`OUTPUT_FILES` into ``out_dir`` (created when missing),
    log the MLflow run when ``tracking`` is given; returns the table (a DataFrame)."""
    say = progress or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    start = time.perf_counter()
    load_start = load_average()
    n = len(plan.shapes) * len(plan.dtypes) * len(plan.methods)
    say(
        f"[bench] {n} cases ({len(plan.shapes)} shapes x {len(plan.dtypes)} dtypes x "
        f"{len(plan.methods)} methods) on {plan.grid.device}, {torch.get_num_threads()} "
        f"threads, median of {plan.grid.repeats} after a warm-up, time budget "
        f"{plan.grid.time_budget_s:g} s{', quick mode' if plan.quick else ''}"
    )
    busy = _busy_warning(load_start, torch.get_num_threads())
    if busy:
        say(f"[bench] warning: {busy}")
    rows = run_grid(plan.methods, plan.dtypes, plan.shapes, plan.grid, progress=progress)
    table = make_table(rows)[TABLE_COLUMNS]
    machine = {
        "load_start": load_start,
        "load_end": load_average(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if (
        plan.grid.device.type == "cpu"
        and (
            (table["group"] == "named") & (table["status"] == "ok") & (table["family"] == "smnn")
        ).any()
    ):
        say("[bench] measuring the machine's bandwidth and matmul rate for the floors")
    floors = floor_table(table, plan.grid.device, plan.quick)
    contention = None
    files = list(OUTPUT_FILES)
    if plan.contention:
        rounds = QUICK_CONTENTION_REPEATS if plan.quick else CONTENTION_REPEATS
        say(
            f"[bench] contention: named shapes with 1 and 2 threads, quiet and beside a "
            f"busy-loop process, {rounds} rounds each"
        )
        contention = run_contention(
            plan.methods,
            plan.dtypes,
            plan.shapes,
            rounds,
            plan.grid.device,
            plan.grid.seed,
            progress,
        )
        _write_csv(contention, out / CONTENTION_FILE)
        files.append(CONTENTION_FILE)
        machine["load_end"] = load_average()
    reference = reference_method()
    _write_csv(table, out / "bench.csv")
    _write_csv(floors, out / "floors.csv")
    atomic_write_text(
        markdown_report(
            table,
            quick=plan.quick,
            floors=floors,
            machine=machine,
            reference=reference,
            contention=contention,
        ),
        out / "bench.md",
    )
    write_figures(table, out, quick=plan.quick, reference=reference)
    if tracking is not None:
        from smnn.benchmark.mlflow_run import log_benchmark_run

        run_id = log_benchmark_run(
            tracking,
            out,
            files,
            table,
            floors,
            plan.params(),
            environment(),
            tags=tags,
            config_data=config_data,
            contention=contention,
        )
        say(f"[bench] MLflow run {run_id} in experiment benchmark at {tracking.tracking_uri}")
    minutes, seconds = divmod(int(time.perf_counter() - start), 60)
    counts = table["status"].value_counts().to_dict()
    say(
        f"[bench] done in {minutes}:{seconds:02d}: {counts.get('ok', 0)} of {len(table)} cases "
        f"measured, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed; "
        f"outputs in {out.resolve()}: {', '.join(files)}"
    )
    return table


def run_benchmark(
    out_dir: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    dtypes: Sequence[str] = ("float64", "float32"),
    shapes: Sequence[Shape] | None = None,
    *,
    tracking: TrackingTarget | None = None,
    tags: Mapping[str, str] | None = None,
    progress: bool | Progress = True,
    **options: Any,
):
    """:func:`plan_benchmark` (``options``: its keywords) then :func:`run_plan`; returns the
    table. ``progress``: True prints the progress lines to stderr, False prints nothing, a
    callable receives each line."""
    plan = plan_benchmark(methods, dtypes, shapes, **options)
    sink = _stderr if progress is True else (progress or None)
    return run_plan(plan, out_dir, tracking=tracking, tags=tags, progress=sink)
