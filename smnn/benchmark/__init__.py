"""Scaling benchmark of the solvers: forward+backward time and peak memory
(docs/experiments.md, "Scaling benchmark"; targets in docs/solver.md, "Complexity and performance
targets").

One module per idea:

- :mod:`~smnn.benchmark.catalog`: the methods (the solver registry plus S-MNN engine
  variants), the shapes and grids, the random inputs of a case;
- :mod:`~smnn.benchmark.peer`: other implementations of the same function (``--peer``), timed
  side by side in the same process;
- :mod:`~smnn.benchmark.measure`: one step, one case (warm-up, median of repeats, peak memory),
  the time budget and the whole grid with its progress lines;
- :mod:`~smnn.benchmark.report`: bench.csv (with the ratios against the best S-MNN method),
  floors.csv and bench.md;
- :mod:`~smnn.benchmark.figures`: the log-log scaling plots;
- :mod:`~smnn.benchmark.mlflow_run`: the run in the MLflow experiment ``benchmark``;
- :mod:`~smnn.benchmark.run`: options (arguments or config), the run, the output files.

The command line is :mod:`smnn.commands.bench` (``smnn bench``).
"""

from smnn.benchmark.catalog import (
    DEFAULT_METHODS,
    DTYPES,
    GROUPS,
    METHODS,
    NAMED_SHAPES,
    QUICK_MAX_ELEMENTS,
    Method,
    Shape,
    batch_sweep,
    default_grid,
    make_inputs,
    t_sweep,
)
from smnn.benchmark.measure import measure_case, run_grid, timed_step
from smnn.benchmark.peer import PeerSpec, load_peer, parse_peer
from smnn.benchmark.report import PEER_TARGET, floor_table, make_table, markdown_report
from smnn.benchmark.run import (
    OUTPUT_FILES,
    QUICK_MAX_DENSE_BYTES,
    QUICK_TIME_BUDGET_S,
    TIME_BUDGET_S,
    BenchPlan,
    options_from_config,
    plan_benchmark,
    run_benchmark,
    run_plan,
)

__all__ = [
    "DEFAULT_METHODS",
    "DTYPES",
    "GROUPS",
    "METHODS",
    "NAMED_SHAPES",
    "OUTPUT_FILES",
    "PEER_TARGET",
    "QUICK_MAX_DENSE_BYTES",
    "QUICK_MAX_ELEMENTS",
    "QUICK_TIME_BUDGET_S",
    "TIME_BUDGET_S",
    "BenchPlan",
    "Method",
    "PeerSpec",
    "Shape",
    "batch_sweep",
    "default_grid",
    "floor_table",
    "load_peer",
    "make_inputs",
    "make_table",
    "markdown_report",
    "measure_case",
    "options_from_config",
    "parse_peer",
    "plan_benchmark",
    "run_benchmark",
    "run_grid",
    "run_plan",
    "t_sweep",
    "timed_step",
]
