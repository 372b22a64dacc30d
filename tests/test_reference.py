"""The dense row-by-row oracles of smnn.solver.reference (docs/solver.md, "The over-determined
linear system", "Structure of M", "Baselines from the original MNN" and "Dense reference and
accuracy bars")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import random_problem, rel_err

from smnn.solver.reference import build_dense_system, build_mnn_dense_system, dense_reference

# (name, random_problem kwargs, solver kwargs)
CASES = [
    ("basic", dict(batch=(3,), T=7), {}),
    ("two_steps", dict(batch=(2,), T=2), {}),
    ("R1", dict(batch=(2,), T=5, R=1), {}),
    ("multi", dict(batch=(2,), T=6, E=3, D=2, R=4, S=2, K=2), {}),
    (
        "weights",
        dict(batch=(2,), T=6, E=2, D=2, S=2, K=2),
        dict(weight_equation=1.7, weight_init_var=0.4, weight_smooth=2.3),
    ),
    ("central", dict(batch=(2,), T=8, D=2), dict(enable_central_smoothness=True)),
    ("central_R2", dict(batch=(2,), T=6, R=2), dict(enable_central_smoothness=True)),
    (
        "central_multi",
        dict(batch=(2,), T=7, E=2, D=2, R=4, S=2, K=3),
        dict(enable_central_smoothness=True, weight_smooth=0.6, weight_init_var=1.9),
    ),
]


def _kwargs(pk: dict, fk: dict) -> dict:
    return dict(fk, n_steps=pk.get("T", 7))


def _per_system(x: torch.Tensor, n_tail: int) -> np.ndarray:
    """``(*batch, *tail)`` -> numpy ``(n_systems, *tail)``."""
    return x.detach().reshape(-1, *x.shape[x.dim() - n_tail :]).numpy()


@pytest.mark.parametrize("name,pk,fk", CASES, ids=[c[0] for c in CASES])
def test_normal_equations_and_lstsq(name, pk, fk):
    c, b, u0, h = random_problem(**pk)
    kw = _kwargs(pk, fk)
    A, beta = build_dense_system(c, b, u0, h, **kw)
    u = dense_reference(c, b, u0, h, **kw)
    T, D, R = pk["T"], pk.get("D", 1), pk.get("R", 3)
    assert u.shape == (*pk["batch"], T, D, R)
    assert A.shape[:-2] == beta.shape[:-1] == pk["batch"]
    assert A.shape[-1] == T * D * R
    x = u.reshape(*u.shape[:-3], -1)
    # normal equations A^T (A u - beta) = 0
    residual = (A.mT @ (A @ x.unsqueeze(-1) - beta.unsqueeze(-1))).squeeze(-1)
    scale = (A.mT @ beta.unsqueeze(-1)).abs().max()
    assert float(residual.abs().max() / scale) < 1e-10
    # an independent least-squares routine on the same A
    An, bn = _per_system(A, 2), _per_system(beta, 1)
    ref = np.stack([scipy.linalg.lstsq(An[i], bn[i])[0] for i in range(An.shape[0])])
    assert rel_err(x.reshape(-1, x.shape[-1]), torch.from_numpy(ref)) < 1e-10


def _expected_normal_matrix(c, h, T, S, D, R, K, w_eq, w_in, w_s, central) -> np.ndarray:
    """M = A^T A of one system from the closed forms of docs/solver.md, "Structure of M".

    c ``(T, E, D, R)``, h ``(T-1,)`` numpy arrays.
    """
    m = D * R
    M = np.zeros((T * m, T * m))
    Fm = np.array(
        [[1.0 / math.factorial(j - i) if j >= i else 0.0 for j in range(R)] for i in range(R)]
    )
    Sg = np.diag([(-1.0) ** k for k in range(R)])
    n_taylor = R - 1 if central else R
    P = np.diag([1.0 if k < n_taylor else 0.0 for k in range(R)])  # Taylor orders present

    def blk(t: int, d: int) -> slice:
        return slice(t * m + d * R, t * m + (d + 1) * R)

    for t in range(T):
        Ct = c[t].reshape(c.shape[1], m)
        M[t * m : (t + 1) * m, t * m : (t + 1) * m] += w_eq**2 * Ct.T @ Ct
    for t in range(S):
        for d in range(D):
            for k in range(K):
                i = t * m + d * R + k
                M[i, i] += w_in**2
    for t in range(T - 1):
        Em = np.diag([w_s * h[t] ** k for k in range(R)])
        to_t = Em @ Fm.T @ P @ Fm @ Em + Em @ P @ Em
        to_next = Em @ Sg @ Fm.T @ P @ Fm @ Sg @ Em + Em @ P @ Em
        sub = -(Em @ P @ Fm @ Em + Em @ Sg @ Fm.T @ P @ Sg @ Em)  # rows t+1, columns t
        for d in range(D):
            M[blk(t, d), blk(t, d)] += to_t
            M[blk(t + 1, d), blk(t + 1, d)] += to_next
            M[blk(t + 1, d), blk(t, d)] += sub
            M[blk(t, d), blk(t + 1, d)] += sub.T
    if central:
        for t in range(T - 2):
            s = h[t] + h[t + 1]
            for d in range(D):
                idx = [
                    t * m + d * R + R - 2,
                    (t + 1) * m + d * R + R - 1,
                    (t + 2) * m + d * R + R - 2,
                ]
                v = w_s * np.array([s ** (R - 3), s ** (R - 2), -(s ** (R - 3))])
                M[np.ix_(idx, idx)] += np.outer(v, v)
    return M


def test_sub_diagonal_closed_form_entries():
    """The spec's entrywise form of M_{t+1,t} equals the matrix form used below."""
    R, ht, w_s = 4, 0.11, 1.3
    e = np.array([w_s * ht**k for k in range(R)])
    Fm = np.array(
        [[1.0 / math.factorial(j - i) if j >= i else 0.0 for j in range(R)] for i in range(R)]
    )
    Sg = np.diag([(-1.0) ** k for k in range(R)])
    Em = np.diag(e)
    matrix_form = -(Em @ Fm @ Em + Em @ Sg @ Fm.T @ Sg @ Em)
    for i in range(R):
        for j in range(R):
            entry = -e[i] * e[j] * (Fm[i, j] + (-1) ** (i + j) * Fm[j, i])
            assert abs(matrix_form[i, j] - entry) < 1e-15


