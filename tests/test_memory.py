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


# ------------------------------------------------------------------ predicting and refusing


def test_a_huge_model_is_refused_naming_its_key_without_allocating():
    from smnn.memory import (
        MemoryBudgetError,
        check_memory_budget,
        parameter_count,
        predict_step_bytes,
    )

    hidden = 1_000_000  # lorenz.model.hidden: 1000000 -> two 10^6 x 10^6 layers
    n = parameter_count(
        lambda: torch.nn.Sequential(torch.nn.Linear(10, hidden), torch.nn.Linear(hidden, hidden))
    )
    assert n == 10 * hidden + hidden + hidden * hidden + hidden
    estimate = predict_step_bytes(
        solver="smnn", batch=64, n_steps=100, n_dims=3, n_orders=3, dtype=torch.float64,
        n_params=n, keys={"model": ["lorenz.model.hidden"]},
    )  # fmt: skip
    assert estimate.parts["model"] == n * 8 * 4  # parameters, gradients, Adam's two states
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(
            estimate, 16 * 10**9, what="lorenz training", override_key="memory_budget_gb"
        )
    message = str(info.value)
    assert "lorenz.model.hidden" in message and "memory_budget_gb" in message
    assert "32 TB" in message and "16 GB" in message


def test_check_training_memory_names_the_experiments_budget_key():
    """The experiments' shared check: the step is predicted with the solver given, compared with
    the budget in GB, and the message names ``<experiment>.train.memory_budget_gb``."""
    from smnn.memory import MemoryBudgetError, check_training_memory, predict_step_bytes

    step = dict(batch=512, n_steps=100, n_dims=1, n_orders=5, dtype=torch.float64,
                keys={"solver": ["kdv.train.batch_size"]})  # fmt: skip
    need = predict_step_bytes(solver="mnn_dense", **step).total
    check_training_memory("kdv", "mnn_dense", "cpu", 1.01 * need / 1e9, **step)  # fits
    with pytest.raises(MemoryBudgetError) as info:
        check_training_memory("kdv", "mnn_dense", "cpu", 0.99 * need / 1e9, **step)
    message = str(info.value)
    assert "kdv training with mnn_dense" in message and "kdv.train.batch_size" in message
    assert "kdv.train.memory_budget_gb" in message


@pytest.mark.parametrize("solver", ["smnn", "mnn_cg", "mnn_dense"])
def test_every_solver_is_predicted_and_a_huge_batch_refused(solver):
    from smnn.memory import MemoryBudgetError, check_memory_budget, predict_step_bytes

    estimate = predict_step_bytes(
        solver=solver, batch=100_000_000, n_steps=64, n_dims=1, n_orders=3,
        dtype=torch.float64, keys={"solver": ["sst.scaling.batch_size"]},
    )  # fmt: skip
    with pytest.raises(MemoryBudgetError, match=r"sst\.scaling\.batch_size"):
        check_memory_budget(estimate, 20 * 10**9, what="sst scaling", override_key="x.budget")
    small = predict_step_bytes(
        solver=solver, batch=4, n_steps=64, n_dims=1, n_orders=3, dtype=torch.float64
    )
    check_memory_budget(small, 20 * 10**9, what="sst scaling", override_key="x.budget")


def _solver_inputs(batch: int, n_steps: int, n_dims: int, n_orders: int):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(batch, n_steps, n_dims, n_dims, n_orders, generator=g, dtype=torch.float64)
    c[..., -1] = 1.0
    b = torch.randn(batch, n_steps, n_dims, generator=g, dtype=torch.float64)
    u0 = torch.randn(batch, 1, n_dims, n_orders - 1, generator=g, dtype=torch.float64)
    h = torch.full((batch, n_steps - 1), 0.01, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (c, b, u0)] + [h]


@pytest.mark.parametrize(
    ("solver", "shape"),
    [("smnn", (8, 1024, 1, 3)), ("smnn", (2, 1024, 3, 3)), ("mnn_cg", (4, 1024, 3, 3)),
     ("mnn_dense", (2, 500, 1, 3))],
)  # fmt: skip
def test_prediction_covers_the_measured_peak(solver, shape):
    """The measured peak of a forward+backward solve stays below the prediction, and the
    prediction is not absurdly above it (within 30x)."""
    import warnings

    from smnn.memory import solver_step_bytes
    from smnn.solver.registry import solver_info

    fn = solver_info(solver).function
    inputs = _solver_inputs(*shape)

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CG's convergence warnings
            fn(*inputs).square().sum().backward()

    step()  # first-call costs (compilation, allocator pools)
    _, peak = measure_peak_memory(step, device="cpu")
    predicted = solver_step_bytes(solver, *shape, torch.float64)
    assert peak <= predicted, (peak, predicted)
    assert predicted <= 30 * max(peak, 1), (peak, predicted)
