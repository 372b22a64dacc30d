"""Baselines from the original MNN (docs/solver.md, "Baselines from the original MNN"): dense
Cholesky and CG.

The original MNN solves a least-squares problem over z = [eps, u] with one slack variable eps per
system (column 0):

- equation rows and initial-value rows as in S-MNN (no eps);
- forward and backward Taylor rows for the orders k = 0..R-2, each with +eps;
- central rows on the top order for t = 1..T-2, each with +eps;

see :func:`smnn.solver.reference.build_mnn_dense_system` for the rows written out one by one.
With C the stacked rows and r their right-hand sides the solution is

    z = (C^T C)^{-1} (C^T r + gamma * alpha * e_0).

The eps column touches every Taylor and central row, so C^T C is dense: O(T^2) memory and O(T^3)
time for the dense solver. That is the point of the baseline.

Weights (all 1 by default, which is the spec): ``weight_equation`` multiplies the equation rows,
``weight_init_var`` the initial-value rows and ``weight_smooth`` the Taylor and central rows (each
whole row, eps coefficient and right-hand side included), so C^T C carries the squared weights,
as in S-MNN.

- :func:`mnn_dense`: builds C^T C densely (vectorised, no loop over steps) and solves it by a
  dense Cholesky factorization; the backward pass reuses the factor (one more pair of triangular
  solves), reads the gradient of each band of C^T C off the result, and autograd carries it back
  through the construction of the bands.
- :func:`mnn_cg`: conjugate gradient with C^T C applied in O(T) per product from its banded
  structure (never the dense matrix), batched over all systems with per-system convergence;
  gradients by implicit differentiation (a second CG solve in the backward pass).

Why CG does not converge, and why it is still the honest baseline. The original MNN's CG
(``alpz/mech-nn``, ``solver/cg.py`` ``cg_block``, called with ``cg_max_iter = 200`` from
``config.py``) is unpreconditioned CG from x_0 = 0 that freezes each system once ``||r_k|| <=
1e-12 ||b||`` and stops after 200 iterations, never reporting whether it converged. Ours is the
same iteration: same stopping rule, same tolerance, same cap, no preconditioner. Run on the same
C^T C and right-hand side of the standalone cases (T = 1000, h = 0.01; C^T C has condition
numbers 4.5e11 to 9e11), both stop at 200 iterations with the same wrong answers (largest error
of y against the dense solution: RC circuit 5.65 both, population growth 47.6 both, language
death 0.196 vs 0.193, harmonic oscillator 0.582 both, damped oscillator 0.224 vs 0.225; the
first initial condition of each equation). CG needs 3,500 to 19,400 iterations (1.2 to 3.2 n,
n = 1 + T*D*R unknowns) to reach the tolerance, and then agrees with the dense solution to 2e-9;
the damped oscillator is still at 6.8e-5 after 4 n = 24,004. So the baseline reproduces
the original faithfully, and its non-convergence is a property of the method at its published
cap. It is therefore marked wherever its numbers appear: each solve warns
(:class:`MNNConvergenceWarning`), and a job collects them with :func:`record_convergence` into
one summary line and the metrics ``cg_converged``, ``cg_unconverged_solves`` and
``cg_worst_relative_residual`` next to its results. Tables, legends, titles and summary lines
name such results with :func:`convergence_label` (``mnn_cg (not converged)``), the one helper
every output uses (the Lorenz evaluation and figures, the SST scaling study, the benchmark).

Both solvers build the same structured C^T C (:class:`_BandedGram`: the bands of m x m blocks,
m = D*R, of the u-part plus the dense eps row) with vectorised tensor ops from the inputs; the
dense solver copies it into a dense matrix, CG only multiplies with it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from smnn.solver.banded import NonPositivePivotError
from smnn.solver.inputs import OdeProblem, check_weight, prepare_problem

__all__ = [
    "mnn_dense",
    "mnn_cg",
    "MNNConvergenceWarning",
    "ConvergenceRecord",
    "record_convergence",
    "NOT_CONVERGED",
    "converged_flag",
    "convergence_label",
]

Weight = float | torch.Tensor


class MNNConvergenceWarning(UserWarning):
    """Conjugate gradient stopped at ``max_iter`` before reaching ``tol`` for some systems.

    Attributes (also in the message): ``where`` (``forward`` or ``backward``),
    ``not_converged`` and ``systems`` (counts), ``worst_residual`` (largest relative residual),
    ``max_iter``, ``tol``.
    """

    def __init__(
        self, message: str, where: str = "", not_converged: int = 0, systems: int = 0,
        worst_residual: float = math.nan, max_iter: int = 0, tol: float = math.nan,
    ):  # fmt: skip
        super().__init__(message)
        self.where = where
        self.not_converged = not_converged
        self.systems = systems
        self.worst_residual = worst_residual
        self.max_iter = max_iter
        self.tol = tol


@dataclass
class ConvergenceRecord:
    """What :func:`record_convergence` collected: the CG solves that stopped at ``max_iter``.

    Attributes:
        solves: forward and backward CG solves with some system not converged.
        by_pass: those solves by pass (``{"forward": n, "backward": n}``).
        not_converged: systems not converged, summed over those solves.
        systems: systems of those solves.
        worst_residual: the largest relative residual seen (0 when all converged).
        max_iter: the iteration cap of the last such solve; tol its tolerance.
    """

    solves: int = 0
    by_pass: dict = field(default_factory=dict)
    not_converged: int = 0
    systems: int = 0
    worst_residual: float = 0.0
    max_iter: int = 0
    tol: float = math.nan

    @property
    def converged(self) -> bool:
        return self.solves == 0

    def add(self, w: MNNConvergenceWarning) -> None:
        self.solves += 1
        self.by_pass[w.where] = self.by_pass.get(w.where, 0) + 1
        self.not_converged += w.not_converged
        self.systems += w.systems
        self.worst_residual = max(self.worst_residual, float(w.worst_residual))
        self.max_iter, self.tol = w.max_iter, w.tol

    def summary(self) -> str:
        """One line for a job's log (``mnn_cg converged in every solve`` when it did)."""
        if self.converged:
            return "mnn_cg: every CG solve converged"
        passes = ", ".join(f"{k} {v}" for k, v in sorted(self.by_pass.items()))
        return (
            f"mnn_cg did NOT converge: {self.solves} CG solve(s) ({passes}) stopped at "
            f"max_iter={self.max_iter} with {self.not_converged} of {self.systems} systems above "
            f"tol={self.tol:g} (worst relative residual {self.worst_residual:.3g}); its results "
            "are the last iterates, not solutions of the MNN problem"
        )

    def as_metrics(self) -> dict[str, float]:
        """``cg_converged`` (1/0), ``cg_unconverged_solves``, ``cg_worst_relative_residual``:
        for metrics.json files and MLflow, next to every number the solver produced."""
        return {
            "cg_converged": 1.0 if self.converged else 0.0,
            "cg_unconverged_solves": float(self.solves),
            "cg_worst_relative_residual": float(self.worst_residual),
        }

    def merged_metrics(self, earlier: Mapping[str, Any]) -> dict[str, float]:
        """:meth:`as_metrics` combined with an earlier record's metrics in ``earlier`` (e.g. a
        model's training record, carried into its evaluation's metrics): converged only when
        both are, solves summed, the worse residual. Keys absent from ``earlier``: this
        record alone (an evaluation that solved nothing never hides a training that did not
        converge)."""
        out = self.as_metrics()
        if converged_flag(earlier.get("cg_converged")) is False:
            out["cg_converged"] = 0.0
        out["cg_unconverged_solves"] += float(earlier.get("cg_unconverged_solves", 0.0) or 0.0)
        worst = float(earlier.get("cg_worst_relative_residual", 0.0) or 0.0)
        out["cg_worst_relative_residual"] = max(out["cg_worst_relative_residual"], worst)
        return out


