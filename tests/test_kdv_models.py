"""KdV model, training task and evaluation: ResNet1D, the model's ODE and solve, the parameter
count at the published sizes, training through the shared Trainer (validation loss, plateau
schedule), the rollout protocol, persistence and NMSE, reproducible metrics."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from smnn.config import Config, ConfigError
from smnn.data.kdv import build_kdv_dataset, write_kdv_store
from smnn.data.windows import gather_trajectory_windows
from smnn.experiments.base import Experiment
from smnn.experiments.kdv import EXPERIMENT
from smnn.experiments.kdv.evaluation import (
    persistence_forecast,
    rollout,
    rollout_plan,
    score_rollout,
)
from smnn.experiments.kdv.models import KdvModel
from smnn.experiments.kdv.settings import (
    INIT_KERNEL,
    N_INIT_ORDERS,
    N_ORDERS,
    PAPER_PARAMETERS,
    STEP_INIT,
    STEP_KERNEL,
    KdvSettings,
    section_problems,
)
from smnn.experiments.kdv.store import open_store
from smnn.experiments.kdv.tasks import load_model
from smnn.experiments.mnn_layer import MnnLayer
from smnn.experiments.resnet1d import ResNet1D
from smnn.io import atomic_torch_save
from smnn.solver.banded import NonPositivePivotError
from smnn.training import Trainer, TrainerSettings, seed_everything

N_SPLITS, N_TIME, N_X, WINDOW = (6, 2, 2), 30, 32, 10

KDV_SECTION = {
    "enabled": True,
    "solvers": ["smnn"],
    "source": "generate",
    "model": {
        "window": WINDOW, "base_filters": 8, "kernel_size": 5, "n_blocks": 2, "double_every": 1,
        "init_hidden": 8, "step_floor": 1.0e-3,
    },
    "train": {
        "epochs": 4, "batch_size": 8, "lr": 1.0e-3, "plateau_factor": 0.5,
        "plateau_patience": 2, "dtype": "float32", "windows_per_epoch": None,
    },
    "evaluate": {"n_trajectories": None, "sample_trajectories": 2},
}  # fmt: skip


def make_config(**overrides) -> Config:
    section = json.loads(json.dumps(KDV_SECTION))
    for key, value in overrides.items():
        node = section
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return Config({"seed": 3, "device": "cpu", "kdv": section}, source="test")


def settings_of(config: Config) -> KdvSettings:
    return EXPERIMENT.settings(config)


def make_settings(**overrides) -> KdvSettings:
    """The experiment's settings of :func:`make_config` (what the job's edge builds)."""
    return EXPERIMENT.settings(make_config(**overrides))


def write_store(path, seed: int = 0):
    """A small store in the KdV layout: two travelling sine modes per trajectory."""
    rng = np.random.default_rng(seed)
    rows = sum(N_SPLITS)
    length = rng.uniform(20.0, 30.0, rows)
    dt = rng.uniform(0.15, 0.25, rows)
    x = np.arange(N_X)[None] * (length / N_X)[:, None]  # (rows, n_x)
    t = (10 + np.arange(N_TIME))[None] * dt[:, None]  # (rows, T)
    amp, phase = rng.uniform(0.5, 1.0, (rows, 2)), rng.uniform(0, 2 * np.pi, (rows, 2))
    speed = rng.uniform(0.5, 1.5, (rows, 2))
    u = np.zeros((rows, N_TIME, N_X))
    for m in range(2):
        k = 2 * np.pi * (m + 1) / length
        arg = k[:, None, None] * (x[:, None, :] - speed[:, m, None, None] * t[:, :, None])
        u += amp[:, m, None, None] * np.sin(arg + phase[:, m, None, None])
    split = [s for s, n in zip(("train", "valid", "test"), N_SPLITS, strict=True) for _ in range(n)]
    ds = build_kdv_dataset(
        u, split=split, sample=np.concatenate([np.arange(n) for n in N_SPLITS]), x=x,
        dx=length / N_X, t=t, dt=dt, attrs={"source": "generate", "smnn_version": "test"},
    )  # fmt: skip
    return write_kdv_store(ds, path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("kdv") / "kdv.zarr")


def small_model(solver: str = "smnn", n_x: int = N_X, persistence: bool = False) -> KdvModel:
    """A small float64 model; its heads random unless ``persistence`` (the initial state)."""
    torch.manual_seed(0)
    model = KdvModel(n_x, WINDOW, 8, 5, 2, 1, 8, 1e-3, solver=solver).double()
    if not persistence:
        with torch.no_grad():
            for head in (model.coefficient_head, model.rhs_head, model.init_head):
                head.weight.normal_(0.0, 0.05)
                head.bias.normal_(0.0, 0.3)
    return model


# ------------------------------------------------------------------ ResNet1D and the model


def test_resnet1d_shapes_and_circular_shift_equivariance():
    torch.manual_seed(0)
    net = ResNet1D(WINDOW, 8, 5, n_blocks=5, double_every=2).double()
    assert [b.n_out for b in net.blocks] == [8, 8, 16, 16, 32] and net.out_channels == 32
    x = torch.randn(3, WINDOW, N_X, dtype=torch.float64)
    y = net(x)
    assert y.shape == (3, 32, N_X)
    for shift in (1, 7, -5):
        torch.testing.assert_close(net(torch.roll(x, shift, dims=-1)), torch.roll(y, shift, -1))
    # the model's coefficient and right-hand-side nets inherit it (heads are circular too)
    model = small_model()
    ode, shifted = model.decode(x), model.decode(torch.roll(x, 5, dims=-1))
    torch.testing.assert_close(shifted.coefficients, torch.roll(ode.coefficients, 5, dims=1))
    torch.testing.assert_close(shifted.rhs, torch.roll(ode.rhs, 5, dims=1))
    with pytest.raises(ValueError, match="odd"):
        ResNet1D(WINDOW, 8, 4, 2, 2)
    with pytest.raises(ValueError, match=r"\(B, 10, N\)"):
        net(torch.zeros(3, 9, N_X, dtype=torch.float64))


def test_model_shapes_initial_values_and_step():
    model = small_model()
    x = torch.randn(4, WINDOW, N_X, dtype=torch.float64)
    ode = model.decode(x)
    assert ode.coefficients.shape == (4, N_X, WINDOW, 1, 1, N_ORDERS)
    assert ode.rhs.shape == (4, N_X, WINDOW, 1)
    assert ode.init_vars.shape == (4, N_X, 1, 1, N_INIT_ORDERS)
    assert ode.steps.shape == (4, 1, 1)
    torch.testing.assert_close(ode.init_vars[:, :, 0, 0, 0], x[:, -1])  # order 0: last value
    torch.testing.assert_close(ode.steps, torch.full_like(ode.steps, STEP_INIT))
    # the initial model is persistence: d4u/dt4 = 0 from the last value, zero derivatives
    start = small_model(persistence=True)(x).solution
    torch.testing.assert_close(start, x[:, -1:].expand_as(start), atol=1e-9, rtol=0)
    out = model(x)
    assert out.solution.shape == (4, WINDOW, N_X)
    assert out.orders.shape == (4, N_X, WINDOW, N_ORDERS)
    assert out.steps.shape == (4,) and bool(torch.isfinite(out.solution).all())
    torch.testing.assert_close(out.solution, out.orders[..., 0].transpose(1, 2))
    with pytest.raises(ValueError, match=r"\(B, 10, 32\)"):
        model(torch.zeros(4, WINDOW, N_X + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="too small"):
        small_model(n_x=8)
    # float32 models solve in float64 and return float32
    m32 = small_model().float()
    assert m32(x.float()).solution.dtype == torch.float32


def _expected_parameters(n_x, window, base, kernel, n_blocks, every, hidden) -> int:
    """The parameter count of the architecture, counted independently of the model code."""
    widths = [base * 2 ** (i // every) for i in range(n_blocks)]
    resnet = window * base * kernel + base
    for c_in, c_out in zip([base, *widths[:-1]], widths, strict=True):
        resnet += kernel * c_in * c_out + c_out + kernel * c_out * c_out + c_out
    # heads: kernel-7 convolutions to W * 5 coefficients and W right-hand sides
    heads = widths[-1] * window * 5 * 7 + window * 5 + widths[-1] * window * 7 + window
    enc_widths = [hidden, 2 * hidden, 4 * hidden, 4 * hidden, 2 * hidden, hidden, hidden // 2]

    def encoder(k):
        total, c_in = 0, window
        for c_out in enc_widths:
            total += k * c_in * c_out + c_out
            c_in = c_out
        return total

    features = enc_widths[-1] * (n_x // 4)
    init = encoder(INIT_KERNEL) + features * n_x * 3 + n_x * 3
    step = encoder(STEP_KERNEL) + features + 1
    return 2 * resnet + heads + init + step


def test_parameter_count_at_the_published_sizes():
    model = KdvModel(256, 10, 64, 9, 10, 4, 64, 1.0e-3)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_parameters(256, 10, 64, 9, 10, 4, 64) == PAPER_PARAMETERS
    assert abs(n - 10.4e6) / 10.4e6 < 0.05, n


def test_solve_matches_the_dense_reference_and_every_solver_runs():
    from smnn.solver.reference import dense_reference

    model = small_model(n_x=16)
    x = torch.randn(2, WINDOW, 16, dtype=torch.float64)
    with torch.no_grad():
        ode = model.decode(x)
        u = model.solve(ode)  # (B, n_x, W, R) by smnn
        ref = dense_reference(ode.coefficients, ode.rhs, ode.init_vars,
                              ode.steps.expand(2, 16, WINDOW - 1))  # fmt: skip
    assert ref.shape == (2, 16, WINDOW, 1, N_ORDERS)
    ref = ref[..., 0, :]
    torch.testing.assert_close(u[..., 0], ref[..., 0], atol=1e-6, rtol=0)  # the solution
    # every order to 1e-6 of its own scale (the top orders grow like h^-k)
    scale = ref.abs().amax(dim=(0, 1, 2))
    assert bool(((u - ref).abs().amax(dim=(0, 1, 2)) <= 1e-6 * scale).all())
    # the baselines run, forward and backward, on the initial (well-conditioned) model
    start = small_model(n_x=16, persistence=True)
    for solver in ("mnn_dense", "mnn_cg"):
        other = small_model(solver, n_x=16, persistence=True)
        other.load_state_dict(start.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mnn_cg may stop short of its tolerance
            out = other(x)
            assert out.solution.shape == (2, WINDOW, 16)
            assert bool(torch.isfinite(out.solution).all())
            (out.solution - x[:, :1]).abs().mean().backward()  # gradients through each solver
        assert float(other.coefficient_head.weight.grad.abs().sum()) > 0


def test_layer_is_the_shared_mnn_layer_and_tiny_steps_fail_clearly():
    assert isinstance(small_model().layer, MnnLayer) and small_model("mnn_cg").solver == "mnn_cg"
    x = torch.randn(2, WINDOW, 16, dtype=torch.float64)

    def at_floor(floor: float, method: str) -> KdvModel:
        torch.manual_seed(0)
        model = KdvModel(16, WINDOW, 8, 5, 2, 1, 8, 1e-3, solve_method=method).double()
        model.load_state_dict(small_model(n_x=16).state_dict())
        model.step_floor = floor
        torch.nn.init.constant_(model.step_head.bias, -20.0)  # the step at its floor
        return model

    # the normal equations fail at 1e-4 and say which settings help
    with pytest.raises(NonPositivePivotError, match=r"step sizes are 0\.0001 .*solve_method auto"):
        at_floor(1e-4, "sequential")(x)
    # 'auto' retries the failed systems by QR, which solves them
    auto, qr = at_floor(1e-4, "auto")(x).solution, at_floor(1e-4, "qr")(x).solution
    assert bool(torch.isfinite(auto).all()) and torch.equal(auto, qr)
    # far below, QR's rank check refuses too, naming the floor
    with pytest.raises(NonPositivePivotError, match=r"even the QR solve.*step_floor"):
        at_floor(1e-6, "auto")(x)


def test_float32_qr_solve_is_close_to_float64_and_the_dtype_is_the_setting():
    """kdv.model.solve_dtype float32 with the orthogonal solve: the solutions of the same
    ODEs within 1e-4 of their scale of the float64 solve (the float32 normal equations lose
    every digit at these steps: issue 15), returned in the model's dtype."""
    model64 = small_model(n_x=16)
    torch.manual_seed(0)
    model32 = KdvModel(16, WINDOW, 8, 5, 2, 1, 8, 1e-3, solve_dtype=torch.float32,
                       solve_method="qr")  # fmt: skip
    model32.load_state_dict(model64.state_dict())  # float32 weights, the same values
    assert model32.layer.method == "qr" and model64.solve_dtype == torch.float64
    x = torch.randn(3, WINDOW, 16, dtype=torch.float64)
    with torch.no_grad():
        ode = model64.decode(x)
        u64 = model64.solve(ode)
        ode32 = type(ode)(*(t.float() for t in vars(ode).values()))
        u32 = model32.solve(ode32)
    assert u32.dtype == torch.float32 and u64.dtype == torch.float64
    scale = u64.abs().amax(dim=(0, 1, 2))  # per order (the top orders grow like h^-k)
    err = (u32.double() - u64).abs().amax(dim=(0, 1, 2))
    assert bool((err <= 1e-4 * scale).all()), (err / scale).tolist()
    # solve_dtype None: the model's own dtype
    model32.solve_dtype = None
    with torch.no_grad():
        torch.testing.assert_close(model32.solve(ode32), u32, rtol=0, atol=0)


