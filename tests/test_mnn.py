"""MNN baselines (docs/solver.md, "Baselines from the original MNN"): mnn_dense against the
row-by-row least squares, mnn_cg against mnn_dense, gradients, convergence reporting and input
checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import random_problem, rel_err

from smnn import NonPositivePivotError
from smnn.solver.mnn import MNNConvergenceWarning, mnn_cg, mnn_dense
from smnn.solver.reference import build_mnn_dense_system

# (name, random_problem kwargs, solver kwargs)
DENSE_CASES = [
    ("basic", dict(batch=(3,), T=7), {}),
    ("two_steps_R2", dict(batch=(2,), T=2, R=2), {}),
    ("R2", dict(batch=(2,), T=6, R=2), {}),
    ("multi", dict(batch=(2,), T=7, E=3, D=2, R=4, S=2, K=2), {}),
    ("K_equals_R", dict(batch=(2,), T=5, R=3, K=3), {}),
    ("alpha", dict(batch=(2,), T=6, E=2, D=2), dict(gamma=0.3, alpha=1.7)),
    (
        "weights_alpha",
        dict(batch=(2,), T=6, E=2, D=2, S=2, K=2),
        dict(weight_equation=1.7, weight_init_var=0.4, weight_smooth=2.3, alpha=-2.0),
    ),
    ("coef_time", dict(batch=(3,), T=6, c_time=1), {}),
    ("rhs_time", dict(batch=(3,), T=6, b_time=1), {}),
    ("init_time", dict(batch=(2,), T=6, S=3, K=2, u_time=1), dict(n_init_var_steps=3)),
    ("step_time", dict(batch=(3,), T=6, h_time=1), dict(n_steps=6)),
    (
        "batch_broadcast",
        dict(batch=(2, 3), T=5, c_batch=(3,), h_batch=(), u_batch=(2, 1), b_batch=(1, 3)),
        dict(alpha=0.5),
    ),
    (
        "shared_lhs",
        dict(batch=(3,), T=6, E=2, D=2, c_batch=(), h_batch=(), c_time=1, h_time=1),
        dict(n_steps=6, gamma=0.1, alpha=3.0),
    ),
    ("no_batch", dict(batch=(), T=6, E=2, D=2), {}),
]

WEIGHT_KEYS = ("weight_equation", "weight_init_var", "weight_smooth")


def _oracle(c, b, u0, h, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """z = (C^T C)^{-1} (C^T r + gamma alpha e_0) from the explicit rows C, r.

    The least-squares part comes from scipy.linalg.lstsq on C; the gamma * alpha term from the
    QR factor of C ((C^T C)^{-1} = R^{-1} R^{-T}). Returns (u, eps) shaped like mnn_dense's.
    """
    build_kw = {
        k: v for k, v in kw.items() if k in WEIGHT_KEYS or k in ("n_steps", "n_init_var_steps")
    }
    C, r = build_mnn_dense_system(c, b, u0, h, **build_kw)
    shift = kw.get("gamma", 0.05) * kw.get("alpha", 0.0)
    Cn = C.reshape(-1, *C.shape[-2:]).numpy()
    rn = r.reshape(-1, r.shape[-1]).numpy()
    zs = []
    for Ci, ri in zip(Cn, rn, strict=True):
        z = scipy.linalg.lstsq(Ci, ri)[0]
        _, Rf = np.linalg.qr(Ci)
        e0 = np.zeros(Ci.shape[1])
        e0[0] = shift
        z = z + scipy.linalg.solve_triangular(Rf, scipy.linalg.solve_triangular(Rf, e0, trans="T"))
        zs.append(z)
    z = torch.from_numpy(np.stack(zs)).reshape(*C.shape[:-2], -1)
    D, R = c.shape[-2], c.shape[-1]
    T = (C.shape[-1] - 1) // (D * R)
    return z[..., 1:].reshape(*z.shape[:-1], T, D, R), z[..., 0]


@pytest.mark.parametrize("name,pk,fk", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_matches_row_by_row_statement(name, pk, fk):
    c, b, u0, h = random_problem(**pk)
    u, eps = mnn_dense(c, b, u0, h, **fk, return_eps=True)
    u_ref, eps_ref = _oracle(c, b, u0, h, fk)
    assert u.shape == u_ref.shape
    assert eps.shape == eps_ref.shape == u.shape[:-3]
    assert rel_err(u, u_ref) < 1e-10
    assert rel_err(eps, eps_ref) < 1e-10
    # return_eps=False gives the same u
    assert torch.equal(mnn_dense(c, b, u0, h, **fk), u)


def test_dense_gamma_alpha_moves_the_slack():
    """gamma * alpha enters the eps right-hand side: the solution shifts by
    gamma alpha (C^T C)^{-1} e_0, linear in the product."""
    c, b, u0, h = random_problem(batch=(2,), T=6, K=2)
    u0_, e0_ = mnn_dense(c, b, u0, h, alpha=0.0, return_eps=True)
    u1, e1 = mnn_dense(c, b, u0, h, gamma=0.5, alpha=2.0, return_eps=True)
    u2, e2 = mnn_dense(c, b, u0, h, gamma=0.25, alpha=4.0, return_eps=True)
    u3, e3 = mnn_dense(c, b, u0, h, gamma=0.5, alpha=4.0, return_eps=True)
    assert float((e1 - e0_).abs().min()) > 1e-6
    assert rel_err(u1, u2) < 1e-12 and rel_err(e1, e2) < 1e-12
    assert rel_err(u3 - u0_, 2 * (u1 - u0_)) < 1e-9
    assert rel_err(e3 - e0_, 2 * (e1 - e0_)) < 1e-9


def _polynomial_states(h: torch.Tensor, T: int, D: int, R: int, seed: int) -> torch.Tensor:
    """u[..., t, d, k] = p_d^(k)(time_t), random polynomials p_d of degree R-1 (T, D, R)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*h.shape[:-1], D, R, generator=g, dtype=h.dtype)
    time = torch.cat([torch.zeros(*h.shape[:-1], 1, dtype=h.dtype), torch.cumsum(h, -1)], -1)
    x = time[..., :, None]
    u = torch.zeros(*h.shape[:-1], T, D, R, dtype=h.dtype)
    for k in range(R):
        for j in range(k, R):
            u[..., k] += a[..., None, :, j] * x ** (j - k) / math.factorial(j - k)
    return u


