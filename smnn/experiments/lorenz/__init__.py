"""Lorenz: discovering the governing equations from a trajectory (docs/experiments.md).

Model. A window ``x`` of ``W`` consecutive observed states ``(W, 3)`` goes through a denoiser MLP
(``3W -> hidden -> hidden -> 3W``, ReLU; used as a residual, ``x_hat = x + mlp(x)``, so training
starts from the identity). A coefficient generator maps one learnable latent vector through an
MLP (``latent -> hidden -> hidden -> 30``) to the coefficients ``xi`` ``(10, 3)`` of the
degree-2 polynomial library (:class:`smnn.experiments.library.PolynomialLibrary`), times a 0/1
mask. Each state ``d`` of each window is its own first-order linear ODE
``u' = Theta(x_hat) xi[:, d]`` with ``R = 3`` orders, coefficients ``(0, 1, 0)``, step ``dt``
and initial value ``x_hat`` at the first step; the solver returns ``u`` ``(W, 3)``. Loss:
``MSE(u, x) + MSE(x_hat, x)``.

Schedule. ``cycles`` optimise-and-threshold cycles of ``epochs_per_cycle`` epochs (Adam); at the
start of every cycle after the first, terms with ``|xi| <= threshold`` are masked to zero for
good.

Solvers. The solve is the shared :class:`~smnn.experiments.mnn_layer.MnnLayer` with a frozen
left-hand side (coefficients and step never change): ``smnn`` factorizes it once and every step
only substitutes; ``mnn_dense`` / ``mnn_cg`` solve from scratch on every step.

Evaluation. The recovered ``xi`` against the truth: errors, terms wrongly kept or dropped, sign
errors; the recovered equations simulated with scipy from the data's initial state against the
true trajectory; plots.

The package: :mod:`.settings` (the config section parsed once), :mod:`.models`, :mod:`.tasks`
(training), :mod:`.evaluation`, :mod:`.figures`, :mod:`.commands` (``smnn generate-lorenz``),
``schema.yaml``; the data source is :mod:`smnn.data.lorenz`, the data rule
``workflow/rules/lorenz.smk``. This module is light (no torch): it holds :data:`EXPERIMENT`,
whose methods import the rest when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smnn.experiments.base import Command, Experiment, load_schema

__all__ = ["EXPERIMENT", "LorenzExperiment"]


class LorenzExperiment(Experiment):
    """The Lorenz experiment (:class:`smnn.experiments.base.Experiment`)."""

    name = "lorenz"
    title = "Lorenz"
    mlflow_experiment = "lorenz"
    solvers = ("smnn", "mnn_dense", "mnn_cg")
    data_store = "lorenz.zarr"
    data_rules = ("generate_lorenz",)
    rule_file = Path("workflow", "rules", "lorenz.smk")
    resources = {
        "train": {"mem_mb": 8000, "runtime": 720},
        "evaluate": {"mem_mb": 4000, "runtime": 60},
    }
    commands = (
        Command(
            "generate-lorenz",
            "smnn.experiments.lorenz.commands",
            "generate the Lorenz trajectory (scipy) into a Zarr v3 store",
        ),
    )

    @property
    def schema(self) -> dict[str, Any]:
        return load_schema(__file__)

    def settings(self, config):
        from smnn.experiments.lorenz.settings import LorenzSettings

        return LorenzSettings.from_config(config)

    def describe(self, settings) -> str:
        s = settings
        return (
            f"Lorenz equation discovery: windows of {s.data.window} points (dt {s.data.dt}) of a "
            f"{s.data.n_points}-point trajectory, {s.cycles} cycles x {s.epochs_per_cycle} "
            f"epochs, batch {s.batch_size}, lr {s.lr}, {s.dtype}, threshold {s.threshold}"
        )

    def build_task(self, settings, solver, data_path, device, threads=None):
        from smnn.experiments.lorenz.tasks import build_task

        return build_task(settings, solver, data_path, device, threads)

    def model_payload(self, task) -> dict[str, Any]:
        from smnn.experiments.lorenz.tasks import model_payload

        payload = model_payload(task)
        payload["summary"] = ["recovered equations:", *(f"  {e}" for e in payload["equations"])]
        return payload

    def train_document(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return {k: payload[k] for k in ("equations", "coefficients", "terms")}

    def evaluate(
        self, settings, solver, data_path, model_path, out_dir, device, baseline_models=None
    ):
        from smnn.experiments.lorenz.evaluation import evaluate

        return evaluate(settings, solver, data_path, model_path, out_dir)

    def summary_lines(self, document: Mapping[str, Any]) -> list[str]:
        return list(document.get("equations", []))


EXPERIMENT = LorenzExperiment()