def test_float32_qr_training_from_the_settings(store, tmp_path):
    """kdv.model.solve_dtype float32, solve_method qr: the task's model solves in float32 with
    QR, trains with finite losses that go down, and evaluate rebuilds it the same way."""
    config = make_config(**{"model.solve_dtype": "float32", "model.solve_method": "qr",
                            "train.epochs": 2})  # fmt: skip
    settings = settings_of(config)
    assert (settings.solve_dtype, settings.solve_method) == ("float32", "qr")
    seed_everything(3)
    task = EXPERIMENT.build_task(settings, "smnn", store, torch.device("cpu"))
    assert task.model.solve_dtype == torch.float32 and task.model.layer.method == "qr"
    result = _train(task, tmp_path / "ck")
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(np.isfinite(r["valid_loss"]) for r in result.history)
    path = atomic_torch_save(EXPERIMENT.model_payload(task), tmp_path / "model.pt")
    model, _ = load_model(path, dtype=torch.float32, solve_args=settings.solve_args())
    assert model.solve_dtype == torch.float32 and model.layer.method == "qr"


# ------------------------------------------------------------------ settings


def test_settings_and_problems():
    s = KdvSettings.from_config(make_config())
    assert s.window == WINDOW and s.windows_per_epoch is None and s.n_trajectories is None
    assert section_problems(KDV_SECTION) == []
    bad = json.loads(json.dumps(KDV_SECTION))
    bad["model"].update(kernel_size=4, step_floor=0.05)
    bad["generate"] = {"n_kept": 15, "n_test": 3}
    bad["evaluate"] = {"n_trajectories": 5, "sample_trajectories": 4}
    problems = "\n".join(section_problems(bad))
    for key in ("model.kernel_size", "model.step_floor", "generate.n_kept",
                "evaluate.n_trajectories", "evaluate.sample_trajectories"):  # fmt: skip
        assert f"'kdv.{key}'" in problems
    bad_config = make_config()
    bad_config.data["kdv"] = bad
    assert EXPERIMENT.config_problems(bad_config) == section_problems(bad)
    with pytest.raises(ConfigError, match="plateau_factor"):
        KdvSettings.from_config(make_config(**{"train.plateau_factor": 1.0}))
    with pytest.raises(ConfigError, match="kernel_size"):
        KdvSettings.from_config(make_config(**{"model.kernel_size": 6}))
    with pytest.raises(ConfigError, match="step_floor"):
        KdvSettings.from_config(make_config(**{"model.step_floor": 0.05}))
    # the solve: float64, method auto unless the optional keys say otherwise (null: the model's)
    assert (s.solve_dtype, s.solve_method) == ("float64", "auto")
    assert s.solve_args() == {"solve_dtype": torch.float64, "solve_method": "auto"}
    s = KdvSettings.from_config(make_config(**{"model.solve_dtype": None}))
    assert s.solve_args()["solve_dtype"] is None
    with pytest.raises(ConfigError, match=r"kdv\.model\.solve_dtype.*float16"):
        KdvSettings.from_config(make_config(**{"model.solve_dtype": "float16"}))
    with pytest.raises(ConfigError, match=r"kdv\.model\.solve_method.*lu"):
        KdvSettings.from_config(make_config(**{"model.solve_method": "lu"}))


