"""The lane engine (smnn.solver.fused, lane_kernels, hugepages) against independent oracles.

The lane engine serves ``ode_forward`` and ``factorize`` on CPU with numba, method
'auto'/'sequential', plain weights and no CUDA graphs, with or without central smoothness. Its
kernels work on groups of ``LANES`` lanes, either systems (the last group padded by repeating
the last system) or, for few systems with many right-hand sides, columns of one system (the last
group padded by repeating the last column); sizes around multiples of ``LANES`` get their own
cases. The oracle is ``dense_reference`` (values and autograd gradients); error messages are
compared with the torch path.
"""

from __future__ import annotations

import gc
import math
import mmap
import os
import re
import weakref

import pytest
import torch
from conftest import INPUT_LABELS, assert_matches_reference, loss_weight, random_problem, rel_err

from smnn import NonPositivePivotError, ode_forward
from smnn.solver import hugepages
from smnn.solver.banded import resolve_backend
from smnn.solver.fused import (
    LaneFactor,
    _FusedLaneSolve,
    _Outcome,
    _Sizes,
    fused_ode_forward,
    fused_path_applies,
    lanes_are_columns,
)
from smnn.solver.inputs import prepare_problem
from smnn.solver.reference import build_dense_system, dense_reference

F64 = torch.float64
CORE_DIMS = (4, 2, 3, 1)  # non-batch dims of each input


def _uses_fused_kernel(u: torch.Tensor) -> bool:
    """Whether the autograd graph of ``u`` contains the fused solve's backward node."""
    stack, seen = [u.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node) is _FusedLaneSolve._backward_cls:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _solve_kwargs(pk: dict) -> dict:
    """T and S passed explicitly (needed when steps / init_vars have a size-1 step axis)."""
    return {"n_steps": pk.get("T", 7), "n_init_var_steps": pk.get("S", 1)}


# ------------------------------------------------------------------ 1. values and gradients

# (name, random_problem kwargs, extra ode_forward kwargs)
REFERENCE_CASES = [
    *[(f"N{n}", dict(batch=(n,), T=6, seed=n), {}) for n in (1, 7, 8, 9, 17)],
    ("multi_state", dict(batch=(9,), T=7, E=3, D=2, R=4, S=2, K=2), {}),
    ("shared_coef_time", dict(batch=(9,), T=6, E=2, D=2, K=2, c_time=1), {}),
    ("shared_step", dict(batch=(9,), T=6, h_time=1), {}),
    ("shared_rhs_time", dict(batch=(9,), T=6, E=2, b_time=1), {}),
    ("init_one_step_for_S3", dict(batch=(9,), T=6, D=2, S=3, K=2, u_time=1), {}),
    ("init_S3", dict(batch=(9,), T=6, S=3, K=2), {}),
    # left-hand side shared over the last batch dim: 9 systems with P=3 right-hand sides each
    ("lhs_shared_P3", dict(batch=(9, 3), T=6, E=2, D=2, c_batch=(9, 1), h_batch=(9, 1)), {}),
    # left-hand side shared over a leading batch dim (N=3 systems, P=4), init shared too
    (
        "lhs_shared_leading",
        dict(batch=(4, 3), T=6, c_batch=(3,), h_batch=(3,), u_batch=(4, 1)),
        {},
    ),
    # one system for the whole batch: N=1, P=5
    ("lhs_shared_all", dict(batch=(5,), T=6, E=2, D=2, c_batch=(), h_batch=()), {}),
    # coefficients shared over the batch, steps per entry: N=9, gradient of c summed
    ("coef_shared_batch", dict(batch=(9,), T=6, c_batch=()), {}),
    (
        "weights",
        dict(batch=(9,), T=6, E=2, D=2, S=2, K=2),
        dict(weight_equation=1.7, weight_init_var=0.4, weight_smooth=2.3),
    ),
    (
        "weights_tensor_no_grad",
        dict(batch=(3,), T=5),
        dict(
            weight_equation=torch.tensor(0.6, dtype=F64),
            weight_init_var=3,
            weight_smooth=torch.tensor(1.4, dtype=F64),
        ),
    ),
    # lanes as columns (few shared systems, many right-hand sides), padded last column group
    ("columns_N1_P20", dict(batch=(20,), T=7, E=2, D=2, K=2, c_batch=(), h_batch=()), {}),
    ("columns_N1_P8", dict(batch=(8,), T=6, c_batch=(), h_batch=(), c_time=1, h_time=1), {}),
    (
        "columns_N3_P11",
        dict(batch=(11, 3), T=6, S=2, c_batch=(1, 3), h_batch=(1, 3), b_time=1, u_time=1),
        {},
    ),
    # central smoothness (block pentadiagonal): systems and columns, odd and even T, R = 2..5
    *[
        (f"central_{name}", pk, dict(enable_central_smoothness=True, weight_smooth=0.7))
        for name, pk in (
            ("N9", dict(batch=(9,), T=8, E=2, D=2, S=2, K=2)),
            ("odd_T", dict(batch=(3,), T=9)),
            ("T3", dict(batch=(2,), T=3)),
            ("T2", dict(batch=(2,), T=2)),
            ("R2", dict(batch=(3,), T=7, R=2)),
            ("R5", dict(batch=(2,), T=11, E=3, D=2, R=5, S=2, K=4)),
            ("shared_step", dict(batch=(9,), T=7, h_time=1)),
            ("columns", dict(batch=(20,), T=7, E=2, D=2, K=2, c_batch=(), h_batch=())),
            ("columns_N3", dict(batch=(11, 3), T=6, c_batch=(1, 3), h_batch=(1, 3))),
        )
    ],
]


