"""``ode_forward`` as a drop-in replacement for the authors' published function.

The call patterns are those of the authors' examples (Lorenz, sine/curve fitting, KdV), with
tensors of the shapes they use, checked against ``dense_reference`` (values and gradients in
float64); plus the positional order of the signature, the frozen-left-hand-side cache (bound,
clearing, key isolation), and S = 0 / K = 0 on every engine.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from conftest import random_problem, rel_err

import smnn
from smnn import NonPositivePivotError, factorize, ode_forward
from smnn.solver import FROZEN_LHS_CACHE, FrozenLhsCache, clear_frozen_lhs_cache
from smnn.solver.reference import dense_reference

F64 = torch.float64

# every engine: (backend, method)
ENGINES = [("numba", "sequential"), ("torch", "sequential"), ("torch", "cyclic")]
ENGINE_IDS = [f"{b}-{m}" for b, m in ENGINES]


@pytest.fixture(autouse=True)
def _empty_cache():
    clear_frozen_lhs_cache()
    yield
    clear_frozen_lhs_cache()


def _steps_last(c, b, u0, h):
    """Step-first inputs (the authors' ``is_step_dim_first=True`` layout) -> step-last."""
    return c.movedim(0, -4), b.movedim(0, -2), u0.movedim(0, -3), h.movedim(0, -1)


def _grads(u, inputs, weight):
    """Gradients of sum(u * weight) w.r.t. the inputs that require them (zeros where unused)."""
    wanted = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad((u * weight).sum(), wanted, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads, strict=True)]


# ------------------------------------------------------------------ 1. the authors' examples


def _lorenz_inputs(batch_size: int, seed: int = 0):
    """The Lorenz example: u' = rhs for 3 states, T = 50, a fixed step, coefficients shared over
    the batch (batch shape (1, 3): "n_ind_dim instead of 1 to avoid repeating later"), the step
    axis first, the left-hand side frozen."""
    g = torch.Generator().manual_seed(seed)
    T, n_ind = 50, 3
    coeffs = torch.zeros(1, n_ind, 1, 1, 1, 3, dtype=F64)
    coeffs[..., 1] = 1.0
    coefficients = coeffs[None, :, :, 0]  # (1, 1, 3, 1, 1, 3)
    rhs = torch.randn(T, batch_size, n_ind, 1, generator=g, dtype=F64)  # (50, bs, 3, 1)
    init = torch.randn(1, batch_size, n_ind, 1, 1, generator=g, dtype=F64)  # (1, bs, 3, 1, 1)
    step = torch.full((1, 1, 1), 0.01, dtype=F64)
    return coefficients, rhs, init, step


def test_lorenz_pattern_step_first_frozen_lhs():
    batch_size = 512
    c, b, u0, h = _lorenz_inputs(batch_size)
    b.requires_grad_()
    u0.requires_grad_()
    u = ode_forward(c, b, u0, h, n_steps=50, is_step_dim_first=True, frozen_lhs_cache_version=1)
    assert u.shape == (50, batch_size, 3, 1, 3)
    assert len(FROZEN_LHS_CACHE) == 1
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    g_b, g_u0 = _grads(u, (c, b, u0, h), weight)

    # samples are independent: the reference on the first few checks values and gradients
    n = 6
    sub = [c, b[:, :n].detach().requires_grad_(), u0[:, :n].detach().requires_grad_(), h]
    ref = dense_reference(*_steps_last(*sub), n_steps=50).movedim(-3, 0)
    r_b, r_u0 = _grads(ref, sub, weight[:, :n])
    assert rel_err(u[:, :n], ref) < 1e-10
    assert rel_err(g_b[:, :n], r_b) < 1e-10
    assert rel_err(g_u0[:, :n], r_u0) < 1e-10

    # a second call with new right-hand sides reuses the factorization
    b2 = torch.randn_like(b)
    u2 = ode_forward(c, b2, u0, h, n_steps=50, is_step_dim_first=True, frozen_lhs_cache_version=1)
    assert len(FROZEN_LHS_CACHE) == 1
    ref2 = dense_reference(*_steps_last(c, b2[:, :n], u0[:, :n], h), n_steps=50).movedim(-3, 0)
    assert rel_err(u2[:, :n], ref2) < 1e-10
    # and it equals the uncached solve
    u3 = ode_forward(c, b2, u0, h, n_steps=50, is_step_dim_first=True)
    assert rel_err(u2, u3) < 1e-12


