"""The Triton engine (smnn.solver.triton_engine): values, gradients, failures, dispatch.

Where no CUDA device is present the kernels run under Triton's interpreter on CPU tensors:
``TRITON_INTERPRET=1`` is set by conftest.py, before any test module imports triton (triton reads
it when a function, its own library's included, is defined). Where CUDA is present the variable
is left alone, the interpreter tests skip and the ``cuda``-marked tests run the compiled kernels
(``pytest -m cuda tests/test_triton.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from conftest import INPUT_LABELS, assert_matches_reference, loss_weight, random_problem, rel_err  # noqa: E402

from smnn import NonPositivePivotError, ode_forward  # noqa: E402
from smnn.solver.inputs import prepare_problem  # noqa: E402
from smnn.solver.reference import dense_reference  # noqa: E402
from smnn.solver.triton_engine import (  # noqa: E402
    interpreter_on,
    triton_available,
    triton_factorize,
    triton_ode_forward,
    triton_path_applies,
)

F64 = torch.float64
CPU = torch.device("cpu")

interp = pytest.mark.skipif(
    torch.cuda.is_available() or not interpreter_on(),
    reason="interpreter tests run where no CUDA device is present (TRITON_INTERPRET=1)",
)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(inputs, pk):
    return prepare_problem(*inputs, pk.get("T", 7), pk.get("S", 1), False)


def _weights(fk) -> tuple[float, float, float]:
    return (
        float(fk.get("weight_equation", 1.0)),
        float(fk.get("weight_init_var", 1.0)),
        float(fk.get("weight_smooth", 1.0)),
    )


def _triton(inputs, pk, fk, check_pivots=True, method="auto"):
    central = fk.get("enable_central_smoothness", False)
    problem = _problem(inputs, pk)
    return triton_ode_forward(problem, _weights(fk), True, check_pivots, central, method)


CENTRAL = dict(enable_central_smoothness=True, weight_smooth=0.7)
CASES = [
    ("N5", dict(batch=(5,), T=6), {}),
    ("multi_state", dict(batch=(3,), T=6, E=3, D=2, R=4, S=2, K=2), {}),
    # left-hand side shared over the last batch dim: 3 systems with P=2 right-hand sides each
    ("lhs_shared_P2", dict(batch=(3, 2), T=5, E=2, D=2, c_batch=(3, 1), h_batch=(3, 1)), {}),
    # one system for the whole batch (N=1, P=4), shared coefficient step axis
    ("lhs_shared_all", dict(batch=(4,), T=5, E=2, D=2, c_batch=(), h_batch=(), c_time=1), {}),
    # coefficients shared over the batch, steps per entry: gradient of c summed over systems
    ("coef_shared", dict(batch=(4,), T=5, c_batch=(), b_time=1, u_time=1, S=2), {}),
    (
        "weights",
        dict(batch=(3,), T=5, E=2, D=2, S=2, K=2),
        dict(weight_equation=1.7, weight_init_var=0.4, weight_smooth=2.3),
    ),
    ("central", dict(batch=(3,), T=6, E=2, D=2, S=2, K=2), CENTRAL),
    ("central_odd_T", dict(batch=(2,), T=7), CENTRAL),
    ("central_R5", dict(batch=(2,), T=5, E=2, D=2, R=5, S=2, K=4), CENTRAL),
    ("central_shared", dict(batch=(4,), T=5, c_batch=(), h_batch=()), CENTRAL),
    # R = 2: the central row's a = s^-1 (a negative power in the kernels)
    ("central_R2_shared_steps", dict(batch=(2,), T=4, R=2, h_time=1, b_time=1), CENTRAL),
]


@interp
@pytest.mark.parametrize("pk,fk", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_values_and_gradients_match_dense_reference(pk, fk):
    inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
    u = _triton(inputs, pk, fk)
    ref = dense_reference(*inputs, n_steps=pk.get("T", 7), n_init_var_steps=pk.get("S", 1), **fk)
    assert_matches_reference(u, ref, inputs, value_tol=1e-10, grad_tol=1e-9)


@interp
@pytest.mark.parametrize("central", [False, True])
def test_equals_cpu_lane_engine_to_rounding_both_dtypes(central):
    """float64 and float32 against the CPU lane engine (numba) on the same inputs, both with the
    normal equations (method='sequential'; the QR sweeps: tests/test_triton_qr.py): values and
    every gradient; float32 to float32 rounding of this well-conditioned problem."""
    pk = dict(batch=(6,), T=6, E=2, D=2, S=2, K=2)
    fk = CENTRAL if central else {}
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-4)):
        inputs = tuple(x.requires_grad_() for x in random_problem(**pk, dtype=dtype))
        u = _triton(inputs, pk, fk, method="sequential")
        lane = ode_forward(
            *inputs, n_steps=6, n_init_var_steps=2, backend="numba", method="sequential", **fk
        )
        assert u.dtype == dtype
        assert rel_err(u, lane) < tol
        weight = loss_weight(u.shape).to(dtype)
        grads = torch.autograd.grad((u * weight).sum(), inputs)
        lane_grads = torch.autograd.grad((lane * weight).sum(), inputs)
        for label, g, lg in zip(INPUT_LABELS, grads, lane_grads, strict=True):
            assert g.dtype == dtype
            assert rel_err(g, lg) < 20 * tol, (label, dtype)


@interp
def test_same_bits_on_rerun():
    pk = dict(batch=(3, 2), T=5, E=2, D=2, c_batch=(3, 1), h_batch=(3, 1))
    runs = []
    for _ in range(2):
        inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
        u = _triton(inputs, pk, CENTRAL)
        grads = torch.autograd.grad((u * loss_weight(u.shape)).sum(), inputs)
        runs.append((u.detach(), *grads))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@interp
@pytest.mark.parametrize("central", [False, True])
def test_factorize_then_solve_many(central):
    """One factorization, two right-hand sides; each equals the one-call forward, and the
    gradients reach rhs_equation and init_vars (against the dense reference)."""
    pk = dict(batch=(3,), T=6, E=2, D=2, S=2, K=2)
    fk = CENTRAL if central else {}
    c, b, u0, h = random_problem(**pk)
    lhs = triton_factorize(_problem((c, b, u0, h), pk), _weights(fk), True, central)
    assert lhs.factor.failed_at.tolist() == [0, 0, 0]
    for seed in (1, 2):
        _, b2, u02, _ = random_problem(**pk, seed=seed)
        b2.requires_grad_()
        u02.requires_grad_()
        u = lhs.solve(_problem((c, b2, u02, h), pk), check_values=True)
        ref = dense_reference(c, b2, u02, h, **fk)
        assert rel_err(u, ref) < 1e-10
        assert rel_err(u, _triton((c, b2, u02, h), pk, fk)) < 1e-13
        weight = loss_weight(u.shape)
        grads = torch.autograd.grad((u * weight).sum(), (b2, u02))
        ref_grads = torch.autograd.grad((ref * weight).sum(), (b2, u02))
        for g, rg in zip(grads, ref_grads, strict=True):
            assert rel_err(g, rg) < 1e-9


class _LaunchSpy:
    """A real kernel that records each launch (``kernel[grid](...)``) and then runs it."""

    def __init__(self, kernel, name: str, log: list[str]):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@interp
@pytest.mark.parametrize("central", [False, True])
def test_launches_per_call(monkeypatch, central):
    """ode_forward: one launch forward, one backward; factorize: one; each solve of it: one
    forward, one backward (and the same bits as ode_forward)."""
    from smnn.solver import triton_kernels

    log: list[str] = []
    for name in ("ode_sweep_kernel", "ode_backward_kernel", "block_cholesky_kernel"):
        spy = _LaunchSpy(getattr(triton_kernels, name), name, log)
        monkeypatch.setattr(triton_kernels, name, spy)
    pk = dict(batch=(3, 2), T=5, E=2, D=2, S=2, K=2, c_batch=(3, 1), h_batch=(3, 1))
    fk = CENTRAL if central else {}
    inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
    u = _triton(inputs, pk, fk)
    assert log == ["ode_sweep_kernel"]
    torch.autograd.grad((u * loss_weight(u.shape)).sum(), inputs)
    assert log == ["ode_sweep_kernel", "ode_backward_kernel"]
    log.clear()
    c, b, u0, h = (x.detach() for x in inputs)
    lhs = triton_factorize(_problem((c, b, u0, h), pk), _weights(fk), True, central)
    assert log == ["ode_sweep_kernel"]
    b.requires_grad_()
    u2 = lhs.solve(_problem((c, b, u0, h), pk), check_values=True)
    torch.autograd.grad(u2.sum(), b)
    assert log == ["ode_sweep_kernel"] * 2 + ["ode_backward_kernel"]
    assert torch.equal(u2, u.detach())
    # one system shared by 9 right-hand sides: the blocks path (columns in lanes)
    log.clear()
    pk = dict(batch=(9,), T=4, c_batch=(), h_batch=())
    shared = tuple(x.requires_grad_() for x in random_problem(**pk))
    u3 = _triton(shared, pk, fk)
    assert log == ["block_cholesky_kernel"]
    ref = dense_reference(*shared, n_steps=4, n_init_var_steps=1, **fk)
    assert rel_err(u3, ref) < 1e-10


@interp
def test_blocks_path_for_huge_calls_agrees():
    """The path of calls past 32-bit offsets (torch-assembled blocks, two launches) gives the
    fused kernels' values and gradients on a small problem."""
    from smnn.solver.triton_engine import _blocks_forward

    pk = dict(batch=(3,), T=5, E=2, D=2, S=2, K=2)
    for fk in ({}, CENTRAL):
        inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
        u = _triton(inputs, pk, fk)
        ub = _blocks_forward(_problem(inputs, pk), _weights(fk), bool(fk), True)
        assert rel_err(ub, u) < 1e-12
        weight = loss_weight(u.shape)
        grads = torch.autograd.grad((u * weight).sum(), inputs)
        block_grads = torch.autograd.grad((ub * weight).sum(), inputs)
        for label, g, bg in zip(INPUT_LABELS, grads, block_grads, strict=True):
            assert rel_err(g, bg) < 1e-10, label


