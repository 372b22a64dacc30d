"""The orthogonal (QR) solve on Triton (smnn.solver.triton_qr) under Triton's interpreter: values
and every gradient against the dense reference, the torch path's QR and the CPU lane QR engine;
float32 refinement; factorize/solve; rank deficiency; launches per call; dispatch
(docs/gpu.md)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import INPUT_LABELS, assert_matches_reference, loss_weight, random_problem, rel_err  # noqa: E402

from smnn import NonPositivePivotError, factorize, ode_forward  # noqa: E402
from smnn.solver.inputs import prepare_problem  # noqa: E402
from smnn.solver.reference import dense_reference  # noqa: E402
from smnn.solver.triton_engine import interpreter_on, triton_path_applies  # noqa: E402

F64, F32 = torch.float64, torch.float32
CENTRAL = dict(enable_central_smoothness=True, weight_smooth=0.7)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not interpreter_on(),
    reason="interpreter tests run where no CUDA device is present (TRITON_INTERPRET=1)",
)


def _kw(pk, fk):
    return dict(n_steps=pk.get("T", 7), n_init_var_steps=pk.get("S", 1), **fk)


def _qr(inputs, pk, fk, **kw):
    """ode_forward on Triton's QR sweep through the public API."""
    return ode_forward(*inputs, **_kw(pk, fk), backend="triton", method="qr", **kw)


CASES = [
    ("multi_state", dict(batch=(3,), T=6, E=3, D=2, R=3, S=2, K=2), {}),
    # left-hand side shared over the last batch dim (3 systems, 2 right-hand sides each)
    ("lhs_shared_P2", dict(batch=(3, 2), T=5, E=2, D=2, c_batch=(3, 1), h_batch=(3, 1)), {}),
    # one system shared by 9 right-hand sides: each batch entry gets its own lane
    ("lhs_shared_9", dict(batch=(9,), T=4, c_batch=(), h_batch=()), {}),
    # coefficients and steps shared by the whole batch (one system), rhs and u0 broadcast in t
    ("coef_shared", dict(batch=(3,), T=5, c_batch=(), h_batch=(), b_time=1, u_time=1, S=2), {}),
    (
        "weights",
        dict(batch=(2,), T=5, E=2, D=2, S=2, K=2),
        dict(weight_equation=1.7, weight_init_var=0.4, weight_smooth=2.3),
    ),
    ("central", dict(batch=(3,), T=6, E=2, D=2, S=2, K=2), CENTRAL),
    ("central_odd_T_shared_steps", dict(batch=(2,), T=7, h_time=1), CENTRAL),
]


