"""CPU results do not depend on how the lane kernels were compiled (docs/solver.md, "Solving M u = r
in O(T)").

The same forward+backward runs twice in fresh processes: first with an empty numba cache
(every kernel compiled in that process), then with the cache the first run wrote (every kernel
loaded). Values and gradients must agree byte for byte. Before the kernels gave up fast-math
licences they did not: a cold process computed with separately compiled helper functions, a warm
one with the copies optimized into each cached kernel, and LLVM fused and reordered the
floating-point operations differently in the two (last-bit differences, e.g. a training loss
of 1410.633525539891 cold and 1410.6335255398908 warm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import hashlib, json, os, sys
import torch

torch.set_num_threads(int(os.environ["SMNN_TEST_THREADS"]))
from conftest import random_problem

from smnn import factorize, ode_forward
from smnn.solver import lane_kernels

digests = {}
raw = bytearray()


def record(name, tensors):
    data = b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)
    digests[name] = hashlib.sha256(data).hexdigest()
    raw.extend(data)


cases = {
    # one group of lanes
    "small": (dict(batch=(3,), T=6), {}),
    # 5 groups of lanes (the last padded), P = 2 right-hand sides per system
    "groups_P2": (
        dict(batch=(37, 2), T=9, E=2, D=2, S=2, K=2, c_batch=(37, 1), h_batch=(37, 1)),
        {},
    ),
    # one shared system: lanes are columns (3 groups of columns, the last padded)
    "columns": (dict(batch=(20,), T=7, c_batch=(), h_batch=()), {}),
    # central rows, several groups, P = 3
    "central": (
        dict(batch=(19, 3), T=8, D=2, E=2, K=2, c_batch=(19, 1), h_batch=(19, 1)),
        dict(enable_central_smoothness=True),
    ),
    # the cases above have fewer than 64 systems (8-lane kernels); these run at 32 lanes
    "wide": (dict(batch=(70,), T=6), {}),
    "wide_central": (dict(batch=(66,), T=6, D=2, E=2, K=2), dict(enable_central_smoothness=True)),
}
for name, (pk, kw) in cases.items():
    inputs = [x.requires_grad_() for x in random_problem(**pk, seed=3)]
    u = ode_forward(*inputs, n_steps=pk["T"], n_init_var_steps=pk.get("S", 1), **kw)
    grads = torch.autograd.grad((u * u.detach().sin()).sum(), inputs)
    record(name, (u, *grads))

# the training pattern: factorize once, solve many right-hand sides, gradients to them
c, b, u0, h = random_problem(batch=(40,), T=12, c_batch=(), h_batch=(), seed=4)
fac = factorize(c, h, n_init_orders=1)
b, u0 = b.requires_grad_(), u0.requires_grad_()
u = fac.solve(b, u0)
record("factorize", (u, *torch.autograd.grad(u.square().sum(), [b, u0])))

stats = {
    f"{name} ({module.LANES} lanes)": [
        sum(getattr(getattr(module, name).stats, kind).values())
        for kind in ("cache_hits", "cache_misses")
    ]
    for module in (lane_kernels.kernels(32), lane_kernels.kernels(8))
    for name in ("forward", "backward", "forward_central", "solve")
}
with open(sys.argv[1], "wb") as f:
    f.write(bytes(raw))
print(json.dumps({"digests": digests, "stats": stats}))
"""


def _run(cache_dir: Path, out: Path) -> dict:
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    env["SMNN_TEST_THREADS"] = str(min(2, os.cpu_count() or 1))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        cwd=TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cold_and_warm_numba_cache_give_identical_bytes(tmp_path):
    cache = tmp_path / "numba_cache"
    cache.mkdir()
    cold = _run(cache, tmp_path / "cold.bin")
    warm = _run(cache, tmp_path / "warm.bin")
    # the first run compiled every kernel, the second loaded every kernel from the cache
    for name, (hits, misses) in cold["stats"].items():
        assert misses >= 1 and hits == 0, (name, cold["stats"])
    for name, (hits, misses) in warm["stats"].items():
        assert hits >= 1 and misses == 0, (name, warm["stats"])
    differing = [k for k in cold["digests"] if cold["digests"][k] != warm["digests"][k]]
    assert not differing, f"cold and warm numba cache differ in {differing}"
    assert (tmp_path / "cold.bin").read_bytes() == (tmp_path / "warm.bin").read_bytes()
