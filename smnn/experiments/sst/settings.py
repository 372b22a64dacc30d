"""The ``sst`` config section parsed once into a frozen tree (:class:`SstSettings`),
with the checks of the relations between its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from smnn.config import Config, SettingsError

DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_ORDERS = 3  # R: u, u', u'' of the second-order ODE
DECODER_LAYERS = 2  # hidden layers of every decoder MLP
STEP_MIN, STEP_MAX = 0.001, 0.999  # the step sizes' clip range
STEP_INIT = 0.1  # every step size at initialisation (zero weights, bias logit(0.1))
MI_KIND = "mechanistic_identifier"
ADAGVAE_KIND = "adagvae"
MODEL_KINDS = (MI_KIND, ADAGVAE_KIND)
SOLVE_METHODS = ("auto", "sequential", "cyclic", "qr")  # smnn.ode_forward's methods


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def section_problems(section: Mapping[str, Any]) -> list[str]:
    """What is inconsistent between the keys of a schema-valid ``sst`` config section (each a
    message naming the key); the schema checks types and ranges, this the relations between
    keys. :meth:`SstSettings.from_config` runs it."""
    problems: list[str] = []
    model = section.get("model") if isinstance(section.get("model"), Mapping) else {}
    ev = section.get("evaluate") if isinstance(section.get("evaluate"), Mapping) else {}
    pre = section.get("preprocess") if isinstance(section.get("preprocess"), Mapping) else {}
    syn = section.get("synthetic") if isinstance(section.get("synthetic"), Mapping) else {}
    window, n_dct, n_init = (_int(model.get(k)) for k in ("window", "n_dct", "n_init"))
    latents, shared = _int(model.get("latents")), _int(model.get("shared_latents"))
    encode, forecast = _int(ev.get("encode_weeks")), _int(ev.get("forecast_weeks"))
    test_weeks = _int(pre.get("test_weeks"))

    def add(key: str, message: str) -> None:
        problems.append(f"config key 'sst.{key}': {message}")

    if window is not None and n_dct is not None and n_dct > window:
        add("model.n_dct", f"{n_dct} is larger than sst.model.window ({window})")
    if n_init is not None:
        if n_init < 3:
            add("model.n_init", f"{n_init} is below 3: the ODE's initial values must fix the "
                "quadratic that its smoothness rows leave free")  # fmt: skip
        if window is not None and n_init >= window:
            add("model.n_init", f"{n_init} must be smaller than sst.model.window ({window})")
    if latents is not None and shared is not None and shared > latents:
        add("model.shared_latents", f"{shared} is larger than sst.model.latents ({latents})")
    offsets = model.get("neighbour_offsets")  # two integers (the schema)
    if isinstance(offsets, list) and len(offsets) == 2:
        lo, hi = offsets
        if lo > hi or (lo == 0 and hi == 0):
            add("model.neighbour_offsets", f"{offsets} must be [lo, hi] with lo <= hi and an "
                "offset other than 0 between them")  # fmt: skip
    if encode is not None and window is not None and encode != window:
        add("evaluate.encode_weeks", f"{encode} must equal sst.model.window ({window}): the "
            "identifier encodes one window")  # fmt: skip
    if forecast is not None:
        if window is not None and forecast > window:
            add("evaluate.forecast_weeks", f"{forecast} is larger than sst.model.window "
                f"({window}), the length of the decoded ODE")  # fmt: skip
        if n_init is not None and forecast <= n_init:
            add("evaluate.forecast_weeks", f"{forecast} leaves no week to forecast after the "
                f"sst.model.n_init ({n_init}) given ones")  # fmt: skip
    if encode is not None and forecast is not None and test_weeks is not None:
        if encode + forecast > test_weeks:
            add("evaluate.forecast_weeks", f"encode_weeks + forecast_weeks = {encode + forecast}"
                f" is more than sst.preprocess.test_weeks ({test_weeks})")  # fmt: skip
    n_weeks = _int(syn.get("n_weeks"))
    if section.get("source") == "synthetic" and None not in (n_weeks, test_weeks, window):
        if n_weeks - test_weeks < window:
            add(
                "synthetic.n_weeks",
                f"{n_weeks} weeks minus test_weeks ({test_weeks}) leave "
                f"{n_weeks - test_weeks} training weeks, fewer than sst.model.window ({window})",
            )
    return problems


@dataclass(frozen=True)
class SstSettings:
    """The ``sst`` section of the config (model, training, evaluation keys and the
    preprocessing keys the store must have been made with), validated."""

    window: int
    n_dct: int
    encoder_hidden: int
    encoder_layers: int
    latents: int
    shared_latents: int
    decoder_hidden: int
    n_init: int
    neighbour_offsets: tuple[int, int]
    solve_dtype: str | None
    solve_method: str
    epochs: int
    batch_size: int
    lr: float
    alignment_weight: float
    beta: float
    dtype: str
    windows_per_epoch: int | None
    baselines: tuple[str, ...]
    encode_weeks: int
    forecast_weeks: int
    sample_cells: int
    land: str
    test_weeks: int
    scaling_enabled: bool
    seed: int
    source: str | None = None  # sst.source: what data/sst.zarr must have been made from
    memory_budget_gb: float | None = None  # sst.train.memory_budget_gb (None: 80 % of memory)

    @classmethod
    def from_config(cls, config: Config) -> SstSettings:
        """Parse the section (and ``seed``) from a schema-valid config.

        Raises:
            SettingsError: keys that contradict each other (:func:`section_problems`).
        """
        m, t, e = "sst.model.", "sst.train.", "sst.evaluate."
        problems = section_problems(config.section("sst"))
        if problems:
            raise SettingsError(config.source, problems)
        offsets = config.raw(m + "neighbour_offsets")
        return cls(
            window=config.get_int(m + "window", min_value=3),
            n_dct=config.get_int(m + "n_dct", min_value=1),
            encoder_hidden=config.get_int(m + "encoder_hidden", min_value=1),
            encoder_layers=config.get_int(m + "encoder_layers", min_value=1),
            latents=config.get_int(m + "latents", min_value=1),
            shared_latents=config.get_int(m + "shared_latents", min_value=0),
            decoder_hidden=config.get_int(m + "decoder_hidden", min_value=1),
            n_init=config.get_int(m + "n_init", min_value=1),
            neighbour_offsets=(int(offsets[0]), int(offsets[1])),
            solve_dtype=(
                config.get_str(m + "solve_dtype", choices=tuple(DTYPES), allow_none=True)
                if config.has(m + "solve_dtype")
                else None
            ),  # fmt: skip
            solve_method=(
                config.get_str(m + "solve_method", choices=SOLVE_METHODS)
                if config.has(m + "solve_method")
                else "auto"
            ),  # fmt: skip
            epochs=config.get_int(t + "epochs", min_value=1),
            batch_size=config.get_int(t + "batch_size", min_value=1),
            lr=config.get_float(t + "lr", positive=True),
            alignment_weight=config.get_float(t + "alignment_weight", non_negative=True),
            beta=config.get_float(t + "beta", non_negative=True),
            dtype=config.get_str(t + "dtype", choices=tuple(DTYPES)),
            windows_per_epoch=config.get_int(t + "windows_per_epoch", min_value=1, allow_none=True),
            baselines=tuple(config.get_str_list("sst.baselines", choices=(ADAGVAE_KIND,))),
            encode_weeks=config.get_int(e + "encode_weeks", min_value=1),
            forecast_weeks=config.get_int(e + "forecast_weeks", min_value=1),
            sample_cells=config.get_int(e + "sample_cells", min_value=1),
            land=config.get_str("sst.preprocess.land", choices=("all", "ocean")),
            test_weeks=config.get_int("sst.preprocess.test_weeks", min_value=1),
            scaling_enabled=config.get_bool("sst.scaling.enabled"),
            seed=config.get_int("seed", min_value=0),
            source=config.get_str("sst.source", choices=("noaa", "file", "synthetic")),
            memory_budget_gb=(
                config.get_float(t + "memory_budget_gb", positive=True, allow_none=True)
                if config.has(t + "memory_budget_gb")
                else None
            ),  # fmt: skip
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def solve_args(self) -> dict[str, Any]:
        """The solve's options of :class:`MechanisticIdentifier`: ``solve_dtype`` (a torch
        dtype; None = the model's dtype, ``sst.train.dtype``) and ``solve_method``
        (``smnn.ode_forward``'s ``method``)."""
        dtype = None if self.solve_dtype is None else DTYPES[self.solve_dtype]
        return {"solve_dtype": dtype, "solve_method": self.solve_method}

    def mi_args(self) -> dict[str, int]:
        """Constructor arguments of :class:`MechanisticIdentifier`."""
        return {
            "window": self.window, "n_dct": self.n_dct, "encoder_hidden": self.encoder_hidden,
            "encoder_layers": self.encoder_layers, "latents": self.latents,
            "shared_latents": self.shared_latents, "decoder_hidden": self.decoder_hidden,
            "n_init": self.n_init,
        }  # fmt: skip

    def adagvae_args(self) -> dict[str, int]:
        """Constructor arguments of :class:`AdaGVAE`."""
        args = self.mi_args()
        del args["shared_latents"]
        return args
