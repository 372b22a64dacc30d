"""method='qr': the orthogonal least-squares solve (smnn.solver.qr) against the dense reference
and, for float32 and ill-conditioned problems, an independent sparse augmented-system solve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from conftest import INPUT_LABELS, random_problem, rel_err
from test_solver import CASES, _reference

from smnn import NonPositivePivotError, factorize, ode_forward
from smnn.solver import clear_frozen_lhs_cache
from smnn.solver.factor import Factor
from smnn.solver.reference import build_dense_system, dense_reference


@pytest.fixture(autouse=True)
def one_thread():
    """The sweeps are T dependent steps of tiny batched ops: on a shared 2-core machine a
    second intra-op thread only waits (measured: this file 31 s with one thread, 323 s with two
    under load; the results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ against the dense reference


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_values_and_gradients_match_dense_reference(name):
    inputs, kw, ref, weight, ref_grads = _reference(name)
    u = ode_forward(*inputs, **kw, method="qr")
    assert u.shape == ref.shape
    assert rel_err(u, ref) < 1e-10
    grads = torch.autograd.grad((u * weight).sum(), inputs)
    for label, x, g, rg in zip(INPUT_LABELS, inputs, grads, ref_grads, strict=True):
        assert g.shape == x.shape, label
        if rg is None:  # R = 1: the steps do not enter the rows
            assert float(g.abs().max()) < 1e-12, label
        else:
            assert rel_err(g, rg) < 1e-8, label


@pytest.mark.parametrize("central", [False, True])
def test_weight_tensors_receive_gradients(central):
    c, b, u0, h = random_problem(batch=(2,), T=6, E=2, D=2, S=2, K=2)
    weights = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (1.3, 0.8, 1.9)]
    kw = dict(
        weight_equation=weights[0],
        weight_init_var=weights[1],
        weight_smooth=weights[2],
        enable_central_smoothness=central,
    )
    u = ode_forward(c, b, u0, h, **kw, method="qr")
    ref = dense_reference(c, b, u0, h, **kw)
    assert rel_err(u, ref) < 1e-10
    g = torch.autograd.grad(u.square().sum(), weights)
    rg = torch.autograd.grad(ref.square().sum(), weights)
    for a, r in zip(g, rg, strict=True):
        assert abs(float(a - r)) <= 1e-8 * max(1.0, abs(float(r)))


@pytest.mark.parametrize("central", [False, True])
def test_gradcheck(central):
    c, b, u0, h = random_problem(batch=(2,), T=5, E=2, D=2, R=3, S=1, K=2, seed=3)
    inputs = [x.requires_grad_() for x in (c, b, u0, h)]

    def f(c, b, u0, h):
        return ode_forward(c, b, u0, h, enable_central_smoothness=central, method="qr")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "backend, bound",
    [
        # the torch QR refines the adjoint lambda as well as u
        ("torch", 1e-4),
        # the lane engine refines u only: its adjoint carries about cond(A) * eps32
        ("numba", 1e-3),
    ],
)
def test_float32_gradients_follow_float64(backend, bound):
    """float32 gradients (refined solution, R from float32) against float64 ones."""
    p64 = [x.requires_grad_() for x in random_problem(batch=(3,), T=30, E=2, D=2, K=2, seed=4)]
    p32 = [x.detach().float().requires_grad_() for x in p64]
    g64 = torch.autograd.grad(ode_forward(*p64, method="qr", backend=backend).square().sum(), p64)
    g32 = torch.autograd.grad(ode_forward(*p32, method="qr", backend=backend).square().sum(), p32)
    for label, a, r in zip(INPUT_LABELS, g32, g64, strict=True):
        assert rel_err(a.double(), r) < bound, (label, backend)


# ----------------------------------------------------------------- options of the public API