def test_frozen_lhs_gradients_reach_rhs_and_init_only():
    c, b, u0, h = (x.requires_grad_() for x in _lorenz_inputs(4))
    u = ode_forward(c, b, u0, h, n_steps=50, is_step_dim_first=True, frozen_lhs_cache_version=2)
    u.square().sum().backward()
    assert c.grad is None and h.grad is None
    assert b.grad is not None and float(b.grad.abs().max()) > 0
    assert u0.grad is not None and float(u0.grad.abs().max()) > 0


def _sine_inputs(n_step: int = 500, seed: int = 0):
    """The curve-fitting example: per-step learnable coefficients and steps, a constant right-hand
    side and no initial values at all (``init_vars`` of shape (1, 1, 0, 1, 0))."""
    g = torch.Generator().manual_seed(seed)
    order = 2
    coefficients = torch.rand(1, 1, n_step, 1, 1, order + 1, generator=g, dtype=F64)
    rhs_equation = torch.ones(1, 1, n_step, 1, dtype=F64)
    init_vars = torch.empty(1, 1, 0, 1, 0, dtype=F64)
    raw_steps = torch.tensor(0.1, dtype=F64).logit().repeat(1, 1, n_step - 1)
    raw_steps = raw_steps + 0.3 * torch.randn(raw_steps.shape, generator=g, dtype=F64)
    return coefficients, rhs_equation, init_vars, raw_steps.sigmoid()


@pytest.mark.parametrize("n_step", [500, 60])
def test_sine_pattern_no_initial_values(n_step):
    """At the example's T = 500 values only (autograd through the row-by-row reference would
    take minutes there); gradients at T = 60, same pattern."""
    c, b, u0, h = (x.requires_grad_() for x in _sine_inputs(n_step))
    u = ode_forward(c, b, u0, h, is_step_dim_first=False, enable_central_smoothness=False)
    assert u.shape == (1, 1, n_step, 1, 3)
    if n_step > 100:
        assert rel_err(u, dense_reference(*(x.detach() for x in (c, b, u0, h)))) < 1e-10
        return
    ref = dense_reference(c, b, u0, h)
    assert rel_err(u, ref) < 1e-10
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = _grads(u, (c, b, u0, h), weight)
    ref_grads = _grads(ref, (c, b, u0, h), weight)
    for name, g, rg in zip(("c", "b", "u0", "h"), grads, ref_grads, strict=True):
        assert g.shape == rg.shape, name
        if rg.numel():
            assert rel_err(g, rg) < 1e-10, name


def _kdv_inputs(b1: int = 32, b2: int = 256, seed: int = 0):
    """The KdV example: everything per sample (steps too: ``(32, 256, 9)``, one learnt step per
    sample repeated over the steps), T = 10, R = 5, K = 4 initial orders on one step. Steps of
    0.2..0.3 keep the normal equations well conditioned (h^8 enters them; at h = 0.05 the worst
    of 8192 systems agrees with the QR reference to only ~1e-9 on every engine)."""
    g = torch.Generator().manual_seed(seed)
    T, order = 10, 4
    c = 0.1 * torch.randn(b1, b2, T, 1, 1, order + 1, generator=g, dtype=F64)
    c[..., order] += 1.0
    b = torch.randn(b1, b2, T, 1, generator=g, dtype=F64)
    u0 = torch.randn(b1, b2, 1, 1, order, generator=g, dtype=F64)
    h = 0.2 + 0.1 * torch.rand(b1, b2, 1, generator=g, dtype=F64)
    return c, b, u0, h.repeat(1, 1, T - 1)


def test_kdv_pattern_per_sample_steps():
    inputs = [x.requires_grad_() for x in _kdv_inputs()]
    u = ode_forward(*inputs, is_step_dim_first=False, enable_central_smoothness=False)
    assert u.shape == (32, 256, 10, 1, 5)
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    grads = _grads(u, inputs, weight)
    # samples are independent: the reference on a corner of the batch (the row-by-row
    # reference with autograd costs about a minute for all 8192)
    corner = (slice(0, 3), slice(0, 40))
    sub = [x[corner].detach().requires_grad_() for x in inputs]
    ref = dense_reference(*sub)
    assert rel_err(u[corner], ref) < 1e-10
    ref_grads = _grads(ref, sub, weight[corner])
    for name, g, rg in zip(("c", "b", "u0", "h"), grads, ref_grads, strict=True):
        assert rel_err(g[corner], rg) < 1e-10, name