@pytest.mark.parametrize(
    "pk,fk", [c[1:] for c in REFERENCE_CASES], ids=[c[0] for c in REFERENCE_CASES]
)
def test_values_and_gradients_match_dense_reference(pk, fk):
    inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
    kw = {**_solve_kwargs(pk), **fk}
    u = ode_forward(*inputs, **kw)
    assert _uses_fused_kernel(u), "default CPU call did not take the fused path"
    ref = dense_reference(*inputs, **kw)
    assert_matches_reference(u, ref, inputs, value_tol=1e-10, grad_tol=1e-10)


# ------------------------------------------------------------------ 2. dispatch


def test_fused_path_applies_only_to_default_cpu_options():
    cpu = torch.device("cpu")
    numba = resolve_backend("auto", cpu)
    assert numba == "numba"
    plain = (1.0, 1.0, 1.0)
    assert fused_path_applies(cpu, numba, "auto", plain, None)
    assert fused_path_applies(cpu, numba, "sequential", plain, None)
    assert not fused_path_applies(cpu, numba, "auto", None, None)  # weights need grad
    assert not fused_path_applies(cpu, numba, "cyclic", plain, None)
    assert not fused_path_applies(cpu, "torch", "auto", plain, None)
    assert not fused_path_applies(cpu, numba, "auto", plain, object())  # cuda graphs
    assert not fused_path_applies(torch.device("meta"), numba, "auto", plain, None)


def test_lane_layout_choice():
    """Lanes are columns only for few systems with many right-hand sides."""
    assert not lanes_are_columns(1536, 1)  # per-sample inputs (Lorenz, KdV)
    assert not lanes_are_columns(64, 1)
    assert not lanes_are_columns(9, 3)
    assert lanes_are_columns(1, 1536)  # one shared system (the Lorenz training pattern)
    assert lanes_are_columns(3, 512)  # the authors' Lorenz notebook: batch (1, 3) shared
    assert lanes_are_columns(1, 9)
    assert not lanes_are_columns(1536, 8)


