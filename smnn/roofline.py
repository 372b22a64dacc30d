"""Lower bounds ("floors") for one forward+backward step of the S-MNN solver on this machine.

A floor is ``max(bytes / bandwidth, flops / flop_rate)``: the time the step would need if it did
nothing but move the data it cannot avoid moving at the machine's streaming memory bandwidth, or
nothing but its arithmetic at the machine's dense matrix-multiply rate. Both rates are measured
here (:func:`measure_machine_rates`), with the benchmark's thread count. Real small-block kernels
(blocks of 3x3..15x15) reach neither rate, so the ratio measured / floor says how much is left.

Counts per system and step, for blocks of size ``m = D*R`` and ``E`` equations (the benchmark
uses ``E = D``), the sequential block LDL^T method (cyclic reduction does about twice the
arithmetic, on the same data):

- flops: assembly of the equation blocks ``C_t^T C_t`` (``2 E m^2``) and right-hand side
  (``2 E m``); factorization: the update ``M_t - L_t M_{t,t-1}^T`` (``m^3``, symmetric half
  only), the pivot Cholesky (``m^3 / 3``) and the multiplier ``L_t`` by two triangular solves
  with ``m`` columns (``2 m^3``); two solves (forward and backward pass), each a forward
  substitution, a pivot solve and a backward substitution (``6 m^2``); the block gradients
  ``-lambda u^T`` (``3 m^2``) and their chain rule to the coefficients (``4 E m^2``).
- bytes (``itemsize`` each): what must cross the memory bus at least once: the inputs
  (``E m`` coefficients, ``E`` right-hand sides, one step) read in the forward pass and again in
  the backward pass, the solution written, read back with its upstream gradient, the input
  gradients written, and the factors (``m^2`` multiplier entries and ``m (m + 1) / 2`` Cholesky
  entries), which must survive from the forward to the backward pass: written once, read once.
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
    B: int, T: int, D: int, R: int, itemsize: int, E: int | None = None
) -> StepCost:
    """Bytes and flops of one forward+backward S-MNN step over ``B`` systems of ``T`` steps
    (counts in the module docstring); ``E`` defaults to ``D``."""
    E = D if E is None else E
    m = D * R
    flops_per_step = (
        2 * E * m * m + 2 * E * m  # assembly
        + (1 + 1 / 3 + 2) * m**3  # factorization
        + 2 * 6 * m * m  # forward and backward solves
        + 3 * m * m + 4 * E * m * m  # block gradients and their chain rule
    )
    inputs = E * m + E + 1
    factors = m * m + m * (m + 1) // 2
    elements_per_step = 3 * inputs + 3 * m + 2 * factors
    n = B * T
    return StepCost(bytes=float(n * elements_per_step * itemsize), flops=float(n * flops_per_step))


def floor_ms(cost: StepCost, rates: MachineRates) -> float:
    """``max(bytes / bandwidth, flops / flop_rate)`` in milliseconds."""
    return 1e3 * max(cost.bytes / rates.bandwidth, cost.flops / rates.flop_rate)