@contextmanager
def record_convergence(into: ConvergenceRecord | None = None) -> Iterator[ConvergenceRecord]:
    """Collect :class:`MNNConvergenceWarning` raised inside the block into a
    :class:`ConvergenceRecord` instead of printing one warning per solve; other warnings pass
    through. A job prints :meth:`ConvergenceRecord.summary` once and stores
    :meth:`ConvergenceRecord.as_metrics` with its results::

        with record_convergence() as cg:
            trainer.fit()
        print(cg.summary())

    ``into``: an existing record to add to (several blocks, e.g. each measured step of a case,
    collected into one); default a new one.

    Uses :func:`warnings.catch_warnings`, so it belongs around work in the job's main thread.
    """
    record = ConvergenceRecord() if into is None else into
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MNNConvergenceWarning)
            yield record
    finally:
        # outside the recording block: a warning passed on here must not land in `caught`
        for w in caught:
            if isinstance(w.message, MNNConvergenceWarning):
                record.add(w.message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


NOT_CONVERGED = "not converged"  # the mark beside every result of a non-converged solve


def converged_flag(value: object) -> bool | None:
    """Whether a recorded convergence value says converged: ``True``/``False``, or ``None`` when
    nothing was recorded or it does not apply (a direct solver).

    Accepts what the outputs hold: bools (numpy's too), the metric ``cg_converged`` (1.0/0.0,
    NaN), the strings of a CSV read back (``"True"``, ``"false"``, ``""``) and ``None``.

    Raises:
        ValueError: for any other value (naming it).
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "nan", "none", "n/a"):
            return None
        if text in ("true", "1", "1.0"):
            return True
        if text in ("false", "0", "0.0"):
            return False
        raise ValueError(f"not a convergence flag: {value!r} (true, false or empty)")
    try:
        number = float(value)  # bool, numpy bool, int, float
    except (TypeError, ValueError):
        raise ValueError(f"not a convergence flag: {value!r}") from None
    if math.isnan(number):
        return None
    if number not in (0.0, 1.0):
        raise ValueError(f"not a convergence flag: {value!r} (1 or 0)")
    return number == 1.0


def convergence_label(name: str, converged: object) -> str:
    """``name`` as a table, legend, title or summary line shows it: ``"mnn_cg (not
    converged)"`` when ``converged`` (any value :func:`converged_flag` reads) says it did not
    converge, else ``name`` unchanged (converged, or not applicable)."""
    return f"{name} ({NOT_CONVERGED})" if converged_flag(converged) is False else name


# ----------------------------------------------------------------------------- C^T C, banded


@dataclass
class _BandedGram:
    """The MNN normal matrix G = C^T C in structured form, differentiable w.r.t. the inputs.

    Ordering z = [eps, u], u[t] = u[t, :, :] flattened over (d, k) (block size m = D*R). The
    u-part of G is block banded (each row touches at most three neighbouring steps); eps couples
    to everything:

    Attributes:
        diag: ``(*lhs_batch, T, m, m)``, G[u_t, u_t].
        sub: ``(*lhs_batch, T-1, m, m)``, G[u_{t+1}, u_t].
        sub2: ``(*lhs_batch, T-2, m, m)``, G[u_{t+2}, u_t] (central rows only).
        coupling: ``(*lhs_batch, T, m)``, G[eps, u_t] (= G[u_t, eps]).
        corner: 0-dim, G[eps, eps] = w_s^2 * (number of Taylor and central rows).
    """

    diag: torch.Tensor
    sub: torch.Tensor
    sub2: torch.Tensor
    coupling: torch.Tensor
    corner: torch.Tensor

    @property
    def n_steps(self) -> int:
        return self.diag.shape[-3]

    @property
    def block_size(self) -> int:
        return self.diag.shape[-1]

    def detach(self) -> _BandedGram:
        """The same matrix cut from the autograd graph."""
        return _BandedGram(
            *(x.detach() for x in (self.diag, self.sub, self.sub2, self.coupling, self.corner))
        )

    def requires_grad(self) -> bool:
        return any(
            x.requires_grad for x in (self.diag, self.sub, self.sub2, self.coupling, self.corner)
        )

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """G z in O(T m^2) per system, never forming G: ``(*batch, 1 + T*m)`` -> same shape."""
        T, m = self.n_steps, self.block_size
        eps = z[..., 0]
        u = z[..., 1:].unflatten(-1, (T, m))  # (*batch, T, m)

        # many tiny matrix-vector products; einsum is far faster here than mul + sum
        def times(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # blocks @ x
            return torch.einsum("...ij,...j->...i", blocks, x)

        def times_t(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # blocks^T @ x
            return torch.einsum("...ji,...j->...i", blocks, x)

        # y is a fresh tensor, so the in-place band updates are safe under autograd
        y = times(self.diag, u) + self.coupling * eps[..., None, None]  # (*batch, T, m)
        y[..., 1:, :] += times(self.sub, u[..., :-1, :])
        y[..., :-1, :] += times_t(self.sub, u[..., 1:, :])
        if T > 2:
            y[..., 2:, :] += times(self.sub2, u[..., :-2, :])
            y[..., :-2, :] += times_t(self.sub2, u[..., 2:, :])
        eps_out = torch.einsum("...ti,...ti->...", self.coupling, u) + self.corner * eps
        return torch.cat([eps_out.unsqueeze(-1), y.flatten(-2)], dim=-1)

    def dense(self) -> torch.Tensor:
        """The dense G ``(*lhs_batch, 1 + T*m, 1 + T*m)``.

        The blocks are copied into (block-)diagonal views of a zeros matrix: one strided copy per
        band, no loop over steps. Autograd carries gradients of G back to the blocks.
        """
        T, m = self.n_steps, self.block_size
        batch = torch.broadcast_shapes(self.diag.shape[:-3], self.coupling.shape[:-2])
        n = 1 + T * m
        gram = self.diag.new_zeros(*batch, n, n)
        # view of the u-part as (*batch, T, m, T, m); diagonal(offset, -4, -2) is the band of
        # blocks G[u_{t-offset}, u_t] for offset <= 0, laid out as (*batch, m, m, T - |offset|)
        gu = gram[..., 1:, 1:].unflatten(-1, (T, m)).unflatten(-3, (T, m))
        bands = [(0, self.diag), (-1, self.sub), (1, self.sub.mT)]
        if T > 2:
            bands += [(-2, self.sub2), (2, self.sub2.mT)]
        for offset, blocks in bands:
            target = torch.diagonal(gu, offset=offset, dim1=-4, dim2=-2)
            target.copy_(blocks.movedim(-3, -1).expand(target.shape))
        flat_coupling = self.coupling.flatten(-2).expand(*batch, n - 1)
        gram[..., 0, 1:] = flat_coupling
        gram[..., 1:, 0] = flat_coupling
        gram[..., 0, 0] = self.corner
        return gram


def _kron_states(blocks: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Same R x R block for every state: ``(..., R, R)`` -> block diagonal ``(..., D*R, D*R)``."""
    if n_dims == 1:
        return blocks
    R = blocks.shape[-1]
    eye = torch.eye(n_dims, dtype=blocks.dtype, device=blocks.device)
    out = blocks[..., None, :, None, :] * eye[:, None, :, None]  # (..., D, R, D, R)
    return out.reshape(*blocks.shape[:-2], n_dims * R, n_dims * R)