def test_training_too_large_for_memory_stops_before_allocating(store):
    """Issue 18: a model or batch beyond the memory budget is refused with the keys to change
    (base_filters 100000: ~10^12 parameters, counted on the meta device in milliseconds)."""
    from smnn.memory import MemoryBudgetError

    cpu = torch.device("cpu")
    with pytest.raises(
        MemoryBudgetError, match=r"kdv.model.base_filters.*kdv.train.memory_budget_gb"
    ):
        EXPERIMENT.build_task(make_settings(**{"model.base_filters": 100000}), "smnn", store, cpu)
    with pytest.raises(MemoryBudgetError, match=r"solver .*kdv.train.batch_size"):
        EXPERIMENT.build_task(make_settings(**{"train.memory_budget_gb": 1e-6}), "smnn", store, cpu)
    assert EXPERIMENT.build_task(make_settings(), "smnn", store, cpu).model is not None
    # the job's thread count (its run context) reaches the model's MNN layer
    task = EXPERIMENT.build_task(make_settings(), "smnn", store, cpu, threads=2)
    assert task.model.layer.threads == 2 and task.model.layer.options["threads"] == 2


def test_experiment_object():
    assert isinstance(EXPERIMENT, Experiment)
    assert (EXPERIMENT.name, EXPERIMENT.mlflow_experiment, EXPERIMENT.data_store) == (
        "kdv", "kdv", "kdv.zarr",
    )  # fmt: skip
    assert EXPERIMENT.solvers == ("smnn", "mnn_dense", "mnn_cg")
    assert EXPERIMENT.data_rules == ("generate_kdv", "import_kdv")
    assert EXPERIMENT.baselines == ()
    assert set(EXPERIMENT.schema["required"]) >= {"enabled", "solvers", "model", "train"}
    assert "rolls out all test trajectories" in EXPERIMENT.describe(make_settings())


