"""smnn: Scalable Mechanistic Neural Networks.

The solver (``smnn.ode_forward``, ``smnn.factorize``) and the pieces of the paper's experiments
(data, models, training, tracking). See README.md.
"""

from smnn.solver.api import OdeFactorization, factorize, ode_forward
from smnn.solver.banded import NonPositivePivotError
from smnn.solver.frozen import clear_frozen_lhs_cache

__version__ = "0.1.0"

__all__ = [
    "ode_forward",
    "factorize",
    "OdeFactorization",
    "NonPositivePivotError",
    "clear_frozen_lhs_cache",
    "__version__",
]
