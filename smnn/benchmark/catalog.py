"""What the benchmark measures: the methods, the shapes and the grids, and the inputs of a case.

Methods (:data:`METHODS`) are the solvers of the registry (:data:`smnn.solver.registry.SOLVERS`:
``smnn``, ``mnn_dense``, ``mnn_cg``) plus the S-MNN variants that force one ``method`` of
:func:`smnn.ode_forward` (``smnn_sequential``: block LDL^T of the normal equations;
``smnn_cyclic``: block cyclic reduction; ``smnn_qr``: the orthogonal factorization of the rows,
docs/solver.md, "The orthogonal (QR) solve"). ``smnn_qr`` exists only where the installed solver has
``method="qr"`` (:func:`qr_available`); elsewhere it stays in :data:`METHODS`, with
``Method.unavailable`` saying why, and its rows are skipped with that note. Each method has a
``family``: ``smnn`` (the S-MNN solver and its variants; the "best S-MNN method" of a case is the
fastest of these), ``baseline`` (the original MNN solvers, which solve a different system:
docs/solver.md, "Baselines from the original MNN") or ``peer`` (another implementation of the same
function, given with ``--peer``; :mod:`smnn.benchmark.peer`).

Shapes (``B`` systems of ``T`` steps, ``D`` states, ``R`` orders; always ``E = D`` equations and
one initial step ``S = 1`` holding the order-0 values, ``K = 1``):

- the named shapes of docs/solver.md, "Complexity and performance targets"
  (:data:`NAMED_SHAPES`): lorenz, kdv, sst, long at T = 16384 and T = 65536, coupled;
- a sweep over T = 2^6 .. 2^16 at B = 8, D = 1, R = 3 (:func:`t_sweep`);
- a sweep over B = 2^0 .. 2^14 at T = 256, D = 1, R = 3 (:func:`batch_sweep`).

Quick mode (:func:`default_grid` with ``quick=True``) trims the sweeps to T = 2^6, 2^8, 2^10,
2^12 and B = 1, 4, 16, 64, and scales the named shapes' batch down so that B*T*D <= 2^12 (at
least one system); ``Shape.full_B`` keeps the published batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from smnn.solver.registry import SOLVERS, SolverInfo, solver_info

__all__ = [
    "Method",
    "METHODS",
    "DEFAULT_METHODS",
    "FAMILIES",
    "DTYPES",
    "Shape",
    "NAMED_SHAPES",
    "GROUPS",
    "t_sweep",
    "batch_sweep",
    "default_grid",
    "make_inputs",
    "dtype_name",
    "qr_available",
    "solver_methods",
]

DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
FAMILIES = ("smnn", "baseline", "peer")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float64`` -> ``"float64"``."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A solver under test.

    ``solve(c, b, u0, h)`` returns ``(u (B, T, D, R), info)``; ``info`` may hold ``converged``
    (bool). ``dense`` marks methods that build the dense (1 + T*D*R)^2 matrix per system;
    ``family`` is one of :data:`FAMILIES`; ``unavailable``, when not empty, says why this
    install cannot run the method.
    """

    name: str
    solve: Callable[..., tuple[torch.Tensor, dict]]
    family: str = "smnn"
    dense: bool = False
    label: str = ""
    description: str = ""
    unavailable: str = ""  # non-empty: why this install cannot run it (its rows are skipped)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family must be one of {FAMILIES}")
        if not self.label:
            object.__setattr__(self, "label", self.name)


def _registry_solve(info: SolverInfo, c, b, u0, h) -> tuple[torch.Tensor, dict]:
    return info.solve_with_info(c, b, u0, h)  # MNN CG warnings: see measure.timed_step


def _smnn_variant(engine: str, c, b, u0, h) -> tuple[torch.Tensor, dict]:
    return solver_info("smnn").function(c, b, u0, h, method=engine), {}


def solver_methods() -> tuple[str, ...]:
    """The ``method`` values :func:`smnn.ode_forward` accepts in this install."""
    from smnn.solver.api import METHODS as SOLVER_METHODS

    return tuple(SOLVER_METHODS)


def qr_available() -> bool:
    """Whether the installed solver has ``method="qr"`` (docs/solver.md, "The orthogonal (QR)
    solve")."""
    return "qr" in solver_methods()


# the S-MNN variants: engine -> what it is
_ENGINES = {
    "sequential": "sequential block LDL^T of the normal equations",
    "cyclic": "block cyclic reduction of the normal equations",
    "qr": "orthogonal (QR) factorization of the rows",
}