def _pad_steps(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero-pad the step axis (dim -3) of ``(..., steps, a, b)``."""
    return F.pad(x, (0, 0, 0, 0, before, after))


def _mnn_gram(problem: OdeProblem, w_eq, w_in, w_s) -> _BandedGram:
    """G = C^T C from the rows of docs/solver.md, "Baselines from the original MNN" (weights already
    0-dim tensors).

    Each group of rows touches a window of steps, so its Gram matrix is a small local matrix
    added to the bands: equation rows (one step), initial rows (one step, diagonal), the 2(R-1)
    Taylor rows of one interval and state (two steps, R x R blocks, the same for every state),
    one central row per step and state (three steps). Every Taylor and central row also carries
    w_s * eps, which gives the eps coupling (w_s times the row's u-coefficients) and the corner.
    """
    T, S = problem.n_steps, problem.n_init_var_steps
    E, D, R, K = problem.n_equations, problem.n_dims, problem.n_orders, problem.n_init_orders
    m = D * R
    c, h = problem.coefficients, problem.steps
    dtype, device = c.dtype, c.device

    # equation rows: w_eq^2 C_t^T C_t
    ct = (w_eq * c).expand(*c.shape[:-4], T, E, D, R).reshape(*c.shape[:-4], T, E, m)
    diag = ct.mT @ ct  # (*bc, T, m, m)
    # initial rows: w_in^2 on the diagonal entries (t < S, d, k < K)
    mask = torch.zeros(T, D, R, dtype=dtype)
    mask[:S, :, :K] = 1.0
    diag = diag + torch.diag_embed(w_in**2 * mask.to(device).reshape(T, m))

    # Taylor rows of interval t over (u[t, d, :], u[t+1, d, :]); row k for k = 0..R-2:
    # forward  w_s * (eps + sum_{o>=k} h^o/(o-k)! u[t,d,o] - h^k u[t+1,d,k])
    # backward w_s * (eps + sum_{o>=k} (-h)^o/(o-k)! u[t+1,d,o] - (-h)^k u[t,d,k])
    h = h.expand(*h.shape[:-1], T - 1)
    powers = h.unsqueeze(-1) ** torch.arange(R, dtype=dtype, device=device)  # (*bh, T-1, R)
    signed = powers * torch.tensor([(-1.0) ** o for o in range(R)], dtype=dtype, device=device)
    taylor = torch.zeros(R - 1, R, dtype=dtype)  # 1/(o-k)! for o >= k
    for k in range(R - 1):
        for o in range(k, R):
            taylor[k, o] = 1.0 / math.factorial(o - k)
    taylor = taylor.to(device)
    shift = torch.eye(R - 1, R, dtype=dtype, device=device)  # picks order k of row k
    fwd = torch.cat([taylor * powers.unsqueeze(-2), -shift * powers.unsqueeze(-2)], -1)
    bwd = torch.cat([-shift * signed.unsqueeze(-2), taylor * signed.unsqueeze(-2)], -1)
    local = w_s * torch.cat([fwd, bwd], -2)  # (*bh, T-1, 2R-2, 2R)
    local_gram = local.mT @ local  # (*bh, T-1, 2R, 2R)
    smooth_diag = _pad_steps(local_gram[..., :R, :R], 0, 1) + _pad_steps(
        local_gram[..., R:, R:], 1, 0
    )  # (*bh, T, R, R)
    smooth_sub = local_gram[..., R:, :R]  # (*bh, T-1, R, R): rows u[t+1], columns u[t]
    row_sums = w_s * local.sum(-2)  # (*bh, T-1, 2R): eps coupling of the interval's rows
    coupling = F.pad(row_sums[..., :R], (0, 0, 0, 1)) + F.pad(row_sums[..., R:], (0, 0, 1, 0))

    # central rows, one per step t+1 (t = 0..T-3) and state, s = h_t + h_{t+1}:
    # w_s * (eps - s^(R-3) u[t,d,R-2] - s^(R-2) u[t+1,d,R-1] + s^(R-3) u[t+2,d,R-2])
    lhs_batch = torch.broadcast_shapes(c.shape[:-4], h.shape[:-1])
    if T > 2:
        s = h[..., :-1] + h[..., 1:]  # (*bh, T-2)
        va = -w_s * s ** (R - 3)  # on u[t, d, R-2]
        vb = -w_s * s ** (R - 2)  # on u[t+1, d, R-1]
        vc = w_s * s ** (R - 3)  # on u[t+2, d, R-2]

        def unit(i: int, j: int) -> torch.Tensor:
            e = torch.zeros(R, R, dtype=dtype, device=device)
            e[i, j] = 1.0
            return e

        def at(x: torch.Tensor, i: int, j: int) -> torch.Tensor:  # (*bh, n) -> (*bh, n, R, R)
            return x[..., None, None] * unit(i, j)

        lo, hi = R - 2, R - 1
        smooth_diag = (
            smooth_diag
            + _pad_steps(at(va * va, lo, lo), 0, 2)
            + _pad_steps(at(vb * vb, hi, hi), 1, 1)
            + _pad_steps(at(vc * vc, lo, lo), 2, 0)
        )
        smooth_sub = (
            smooth_sub
            + _pad_steps(at(vb * va, hi, lo), 0, 1)
            + _pad_steps(at(vc * vb, lo, hi), 1, 0)
        )
        sub2 = _kron_states(at(vc * va, lo, lo), D)
        order_lo = torch.zeros(R, dtype=dtype, device=device)
        order_lo[lo] = 1.0
        order_hi = torch.zeros(R, dtype=dtype, device=device)
        order_hi[hi] = 1.0
        coupling = (
            coupling
            + F.pad((w_s * va)[..., None] * order_lo, (0, 0, 0, 2))
            + F.pad((w_s * vb)[..., None] * order_hi, (0, 0, 1, 1))
            + F.pad((w_s * vc)[..., None] * order_lo, (0, 0, 2, 0))
        )
    else:
        sub2 = torch.zeros(*lhs_batch, 0, m, m, dtype=dtype, device=device)

    n_smooth = 2 * (T - 1) * D * (R - 1) + max(T - 2, 0) * D
    coupling = coupling.unsqueeze(-2).expand(*coupling.shape[:-1], D, R).flatten(-2)
    return _BandedGram(
        diag=diag + _kron_states(smooth_diag, D),
        sub=_kron_states(smooth_sub, D),
        sub2=sub2,
        coupling=coupling,
        corner=w_s**2 * n_smooth,
    )


# ----------------------------------------------------------------------------- setup


def _as_scalar(value: Weight, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _check_real(name: str, value) -> None:
    """A finite real scalar (python number or 0-dim tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        ok = bool(torch.isfinite(value.detach()))
    else:
        try:
            ok = math.isfinite(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not ok:
        raise ValueError(f"{name} must be finite, got {value!r}")


def _setup(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None,
    n_init_var_steps: int | None,
    weights: tuple[Weight, Weight, Weight],
    gamma: Weight,
    alpha: Weight,
    check_inputs: bool,
) -> tuple[OdeProblem, _BandedGram, torch.Tensor]:
    """Validate, build the banded C^T C and the right-hand side C^T r + gamma alpha e_0.

    Returns:
        (problem, gram, rhs ``(*batch, 1 + T*D*R)``).
    """
    problem = prepare_problem(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        check_values=check_inputs,
    )
    weight_names = ("weight_equation", "weight_init_var", "weight_smooth")
    for name, w in zip(weight_names, weights, strict=True):
        check_weight(name, w)
    check_weight("gamma", gamma)
    _check_real("alpha", alpha)
    T, S = problem.n_steps, problem.n_init_var_steps
    E, D, R, K = problem.n_equations, problem.n_dims, problem.n_orders, problem.n_init_orders
    if R < 2:
        raise ValueError(
            f"the MNN baselines need n_orders R >= 2 (coefficients has R={R}): the Taylor rows "
            "cover orders 0..R-2 and the central rows orders R-2 and R-1"
        )
    c = problem.coefficients
    w_eq, w_in, w_s = (_as_scalar(w, c) for w in weights)
    gram = _mnn_gram(problem, w_eq, w_in, w_s)

    # C^T r: only equation rows (w_eq b) and initial rows (w_in u0) have a right-hand side
    batch = tuple(problem.batch_shape)
    b = problem.rhs_equation.expand(*problem.rhs_equation.shape[:-2], T, E)
    u0 = problem.init_vars.expand(*problem.init_vars.shape[:-3], S, D, K)
    u_rhs = (w_eq**2 * c * b[..., None, None]).sum(-3)  # (*, T, D, R); c's T may be 1
    u_rhs = u_rhs + F.pad(w_in**2 * u0, (0, R - K, 0, 0, 0, T - S))
    u_rhs = u_rhs.expand(*batch, T, D, R).flatten(-3)
    eps_rhs = (_as_scalar(gamma, c) * _as_scalar(alpha, c)).expand(*batch, 1)
    return problem, gram, torch.cat([eps_rhs, u_rhs], dim=-1)


def _split(z: torch.Tensor, problem: OdeProblem, return_eps: bool):
    u = z[..., 1:].reshape(*z.shape[:-1], problem.n_steps, problem.n_dims, problem.n_orders)
    return (u, z[..., 0]) if return_eps else u


# ----------------------------------------------------------------------------- dense


class _DenseCholeskySolve(torch.autograd.Function):
    """z = G^{-1} rhs with G = C^T C assembled densely from its bands; dense Cholesky solve.

    Forward: G dense (:meth:`_BandedGram.dense`), G = L L^T (``torch.linalg.cholesky_ex``),
    z = ``cholesky_solve(rhs, L)``. O(n^3) time and O(n^2) memory per system, n = 1 + T*D*R.

    Backward, reusing L: lambda = G^{-1} g (G is symmetric), dl/drhs = lambda and
    dl/dG = -lambda z^T. Only the entries that the bands fill are needed, so the gradient of each
    band is read off lambda and z directly (a block X placed at rows a, columns b and, as X^T, at
    rows b, columns a gets -(lambda_a z_b^T + z_a lambda_b^T)); nothing of size n^2 is formed and
    there is no O(n^3) work. Gradients are exact for the symmetric perturbations that the inputs
    cause (the Cholesky factorization reads one triangle of G; the antisymmetric part of
    -lambda z^T contracts to zero against symmetric changes).

    Inputs: the fields of :class:`_BandedGram` (diag, sub, sub2, coupling, corner) at the lhs
    batch shape and rhs ``(*batch, n)``.
    """

    @staticmethod
    def forward(ctx, diag, sub, sub2, coupling, corner, rhs):
        gram = _BandedGram(diag, sub, sub2, coupling, corner).dense()
        factor, info = torch.linalg.cholesky_ex(gram)
        del gram
        failed = info != 0
        if bool(failed.any()):
            entries = [tuple(int(i) for i in idx) for idx in torch.nonzero(failed)[:10].tolist()]
            raise NonPositivePivotError(
                f"mnn_dense: C^T C is not positive definite for {int(failed.sum())} of "
                f"{failed.numel()} systems (batch indices {entries}); check for all-zero "
                "coefficients or extreme steps"
            )
        z = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        ctx.save_for_backward(factor, z)
        ctx.shapes = [x.shape for x in (diag, sub, sub2, coupling, corner)]
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        factor, z = ctx.saved_tensors
        lam = torch.cholesky_solve(grad_z.unsqueeze(-1), factor).squeeze(-1)
        T, m = ctx.shapes[0][-3], ctx.shapes[0][-1]
        l0, lu = lam[..., 0], lam[..., 1:].unflatten(-1, (T, m))  # (*batch,), (*batch, T, m)
        z0, zu = z[..., 0], z[..., 1:].unflatten(-1, (T, m))

        def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.einsum("...ti,...tj->...tij", a, b)

        def band(k: int) -> torch.Tensor:  # block X at G[u_{t+k}, u_t] and X^T at G[u_t, u_{t+k}]
            return -(
                outer(lu[..., k:, :], zu[..., :-k, :]) + outer(zu[..., k:, :], lu[..., :-k, :])
            )

        grads = [
            -outer(lu, zu),
            band(1),
            band(2) if T > 2 else None,
            -(l0[..., None, None] * zu + z0[..., None, None] * lu),
            -(l0 * z0),
        ]
        grads = [
            None if g is None or not need else g.sum_to_size(shape)
            for g, need, shape in zip(grads, ctx.needs_input_grad[:5], ctx.shapes, strict=True)
        ]
        return (*grads, lam)


def mnn_dense(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
    gamma: Weight = 0.05,
    alpha: Weight = 0.0,
    check_inputs: bool = True,
    return_eps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The original MNN "dense" solver: dense C^T C and a dense Cholesky solve.

    z = (C^T C)^{-1} (C^T r + gamma * alpha * e_0) over z = [eps, u] (see the module docstring).
    Memory O(batch * (T D R)^2), time O(batch * (T D R)^3). Differentiable: autograd through the
    vectorised assembly of C^T C, and a custom backward for the solve that reuses the Cholesky
    factor (lambda = (C^T C)^{-1} g, dl/d(C^T C) = -lambda z^T: O((T D R)^2), no second
    factorization). The normal matrix is kept at the broadcast batch shape of
    the coefficients and steps (shared left-hand sides are factorized once).

    Args:
        coefficients: c ``(..., T or 1, E, D, R)``, R >= 2.
        rhs_equation: b ``(..., T or 1, E)``.
        init_vars: u0 ``(..., S or 1, D, K)``.
        steps: h ``(..., T-1 or 1)``, positive.
        n_steps, n_init_var_steps: T and S when they cannot be read off the shapes.
        weight_equation, weight_init_var, weight_smooth: positive row weights (module docstring).
        gamma: positive scalar (weight of ||z||^2 in the MNN quadratic program).
        alpha: real scalar (linear cost on eps); only the product gamma * alpha enters.
        check_inputs: check values (finite, positive steps); shapes are always checked.
        return_eps: also return the slack variable.

    Returns:
        u ``(*batch, T, D, R)``, or (u, eps ``(*batch,)``) when ``return_eps``.

    Raises:
        ValueError: bad inputs, naming the argument.
        NonPositivePivotError: C^T C is not numerically positive definite for some batch entries.
    """
    problem, gram, rhs = _setup(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        (weight_equation, weight_init_var, weight_smooth),
        gamma,
        alpha,
        check_inputs,
    )
    z = _DenseCholeskySolve.apply(gram.diag, gram.sub, gram.sub2, gram.coupling, gram.corner, rhs)
    return _split(z, problem, return_eps)


# ----------------------------------------------------------------------------- CG


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched inner product over the last axis: ``(*batch, n)`` x2 -> ``(*batch,)``."""
    return torch.einsum("...i,...i->...", a, b)


def _conjugate_gradient(
    gram_apply, rhs: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, dict]:
    """Batched CG for G x = rhs, G symmetric positive definite, x_0 = 0. No autograd.

    Each system stops on its own once its CG residual satisfies ||r_k|| <= tol * ||rhs|| (its
    iterate is then frozen while the others continue); at most ``max_iter`` iterations.

    Args:
        gram_apply: x ``(*batch, n)`` -> G x ``(*batch, n)``.
        rhs: ``(*batch, n)``.

    Returns:
        x ``(*batch, n)`` and info: ``iterations`` (int64 ``(*batch,)``), ``relative_residual``
        (``(*batch,)``, ||r_k|| / ||rhs|| of the CG recurrence, 0 for a zero right-hand side),
        ``converged`` (bool ``(*batch,)``).
    """
    rhs = rhs.contiguous()  # e.g. an expanded upstream gradient: keep the loop on dense memory
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = _dot(r, r)
    rhs_norm = rs.sqrt()
    threshold = tol * rhs_norm
    active = rs.sqrt() > threshold
    iterations = torch.zeros(rhs.shape[:-1], dtype=torch.long, device=rhs.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        gp = gram_apply(p)
        p_gp = _dot(p, gp)
        step = torch.where(active, rs / torch.where(active, p_gp, torch.ones_like(p_gp)), 0.0)
        x = x + step.unsqueeze(-1) * p
        r = r - step.unsqueeze(-1) * gp
        rs_new = _dot(r, r)
        ratio = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), 0.0)
        p = r + ratio.unsqueeze(-1) * p
        rs = torch.where(active, rs_new, rs)
        iterations = iterations + active.long()
        active = active & (rs.sqrt() > threshold)
    safe_norm = rhs_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    rel = torch.where(rhs_norm > 0, rs.sqrt() / safe_norm, 0.0)
    converged = rs.sqrt() <= threshold
    return x, {"iterations": iterations, "relative_residual": rel, "converged": converged}


def _warn_if_not_converged(info: dict, max_iter: int, tol: float, where: str) -> None:
    bad = ~info["converged"]
    if bool(bad.any()):
        worst = float(info["relative_residual"].max())
        n_bad, n = int(bad.sum()), bad.numel()
        message = (
            f"mnn_cg ({where}): {n_bad} of {n} systems did not converge in "
            f"max_iter={max_iter} iterations (worst relative residual {worst:.3g} > tol={tol:g})"
        )
        warnings.warn(
            MNNConvergenceWarning(message, where, n_bad, n, worst, max_iter, tol), stacklevel=3
        )


class _ImplicitCGSolve(torch.autograd.Function):
    """Returns the (detached) CG solution z*; its backward runs a second CG solve.

    The solution is defined implicitly by Q(theta, z) = C^T r + gamma alpha e_0 - (C^T C) z = 0.
    The caller builds Q(theta, z*) with autograd from the inputs theta and a detached z*, so its
    value is ~0 and dQ/dtheta is the partial derivative at fixed z. Implicit differentiation gives
    dz*/dtheta = (C^T C)^{-1} dQ/dtheta, hence for an upstream gradient g = dl/dz*:
    dl/dtheta = lambda^T dQ/dtheta with lambda = (C^T C)^{-1} g (C^T C is symmetric). Returning
    lambda as the gradient of Q lets autograd finish the chain rule lambda^T dQ/dtheta.
    """

    @staticmethod
    def forward(ctx, residual, z_star, gram, max_iter, tol):
        ctx.gram = gram
        ctx.max_iter = max_iter
        ctx.tol = tol
        return z_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        lam, info = _conjugate_gradient(ctx.gram.apply, grad_z, ctx.max_iter, ctx.tol)
        _warn_if_not_converged(info, ctx.max_iter, ctx.tol, "backward")
        return lam, None, None, None, None


def mnn_cg(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
    gamma: Weight = 0.05,
    alpha: Weight = 0.0,
    check_inputs: bool = True,
    return_eps: bool = False,
    max_iter: int = 200,
    tol: float = 1e-12,
    return_info: bool = False,
):
    """The original MNN "sparse" solver: conjugate gradient on C^T C z = C^T r + gamma alpha e_0.

    The dense C^T C is never formed: each CG iteration multiplies with its bands of m x m blocks
    (m = D*R) and its eps row, O(batch * T * m^2) work and memory. All systems iterate together
    from z_0 = 0; each stops once ||r_k|| <= tol * ||rhs|| (r_k the CG residual), at most
    ``max_iter`` iterations.
    If some systems do not converge, a :class:`MNNConvergenceWarning` says how many and the
    worst relative residual (their last iterate is returned). Gradients come from implicit
    differentiation: the backward pass solves (C^T C) lambda = dl/dz by CG with the same
    ``max_iter`` and ``tol`` (and warns the same way); no double backward.

    Args: as :func:`mnn_dense`, plus
        max_iter: positive int, iteration cap (forward and backward).
        tol: positive relative tolerance (the default 1e-12 suits float64; in float32 use
            about 1e-6, otherwise no system can converge and every call warns).
        return_info: also return a dict with per-system ``iterations`` (int64 ``(*batch,)``),
            ``relative_residual`` (``(*batch,)``) and ``converged`` (bool ``(*batch,)``) of the
            forward solve.

    Returns:
        u ``(*batch, T, D, R)``; (u, eps) when ``return_eps``; info appended when
        ``return_info``: (u, info) or (u, eps, info).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number, got {tol!r}") from None
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol!r}")
    problem, gram, rhs = _setup(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        (weight_equation, weight_init_var, weight_smooth),
        gamma,
        alpha,
        check_inputs,
    )
    gram_const = gram.detach()
    with torch.no_grad():
        z_star, info = _conjugate_gradient(gram_const.apply, rhs.detach(), max_iter, tol)
    _warn_if_not_converged(info, max_iter, tol, "forward")

    if torch.is_grad_enabled() and (rhs.requires_grad or gram.requires_grad()):
        # residual-shaped input Q(theta) = C^T r + gamma alpha e_0 - (C^T C) z*, value ~0
        residual = rhs - gram.apply(z_star)
        z = _ImplicitCGSolve.apply(residual, z_star, gram_const, max_iter, tol)
    else:
        z = z_star
    out = _split(z, problem, return_eps)
    if not return_info:
        return out
    return (*out, info) if return_eps else (out, info)