@interp
def test_qr_sweep_equals_torch_qr_path():
    """The Triton QR sweep against the torch path's QR (method='qr'): plain rows with a
    left-hand side shared by two right-hand sides, central rows with odd T, float64 to
    rounding and float32 to float32 rounding (both refine their float32 solution once); a
    rank-deficient system raises the torch path's error (more in tests/test_triton_qr.py)."""
    from smnn.solver.triton_qr import triton_qr_ode_forward

    for pk, fk, dtype, tol in (
        (dict(batch=(3, 2), T=5, E=2, D=2, c_batch=(3, 1), h_batch=(3, 1)), {}, F64, 1e-12),
        (dict(batch=(2,), T=7, E=2, D=2, S=2, K=2), CENTRAL, F64, 1e-12),
        (dict(batch=(2,), T=5), {}, torch.float32, 1e-6),
    ):
        inputs = random_problem(**pk, dtype=dtype)
        T, S = pk["T"], pk.get("S", 1)
        u = triton_qr_ode_forward(_problem(inputs, pk), _weights(fk), bool(fk), True)
        ref = ode_forward(
            *inputs, n_steps=T, n_init_var_steps=S, backend="torch", method="qr", **fk
        )
        assert u.dtype == dtype and u.shape == ref.shape
        assert rel_err(u.double(), ref.double()) < tol, (pk, dtype)
        assert float(ref.abs().max()) > 0
    c, b, u0, h = _pivot_problem(3, {1: 2})
    with pytest.raises(NonPositivePivotError) as info:
        triton_qr_ode_forward(_problem((c, b, u0, h), dict(T=6)), (1.0, 1.0, 1.0), False, True)
    with pytest.raises(NonPositivePivotError) as torch_info:
        ode_forward(c, b, u0, h, backend="torch", method="qr")
    assert str(info.value) == str(torch_info.value)


