"""measure_peak_memory against allocations of known size (real allocations, no mocks)."""

from __future__ import annotations

import pytest
import torch

from smnn.memory import (
    cpu_peak_method,
    measure_peak_memory,
    measure_peak_memory_profiler,
    measure_peak_memory_rss,
)

MB = 1_000_000


def allocate_and_touch(n_bytes: int) -> float:
    """Allocate ``n_bytes`` as a tensor, write every byte, return a value read from it."""
    x = torch.full((n_bytes,), 7, dtype=torch.uint8)
    return float(x[::4096].sum())


def allocate_nothing() -> float:
    return sum(float(i) for i in range(1000))


def allocate_free_allocate(first: int, second: int) -> None:
    """Two allocations, the first freed before the second: the peak is the larger, not the sum."""
    a = torch.full((first,), 1, dtype=torch.uint8)
    del a
    b = torch.full((second,), 1, dtype=torch.uint8)
    del b


MEASURERS = {
    "default": measure_peak_memory,
    "profiler": measure_peak_memory_profiler,
}
if cpu_peak_method() == "rss":
    MEASURERS["rss"] = measure_peak_memory_rss


@pytest.mark.parametrize("name", sorted(MEASURERS))
def test_large_small_and_empty_allocations(name):
    measure = MEASURERS[name]
    result, big = measure(allocate_and_touch, 200 * MB)
    assert result == float(7 * len(range(0, 200 * MB, 4096)))  # fn really ran, result passed back
    _, small = measure(allocate_and_touch, 20 * MB)
    _, nothing = measure(allocate_nothing)
    assert big >= 190 * MB
    assert big <= 230 * MB
    assert 7.0 <= big / small <= 13.0
    assert nothing <= 4 * MB


@pytest.mark.parametrize("name", sorted(MEASURERS))
def test_memory_held_before_the_call_is_not_counted(name):
    measure = MEASURERS[name]
    held = torch.full((150 * MB,), 3, dtype=torch.uint8)
    _, peak = measure(allocate_and_touch, 30 * MB)
    assert 27 * MB <= peak <= 45 * MB
    assert int(held[-1]) == 3


@pytest.mark.parametrize("name", sorted(MEASURERS))
def test_peak_is_max_of_sequential_allocations_not_sum(name):
    measure = MEASURERS[name]
    _, peak = measure(allocate_free_allocate, 120 * MB, 60 * MB)
    assert 110 * MB <= peak <= 150 * MB


def test_kwargs_are_passed_to_fn():
    def fn(a, *, scale):
        return a * scale

    result, peak = measure_peak_memory(fn, 3, scale=5, device="cpu")
    assert result == 15
    assert peak >= 0


def test_unsupported_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        measure_peak_memory(allocate_nothing, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocation():
    def fn():
        x = torch.ones(50 * MB // 4, device="cuda")
        return float(x.sum())

    _, peak = measure_peak_memory(fn, device="cuda")
    assert 50 * MB <= peak <= 60 * MB