@pytest.mark.parametrize("backend,method", ENGINES, ids=ENGINE_IDS)
@pytest.mark.parametrize("central", [False, True])
def test_step_first_equals_step_last(backend, method, central):
    c, b, u0, h = random_problem(
        batch=(2, 3), T=7, E=2, D=2, S=2, K=2, c_batch=(3,), h_batch=(2, 1), u_time=1
    )
    kw = dict(n_steps=7, n_init_var_steps=2, enable_central_smoothness=central)
    first = [x.movedim(x.dim() - i, 0) for x, i in zip((c, b, u0, h), (4, 2, 3, 1), strict=True)]
    first = [x.requires_grad_() for x in first]
    u = ode_forward(*first, is_step_dim_first=True, backend=backend, method=method, **kw)
    assert u.shape == (7, 2, 3, 2, 3)
    last = [x.detach().clone().requires_grad_() for x in _steps_last(*first)]
    ref = dense_reference(*last, **kw)
    assert rel_err(u.movedim(0, -3), ref) < 1e-10
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    grads = _grads(u, first, weight)
    ref_grads = _grads(ref, last, weight.movedim(0, -3))
    for g, x in zip(grads, first, strict=True):
        assert g.shape == x.shape
    for g, rg in zip(_steps_last(*grads), ref_grads, strict=True):
        assert rel_err(g, rg) < 1e-10


# ------------------------------------------------------------------ 2. the signature


AUTHORS_POSITIONAL = [
    "coefficients",
    "rhs_equation",
    "init_vars",
    "steps",
    "n_steps",
    "n_init_var_steps",
    "is_step_dim_first",
    "weight_equation",
    "weight_init_var",
    "weight_smooth",
    "enable_central_smoothness",
    "prefer_cuda_graph",
    "frozen_lhs_cache_version",
]


