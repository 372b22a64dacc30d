"""The whole pipeline on a tiny config through the real `snakemake` command (local executor).

Runs once per module in a scratch directory that links the repo's Snakefile, workflow/ and config/
(the repo's data/ and results/ stay untouched); then checks outputs, metrics, the MLflow store, the
rerun behaviour, the lint and the HTML report.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import yaml
from pipeline_support import (
    REPO,
    TINY_CONFIG,
    check_pipeline_outputs,
    failure_report,
    make_workdir,
    run_snakemake,
    tiny_config,
)

pytestmark = pytest.mark.slow

TINY = ["--configfile", str(TINY_CONFIG)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline, run once: (working directory, config)."""
    work = make_workdir(tmp_path_factory.mktemp("pipeline"))
    run = run_snakemake(work, ["--cores", "2", *TINY])
    assert run.proc.returncode == 0, failure_report(work, run)
    print(f"\ntiny pipeline (local, 2 cores): {run.seconds:.0f} s")
    return work, tiny_config(), run.output


def test_outputs_and_metrics(pipeline):
    work, config, _ = pipeline
    check_pipeline_outputs(work, config)


def test_closing_summary_gives_every_experiments_headline(pipeline):
    """The summary at the end of the run: the Lorenz equations, the SST forecast MSE beside
    climatology and persistence with a plain verdict, the KdV rollout NMSE beside persistence."""
    work, _, output = pipeline
    summary = output[output.index("smnn: the pipeline finished") :]
    sst = json.loads((work / "results/sst/smnn/eval/metrics.json").read_text())["models"]
    mi, clim = sst["mechanistic_identifier"]["mse_norm"], sst["climatology"]["mse_norm"]
    verdict = "beats" if mi < clim else "loses to"
    assert f"the Mechanistic Identifier {verdict} climatology ({mi:.4g} vs {clim:.4g})" in summary
    assert "persistence" in summary and "forecast MSE (normalised)" in summary
    assert re.search(r"dx/dt = .*x", summary), summary
    kdv = json.loads((work / "results/kdv/smnn/eval/metrics.json").read_text())["models"]
    assert f"model {kdv['model']['nmse']:.4g}, persistence" in summary, summary


def test_mlflow_has_one_run_per_job(pipeline):
    from mlflow import MlflowClient

    work, config, _ = pipeline
    db = work / "results" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = {e.name: e for e in client.search_experiments()}
    assert "lorenz" in experiments, sorted(experiments)
    runs = client.search_runs([experiments["lorenz"].experiment_id], max_results=100)

    expected_params = {
        "lorenz.train.cycles": str(config["lorenz"]["train"]["cycles"]),
        "lorenz.model.hidden": str(config["lorenz"]["model"]["hidden"]),
        "seed": str(config["seed"]),
    }
    for solver in config["lorenz"]["solvers"]:
        for rule in ("train", "evaluate"):
            mine = [r for r in runs if _tag(r, "rule") == rule and _tag(r, "solver") == solver]
            assert len(mine) == 1, (
                f"{len(mine)} MLflow runs for {rule} / {solver}; tags seen: "
                f"{[r.data.tags for r in runs]}"
            )
            run = mine[0]
            assert run.info.status == "FINISHED"
            for key, value in expected_params.items():
                assert run.data.params.get(key) == value, (key, run.data.params.get(key))
            assert run.data.metrics, f"{rule}: no metrics"
            assert all(math.isfinite(v) for v in run.data.metrics.values())
            artifacts = _artifact_paths(client, run.info.run_id)
            assert artifacts, f"{rule}: no artifacts"
        train = [r for r in runs if _tag(r, "rule") == "train"][0]
        history = client.get_metric_history(train.info.run_id, _loss_key(train))
        assert len(history) >= 2, "training logged no loss curve"
    assert len(runs) == 2 * len(config["lorenz"]["solvers"])

    assert "benchmark" in experiments
    bench = client.search_runs([experiments["benchmark"].experiment_id])
    assert len(bench) == 1 and bench[0].data.metrics
    assert _artifact_paths(client, bench[0].info.run_id)


