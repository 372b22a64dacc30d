"""The benchmark's accuracy: every solution of a case against a float64 reference solve.

Reference: the same problem (:func:`smnn.benchmark.catalog.make_inputs` draws it in float64, so
the float32 inputs of a case are that problem rounded) solved in float64 by the orthogonal
factorization of the rows (``ode_forward(..., method="qr")``, docs/solver.md, "The orthogonal (QR)
solve"), whose error grows with cond(A) rather than cond(A)^2. Where the installed solver has no
``qr`` (:func:`smnn.benchmark.catalog.qr_available`), the float64 sequential block LDL^T solve
stands in (:func:`reference_method` says which; bench.md and the MLflow params record it).

Error of a solution ``u`` (B, T, D, R) against the reference ``u_ref``: per system b, the max
relative error of u over every step, state and order,

    e_b = max_{t,d,r} |u[b,t,d,r] - u_ref[b,t,d,r]| / max_{t,d,r} |u_ref[b,t,d,r]|,

and the row reports the median of e_b over the batch (``error_median``) and its maximum
(``error_max``). Only methods that compute the same function are compared (families ``smnn``
and ``peer``); the original MNN solvers solve another system (docs/solver.md, "Baselines from the
original MNN").
"""

from __future__ import annotations

import math

import torch

from smnn.benchmark.catalog import Shape, make_inputs, qr_available

__all__ = ["reference_method", "reference_solution", "relative_errors"]


def reference_method() -> str:
    """``"qr"`` where the installed solver has it, else ``"sequential"``."""
    return "qr" if qr_available() else "sequential"


def reference_solution(shape: Shape, seed: int = 0) -> torch.Tensor:
    """u (B, T, D, R), float64 on the CPU: the reference solve of the case's problem."""
    from smnn.solver import ode_forward

    inputs = [x.detach() for x in make_inputs(shape, torch.float64, torch.device("cpu"), seed)]
    with torch.no_grad():
        return ode_forward(*inputs, method=reference_method())


def relative_errors(u: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(median, max) over the batch of the per-system max relative error (module docstring).

    ``u`` and ``reference``: (B, T, D, R), any float dtype and device; NaN when ``u`` holds a
    non-finite value in some system (that system's error is NaN and so is the median's)."""
    if tuple(u.shape) != tuple(reference.shape):
        raise ValueError(f"u has shape {tuple(u.shape)}, the reference {tuple(reference.shape)}")
    ref = reference.detach().to(torch.float64).cpu().flatten(1)
    diff = (u.detach().to(torch.float64).cpu().flatten(1) - ref).abs()
    scale = ref.abs().amax(1).clamp_min(torch.finfo(torch.float64).tiny)
    per_system = diff.amax(1) / scale
    per_system[~torch.isfinite(diff).all(1)] = math.nan
    if bool(per_system.isnan().any()):
        return math.nan, math.nan
    return float(per_system.quantile(0.5)), float(per_system.max())