def test_signature_has_the_authors_positional_order():
    params = list(inspect.signature(ode_forward).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == AUTHORS_POSITIONAL
    defaults = {p.name: p.default for p in positional if p.default is not inspect.Parameter.empty}
    assert defaults == {
        "n_steps": None,
        "n_init_var_steps": None,
        "is_step_dim_first": False,
        "weight_equation": 1.0,
        "weight_init_var": 1.0,
        "weight_smooth": 1.0,
        "enable_central_smoothness": False,
        "prefer_cuda_graph": True,
        "frozen_lhs_cache_version": 0,
    }
    keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == [
        "method", "backend", "check_inputs", "check_pivots", "cuda_graphs", "threads"
    ]  # fmt: skip


def test_positional_arguments_mean_what_the_authors_mean():
    c, b, u0, h = random_problem(batch=(3,), T=8, E=2, D=2, S=2, K=2, h_time=1, u_time=1)
    weights = (1.3, 0.7, 1.6)
    # n_steps, n_init_var_steps, is_step_dim_first, weights, central, prefer_cuda_graph, version
    u = ode_forward(c, b, u0, h, 8, 2, False, *weights, True, True, 0)
    ref = dense_reference(
        c,
        b,
        u0,
        h,
        n_steps=8,
        n_init_var_steps=2,
        weight_equation=weights[0],
        weight_init_var=weights[1],
        weight_smooth=weights[2],
        enable_central_smoothness=True,
    )
    assert rel_err(u, ref) < 1e-10
    # step axis first, positionally
    first = [x.movedim(x.dim() - i, 0) for x, i in zip((c, b, u0, h), (4, 2, 3, 1), strict=True)]
    u_first = ode_forward(*first, 8, 2, True, *weights, True)
    assert rel_err(u_first.movedim(0, -3), ref) < 1e-10
    # the frozen version, positionally: the same answer, one cache entry
    u_frozen = ode_forward(c, b, u0, h, 8, 2, False, *weights, True, True, 7)
    assert rel_err(u_frozen, ref) < 1e-10
    assert len(FROZEN_LHS_CACHE) == 1


def test_prefer_cuda_graph_is_a_no_op_on_cpu():
    p = random_problem(batch=(2,), T=6)
    u_on = ode_forward(*p, prefer_cuda_graph=True)
    assert torch.equal(u_on, ode_forward(*p, prefer_cuda_graph=False))


def test_exported_names():
    assert smnn.clear_frozen_lhs_cache is clear_frozen_lhs_cache
    assert smnn.solver.clear_frozen_lhs_cache is clear_frozen_lhs_cache


# ------------------------------------------------------------------ 3. the frozen cache


def _frozen(version, problem, **kw):
    return ode_forward(*problem, frozen_lhs_cache_version=version, **kw)


def test_cache_is_bounded_lru_and_clearable():
    p = random_problem(batch=(2,), T=6)
    limit = FROZEN_LHS_CACHE.max_entries
    assert limit == 8
    for v in range(1, limit + 4):
        _frozen(v, p)
        assert len(FROZEN_LHS_CACHE) == min(v, limit)
    versions = [key[0] for key in FROZEN_LHS_CACHE.keys()]
    assert versions == list(range(4, limit + 4))  # the oldest went first
    _frozen(4, p)  # touching an entry makes it the most recently used
    _frozen(100, p)
    versions = [key[0] for key in FROZEN_LHS_CACHE.keys()]
    assert 4 in versions and 5 not in versions and versions[-1] == 100
    clear_frozen_lhs_cache()
    assert len(FROZEN_LHS_CACHE) == 0
    ref = dense_reference(*p)
    assert rel_err(_frozen(1, p), ref) < 1e-10  # still works after clearing


def test_cache_objects_validate_their_bound():
    cache = FrozenLhsCache(max_entries=2)
    for key in "abc":
        cache.get_or_create(key, lambda key=key: key.upper())
    assert cache.keys() == ["b", "c"]
    cache.max_entries = 1
    assert cache.keys() == ["c"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_entries"):
            FrozenLhsCache(max_entries=bad)


def test_cache_key_isolation():
    """The same version with a different problem (T, shapes, dtype, weights, central flag) gets
    its own entry, and each call gets its own correct answer."""
    v = 3
    base = random_problem(batch=(2,), T=6, seed=1)
    cases = {
        "base": (base, {}),
        "longer": (random_problem(batch=(2,), T=9, seed=2), {}),
        "batch": (random_problem(batch=(4,), T=6, seed=3), {}),
        "float32": (tuple(x.float() for x in base), {}),
        "weights": (base, dict(weight_smooth=2.0)),
        "central": (base, dict(enable_central_smoothness=True)),
        "orders": (random_problem(batch=(2,), T=6, K=2, seed=4), {}),
        "torch": (base, dict(backend="torch")),
    }
    assert len(cases) <= FROZEN_LHS_CACHE.max_entries
    for n, (p, kw) in enumerate(cases.values(), start=1):
        u = _frozen(v, p, **kw)
        p64 = tuple(x.double() for x in p)
        ref = dense_reference(*p64, **{k: w for k, w in kw.items() if k != "backend"})
        assert rel_err(u.double(), ref) < (1e-4 if u.dtype == torch.float32 else 1e-10)
        assert len(FROZEN_LHS_CACHE) == n
    # calling the first problem again hits its own entry (no new one), with its own answer
    assert rel_err(_frozen(v, base), dense_reference(*base)) < 1e-10
    assert len(FROZEN_LHS_CACHE) == len(cases)


def test_frozen_version_is_validated():
    p = random_problem(batch=(2,), T=6)
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match="frozen_lhs_cache_version"):
            _frozen(bad, p)


def test_factorize_solve_equals_ode_forward():
    """The README's claim: ``factorize(...).solve`` computes what ``ode_forward`` computes (both
    run the same kernels, so to the bit), values and gradients."""
    lorenz = _lorenz_inputs(512)  # dt = 0.01: h^4 = 1e-8 in M, where engines used to differ
    cases = [
        (_steps_last(*lorenz), dict(n_steps=50)),
        (
            random_problem(batch=(1536,), T=50, c_batch=(), h_batch=(), c_time=1, h_time=1),
            dict(n_steps=50),
        ),
        (
            random_problem(
                batch=(5, 3), T=12, E=2, D=2, S=2, K=2, c_batch=(5, 1), h_batch=(5, 1), seed=4
            ),
            {},
        ),
        (random_problem(batch=(37,), T=9, seed=5), {}),
    ]
    for (c, b, u0, h), kw in cases:
        T = kw.get("n_steps", h.shape[-1] + 1)
        S, K = u0.shape[-3], u0.shape[-1]
        fac = factorize(c, h, n_init_orders=K, n_steps=T, n_init_var_steps=S)
        b1, u01 = b.clone().requires_grad_(), u0.clone().requires_grad_()
        u_fac = fac.solve(b1, u01)
        b2, u02 = b.clone().requires_grad_(), u0.clone().requires_grad_()
        u = ode_forward(c, b2, u02, h, n_steps=T)
        assert rel_err(u_fac, u) <= 1e-12, (tuple(b.shape), rel_err(u_fac, u))
        assert torch.equal(u_fac, u)  # the same kernels assemble and substitute: to the bit
        weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        grads_fac = _grads(u_fac, (b1, u01), weight)
        for g1, g2 in zip(grads_fac, _grads(u, (b2, u02), weight), strict=True):
            assert rel_err(g1, g2) <= 1e-12


# ------------------------------------------------------------------ 4. S = 0 and K = 0


def _no_init_problem(init_steps_orders, seed=0, batch=(3,), T=9, R=3, E=1, D=1):
    """``init_vars`` of shape ``(*batch, S, D, K)`` for ``init_steps_orders`` = (S, K) with S = 0
    or K = 0; coefficients of size ~1 on every order, so that the equation rows pin the solution
    without initial values (the curve-fitting situation)."""
    c, b, _, h = random_problem(batch=batch, T=T, E=E, D=D, R=R, seed=seed)
    c = c + torch.rand(c.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    S, K = init_steps_orders
    return c, b, torch.zeros(*batch, S, D, K, dtype=F64), h


@pytest.mark.parametrize("backend,method", ENGINES, ids=ENGINE_IDS)
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("init_steps_orders", [(0, 0), (1, 0), (0, 2), (2, 0)])
def test_no_initial_values_on_every_engine(backend, method, central, init_steps_orders):
    inputs = [x.requires_grad_() for x in _no_init_problem(init_steps_orders, D=2, E=2)]
    kw = dict(enable_central_smoothness=central)
    u = ode_forward(*inputs, **kw, backend=backend, method=method)
    ref = dense_reference(*inputs, **kw)
    assert rel_err(u, ref) < 1e-10
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    grads = _grads(u, inputs, weight)
    ref_grads = _grads(ref, inputs, weight)
    for g, rg, x in zip(grads, ref_grads, inputs, strict=True):
        assert g.shape == x.shape
        if x.numel():
            assert rel_err(g, rg) < 1e-10


def test_no_initial_values_through_factorize_and_mnn():
    c, b, u0, h = _no_init_problem((0, 0), batch=(4,), T=12, D=2, E=2)
    ref = dense_reference(c, b, u0, h)
    fac = factorize(c, h, n_init_orders=0, n_init_var_steps=0)
    assert rel_err(fac.solve(b, u0), ref) < 1e-10
    from smnn.solver.mnn import MNNConvergenceWarning, mnn_cg, mnn_dense

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MNNConvergenceWarning)
        for solver in (mnn_dense, mnn_cg):
            assert solver(c, b, u0, h).shape == ref.shape


@pytest.mark.parametrize("backend,method", ENGINES, ids=ENGINE_IDS)
def test_singular_system_without_initial_values_is_reported(backend, method):
    """Entry 1: order 2 is in no row (zero coefficients, steps so small that h^2 underflows), and
    no initial-value row fixes it either: the pivot check names it."""
    c, b, u0, h = _no_init_problem((0, 0))
    c[1, :, :, :, 2] = 0.0
    h[1] = 1e-170
    with pytest.raises(NonPositivePivotError, match=r"batch index \(1,\)") as info:
        ode_forward(c, b, u0, h, backend=backend, method=method)
    assert "1 of 3" in str(info.value)
