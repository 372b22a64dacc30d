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

Evaluation: :mod:`smnn.experiments.sst.evaluation` (protocol, baselines, metrics) and
:mod:`smnn.experiments.sst.figures` / :mod:`smnn.experiments.forecast_figures` (plots).


The package: :mod:`.settings` (the ``sst`` section parsed once, with its cross-key checks),
:mod:`.store` (the Zarr store), :mod:`.models`, :mod:`.tasks` (training), :mod:`.evaluation`
(the forecast protocol, baselines, metrics), :mod:`.figures`, :mod:`.scaling` (the
long-sequence study, rule ``sst_scaling``), :mod:`.commands` and :mod:`.scaling_command` (its
``smnn`` subcommands), ``schema.yaml``; the data sources are in :mod:`smnn.data.sst`, the data
rules in ``workflow/rules/sst.smk``. This module is light (no torch): it holds
:data:`EXPERIMENT`, whose methods import the rest when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smnn.experiments.base import Command, Experiment, load_schema

__all__ = ["EXPERIMENT", "SstExperiment"]

ADAGVAE = "adagvae"
SCALING_OUTPUTS = ("scaling.csv", "scaling.md", "scaling.png")  # of rule sst_scaling
_DATA = "smnn.experiments.sst.commands"


class SstExperiment(Experiment):
    """The SST experiment (:class:`smnn.experiments.base.Experiment`), with its trained
    baseline Ada-GVAE."""

    name = "sst"
    title = "Sea surface temperature"
    mlflow_experiment = "sst"
    solvers = ("smnn", "mnn_dense", "mnn_cg")
    baselines = (ADAGVAE,)
    data_store = "sst.zarr"
    data_rules = ("synthesize_sst", "download_sst", "preprocess_sst")
    rule_file = Path("workflow", "rules", "sst.smk")
    resources = {
        "train": {"mem_mb": 16000, "runtime": 720},
        "evaluate": {"mem_mb": 8000, "runtime": 120},
    }
    commands = (
        Command(
            "download-sst",
            _DATA,
            "download the NOAA OI SST V2 weekly file and land-sea mask (sst.download)",
        ),
        Command(
            "synthesize-sst",
            _DATA,
            "write synthetic SST and land-sea mask NetCDF files in the NOAA layout",
        ),
        Command(
            "preprocess-sst",
            _DATA,
            "preprocess the SST NetCDF files into the Zarr store (xarray + Dask)",
        ),
        Command(
            "sst-scaling",
            "smnn.experiments.sst.scaling_command",
            "SST long-sequence study: training step time and peak memory against length",
        ),
    )

    @property
    def schema(self) -> dict[str, Any]:
        return load_schema(__file__)

    def settings(self, config):
        from smnn.experiments.sst.settings import SstSettings

        return SstSettings.from_config(config)

    def extra_targets(self, settings) -> list[str]:
        """The long-sequence study's outputs (rule ``sst_scaling``, relative to
        ``paths.results``) when ``sst.scaling.enabled``."""
        if settings.scaling_enabled:
            return [f"sst/scaling/{name}" for name in SCALING_OUTPUTS]
        return []

    def describe(self, settings) -> str:
        s = settings
        return (
            f"SST forecasting: Mechanistic Identifier on pairs of {s.window}-week windows "
            f"({s.n_dct} DCT coefficients, encoder {s.encoder_layers} x {s.encoder_hidden}, "
            f"{s.latents} latents of which {s.shared_latents} shared, decoders "
            f"{s.decoder_hidden} wide, {s.n_init} initial weeks); {s.epochs} epochs, batch "
            f"{s.batch_size} pairs, lr {s.lr}, {s.dtype} (solve {s.solve_dtype or s.dtype}, "
            f"method {s.solve_method}); evaluation encodes {s.encode_weeks} "
            f"and forecasts {s.forecast_weeks} test weeks"
        )

    def build_task(self, settings, solver, data_path, device, threads=None):
        from smnn.experiments.sst.tasks import build_mi_task

        return build_mi_task(settings, solver, data_path, device, threads)

    def build_baseline_task(self, settings, baseline, data_path, device):
        if baseline != ADAGVAE:
            return super().build_baseline_task(settings, baseline, data_path, device)
        from smnn.experiments.sst.tasks import build_adagvae_task

        return build_adagvae_task(settings, data_path, device)

    def model_payload(self, task) -> dict[str, Any]:
        from smnn.experiments.sst.tasks import model_payload

        return model_payload(task)

    def evaluate(
        self, settings, solver, data_path, model_path, out_dir, device, baseline_models=None
    ):
        from smnn.experiments.sst.evaluation import evaluate

        return evaluate(settings, solver, data_path, model_path, out_dir, device, baseline_models)

    def summary_lines(self, document: Mapping[str, Any]) -> list[str]:
        """The forecast MSE (normalised) of the identifier beside climatology and persistence
        (and Ada-GVAE when scored), and plainly whether the identifier beats climatology."""
        models = document.get("models", {})
        if "mechanistic_identifier" not in models:
            return []
        mse = {name: row["mse_norm"] for name, row in models.items()}
        synthetic = " (synthetic data)" if document.get("synthetic") else ""
        lines = [
            f"forecast MSE (normalised){synthetic}: "
            + ", ".join(f"{name} {value:.4g}" for name, value in mse.items())
        ]
        model, clim = mse["mechanistic_identifier"], mse.get("climatology")
        if clim is not None:
            verdict = "beats" if model < clim else "loses to"
            lines.append(
                f"the Mechanistic Identifier {verdict} climatology ({model:.4g} vs {clim:.4g})"
            )
        return lines


EXPERIMENT = SstExperiment()