def test_ode_forward_dispatch_and_agreement_with_torch_backend():
    """Which calls run the fused kernel (seen in the autograd graph), and that the default call
    agrees with backend='torch' (values and gradients) to 1e-10."""
    inputs = tuple(
        x.requires_grad_() for x in random_problem(batch=(9,), T=8, E=2, D=2, S=2, K=2, seed=4)
    )
    kw = dict(n_steps=8, n_init_var_steps=2)
    w_grad = torch.tensor(1.2, dtype=F64, requires_grad=True)
    fused_calls = {
        "default": {},
        "sequential": dict(method="sequential"),
        "numba": dict(backend="numba"),
        "weights": dict(weight_smooth=0.7, weight_equation=torch.tensor(1.1, dtype=F64)),
        "central": dict(enable_central_smoothness=True),
    }
    other_calls = {
        "weight_requires_grad": dict(weight_smooth=w_grad),
        "cyclic": dict(method="cyclic"),
        "torch": dict(backend="torch"),
    }
    for name, extra in fused_calls.items():
        assert _uses_fused_kernel(ode_forward(*inputs, **kw, **extra)), name
    for name, extra in other_calls.items():
        u = ode_forward(*inputs, **kw, **extra)
        assert u.requires_grad and not _uses_fused_kernel(u), name

    u = ode_forward(*inputs, **kw)
    u_torch = ode_forward(*inputs, **kw, backend="torch")
    assert rel_err(u, u_torch) < 1e-10
    weight = loss_weight(u.shape)
    grads = torch.autograd.grad((u * weight).sum(), inputs)
    grads_torch = torch.autograd.grad((u_torch * weight).sum(), inputs)
    for label, g, gt in zip(INPUT_LABELS, grads, grads_torch, strict=True):
        assert rel_err(g, gt) < 1e-10, label


# ------------------------------------------------------------------ 3. gradcheck


@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize(
    "pk",
    [
        dict(batch=(2,), T=4, E=2, D=2, R=3, S=1, K=2, seed=3),
        # padded last group, P=2 folded columns, shared coefficient and step axes
        dict(batch=(9, 2), T=3, c_batch=(9, 1), h_batch=(9, 1), c_time=1, h_time=1, seed=5),
        # lanes as columns: one shared system, 10 right-hand sides
        dict(batch=(10,), T=4, E=2, D=2, K=2, c_batch=(), h_batch=(), seed=6),
    ],
    ids=["multi_state", "padded_folded_shared", "columns"],
)
def test_gradcheck(pk, central):
    inputs = [x.requires_grad_() for x in random_problem(**pk)]
    kw = {**_solve_kwargs(pk), "enable_central_smoothness": central}

    def f(c, b, u0, h):
        return ode_forward(c, b, u0, h, **kw)

    assert _uses_fused_kernel(f(*inputs))
    assert torch.autograd.gradcheck(f, inputs)


# ------------------------------------------------------------------ 4. non-positive pivots


def _pivot_problem(n: int, failing: dict[int, int], T: int = 7):
    """N systems (E=2 equations, D=1, R=3, K=1); entry i in ``failing`` has an exactly singular
    normal matrix whose first zero pivot is at block ``failing[i]``.

    Such an entry gets steps of 1e-170, so h^2 underflows to 0 and order 2 enters no Taylor row;
    its coefficients on order 2 are zero from step ``failing[i]`` on, so that step's order 2 has
    an all-zero row and column in M (earlier steps are constrained by the two equations).
    """
    c, b, u0, h = random_problem(batch=(n,), T=T, E=2, D=1, R=3, K=1, seed=21)
    for i, step in failing.items():
        h[i] = 1e-170
        c[i, step:, :, 0, 2] = 0.0
    return c, b, u0, h


def _named_failures(message: str) -> dict[int, int]:
    return {
        int(i): int(t) for i, t in re.findall(r"batch index \((\d+),\) at block (\d+)", message)
    }


