"""Lower bounds ("floors") for one forward+backward step of the S-MNN solver on this machine.

A floor is ``max(bytes / bandwidth, flops / flop_rate)``: the time the step would need if it did
nothing but move the data it cannot avoid moving at the machine's streaming memory bandwidth, or
nothing but its arithmetic at the machine's dense matrix-multiply rate. Both rates are measured
here (:func:`measure_machine_rates`), with the benchmark's thread count. Real small-block kernels
(blocks of 3x3..15x15) reach neither rate, so the ratio measured / floor says how much is left.

What is counted: the work of the lane kernels (:mod:`smnn.solver.lane_kernels`, the CPU engine
of the default sequential method, without central rows) and the arrays they must move through
memory. A floor is a lower bound on the time of *this design* (block LDL^T whose factor is kept
from the forward to the backward kernel, coupling blocks rebuilt from the step sizes): scratch
arrays that stay in cache are not counted, and each array crossing a kernel boundary is counted
once per kernel that touches it. An algorithm that recomputed the factor in the backward pass
would move fewer bytes and do more arithmetic.

Counts per system and step, for blocks of size ``m = D*R``, ``E`` equations (the benchmark uses
``E = D``) and ``P`` right-hand-side columns (1 in the benchmark); a multiply-add is 2 flops:

- flops, forward kernel: assembly of the lower triangle of M_t from the coefficients
  (``E m (m + 1)``) and the Taylor rows (``3 D R (R + 1)``), the right-hand side (``2 E m P``);
  the Schur complement ``M_t - Y_{t-1}^T Y_{t-1}`` (``m^2 (m + 1)``), the pivot Cholesky
  (``m^3 / 3``), the coupling ``Y_t = L_t^{-1} M_{t+1,t}^T`` (``sum_d R (m - dR)(m - dR - 1)``:
  column j of ``M_{t+1,t}^T`` is zero above its state's first row); the substitutions
  (``4 m^2 + 4 D R^2`` per column: two pivot solves and two coupling products).
- flops, backward kernel: the same substitutions for lambda = M^{-1} g, then the chain rule to
  the coefficients and right-hand sides (``8 E m P``) and to the steps (``D R^2 (12 P + 6)``).
- bytes (``itemsize`` each): the inputs (``E m`` coefficients, ``E P`` right-hand sides, one
  step) read by the forward kernel and again by the backward kernel, and their gradients written
  (``3 (E m + E P + 1)``); u written by the forward kernel, read back with its upstream gradient
  by the backward kernel (``3 m P``); the factor that the kernels store, the packed strictly
  lower triangle of L_t and the reciprocals of its diagonal (``m (m + 1) / 2``), written once
  and read once (``m (m + 1)``). The multipliers and the blocks of M are never stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["MachineRates", "measure_machine_rates", "StepCost", "solver_step_cost", "floor_ms"]


@dataclass(frozen=True)
class MachineRates:
    """Measured streaming bandwidth (bytes/s) and dense matmul rate (flop/s) for one dtype."""

    bandwidth: float
    flop_rate: float
    threads: int
    dtype: str


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (page faults, thread pool)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _triad_seconds(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best time of ``c = a + 0.5 b`` on arrays of ``n`` elements (freed on return)."""
    a = torch.rand(n, dtype=dtype)
    b = torch.rand(n, dtype=dtype)
    c = torch.empty(n, dtype=dtype)
    return _best_seconds(lambda: torch.add(a, b, alpha=0.5, out=c), repeats)


def measure_machine_rates(
    dtype: torch.dtype = torch.float64, stream_mb: int = 256, matmul_n: int = 1536, repeats: int = 5
) -> MachineRates:
    """Measure this machine's rates with torch's current thread count (CPU).

    Bandwidth: a triad ``c = a + s * b`` on three arrays of ``stream_mb`` MB each (read two,
    write one; best of ``repeats``). Flop rate: ``matmul_n`` x ``matmul_n`` matrix product
    (``2 n^3`` flops; best of ``repeats``).
    """
    if stream_mb < 1 or matmul_n < 16 or repeats < 1:
        raise ValueError("stream_mb >= 1, matmul_n >= 16 and repeats >= 1 are required")
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = stream_mb * 1_000_000 // itemsize
    bandwidth = 3 * n * itemsize / _triad_seconds(n, dtype, repeats)
    x = torch.rand(matmul_n, matmul_n, dtype=dtype)
    y = torch.rand(matmul_n, matmul_n, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(x, y), repeats)
    flop_rate = 2 * matmul_n**3 / seconds
    return MachineRates(bandwidth, flop_rate, torch.get_num_threads(), str(dtype).split(".")[-1])


@dataclass(frozen=True)
class StepCost:
    """Unavoidable data movement and arithmetic of one forward+backward step."""

    bytes: float
    flops: float


def solver_step_cost(
    B: int, T: int, D: int, R: int, itemsize: int, E: int | None = None, P: int = 1
) -> StepCost:
    """Bytes and flops of one forward+backward S-MNN step over ``B`` systems of ``T`` steps
    with ``P`` right-hand-side columns (counts in the module docstring); ``E`` defaults to
    ``D``."""
    E = D if E is None else E
    m = D * R
    substitution = 4 * m * m + 4 * D * R * R  # per column: pivot solves and coupling products
    coupling = sum(R * (m - d * R) * (m - d * R - 1) for d in range(D))
    forward = (
        E * m * (m + 1)
        + 3 * D * R * (R + 1)
        + 2 * E * m * P  # assembly
        + m * m * (m + 1)
        + m**3 / 3
        + coupling  # Schur complement, Cholesky, Y_t
        + substitution * P
    )
    backward = substitution * P + 8 * E * m * P + D * R * R * (12 * P + 6)
    inputs = E * m + E * P + 1
    factor = m * (m + 1) // 2
    elements_per_step = 3 * inputs + 3 * m * P + 2 * factor
    n = B * T
    return StepCost(
        bytes=float(n * elements_per_step * itemsize), flops=float(n * (forward + backward))
    )


def floor_ms(cost: StepCost, rates: MachineRates) -> float:
    """``max(bytes / bandwidth, flops / flop_rate)`` in milliseconds."""
    return 1e3 * max(cost.bytes / rates.bandwidth, cost.flops / rates.flop_rate)
