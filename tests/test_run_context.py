"""The run context reaches the solver: ``threads`` is an argument of ``ode_forward`` and
``factorize`` (the lane engines' thread count), not read back from torch.

``threads=k`` must give the bits of the default call under ``torch.set_num_threads(k)`` (the
thread count decides the lane layout, :func:`smnn.solver.fused.lanes_are_columns`, and so the
order of the gradient sums), and must leave torch's own count as it was.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_problem

from smnn import factorize, ode_forward
from smnn.solver import fused

pytest.importorskip("numba")

LABELS = ("u", "coefficients", "rhs_equation", "init_vars", "steps")

# (name, random_problem kwargs, ode_forward kwargs)
CASES = [
    ("ldlt_systems", dict(batch=(70,), T=9, E=2, D=2, K=2, seed=1), {}),
    ("ldlt_central", dict(batch=(9,), T=9, seed=2), {"enable_central_smoothness": True}),
    # two systems with two right-hand sides each: lanes of systems on one thread, lanes of
    # columns on two (the layout follows the thread count)
    (
        "ldlt_layout_by_threads",
        dict(batch=(2, 2), T=8, c_batch=(2, 1), h_batch=(2, 1), seed=3),
        {},
    ),
    ("qr_lanes", dict(batch=(9, 3), T=8, c_batch=(9, 1), h_batch=(9, 1), seed=4), {"method": "qr"}),
    ("qr_float32", dict(batch=(11,), T=8, dtype=torch.float32, seed=5), {}),
]


def test_the_layout_case_depends_on_the_thread_count():
    """The case ``ldlt_layout_by_threads`` really takes two layouts (else it tests nothing)."""
    assert not fused.lanes_are_columns(2, 2, 32, threads=1)
    assert fused.lanes_are_columns(2, 2, 32, threads=2)


def _solve(inputs, **kw):
    """u and the gradients of a fixed weighted sum of u w.r.t. the four inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    u = ode_forward(*leaves, **kw)
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
    (u * weight).sum().backward()
    return [u.detach(), *(x.grad for x in leaves)]


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("name", "pk", "kw"), CASES, ids=[c[0] for c in CASES])
def test_threads_argument_gives_the_bits_of_torchs_count(torch_threads, threads, name, pk, kw):
    inputs = random_problem(**pk)
    torch.set_num_threads(threads)
    expected = _solve(inputs, **kw)
    other = 3 - threads
    torch.set_num_threads(other)
    got = _solve(inputs, threads=threads, **kw)
    assert torch.get_num_threads() == other  # the argument left torch's count alone
    for label, a, b in zip(LABELS, got, expected, strict=True):
        assert torch.equal(a, b), (name, label)


@pytest.mark.parametrize("method", ["sequential", "qr"])
def test_factorize_threads_reach_every_solve(torch_threads, method):
    c, b, u0, h = random_problem(batch=(2, 2), T=8, c_batch=(2, 1), h_batch=(2, 1), seed=6)
    torch.set_num_threads(2)
    expected = ode_forward(c, b, u0, h, method=method)
    torch.set_num_threads(1)
    fac = factorize(c, h, n_init_orders=u0.shape[-1], threads=2, method=method)
    b_leaf = b.clone().requires_grad_()
    u = fac.solve(b_leaf, u0)
    u.sum().backward()
    assert torch.get_num_threads() == 1
    assert fac.factor.threads == 2 if method == "sequential" else fac.factor.sizes.threads == 2
    assert torch.equal(u.detach(), expected)
    assert torch.isfinite(b_leaf.grad).all()


