"""smnn.roofline: the counts behind the benchmark's floors and the measured machine rates."""

from __future__ import annotations

import math

import pytest
import torch

from smnn.roofline import MachineRates, StepCost, floor_ms, measure_machine_rates, solver_step_cost


def test_cost_is_linear_in_batch_and_steps():
    base = solver_step_cost(B=4, T=100, D=1, R=3, itemsize=8)
    for B, T in ((8, 100), (4, 200), (16, 800)):
        cost = solver_step_cost(B=B, T=T, D=1, R=3, itemsize=8)
        factor = (B * T) / (4 * 100)
        assert cost.bytes == pytest.approx(factor * base.bytes)
        assert cost.flops == pytest.approx(factor * base.flops)
    half = solver_step_cost(B=4, T=100, D=1, R=3, itemsize=4)
    assert half.bytes == pytest.approx(base.bytes / 2)
    assert half.flops == pytest.approx(base.flops)


def test_counts_follow_the_documented_terms():
    # one scalar state of order 3 (m = 3), one equation, one column, float64, one system step:
    # inputs and gradients 3 (E m + E P + 1), u traffic 3 m P, the stored factor (packed lower
    # triangle and reciprocal diagonal, m (m + 1) / 2) written once and read once
    m, E, D, R, P = 3, 1, 1, 3, 1
    elements = 3 * (E * m + E * P + 1) + 3 * m * P + 2 * (m * (m + 1) // 2)
    substitution = 4 * m * m + 4 * D * R * R
    coupling = R * m * (m - 1)
    forward = (
        E * m * (m + 1)
        + 3 * D * R * (R + 1)
        + 2 * E * m * P
        + m * m * (m + 1)
        + m**3 / 3
        + coupling
        + substitution * P
    )
    backward = substitution * P + 8 * E * m * P + D * R * R * (12 * P + 6)
    cost = solver_step_cost(B=1, T=1, D=1, R=3, itemsize=8)
    assert cost.bytes == elements * 8
    assert cost.flops == pytest.approx(forward + backward)
    # more columns: the substitutions and the right-hand-side traffic grow, the factor does not
    wide = solver_step_cost(B=1, T=1, D=1, R=3, itemsize=8, P=4)
    assert wide.bytes - cost.bytes == 8 * (3 * E * 3 + 3 * m * 3)
    # coupled states: m = D R grows the cubic factorization terms fastest
    coupled = solver_step_cost(B=1, T=1, D=3, R=3, itemsize=8)
    assert coupled.flops > 7 * cost.flops


def test_no_multiplier_is_counted():
    """The kernels keep only L_t (packed) and its reciprocal diagonal: the bytes of the factor
    grow as m (m + 1), not as the m^2 multipliers plus the triangle of older kernels."""
    for R in (3, 5):
        m = R
        base = solver_step_cost(B=1, T=1, D=1, R=R, itemsize=1)
        inputs = 3 * (m + 1 + 1) + 3 * m
        assert base.bytes - inputs == m * (m + 1)


def test_floor_is_the_larger_of_the_two_bounds():
    rates = MachineRates(bandwidth=1e10, flop_rate=1e11, threads=2, dtype="float64")
    memory_bound = StepCost(bytes=1e9, flops=1e9)  # 100 ms of traffic, 10 ms of arithmetic
    assert floor_ms(memory_bound, rates) == pytest.approx(100.0)
    compute_bound = StepCost(bytes=1e6, flops=1e11)
    assert floor_ms(compute_bound, rates) == pytest.approx(1000.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_measured_rates_are_plausible(dtype):
    rates = measure_machine_rates(dtype, stream_mb=16, matmul_n=256, repeats=2)
    assert rates.dtype == str(dtype).split(".")[-1]
    assert rates.threads == torch.get_num_threads()
    # any machine that runs torch: between 100 MB/s and 10 TB/s, 10 MFLOP/s and 1 PFLOP/s
    assert 1e8 < rates.bandwidth < 1e13 and math.isfinite(rates.bandwidth)
    assert 1e7 < rates.flop_rate < 1e15 and math.isfinite(rates.flop_rate)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="matmul_n"):
        measure_machine_rates(matmul_n=4)
