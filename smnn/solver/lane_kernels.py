"""The lane kernels of the LDL^T solver at any width: what they take and how they are built.

The kernels themselves (assembly, block Cholesky, substitutions, gradients) are written once, for
any number of lanes, in ``lane_kernels_source.py`` (its docstring describes the algorithm and
the array layouts). :func:`kernels` compiles that source at a width with the lane helpers of
:mod:`smnn.solver.lane_ops` (plus :data:`PIVOT_OPS`, the pivot step of this solver) and returns
the module: ``kernels(32)`` for calls with many systems, ``kernels(8)`` for few (the width is
chosen by :func:`smnn.solver.fused.kernels_for`). Both widths compute the same operations in the
same order in each lane, so lanes of systems give the same bits at either width.

Why 32 lanes (4 vectors of 8 float64) rather than 8 (one vector) for many systems: the
recurrence is a chain of dependent operations (each pivot's square root and division, then the
column that needs it), and every lane operation carries a dozen integer instructions of
indexing. With 8 lanes the kernels waited on the chain and on that bookkeeping; 32 lanes issue
four independent vector operations per index computation. Measured at the KdV shape (B=8192,
T=10, R=5, float64, one thread): forward kernel 11.3 -> 7.7 ms, backward 12.8 -> 9.1 ms. With
fewer than 64 systems the padding lanes cost as much as real ones: B = 8 long sequences
(T = 65,536) took 424 ms at 32 lanes against 136 ms at 8.

The kernels take their arrays in a few named tuples (numba types a namedtuple of arrays like a
tuple, so this costs nothing at run time and compiles once per dtype and layout):
:class:`Inputs`, :class:`Sizes`, :class:`Constants`, :class:`Factor`, :class:`Gradients`.
"""

from __future__ import annotations

import functools
import threading
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numba

from smnn.solver import lane_ops

__all__ = [
    "LANES",
    "NARROW_LANES",
    "OPS",
    "PIVOT_OPS",
    "Constants",
    "Factor",
    "Gradients",
    "Inputs",
    "Sizes",
    "kernels",
    "slp_vectorization",
]

LANES = 32  # the width for many systems (or columns)
NARROW_LANES = 8  # the width for few

SOURCE = Path(__file__).with_name("lane_kernels_source.py")

# The pivot step of the Cholesky: dst = 1 / sqrt(s) per lane, NaN where the pivot s is not above
# its floor (``_rsqrt_pivot`` in the source).
PIVOT_OPS = {
    "_reciprocal_sqrt_pivot": lane_ops.LaneOp(
        "dst, s, floor",
        "dst[{i}] = _rsqrt_pivot(s[{i}], floor[{i}])",
        "dst = 1 / sqrt(s), NaN for a failed pivot (s <= floor, or not finite).",
    ),
}
OPS = {**lane_ops.LANE_OPS, **PIVOT_OPS}  # every lane helper of the kernels

# ---- what the kernels take (shapes in the source's docstring, "Layouts")
Inputs = namedtuple("Inputs", "coef steps rhs_eq init")
Inputs.__doc__ = "coef (N, Tc, E, m), steps (N, Th), rhs_eq (N, Tb, E, P), init (N, Su, D*K, P)."
Sizes = namedtuple("Sizes", "n_steps n_dims n_init_steps n_init_orders")
Sizes.__doc__ = "T, D, S, K (ints)."
Constants = namedtuple("Constants", "g0 g1 g2 weights pivot_floor")
Constants.__doc__ = (
    "Taylor Gram matrices g0, g1, g2 (R, R), weights (3,) = squared weights, pivot_floor (a "
    "float): a pivot at or below pivot_floor * (its diagonal entry of M_t) is a failure."
)
Factor = namedtuple("Factor", "chol rdiag l1 l2")
Factor.__doc__ = (
    "chol (G, T, m(m-1)/2, W), rdiag (G, T, m, W); with central rows l1 (G, T, m, m, W) and "
    "l2 (G, T, D, m, W), else empty placeholders."
)
Gradients = namedtuple("Gradients", "coef steps rhs_eq init")
Gradients.__doc__ = "The gradients of :class:`Inputs` (coef and steps per job, see backward)."
# one worker's scratch arrays (made inside the kernels)
SolveScratch = namedtuple("SolveScratch", "wsol y_prev pw_prev pw tmp cl bv u0 hs")
ForwardScratch = namedtuple(
    "ForwardScratch", "cl work y_prev pw_prev pw tmp pw_cur acc bv u0 wsol y_cpl hs floor"
)
CentralScratch = namedtuple(
    "CentralScratch", "cl work cpl vec pw_cur pw_prev ca cb acc bv u0 wsol floor"
)
BackwardScratch = namedtuple(
    "BackwardScratch", "lam xs cl bv gc gs gb gi y_prev pw_prev pw tmp dpw vectors hs"
)

# Serialises kernel calls from several Python threads: the setting below is process-wide, and
# numba's default (workqueue) threading layer cannot run two parallel kernels at once anyway.
_KERNEL_LOCK = threading.Lock()


@contextmanager
def slp_vectorization():
    """Run (and, on first use, compile) lane kernels with LLVM's SLP vectoriser on.

    Numba's default is off. It reads ``numba.config.SLP_VECTORIZE`` when it builds a function's
    optimisation passes, i.e. at compilation (the first call of a signature, or a cache miss);
    calls of already compiled kernels are unaffected. The previous value is restored on exit, and
    the block holds a lock so that another thread cannot restore it while a kernel compiles.
    """
    with _KERNEL_LOCK:
        previous = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            numba.config.SLP_VECTORIZE = previous


@functools.cache
def kernels(width: int = LANES) -> ModuleType:
    """The LDL^T lane kernels at ``width`` lanes (generated once per source version into the
    cache directory of :mod:`smnn.solver.lane_ops`, then imported; the same module object for
    every call with this width in a process)."""
    module = lane_ops.kernel_module("smnn_lane_kernels", SOURCE, width, OPS)
    if module.LANES != width:
        raise RuntimeError(f"lane kernels {module.__file__} have {module.LANES} lanes, not {width}")
    return module
