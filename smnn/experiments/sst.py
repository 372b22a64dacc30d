"""Sea surface temperature: the Mechanistic Identifier on long weekly series (docs/experiments.md,
SST section).

Data. The store ``data/sst.zarr`` (written by ``preprocess_sst``) holds the standardised weekly
SST ``(time, lat, lon)``; every grid cell is one series. Training reads the training period
``time[:n_train_weeks]`` into memory as ``(T_train, n_cells)`` (:mod:`smnn.data.windows`) and
draws random windows of ``window`` weeks. A training sample is a *pair*: a cell and a partner on
the same latitude at a longitude offset in ``neighbour_offsets`` (not 0, longitude wrapping
around; both ocean with ``land: ocean``), the same weeks of both.

Mechanistic Identifier (:class:`MechanisticIdentifier`). Each view ``x`` ``(T,)`` goes through the
orthonormal DCT-II (:class:`smnn.experiments.dct.Dct`), its first ``n_dct`` coefficients through
an encoder MLP (``encoder_layers`` hidden layers of ``encoder_hidden``, LeakyReLU) to ``latents``
numbers, of which the first ``shared_latents`` are replaced by their mean over the two views.
Three decoder MLPs (each :data:`DECODER_LAYERS` hidden layers of ``decoder_hidden``) map the
latents to the right-hand side ``(T,)``, the coefficients ``(T, 3)`` and the ``T-1`` step sizes
(sigmoid, clipped to ``[0.001, 0.999]``; the step head starts at a constant step of
:data:`STEP_INIT`) of one second-order linear ODE per view (``E = D = 1``, ``R = 3``): ``c0 u +
c1 u' + c2 u'' = b``. Its initial values are the data's values (order 0, ``K = 1``) at the first
``n_init`` weeks (``S = n_init``). The solve is :class:`smnn.experiments.mnn_layer.MnnLayer`
with the job's solver, not frozen: coefficients and steps are decoded per sample, and gradients
reach all four solver inputs.

Loss of the identifier: the MSE between the first ``n_dct`` DCT coefficients of the solution and
those of the data (the low-pass representation the encoder sees; as the DCT is orthonormal, all
``T`` coefficients would give exactly the MSE in time, week-to-week noise included), plus
``alignment_weight`` times the alignment term: the MSE between each view's shared latents before
averaging and their average (a quarter of the mean squared difference between the two views).

Ada-GVAE baseline (:class:`AdaGVAE`; Locatello et al. 2020, *Weakly-supervised disentanglement
without compromises*). The same DCT + MLP encoder with Gaussian heads (mean and log-variance of
``latents`` dims). For each pair, the per-dimension KL divergence ``KL(q(z|x1) || q(z|x2))`` is
computed and every dimension with a KL below the midpoint between the pair's smallest and largest
is taken as shared: both views' posteriors of those dims become the average (mean of the means,
mean of the variances). ``shared_latents`` does not enter: the model chooses the shared dims. A
decoder MLP maps a sample of the latents together with the window's first ``n_init`` weeks to the
whole window. Loss: reconstruction MSE + ``beta`` (``sst.train.beta``) x the KL divergence to the
standard normal prior, summed over latent dims and divided by ``T`` (with beta = 1 the per-week
negative ELBO of a Gaussian likelihood, up to constants and a factor).

Random draws. Cells (when ``windows_per_epoch`` is set), partners, window starts and the VAE's
noise are drawn from torch's global generator inside each step. The Trainer seeds it and stores
its state in every checkpoint (also mid-epoch), so a resumed run redraws exactly what an
uninterrupted run would.

Evaluation: :mod:`smnn.experiments.sst_evaluation` (protocol, baselines, metrics) and
:mod:`smnn.experiments.sst_figures` / :mod:`smnn.experiments.forecast_figures` (plots).

The experiment object the generic commands and rules use is :data:`EXPERIMENT`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
import yaml
from torch import nn

from smnn.config import Config, ConfigError
from smnn.data.sst.preprocess import REMEDY, SstPreprocessSettings, open_sst_store
from smnn.data.store import StoreError, store_read_errors
from smnn.data.windows import (
    RowPartners,
    gather_windows,
    random_starts,
    read_series,
    seeded_generator,
)
from smnn.experiments.base import Evaluation
from smnn.experiments.dct import Dct
from smnn.experiments.forecast_figures import plot_error_by_lead, plot_forecast_samples
from smnn.experiments.mnn_layer import MnnLayer
from smnn.experiments.sst_evaluation import (
    ForecastScore,
    adagvae_forecast,
    climatology_forecast,
    evaluation_partners,
    mi_forecast,
    persistence_forecast,
    score_forecast,
    score_table,
    seasonal_climatology,
    week_of_year,
)
from smnn.experiments.sst_figures import (
    plot_error_maps,
    plot_forecast_week,
    plot_training_losses,
)
from smnn.io import atomic_write_json

__all__ = [
    "EXPERIMENT",
    "SstExperiment",
    "SstSettings",
    "SstStore",
    "open_store",
    "section_problems",
    "mlp",
    "DctEncoder",
    "MechanisticIdentifier",
    "AdaGVAE",
    "PairSampler",
    "MiTask",
    "AdaGVAETask",
    "load_model",
    "MODEL_KINDS",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}
N_ORDERS = 3  # R: u, u', u'' of the second-order ODE
DECODER_LAYERS = 2  # hidden layers of every decoder MLP
STEP_MIN, STEP_MAX = 0.001, 0.999  # the step sizes' clip range
STEP_INIT = 0.1  # every step size at initialisation (zero weights, bias logit(0.1))
MI_KIND = "mechanistic_identifier"
ADAGVAE_KIND = "adagvae"
MODEL_KINDS = (MI_KIND, ADAGVAE_KIND)
SCALING_OUTPUTS = ("scaling.csv", "scaling.md", "scaling.png")  # of rule sst_scaling


# ------------------------------------------------------------------ settings


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def section_problems(section: Mapping[str, Any]) -> list[str]:
    """What is inconsistent between the keys of an ``sst`` config section (each a message
    naming the key); the schema checks types and ranges, this the relations between keys."""
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
    offsets = model.get("neighbour_offsets")
    if (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_int(o) is not None for o in offsets)
    ):
        lo, hi = offsets
        if lo > hi or (lo == 0 and hi == 0):
            add("model.neighbour_offsets", f"{offsets} must be [lo, hi] with lo <= hi and an "
                "offset other than 0 between them")  # fmt: skip
    elif offsets is not None:
        add("model.neighbour_offsets", f"must be two integers [lo, hi], got {offsets!r}")
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
    """The ``sst`` section of the config (model, training, evaluation keys), validated."""

    window: int
    n_dct: int
    encoder_hidden: int
    encoder_layers: int
    latents: int
    shared_latents: int
    decoder_hidden: int
    n_init: int
    neighbour_offsets: tuple[int, int]
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
    seed: int

    @classmethod
    def from_config(cls, config: Config) -> SstSettings:
        m, t, e = "sst.model.", "sst.train.", "sst.evaluate."
        offsets = config.raw(m + "neighbour_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_int(o) is not None for o in offsets)):  # fmt: skip
            raise ConfigError(
                f"{config.source}: sst.model.neighbour_offsets must be two integers [lo, hi], "
                f"got {offsets!r}"
            )
        settings = cls(
            window=config.get_int(m + "window", min_value=3),
            n_dct=config.get_int(m + "n_dct", min_value=1),
            encoder_hidden=config.get_int(m + "encoder_hidden", min_value=1),
            encoder_layers=config.get_int(m + "encoder_layers", min_value=1),
            latents=config.get_int(m + "latents", min_value=1),
            shared_latents=config.get_int(m + "shared_latents", min_value=0),
            decoder_hidden=config.get_int(m + "decoder_hidden", min_value=1),
            n_init=config.get_int(m + "n_init", min_value=1),
            neighbour_offsets=(int(offsets[0]), int(offsets[1])),
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
            seed=config.get_int("seed", min_value=0),
        )
        problems = section_problems(config.section("sst"))
        if problems:
            raise ConfigError(f"{config.source}: " + "; ".join(problems))
        return settings

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

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


# ------------------------------------------------------------------ the store


@dataclass(frozen=True)
class SstStore:
    """What training and evaluation need from ``data/sst.zarr`` (besides the series).

    Attributes:
        path: the store.
        dataset: the lazily opened dataset.
        n_lat, n_lon: the grid; cells are numbered ``i_lat * n_lon + i_lon``.
        n_train, n_test: weeks of the training period (``time[:n_train]``) and test period
            (the last ``n_test``).
        mask: ``(n_lat, n_lon)`` int8, 1 ocean, 0 land.
        land: ``"all"`` (every cell takes part) or ``"ocean"`` (land NaN, never drawn).
        mean_degc, std_degc: the standardisation (``degC = mean + std * value``).
        synthetic: whether the store was made from synthetic data.
    """

    path: Path
    dataset: xr.Dataset
    n_lat: int
    n_lon: int
    n_train: int
    n_test: int
    mask: np.ndarray
    land: str
    mean_degc: float
    std_degc: float
    synthetic: bool

    @property
    def n_weeks(self) -> int:
        return self.n_train + self.n_test

    @property
    def allowed(self) -> np.ndarray:
        """``(n_cells,)`` bool: the cells that take part (ocean with ``land: ocean``, else all)."""
        if self.land == "ocean":
            return self.mask.reshape(-1) == 1
        return np.ones(self.n_lat * self.n_lon, dtype=bool)

    @property
    def times(self) -> np.ndarray:
        """``(n_weeks,)`` datetime64 week starts."""
        return np.asarray(self.dataset["time"].values)


def open_store(path: str | Path, config: Config | None = None) -> SstStore:
    """Open ``data/sst.zarr`` through :func:`smnn.data.sst.preprocess.open_sst_store` (which
    checks the layout of the SST store contract).

    Args:
        config: when given, the store must have been made with its ``sst.preprocess.land`` and
            ``sst.preprocess.test_weeks``.

    Raises:
        StoreError: the store is missing, damaged, lacks a variable or attribute, or was made
            with other preprocessing settings.
    """
    path = Path(path)
    expected = None
    if config is not None:
        expected = SstPreprocessSettings(
            land=config.get_str("sst.preprocess.land", choices=("all", "ocean")),
            test_weeks=config.get_int("sst.preprocess.test_weeks", min_value=1),
        )
    ds = open_sst_store(path, expected)
    _, n_lat, n_lon = ds["sst"].shape
    with store_read_errors(path, "mask", REMEDY):
        mask = np.asarray(ds["mask"].values).astype(np.int8)
    return SstStore(
        path=path, dataset=ds, n_lat=n_lat, n_lon=n_lon,
        n_train=int(ds.attrs["n_train_weeks"]), n_test=int(ds.attrs["n_test_weeks"]),
        mask=mask, land=str(ds.attrs["land"]), mean_degc=float(ds.attrs["mean_degc"]),
        std_degc=float(ds.attrs["std_degc"]), synthetic=bool(ds.attrs["synthetic"]),
    )  # fmt: skip


def read_period(
    store: SstStore, weeks: slice, *, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """The weeks ``weeks`` of ``sst`` as ``(n, n_cells)``, checked finite on the cells that take
    part (:attr:`SstStore.allowed`).

    Raises:
        StoreError: a cell that takes part holds a non-finite value.
    """
    series = read_series(
        store.path, "sst", weeks, dataset=store.dataset, dtype=dtype, device=device, remedy=REMEDY
    )
    allowed = torch.from_numpy(store.allowed).to(series.device)
    bad = ~torch.isfinite(series[:, allowed])
    if bool(bad.any()):
        cells = torch.nonzero(allowed).squeeze(1)[bad.any(dim=0)][:5].tolist()
        raise StoreError(
            f"SST store {store.path}: non-finite values in cells {cells} (of {int(allowed.sum())}"
            f" that take part, land: {store.land}); {REMEDY}",
            store.path, "sst", REMEDY,
        )  # fmt: skip
    return series


# ------------------------------------------------------------------ models


def mlp(n_in: int, hidden: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """``n_in -> hidden (x n_hidden, LeakyReLU after each) -> n_out``."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), nn.LeakyReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class DctEncoder(nn.Module):
    """The first ``n_dct`` orthonormal DCT-II coefficients of a window into an MLP.

    Args:
        window: T, weeks per window.
        n_dct: coefficients kept.
        hidden, n_layers: width and number of hidden layers (LeakyReLU).
        n_out: outputs.
    """

    def __init__(self, window: int, n_dct: int, hidden: int, n_layers: int, n_out: int):
        super().__init__()
        self.dct = Dct(window, n_dct)
        self.net = mlp(n_dct, hidden, n_layers, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., T)`` -> ``(..., n_out)``."""
        return self.net(self.dct(x))


def _check_pairs(x: torch.Tensor, window: int) -> None:
    if x.ndim != 3 or x.shape[1] != 2 or x.shape[2] != window:
        raise ValueError(f"pairs must have shape (B, 2, {window}), got {tuple(x.shape)}")


@dataclass
class MiOutput:
    """What :meth:`MechanisticIdentifier.forward` returns for ``B`` pairs.

    Attributes:
        latents: ``(B, 2, L)`` the encoder's outputs.
        shared: ``(B, 2, L)`` the latents with the first ``shared_latents`` averaged.
        solution: ``(B, 2, T)`` order 0 of the ODE solution.
        steps: ``(B, 2, T-1)`` the decoded step sizes.
    """

    latents: torch.Tensor
    shared: torch.Tensor
    solution: torch.Tensor
    steps: torch.Tensor


class MechanisticIdentifier(nn.Module):
    """Encoder, shared-latent averaging, ODE decoders and the MNN solve (see the module
    docstring).

    Args:
        window: T, weeks per window (steps of the ODE).
        n_dct: DCT-II coefficients into the encoder.
        encoder_hidden, encoder_layers: the encoder MLP.
        latents: L, encoder outputs.
        shared_latents: the first ones averaged between the two views of a pair.
        decoder_hidden: width of the decoder MLPs.
        n_init: S, weeks whose values are the initial values.
        solver: the solver of the MNN layer (:mod:`smnn.solver.registry`); not saved in
            ``state_dict``.
    """

    def __init__(
        self, window: int, n_dct: int, encoder_hidden: int, encoder_layers: int, latents: int,
        shared_latents: int, decoder_hidden: int, n_init: int, solver: str = "smnn",
    ):  # fmt: skip
        super().__init__()
        if not 0 <= shared_latents <= latents:
            raise ValueError(f"shared_latents must be in 0..{latents}, got {shared_latents}")
        if not 1 <= n_init < window:
            raise ValueError(f"n_init must be in 1..{window - 1}, got {n_init}")
        self.window, self.latents, self.shared_latents, self.n_init = (
            window, latents, shared_latents, n_init,
        )  # fmt: skip
        self.encoder = DctEncoder(window, n_dct, encoder_hidden, encoder_layers, latents)
        self.rhs_net = mlp(latents, decoder_hidden, DECODER_LAYERS, window)
        self.coefficient_net = mlp(latents, decoder_hidden, DECODER_LAYERS, window * N_ORDERS)
        self.step_net = mlp(latents, decoder_hidden, DECODER_LAYERS, window - 1)
        last = self.step_net[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(STEP_INIT / (1.0 - STEP_INIT)))
        self.layer = MnnLayer(solver)

    @property
    def solver(self) -> str:
        return self.layer.solver

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``x`` ``(..., T)`` -> latents ``(..., L)``."""
        return self.encoder(x)

    def share(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 2, L)`` of pairs -> the same with the first ``shared_latents`` replaced
        by their mean over the two views."""
        k = self.shared_latents
        mean = z[:, :, :k].mean(dim=1, keepdim=True).expand(-1, 2, -1)
        return torch.cat([mean, z[:, :, k:]], dim=2)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents ``(..., L)`` -> the ODE: coefficients ``(..., T, 3)``, right-hand side
        ``(..., T)``, steps ``(..., T-1)`` in ``[0.001, 0.999]``."""
        coefficients = self.coefficient_net(z).unflatten(-1, (self.window, N_ORDERS))
        steps = torch.sigmoid(self.step_net(z)).clamp(STEP_MIN, STEP_MAX)
        return coefficients, self.rhs_net(z), steps

    def solve(
        self, z: torch.Tensor, initial: torch.Tensor, n_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the ODE decoded from ``z`` ``(N, L)`` on its first ``n_steps`` steps (default
        T) from the values ``initial`` ``(N, n_init)`` at its first ``n_init`` steps.

        Returns:
            (order 0 of the solution ``(N, n_steps)``, the steps used ``(N, n_steps - 1)``).
        """
        n = self.window if n_steps is None else n_steps
        if (
            z.ndim != 2
            or initial.shape != (z.shape[0], self.n_init)
            or not self.n_init < n <= self.window
        ):
            raise ValueError(
                f"solve needs z (N, {self.latents}), initial (N, {self.n_init}) and n_steps in "
                f"{self.n_init + 1}..{self.window}; got {tuple(z.shape)}, "
                f"{tuple(initial.shape)}, {n}"
            )
        c, b, h = self.decode(z)
        c = c[:, :n].reshape(-1, n, 1, 1, N_ORDERS)  # (N, T, E=1, D=1, R=3)
        b = b[:, :n].unsqueeze(-1)  # (N, T, E=1)
        h = h[:, : n - 1]  # (N, T-1)
        u0 = initial.reshape(-1, self.n_init, 1, 1)  # (N, S, D=1, K=1)
        u = self.layer(b, u0, c, h, n_steps=n)  # (N, T, D=1, R=3)
        return u[..., 0, 0], h

    def forward(self, x: torch.Tensor) -> MiOutput:
        """Pairs ``x`` ``(B, 2, T)`` -> :class:`MiOutput` (each view's ODE solved on the window
        from its own first ``n_init`` weeks)."""
        _check_pairs(x, self.window)
        z = self.encode(x)
        shared = self.share(z)
        u, h = self.solve(shared.flatten(0, 1), x[..., : self.n_init].flatten(0, 1))
        return MiOutput(z, shared, u.view(x.shape), h.view(*x.shape[:2], -1))


@dataclass
class VaeOutput:
    """What :meth:`AdaGVAE.forward` returns for ``B`` pairs.

    Attributes:
        reconstruction: ``(B, 2, T)``.
        mean, logvar: ``(B, 2, L)`` the posteriors after adaptive averaging.
        shared: ``(B, L)`` bool, the dims averaged in each pair.
    """

    reconstruction: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    shared: torch.Tensor


class AdaGVAE(nn.Module):
    """The Ada-GVAE baseline (see the module docstring).

    Args:
        window: T, weeks per window.
        n_dct: DCT-II coefficients into the encoder.
        encoder_hidden, encoder_layers: the encoder MLP (as the identifier's).
        latents: L, Gaussian latent dims.
        decoder_hidden: width of the decoder MLP.
        n_init: weeks at the start of the window given to the decoder.
    """

    def __init__(
        self, window: int, n_dct: int, encoder_hidden: int, encoder_layers: int, latents: int,
        decoder_hidden: int, n_init: int,
    ):  # fmt: skip
        super().__init__()
        if not 1 <= n_init < window:
            raise ValueError(f"n_init must be in 1..{window - 1}, got {n_init}")
        self.window, self.latents, self.n_init = window, latents, n_init
        self.encoder = DctEncoder(window, n_dct, encoder_hidden, encoder_layers, 2 * latents)
        self.decoder = mlp(latents + n_init, decoder_hidden, DECODER_LAYERS, window)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``x`` ``(..., T)`` -> posterior (mean, log-variance), each ``(..., L)``."""
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return mean, logvar

    @staticmethod
    def adapt(
        mean: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ada-GVAE's adaptive averaging of the posteriors of pairs.

        Args:
            mean, logvar: ``(B, 2, L)``.

        Returns:
            (mean, logvar) ``(B, 2, L)`` with the shared dims averaged (mean of the two means,
            mean of the two variances), and the shared dims ``(B, L)`` bool: those whose
            ``KL(q1 || q2)`` is below the midpoint of the pair's smallest and largest.
        """
        m1, m2 = mean[:, 0], mean[:, 1]
        lv1, lv2 = logvar[:, 0], logvar[:, 1]
        kl = 0.5 * (lv2 - lv1 + (torch.exp(lv1) + (m1 - m2) ** 2) * torch.exp(-lv2) - 1.0)
        tau = 0.5 * (kl.amax(dim=1, keepdim=True) + kl.amin(dim=1, keepdim=True))
        shared = kl < tau
        avg_mean = 0.5 * (m1 + m2)
        avg_logvar = torch.log(0.5 * (torch.exp(lv1) + torch.exp(lv2)))
        s = shared.unsqueeze(1)
        return (
            torch.where(s, avg_mean.unsqueeze(1), mean),
            torch.where(s, avg_logvar.unsqueeze(1), logvar),
            shared,
        )

    def decode(self, z: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """Latents ``(..., L)`` and the first ``n_init`` weeks ``(..., n_init)`` -> the window
        ``(..., T)``."""
        if initial.shape[-1] != self.n_init or z.shape[-1] != self.latents:
            raise ValueError(
                f"decode needs z (..., {self.latents}) and initial (..., {self.n_init}), got "
                f"{tuple(z.shape)} and {tuple(initial.shape)}"
            )
        return self.decoder(torch.cat([z, initial], dim=-1))

    def forward(self, x: torch.Tensor, sample: bool = True) -> VaeOutput:
        """Pairs ``x`` ``(B, 2, T)`` -> :class:`VaeOutput`; ``sample``: decode a draw from the
        posterior (training; torch's global generator), else its mean."""
        _check_pairs(x, self.window)
        mean, logvar, shared = self.adapt(*self.encode(x))
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return VaeOutput(self.decode(z, x[..., : self.n_init]), mean, logvar, shared)

    @staticmethod
    def kl_prior(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``KL(q || N(0, I))`` summed over the last axis: ``(...)``."""
        return 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar).sum(dim=-1)


# ------------------------------------------------------------------ training tasks


class PairSampler:
    """Random training pairs of windows from the training period held in memory.

    Args:
        series: ``(T_train, n_cells)`` on the training device.
        partners: the pairing rule on the grid.
        window: weeks per window.
        windows_per_epoch: samples per epoch; None = one per pairable cell (sample ``i`` is
            cell ``partners.pairable_cells[i]``), else each sample's cell is drawn at random.
    """

    def __init__(
        self, series: torch.Tensor, partners: RowPartners, window: int,
        windows_per_epoch: int | None = None,
    ):  # fmt: skip
        if series.ndim != 2 or series.shape[1] != partners.n_cells:
            raise ValueError(f"series must be (T, {partners.n_cells}), got {tuple(series.shape)}")
        if series.shape[0] < window:
            raise ValueError(
                f"the training period has {series.shape[0]} weeks, fewer than a window "
                f"({window}); make the store's test period shorter or the window smaller"
            )
        if partners.pairable_cells.numel() == 0:
            raise ValueError("no cell has a partner (no two allowed cells share a latitude "
                             "within the offsets)")  # fmt: skip
        self.series, self.partners, self.window = series, partners, window
        self.random_cells = windows_per_epoch is not None
        self.n_samples = (
            int(windows_per_epoch) if windows_per_epoch is not None
            else int(partners.pairable_cells.numel())
        )  # fmt: skip

    def draw(self, indices: torch.Tensor) -> torch.Tensor:
        """The pairs of the samples ``indices`` ``(B,)``: ``(B, 2, window)`` (torch's global
        generator draws the partners, the starts and, with ``windows_per_epoch``, the cells)."""
        pool = self.partners.pairable_cells
        indices = indices.to("cpu", torch.int64)
        if self.random_cells:
            cells = pool[torch.randint(0, pool.numel(), (indices.numel(),))]
        else:
            cells = pool[indices]
        partner = self.partners.draw(cells)
        starts = random_starts(self.series.shape[0], self.window, cells.numel())
        both = torch.stack([cells, partner], dim=1).flatten()
        x = gather_windows(self.series, starts.repeat_interleave(2), both, self.window)
        return x.view(-1, 2, self.window)


class _SstTask:
    """What both SST tasks share: the sampler, the optimiser, the schedule."""

    kind: str
    model: nn.Module

    def __init__(self, settings: SstSettings, sampler: PairSampler, store: SstStore | None):
        self.settings, self.sampler, self.store = settings, sampler, store
        self.n_epochs = settings.epochs
        self.n_samples = sampler.n_samples
        self.batch_size = settings.batch_size

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        return torch.optim.Adam(self.model.parameters(), lr=self.settings.lr), None

    def on_epoch_start(self, epoch: int) -> None:
        pass


class MiTask(_SstTask):
    """The Mechanistic Identifier as a :class:`smnn.training.TrainingTask`."""

    kind = MI_KIND

    def __init__(
        self, settings: SstSettings, sampler: PairSampler, store: SstStore | None, solver: str,
        device: torch.device,
    ):  # fmt: skip
        super().__init__(settings, sampler, store)
        self.model = MechanisticIdentifier(**settings.mi_args(), solver=solver).to(
            device=device, dtype=settings.torch_dtype
        )
        self._step_sum = 0.0
        self._step_n = 0

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MiOutput]:
        """(DCT loss, alignment term, the model's output) for pairs ``x`` ``(B, 2, T)``."""
        out = self.model(x)
        dct = self.model.encoder.dct
        loss_dct = torch.mean((dct(out.solution) - dct(x)) ** 2)
        k = self.model.shared_latents
        if k > 0:
            loss_align = torch.mean((out.latents[..., :k] - out.shared[..., :k]) ** 2)
        else:
            loss_align = torch.zeros((), dtype=x.dtype, device=x.device)
        return loss_dct, loss_align, out

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.sampler.draw(indices)
        loss_dct, loss_align, out = self.loss_terms(x)
        self._step_sum += float(out.steps.detach().mean())
        self._step_n += 1
        loss = loss_dct + self.settings.alignment_weight * loss_align
        return loss, {
            "loss_dct": float(loss_dct.detach()),
            "loss_alignment": float(loss_align.detach()),
        }

    def epoch_metrics(self) -> dict[str, float]:
        """The mean decoded step size over the epoch's steps (of this process)."""
        mean = self._step_sum / self._step_n if self._step_n else float("nan")
        self._step_sum, self._step_n = 0.0, 0
        return {"mean_step_size": mean}


class AdaGVAETask(_SstTask):
    """The Ada-GVAE baseline as a :class:`smnn.training.TrainingTask`."""

    kind = ADAGVAE_KIND

    def __init__(
        self, settings: SstSettings, sampler: PairSampler, store: SstStore | None,
        device: torch.device,
    ):  # fmt: skip
        super().__init__(settings, sampler, store)
        self.model = AdaGVAE(**settings.adagvae_args()).to(
            device=device, dtype=settings.torch_dtype
        )
        self._shared_sum = 0.0
        self._shared_n = 0

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, VaeOutput]:
        """(reconstruction MSE, KL to the prior per week, the output) for pairs ``x``."""
        out = self.model(x, sample=True)
        loss_rec = torch.mean((out.reconstruction - x) ** 2)
        loss_kl = self.model.kl_prior(out.mean, out.logvar).mean() / self.model.window
        return loss_rec, loss_kl, out

    def training_step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.sampler.draw(indices)
        loss_rec, loss_kl, out = self.loss_terms(x)
        self._shared_sum += float(out.shared.sum(dim=1, dtype=torch.float64).sum())
        self._shared_n += int(out.shared.shape[0])
        loss = loss_rec + self.settings.beta * loss_kl
        return loss, {"loss_reconstruction": float(loss_rec.detach()),
                      "loss_kl": float(loss_kl.detach())}  # fmt: skip

    def epoch_metrics(self) -> dict[str, float]:
        """The mean number of latent dims averaged per pair over the epoch's steps."""
        mean = self._shared_sum / max(self._shared_n, 1)
        self._shared_sum, self._shared_n = 0.0, 0
        return {"mean_shared_dims": mean}


def _sampler(settings: SstSettings, store: SstStore, device: torch.device) -> PairSampler:
    series = read_period(store, slice(0, store.n_train), dtype=settings.torch_dtype, device=device)
    partners = RowPartners((store.n_lat, store.n_lon), settings.neighbour_offsets, store.allowed)
    return PairSampler(series, partners, settings.window, settings.windows_per_epoch)


def build_mi_task(
    config: Config, solver: str, data_path: str | Path, device: torch.device
) -> MiTask:
    """The identifier's training task on the training period of ``data_path``."""
    settings = SstSettings.from_config(config)
    store = open_store(data_path, config)
    return MiTask(settings, _sampler(settings, store, device), store, solver, device)


def build_adagvae_task(config: Config, data_path: str | Path, device: torch.device) -> AdaGVAETask:
    """Ada-GVAE's training task on the training period of ``data_path``."""
    settings = SstSettings.from_config(config)
    store = open_store(data_path, config)
    return AdaGVAETask(settings, _sampler(settings, store, device), store, device)


def _model_payload(task: MiTask | AdaGVAETask) -> dict[str, Any]:
    model = task.model
    args = task.settings.mi_args() if task.kind == MI_KIND else task.settings.adagvae_args()
    n_params = sum(p.numel() for p in model.parameters())
    name = "Mechanistic Identifier" if task.kind == MI_KIND else "Ada-GVAE"
    return {
        "kind": task.kind,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": args,
        "dtype": task.settings.dtype,
        "n_parameters": n_params,
        "summary": [
            f"{name}: {n_params} parameters, window {args['window']} weeks, "
            f"{args['n_dct']} DCT coefficients, {args['latents']} latents"
        ],
    }


def load_model(
    path: str | Path,
    kind: str,
    *,
    solver: str = "smnn",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[MechanisticIdentifier | AdaGVAE, dict[str, Any]]:
    """Rebuild a trained SST model (in eval mode) from ``model.pt``; returns (model, payload).

    Args:
        kind: ``mechanistic_identifier`` or ``adagvae`` (must match the file).
        solver: the identifier's solver.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds another kind of model or lacks its parts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train first)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or any(k not in payload for k in ("state_dict", "model_args")):
        raise ValueError(f"{path} is not an SST model file (no state_dict / model_args)")
    if payload.get("kind") != kind:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} model, expected {kind!r}")
    if kind == MI_KIND:
        model: nn.Module = MechanisticIdentifier(**payload["model_args"], solver=solver)
    else:
        model = AdaGVAE(**payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    model.to(device=device, dtype=dtype).eval()
    return model, payload


# ------------------------------------------------------------------ evaluation

SHORT_NAMES = {
    MI_KIND: "mi", ADAGVAE_KIND: "adagvae", "climatology": "climatology",
    "persistence": "persistence",
}  # fmt: skip


def _date(t: np.datetime64) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "D")))


def _evaluate(
    config: Config,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    device: torch.device,
    baseline_models: Mapping[str, Path] | None = None,
) -> Evaluation:
    """The forecast protocol of :mod:`smnn.experiments.sst_evaluation` for the identifier (and
    Ada-GVAE when its model is given), climatology and persistence; writes ``metrics.json`` and
    ``plots/*.png`` into ``out_dir``."""
    s = SstSettings.from_config(config)
    store = open_store(data_path, config)
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    dtype = s.torch_dtype
    mi, payload = load_model(model_path, MI_KIND, solver=solver, dtype=dtype, device=device)
    if mi.window != s.window or mi.n_init != s.n_init:
        raise ValueError(
            f"{model_path} was trained with window {mi.window} and n_init {mi.n_init}, the "
            f"config says {s.window} and {s.n_init}: retrain"
        )
    E, F, S = s.encode_weeks, s.forecast_weeks, s.n_init
    if E + F > store.n_test:
        raise ValueError(
            f"encode_weeks + forecast_weeks = {E + F} exceed the store's {store.n_test} test "
            f"weeks; rerun preprocess_sst with test_weeks >= {E + F}"
        )
    notes: list[str] = []
    vae = None
    vae_path = (baseline_models or {}).get(ADAGVAE_KIND)
    if vae_path is not None and Path(vae_path).is_file():
        vae, vae_payload = load_model(vae_path, ADAGVAE_KIND, dtype=dtype, device=device)
    else:
        why = "not given" if vae_path is None else f"{vae_path} does not exist"
        notes.append(f"warning: Ada-GVAE left out of the evaluation (its model.pt is {why})")
        vae_payload = None

    # the windows of every cell, the cells forecast and their partners
    test = read_period(store, slice(store.n_train, store.n_weeks), dtype=dtype, device=device)
    encode = test[:E].T.contiguous()  # (n_cells, E)
    future = test[E : E + F].T.contiguous()  # (n_cells, F)
    cells = torch.from_numpy(np.flatnonzero(store.allowed))
    rule = RowPartners((store.n_lat, store.n_lon), s.neighbour_offsets, store.allowed)
    partners = evaluation_partners(rule, cells, seeded_generator(s.seed, "sst", "evaluate"))
    truth = future[cells.to(future.device)].double().cpu().numpy()  # (N, F)

    forecasts: dict[str, np.ndarray] = {
        MI_KIND: mi_forecast(mi, encode, future, cells, partners, s.batch_size)
    }
    if vae is not None:
        forecasts[ADAGVAE_KIND] = adagvae_forecast(
            vae, encode, future, cells, partners, s.batch_size
        )
    times = store.times
    weeks = week_of_year(times)
    train = read_period(store, slice(0, store.n_train), dtype=torch.float32).numpy()
    climatology = seasonal_climatology(train, weeks[: store.n_train])[:, cells.numpy()]
    del train
    first = store.n_train + E  # index of the forecast window's first week
    forecasts["climatology"] = climatology_forecast(climatology, weeks[first : first + F])
    forecasts["persistence"] = persistence_forecast(truth, S)
    scores: dict[str, ForecastScore] = {
        name: score_forecast(f, truth, S) for name, f in forecasts.items()
    }
    ocean = store.mask.reshape(-1)[cells.numpy()] == 1
    table = score_table(scores, store.std_degc, ocean)

    metrics: dict[str, float] = {}
    for name, row in table.items():
        short = SHORT_NAMES[name]
        for key in ("mse_norm", "mse_degc", "mse_norm_ocean", "mse_degc_ocean"):
            metrics[f"{key}_{short}"] = float(row[key])
    for name, p in ((MI_KIND, payload), (ADAGVAE_KIND, vae_payload)):
        final = (p or {}).get("final_metrics", {}).get("final_train_loss")
        if final is not None:
            metrics[f"train_final_loss_{SHORT_NAMES[name]}"] = float(final)

    synthetic = " (synthetic data)" if store.synthetic else ""
    files = _figures(
        s, store, plots, synthetic, solver, cells, encode, truth, forecasts, scores,
        payload, vae_payload,
    )  # fmt: skip
    document = {
        "experiment": "sst",
        "solver": solver,
        "synthetic": store.synthetic,
        "land": store.land,
        "cells": "ocean" if store.land == "ocean" else "all",
        "n_cells_scored": int(cells.numel()),
        "n_ocean_cells_scored": int(ocean.sum()),
        "std_degc": store.std_degc,
        "mean_degc": store.mean_degc,
        "protocol": {
            "encode_weeks": E,
            "forecast_weeks": F,
            "given_weeks": S,
            "scored_weeks": F - S,
            "encode_start": _date(times[store.n_train]),
            "forecast_start": _date(times[first]),
            "forecast_end": _date(times[first + F - 1]),
            "scored": "the weeks after the given ones, every cell forecast",
            "pairs": "each cell with a partner on its latitude drawn from the seed "
            "(itself when it has none)",
        },
        "models": table,
        "left_out": [] if vae is not None else [ADAGVAE_KIND],
    }
    atomic_write_json(document, out_dir / "metrics.json")
    summary = [
        f"forecast MSE over {F - S} weeks after {S} given, {cells.numel()} cells{synthetic}:",
        *(
            f"  {name:24s} {row['mse_norm']:.4f} (normalised)  {row['mse_degc']:.4f} degC^2"
            for name, row in table.items()
        ),
        *notes,
    ]
    tags = {"synthetic": str(store.synthetic).lower()}
    if payload.get("run_id"):
        tags["train_run_id"] = str(payload["run_id"])
    if vae_payload is not None and vae_payload.get("run_id"):
        tags["baseline_adagvae_run_id"] = str(vae_payload["run_id"])
    return Evaluation(metrics, document, files, tags, summary)


def _figures(
    s: SstSettings, store: SstStore, plots: Path, synthetic: str, solver: str,
    cells: torch.Tensor, encode: torch.Tensor, truth: np.ndarray,
    forecasts: Mapping[str, np.ndarray], scores: Mapping[str, ForecastScore],
    payload: Mapping[str, Any], vae_payload: Mapping[str, Any] | None,
) -> list[Path]:  # fmt: skip
    """The evaluation's plots (see :mod:`smnn.experiments.sst_figures`)."""
    ds = store.dataset
    lat, lon = np.asarray(ds["lat"].values), np.asarray(ds["lon"].values)
    n_cells = store.n_lat * store.n_lon
    gen = seeded_generator(s.seed, "sst", "evaluate", "sample cells")
    n_sample = min(s.sample_cells, int(cells.numel()))
    picks = torch.randperm(int(cells.numel()), generator=gen)[:n_sample].sort().values.numpy()
    labels = []
    for i in picks:
        c = int(cells[i])
        labels.append(f"cell lat {lat[c // store.n_lon]:.1f}, lon {lon[c % store.n_lon]:.1f}")
    history = encode[cells[picks].to(encode.device)].double().cpu().numpy()
    files = [
        plot_forecast_samples(
            history, truth[picks], {k: v[picks] for k, v in forecasts.items()}, s.n_init,
            plots / "forecast_samples.png", labels=labels, ylabel="SST (normalised)",
            step_unit="weeks", title=f"SST forecasts, solver {solver}{synthetic}",
        ),
        plot_error_by_lead(
            {k: v.by_lead for k, v in scores.items()}, plots / "mse_by_lead.png",
            ylabel="MSE (normalised)", step_unit="weeks",
            title=f"SST forecast error by lead time, solver {solver}{synthetic}",
        ),
    ]  # fmt: skip

    def grid(values: np.ndarray) -> np.ndarray:
        full = np.full(n_cells, np.nan)
        full[cells.numpy()] = values
        return full.reshape(store.n_lat, store.n_lon)

    trained = [k for k in (MI_KIND, ADAGVAE_KIND) if k in scores]
    files.append(
        plot_error_maps(
            lat, lon, {k: grid(scores[k].per_cell) for k in trained}, store.mask,
            plots / "mse_map.png",
            title=f"forecast MSE per cell over {s.forecast_weeks - s.n_init} weeks{synthetic}",
        )
    )  # fmt: skip
    last = s.forecast_weeks - 1
    when = _date(store.times[store.n_train + s.encode_weeks + last])
    files.append(
        plot_forecast_week(
            lat, lon, grid(forecasts[MI_KIND][:, last]), grid(truth[:, last]), store.mask,
            plots / "forecast_week.png", forecast_label="Mechanistic Identifier",
            title=f"week of {when} (lead {last + 1 - s.n_init}){synthetic}",
        )
    )  # fmt: skip
    histories = {MI_KIND: (payload.get("history", []), payload.get("step_losses", []))}
    if vae_payload is not None:
        histories[ADAGVAE_KIND] = (
            vae_payload.get("history", []), vae_payload.get("step_losses", []),
        )  # fmt: skip
    files.append(
        plot_training_losses(histories, plots / "loss.png", title=f"training loss{synthetic}")
    )
    return files


# ------------------------------------------------------------------ the experiment


class SstExperiment:
    """The SST experiment as the generic commands and rules see it
    (:class:`smnn.experiments.base.Experiment`), with its trained baseline Ada-GVAE."""

    name = "sst"
    title = "Sea surface temperature"
    mlflow_experiment = "sst"
    solvers = ("smnn", "mnn_dense", "mnn_cg")
    baselines = (ADAGVAE_KIND,)
    data_store = "sst.zarr"
    data_rules = ("synthesize_sst", "download_sst", "preprocess_sst")
    rule_file = Path("workflow", "rules", "sst.smk")
    resources = {
        "train": {"mem_mb": 16000, "runtime": 720},
        "evaluate": {"mem_mb": 8000, "runtime": 120},
    }

    @property
    def schema(self) -> dict[str, Any]:
        return yaml.safe_load(Path(__file__).with_name("sst.schema.yaml").read_text())

    def config_problems(self, section: dict[str, Any]) -> list[str]:
        return section_problems(section)

    def extra_targets(self, section: Mapping[str, Any]) -> list[str]:
        """The long-sequence study's outputs (rule ``sst_scaling``, relative to
        ``paths.results``) when ``sst.scaling.enabled``."""
        scaling = section.get("scaling")
        if isinstance(scaling, Mapping) and scaling.get("enabled"):
            return [f"sst/scaling/{name}" for name in SCALING_OUTPUTS]
        return []

    def summary(self, config: Config) -> str:
        s = SstSettings.from_config(config)
        return (
            f"SST forecasting: Mechanistic Identifier on pairs of {s.window}-week windows "
            f"({s.n_dct} DCT coefficients, encoder {s.encoder_layers} x {s.encoder_hidden}, "
            f"{s.latents} latents of which {s.shared_latents} shared, decoders "
            f"{s.decoder_hidden} wide, {s.n_init} initial weeks); {s.epochs} epochs, batch "
            f"{s.batch_size} pairs, lr {s.lr}, {s.dtype}; evaluation encodes {s.encode_weeks} "
            f"and forecasts {s.forecast_weeks} test weeks"
        )

    def build_task(
        self, config: Config, solver: str, data_path: Path, device: torch.device
    ) -> MiTask:
        return build_mi_task(config, solver, data_path, device)

    def build_baseline_task(
        self, config: Config, baseline: str, data_path: Path, device: torch.device
    ) -> AdaGVAETask:
        if baseline != ADAGVAE_KIND:
            raise ValueError(
                f"experiment sst has the trained baselines {', '.join(self.baselines)}, "
                f"not {baseline!r}"
            )
        return build_adagvae_task(config, data_path, device)

    def model_payload(self, task: MiTask | AdaGVAETask) -> dict[str, Any]:
        return _model_payload(task)

    def evaluate(
        self,
        config: Config,
        solver: str,
        data_path: Path,
        model_path: Path,
        out_dir: Path,
        device: torch.device,
        baseline_models: Mapping[str, Path] | None = None,
    ) -> Evaluation:
        return _evaluate(config, solver, data_path, model_path, out_dir, device, baseline_models)


EXPERIMENT = SstExperiment()