@pytest.mark.parametrize(
    "n,failing",
    [(9, {3: 2, 8: 4}), (9, {7: 1}), (8, {0: 0}), (17, {16: 5})],
    ids=["first_and_padded_group", "last_lane_of_full_group", "step0", "padded_group_17"],
)
@pytest.mark.parametrize("central", [False, True])
def test_non_positive_pivot(n, failing, central):
    """The failing entries and steps are named (with central rows too: order 2 enters neither
    the central rows, b^2 = s^2 underflows as h^2 does, nor any other row)."""
    c, b, u0, h = _pivot_problem(n, failing)
    # the normal equations named ('auto' would retry the failed systems by QR, whose rank
    # check names the same entries: test_auto_retries_a_failed_pivot_by_qr)
    kw = dict(enable_central_smoothness=central)
    with pytest.raises(NonPositivePivotError) as fused_info:
        ode_forward(c, b, u0, h, method="sequential", **kw)
    message = str(fused_info.value)
    assert _named_failures(message) == failing, message
    assert f"{len(failing)} of {n} batch entries" in message
    if not central:  # the torch path pairs the steps of central rows (see below)
        with pytest.raises(NonPositivePivotError) as torch_info:
            ode_forward(c, b, u0, h, backend="torch", method="sequential")
        assert _named_failures(str(torch_info.value)) == failing
        assert message == str(torch_info.value)

    u = ode_forward(c, b, u0, h, check_pivots=False, method="sequential", **kw)
    good = [i for i in range(n) if i not in failing]
    for i in failing:
        assert torch.isnan(u[i]).all(), i
    assert torch.isfinite(u[good]).all()
    ref = dense_reference(c[good], b[good], u0[good], h[good], **kw)
    assert rel_err(u[good], ref) < 1e-10


# ------------------------------------------------------------------ 5. bad input values


def _bad_value_cases():
    """(name, problem kwargs, input index, index tuple into that input, bad value)."""
    base = dict(batch=(9,), T=6, E=2, D=2, S=2, K=2)
    folded = dict(batch=(9, 2), T=6, c_batch=(9, 1), h_batch=(9, 1))
    shared = dict(batch=(9,), T=6, c_batch=(), h_batch=(), c_time=1, h_time=1)
    cases = []
    for where, n in (("group0", 3), ("padded", 8)):
        cases += [
            (f"nan_coef_{where}", base, 0, (n, 2, 1, 0, 1), math.nan),
            (f"inf_coef_{where}", base, 0, (n, 5, 0, 1, 2), math.inf),
            (f"nan_rhs_{where}", base, 1, (n, 4, 1), math.nan),
            (f"neginf_rhs_{where}", base, 1, (n, 0, 0), -math.inf),
            (f"nan_init_{where}", base, 2, (n, 1, 1, 0), math.nan),
            (f"inf_init_{where}", base, 2, (n, 0, 0, 1), math.inf),
            (f"zero_step_{where}", base, 3, (n, 2), 0.0),
            (f"negative_step_{where}", base, 3, (n, 4), -0.1),
            (f"nan_step_{where}", base, 3, (n, 0), math.nan),
            (f"inf_step_{where}", base, 3, (n, 3), math.inf),
        ]
    cases += [
        ("nan_rhs_padded_column1", folded, 1, (8, 1, 3, 0), math.nan),
        ("nan_init_padded_column1", folded, 2, (8, 1, 0, 0, 0), math.nan),
        ("inf_coef_shared", shared, 0, (0, 0, 0, 2), math.inf),
        ("negative_step_shared", shared, 3, (0,), -0.05),
    ]
    return cases


BAD_VALUE_CASES = _bad_value_cases()


def _bad_inputs(pk, which, index, value):
    inputs = list(random_problem(**pk))
    inputs[which] = inputs[which].clone()
    inputs[which][index] = value
    return inputs


@pytest.mark.parametrize(
    "pk,which,index,value", [c[1:] for c in BAD_VALUE_CASES], ids=[c[0] for c in BAD_VALUE_CASES]
)
def test_bad_values_raise_same_error_as_torch_path(pk, which, index, value):
    inputs = _bad_inputs(pk, which, index, value)
    kw = _solve_kwargs(pk)
    with pytest.raises(ValueError) as torch_info:
        ode_forward(*inputs, **kw, backend="torch")
    expected = str(torch_info.value)
    assert INPUT_LABELS[which] in expected  # the torch path names the bad input
    with pytest.raises(ValueError) as default_info:
        ode_forward(*inputs, **kw)
    assert str(default_info.value) == expected
    assert not isinstance(default_info.value, NonPositivePivotError)
    # the fused function itself finds it (values not checked before the kernel runs)
    problem = prepare_problem(*inputs, **kw, check_values=False)
    with pytest.raises(ValueError) as fused_info:
        fused_ode_forward(problem, (1.0, 1.0, 1.0), check_values=True, check_pivots=False)
    assert str(fused_info.value) == expected