@pytest.mark.parametrize(
    "pk,fk",
    [
        (dict(batch=(2,), T=6, E=2, D=2, R=3, S=2, K=2), {}),
        (
            dict(batch=(2,), T=5, E=1, D=1, R=4, S=1, K=3),
            dict(weight_smooth=1.7, weight_init_var=0.3),
        ),
        (dict(batch=(2,), T=7, E=2, D=2, R=3, S=2, K=1), dict(enable_central_smoothness=True)),
        (dict(batch=(1,), T=6, E=1, D=1, R=2), dict(enable_central_smoothness=True)),
    ],
    ids=["plain", "weights", "central", "central_R2"],
)
def test_normal_matrix_structure_and_closed_forms(pk, fk):
    c, b, u0, h = random_problem(**pk)
    fk = dict(dict(weight_equation=1.4), **fk)
    A, _ = build_dense_system(c, b, u0, h, **fk)
    M = (A.mT @ A).numpy()
    T, S, D, R, K = pk["T"], pk.get("S", 1), pk["D"], pk["R"], pk.get("K", 1)
    central = fk.get("enable_central_smoothness", False)
    m = D * R
    # sparsity: only blocks with |t - t'| <= 1 (2 with central rows) are non-zero
    reach = 2 if central else 1
    step = np.arange(T * m) // m
    outside = np.abs(step[:, None] - step[None, :]) > reach
    assert np.all(M[:, outside] == 0.0)
    # with central rows the (t, t+2) blocks are really used
    if central and T > 2:
        assert np.any(M[:, np.abs(step[:, None] - step[None, :]) == 2] != 0.0)
    for i in range(M.shape[0]):
        expected = _expected_normal_matrix(
            c[i].numpy(),
            h[i].numpy(),
            T,
            S,
            D,
            R,
            K,
            fk.get("weight_equation", 1.0),
            fk.get("weight_init_var", 1.0),
            fk.get("weight_smooth", 1.0),
            central,
        )
        assert np.abs(M[i] - expected).max() < 1e-13 * np.abs(expected).max()


