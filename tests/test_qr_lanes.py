"""The orthogonal (QR) lane solve (smnn.solver.qr_lanes, qr_lane_kernels) against independent
oracles: values and every gradient against the dense reference (a dense QR of the rows of
docs/solver.md, "The over-determined linear system", differentiated by autograd), float32 against
float64, an ill-conditioned float64 case against a sparse augmented-system solve written here, rank
deficiency, both lane widths, factorize().solve and reruns bit for bit."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from conftest import INPUT_LABELS, random_problem, rel_err

from smnn import NonPositivePivotError
from smnn.solver import qr_lanes
from smnn.solver.inputs import prepare_problem
from smnn.solver.qr_lanes import qr_lane_factorize, qr_lane_ode_forward
from smnn.solver.reference import build_dense_system, dense_reference

F64 = torch.float64


def _problem(inputs, pk):
    return prepare_problem(*inputs, n_steps=pk.get("T", 7), n_init_var_steps=pk.get("S", 1))


def _solve(inputs, pk, weights=(1.0, 1.0, 1.0), central=False, check_pivots=True):
    """u and the gradients of a fixed weighted sum of u."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    u = qr_lane_ode_forward(_problem(inputs, pk), weights, True, check_pivots, central)
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=u.dtype)
    grads = torch.autograd.grad((u * weight).sum(), inputs)
    return u.detach(), grads


ONES = (1.0, 1.0, 1.0)
# (name, random_problem kwargs, weights, central)
CASES = [
    ("N9", dict(batch=(9,), T=6), (1.0, 1.0, 1.0), False),
    ("multi_state_weights", dict(batch=(9,), T=7, E=3, D=2, R=4, S=2, K=2), (1.7, 0.4, 2.3), False),
    ("shared_time_axes", dict(batch=(9,), T=6, E=2, c_time=1, h_time=1, b_time=1), ONES, False),
    ("init_S3_one_step", dict(batch=(5,), T=6, D=2, S=3, K=2, u_time=1), (1.0, 1.0, 1.0), False),
    # left-hand side shared over the last batch dim: 9 systems with P=3 right-hand sides
    ("lhs_shared_P3", dict(batch=(9, 3), T=6, E=2, c_batch=(9, 1), h_batch=(9, 1)), ONES, False),
    # one system for the whole batch (N=1, P=20), init shared too
    ("lhs_shared_all", dict(batch=(20,), T=7, D=2, c_batch=(), h_batch=(), u_batch=()), ONES, 0),
    # coefficients shared over the batch, steps per entry: N=9, gradient of c summed
    ("coef_shared_batch", dict(batch=(9,), T=6, c_batch=()), (1.0, 1.0, 1.0), False),
    ("central_odd_T", dict(batch=(3,), T=9), (1.0, 1.0, 0.7), True),
    ("central_R5", dict(batch=(2,), T=11, E=3, D=2, R=5, S=2, K=4), (1.0, 1.0, 0.7), True),
    ("central_R2_T2", dict(batch=(3,), T=2, R=2), (1.0, 1.0, 0.7), True),
    ("central_shared", dict(batch=(20,), T=7, E=2, D=2, K=2, c_batch=(), h_batch=()), ONES, True),
]  # fmt: skip


@pytest.mark.parametrize("pk,weights,central", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_values_and_gradients_match_dense_reference(pk, weights, central):
    inputs = random_problem(**pk)
    u, grads = _solve(inputs, pk, weights, central)
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    ref = dense_reference(
        *ref_in,
        n_steps=pk.get("T", 7),
        n_init_var_steps=pk.get("S", 1),
        weight_equation=weights[0],
        weight_init_var=weights[1],
        weight_smooth=weights[2],
        enable_central_smoothness=central,
    )
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in)
    assert rel_err(u, ref) < 1e-10
    for label, g, r in zip(INPUT_LABELS, grads, ref_grads, strict=True):
        assert g.shape == r.shape, label
        assert rel_err(g, r) < 1e-10, label


