"""Validation and shape bookkeeping for the solver inputs (docs/solver.md, "Inputs, shapes,
broadcasting" and "Dense reference and accuracy bars").

Every solver in :mod:`smnn.solver` (S-MNN, the dense reference, the MNN baselines) accepts the
same four tensors and goes through :func:`prepare_problem`, so that shapes, broadcasting and error
messages are identical everywhere.

Shapes (``...`` are batch dims that broadcast like torch broadcasting):

- ``coefficients`` c: ``(..., T or 1, E, D, R)``
- ``rhs_equation`` b: ``(..., T or 1, E)``
- ``init_vars`` u0: ``(..., S or 1, D, K)``
- ``steps`` h: ``(..., T-1 or 1)``

S = 0 or K = 0 (``init_vars`` of shape ``(..., 0, D, 0)``, say) is valid: the problem then has no
initial-value rows and is determined by the equation and smoothness rows alone (docs/solver.md
"Inputs, shapes, broadcasting"); a singular one is reported by the solvers' pivot checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "OdeProblem",
    "prepare_problem",
    "check_weight",
    "check_finite",
    "check_values_of",
    "broadcast_batch",
]


@dataclass(frozen=True)
class OdeProblem:
    """Validated inputs plus the sizes read off them.

    Tensors are kept exactly as given (not expanded): a size-1 step axis or a missing batch dim
    stays size 1, so shared coefficients are never materialised per batch entry.

    Attributes:
        coefficients: ``(*batch_c, T or 1, E, D, R)``.
        rhs_equation: ``(*batch_b, T or 1, E)``.
        init_vars: ``(*batch_u, S or 1, D, K)``.
        steps: ``(*batch_h, T-1 or 1)``.
        n_steps: T.  n_init_var_steps: S.  n_equations: E.  n_dims: D.  n_orders: R.
        n_init_orders: K.
        batch_shape: broadcast of all four batch shapes (the batch shape of the output).
        lhs_batch_shape: broadcast of the coefficient and step batch shapes (the batch shape of the
            normal matrix, which does not depend on b or u0).
    """

    coefficients: torch.Tensor
    rhs_equation: torch.Tensor
    init_vars: torch.Tensor
    steps: torch.Tensor
    n_steps: int
    n_init_var_steps: int
    n_equations: int
    n_dims: int
    n_orders: int
    n_init_orders: int
    batch_shape: torch.Size
    lhs_batch_shape: torch.Size

    @property
    def block_size(self) -> int:
        """m = D * R, the size of one diagonal block of the normal matrix."""
        return self.n_dims * self.n_orders


def broadcast_batch(named_shapes: dict[str, tuple[int, ...]]) -> torch.Size:
    """Broadcast batch shapes, raising a ValueError that names the arguments that clash."""
    try:
        return torch.broadcast_shapes(*named_shapes.values())
    except RuntimeError:
        desc = ", ".join(f"{name} batch shape {tuple(s)}" for name, s in named_shapes.items())
        raise ValueError(f"batch dimensions do not broadcast: {desc}") from None


def check_weight(name: str, value) -> None:
    """A weight is a finite positive scalar (python number or 0-dim tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        ok = bool(torch.isfinite(value.detach())) and float(value.detach()) > 0
    else:
        try:
            fv = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a positive number, got {value!r}") from None
        ok = fv > 0 and fv == fv and fv not in (float("inf"),)
    if not ok:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _require_tensor(name: str, x, min_rank: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() < min_rank:
        raise ValueError(
            f"{name} must have at least {min_rank} dims {layout}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    return x


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` if ``x`` holds NaN or inf."""
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        n_bad = int(bad.sum())
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")


def check_values_of(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
) -> None:
    """Raise a ValueError naming the input that holds NaN/inf, or steps that are not > 0."""
    check_finite("coefficients", coefficients)
    check_finite("rhs_equation", rhs_equation)
    check_finite("init_vars", init_vars)
    hd = steps.detach()
    if not bool(torch.isfinite(hd).all()):
        raise ValueError("steps contains non-finite value(s) (NaN or inf)")
    if not bool((hd > 0).all()):
        raise ValueError(
            f"steps must be > 0 everywhere; found {int((hd <= 0).sum())} step(s) <= 0 "
            f"(min {float(hd.min()):.3g})"
        )


def prepare_problem(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    check_values: bool = True,
) -> OdeProblem:
    """Validate the four solver inputs and read off T, S, E, D, R, K and the batch shapes.

    Args:
        coefficients: ``(..., T or 1, E, D, R)``.
        rhs_equation: ``(..., T or 1, E)``.
        init_vars: ``(..., S or 1, D, K)``.
        steps: ``(..., T-1 or 1)``, every entry finite and > 0.
        n_steps: T; inferred as ``steps.shape[-1] + 1`` when None.
        n_init_var_steps: S; inferred as ``init_vars.shape[-3]`` when None.
        check_values: also check values (finite coefficients/rhs/init values, positive finite
            steps). This reads data back from the device; turn it off for speed on trusted input.

    Raises:
        ValueError: naming the argument and the problem.
    """
    c = _require_tensor("coefficients", coefficients, 4, "(..., T or 1, E, D, R)")
    b = _require_tensor("rhs_equation", rhs_equation, 2, "(..., T or 1, E)")
    u0 = _require_tensor("init_vars", init_vars, 3, "(..., S or 1, D, K)")
    h = _require_tensor("steps", steps, 1, "(..., T-1 or 1)")

    dtypes = {t.dtype for t in (c, b, u0, h)}
    if len(dtypes) != 1:
        raise ValueError(
            "coefficients, rhs_equation, init_vars and steps must share one dtype, got "
            f"{c.dtype}, {b.dtype}, {u0.dtype}, {h.dtype}"
        )
    devices = {t.device for t in (c, b, u0, h)}
    if len(devices) != 1:
        raise ValueError(
            "coefficients, rhs_equation, init_vars and steps must be on one device, got "
            + ", ".join(str(t.device) for t in (c, b, u0, h))
        )

    E, D, R = c.shape[-3], c.shape[-2], c.shape[-1]
    K = u0.shape[-1]
    if E < 1 or D < 1 or R < 1:
        raise ValueError(f"coefficients must have E, D, R >= 1, got shape {tuple(c.shape)}")
    if b.shape[-1] != E:
        raise ValueError(
            f"rhs_equation has {b.shape[-1]} equations (last dim) but coefficients has E={E} "
            f"(coefficients shape {tuple(c.shape)}, rhs_equation shape {tuple(b.shape)})"
        )
    if u0.shape[-2] != D:
        raise ValueError(
            f"init_vars has {u0.shape[-2]} states (dim -2) but coefficients has D={D} "
            f"(init_vars shape {tuple(u0.shape)})"
        )
    if K > R:
        raise ValueError(
            f"init_vars fixes K={K} derivative orders but there are only R={R} (n_orders); "
            "need K <= R"
        )

    # T: from steps unless given
    if n_steps is None:
        T = h.shape[-1] + 1
    else:
        T = int(n_steps)
        if h.shape[-1] not in (1, T - 1):
            raise ValueError(
                f"steps has {h.shape[-1]} steps (last dim) but n_steps={T} needs T-1={T - 1} or 1"
            )
    if T < 2:
        raise ValueError(f"need at least T=2 time steps, got T={T} (from steps/n_steps)")
    if n_steps is None and h.shape[-1] == 1:
        # one step size for all steps: T is not in steps; say where T=2 came from
        where = "T=2 (inferred from steps' size-1 step axis; pass n_steps=T)"
    elif n_steps is None:
        where = f"T={T} (steps has {h.shape[-1]} = T-1 steps)"
    else:
        where = f"n_steps={T}"
    if c.shape[-4] not in (1, T):
        raise ValueError(
            f"coefficients has {c.shape[-4]} time steps (dim -4) but {where}; need T or 1"
        )
    if b.shape[-2] not in (1, T):
        raise ValueError(
            f"rhs_equation has {b.shape[-2]} time steps (dim -2) but {where}; need T or 1"
        )

    if n_init_var_steps is None:
        S = u0.shape[-3]
    else:
        S = int(n_init_var_steps)
        if u0.shape[-3] not in (1, S):
            raise ValueError(
                f"init_vars has {u0.shape[-3]} steps (dim -3) but n_init_var_steps={S}; need S or 1"
            )
    if S < 0:
        raise ValueError(f"n_init_var_steps must be >= 0, got S={S}")
    if S > T:
        raise ValueError(f"init_vars covers S={S} steps but there are only T={T} (need S <= T)")

    batch_shape = broadcast_batch(
        {
            "coefficients": c.shape[:-4],
            "rhs_equation": b.shape[:-2],
            "init_vars": u0.shape[:-3],
            "steps": h.shape[:-1],
        }
    )
    lhs_batch_shape = torch.broadcast_shapes(c.shape[:-4], h.shape[:-1])

    if check_values:
        check_values_of(c, b, u0, h)

    return OdeProblem(
        coefficients=c,
        rhs_equation=b,
        init_vars=u0,
        steps=h,
        n_steps=T,
        n_init_var_steps=S,
        n_equations=E,
        n_dims=D,
        n_orders=R,
        n_init_orders=K,
        batch_shape=batch_shape,
        lhs_batch_shape=lhs_batch_shape,
    )