def _polynomial_states(h: torch.Tensor, T: int, D: int, R: int, seed: int) -> torch.Tensor:
    """u[..., t, d, k] = p_d^(k)(time_t) for random polynomials p_d of degree R-1.

    h ``(*batch, T-1)`` -> u ``(*batch, T, D, R)``.
    """
    g = torch.Generator().manual_seed(seed)
    batch = h.shape[:-1]
    a = torch.randn(*batch, D, R, generator=g, dtype=h.dtype)  # p(x) = sum_j a_j x^j / j!
    time = torch.cat([torch.zeros(*batch, 1, dtype=h.dtype), torch.cumsum(h, -1)], -1)
    x = time[..., :, None]  # (*batch, T, 1)
    u = torch.zeros(*batch, T, D, R, dtype=h.dtype)
    for k in range(R):
        for j in range(k, R):
            u[..., k] += a[..., None, :, j] * x ** (j - k) / math.factorial(j - k)
    return u


@pytest.mark.parametrize("central", [False, True])
def test_recovers_exact_polynomial_trajectories(central):
    """Taylor and central rows vanish on polynomials of degree R-1: with consistent b and u0
    the least-squares residual is zero and the reference returns that trajectory."""
    T, E, D, R, S, K = 8, 2, 2, 4, 2, 2
    c, _, _, h = random_problem(batch=(2,), T=T, E=E, D=D, R=R, S=S, K=K, seed=3)
    u_true = _polynomial_states(h, T, D, R, seed=4)
    b = (c * u_true.unsqueeze(-3)).sum((-1, -2))
    u0 = u_true[..., :S, :, :K]
    u = dense_reference(c, b, u0, h, weight_smooth=0.7, enable_central_smoothness=central)
    assert rel_err(u, u_true) < 1e-10
    A, beta = build_dense_system(c, b, u0, h, enable_central_smoothness=central)
    x = u_true.reshape(2, -1, 1)
    assert float((A @ x).squeeze(-1).sub(beta).abs().max()) < 1e-12 * float(beta.abs().max())


def test_mnn_rows_on_polynomials_and_eps_column():
    T, E, D, R, S, K = 7, 1, 2, 3, 1, 2
    c, _, _, h = random_problem(batch=(2,), T=T, E=E, D=D, R=R, S=S, K=K, seed=5)
    u_true = _polynomial_states(h, T, D, R, seed=6)
    b = (c * u_true.unsqueeze(-3)).sum((-1, -2))
    u0 = u_true[..., :S, :, :K]
    C, r = build_mnn_dense_system(c, b, u0, h, weight_smooth=1.5)
    n_smooth = 2 * (T - 1) * D * (R - 1) + (T - 2) * D
    assert C.shape == (2, T * E + S * D * K + n_smooth, 1 + T * D * R)
    # eps (column 0) appears with coefficient w_s in exactly the Taylor and central rows
    assert torch.equal(C[..., 0].ne(0).sum(-1), torch.full((2,), n_smooth))
    assert torch.all(C[..., -n_smooth:, 0] == 1.5)
    z = torch.cat([torch.zeros(2, 1, dtype=c.dtype), u_true.reshape(2, -1)], -1)
    assert float((C @ z.unsqueeze(-1)).squeeze(-1).sub(r).abs().max()) < 1e-12
    # a non-zero slack shows up in every smoothness row
    z[:, 0] = 0.25
    res = (C @ z.unsqueeze(-1)).squeeze(-1) - r
    assert torch.allclose(res[:, -n_smooth:], torch.full_like(res[:, -n_smooth:], 1.5 * 0.25))