def _pivot_problem(n: int, failing: dict[int, int], T: int = 6):
    """Entry i of ``failing`` has an exactly singular normal matrix from block ``failing[i]``
    on (steps of 1e-170 make h^2 underflow, and order 2 leaves the equations there)."""
    c, b, u0, h = random_problem(batch=(n,), T=T, E=2, D=1, R=3, K=1, seed=21)
    for i, step in failing.items():
        h[i] = 1e-170
        c[i, step:, :, 0, 2] = 0.0
    return c, b, u0, h


@interp
def test_non_positive_pivot_raises_like_torch_path():
    failing = {1: 2, 4: 0}
    c, b, u0, h = _pivot_problem(5, failing)
    pk = dict(T=6, S=1)
    with pytest.raises(NonPositivePivotError) as info:
        _triton((c, b, u0, h), pk, {})
    with pytest.raises(NonPositivePivotError) as torch_info:  # the normal equations, as above
        ode_forward(c, b, u0, h, backend="torch", method="sequential")
    assert str(info.value) == str(torch_info.value)
    u = _triton((c, b, u0, h), pk, {}, check_pivots=False)
    good = [0, 2, 3]
    assert torch.isnan(u[[1, 4]]).all()
    assert rel_err(u[good], dense_reference(c[good], b[good], u0[good], h[good])) < 1e-10