@pytest.mark.parametrize("solver", [mnn_dense, mnn_cg], ids=["dense", "cg"])
def test_exact_polynomial_trajectory_with_zero_slack(solver):
    """All MNN rows hold exactly for a polynomial of degree R-1 with eps = 0 (alpha = 0)."""
    T, E, D, R, S, K = 7, 2, 2, 3, 1, 2
    c, _, _, h = random_problem(batch=(2,), T=T, E=E, D=D, R=R, S=S, K=K, seed=11)
    u_true = _polynomial_states(h, T, D, R, seed=12)
    b = (c * u_true.unsqueeze(-3)).sum((-1, -2))
    u0 = u_true[..., :S, :, :K]
    u, eps = solver(c, b, u0, h, weight_smooth=0.8, return_eps=True)
    assert rel_err(u, u_true) < 1e-9
    assert float(eps.abs().max()) < 1e-9 * float(u_true.abs().max())


# problems where CG reaches tol=1e-12 well within 200 iterations (K = R-1 initial orders fixed)
CG_CASES = [
    ("basic", dict(batch=(3,), T=7, K=2), {}),
    ("multi", dict(batch=(2,), T=6, E=2, D=2, R=3, S=2, K=2), dict(alpha=1.5, gamma=0.2)),
    ("R4", dict(batch=(2,), T=6, R=4, K=3), dict(weight_smooth=1.3)),
    ("T2_R2", dict(batch=(2,), T=2, R=2), {}),
    (
        "broadcast",
        dict(batch=(2, 3), T=6, K=2, c_batch=(3,), h_batch=(), h_time=1, u_batch=(2, 1)),
        dict(n_steps=6),
    ),
    ("longer", dict(batch=(2,), T=30, K=2), dict(weight_init_var=2.0)),
]


