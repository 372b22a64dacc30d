"""Standalone validation of the solvers on linear ODEs with closed-form solutions
(docs/experiments.md, "Standalone validation").

- :mod:`~smnn.standalone.equations`: the catalogue (the ODEs, their closed forms, solve_ivp,
  the solver inputs of a case);
- :mod:`~smnn.standalone.validate`: solving every case with every solver of the registry, the
  error statistics, the output files and the MLflow run;
- :mod:`~smnn.standalone.figure`: ``solutions.png``.

The solvers are those of :data:`smnn.solver.registry.SOLVERS` (re-exported here as
``SOLVERS``). The command line is :mod:`smnn.commands.standalone` (``smnn standalone``).
"""

from smnn.solver.registry import SOLVERS
from smnn.standalone.equations import (
    EQUATIONS,
    N_ORDERS,
    N_STEPS,
    STEP,
    LinearOde,
    ivp_solution,
    solver_inputs,
    time_grid,
)
from smnn.standalone.figure import solutions_figure
from smnn.standalone.validate import (
    OUTPUT_FILES,
    check_solvers,
    error_stats,
    run_standalone,
    solve_case,
)

__all__ = [
    "EQUATIONS",
    "N_ORDERS",
    "N_STEPS",
    "OUTPUT_FILES",
    "SOLVERS",
    "STEP",
    "LinearOde",
    "check_solvers",
    "error_stats",
    "ivp_solution",
    "run_standalone",
    "solutions_figure",
    "solve_case",
    "solver_inputs",
    "time_grid",
]
