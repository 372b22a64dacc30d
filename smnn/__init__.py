"""smnn: Scalable Mechanistic Neural Networks.

The solver (``smnn.ode_forward``, ``smnn.factorize``) and the pieces of the paper's experiments
(data, models, training, tracking). See README.md.

The solver's names are imported on first use (``smnn.ode_forward`` imports torch then), so that
``import smnn`` and ``smnn --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module defining it
_LAZY = {
    "ode_forward": "smnn.solver.api",
    "factorize": "smnn.solver.api",
    "OdeFactorization": "smnn.solver.api",
    "NonPositivePivotError": "smnn.solver.banded",
    "clear_frozen_lhs_cache": "smnn.solver.frozen",
}

__all__ = [
    "ode_forward",
    "factorize",
    "OdeFactorization",
    "NonPositivePivotError",
    "clear_frozen_lhs_cache",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - typing only
    from smnn.solver.api import OdeFactorization, factorize, ode_forward
    from smnn.solver.banded import NonPositivePivotError
    from smnn.solver.frozen import clear_frozen_lhs_cache


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