@pytest.mark.parametrize("name,pk,fk", CG_CASES, ids=[c[0] for c in CG_CASES])
def test_cg_matches_dense(name, pk, fk):
    c, b, u0, h = random_problem(**pk)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MNNConvergenceWarning)
        u, eps, info = mnn_cg(c, b, u0, h, **fk, return_eps=True, return_info=True)
    u_ref, eps_ref = mnn_dense(c, b, u0, h, **fk, return_eps=True)
    assert rel_err(u, u_ref) < 1e-8
    assert rel_err(eps, eps_ref) < 1e-8
    batch = u.shape[:-3]
    assert info["converged"].shape == info["iterations"].shape == batch
    assert bool(info["converged"].all())
    assert bool((info["relative_residual"] <= 1e-12).all())
    assert bool((info["iterations"] <= 200).all()) and bool((info["iterations"] > 0).all())
    assert torch.equal(mnn_cg(c, b, u0, h, **fk), u)


def test_cg_reports_non_convergence():
    c, b, u0, h = random_problem(batch=(2,), T=40, K=1)
    # system 1 has a zero right-hand side: converged at once with z = 0
    b = torch.stack([b[0], torch.zeros_like(b[1])])
    u0 = torch.stack([u0[0], torch.zeros_like(u0[1])])
    with pytest.warns(MNNConvergenceWarning, match="1 of 2 systems"):
        u, info = mnn_cg(c, b, u0, h, max_iter=5, return_info=True)
    assert info["converged"].tolist() == [False, True]
    assert info["iterations"].tolist() == [5, 0]
    assert float(info["relative_residual"][0]) > 1e-12
    assert float(u[1].abs().max()) == 0.0
    u_dense = mnn_dense(c, b, u0, h)
    assert rel_err(u[0], u_dense[0]) > 1e-8  # the capped iterate is visibly not the solution
    # with the default cap it does converge
    with warnings.catch_warnings():
        warnings.simplefilter("error", MNNConvergenceWarning)
        _, info = mnn_cg(c, b, u0, h, max_iter=2000, tol=1e-10, return_info=True)
    assert bool(info["converged"].all())


@pytest.mark.parametrize(
    "pk",
    [
        dict(batch=(2,), T=3, E=1, D=1, R=2, S=1, K=1, c_batch=()),
        dict(batch=(1,), T=4, E=2, D=2, R=3, S=2, K=2),
        dict(batch=(2,), T=2, E=1, D=1, R=2, S=1, K=1, h_batch=()),
    ],
    ids=["shared_coef", "multi", "two_steps"],
)
def test_dense_gradcheck(pk):
    c, b, u0, h = random_problem(**pk, seed=21)
    w_s = torch.tensor(1.3, dtype=torch.float64)
    alpha = torch.tensor(0.7, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for x in (c, b, u0, h, w_s, alpha)]

    def fn(c_, b_, u0_, h_, w_s_, alpha_):
        return mnn_dense(
            c_, b_, u0_, h_, weight_smooth=w_s_, gamma=0.2, alpha=alpha_, return_eps=True
        )

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "pk",
    [
        dict(batch=(2,), T=6, E=2, D=2, R=3, S=2, K=2),
        dict(batch=(2, 3), T=5, K=2, c_batch=(3,), h_batch=(), h_time=1),
    ],
    ids=["multi", "broadcast"],
)
def test_cg_gradients_match_dense(pk):
    c, b, u0, h = random_problem(**pk, seed=31)
    w_eq = torch.tensor(1.2, dtype=torch.float64)
    gamma = torch.tensor(0.3, dtype=torch.float64)
    alpha = torch.tensor(-0.8, dtype=torch.float64)
    n_steps = pk["T"]

    def gradients(solver):
        inputs = [x.clone().requires_grad_() for x in (c, b, u0, h, w_eq, gamma, alpha)]
        ci, bi, ui, hi, wi, gi, ai = inputs
        u, eps = solver(
            ci, bi, ui, hi, n_steps=n_steps, weight_equation=wi, gamma=gi, alpha=ai, return_eps=True
        )
        g = torch.Generator().manual_seed(32)
        loss = (u * torch.randn(u.shape, generator=g, dtype=u.dtype)).sum() + 0.5 * eps.sum()
        return torch.autograd.grad(loss, inputs)

    with warnings.catch_warnings():
        warnings.simplefilter("error", MNNConvergenceWarning)
        grads_cg = gradients(mnn_cg)
    grads_dense = gradients(mnn_dense)
    for g_cg, g_dense in zip(grads_cg, grads_dense, strict=True):
        assert g_cg.shape == g_dense.shape
        assert float(g_dense.abs().max()) > 0
        assert rel_err(g_cg, g_dense) < 1e-6