def _methods() -> dict[str, Method]:
    out: dict[str, Method] = {}
    engines = solver_methods()
    for info in SOLVERS.values():
        family = "smnn" if info.name == "smnn" else "baseline"
        out[info.name] = Method(
            info.name,
            partial(_registry_solve, info),
            family=family,
            dense=info.dense,
            label=info.label,
            description=info.description,
        )
        if info.name == "smnn":  # its engine variants right after it
            for engine, what in _ENGINES.items():
                name = f"smnn_{engine}"
                missing = (
                    ""
                    if engine in engines
                    else (
                        f"method={engine!r} is not in smnn.solver.METHODS {engines} of this install"
                    )
                )
                out[name] = Method(
                    name,
                    partial(_smnn_variant, engine),
                    family="smnn",
                    label=f"{info.label} {engine}",
                    description=f"S-MNN, {what}",
                    unavailable=missing,
                )
    return out


METHODS: dict[str, Method] = _methods()
# the S-MNN solver as users call it, each engine forced, the original MNN solvers (smnn_qr only
# where this install has it)
DEFAULT_METHODS = tuple(
    m
    for m in ("smnn", "smnn_sequential", "smnn_qr", "smnn_cyclic", "mnn_dense", "mnn_cg")
    if not METHODS[m].unavailable
)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One benchmark case: ``B`` systems of ``T`` steps, ``D`` states, ``R`` orders.

    ``group`` is ``"named"``, ``"T_sweep"`` or ``"batch_sweep"``; ``full_B`` is the batch of the
    published shape when ``B`` was scaled down (quick mode), else equal to ``B``.
    """

    case: str
    group: str
    B: int
    T: int
    D: int
    R: int
    full_B: int = field(default=0)

    def __post_init__(self) -> None:
        if self.full_B == 0:
            object.__setattr__(self, "full_B", self.B)
        for name in ("B", "T", "D", "R"):
            if getattr(self, name) < (2 if name == "T" else 1):
                raise ValueError(f"shape {self.case}: {name} must be >= {2 if name == 'T' else 1}")

    @property
    def unknowns(self) -> int:
        """B * T * D * R: the size by which the time budget orders cases."""
        return self.B * self.T * self.D * self.R

    @property
    def scaled(self) -> bool:
        return self.B != self.full_B


NAMED_SHAPES: tuple[Shape, ...] = (
    Shape("lorenz", "named", 1536, 50, 1, 3),
    Shape("kdv", "named", 8192, 10, 1, 5),
    Shape("sst", "named", 12960, 208, 1, 3),
    Shape("long_T16384", "named", 8, 16384, 1, 3),
    Shape("long_T65536", "named", 8, 65536, 1, 3),
    Shape("coupled", "named", 64, 1000, 3, 3),
)
GROUPS = ("named", "T_sweep", "batch_sweep")
QUICK_MAX_ELEMENTS = 2**12  # quick mode: named shapes scaled so that B*T*D <= this


def t_sweep(exponents: Sequence[int] = range(6, 17), B: int = 8, D: int = 1, R: int = 3):
    """Shapes with T = 2^e for each exponent (ascending), named ``T<T>``."""
    return [Shape(f"T{2**e}", "T_sweep", B, 2**e, D, R) for e in sorted(exponents)]


def batch_sweep(exponents: Sequence[int] = range(0, 15), T: int = 256, D: int = 1, R: int = 3):
    """Shapes with B = 2^e for each exponent (ascending), named ``B<B>``."""
    return [Shape(f"B{2**e}", "batch_sweep", 2**e, T, D, R) for e in sorted(exponents)]


def _quick_named(shape: Shape) -> Shape:
    if shape.B * shape.T * shape.D <= QUICK_MAX_ELEMENTS:
        return shape
    B = max(1, QUICK_MAX_ELEMENTS // (shape.T * shape.D))
    return Shape(shape.case, shape.group, B, shape.T, shape.D, shape.R, full_B=shape.B)


def default_grid(quick: bool) -> list[Shape]:
    """Named shapes, T sweep and batch sweep; trimmed and scaled in quick mode (module doc)."""
    if quick:
        return [
            *(_quick_named(s) for s in NAMED_SHAPES),
            *t_sweep(range(6, 13, 2)),
            *batch_sweep(range(0, 7, 2)),
        ]
    return [*NAMED_SHAPES, *t_sweep(), *batch_sweep()]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random well-conditioned inputs, all leaf tensors with ``requires_grad``.

    Returns coefficients ``(B, T, D, D, R)`` (small random entries plus 1 on the highest order
    of state e in equation e), rhs ``(B, T, D)``, init_vars ``(B, 1, D, 1)`` and steps
    ``(B, T-1)`` uniform in [0.05, 0.15]. Drawn in float64 from a generator seeded with
    ``seed`` and then cast, so every method and dtype of a case sees the same problem.
    """
    B, T, D, R = shape.B, shape.T, shape.D, shape.R
    g = torch.Generator().manual_seed(seed)
    c = 0.1 * torch.randn(B, T, D, D, R, generator=g, dtype=torch.float64)
    idx = torch.arange(D)
    c[:, :, idx, idx, R - 1] += 1.0
    b = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    u0 = torch.randn(B, 1, D, 1, generator=g, dtype=torch.float64)
    h = 0.05 + 0.1 * torch.rand(B, T - 1, generator=g, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(True) for x in (c, b, u0, h))