def test_frozen_cache_keys_on_threads(torch_threads):
    """A frozen left-hand side factorized for one thread count is not reused for another."""
    from smnn.solver.frozen import clear_frozen_lhs_cache

    c, b, u0, h = random_problem(batch=(2, 2), T=8, c_batch=(2, 1), h_batch=(2, 1), seed=7)
    clear_frozen_lhs_cache()
    try:
        torch.set_num_threads(1)
        one = ode_forward(c, b, u0, h, frozen_lhs_cache_version=5, threads=1)
        two = ode_forward(c, b, u0, h, frozen_lhs_cache_version=5, threads=2)
        torch.set_num_threads(2)
        reference = ode_forward(c, b, u0, h)
    finally:
        clear_frozen_lhs_cache()
    assert torch.equal(two, reference)
    assert torch.allclose(one, two, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
@pytest.mark.parametrize("entry", ["ode_forward", "factorize"])
def test_bad_threads_are_refused_by_name(bad, entry):
    c, b, u0, h = random_problem(batch=(2,), T=6)
    with pytest.raises(ValueError, match="threads must be None or an int >= 1"):
        if entry == "ode_forward":
            ode_forward(c, b, u0, h, threads=bad)
        else:
            factorize(c, h, n_init_orders=1, threads=bad)


# ------------------------------------------------------------------ the MNN layer and the tasks


def test_mnn_layer_passes_threads_to_ode_forward_and_factorize(torch_threads):
    from smnn.experiments.mnn_layer import MnnLayer

    c, b, u0, h = random_problem(batch=(2, 2), T=8, c_batch=(2, 1), h_batch=(2, 1), seed=8)
    torch.set_num_threads(2)
    expected = _solve((c, b, u0, h))
    torch.set_num_threads(1)
    layer = MnnLayer("smnn", threads=2)
    leaves = [x.detach().clone().requires_grad_() for x in (c, b, u0, h)]
    u = layer(leaves[1], leaves[2], leaves[0], leaves[3])
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
    (u * weight).sum().backward()
    for label, a, e in zip(LABELS, [u.detach(), *(x.grad for x in leaves)], expected, strict=True):
        assert torch.equal(a, e), label
    frozen = MnnLayer("smnn", threads=2).freeze_lhs(c[:, :1], h[:, :1], n_steps=8, n_init_orders=1)
    assert frozen._frozen.factorization.factor.threads == 2
    assert torch.get_num_threads() == 1
    # the solvers without a thread count ignore it
    assert MnnLayer("mnn_dense", threads=2).options == {}


def test_lorenz_window_ode_takes_the_thread_count():
    from smnn.experiments.lorenz.models import WindowOde

    ode = WindowOde("smnn", 6, 0.01, torch.float64, torch.device("cpu"), threads=2)
    assert ode.layer.threads == 2
    assert ode.layer._frozen.factorization.factor.threads == 2


# ------------------------------------------------------------------ the one device resolver


def test_device_resolver_accepts_the_names_and_names_the_key():
    from smnn.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "meta", "cpu:1", "", "cuda:x"):
        with pytest.raises(ValueError, match=r"^--device must be one of auto, cpu, cuda, cuda:N"):
            resolve_device(bad, what="--device")
    beyond = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 without any)
    with pytest.raises(ValueError, match=rf"^device: {beyond} was requested"):
        resolve_device(beyond)
    if torch.cuda.is_available():
        assert resolve_device("cuda:0", what="--device") == torch.device("cuda:0")
    else:
        with pytest.raises(ValueError, match="^sst.device: cuda was requested but no CUDA"):
            resolve_device("cuda", what="sst.device")


# ------------------------------------------------------------------ the one timing core


def test_timing_core_times_a_call_with_the_thread_count_set(torch_threads):
    import time

    from smnn.timing import summary_ms, timed_call

    torch.set_num_threads(2)
    seconds, result = timed_call(
        lambda x: (time.sleep(0.02), torch.get_num_threads() * x)[1],
        torch.device("cpu"),
        5,
        threads=1,
    )
    assert result == 5 and 0.02 <= seconds < 1.0
    assert torch.get_num_threads() == 1  # set before the call (outside the timed region)
    assert summary_ms([0.003, 0.001, 0.002]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="at least one"):
        summary_ms([])