BROADCAST_CASES = [
    ("coef_time", dict(batch=(3,), T=6, c_time=1), {}),
    ("rhs_time", dict(batch=(3,), T=6, b_time=1), {}),
    ("init_time", dict(batch=(3,), T=6, S=3, K=2, u_time=1), dict(n_init_var_steps=3)),
    ("step_time", dict(batch=(3,), T=6, h_time=1), dict(n_steps=6)),
    (
        "batch",
        dict(batch=(2, 3), T=5, c_batch=(3,), h_batch=(), u_batch=(2, 1), b_batch=(1, 3)),
        {},
    ),
    (
        "central_shared",
        dict(batch=(2,), T=6, E=2, D=2, c_batch=(), h_batch=(), c_time=1, h_time=1),
        dict(n_steps=6, enable_central_smoothness=True),
    ),
]


@pytest.mark.parametrize("name,pk,fk", BROADCAST_CASES, ids=[c[0] for c in BROADCAST_CASES])
def test_broadcasting_equals_explicit_copies(name, pk, fk):
    c, b, u0, h = random_problem(**pk)
    batch = torch.broadcast_shapes(c.shape[:-4], b.shape[:-2], u0.shape[:-3], h.shape[:-1])
    T, S = pk["T"], pk.get("S", 1)
    full = (
        c.expand(*batch, T, *c.shape[-3:]).clone(),
        b.expand(*batch, T, b.shape[-1]).clone(),
        u0.expand(*batch, S, *u0.shape[-2:]).clone(),
        h.expand(*batch, T - 1).clone(),
    )
    u = dense_reference(c, b, u0, h, **fk)
    u_full = dense_reference(
        *full, **{k: v for k, v in fk.items() if k == "enable_central_smoothness"}
    )
    assert u.shape == u_full.shape == (*batch, T, c.shape[-2], c.shape[-1])
    assert rel_err(u, u_full) < 1e-12
    # the broadcast really matters: other batch entries see other inputs
    assert float((u.reshape(-1, *u.shape[-3:]) - u.reshape(-1, *u.shape[-3:])[:1]).abs().max()) > 0
    C, r = build_mnn_dense_system(c, b, u0, h, n_steps=T, n_init_var_steps=S)
    C_full, r_full = build_mnn_dense_system(*full)
    assert torch.equal(C, C_full) and torch.equal(r, r_full)


def test_gradients_finite_and_match_finite_differences():
    c, b, u0, h = random_problem(batch=(1,), T=3, E=1, D=1, R=2, S=1, K=1, seed=7)
    ws = torch.tensor(1.3, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for x in (c, b, u0, h, ws)]

    def fn(c_, b_, u0_, h_, ws_):
        return dense_reference(c_, b_, u0_, h_, weight_smooth=ws_, enable_central_smoothness=True)

    assert torch.autograd.gradcheck(fn, inputs)
    c, b, u0, h = random_problem(batch=(2,), T=6, E=2, D=2, R=3, S=2, K=2, seed=8)
    inputs = [x.clone().requires_grad_() for x in (c, b, u0, h)]
    u = dense_reference(*inputs, weight_equation=0.8)
    grads = torch.autograd.grad((u**2).sum(), inputs)
    for g in grads:
        assert torch.isfinite(g).all()
        assert float(g.abs().max()) > 0


@pytest.mark.parametrize(
    "fn", [dense_reference, build_dense_system, build_mnn_dense_system], ids=lambda f: f.__name__
)
def test_bad_inputs_raise_value_error_naming_argument(fn):
    c, b, u0, h = random_problem(batch=(2,), T=5)
    with pytest.raises(ValueError, match="steps"):
        fn(c, b, u0, -h)
    with pytest.raises(ValueError, match="coefficients"):
        fn(c[..., 0, 0, 0], b, u0, h)
    with pytest.raises(ValueError, match="rhs_equation"):
        fn(c, b[..., :3, :], u0, h)
    with pytest.raises(ValueError, match="weight_smooth"):
        fn(c, b, u0, h, weight_smooth=0.0)
    with pytest.raises(ValueError, match="weight_equation"):
        fn(c, b, u0, h, weight_equation=float("nan"))


def test_order_requirements():
    c, b, u0, h = random_problem(batch=(2,), T=5, R=1)
    with pytest.raises(ValueError, match="enable_central_smoothness"):
        dense_reference(c, b, u0, h, enable_central_smoothness=True)
    with pytest.raises(ValueError, match="n_orders"):
        build_mnn_dense_system(c, b, u0, h)