def test_cg_without_grad_and_backward_warning():
    c, b, u0, h = random_problem(batch=(2,), T=40, K=1)
    with torch.no_grad(), pytest.warns(MNNConvergenceWarning, match="forward"):
        u = mnn_cg(c, b, u0, h, max_iter=3)
    assert not u.requires_grad
    b = b.clone().requires_grad_()
    with pytest.warns(MNNConvergenceWarning) as record:
        u = mnn_cg(c, b, u0, h, max_iter=3)
        u.sum().backward()
    assert any("backward" in str(w.message) for w in record)
    assert b.grad is not None and bool(torch.isfinite(b.grad).all())


def test_singular_normal_matrix_raises():
    # all-zero coefficients and T=2, R=2: 5 unknowns but only 3 independent non-zero rows
    c, b, u0, h = random_problem(batch=(3,), T=2, R=2)
    c = c.clone()
    c[1] = 0.0
    with pytest.raises(NonPositivePivotError, match=r"1 of 3 systems.*\(1,\)"):
        mnn_dense(c, b, u0, h)


@pytest.mark.parametrize("solver", [mnn_dense, mnn_cg], ids=["dense", "cg"])
def test_bad_inputs_raise_value_error_naming_argument(solver):
    c, b, u0, h = random_problem(batch=(2,), T=5)
    bad = [
        ("steps", dict(steps=-h)),
        ("coefficients", dict(coefficients=c[..., 0, 0, 0])),
        ("init_vars", dict(init_vars=torch.cat([u0, u0], dim=-2))),
        ("weight_smooth", dict(weight_smooth=0.0)),
        ("gamma", dict(gamma=-1.0)),
        ("alpha", dict(alpha=float("inf"))),
    ]
    args = dict(coefficients=c, rhs_equation=b, init_vars=u0, steps=h)
    for name, change in bad:
        with pytest.raises(ValueError, match=name):
            solver(**dict(args, **change))
    c1, b1, u01, h1 = random_problem(batch=(2,), T=5, R=1)
    with pytest.raises(ValueError, match="n_orders"):
        solver(c1, b1, u01, h1)
    if solver is mnn_cg:
        with pytest.raises(ValueError, match="max_iter"):
            mnn_cg(c, b, u0, h, max_iter=0)
        with pytest.raises(ValueError, match="tol"):
            mnn_cg(c, b, u0, h, tol=-1e-3)


def test_record_convergence_collects_every_solve_into_one_summary():
    """A job's many CG solves become one line and three metrics, not a warning per step."""
    from smnn.solver.mnn import record_convergence

    c, b, u0, h = random_problem(batch=(3,), T=40, K=1)
    b = b.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with record_convergence() as record:
            for _ in range(4):  # four training steps: forward and backward each
                mnn_cg(c, b, u0, h, max_iter=3).sum().backward()
            warnings.warn("another warning passes through", UserWarning, stacklevel=1)
    assert [str(w.message) for w in outside] == ["another warning passes through"]
    assert record.solves == 8 and record.by_pass == {"forward": 4, "backward": 4}
    assert record.not_converged == 24 and record.systems == 24
    line = record.summary()
    assert "did NOT converge" in line and "8 CG solve(s)" in line and "max_iter=3" in line
    assert "\n" not in line
    metrics = record.as_metrics()
    assert metrics["cg_converged"] == 0.0 and metrics["cg_unconverged_solves"] == 8.0
    assert metrics["cg_worst_relative_residual"] > 1e-12
    with record_convergence() as fine:
        mnn_cg(c, b.detach(), u0, h, max_iter=2000, tol=1e-10)
    assert fine.converged and fine.as_metrics()["cg_converged"] == 1.0
    assert fine.summary() == "mnn_cg: every CG solve converged"