@pytest.mark.parametrize("pk,fk", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_values_and_gradients_match_dense_reference(pk, fk):
    inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
    u = _qr(inputs, pk, fk)
    ref = dense_reference(*inputs, **_kw(pk, fk))
    assert_matches_reference(u, ref, inputs, value_tol=1e-11, grad_tol=1e-9)


@pytest.mark.parametrize("central", [False, True])
def test_equals_cpu_lane_qr_engine_and_torch_qr_to_rounding(central):
    """float64 values and every gradient equal the CPU lane QR engine (backend='numba') and the
    torch path's QR to rounding."""
    pk = dict(batch=(3,), T=6, E=2, D=2, S=2, K=2)
    fk = CENTRAL if central else {}
    inputs = tuple(x.requires_grad_() for x in random_problem(**pk))
    u = _qr(inputs, pk, fk)
    weight = loss_weight(u.shape)
    grads = torch.autograd.grad((u * weight).sum(), inputs)
    for backend in ("numba", "torch"):
        other = ode_forward(*inputs, **_kw(pk, fk), backend=backend, method="qr")
        assert rel_err(u, other) < 1e-13, backend
        other_grads = torch.autograd.grad((other * weight).sum(), inputs)
        for label, g, og in zip(INPUT_LABELS, grads, other_grads, strict=True):
            assert rel_err(g, og) < 1e-12, (backend, label)


def test_float32_refined_to_float64():
    """float32 (the solution and the adjoint refined once, residuals in float64) against the
    float64 solve of the same (rounded) inputs; the unrefined sweep is measurably worse."""
    from smnn.solver.layout import BatchFolding
    from smnn.solver.qr import build_step_rows, folded_rhs, unfold_solution
    from smnn.solver.triton_qr import triton_qr_sweep

    pk = dict(batch=(3,), T=12, E=2, D=2, K=2, seed=4)
    p32 = tuple(x.float().requires_grad_() for x in random_problem(**pk))
    p64 = tuple(x.detach().double().requires_grad_() for x in p32)
    u32 = _qr(p32, pk, {})
    u64 = _qr(p64, pk, {})
    assert u32.dtype == F32
    err = rel_err(u32.double(), u64)
    assert err < 1e-6
    problem = prepare_problem(*(x.detach() for x in p32), 12, 1, False)
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    x, y = (folding.fold_lhs(v) for v in build_step_rows(problem, (1.0, 1.0, 1.0), False))
    raw, _ = triton_qr_sweep(x, y, folded_rhs(problem, folding, (1.0, 1.0, 1.0), False))
    raw = unfold_solution(raw, problem, folding, False)
    assert rel_err(raw.double(), u64) > 2 * err
    weight = loss_weight(u64.shape)
    g32 = torch.autograd.grad((u32 * weight.float()).sum(), p32)
    g64 = torch.autograd.grad((u64 * weight).sum(), p64)
    for label, a, r in zip(INPUT_LABELS, g32, g64, strict=True):
        assert a.dtype == F32
        assert rel_err(a.double(), r) < 1e-4, label


@pytest.mark.parametrize("central", [False, True])
def test_factorize_solve_equals_ode_forward(central):
    """factorize(method='qr', backend='triton') keeps R, S and the rows; each solve (corrected
    semi-normal equations) equals ode_forward to rounding, with gradients to the right-hand
    sides and initial values as ode_forward's."""
    from smnn.solver.triton_qr import TritonQRFactor

    pk = dict(batch=(3,), T=5, E=2, D=2, S=2, K=2)
    fk = CENTRAL if central else {}
    for dtype, tol, gtol in ((F64, 1e-13, 1e-12), (F32, 1e-6, 1e-5)):
        c, b, u0, h = random_problem(**pk, dtype=dtype)
        fac = factorize(c, h, n_init_orders=2, n_init_var_steps=2, backend="triton", method="qr",
                        **fk)  # fmt: skip
        assert isinstance(fac.factor, TritonQRFactor)
        assert fac.factor.failed().tolist() == [False] * 3
        for seed in (1,):
            _, b2, u02, _ = random_problem(**pk, seed=seed, dtype=dtype)
            b2.requires_grad_()
            u02.requires_grad_()
            u = fac.solve(b2, u02)
            c2, h2 = c.clone().requires_grad_(), h.clone().requires_grad_()
            ref = _qr((c2, b2, u02, h2), pk, fk)
            assert u.dtype == dtype
            assert rel_err(u, ref) < tol, (dtype, seed)
            weight = loss_weight(u.shape, dtype)
            grads = torch.autograd.grad((u * weight).sum(), (b2, u02))
            ref_grads = torch.autograd.grad((ref * weight).sum(), (b2, u02))
            for g, rg in zip(grads, ref_grads, strict=True):
                assert rel_err(g, rg) < gtol, dtype


def test_factor_solve_applies_the_normal_inverse():
    """TritonQRFactor.solve (the kernel of the gradients) against a dense solve of A^T A."""
    from smnn.solver.qr import apply_rows, apply_rows_t

    pk = dict(batch=(2,), T=5, E=2, D=2, S=2, K=2)
    c, _, _, h = random_problem(**pk)
    fac = factorize(c, h, n_init_orders=2, n_init_var_steps=2, backend="triton", method="qr")
    f = fac.factor
    N, Ts, n = f.n_systems, f.n_steps, f.block_size
    g = torch.randn(N, Ts, n, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    lam = f.solve(g)
    # A^T A lam == g, applied by the rows the factor was made from
    back = apply_rows_t(f.x, f.y, apply_rows(f.x, f.y, lam))
    assert rel_err(back, g) < 1e-11
    with pytest.raises(ValueError, match="rhs must have shape"):
        f.solve(g[:, :-1])


def _singular_problem(dtype=F64):
    """System 1 has no equation and no initial rows: the smoothness rows alone leave every
    polynomial of degree < R in the null space (tests/test_qr.py's case)."""
    c, b, u0, h = random_problem(batch=(3,), T=5, R=3, K=1, dtype=dtype)
    c = c.clone()
    c[1] = 0.0
    return c, b, u0[..., :0, :, :0], h


@pytest.mark.parametrize("central", [False, True])
def test_rank_deficiency_raises_or_gives_nan(central):
    p = _singular_problem()
    kw = dict(enable_central_smoothness=central, method="qr")
    with pytest.raises(NonPositivePivotError) as info:
        ode_forward(*p, backend="triton", **kw)
    with pytest.raises(NonPositivePivotError) as torch_info:
        ode_forward(*p, backend="torch", **kw)
    assert str(info.value) == str(torch_info.value)
    assert "rank deficient for 1 of 3" in str(info.value)
    with pytest.raises(NonPositivePivotError, match=r"\(1,\)"):
        factorize(p[0], p[3], n_init_orders=0, n_init_var_steps=0, backend="triton", **kw)
    u = ode_forward(*p, backend="triton", check_pivots=False, **kw)
    assert torch.isnan(u).flatten(1).all(1).tolist() == [False, True, False]
    ref = dense_reference(*p, enable_central_smoothness=central)
    assert rel_err(u[[0, 2]], ref[[0, 2]]) < 1e-10


def test_same_bits_on_rerun():
    pk = dict(batch=(2, 2), T=4, E=2, D=2, c_batch=(2, 1), h_batch=(2, 1))
    for dtype in (F64, F32):
        runs = []
        for _ in range(2):
            inputs = tuple(x.requires_grad_() for x in random_problem(**pk, dtype=dtype))
            u = _qr(inputs, pk, CENTRAL)
            grads = torch.autograd.grad((u * loss_weight(u.shape, dtype)).sum(), inputs)
            runs.append((u.detach(), *grads))
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b), dtype


class _LaunchSpy:
    """A real kernel that records each launch (``kernel[grid](...)``) and then runs it."""

    def __init__(self, kernel, name: str, log: list[str]):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_launches_per_call(monkeypatch):
    """ode_forward: 1 sweep forward, 1 normal solve backward (float32: one more each, the
    refinements); factorize: 1 sweep; a solve: 2 normal solves (float32: 3), backward 1."""
    from smnn.solver import triton_kernels

    log: list[str] = []
    for name in ("qr_sweep_kernel", "qr_normal_solve_kernel"):
        monkeypatch.setattr(
            triton_kernels, name, _LaunchSpy(getattr(triton_kernels, name), name, log)
        )
    sweep, normal = "qr_sweep_kernel", "qr_normal_solve_kernel"
    pk = dict(batch=(2,), T=4, E=2, D=2, S=2, K=2)
    for dtype, fwd, bwd, solve in (
        (F64, [sweep], [normal], [normal] * 2),
        (F32, [sweep, normal], [normal] * 2, [normal] * 3),
    ):
        log.clear()
        inputs = tuple(x.requires_grad_() for x in random_problem(**pk, dtype=dtype))
        u = _qr(inputs, pk, {})
        assert log == fwd, dtype
        torch.autograd.grad(u.sum(), inputs)
        assert log == fwd + bwd, dtype
        log.clear()
        c, b, u0, h = (x.detach() for x in inputs)
        fac = factorize(c, h, n_init_orders=2, n_init_var_steps=2, backend="triton", method="qr")
        assert log == [sweep]
        b.requires_grad_()
        torch.autograd.grad(fac.solve(b, u0).sum(), b)
        assert log == [sweep] + solve + bwd, dtype


def test_dispatch_rule():
    """method='qr' and float32 'auto' go to Triton's QR: on CUDA with backend='auto', and with
    backend='triton' (here on CPU under the interpreter: the same bits as method='qr')."""
    plain = (1.0, 1.0, 1.0)
    cuda_dev = torch.device("cuda")
    assert triton_path_applies(cuda_dev, "auto", "qr", plain, None, dtype=F64)
    assert triton_path_applies(cuda_dev, "auto", "auto", plain, None, dtype=F32)
    assert triton_path_applies(torch.device("cpu"), "triton", "qr", plain, None)
    assert not triton_path_applies(torch.device("cpu"), "auto", "qr", plain, None)
    pk = dict(batch=(2,), T=4)
    p32 = random_problem(**pk, dtype=F32)
    auto32 = ode_forward(*p32, n_steps=4, backend="triton")
    assert torch.equal(auto32, ode_forward(*p32, n_steps=4, backend="triton", method="qr"))
    p64 = random_problem(**pk)
    seq = ode_forward(*p64, n_steps=4, backend="triton", method="sequential")
    assert torch.equal(ode_forward(*p64, n_steps=4, backend="triton"), seq)
    assert rel_err(ode_forward(*p64, n_steps=4, backend="triton", method="qr"), seq) < 1e-12