# ------------------------------------------------------------------ training


def _train(task, directory, epochs=None):
    settings = TrainerSettings(
        checkpoint_dir=directory, seed=3, device=torch.device("cpu"), progress=False,
        max_epochs=epochs,
    )  # fmt: skip
    trainer = Trainer(task, settings)
    with trainer:
        trainer.attach_run(trainer.restore())  # run.json: what a resume needs
        return trainer.fit()


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    config = make_config()
    seed_everything(3)
    task = EXPERIMENT.build_task(settings_of(config), "smnn", store, torch.device("cpu"))
    result = _train(task, d / "ck")
    payload = EXPERIMENT.model_payload(task)
    payload.update(history=result.history, step_losses=result.step_losses,
                   final_metrics=result.final_metrics, run_id="run-kdv")  # fmt: skip
    path = atomic_torch_save(payload, d / "model.pt")
    return {"config": config, "task": task, "result": result, "model": path, "dir": d}


def test_training_reduces_the_loss_and_validates(trained):
    task, result = trained["task"], trained["result"]
    assert task.n_starts == N_TIME - 2 * WINDOW + 2
    assert task.n_samples == N_SPLITS[0] * task.n_starts  # every window of every trajectory
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    valid = [r["valid_loss"] for r in result.history]
    assert len(valid) == 4 and all(np.isfinite(valid)), valid
    assert result.final_metrics["final_valid_loss"] == valid[-1]
    for key in ("mean_step_time_ms", "step_peak_memory_mib"):
        assert result.final_metrics[key] > 0
    assert all(0.001 <= r["mean_step_size"] < 1 for r in result.history)