def _max_rel_err(u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per batch entry, max over the orders k of max_t |u - ref| / max_t |ref| (u (B, T, D, R))."""
    err = (u.double() - ref).abs().amax(dim=1) / ref.abs().amax(dim=1)
    return err.flatten(1).amax(dim=1)


def _fixed_step(pk, h):
    c, b, u0, steps = random_problem(**pk)
    return c, b, u0, torch.full_like(steps, h)


# (name, random_problem kwargs, fixed step or None). Measured (median, per order): 4.2e-8,
# 4.4e-8, 4.5e-8 refined until the next correction is predicted below 2^-28 (2, 2 and 5
# steps); 3.6e-6 on the long case after two steps; 2.3e-4, 1.8e-4, 7.4e-3 from the
# float32 Householder sweep alone (about cond(A) * eps32), while the normal equations in
# float32 fail the pivot check or are off by O(1).
FLOAT32_CASES = [
    ("kdv_like", dict(batch=(16,), T=10, R=5, K=4, seed=1), None, 2e-5),
    ("lorenz_like", dict(batch=(8,), T=50, R=3, K=2, seed=2), 0.01, 2e-5),
    ("long", dict(batch=(4,), T=4000, R=3, K=2, seed=3), 0.01, 2e-5),
]


@pytest.mark.parametrize(
    "pk,h,bound", [c[1:] for c in FLOAT32_CASES], ids=[c[0] for c in FLOAT32_CASES]
)
def test_float32_close_to_float64(pk, h, bound):
    """Median over the batch of the max relative error of u (every order, each against its own
    largest value) against a float64 solve of the same (float32) inputs: <= 2e-5."""
    inputs = random_problem(**pk) if h is None else _fixed_step(pk, h)
    in32 = [x.float() for x in inputs]
    u64 = qr_lane_ode_forward(
        _problem([x.double() for x in in32], pk), (1.0, 1.0, 1.0), True, True, False
    )
    u32 = qr_lane_ode_forward(_problem(in32, pk), (1.0, 1.0, 1.0), True, True, False)
    assert u32.dtype == torch.float32
    assert float(_max_rel_err(u32, u64).median()) <= bound


def test_growing_solution_against_sparse_augmented_system():
    """u' = 0.5 u + b (T=2000, h=0.01, float64): u grows by e^10 and cond(A) is large; the QR
    solve stays within 1e-9 of the scaled augmented system [[a I, A], [A^T, 0]] [r/a; u] =
    [beta; 0] solved by a sparse LU. The scale a = 1e-3 (Bjorck) keeps the augmented matrix
    well conditioned: with a = 1 the LU solution itself is off by 2.7e-5, with a = 1e-3 and
    1e-4 the two agree to 3e-10 (the normal equations: 5.6e-5)."""
    T, pk = 2000, dict(batch=(1,), T=2000, R=3, K=1, seed=5)
    c, b, u0, _ = random_problem(**pk)
    c = torch.zeros_like(c)
    c[..., 0, 0, 0], c[..., 0, 0, 1] = -0.5, 1.0
    h = torch.full((1, T - 1), 0.01, dtype=F64)
    u = qr_lane_ode_forward(_problem((c, b, u0, h), pk), (1.0, 1.0, 1.0), True, True, False)
    A, beta = build_dense_system(c[0], b[0], u0[0], h[0])
    A = scipy.sparse.csr_matrix(A.numpy())
    rows, cols = A.shape
    scale = 1e-3
    aug = scipy.sparse.bmat(
        [[scale * scipy.sparse.identity(rows), A], [A.T, None]], format="csc", dtype=np.float64
    )
    rhs = np.concatenate([beta.numpy(), np.zeros(cols)])
    ref = torch.from_numpy(scipy.sparse.linalg.spsolve(aug, rhs)[rows:]).reshape(1, T, 1, 3)
    assert ref.abs().max() > 1e3  # the solution does grow
    assert float(_max_rel_err(u, ref)[0]) <= 1e-9


def _rank_deficient(n: int, failing: dict[int, int], T: int = 7):
    """N systems (E=2, D=1, R=3, K=1); entry i of ``failing`` has steps of 1e-170 (h^2
    underflows, so order 2 enters no Taylor row) and no coefficient on order 2 from step
    ``failing[i]`` on: that step's order 2 is in no row at all."""
    c, b, u0, h = random_problem(batch=(n,), T=T, E=2, D=1, R=3, K=1, seed=21)
    for i, step in failing.items():
        h[i] = 1e-170
        c[i, step:, :, 0, 2] = 0.0
    return c, b, u0, h


@pytest.mark.parametrize("n", [9, 40])
def test_rank_deficient_raises_or_returns_nan(n):
    failing = {3: 2, n - 1: 4}
    inputs = _rank_deficient(n, failing)
    pk = dict(T=7, S=1)
    with pytest.raises(NonPositivePivotError) as info:
        _solve(inputs, pk)
    named = {
        int(i): int(t)
        for i, t in re.findall(r"batch index \((\d+),\) at block (\d+)", str(info.value))
    }
    assert named == failing
    with pytest.raises(NonPositivePivotError):
        qr_lane_factorize(_problem(inputs, pk), (1.0, 1.0, 1.0), True, False)
    u, _ = _solve(inputs, pk, check_pivots=False)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[list(failing)] = True
    assert bool(u[bad].isnan().all())
    assert bool(u[~bad].isfinite().all())
    ref = dense_reference(*(x[~bad] for x in inputs))
    assert rel_err(u[~bad], ref) < 1e-10


@pytest.mark.parametrize(
    "pk", [dict(batch=(70,), T=6, E=2, D=2), dict(batch=(70,), T=6, c_batch=(), h_batch=())]
)
def test_both_widths_give_the_same_bits(pk, monkeypatch):
    inputs = random_problem(**pk)
    results = []
    for width in (qr_lanes.NARROW, qr_lanes.WIDE):
        monkeypatch.setattr(qr_lanes, "lane_width", lambda n_items, w=width: w)
        results.append(_solve(inputs, pk))
    (u8, g8), (u32, g32) = results
    assert torch.equal(u8, u32)
    for a, b in zip(g8, g32, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "pk,central",
    [
        (dict(batch=(9,), T=7, E=2, D=2, S=2, K=2), False),
        (dict(batch=(9,), T=7), True),
        (dict(batch=(6, 4), T=6, c_batch=(6, 1), h_batch=(6, 1)), False),
    ],
)
def test_factorize_solve_equals_forward_to_the_bit(pk, central):
    inputs = [x.requires_grad_() for x in random_problem(**pk)]
    problem = _problem(inputs, pk)
    u = qr_lane_ode_forward(problem, (1.0, 1.0, 0.8), True, True, central)
    lhs = qr_lane_factorize(problem, (1.0, 1.0, 0.8), True, central)
    assert not bool(lhs.factor.failed().any())
    v = lhs.solve(problem, True)
    assert torch.equal(u.detach(), v.detach())
    # gradients to rhs_equation and init_vars through the stored factor
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    g_fwd = torch.autograd.grad((u * weight).sum(), inputs[1:3])
    g_fac = torch.autograd.grad((v * weight).sum(), inputs[1:3])
    for a, b in zip(g_fwd, g_fac, strict=True):
        assert rel_err(b, a) < 1e-12


def test_same_bits_on_a_second_run():
    pk = dict(batch=(40,), T=9, E=2, D=2, K=2)
    inputs = random_problem(**pk)
    (u1, g1), (u2, g2) = _solve(inputs, pk), _solve(inputs, pk)
    assert torch.equal(u1, u2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_bad_inputs_raise():
    pk = dict(batch=(3,), T=6)
    c, b, u0, h = random_problem(**pk)
    h[1, 2] = -0.1
    with pytest.raises(ValueError, match="steps must be > 0"):
        _solve((c, b, u0, h), pk)
    h[1, 2] = 0.1
    b[2, 3] = float("nan")
    with pytest.raises(ValueError, match="rhs_equation contains 1 non-finite"):
        _solve((c, b, u0, h), pk)


def test_float32_factorize_solve_equals_forward_to_the_bit():
    """Both refine with the same operations, so float32 gives the same bits too."""
    pk = dict(batch=(6, 4), T=8, c_batch=(6, 1), h_batch=(6, 1))
    problem = _problem([x.float() for x in random_problem(**pk)], pk)
    u = qr_lane_ode_forward(problem, ONES, True, True, False)
    v = qr_lane_factorize(problem, ONES, True, False).solve(problem, True)
    assert u.dtype == v.dtype == torch.float32
    assert torch.equal(u, v)


def _solve_with(inputs, pk, weight_seed=3):
    """u and the gradients of sum(u * weight), the weight drawn once and rounded to float32
    whatever the dtype (so float32 and float64 runs differentiate the same function)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    u = qr_lane_ode_forward(_problem(inputs, pk), ONES, True, True, False)
    gen = torch.Generator().manual_seed(weight_seed)
    weight = torch.randn(u.shape, generator=gen, dtype=F64).float()
    return u.detach(), torch.autograd.grad((u * weight.to(u.dtype)).sum(), inputs)


# Measured (max relative error of each gradient against float64, coefficients, rhs_equation,
# init_vars, steps): KdV-like 4.8e-8, 4.8e-8, 2.6e-8, 2.3e-8; Lorenz-like 4.1e-8, 3.8e-8,
# 2.5e-8, 3.6e-8; long 3.8e-8, 2.7e-7, 9.8e-9, 3.5e-8. Without refining the adjoint and with the
# gradients chained in float32 from the float32 solution: 0.13, 0.48, 5.4e-2, 3.0e-3 (KdV-like)
# up to 0.77, 2.3, 1.6e-2, 3.8e-2 (long).
@pytest.mark.parametrize("pk,h", [c[1:3] for c in FLOAT32_CASES], ids=[c[0] for c in FLOAT32_CASES])
def test_float32_gradients_close_to_float64(pk, h):
    """Every input's float32 gradient within 1e-6 (max relative error over the tensor) of the
    float64 gradient of the same (float32) inputs: the adjoint refined, the chain in float64."""
    inputs = random_problem(**pk) if h is None else _fixed_step(pk, h)
    in32 = [x.float() for x in inputs]
    _, g32 = _solve_with(in32, pk)
    _, g64 = _solve_with([x.double() for x in in32], pk)
    for label, a, b in zip(INPUT_LABELS, g32, g64, strict=True):
        assert a.dtype == torch.float32, label
        assert rel_err(a.double(), b) <= 1e-6, label


def test_float32_factorize_gradients_close_to_float64():
    """Gradients to rhs_equation and init_vars through a stored float32 factor (refined adjoint)
    against the float64 forward's, shared left-hand side (P = 4)."""
    pk = dict(batch=(6, 4), T=60, R=3, K=2, c_batch=(6, 1), h_batch=(6, 1), seed=5)
    c, b, u0, h = random_problem(**pk)
    h = torch.full_like(h, 0.01)
    grads = []
    for dtype in (torch.float32, F64):
        inputs = [x.float().to(dtype).requires_grad_() for x in (c, b, u0, h)]
        problem = _problem(inputs, pk)
        u = qr_lane_factorize(problem, ONES, True, False).solve(problem, True)
        weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
        grads.append(torch.autograd.grad((u * weight.to(dtype)).sum(), inputs[1:3]))
    for label, a, b in zip(("rhs_equation", "init_vars"), *grads, strict=True):
        assert a.dtype == torch.float32, label
        assert rel_err(a.double(), b) <= 1e-6, label


def test_float32_item_does_not_depend_on_the_batch():
    """The refinement stops per item: a system solved alone gives the bits it gets in a batch
    of 70 (lanes of 8 against 32), values and gradients."""
    pk = dict(batch=(70,), T=40, R=3, K=2, seed=6)
    inputs = [x.float() for x in random_problem(**pk)]
    weight = torch.randn(70, 40, 1, 3, generator=torch.Generator().manual_seed(7)).float()
    results = []
    for n in (70, 1):
        leaves = [x[:n].clone().requires_grad_() for x in inputs]
        u = qr_lane_ode_forward(_problem(leaves, pk), ONES, True, True, False)
        grads = torch.autograd.grad((u * weight[:n]).sum(), leaves)
        results.append((u.detach()[:1], [g[:1] for g in grads]))
    (u_all, g_all), (u_one, g_one) = results
    assert torch.equal(u_one, u_all)
    for label, a, b in zip(INPUT_LABELS, g_one, g_all, strict=True):
        assert torch.equal(a, b), label


def _failing_in_float32():
    """KdV-like systems at h = 0.005, rounded to float32: 20 of 64 fail the float32 rank check
    (column-scaled condition near 1 / (nb * eps32)), none the float64 one."""
    pk = dict(batch=(64,), T=10, R=5, K=4, seed=1)
    c, b, u0, h = random_problem(**pk)
    return [x.float() for x in (c, b, u0, torch.full_like(h, 0.005))], pk


def test_float32_rank_failures_are_solved_in_float64():
    """Systems whose float32 factor fails the rank check are solved again in float64 (their
    values: the float64 solution's bits rounded to float32), the rest stay float32; gradients
    of the resolved systems come from the float64 solve."""
    in32, pk = _failing_in_float32()
    coef, steps = qr_lanes._fold_lhs(_problem(in32, pk))
    sizes = qr_lanes._sizes(_problem(in32, pk), ONES, False)
    outcome = qr_lanes._Outcome()
    rhs, init = qr_lanes._fold_rhs(_problem(in32, pk), qr_lanes.BatchFolding((64,), (64,)))
    qr_lanes._QrLaneSolve.apply(coef, steps, rhs, init, sizes, outcome)
    failed = outcome.failed()
    assert 0 < int(failed.sum()) < 64
    u32, g32 = _solve_with(in32, pk)  # check_pivots=True: no error
    u64, g64 = _solve_with([x.double() for x in in32], pk)
    assert torch.equal(u32[failed], u64[failed].float())
    assert float(_max_rel_err(u32, u64).max()) <= 1e-5
    for label, a, b in zip(INPUT_LABELS, g32, g64, strict=True):
        assert bool(a.isfinite().all()), label
        assert rel_err(a[failed].double(), b[failed]) <= 1e-6, label


def test_float32_refinement_that_does_not_converge_is_solved_in_float64(monkeypatch):
    """With one refinement step allowed, the long problem's systems do not converge in time:
    they are solved in float64 (values) and their adjoints come from a float64 factor
    (gradients), both within 1e-6 of float64."""
    name, pk, h, _ = FLOAT32_CASES[2]
    in32 = [x.float() for x in _fixed_step(pk, h)]
    monkeypatch.setattr(qr_lanes, "_REFINE_MAX_STEPS", 1)
    u32, g32 = _solve_with(in32, pk)
    monkeypatch.undo()
    u64, g64 = _solve_with([x.double() for x in in32], pk)
    assert float(_max_rel_err(u32, u64).max()) <= 1e-6
    for label, a, b in zip(INPUT_LABELS, g32, g64, strict=True):
        assert rel_err(a.double(), b) <= 1e-6, label


@pytest.mark.parametrize("central", [False, True])
def test_normal_residual_kernel_matches_dense_rows(central):
    """A^T (beta - A x) of the refinement kernel against the dense rows, for any x."""
    from smnn.solver import qr_lane_kernels

    pk = dict(batch=(5, 2), T=7, E=2, D=2, S=2, K=2, c_batch=(5, 1), h_batch=(5, 1))
    c, b, u0, h = random_problem(**pk)
    x = torch.randn(5, 2, 7, 2, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    A, beta = build_dense_system(c, b, u0, h, weight_smooth=0.6, enable_central_smoothness=central)
    dense = (A.mT @ (beta - (A @ x.flatten(2)[..., None])[..., 0])[..., None])[..., 0]
    problem = _problem((c, b, u0, h), pk)
    sizes = qr_lanes._sizes(problem, (1.0, 1.0, 0.6), central)
    folding = qr_lanes.BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    coef, steps = qr_lanes._fold_lhs(problem)
    rhs_eq, init = qr_lanes._fold_rhs(problem, folding)
    xf = folding.fold_rhs(x.reshape(5, 2, 7, 6)).contiguous()
    out = torch.empty_like(xf)
    T, D, S, K, central_, wts, finv = sizes.args(F64)
    qr_lane_kernels.normal_residual(
        *(t.contiguous().numpy() for t in (coef, steps, rhs_eq, init)),
        xf.numpy(), D, S, K, central_, wts, finv, 8, out.numpy(), 1,
    )  # fmt: skip
    got = folding.unfold(out).reshape(5, 2, -1)
    assert rel_err(got, dense) < 1e-12


@pytest.mark.parametrize("T", [60, 400, 4000])
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smoothness_rows_alone_are_rank_deficient(dtype, central, T):
    """System 1 has no equation (zero coefficients) and no initial rows: the Taylor rows leave
    every polynomial of degree < R undetermined, and its last R_t holds rounding of 1-2
    nb * eps (caught by the margin RANK_TOLERANCE_FACTOR = 4, as on the torch path); the
    well-posed systems beside it pass."""
    c, b, u0, h = random_problem(batch=(3,), T=T, R=3, K=1, dtype=dtype)
    c[1] = 0.0
    inputs, pk = (c, b, u0[..., :0, :, :0], h), dict(T=T, S=0)
    with pytest.raises(NonPositivePivotError, match=r"1 of 3.*\(1,\)"):
        qr_lane_ode_forward(_problem(inputs, pk), ONES, True, True, central)
    u = qr_lane_ode_forward(_problem(inputs, pk), ONES, True, False, central)
    assert torch.isnan(u).flatten(1).all(1).tolist() == [False, True, False]


@pytest.mark.parametrize("width", [8, 32])
def test_spelled_out_helpers_of_qr_lane_helpers_source_match_their_formulas(width):
    """The helpers generated from smnn/solver/qr_lane_helpers_source.py at 8 and 32 lanes:
    squared_norm and reflect_column against the formulas of their docstrings, lane by lane."""
    from smnn.solver import qr_lane_kernels as q

    module = q._narrow if width == 8 else q._wide
    rng = np.random.default_rng(width)
    a = rng.standard_normal((6, 4, width))
    rows, nr, j, c = np.array([1, 2, 3, 5], dtype=np.int64), 4, 1, 3
    sig = np.empty(width)
    module.squared_norm(a, j, rows, nr, sig)
    np.testing.assert_allclose(sig, sum(a[rows[i], j] ** 2 for i in range(1, nr)), rtol=1e-14)

    taus = rng.standard_normal((4, width))
    got = a.copy()
    module.reflect_column(got, j, rows, nr, c, taus, np.empty(width))
    scale = taus[j] * (a[j, c] + sum(a[rows[i], j] * a[rows[i], c] for i in range(1, nr)))
    want = a.copy()
    want[j, c] -= scale
    for i in range(1, nr):
        want[rows[i], c] -= scale * a[rows[i], j]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    assert not np.array_equal(got[:, c], a[:, c])  # the column did change