@pytest.mark.parametrize("central", [False, True])
def test_factorization_solves_like_ode_forward(central):
    c, b, u0, h = random_problem(batch=(4,), T=9, E=2, D=2, S=2, K=2, c_batch=(), h_batch=())
    kw = dict(weight_smooth=1.5, enable_central_smoothness=central)
    fac = factorize(c, h, n_init_orders=2, n_init_var_steps=2, method="qr", **kw)
    assert isinstance(fac.factor, Factor)
    assert fac.factor.n_systems == 1  # shared coefficients and steps: one system of rows
    b1 = b.clone().requires_grad_()
    u1 = fac.solve(b1, u0)
    u2 = ode_forward(c, b, u0, h, method="qr", **kw)
    assert torch.equal(u1, u2)  # the same rotations, in the same order
    assert rel_err(u1, dense_reference(c, b, u0, h, **kw)) < 1e-10
    # gradients to the right-hand sides only, as through the dense reference
    b4 = b.clone().requires_grad_()
    (g1,) = torch.autograd.grad(u1.square().sum(), [b1])
    (g4,) = torch.autograd.grad(dense_reference(c, b4, u0, h, **kw).square().sum(), [b4])
    assert rel_err(g1, g4) < 1e-8
    # many right-hand sides through one factorization
    b3 = torch.randn(6, 4, 9, 2, dtype=torch.float64)
    assert fac.solve(b3, u0).shape == (6, 4, 9, 2, 3)


def test_factor_solves_the_normal_equations():
    """QRFactor.solve inverts A^T A (the Factor protocol), as the LDL^T factor does."""
    c, _, _, h = random_problem(batch=(3,), T=8, E=2, D=2, K=2)
    qr = factorize(c, h, n_init_orders=2, method="qr").factor
    ldl = factorize(c, h, n_init_orders=2, method="sequential", backend="torch").factor
    rhs = torch.randn(3, 8, 6, 2, dtype=torch.float64)
    assert (qr.n_systems, qr.n_steps, qr.block_size) == (3, 8, 6)
    assert qr.failed().tolist() == [False] * 3
    assert rel_err(qr.solve(rhs), ldl.solve(rhs)) < 1e-10


def test_broadcast_and_shared_inputs_keep_the_small_batch():
    c, b, u0, h = random_problem(
        batch=(4, 3), T=7, c_batch=(3,), h_batch=(), u_batch=(4, 1), b_batch=(4, 3)
    )
    u = ode_forward(c, b, u0, h, method="qr")
    assert rel_err(u, dense_reference(c, b, u0, h)) < 1e-10
    fac = factorize(c, h, n_init_orders=1, method="qr")
    assert fac.factor.n_systems == 3  # the coefficients' batch, not the broadcast one
    assert rel_err(fac.solve(b, u0), u) < 1e-13


def test_step_dim_first_and_frozen_cache():
    c, b, u0, h = random_problem(batch=(3,), T=8, E=2, D=2, K=2)
    u = ode_forward(c, b, u0, h, method="qr")
    first = [x.movedim(-i, 0) for x, i in zip((c, b, u0, h), (4, 2, 3, 1), strict=True)]
    u_first = ode_forward(*first, is_step_dim_first=True, method="qr")
    assert torch.equal(u_first, u.movedim(-3, 0))
    clear_frozen_lhs_cache()
    try:
        b2 = b.clone().requires_grad_()
        for _ in range(2):
            u_frozen = ode_forward(c, b2, u0, h, method="qr", frozen_lhs_cache_version=3)
            assert torch.equal(u_frozen, u)
        (g,) = torch.autograd.grad(u_frozen.sum(), [b2])
        assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0
    finally:
        clear_frozen_lhs_cache()


def test_auto_uses_qr_for_float32():
    p = [x.float() for x in random_problem(batch=(3,), T=12, E=2, D=2, K=2)]
    assert torch.equal(ode_forward(*p), ode_forward(*p, method="qr"))
    fac = factorize(p[0], p[3], n_init_orders=2)
    assert torch.equal(fac.solve(p[1], p[2]), ode_forward(*p, method="qr"))