@interp
def test_bad_values_raise_the_usual_error():
    c, b, u0, h = random_problem(batch=(2,), T=5)
    h[1, 2] = -0.1
    with pytest.raises(ValueError, match="steps") as info:
        _triton((c, b, u0, h), dict(T=5), {})
    with pytest.raises(ValueError) as torch_info:
        ode_forward(c, b, u0, h, backend="torch")
    assert str(info.value) == str(torch_info.value)


def test_triton_available_and_dispatch_rule():
    ok, why = triton_available()
    assert ok == (torch.cuda.is_available() or interpreter_on()), why
    plain = (1.0, 1.0, 1.0)
    cuda_dev = torch.device("cuda")
    # CPU tensors never go to Triton by themselves; CUDA ones do when triton can run
    assert not triton_path_applies(CPU, "auto", "auto", plain, None)
    assert not triton_path_applies(CPU, "torch", "auto", plain, None)
    assert triton_path_applies(cuda_dev, "auto", "sequential", plain, None) == ok
    assert triton_path_applies(cuda_dev, "auto", "auto", plain, None, dtype=F64) == ok
    # float32 'auto' is the QR sweep, on Triton too; explicit 'sequential' and 'qr' run there
    assert triton_path_applies(cuda_dev, "auto", "auto", plain, None, dtype=torch.float32) == ok
    assert triton_path_applies(cuda_dev, "auto", "sequential", plain, None, torch.float32) == ok
    assert triton_path_applies(cuda_dev, "auto", "qr", plain, None, dtype=F64) == ok
    assert not triton_path_applies(cuda_dev, "auto", "cyclic", plain, None)
    assert not triton_path_applies(cuda_dev, "auto", "auto", None, None)
    assert not triton_path_applies(cuda_dev, "torch", "auto", plain, None)
    # backend='triton' runs or says why not
    for method, weights, graphs, match in (
        ("cyclic", plain, None, "method='cyclic'"),
        ("auto", None, None, "weights that need gradients"),
        ("auto", plain, object(), "cuda_graphs"),
    ):
        with pytest.raises(ValueError, match=match):
            triton_path_applies(cuda_dev, "triton", method, weights, graphs)
    if interpreter_on():
        assert triton_path_applies(CPU, "triton", "auto", plain, None)
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            triton_path_applies(CPU, "triton", "auto", plain, None)
    with pytest.raises(ValueError, match="on meta"):
        triton_path_applies(torch.device("meta"), "triton", "auto", plain, None)


