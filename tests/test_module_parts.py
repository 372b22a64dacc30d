"""Direct tests of modules the split created: the benchmark catalogue, the Lorenz evaluation
metrics and the Lorenz figures (each against closed forms or its own contract)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smnn.benchmark.catalog import (
    DEFAULT_METHODS,
    METHODS,
    Shape,
    default_grid,
    make_inputs,
)
from smnn.data.lorenz import LorenzParams
from smnn.experiments.lorenz.evaluation import coefficient_metrics, simulation_metrics
from smnn.experiments.lorenz.figures import (
    plot_coefficients,
    plot_losses,
    plot_time_series,
    plot_trajectories,
)
from smnn.experiments.lorenz.models import lorenz_library, true_coefficients
from smnn.memory import solver_step_bytes
from smnn.solver.reference import dense_reference
from smnn.solver.registry import solver_names


def test_catalog_methods_come_from_the_registry_plus_smnn_variants():
    assert set(solver_names()) <= set(METHODS)
    assert {"smnn_sequential", "smnn_cyclic"} <= set(METHODS)
    assert set(DEFAULT_METHODS) <= set(METHODS)
    assert METHODS["mnn_dense"].dense and not METHODS["smnn"].dense
    assert METHODS["mnn_cg"].family == "baseline" and METHODS["smnn_cyclic"].family == "smnn"


def test_catalog_inputs_are_seeded_and_every_smnn_method_solves_them():
    shape = Shape("probe", "named", B=3, T=9, D=2, R=3)
    a = make_inputs(shape, torch.float64, torch.device("cpu"), seed=4)
    b = make_inputs(shape, torch.float64, torch.device("cpu"), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [tuple(x.shape) for x in a] == [(3, 9, 2, 2, 3), (3, 9, 2), (3, 1, 2, 1), (3, 8)]
    assert all(x.requires_grad for x in a)
    ref = dense_reference(*(x.detach() for x in a))
    for name in ("smnn", "smnn_sequential", "smnn_cyclic"):
        u, _ = METHODS[name].solve(*a)
        assert (u.detach() - ref).abs().max() / ref.abs().max() < 1e-10, name


def test_catalog_dense_bytes_and_quick_grid():
    shape = Shape("x", "named", B=2, T=10, D=1, R=3)
    # the benchmark's dense limit is smnn.memory's estimate: B * (1 + T*D*R)^2 * itemsize * 3
    need = solver_step_bytes("mnn_dense", shape.B, shape.T, shape.D, shape.R, torch.float64)
    assert need == 2 * 31 * 31 * 8 * 3
    quick = default_grid(quick=True)
    assert all(s.B * s.T * s.D <= 2**12 or s.B == 1 for s in quick if s.group == "named")
    assert len(default_grid(quick=False)) > len(quick)
    with pytest.raises(ValueError, match="T must be >= 2"):
        Shape("bad", "named", B=1, T=1, D=1, R=3)


def test_coefficient_metrics_count_wrong_terms_and_signs():
    lib = lorenz_library()
    truth = true_coefficients(lib, LorenzParams())
    xi = truth.copy()
    xi[0, 1] = 0.5  # a constant wrongly kept in dy
    xi[lib.term_index("x z"), 1] = 0.0  # x z wrongly dropped from dy
    xi[lib.term_index("z"), 2] *= -1  # wrong sign in dz
    m = coefficient_metrics(xi, truth, lib)
    assert (m["n_wrongly_kept"], m["n_wrongly_dropped"], m["n_sign_errors"]) == (1, 1, 2)
    assert m["n_active_terms"] == 7 and m["sign_pattern_recovered"] == 0
    assert m["coef_dz_z"] == pytest.approx(8 / 3)


def test_simulation_metrics_valid_time_of_a_known_error():
    t = np.arange(200)
    true = np.stack([np.ones(200), np.zeros(200), np.zeros(200)], axis=1)
    sim = true.copy()
    sim[120:, 0] += 1.0  # error 1 > 10 % of the RMS norm 1 from step 120 on
    m = simulation_metrics(sim, true, dt=0.01)
    assert m["simulation_valid_time"] == pytest.approx(1.2)
    assert m["simulation_rmse"] == pytest.approx(np.sqrt(80 / 200))
    assert m["simulation_diverged"] == 0.0 and len(t) == 200
    assert simulation_metrics(sim[:50], true, 0.01)["simulation_diverged"] == 1.0


def test_lorenz_figures_write_pngs(tmp_path):
    lib = lorenz_library()
    truth = true_coefficients(lib, LorenzParams())
    traj = np.cumsum(np.random.default_rng(0).normal(size=(100, 3)), axis=0)
    history = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "loss_solution": 0.5 / (e + 1)} for e in range(6)
    ]
    files = [
        plot_trajectories(traj, traj[:80], tmp_path / "a.png", "solver smnn"),
        plot_time_series(traj, traj[:80], 0.01, tmp_path / "b.png"),
        plot_losses(history, [1.0, 0.5, 0.25], 3, tmp_path / "c.png"),
        plot_coefficients(lib, truth, truth, tmp_path / "d.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
