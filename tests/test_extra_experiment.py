"""Adding an experiment is its module, its data rules and its config section.

The test writes a minimal experiment outside the package (a decay rate learnt through the MNN
layer), registers it with ``SMNN_EXPERIMENTS`` and runs it through the generic ``train`` and
``evaluate`` rules with the real ``snakemake`` and a real MLflow store; nothing in the package or
the workflow is edited for it.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from pipeline_support import failure_report, make_workdir, run_snakemake, tiny_config

pytestmark = pytest.mark.slow

MODULE = '''
"""A toy experiment: learn k in y' = -k y from one decaying series, through the MNN layer."""
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from smnn.experiments.base import Evaluation, Experiment
from smnn.experiments.mnn_layer import MnnLayer
from smnn.io import atomic_write_json
from smnn.data.store import open_dataset, write_dataset_atomic

T = 20


class Task:
    def __init__(self, series, solver, lr):
        self.model = torch.nn.Module()
        self.model.log_k = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.series, self.layer, self.lr = series, MnnLayer(solver), lr
        self.n_epochs, self.n_samples, self.batch_size = 40, 1, 1

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr), None

    def on_epoch_start(self, epoch):
        pass

    def predict(self):
        c = torch.stack([self.model.log_k.exp(), torch.ones((), dtype=torch.float64),
                         torch.zeros((), dtype=torch.float64)]).view(1, 1, 1, 3)
        u = self.layer(torch.zeros(1, 1, dtype=torch.float64), self.series[:1].view(1, 1, 1),
                       c, torch.full((1,), 0.1, dtype=torch.float64), n_steps=T)
        return u[:, 0, 0]

    def training_step(self, indices):
        loss = torch.mean((self.predict() - self.series) ** 2)
        return loss, {}

    def epoch_metrics(self):
        return {"k": float(self.model.log_k.exp())}


@dataclass(frozen=True)
class ToySettings:
    k: float
    lr: float


class Toy(Experiment):
    name = title = mlflow_experiment = "toy"
    solvers = ("smnn", "mnn_dense")
    data_store = "toy.zarr"
    data_rules = ("generate_toy",)
    rule_file = Path(__file__).with_name("toy.smk")
    schema = {"type": "object", "additionalProperties": False,
              "required": ["enabled", "solvers", "k", "lr"],
              "properties": {"enabled": {"type": "boolean"},
                             "solvers": {"type": "array", "items": {"$ref": "#/$defs/solver"}},
                             "k": {"type": "number"}, "lr": {"type": "number"}}}
    resources = {"train": {"mem_mb": 1000, "runtime": 10},
                 "evaluate": {"mem_mb": 1000, "runtime": 10}}

    def settings(self, config):
        return ToySettings(config.get_float("toy.k"), config.get_float("toy.lr", positive=True))

    def describe(self, settings):
        return "toy decay"

    def build_task(self, settings, solver, data_path, device, threads=None):
        y = torch.from_numpy(open_dataset(data_path, ("y",))["y"].values)
        return Task(y, solver, settings.lr)

    def model_payload(self, task):
        return {"state_dict": task.model.state_dict(), "k": float(task.model.log_k.exp())}

    def evaluate(self, settings, solver, data_path, model_path, out_dir, device,
                 baseline_models=None):
        k = float(torch.load(model_path, weights_only=False)["k"])
        metrics = {"k": k, "k_error": abs(k - settings.k)}
        atomic_write_json({"metrics": metrics}, Path(out_dir) / "metrics.json")
        (Path(out_dir) / "plots").mkdir(parents=True, exist_ok=True)
        return Evaluation(metrics, {"metrics": metrics}, [])

    def summary_lines(self, document):
        return [f"toy decay rate {document['metrics']['k']:.3f}"]


EXPERIMENT = Toy()

if __name__ == "__main__":  # the data stage: python toy_experiment.py OUT K
    t = 0.1 * np.arange(T)
    ds = xr.Dataset({"y": ("time", np.exp(-float(sys.argv[2]) * t))}, coords={"time": t})
    write_dataset_atomic(ds, sys.argv[1])
'''

RULES = """
rule generate_toy:
    output:
        directory(data_path("toy.zarr")),
    params:
        k=config["toy"]["k"],
    shell:
        "python {workflow.basedir}/../toy/toy_experiment.py {output} {params.k}"
"""


def test_a_new_experiment_runs_through_the_generic_rules(tmp_path):
    plugin = tmp_path / "toy"
    plugin.mkdir()
    (plugin / "toy_experiment.py").write_text(textwrap.dedent(MODULE))
    # the rule file refers to the plugin relative to the Snakefile's directory
    (plugin / "toy.smk").write_text(RULES.replace("{workflow.basedir}/../toy", str(plugin)))
    work = make_workdir(tmp_path / "work")
    config = tiny_config()
    for section in ("standalone", "benchmark", "lorenz"):
        config[section]["enabled"] = False
    config["toy"] = {"enabled": True, "solvers": ["smnn", "mnn_dense"], "k": 0.7, "lr": 0.05}
    cfg = tmp_path / "toy.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(config))
    env = {"SMNN_EXPERIMENTS": "toy_experiment", "PYTHONPATH": str(plugin)}
    run = run_snakemake(work, ["--cores", "2", "--configfile", str(cfg)], env=env, timeout=900)
    assert run.proc.returncode == 0, failure_report(work, run)
    # the closing summary prints the experiment's headline (its summary_lines)
    assert run.output.count("toy decay rate 0.") == 2, run.output[-3000:]

    for solver in ("smnn", "mnn_dense"):
        doc = json.loads((work / "results" / "toy" / solver / "eval" / "metrics.json").read_text())
        # 40 Adam steps from k = 1 towards 0.7: the fit moved the right way through the solver
        assert doc["metrics"]["k_error"] < 0.2, doc
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'results' / 'mlflow.db'}")
    names = {e.name: e.experiment_id for e in client.search_experiments()}
    assert "toy" in names and "lorenz" in names  # one MLflow experiment per registered one
    runs = client.search_runs([names["toy"]])
    rules = sorted((r.data.tags["smnn.rule"], r.data.tags["solver"]) for r in runs)
    assert rules == [
        ("evaluate", "mnn_dense"),
        ("evaluate", "smnn"),
        ("train", "mnn_dense"),
        ("train", "smnn"),
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