LATE_INTERPRETER = """
import os
import torch
import triton
os.environ["TRITON_INTERPRET"] = "1"
from conftest import random_problem
from smnn import ode_forward
try:
    ode_forward(*random_problem(), backend="triton")
except ValueError as err:
    print("REFUSED", err)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter matters where no CUDA is")
def test_interpreter_switched_on_after_import_is_refused_with_the_remedy():
    """TRITON_INTERPRET set after ``import triton`` leaves triton's library compiled-only; the
    call must refuse with a message naming the remedy, not fail deep inside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", LATE_INTERPRETER], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout
    assert "set after triton was imported" in proc.stdout
    assert "before anything imports triton" in proc.stdout


COMPILE_FOR_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from smnn.solver import triton_kernels as K

target = GPUTarget("cuda", 90, 32)
cases = []
for dt, NB, NP, BLOCK in (("fp64", 3, 4, 32), ("fp32", 18, 32, 1)):
    ptr = "*" + dt
    blocks = {"NB": NB, "NP": NP, "BLOCK": BLOCK}
    cases.append((K.block_cholesky_kernel, [ptr] * 4 + ["*i64", "i32", "i32", "fp32"], blocks))
    cases.append((K.block_solve_kernel, [ptr] * 4 + ["i32", "i32", "i32"], blocks))
# the fused kernels: plain (R = 3, m = 3), central pairs (R = 3 in float32; R = 2, NB = 4)
for dt, R, PAIR, NP, BLOCK in (("fp64", 3, 1, 4, 32), ("fp32", 3, 2, 8, 8), ("fp64", 2, 2, 4, 32)):
    ptr = "*" + dt
    shape = dict(M=R, R=R, K=1, PAIR=PAIR, CENTRAL=PAIR == 2)
    for factorize in (True, False):
        flags = dict(shape, FACTORIZE=factorize, NP=NP, BLOCK=BLOCK)
        cases.append((K.ode_sweep_kernel, [ptr] * 8 + ["*i64"] + ["i32"] * 10 + ["fp32"], flags))
    flags = dict(shape, LHS_GRADS=True, NP=NP, MP=4, BLOCK=BLOCK)
    cases.append((K.ode_backward_kernel, [ptr] * 14 + ["i32"] * 9, flags))
# the QR sweep: m = 3 plain (n = 3), and central pairs in float32 (n = 6)
for dt, NB, RP, CP, NP, BLOCK in (("fp64", 3, 16, 8, 4, 4), ("fp32", 6, 32, 16, 8, 1)):
    flags = dict(NB=NB, RP=RP, CP=CP, NP=NP, BLOCK=BLOCK)
    args = ["*" + dt] * 8 + ["*i64"] + ["i32"] * 4 + ["fp32"]
    cases.append((K.qr_sweep_kernel, args, flags))
    flags = dict(NB=NB, NP=NP, BLOCK=BLOCK)
    cases.append((K.qr_normal_solve_kernel, ["*" + dt] * 4 + ["i32"] * 3, flags))
for kernel, args, constexprs in cases:
    names = kernel.arg_names
    signature = dict(zip(names, args + ["constexpr"] * len(constexprs)))
    assert len(signature) == len(names), kernel
    try:
        src = ASTSource(kernel, signature, constexprs=constexprs)
    except TypeError as err:  # another triton's compiler API
        print("API", err)
        sys.exit(3)
    compiled = triton.compile(src, target=target)
    assert "ld.global" in compiled.asm["ptx"], kernel
