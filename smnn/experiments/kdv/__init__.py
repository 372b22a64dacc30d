"""KdV: an MNN that forecasts the Korteweg-de Vries equation (docs/experiments.md, KdV).

Data. The store ``data/kdv.zarr`` (rules ``generate_kdv`` / ``import_kdv``, read through
:func:`smnn.data.kdv.open_kdv_store`) holds ``u`` ``(trajectory, time, x)`` of the train, valid
and test splits on a periodic grid of ``n_x`` points. Training and validation read their split
into memory as ``(n, T_traj, n_x)``.

Model (:class:`KdvModel`). One call maps ``window`` (W) consecutive steps ``(B, W, n_x)`` to the
next W steps, the first of which is the last input step (the windows overlap by one). Every grid
point gets its own linear ODE in time of order 4 over the W output steps
(``E = D = 1``, ``R = 5``: ``sum_r c_r(t) d^r u / dt^r = b(t)``):

- coefficient net: :class:`smnn.experiments.resnet1d.ResNet1D` over x (circular padding, the W
  input steps as channels), then a circular convolution (kernel :data:`HEAD_KERNEL`) to
  ``W * 5`` channels: the coefficients ``c[t, r]`` of every grid point;
- right-hand-side net: a second ResNet1D of the same shape and a convolution to W channels:
  ``b[t]`` of every grid point;
- initial-value net (:class:`ConvEncoder` + linear): seven circular convolutions of widths
  ``h, 2h, 4h, 4h, 2h, h, h/2`` (``h = init_hidden``, kernel :data:`INIT_KERNEL`, ReLU
  between, the fifth and sixth with stride 2), flattened, and one linear layer to
  ``3 * n_x`` numbers: orders 1 to 3 of every grid point at the first step. Order 0 is the last
  observed value itself (not learned), so the solution starts at the data: the initial values
  are the orders ``0..3`` (``K = 4``) at the first step (``S = 1``). The linear layer sees the
  whole domain (the derivatives of a point may depend on all of it), as in the published model;
  it fixes ``n_x``.
- step net: a :class:`ConvEncoder` of the same widths (kernel :data:`STEP_KERNEL`) and one
  linear layer to a single number ``z`` per sample, ``h = step_floor + (1 - step_floor)
  sigmoid(z)``: one step size per sample in ``(step_floor, 1)``, shared by every grid point and
  time step (a smooth floor: unlike a clip, it never stops the step's gradient). Its last layer
  starts with zero weights and the bias that gives the step :data:`STEP_INIT`, so training starts
  from it (``step_floor`` must be below it).
  Steps below about 0.005 make the normal equations of the order-4 ODE lose positive
  definiteness even in float64; the solve then fails naming the steps (raise ``step_floor``,
  published 1e-3, or lower the learning rate).

Initialisation: the weights of the coefficient, right-hand-side and initial-derivative heads
(their last layers) start at zero and their biases at ``c = (0, 0, 0, 0, 1)``, ``b = 0`` and
derivatives 0, i.e. ``d^4u/dt^4 = 0`` from ``(u, 0, 0, 0)``: the solution of the initial model
is the last input step held, exactly (persistence), and training learns the departures from it.

The ``B * n_x`` systems of ``T = W`` steps are solved by
:class:`smnn.experiments.mnn_layer.MnnLayer` with the job's solver (batch dims ``(B, n_x)``, the
step ``(B, 1, 1)`` broadcast over x and time), in ``kdv.model.solve_dtype`` (default float64,
:data:`SOLVE_DTYPE`: a float32 model casts its decoded ODE up and the solution back; float32
with ``kdv.model.solve_method`` qr or auto, the orthogonal solve); gradients reach all four solver
inputs. At the published sizes (64 base filters, kernel 9, 10 blocks doubling every 4,
``init_hidden`` 64, ``n_x = 256``, W = 10) the model has :data:`PAPER_PARAMETERS` parameters
(about 10.4M).

Training (:class:`KdvTask`). Windows of ``2W - 1`` consecutive steps of a train trajectory:
input steps ``[s, s + W)``, target steps ``[s + W - 1, s + 2W - 1)``; every start of every
trajectory once per epoch (``windows_per_epoch: null``), or ``windows_per_epoch`` windows drawn
at random (trajectory and start uniform) from torch's global generator, which the Trainer seeds
and checkpoints (a resumed run redraws the same windows). Loss: the mean absolute error between
the solution (order 0, all W steps) and the target. Adam with ``lr``, ``ReduceLROnPlateau``
(``plateau_factor``, ``plateau_patience``) stepped on the validation loss: the same L1 loss on a
fixed subset of at most ``kdv.train.valid_windows`` (default :data:`VALID_WINDOWS`) windows of
the valid split (distinct, drawn once from the seed), computed after every epoch.

Evaluation: :mod:`smnn.experiments.kdv.evaluation` (rollout, persistence, NMSE) and
:mod:`smnn.experiments.kdv.figures` / :mod:`smnn.experiments.forecast_figures` (plots).


The package: :mod:`.settings` (the ``kdv`` section parsed once, with its cross-key checks),
:mod:`.store`, :mod:`.models`, :mod:`.tasks` (training), :mod:`.evaluation` (the rollout
protocol and its metrics), :mod:`.figures`, :mod:`.commands` (``smnn generate-kdv`` and
``import-kdv``), ``schema.yaml``; the data sources are in :mod:`smnn.data.kdv`, the data rules in
``workflow/rules/kdv.smk``. This module is light (no torch): it holds :data:`EXPERIMENT`, whose
methods import the rest when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smnn.experiments.base import Command, Experiment, load_schema

__all__ = ["EXPERIMENT", "KdvExperiment"]

_DATA = "smnn.experiments.kdv.commands"


class KdvExperiment(Experiment):
    """The KdV experiment (:class:`smnn.experiments.base.Experiment`); persistence, its
    baseline, needs no training."""

    name = "kdv"
    title = "KdV"
    mlflow_experiment = "kdv"
    solvers = ("smnn", "mnn_dense", "mnn_cg")
    data_store = "kdv.zarr"
    data_rules = ("generate_kdv", "import_kdv")
    rule_file = Path("workflow", "rules", "kdv.smk")
    resources = {
        "train": {"mem_mb": 16000, "runtime": 720},
        "evaluate": {"mem_mb": 8000, "runtime": 60},
    }
    commands = (
        Command(
            "generate-kdv",
            _DATA,
            "generate the KdV data set (LPSDA 'easy' distribution) into the Zarr store",
        ),
        Command("import-kdv", _DATA, "import LPSDA's KdV HDF5 files into the Zarr store"),
    )

    @property
    def schema(self) -> dict[str, Any]:
        return load_schema(__file__)

    def settings(self, config):
        from smnn.experiments.kdv.settings import KdvSettings

        return KdvSettings.from_config(config)

    def describe(self, settings) -> str:
        s = settings
        windows = "every window" if s.windows_per_epoch is None else f"{s.windows_per_epoch}"
        return (
            f"KdV forecasting: an order-4 linear ODE per grid point over {s.window} steps, "
            f"ResNet1D {s.base_filters} filters x {s.n_blocks} blocks (kernel {s.kernel_size}, "
            f"doubling every {s.double_every}), initial-value and step nets {s.init_hidden} wide; "
            f"{s.epochs} epochs of {windows} train windows, batch {s.batch_size}, lr {s.lr} "
            f"(plateau {s.plateau_factor} / {s.plateau_patience} on the validation loss), "
            f"{s.dtype} (solve {s.solve_dtype or s.dtype}, method {s.solve_method}); evaluation "
            "rolls out "
            f"{'all' if s.n_trajectories is None else s.n_trajectories} test trajectories"
        )

    def build_task(self, settings, solver, data_path, device, threads=None):
        from smnn.experiments.kdv.tasks import build_task

        return build_task(settings, solver, data_path, device, threads)

    def model_payload(self, task) -> dict[str, Any]:
        from smnn.experiments.kdv.tasks import model_payload

        return model_payload(task)

    def evaluate(
        self, settings, solver, data_path, model_path, out_dir, device, baseline_models=None
    ):
        from smnn.experiments.kdv.evaluation import evaluate

        return evaluate(settings, solver, data_path, model_path, out_dir, device)

    def summary_lines(self, document: Mapping[str, Any]) -> list[str]:
        """The rollout NMSE of the model beside persistence."""
        models = document.get("models", {})
        if "model" not in models:
            return []
        parts = [f"{name} {row['nmse']:.4g}" for name, row in models.items()]
        return [f"rollout NMSE ({document.get('source', '?')} data): " + ", ".join(parts)]


EXPERIMENT = KdvExperiment()