@pytest.mark.parametrize(
    "pk,which,index,value", [c[1:] for c in BAD_VALUE_CASES], ids=[c[0] for c in BAD_VALUE_CASES]
)
def test_bad_values_pass_unchecked_and_stay_in_their_entry(pk, which, index, value):
    """check_inputs=False: no error; batch entries without the bad value equal the reference."""
    inputs = _bad_inputs(pk, which, index, value)
    kw = _solve_kwargs(pk)
    u = ode_forward(*inputs, **kw, check_inputs=False, check_pivots=False)
    problem = prepare_problem(*inputs, **kw, check_values=False)
    assert tuple(u.shape) == (*problem.batch_shape, problem.n_steps, problem.n_dims, 3)
    tainted = torch.zeros(problem.batch_shape, dtype=torch.bool)
    n_batch = inputs[which].dim() - CORE_DIMS[which]
    tainted[index[:n_batch]] = True  # a shared input (no batch dims) taints every entry
    if bool(tainted.all()):
        return  # nothing left to compare (the call not raising is the check)
    clean = [
        x.expand(*problem.batch_shape, *x.shape[x.dim() - core :])[~tainted]
        for x, core in zip(inputs, CORE_DIMS, strict=True)
    ]
    ref = dense_reference(*clean, **kw)
    assert torch.isfinite(u[~tainted]).all()
    assert rel_err(u[~tainted], ref) < 1e-10


# ------------------------------------------------------------------ 6. float32


def test_float32_error_against_float64():
    """float32 on the fused path against the float64 fused result (itself within 1e-10 of the
    dense reference, tested above). Measured on this problem: 5.2e-6 relative; the bound is
    ~10x that. Values only: the float32 backward kernel would add ~20 s of numba compilation.
    (Multi-state problems with E=D=2 reach ~4e-3 in float32 on every path, fused or torch,
    sequential or cyclic: conditioning, not the kernel.)"""
    p64 = random_problem(batch=(9,), T=50, seed=5)
    u64 = ode_forward(*p64)
    # method="sequential": "auto" picks the orthogonal (QR) solve for float32
    u32 = ode_forward(*(x.float() for x in p64), method="sequential")
    assert u32.dtype == torch.float32 and u32.shape == u64.shape
    err = rel_err(u32.double(), u64)
    print(f"float32 relative error of the fused path: {err:.2e}")
    assert err < 5e-5
    # the float32 problem went through the fused kernel (seen in its autograd graph)
    p32 = [x.float().requires_grad_() for x in p64]
    assert _uses_fused_kernel(ode_forward(*p32, method="sequential"))


# ------------------------------------------------------------------ 7. huge pages