def test_qr_refuses_cuda_graphs():
    from smnn.solver.cuda_graphs import CudaGraphPool

    with pytest.raises(ValueError, match="cuda_graphs"):
        ode_forward(*random_problem(), method="qr", cuda_graphs=CudaGraphPool())


# ------------------------------------------------------------------------- rank deficiency


def _singular_problem(dtype, T):
    """System 1 has no equation and no initial rows: the smoothness rows alone leave every
    polynomial of degree < R in the null space."""
    c, b, u0, h = random_problem(batch=(3,), T=T, R=3, K=1, dtype=dtype)
    c = c.clone()
    c[1] = 0.0
    return c, b, u0[..., :0, :, :0], h


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [5, 60])
def test_rank_deficiency_raises_or_gives_nan(dtype, T, central, backend):
    p = _singular_problem(dtype, T)
    kw = dict(enable_central_smoothness=central, backend=backend)
    with pytest.raises(NonPositivePivotError, match=r"rank deficient for 1 of 3.*\(1,\)"):
        ode_forward(*p, method="qr", **kw)
    with pytest.raises(NonPositivePivotError, match=r"\(1,\)"):
        factorize(p[0], p[3], n_init_orders=0, n_init_var_steps=0, method="qr", **kw)
    u = ode_forward(*p, method="qr", check_pivots=False, **kw)
    assert torch.isnan(u).flatten(1).all(1).tolist() == [False, True, False]
    ref = dense_reference(*(x.double() for x in p), enable_central_smoothness=central)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(u[[0, 2]].double(), ref[[0, 2]]) < tol


@pytest.mark.parametrize("method", ["sequential", "cyclic"])
def test_ldlt_torch_paths_fail_negligible_pivots(method):
    p = _singular_problem(torch.float64, 5)
    with pytest.raises(NonPositivePivotError, match=r"1 of 3.*\(1,\)"):
        ode_forward(*p, method=method, backend="torch")
    u = ode_forward(*p, method=method, backend="torch", check_pivots=False)
    assert torch.isnan(u).flatten(1).all(1).tolist() == [False, True, False]


# ---------------------------- float32 and ill-conditioned cases: the augmented sparse solve


def _sparse_rows(A_dense_free_inputs):
    """A (scipy CSR) and beta of one system, row by row from docs/solver.md, "The over-determined
    linear system" (no central rows): an independent statement of the rows, for problems too long to
    be dense."""
    c, b, u0, h = (x.numpy() for x in A_dense_free_inputs)
    T, E, D, R = c.shape
    S, _, K = u0.shape
    rows, cols, vals, beta = [], [], [], []

    def put(row, t, d, k, value):
        rows.append(row)
        cols.append((t * D + d) * R + k)
        vals.append(value)

    r = 0
    for t in range(T):
        for e in range(E):
            for d in range(D):
                for k in range(R):
                    put(r, t, d, k, c[t, e, d, k])
            beta.append(b[t, e])
            r += 1
    for t in range(S):
        for d in range(D):
            for k in range(K):
                put(r, t, d, k, 1.0)
                beta.append(u0[t, d, k])
                r += 1
    for t in range(T - 1):
        ht = float(h[t])
        for d in range(D):
            for k in range(R):
                for o in range(k, R):
                    put(r, t, d, o, ht**o / math.factorial(o - k))
                put(r, t + 1, d, k, -(ht**k))
                put(r + 1, t + 1, d, k, 0.0)
                for o in range(k, R):
                    put(r + 1, t + 1, d, o, (-ht) ** o / math.factorial(o - k))
                put(r + 1, t, d, k, -((-ht) ** k))
                beta += [0.0, 0.0]
                r += 2
    return sp.csr_matrix((vals, (rows, cols)), shape=(r, T * D * R)), np.array(beta)