def test_windows_overlap_by_one_and_validation_subset_is_fixed(store):
    seed_everything(0)
    task = EXPERIMENT.build_task(make_settings(), "smnn", store, torch.device("cpu"))
    data = open_store(store).read("train", dtype=torch.float32)
    last = task.n_starts - 1  # the last start: the target ends with the trajectory
    x, y = task.windows(task.train, torch.tensor([1, 4]), torch.tensor([0, last]))
    torch.testing.assert_close(x[1], data[4, last : last + WINDOW])
    torch.testing.assert_close(y[1], data[4, last + WINDOW - 1 : N_TIME])
    torch.testing.assert_close(x[:, -1], y[:, 0])  # the solution's first step = last input
    n_valid = N_SPLITS[1] * task.n_starts  # fewer than VALID_WINDOWS: all of them, in order
    assert task.valid_starts.numel() == n_valid
    pairs = set(zip(task.valid_trajectories.tolist(), task.valid_starts.tolist(), strict=True))
    assert len(pairs) == n_valid
    seed_everything(1)
    again = EXPERIMENT.build_task(make_settings(), "smnn", store, torch.device("cpu"))
    assert torch.equal(again.valid_starts, task.valid_starts)
    # the validation loss is the L1 loss of those windows
    with torch.no_grad():
        task.model.eval()
        xv, yv = task.windows(task.valid, task.valid_trajectories, task.valid_starts)
        expected = float((task.model(xv).solution - yv).abs().mean())
        assert task.validation_loss() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(IndexError):
        gather_trajectory_windows(task.train, torch.tensor([0]), torch.tensor([30]), 19)
    few = EXPERIMENT.build_task(make_settings(**{"train.valid_windows": 5}), "smnn", store,
                                torch.device("cpu"))  # fmt: skip
    assert few.valid_starts.numel() == 5
    assert set(zip(few.valid_trajectories.tolist(), few.valid_starts.tolist(),
                   strict=True)) <= pairs  # fmt: skip