def _mapping_flags(address: int) -> list[str] | None:
    """VmFlags of the memory mapping holding ``address`` (Linux), None if not found."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


HUGE = hugepages.HUGE_PAGE_MIN_BYTES


@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 4), F64), ((HUGE // 8 - 1,), F64), ((2, HUGE // 8 - 1), torch.float32)],
    ids=["tiny", "one_below_f64", "one_below_f32"],
)
def test_hugepages_below_threshold_is_ordinary_tensor(shape, dtype):
    x = hugepages.empty(shape, dtype)
    assert x.shape == shape and x.dtype == dtype and x.device.type == "cpu"
    assert x.nbytes < HUGE
    assert x.untyped_storage().resizable()  # torch's own allocator, not an external buffer


@pytest.mark.parametrize(
    "shape,dtype",
    [((HUGE // 8,), F64), ((HUGE // 4,), torch.float32), ((3, 5, HUGE // 8 // 15 + 7), F64)],
    ids=["exact_f64", "exact_f32", "above_3d"],
)
def test_hugepages_at_or_above_threshold(shape, dtype):
    x = hugepages.empty(shape, dtype)
    assert x.shape == shape and x.dtype == dtype and x.device.type == "cpu"
    assert x.nbytes >= HUGE and x.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert not x.untyped_storage().resizable()  # backed by the memory map
        flags = _mapping_flags(x.data_ptr())
        if flags is not None and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
            assert "hg" in flags, flags  # madvise(MADV_HUGEPAGE) was applied
    # write/read round trip, through a flat view and through torch ops
    values = torch.arange(x.numel(), dtype=F64).remainder_(9973).to(dtype)
    x.view(-1).copy_(values)
    assert torch.equal(x.view(-1), values)
    x[(0,) * x.dim()] = -1.5
    assert float(x.view(-1)[0]) == -1.5
    y = x * 2 + 1
    assert y.shape == shape and float(y.view(-1)[1]) == 3.0
    assert float(x.view(-1)[-1]) == float(values[-1])
    assert x.numpy().shape == shape  # the solver hands these to numba as numpy arrays


def test_hugepages_memory_is_released():
    shape = (HUGE // 8 + 512,)
    rss_before = _rss_bytes()
    for _ in range(10):
        x = hugepages.empty(shape, F64)
        x.fill_(1.0)  # touch every page
        assert float(x[:: 4096 // 8].sum()) == math.ceil(shape[0] / 512)
        ref = weakref.ref(x)
        del x
        gc.collect()
        assert ref() is None
    rss_after = _rss_bytes()
    if rss_before is not None and rss_after is not None:
        # 10 leaked arrays would be 10 * 32 MiB; allow two arrays of slack
        assert rss_after - rss_before < 2 * HUGE + 8 * 2**20, (rss_before, rss_after)


# ------------------------------------------------------------------ 8. LaneFactor.solve


def _lane_factor(c, b, u0, h, weights):
    """Run the fused forward on canonical (N, ...) inputs and return (x, factor)."""
    N, T, E, D, R = c.shape
    S, K = u0.shape[1], u0.shape[3]
    coef = c.reshape(N, T, E, D * R)
    rhs_eq = b.unsqueeze(-1)
    init = u0.reshape(N, S, D * K, 1)
    outcome = _Outcome()
    sizes = _Sizes(T, D, R, S, K, weights)
    x = _FusedLaneSolve.apply(coef, h, rhs_eq, init, sizes, outcome)
    return x, outcome.factor


def test_lane_factor_solve_matches_dense_normal_equations():
    N, T, D, R = 9, 6, 2, 3
    weights = (1.3, 0.7, 1.9)
    c, b, u0, h = random_problem(batch=(N,), T=T, E=2, D=D, R=R, S=2, K=2, seed=13)
    x, factor = _lane_factor(c, b, u0, h, weights)
    m = D * R
    assert isinstance(factor, LaneFactor)
    assert (factor.n_systems, factor.n_steps, factor.block_size) == (N, T, m)
    assert factor.chol.shape[0] == -(-N // factor.width)  # groups of the chosen lane width
    assert factor.width == 8  # few systems: the narrow kernels (tests/test_lane_widths.py)
    assert not bool(factor.failed().any())

    A, beta = build_dense_system(
        c,
        b,
        u0,
        h,
        weight_equation=weights[0],
        weight_init_var=weights[1],
        weight_smooth=weights[2],
    )
    M = A.mT @ A  # (N, T*m, T*m)
    # the forward solution itself solves M x = A^T beta
    x_dense = torch.linalg.solve(M, A.mT @ beta.unsqueeze(-1))
    assert rel_err(x.reshape(N, T * m, 1), x_dense) < 1e-10
    g = torch.Generator().manual_seed(17)
    for P in (1, 3):
        rhs = torch.randn(N, T, m, P, generator=g, dtype=F64)
        out = factor.solve(rhs)
        assert out.shape == (N, T, m, P) and out.dtype == F64
        expected = torch.linalg.solve(M, rhs.reshape(N, T * m, P)).reshape(N, T, m, P)
        assert rel_err(out, expected) < 1e-10, P
        # each system's solve uses its own factor (padding lanes do not leak across entries)
        assert rel_err(out[-1], expected[-1]) < 1e-10

    expected_shape = re.escape(f"(N={N}, T={T}, m={m}, P)")
    for bad in [(N, T, m), (N + 1, T, m, 1), (N, T - 1, m, 1), (N, T, m + 1, 2)]:
        with pytest.raises(ValueError, match=expected_shape) as info:
            factor.solve(torch.zeros(bad, dtype=F64))
        assert str(tuple(bad)) in str(info.value)


@pytest.mark.parametrize("central", [False, True])
def test_lane_factor_solve_central_and_columns_match_dense(central):
    """A factor made for shared inputs (lanes as columns when many right-hand sides come)
    and with central rows solves M x = rhs like a dense solve of the normal equations."""
    from smnn import factorize

    N, T, D, R = 3, 7, 2, 3
    kw = dict(weight_smooth=1.3, enable_central_smoothness=central)
    c, b, u0, h = random_problem(batch=(N,), T=T, E=2, D=D, R=R, S=2, K=2, seed=14)
    factor = factorize(c, h, n_init_orders=2, n_init_var_steps=2, **kw).factor
    assert isinstance(factor, LaneFactor) and factor.central == central
    A, _ = build_dense_system(c, b, u0, h, **kw)
    M = A.mT @ A
    m = D * R
    for P in (1, 4, 29):  # 29 columns: lanes as columns, last group padded
        rhs = torch.randn(N, T, m, P, generator=torch.Generator().manual_seed(P), dtype=F64)
        expected = torch.linalg.solve(M, rhs.reshape(N, T * m, P)).reshape(N, T, m, P)
        assert rel_err(factor.solve(rhs), expected) < 1e-10, (P, lanes_are_columns(N, P))


@pytest.mark.parametrize("central", [False, True])
def test_shared_inputs_equal_their_copies(central):
    """Shared coefficients and steps (lanes as columns) give what the same inputs copied per
    sample give (lanes as systems): the same values to the bit, gradients to rounding."""
    pk = dict(batch=(40,), T=9, E=2, D=2, K=2, c_batch=(1,), h_batch=(1,), seed=9)
    c, b, u0, h = random_problem(**pk)
    assert lanes_are_columns(1, 40) and not lanes_are_columns(40, 1)
    kw = dict(enable_central_smoothness=central)
    shared = [x.clone().requires_grad_() for x in (c, b, u0, h)]
    copies = [c.expand(40, *c.shape[1:]).clone(), b, u0, h.expand(40, *h.shape[1:]).clone()]
    copies = [x.clone().requires_grad_() for x in copies]
    u_shared = ode_forward(*shared, **kw)
    u_copies = ode_forward(*copies, **kw)
    assert torch.equal(u_shared, u_copies)
    weight = loss_weight(u_shared.shape)
    g_shared = torch.autograd.grad((u_shared * weight).sum(), shared)
    g_copies = torch.autograd.grad((u_copies * weight).sum(), copies)
    g_copies = [
        g_copies[0].sum(0, keepdim=True),
        g_copies[1],
        g_copies[2],
        g_copies[3].sum(0, keepdim=True),
    ]
    for label, a, r in zip(INPUT_LABELS, g_shared, g_copies, strict=True):
        assert rel_err(a, r) < 1e-12, label


@pytest.mark.parametrize("central", [False, True])
def test_non_positive_pivot_with_lanes_as_columns(central):
    """A singular shared system fails for every batch entry; the message names it once (the
    left-hand side's batch shape), like the torch path. (With central rows the torch path
    factorizes pairs of steps and counts blocks of two steps: block 1 holds steps 2 and 3.)"""
    c, b, u0, h = _pivot_problem(1, {0: 3})
    b = b.expand(20, *b.shape[1:])
    kw = dict(enable_central_smoothness=central, method="sequential")  # the normal equations
    with pytest.raises(NonPositivePivotError) as info:
        ode_forward(c, b, u0, h, **kw)
    assert "1 of 1 batch entries" in str(info.value)
    assert "batch index (0,) at block 3" in str(info.value)
    with pytest.raises(NonPositivePivotError) as torch_info:
        ode_forward(c, b, u0, h, backend="torch", **kw)
    if central:
        assert "batch index (0,) at block 1" in str(torch_info.value)
    else:
        assert str(info.value) == str(torch_info.value)