def test_sst_runs_in_mlflow(pipeline):
    """SST: one run per job (train per solver and per baseline, evaluate, the long-sequence
    study), finished, with metrics, and the synthetic data named in the tags."""
    from mlflow import MlflowClient

    work, config, _ = pipeline
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'results' / 'mlflow.db'}")
    experiments = {e.name: e for e in client.search_experiments()}
    assert "sst" in experiments, sorted(experiments)
    runs = client.search_runs([experiments["sst"].experiment_id], max_results=100)
    sst = config["sst"]
    jobs = [("train", "solver", s) for s in sst["solvers"]]
    jobs += [("train", "baseline", b) for b in sst["baselines"]]
    jobs += [("evaluate", "solver", s) for s in sst["solvers"]]
    for rule, key, value in jobs:
        mine = [r for r in runs if _tag(r, "rule") == rule and _tag(r, key) == value]
        assert len(mine) == 1, (rule, value, [r.data.tags for r in runs])
        assert mine[0].info.status == "FINISHED" and mine[0].data.metrics
    evaluation = next(r for r in runs if _tag(r, "rule") == "evaluate")
    assert evaluation.data.tags.get("synthetic") == "true", evaluation.data.tags
    assert math.isfinite(evaluation.data.metrics["mse_norm_mi"])
    scaling = [r for r in runs if _tag(r, "rule") == "sst_scaling"]
    assert len(scaling) == 1 and scaling[0].data.metrics
    assert len(runs) == len(jobs) + 1


def test_kdv_runs_in_mlflow(pipeline):
    """KdV: one finished train and evaluate run per solver, with the step cost and the NMSE."""
    from mlflow import MlflowClient

    work, config, _ = pipeline
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'results' / 'mlflow.db'}")
    experiments = {e.name: e for e in client.search_experiments()}
    assert "kdv" in experiments, sorted(experiments)
    runs = client.search_runs([experiments["kdv"].experiment_id], max_results=100)
    for solver in config["kdv"]["solvers"]:
        train = [r for r in runs if _tag(r, "rule") == "train" and _tag(r, "solver") == solver]
        assert len(train) == 1 and train[0].info.status == "FINISHED"
        for key in ("mean_step_time_ms", "step_peak_memory_mib", "final_valid_loss"):
            assert key in train[0].data.metrics, (key, sorted(train[0].data.metrics))
        ev = [r for r in runs if _tag(r, "rule") == "evaluate" and _tag(r, "solver") == solver]
        assert len(ev) == 1 and math.isfinite(ev[0].data.metrics["nmse_model"])
        assert math.isfinite(ev[0].data.metrics["nmse_persistence"])
    assert len(runs) == 2 * len(config["kdv"]["solvers"])


def _tag(run, name: str) -> str | None:
    tags = run.data.tags
    for key in (name, f"smnn.{name}"):
        if key in tags:
            return tags[key]
    return None


def _loss_key(run) -> str:
    for key in ("train_loss", "step_loss", "loss"):
        if key in run.data.metrics:
            return key
    raise AssertionError(f"no loss curve among the metrics {sorted(run.data.metrics)}")


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_rerun_is_a_no_op_and_config_changes_rerun_only_dependents(pipeline):
    work, config, _ = pipeline
    again = run_snakemake(work, ["-n", *TINY])
    assert again.proc.returncode == 0, again.output
    assert "Nothing to be done" in again.output, again.output

    # a new evaluation setting reruns evaluation only, not data generation or training
    changed = run_snakemake(
        work, ["-n", *TINY, "--config", "lorenz={evaluate: {simulate_points: 400}}"]
    )
    assert changed.proc.returncode == 0, changed.output
    jobs = _planned_jobs(changed.output)
    assert jobs == {"evaluate", "all"}, changed.output

    # a new training setting reruns training and evaluation
    changed = run_snakemake(work, ["-n", *TINY, "--config", "lorenz={train: {lr: 0.002}}"])
    assert changed.proc.returncode == 0, changed.output
    assert _planned_jobs(changed.output) == {"train", "evaluate", "all"}

    # SST: a new land handling reruns preprocessing and everything after it, not the raw files
    changed = run_snakemake(work, ["-n", *TINY, "--config", "sst={preprocess: {land: ocean}}"])
    assert changed.proc.returncode == 0, changed.output
    assert _planned_jobs(changed.output) == {"preprocess_sst", "train", "evaluate", "all"}