def test_plateau_schedule_follows_the_validation_loss(store, tmp_path):
    config = make_config(**{"train.lr": 1.0e-12, "train.plateau_patience": 0,
                            "train.windows_per_epoch": 16, "train.epochs": 3})  # fmt: skip
    seed_everything(3)
    task = EXPERIMENT.build_task(settings_of(config), "smnn", store, torch.device("cpu"))
    _, scheduler = task.configure_optimizers()
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.factor, scheduler.patience) == (0.5, 0)
    result = _train(task, tmp_path / "ck")
    # lr 1e-12 leaves the validation loss unchanged: no improvement after the first epoch
    assert [r["lr"] for r in result.history] == pytest.approx([1e-12, 1e-12, 5e-13])


# ------------------------------------------------------------------ rollout and evaluation


class _Counter:
    """A fake model: each output step is the last input step plus its index (so a rollout of
    a trajectory whose step t holds t continues t exactly)."""

    window = WINDOW

    def predict(self, x):
        return x[:, -1:] + torch.arange(WINDOW, dtype=x.dtype).view(1, -1, 1)


def test_rollout_covers_every_step():
    plan = rollout_plan(140, WINDOW)
    assert len(plan) == 15 and plan[0] == (10, 9) and plan[-1] == (136, 4)
    assert sum(n for _, n in plan) == 130
    truth = torch.arange(140, dtype=torch.float64).view(1, 140, 1).expand(3, 140, 5)
    pred = rollout(_Counter(), truth.contiguous(), batch_size=2)
    np.testing.assert_array_equal(pred, truth.numpy())
    with pytest.raises(ValueError, match="predicts nothing"):
        rollout_plan(10, WINDOW)


def _numpy_nmse(pred, truth, given):
    err = ((pred[:, given:] - truth[:, given:]) ** 2).sum(axis=2)
    return (err / (truth[:, given:] ** 2).sum(axis=2)).mean(axis=0).mean()


