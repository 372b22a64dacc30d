"""numba is an optional speed-up: without it every solver call runs on the torch path.

The checks run in a subprocess whose import system refuses ``numba`` (a ``sys.meta_path``
finder installed before anything else is imported), against the dense reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

BLOCK_NUMBA = """
import sys


class _RefuseNumba:
    def find_spec(self, name, path=None, target=None):
        if name == "numba" or name.startswith("numba."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, _RefuseNumba())
"""

CHECKS = """
import pytest
import torch
from conftest import random_problem, rel_err

import smnn
from smnn import factorize, ode_forward
from smnn.solver.banded import numba_available, resolve_backend
from smnn.solver.reference import dense_reference

assert not numba_available()
assert resolve_backend("auto", torch.device("cpu")) == "torch"
with pytest.raises(ValueError, match="numba"):
    resolve_backend("numba", torch.device("cpu"))
with pytest.raises(ImportError):
    import smnn.solver.fused  # noqa: F401  (the lane engine needs numba)

cases = [
    (dict(batch=(3,), T=7, E=2, D=2, S=2, K=2), {}),
    (dict(batch=(3,), T=9), dict(enable_central_smoothness=True, weight_smooth=0.8)),
    (dict(batch=(5,), T=8, c_batch=(), h_batch=(), c_time=1, h_time=1), {}),
    (dict(batch=(2,), T=6), dict(method="sequential")),
    (dict(batch=(2,), T=6), dict(method="cyclic")),
]
for pk, kw in cases:
    inputs = [x.requires_grad_() for x in random_problem(**pk)]
    kw = dict(kw, n_steps=pk["T"])
    u = ode_forward(*inputs, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "method"}
    ref = dense_reference(*inputs, **ref_kw)
    assert rel_err(u, ref) < 1e-10, (pk, kw)
    grads = torch.autograd.grad(u.square().sum(), inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-10, (pk, kw)
    with pytest.raises(ValueError, match="numba"):
        ode_forward(*inputs, **kw, backend="numba")

# no initial values (S = 0, K = 0)
c, b, _, h = random_problem(batch=(2,), T=8)
c = c + 1.0
u0 = torch.zeros(2, 0, 1, 0, dtype=torch.float64)
assert rel_err(ode_forward(c, b, u0, h), dense_reference(c, b, u0, h)) < 1e-10

# factorize once, solve many; the frozen-left-hand-side cache on top of it
c, b, u0, h = random_problem(batch=(6,), T=9, c_batch=(), h_batch=())
fac = factorize(c, h, n_init_orders=1)
ref = dense_reference(c, b, u0, h)
assert rel_err(fac.solve(b, u0), ref) < 1e-10
assert rel_err(ode_forward(c, b, u0, h, frozen_lhs_cache_version=5), ref) < 1e-10
smnn.clear_frozen_lhs_cache()

assert "numba" not in sys.modules
print("no-numba checks passed")
"""


def test_everything_runs_on_the_torch_path_without_numba():
    script = BLOCK_NUMBA + "\nimport sys\n" + textwrap.dedent(CHECKS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no-numba checks passed" in result.stdout
