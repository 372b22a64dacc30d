"""The ``kdv`` config section parsed once into a frozen tree (:class:`KdvSettings`), with
the checks of the relations between its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from smnn.config import Config, SettingsError

DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_ORDERS = 5  # R: u and its first four time derivatives (a fourth-order ODE)
N_INIT_ORDERS = 4  # K: orders 0..3 prescribed at the first step
HEAD_KERNEL = 7  # the convolutions from the ResNet1D features to coefficients / rhs
INIT_KERNEL = 7  # the initial-value net's convolutions
STEP_KERNEL = 5  # the step net's convolutions
ENCODER_STRIDES = (1, 1, 1, 1, 2, 2, 1)  # the ConvEncoder's seven layers
STEP_INIT = 0.05  # the step size at initialisation
# the solve's dtype unless kdv.model.solve_dtype says otherwise: the normal equations of a
# fourth-order ODE at steps near STEP_INIT are too ill-conditioned for a float32 Cholesky
# factorization (float32 needs solve_method qr, or auto, which picks qr for float32)
SOLVE_DTYPE = torch.float64
SOLVE_METHODS = ("auto", "sequential", "cyclic", "qr")  # smnn.ode_forward's methods
VALID_WINDOWS = 256  # the validation subset (at most) unless kdv.train.valid_windows says
PAPER_PARAMETERS = 10_434_045  # parameters at the published sizes (n_x = 256, W = 10)
MODEL_KIND = "kdv_mnn"
SCORED = ("model", "persistence")
FIRST_STEPS = 100  # the NMSE over the first 100 predicted steps is reported too


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sub(section: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = section.get(key)
    return value if isinstance(value, Mapping) else {}


def section_problems(section: Mapping[str, Any]) -> list[str]:
    """What is inconsistent between the keys of a ``kdv`` config section (each a message
    naming the key); the schema checks types and ranges, this the relations between keys."""
    problems: list[str] = []
    model, gen, ev = _sub(section, "model"), _sub(section, "generate"), _sub(section, "evaluate")
    window, kernel = _int(model.get("window")), _int(model.get("kernel_size"))
    n_kept, n_test = _int(gen.get("n_kept")), _int(gen.get("n_test"))
    n_traj, n_sample = _int(ev.get("n_trajectories")), _int(ev.get("sample_trajectories"))

    def add(key: str, message: str) -> None:
        problems.append(f"config key 'kdv.{key}': {message}")

    if kernel is not None and kernel % 2 == 0:
        add("model.kernel_size", f"{kernel} must be odd (circular 'same' convolutions)")
    floor = model.get("step_floor")
    if isinstance(floor, (int, float)) and not isinstance(floor, bool) and floor >= STEP_INIT:
        add("model.step_floor", f"{floor} must be below the initial step {STEP_INIT}")
    generated = section.get("source") == "generate"
    if generated and window is not None and n_kept is not None and n_kept < 2 * window - 1:
        add("generate.n_kept", f"{n_kept} stored steps are fewer than a training window of "
            f"2 * kdv.model.window - 1 = {2 * window - 1}")  # fmt: skip
    if generated and n_test is not None:
        if n_traj is not None and n_traj > n_test:
            add("evaluate.n_trajectories", f"{n_traj} is more than kdv.generate.n_test "
                f"({n_test})")  # fmt: skip
        if n_sample is not None and n_sample > min(n_test, n_traj or n_test):
            add("evaluate.sample_trajectories", f"{n_sample} is more than the trajectories "
                f"rolled out ({min(n_test, n_traj or n_test)})")  # fmt: skip
    elif n_traj is not None and n_sample is not None and n_sample > n_traj:
        add("evaluate.sample_trajectories", f"{n_sample} is more than "
            f"kdv.evaluate.n_trajectories ({n_traj})")  # fmt: skip
    return problems


@dataclass(frozen=True)
class KdvSettings:
    """The ``kdv.model``, ``kdv.train`` and ``kdv.evaluate`` keys of the config, validated."""

    window: int
    base_filters: int
    kernel_size: int
    n_blocks: int
    double_every: int
    init_hidden: int
    step_floor: float
    solve_dtype: str | None
    solve_method: str
    epochs: int
    batch_size: int
    lr: float
    plateau_factor: float
    plateau_patience: int
    dtype: str
    windows_per_epoch: int | None
    valid_windows: int
    n_trajectories: int | None
    sample_trajectories: int
    seed: int
    source: str = "generate"  # kdv.source: the data stage that must have written the store
    memory_budget_gb: float | None = None  # kdv.train.memory_budget_gb (None: 80 % of memory)

    @classmethod
    def from_config(cls, config: Config) -> KdvSettings:
        m, t, e = "kdv.model.", "kdv.train.", "kdv.evaluate."
        settings = cls(
            window=config.get_int(m + "window", min_value=2),
            base_filters=config.get_int(m + "base_filters", min_value=1),
            kernel_size=config.get_int(m + "kernel_size", min_value=1),
            n_blocks=config.get_int(m + "n_blocks", min_value=1),
            double_every=config.get_int(m + "double_every", min_value=1),
            init_hidden=config.get_int(m + "init_hidden", min_value=1),
            step_floor=config.get_float(m + "step_floor", positive=True),
            solve_dtype=(
                config.get_str(m + "solve_dtype", choices=tuple(DTYPES), allow_none=True)
                if config.has(m + "solve_dtype")
                else "float64"
            ),  # fmt: skip
            solve_method=(
                config.get_str(m + "solve_method", choices=SOLVE_METHODS)
                if config.has(m + "solve_method")
                else "auto"
            ),  # fmt: skip
            epochs=config.get_int(t + "epochs", min_value=1),
            batch_size=config.get_int(t + "batch_size", min_value=1),
            lr=config.get_float(t + "lr", positive=True),
            plateau_factor=config.get_float(t + "plateau_factor", positive=True),
            plateau_patience=config.get_int(t + "plateau_patience", min_value=0),
            dtype=config.get_str(t + "dtype", choices=tuple(DTYPES)),
            windows_per_epoch=config.get_int(t + "windows_per_epoch", min_value=1, allow_none=True),
            valid_windows=(
                config.get_int(t + "valid_windows", min_value=1)
                if config.has(t + "valid_windows")
                else VALID_WINDOWS
            ),  # fmt: skip
            n_trajectories=config.get_int(e + "n_trajectories", min_value=1, allow_none=True),
            sample_trajectories=config.get_int(e + "sample_trajectories", min_value=1),
            seed=config.get_int("seed", min_value=0),
            source=config.get_str("kdv.source", choices=("generate", "lpsda")),
            memory_budget_gb=(
                config.get_float(t + "memory_budget_gb", positive=True, allow_none=True)
                if config.has(t + "memory_budget_gb")
                else None
            ),  # fmt: skip
        )
        problems = section_problems(config.section("kdv"))
        if not settings.plateau_factor < 1:
            problems.append(
                f"config key 'kdv.train.plateau_factor': must be in (0, 1), got "
                f"{settings.plateau_factor}"
            )
        if problems:
            raise SettingsError(config.source, problems)
        return settings

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def solve_args(self) -> dict[str, Any]:
        """The solve's options of :class:`KdvModel`: ``solve_dtype`` (a torch dtype; None =
        the model's dtype) and ``solve_method`` (``smnn.ode_forward``'s ``method``)."""
        dtype = None if self.solve_dtype is None else DTYPES[self.solve_dtype]
        return {"solve_dtype": dtype, "solve_method": self.solve_method}

    def model_args(self, n_x: int) -> dict[str, Any]:
        """Constructor arguments of :class:`KdvModel` on a grid of ``n_x`` points."""
        return {
            "n_x": n_x, "window": self.window, "base_filters": self.base_filters,
            "kernel_size": self.kernel_size, "n_blocks": self.n_blocks,
            "double_every": self.double_every, "init_hidden": self.init_hidden,
            "step_floor": self.step_floor,
        }  # fmt: skip
