"""The ``lorenz`` config section parsed once into a frozen tree (:class:`LorenzSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smnn.config import Config
from smnn.data.lorenz import LorenzParams

DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_ORDERS = 3  # R: orders u, u', u'' of every state
BUDGET_KEY = "lorenz.train.memory_budget_gb"


@dataclass(frozen=True)
class LorenzSettings:
    """The ``lorenz`` section of the config, validated (types by the schema, relations here)."""

    data: LorenzParams
    hidden: int
    latent: int
    threshold: float
    cycles: int
    epochs_per_cycle: int
    batch_size: int
    lr: float
    dtype: str
    max_windows: int | None
    simulate_points: int
    memory_budget_gb: float | None = None  # None: 80 % of the RAM or GPU memory

    @classmethod
    def from_config(cls, config: Config) -> LorenzSettings:
        """Parse the section from a schema-valid config.

        Raises:
            SettingsError: the window is longer than the trajectory
                (:meth:`smnn.data.lorenz.LorenzParams.from_config`).
        """
        settings = cls(
            data=LorenzParams.from_config(config),
            hidden=config.get_int("lorenz.model.hidden", min_value=1),
            latent=config.get_int("lorenz.model.latent", min_value=1),
            threshold=config.get_float("lorenz.model.threshold", non_negative=True),
            cycles=config.get_int("lorenz.train.cycles", min_value=1),
            epochs_per_cycle=config.get_int("lorenz.train.epochs_per_cycle", min_value=1),
            batch_size=config.get_int("lorenz.train.batch_size", min_value=1),
            lr=config.get_float("lorenz.train.lr", positive=True),
            dtype=config.get_str("lorenz.train.dtype", choices=tuple(DTYPES)),
            max_windows=config.get_int("lorenz.train.max_windows", min_value=1, allow_none=True),
            simulate_points=config.get_int("lorenz.evaluate.simulate_points", min_value=2),
            memory_budget_gb=(
                config.get_float(BUDGET_KEY, positive=True, allow_none=True)
                if config.has(BUDGET_KEY)
                else None
            ),
        )
        return settings

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def n_epochs(self) -> int:
        return self.cycles * self.epochs_per_cycle