def test_evaluate_metrics_persistence_and_byte_identical_rerun(trained, store, tmp_path):
    config = trained["config"]
    ev = EXPERIMENT.evaluate(settings_of(config), "smnn", store, trained["model"], tmp_path / "a",
                             torch.device("cpu"))  # fmt: skip
    text = (tmp_path / "a" / "metrics.json").read_text()
    doc = json.loads(text)
    assert doc["source"] == "generate" and doc["solver"] == "smnn"
    p = doc["protocol"]
    assert p["scored_steps"] == [WINDOW, N_TIME - 1] and p["n_scored_steps"] == N_TIME - WINDOW
    assert p["model_calls"] == 3 and p["last_call_new_steps"] == 2
    assert "sum over x" in doc["normalisation"]
    assert len(doc["models"]["model"]["nmse_by_step"]) == N_TIME - WINDOW
    # persistence against a numpy computation from the store
    ds = open_store(store)
    truth = np.asarray(ds.dataset["u"].values)[ds.rows("test")]
    held = np.repeat(truth[:, WINDOW - 1 : WINDOW], N_TIME, axis=1)
    expected = _numpy_nmse(held, truth, WINDOW)
    assert ev.metrics["nmse_persistence"] == pytest.approx(expected, rel=1e-12)
    assert doc["models"]["persistence"]["nmse"] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(persistence_forecast(truth, WINDOW), np.where(
        np.arange(N_TIME)[None, :, None] < WINDOW, truth, held))  # fmt: skip
    assert np.isfinite(ev.metrics["nmse_model"])
    assert ev.tags["train_run_id"] == "run-kdv" and ev.tags["source"] == "generate"
    assert sorted(f.name for f in ev.plots) == ["loss.png", "nmse_by_step.png", "spacetime.png"]
    assert all(f.stat().st_size > 0 for f in ev.plots)
    assert "run-kdv" not in text
    # rerun: the same bytes
    EXPERIMENT.evaluate(settings_of(config), "smnn", store, trained["model"], tmp_path / "b",
                        torch.device("cpu"))  # fmt: skip
    assert (tmp_path / "b" / "metrics.json").read_bytes() == text.encode()
    # one trajectory only
    one = EXPERIMENT.evaluate(make_settings(**{"evaluate.n_trajectories": 1,
                                          "evaluate.sample_trajectories": 1}), "smnn", store,
                              trained["model"], tmp_path / "c", torch.device("cpu"))  # fmt: skip
    assert one.document["data"]["n_trajectories_scored"] == 1
    assert one.metrics["nmse_persistence"] == pytest.approx(
        _numpy_nmse(held[:1], truth[:1], WINDOW), rel=1e-12
    )


def test_score_rejects_bad_inputs():
    truth = np.ones((2, 12, 4))
    with pytest.raises(ValueError, match="same"):
        score_rollout(truth[:, :11], truth, WINDOW)
    bad = truth.copy()
    bad[1, 11, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        score_rollout(bad, truth, WINDOW)
    zero = truth.copy()
    zero[0, 10] = 0.0
    with pytest.raises(ValueError, match="zero everywhere"):
        score_rollout(truth, zero, WINDOW)


def test_model_file_errors(trained, store, tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        load_model(tmp_path / "missing.pt")
    atomic_torch_save({"kind": "other", "state_dict": {}, "model_args": {}}, tmp_path / "o.pt")
    with pytest.raises(ValueError, match="expected 'kdv_mnn'"):
        load_model(tmp_path / "o.pt")
    model, payload = load_model(trained["model"])
    assert payload["n_parameters"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="retrain"):
        EXPERIMENT.evaluate(make_settings(**{"model.window": 8}), "smnn", store, trained["model"],
                            tmp_path / "w", torch.device("cpu"))  # fmt: skip


def test_resume_redraws_the_same_random_windows(store, tmp_path):
    """Two epochs in one go equal one epoch, a new process state, and the second epoch resumed
    from the checkpoint (windows drawn from the checkpointed global generator)."""
    config = make_config(**{"train.windows_per_epoch": 16, "train.epochs": 2})

    def task():
        seed_everything(3)
        return EXPERIMENT.build_task(settings_of(config), "smnn", store, torch.device("cpu"))

    straight = task()
    full = _train(straight, tmp_path / "straight")
    first = task()
    _train(first, tmp_path / "resumed", epochs=1)
    seed_everything(99)  # another global state: the checkpoint restores it
    second = task()
    resumed = _train(second, tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 1
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