print("compiled")
"""


def test_kernels_compile_for_a_gpu_without_one():
    """The compiler (not the interpreter) accepts every kernel (the blocks path's two, the fused
    forward in both modes, the fused backward, the QR sweep and its normal solve, plain and
    central): PTX for
    sm_90 and ptxas,
    in a process without TRITON_INTERPRET; skipped where triton's compiler API differs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True
    )
    if proc.returncode == 3:
        pytest.skip(f"this triton's compiler API differs: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout


# ------------------------------------------------------------------ on a GPU


@cuda
@needs_cuda
@pytest.mark.parametrize("method", ["sequential", "qr"])
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_and_repeats_bits(central, dtype, method):
    """Compiled kernels on the GPU (the normal equations and the QR sweep) against the torch
    path on CPU (float64 reference): values and gradients, then the same bits on a rerun."""
    pk = dict(batch=(300,), T=40, E=3, D=3, R=3, S=1, K=2)
    fk = CENTRAL if central else {}
    cpu_inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
    ref = ode_forward(*cpu_inputs, backend="torch", **fk)
    weight = loss_weight(ref.shape)
    ref_grads = torch.autograd.grad((ref * weight).sum(), cpu_inputs)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    runs = []
    for _ in range(2):
        inputs = tuple(x.detach().to("cuda", dtype).requires_grad_() for x in cpu_inputs)
        u = _triton(inputs, pk, fk, method=method)
        grads = torch.autograd.grad((u * weight.to("cuda", dtype)).sum(), inputs)
        runs.append((u.detach(), *grads))
    u, *grads = runs[0]
    assert rel_err(u.cpu().double(), ref) < tol
    for label, g, rg in zip(INPUT_LABELS, grads, ref_grads, strict=True):
        assert rel_err(g.cpu().double(), rg) < 10 * tol, label
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@cuda
@needs_cuda
@pytest.mark.parametrize("method", ["sequential", "qr"])
def test_cuda_pivot_failure_raises(method):
    c, b, u0, h = (x.cuda() for x in _pivot_problem(5, {1: 2}))
    with pytest.raises(NonPositivePivotError, match=r"batch index \(1,\) at block 2"):
        _triton((c, b, u0, h), dict(T=6, S=1), {}, method=method)


# ------------------------------------------------------------------ through the public API


@interp
def test_ode_forward_factorize_and_frozen_cache_with_backend_triton():
    """backend='triton' runs the engine through the public entry points: the same bits as the
    engine called directly, factorize(...).solve and the frozen cache included."""
    from smnn import factorize
    from smnn.solver.frozen import FROZEN_LHS_CACHE
    from smnn.solver.triton_engine import TritonFactor

    pk = dict(batch=(3,), T=6, E=2, D=2, S=2, K=2)
    c, b, u0, h = random_problem(**pk)
    for fk in ({}, CENTRAL):
        central = bool(fk)
        u = ode_forward(c, b, u0, h, backend="triton", **fk)
        assert torch.equal(u, _triton((c, b, u0, h), pk, fk))
        fac = factorize(c, h, n_init_orders=2, n_init_var_steps=2, backend="triton", **fk)
        assert isinstance(fac.factor, TritonFactor)
        assert torch.equal(fac.solve(b, u0), u)
        FROZEN_LHS_CACHE.clear()
        frozen = ode_forward(c, b, u0, h, backend="triton", frozen_lhs_cache_version=3, **fk)
        assert torch.equal(frozen, u), central
    FROZEN_LHS_CACHE.clear()


@interp
def test_backend_triton_says_why_it_cannot_run():
    c, b, u0, h = random_problem(batch=(2,), T=5)
    with pytest.raises(ValueError, match="method='cyclic' is not implemented on Triton"):
        ode_forward(c, b, u0, h, backend="triton", method="cyclic")
    w = torch.tensor(1.0, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="weights that need gradients"):
        ode_forward(c, b, u0, h, backend="triton", weight_smooth=w)


def test_import_smnn_does_not_import_triton():
    code = "import sys, smnn; smnn.ode_forward; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
