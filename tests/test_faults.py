"""Small faults of issue 18's table, each reproduced: the T message of a size-1 step axis, and
argparse errors that name what is expected instead of a Python function."""

from __future__ import annotations

import pytest
import torch
from pipeline_support import run_smnn

from smnn.solver.inputs import prepare_problem


def test_size_one_step_axis_without_n_steps_says_where_t_came_from():
    T = 100
    c = torch.randn(1, T, 1, 1, 3, dtype=torch.float64)
    b = torch.randn(1, T, 1, dtype=torch.float64)
    u0 = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    h = torch.full((1, 1), 0.01, dtype=torch.float64)  # one step size for all steps
    with pytest.raises(ValueError) as info:
        prepare_problem(c, b, u0, h)
    message = str(info.value)
    assert "coefficients has 100 time steps" in message
    assert "inferred from steps' size-1 step axis" in message and "pass n_steps=T" in message
    assert "but T=2;" not in message  # the old message named a T the user never gave
    problem = prepare_problem(c, b, u0, h, n_steps=T)  # the remedy works
    assert problem.n_steps == T


def test_argparse_errors_name_what_is_expected_not_a_function():
    proc = run_smnn("tracking-server", "--config", "x.yaml", "--port", "abc")
    assert proc.returncode == 2
    assert "expected a port number (0-65535), got 'abc'" in proc.stderr
    assert "_port" not in proc.stderr