def _planned_jobs(output: str) -> set[str]:
    """Rule names in the job table of a dry run."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", table, re.MULTILINE)}


def test_lint_is_clean(tmp_path):
    work = make_workdir(tmp_path / "lint")
    run = run_snakemake(work, ["--lint"])
    assert run.proc.returncode == 0, run.output
    assert "Lints for" not in run.output, run.output


def test_report_contains_plots_with_captions(pipeline):
    work, config, _ = pipeline
    report = work / "results" / "report.html"
    run = run_snakemake(work, ["--report", str(report), *TINY])
    assert run.proc.returncode == 0, failure_report(work, run)
    html = report.read_text(errors="replace")
    assert len(html) > 10_000
    for name in ["solutions.png", "scaling_T.png", "scaling_batch.png"]:
        assert name in html, f"{name} missing from the report"
    solver = config["lorenz"]["solvers"][0]
    for png in (work / f"results/lorenz/{solver}/eval/plots").glob("*.png"):
        assert png.name in html, f"{png.name} missing from the report"
    # captions from workflow/report/*.rst
    assert "Standalone validation" in html
    assert "Evaluation of the <strong>lorenz</strong> experiment" in html
    # named report categories (no hand-kept numbers)
    for category in (
        "Standalone ODEs", "Solver benchmark", "Experiment lorenz", "Experiment sst",
        "Experiment kdv",
    ):  # fmt: skip
        assert category in html
    assert "Solver scaling benchmark" in html
    assert "SST long-sequence study" in html and "scaling.png" in html


def test_paper_config_plans_every_solver(tmp_path):
    work = make_workdir(tmp_path / "paper")
    run = run_snakemake(work, ["-n", "-p", "--configfile", str(REPO / "config" / "paper.yaml")])
    assert run.proc.returncode == 0, run.output
    for solver in ("smnn", "mnn_dense", "mnn_cg"):
        assert f"results/lorenz/{solver}/model.pt" in run.output
        assert f"results/sst/{solver}/model.pt" in run.output
        assert f"results/kdv/{solver}/model.pt" in run.output
    assert "smnn download-sst" in run.output and "results/sst/baseline_adagvae" in run.output
    bench = [line for line in run.output.splitlines() if "smnn bench" in line]
    assert bench and "--quick" not in bench[0], bench  # the full sweep
    assert not (work / "results").exists(), "a dry run wrote results"


def test_sst_source_file_names_a_missing_file(tmp_path):
    """sst.source: file with no file there stops the run at once, saying where to put it."""
    work = make_workdir(tmp_path / "sstfile")
    missing = tmp_path / "nowhere" / "sst.nc"
    run = run_snakemake(
        work, ["-n", *TINY, "--config", f"sst={{source: file, files: {{sst: {missing}}}}}"]
    )
    assert run.proc.returncode != 0
    assert str(missing) in run.output and "sst.source is 'file'" in run.output, run.output
    assert "synthetic" in run.output  # the remedy


def test_kdv_source_lpsda_names_the_missing_files(tmp_path):
    """kdv.source: lpsda without LPSDA's files stops the run at once (no rule writes them),
    naming each missing file and the remedy, like sst.source: file."""
    work = make_workdir(tmp_path / "kdvlpsda")
    where = tmp_path / "nowhere"
    run = run_snakemake(
        work, ["-n", *TINY, "--config", f"kdv={{source: lpsda, lpsda: {{directory: {where}}}}}"]
    )
    assert run.proc.returncode != 0
    assert "kdv.source is 'lpsda'" in run.output, run.output[-3000:]
    assert str(where / "KdV_test_easy.h5") in run.output
    assert "set kdv.source to generate" in run.output  # the remedy


def test_conda_environment_has_the_package_dependencies():
    """environment.yml (for --software-deployment-method conda) lists every dependency of
    pyproject.toml, from conda-forge or in its pip section."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(REPO / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    with open(REPO / "environment.yml") as f:
        env = yaml.safe_load(f)
    listed = set()
    for item in env["dependencies"]:
        specs = item["pip"] if isinstance(item, dict) else [item]
        for spec in specs:
            listed.add(re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower())
    conda_names = {"matplotlib": "matplotlib-base"}  # conda-forge's headless matplotlib
    missing = []
    for dep in deps:
        name = re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower()
        if name not in listed and conda_names.get(name) not in listed:
            missing.append(name)
    assert not missing, f"in pyproject.toml but not in environment.yml: {missing}"
    post_deploy = REPO / "environment.post-deploy.sh"
    assert os.access(post_deploy, os.X_OK) and "pip install" in post_deploy.read_text()