def _augmented_solve(c, b, u0, h) -> torch.Tensor:
    """u from [[I, A], [A^T, 0]] [r; u] = [beta; 0] by a sparse LU, per system (float64)."""
    out = []
    for i in range(c.shape[0]):
        A, beta = _sparse_rows((c[i], b[i], u0[i], h[i]))
        m, n = A.shape
        K = sp.bmat([[sp.identity(m), A], [A.T, None]], format="csc")
        x = spla.spsolve(K, np.concatenate([beta, np.zeros(n)]))
        out.append(torch.from_numpy(x[m:]).reshape(c.shape[1], c.shape[3], c.shape[4]))
    return torch.stack(out)


def _median_error(u: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over the batch of max |u - ref| / max |ref| per system (NaN counts as failed)."""
    diff = (u.double() - ref).abs().flatten(1)
    err = diff.amax(1) / ref.abs().flatten(1).amax(1)
    err[~torch.isfinite(diff).all(1)] = math.inf
    return float(err.median())


def issue_case(name: str):
    """The four problems of issue 15, float64 (the float32 runs round these)."""
    if name == "kdv":  # B=16, T=10, R=5, K=4, steps 0.05-0.15
        return random_problem(batch=(16,), T=10, R=5, K=4)
    if name in ("lorenz", "long"):  # R=3, K=2, h=0.01
        B, T = (8, 50) if name == "lorenz" else (4, 4000)
        c, b, u0, h = random_problem(batch=(B,), T=T, R=3, K=2)
        return c, b, u0, torch.full_like(h, 0.01)
    if name == "growing":  # u' = 0.5 u + b (R=2, K=1), T=2000, h=0.01
        g = torch.Generator().manual_seed(0)
        B, T = 4, 2000
        c = torch.tensor([-0.5, 1.0], dtype=torch.float64).expand(B, T, 1, 1, 2)
        b = torch.randn(B, 1, 1, generator=g, dtype=torch.float64).expand(B, T, 1)
        u0 = torch.randn(B, 1, 1, 1, generator=g, dtype=torch.float64)
        return c, b, u0, torch.full((B, T - 1), 0.01, dtype=torch.float64)
    raise KeyError(name)


def test_sparse_rows_are_the_dense_rows():
    c, b, u0, h = random_problem(batch=(1,), T=6, E=2, D=2, R=3, S=2, K=2)
    A, beta = build_dense_system(c, b, u0, h)
    As, betas = _sparse_rows((c[0], b[0], u0[0], h[0]))
    # same rows up to order: compare the normal equations and right-hand sides
    M = torch.from_numpy((As.T @ As).toarray())
    assert rel_err(M, A[0].T @ A[0]) < 1e-14
    assert rel_err(torch.from_numpy(As.T @ betas), A[0].T @ beta[0]) < 1e-14


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize(
    "name,dtype,target",
    [
        ("kdv", torch.float32, 2e-5),
        ("lorenz", torch.float32, 2e-5),
        ("long", torch.float32, 2e-5),
        ("growing", torch.float64, 1e-9),
        # beyond the issue's targets (float64 only for this case): the torch QR refines to
        # 9e-6, the lane engine's two refinement steps to 1.3e-4
        ("growing", torch.float32, 2e-4),
    ],
)
def test_issue_accuracy_targets(name, dtype, target, backend):
    p = issue_case(name)
    ref = _augmented_solve(*p)
    u = ode_forward(*(x.to(dtype) for x in p), method="qr", backend=backend)
    assert u.dtype == dtype
    assert _median_error(u, ref) <= target


@pytest.mark.parametrize("method", ["sequential", "cyclic"])
def test_float32_normal_equations_no_longer_fail_silently(method):
    """The KdV-like float32 case: the normal equations lost every digit (median 0.18, no error
    raised) before the relative pivot threshold; now they raise or are accurate."""
    p = issue_case("kdv")
    ref = _augmented_solve(*p)
    q = [x.float() for x in p]
    try:
        u = ode_forward(*q, method=method, backend="torch")
    except NonPositivePivotError:
        u = ode_forward(*q, method=method, backend="torch", check_pivots=False)
        assert bool(torch.isnan(u).any())
    else:
        assert _median_error(u, ref) < 1e-3


def accuracy_table() -> None:
    """Print the accuracy table of docs/solver.md ("The orthogonal (QR) solve"): the median
    error of every method on the four cases, both dtypes. Not a test; run it with
    ``cd tests && python -c "import test_qr; test_qr.accuracy_table()"``."""
    torch.set_num_threads(1)
    methods = {
        "qr": dict(method="qr"),
        "LDL^T lanes": dict(method="sequential", backend="numba"),
        "LDL^T torch sequential": dict(method="sequential", backend="torch"),
        "LDL^T torch cyclic": dict(method="cyclic", backend="torch"),
    }
    print("| case | dtype | " + " | ".join(methods) + " |")
    print("|---" * (2 + len(methods)) + "|")
    for name in ("kdv", "lorenz", "long", "growing"):
        p = issue_case(name)
        ref = _augmented_solve(*p)
        for dtype in (torch.float64, torch.float32):
            cells = []
            for kw in methods.values():
                q = [x.to(dtype) for x in p]
                try:
                    cells.append(f"{_median_error(ode_forward(*q, **kw), ref):.1e}")
                except NonPositivePivotError as exc:
                    cells.append("raises (" + str(exc).split(" for ")[1].split(" batch")[0] + ")")
            print(f"| {name} | {str(dtype)[6:]} | " + " | ".join(cells) + " |", flush=True)


def time_table(reps: int = 3) -> None:
    """Print the time table of docs/solver.md ("The orthogonal (QR) solve"): forward +
    backward of QR and the LDL^T methods, medians of ``reps`` alternating repeats in one
    process, 1 thread (scaled-down SST and long shapes). Not a test; run it with
    ``cd tests && python -c "import test_qr; test_qr.time_table()"``."""
    import statistics
    import time

    from smnn.benchmark.catalog import Shape, make_inputs

    torch.set_num_threads(1)
    shapes = [
        Shape("Lorenz", "named", 1536, 50, 1, 3),
        Shape("KdV", "named", 8192, 10, 1, 5),
        Shape("SST, B/10", "named", 1296, 208, 1, 3),
        Shape("long, T/16", "named", 8, 4096, 1, 3),
        Shape("coupled", "named", 64, 1000, 3, 3),
    ]
    methods = {
        "qr": dict(method="qr"),
        "sequential": dict(method="sequential", backend="torch"),
        "cyclic": dict(method="cyclic", backend="torch"),
        "lanes": dict(method="sequential", backend="numba"),
    }
    print(
        "| shape | dtype | "
        + " | ".join(f"{m} (ms)" for m in methods)
        + " | qr / best torch LDL^T |"
    )
    print("|---" * (3 + len(methods)) + "|")
    for shape in shapes:
        for dtype in (torch.float64, torch.float32):
            x = make_inputs(shape, dtype, torch.device("cpu"))
            times: dict[str, list[float] | None] = {}
            for name, kw in methods.items():  # warm-up (compiles the lane kernels)
                try:
                    ode_forward(*x, **kw).square().sum().backward()
                    times[name] = []
                except NonPositivePivotError:
                    times[name] = None
            for _ in range(reps):
                for name, kw in methods.items():
                    if times[name] is not None:
                        start = time.perf_counter()
                        ode_forward(*x, **kw).square().sum().backward()
                        times[name].append(1e3 * (time.perf_counter() - start))
            med = {k: statistics.median(v) if v else math.nan for k, v in times.items()}
            best = min((v for v in (med["sequential"], med["cyclic"]) if v == v), default=math.nan)
            cells = ["raises" if math.isnan(v) else f"{v:.0f}" for v in med.values()]
            label = f"{shape.case} B={shape.B} T={shape.T} D={shape.D} R={shape.R}"
            ratio = f"{med['qr'] / best:.1f}" if best == best else "-"
            print(f"| {label} | {str(dtype)[6:]} | " + " | ".join(cells) + f" | {ratio} |")
