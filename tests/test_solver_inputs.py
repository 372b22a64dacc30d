"""Bad input is refused with a ValueError naming the argument (docs/solver.md, "Dense reference and
accuracy bars")."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_problem

from smnn import NonPositivePivotError, factorize, ode_forward


def _good():
    return list(random_problem(batch=(2,), T=6, E=1, D=1, R=3, S=1, K=1))


def _with(index, value):
    args = _good()
    args[index] = value
    return args


F64 = torch.float64

BAD_INPUTS = [
    ("coefficients rank", _with(0, torch.ones(6, 1, 3, dtype=F64)), {}, "coefficients"),
    ("rhs rank", _with(1, torch.ones(6, dtype=F64)), {}, "rhs_equation"),
    ("init rank", _with(2, torch.ones(1, 1, dtype=F64)), {}, "init_vars"),
    ("steps rank", _with(3, torch.tensor(0.1, dtype=F64)), {}, "steps"),
    ("rhs E", _with(1, torch.ones(2, 6, 2, dtype=F64)), {}, "rhs_equation"),
    ("init D", _with(2, torch.ones(2, 1, 2, 1, dtype=F64)), {}, "init_vars"),
    ("K > R", _with(2, torch.ones(2, 1, 1, 4, dtype=F64)), {}, "K=4"),
    ("coef T", _with(0, torch.ones(2, 5, 1, 1, 3, dtype=F64)), {}, "coefficients"),
    ("rhs T", _with(1, torch.ones(2, 4, 1, dtype=F64)), {}, "rhs_equation"),
    ("steps vs n_steps", _good(), {"n_steps": 9}, "steps"),
    ("T < 2", _good()[:3] + [torch.ones(2, 1, dtype=F64)], {"n_steps": 1}, "T=1"),
    ("S > T", _with(2, torch.ones(2, 7, 1, 1, dtype=F64)), {}, "S=7"),
    (
        "n_init_var_steps",
        _with(2, torch.ones(2, 2, 1, 1, dtype=F64)),
        {"n_init_var_steps": 3},
        "init_vars",
    ),
    ("batch", _with(1, torch.ones(3, 6, 1, dtype=F64)), {}, "do not broadcast"),
    ("zero step", _with(3, torch.full((2, 5), 0.0, dtype=F64)), {}, "steps"),
    ("negative step", _with(3, torch.full((2, 5), -0.1, dtype=F64)), {}, "steps"),
    ("nan step", _with(3, torch.full((2, 5), math.nan, dtype=F64)), {}, "steps"),
    (
        "inf coefficient",
        _with(0, torch.full((2, 6, 1, 1, 3), math.inf, dtype=F64)),
        {},
        "coefficients",
    ),
    ("nan rhs", _with(1, torch.full((2, 6, 1), math.nan, dtype=F64)), {}, "rhs_equation"),
    ("nan init", _with(2, torch.full((2, 1, 1, 1), math.nan, dtype=F64)), {}, "init_vars"),
    ("int dtype", _with(3, torch.ones(2, 5, dtype=torch.int64)), {}, "steps"),
    ("mixed dtype", _with(1, torch.ones(2, 6, 1, dtype=torch.float32)), {}, "dtype"),
    ("not a tensor", _with(0, [[1.0]]), {}, "coefficients"),
    ("weight", _good(), {"weight_smooth": 0.0}, "weight_smooth"),
    ("weight nan", _good(), {"weight_equation": math.nan}, "weight_equation"),
    ("weight tensor", _good(), {"weight_init_var": torch.ones(2)}, "weight_init_var"),
    ("method", _good(), {"method": "magic"}, "method"),
    ("backend", _good(), {"backend": "fortran"}, "backend"),
]


@pytest.mark.parametrize("name,args,kwargs,needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_it(name, args, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ode_forward(*args, **kwargs)


def test_central_needs_two_orders():
    c, b, u0, h = random_problem(batch=(2,), T=5, R=1)
    with pytest.raises(ValueError, match="enable_central_smoothness"):
        ode_forward(c, b, u0, h, enable_central_smoothness=True)


def test_float16_refused():
    args = [x.half() for x in _good()]
    with pytest.raises(ValueError, match="float32 or float64"):
        ode_forward(*args)


def test_value_checks_can_be_skipped():
    args = _with(3, torch.full((2, 5), 0.1, dtype=F64))
    args[1] = args[1].clone()
    args[1][0, 0, 0] = math.nan
    u = ode_forward(*args, check_inputs=False)
    assert torch.isnan(u[0]).any() and torch.isfinite(u[1]).all()


def _singular_problem():
    """Batch entry 1 has steps so small that h^2 underflows: the top order is unconstrained."""
    c = torch.zeros(3, 1, 1, 1, 3, dtype=F64)
    c[..., 1] = 1.0  # u' = b: order 2 enters no equation row
    b = torch.ones(3, 6, 1, dtype=F64)
    u0 = torch.zeros(3, 1, 1, 1, dtype=F64)
    h = torch.full((3, 5), 0.1, dtype=F64)
    h[1] = 1e-170
    return c, b, u0, h


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_non_positive_pivot_names_failed_entries(backend):
    c, b, u0, h = _singular_problem()
    with pytest.raises(NonPositivePivotError, match=r"batch index \(1,\)") as info:
        ode_forward(c, b, u0, h, backend=backend)
    assert "1 of 3" in str(info.value)
    assert isinstance(info.value, ValueError)
    u = ode_forward(c, b, u0, h, backend=backend, check_pivots=False)
    assert torch.isnan(u[1]).all()
    assert torch.isfinite(u[0]).all() and torch.isfinite(u[2]).all()


def test_factorize_validates_arguments():
    c, b, u0, h = _good()
    with pytest.raises(ValueError, match="n_init_orders"):
        factorize(c, h, n_init_orders=-1)
    with pytest.raises(ValueError, match="K=4"):
        factorize(c, h, n_init_orders=4)
    with pytest.raises(ValueError, match="steps"):
        factorize(c, -h, n_init_orders=1)
    with pytest.raises(NonPositivePivotError):
        sc, _, _, sh = _singular_problem()
        factorize(sc, sh, n_init_orders=1)
