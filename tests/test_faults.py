"""Faults of issue 18's table, each reproduced: the T message of a size-1 step axis, argparse
errors that name what is expected instead of a Python function, a damaged model.pt, and
`smnn evaluate` with missing inputs (one error line, no FAILED MLflow run), a KdV source changed
without its files (the pipeline stops, no metrics.json claims the old source)."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from pipeline_support import run_smnn, train_args, write_config

from smnn.config import load_config
from smnn.experiments.model_files import read_model_file
from smnn.io import StoreError
from smnn.solver.inputs import prepare_problem
from smnn.tracking import resolve_tracking


def test_size_one_step_axis_without_n_steps_says_where_t_came_from():
    T = 100
    c = torch.randn(1, T, 1, 1, 3, dtype=torch.float64)
    b = torch.randn(1, T, 1, dtype=torch.float64)
    u0 = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    h = torch.full((1, 1), 0.01, dtype=torch.float64)  # one step size for all steps
    with pytest.raises(ValueError) as info:
        prepare_problem(c, b, u0, h)
    message = str(info.value)
    assert "coefficients has 100 time steps" in message
    assert "inferred from steps' size-1 step axis" in message and "pass n_steps=T" in message
    assert "but T=2;" not in message  # the old message named a T the user never gave
    problem = prepare_problem(c, b, u0, h, n_steps=T)  # the remedy works
    assert problem.n_steps == T


def test_argparse_errors_name_what_is_expected_not_a_function():
    proc = run_smnn("tracking-server", "--config", "x.yaml", "--port", "abc")
    assert proc.returncode == 2
    assert "expected a port number (0-65535), got 'abc'" in proc.stderr
    assert "_port" not in proc.stderr
    proc = run_smnn(
        "train", "--experiment", "lorenz", "--solver", "smnn", "--config", "x.yaml",
        "--data", "d", "--out", "o", "--max-epochs", "x",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "expected a whole number >= 1, got 'x'" in proc.stderr
    assert "_positive_int" not in proc.stderr
    proc = run_smnn("generate-lorenz", "--config", "x.yaml", "--out", "o", "--threads", "two")
    assert proc.returncode == 2 and "expected a whole number >= 1, got 'two'" in proc.stderr


def _flip_a_byte_of_the_largest_member(path: Path) -> str:
    """Flip one byte inside the stored bytes of the largest member of a torch zip archive (the
    archive stays a readable zip; only the member's CRC-32 no longer matches). Returns its name."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


def test_read_model_file_refuses_flipped_bytes(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}, "model_args": {}}, path)
    assert read_model_file(path, "toy")["state_dict"]["w"][999] == 999.0
    member = _flip_a_byte_of_the_largest_member(path)
    with pytest.raises(StoreError) as info:
        read_model_file(path, "toy")
    message = str(info.value)
    assert str(path) in message and member in message and "CRC-32" in message
    assert f"snakemake --forcerun {path}" in message  # the remedy names the file to rebuild
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StoreError, match="not a complete torch archive"):
        read_model_file(truncated, "toy")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Lorenz data store and a model trained for one epoch (about 30 s), with MLflow."""
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root, {})
    data = root / "data" / "lorenz.zarr"
    assert run_smnn("generate-lorenz", "--config", config, "--out", data).returncode == 0
    assert run_smnn("tracking-init", "--config", config).returncode == 0
    out = root / "results" / "lorenz" / "smnn"
    proc = run_smnn(*train_args(config, data, out, "smnn", "--max-epochs", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, config, data, out / "model.pt"


def _evaluate_runs(config: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking(load_config(config)).tracking_uri)
    experiment = client.get_experiment_by_name("lorenz")
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.info.run_name and "evaluate" in r.info.run_name]


def _evaluate(config, data, model, out):
    return run_smnn(
        "evaluate", "--experiment", "lorenz", "--solver", "smnn", "--config", config,
        "--data", data, "--model", model, "--out", out,
    )  # fmt: skip


@pytest.mark.slow
def test_evaluate_with_missing_data_store_creates_no_failed_run(trained):
    root, config, data, model = trained
    before = len(_evaluate_runs(config))
    missing = root / "data" / "missing.zarr"
    proc = _evaluate(config, missing, model, root / "eval_missing")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-3000:]
    assert f"snakemake {missing}" in errors[0]
    assert "Traceback" not in proc.stderr
    assert len(_evaluate_runs(config)) == before  # no MLflow run (FAILED or other) was created


@pytest.mark.slow
def test_evaluate_with_flipped_bytes_in_model_pt_says_so_without_a_run(trained):
    root, config, data, model = trained
    damaged = root / "damaged" / "model.pt"
    damaged.parent.mkdir()
    damaged.write_bytes(model.read_bytes())
    _flip_a_byte_of_the_largest_member(damaged)
    before = len(_evaluate_runs(config))
    proc = _evaluate(config, data, damaged, root / "eval_damaged")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(damaged) in errors[0] and "CRC-32" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(_evaluate_runs(config)) == before
    ok = _evaluate(config, data, model, root / "eval_ok")  # the intact copy still evaluates
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(_evaluate_runs(config)) == before + 1


@pytest.mark.slow
def test_train_ends_abandoned_run_names_batch_key_and_summarises_cg(trained, tmp_path):
    """Three rows at once (one training job): checkpoints of another configuration whose MLflow
    run is still RUNNING (it ends KILLED), `lorenz.train.batch_size` larger than the data (a note
    naming the key), and mnn_cg's convergence warnings (one summary line, cg_* metrics)."""
    from mlflow import MlflowClient

    root, _, data, _ = trained
    config = write_config(tmp_path, {"lorenz": {"train": {"batch_size": 1000000000}}})
    assert run_smnn("tracking-init", "--config", config).returncode == 0
    client = MlflowClient(resolve_tracking(load_config(config)).tracking_uri)
    found = client.get_experiment_by_name("lorenz")
    experiment_id = found.experiment_id if found else client.create_experiment("lorenz")
    stale = client.create_run(experiment_id, run_name="stale").info.run_id
    out = tmp_path / "results" / "lorenz" / "mnn_cg"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "run.json").write_text(
        json.dumps({"identity": {"experiment": "another"}, "run_id": stale, "status": "running"})
    )
    proc = run_smnn(*train_args(config, data, out, "mnn_cg", "--max-epochs", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MLflow run {stale} of the discarded checkpoints ended KILLED" in proc.stderr
    run = client.get_run(stale)
    assert (
        run.info.status == "KILLED" and "another configuration" in run.data.tags["smnn.abandoned"]
    )
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert any("lorenz.train.batch_size" in line for line in notes), proc.stderr[-3000:]
    cg_lines = [line for line in proc.stderr.splitlines() if line.startswith("mnn_cg")]
    assert len(cg_lines) == 1, proc.stderr[-3000:]  # one line, not one warning per solve
    assert "MNNConvergenceWarning" not in proc.stderr
    final = json.loads((out / "train_metrics.json").read_text())["final_metrics"]
    assert final["cg_converged"] in (0.0, 1.0)
    assert (final["cg_converged"] == 1.0) == ("every CG solve converged" in cg_lines[0])
    assert (final["cg_unconverged_solves"] == 0) == (final["cg_converged"] == 1.0)
    evaluated = run_smnn(
        "evaluate", "--experiment", "lorenz", "--solver", "mnn_cg", "--config", config,
        "--data", data, "--model", out / "model.pt", "--out", tmp_path / "eval",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert len([x for x in evaluated.stderr.splitlines() if x.startswith("mnn_cg")]) == 1
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cg_converged"] in (0.0, 1.0) and "cg_unconverged_solves" in metrics


@pytest.mark.slow
def test_lorenz_training_too_large_for_memory_stops_before_allocating(trained, tmp_path):
    """`lorenz.model.hidden: 1000000` (64 TB of model and Adam state) stops at once with one
    line naming the keys and the override, instead of allocating until the OOM killer."""
    _, _, data, _ = trained
    config = write_config(tmp_path, {"lorenz": {"model": {"hidden": 1000000}}})
    proc = run_smnn(*train_args(config, data, tmp_path / "out", "smnn", "--max-epochs", "1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lorenz.model.hidden" in errors[0], proc.stderr[-3000:]
    assert "lorenz.train.memory_budget_gb" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
def test_tracking_init_failure_under_snakemake_reaches_the_console(tmp_path):
    """The workflow's onstart runs `smnn tracking-init`; when the tracking store cannot be
    opened, its one-line error is on Snakemake's console (not only in the log file)."""
    from pipeline_support import make_workdir, run_snakemake

    workdir = make_workdir(tmp_path / "work")
    absent = "/proc/smnn-absent"  # a directory that cannot be created (Linux, even as root)
    config = write_config(workdir, {"mlflow": {"tracking_uri": f"sqlite:///{absent}/mlflow.db"}})
    run = run_snakemake(
        workdir, ["--cores", "1", "--configfile", str(config)],
        timeout=300,
    )  # fmt: skip
    assert run.proc.returncode != 0
    errors = [line for line in run.proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and absent in errors[0], run.output[-3000:]
    assert "Finished job" not in run.output  # onstart failed before any job ran


@pytest.mark.slow
def test_kdv_source_changed_to_lpsda_without_its_files_stops_and_claims_nothing(tmp_path):
    """`--config 'kdv={source: lpsda}'` without LPSDA's files, after a pipeline that generated
    the KdV store, trained and evaluated on it: the rerun (it used to exit 0, retrain on the
    old store and write a metrics.json saying "source": "generate") stops before any job with a
    non-zero exit, naming the missing LPSDA files and the remedy (the workflow checks them when
    it reads the config, as for sst.source: file); metrics.json is not rewritten. Training and
    evaluation run by hand on the generated store under kdv.source: lpsda refuse it (the store
    records its source), so no metrics.json can claim the old source for an lpsda
    configuration."""
    from pipeline_support import (
        failure_report,
        make_workdir,
        merge,
        run_snakemake,
        tiny_config,
        write_yaml,
    )

    work = make_workdir(tmp_path / "work")
    off = {"enabled": False}
    config = write_yaml(
        work / "kdv_only.yaml",
        merge(tiny_config(), {"standalone": off, "benchmark": off, "lorenz": off, "sst": off}),
    )
    first = run_snakemake(work, ["--cores", "2", "--configfile", str(config)], timeout=1500)
    assert first.proc.returncode == 0, failure_report(work, first)
    metrics = work / "results" / "kdv" / "smnn" / "eval" / "metrics.json"
    assert json.loads(metrics.read_text())["source"] == "generate"
    before = metrics.read_bytes(), metrics.stat().st_mtime_ns
    model = tmp_path / "model_generate.pt"  # (Snakemake removes a failed job's outputs)
    model.write_bytes((work / "results" / "kdv" / "smnn" / "model.pt").read_bytes())

    lpsda = ["--cores", "2", "--configfile", str(config), "--config", "kdv={source: lpsda}"]
    run = run_snakemake(work, lpsda, timeout=600)
    assert run.proc.returncode != 0, run.output[-3000:]
    assert "kdv.source is 'lpsda' but LPSDA's file(s)" in run.output, run.output[-3000:]
    assert "KdV_train_512_easy.h5" in run.output and "do not exist" in run.output
    assert "set kdv.source to generate" in run.output  # the remedy
    assert "Finished job" not in run.output  # nothing ran on the old store
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before  # not rewritten

    # every consumer checks the store's source against the config: training and evaluation
    # run by hand (outside Snakemake) on the generated store under kdv.source: lpsda stop
    changed = write_yaml(work / "lpsda.yaml", merge(tiny_config(), {"kdv": {"source": "lpsda"}}))
    store = work / "data" / "kdv.zarr"
    for args in (
        ["train", "--experiment", "kdv", "--solver", "smnn", "--config", changed,
         "--data", store, "--out", tmp_path / "train_lpsda"],
        ["evaluate", "--experiment", "kdv", "--solver", "smnn", "--config", changed,
         "--data", store, "--model", model, "--out", tmp_path / "eval_lpsda"],
    ):  # fmt: skip
        proc = run_smnn(*args, env=None)
        assert proc.returncode != 0, (args[0], proc.stdout[-2000:], proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors and "source 'generate'" in errors[0], (args[0], proc.stderr[-3000:])
        assert "kdv.source is 'lpsda'" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "eval_lpsda" / "metrics.json").exists()
    assert not (tmp_path / "train_lpsda" / "model.pt").exists()


def test_deleted_mask_chunk_of_the_sst_store_names_store_variable_and_rule(tmp_path):
    """A chunk file of `mask` deleted from data/sst.zarr used to read as fill values and end
    in a raw "no cell has a partner"; opening the store now names the store, the variable,
    the missing chunk and the rule that rewrites it."""
    from smnn.data.sst.preprocess import (
        SstPreprocessSettings,
        SstProvenance,
        open_sst_store,
        preprocess_sst,
    )
    from smnn.data.sst.synthetic import write_synthetic_mask, write_synthetic_sst

    mask = write_synthetic_mask(tmp_path / "lsmask.nc", n_lat=18, n_lon=36)
    sst = write_synthetic_sst(tmp_path / "sst.nc", n_weeks=40, n_lat=18, n_lon=36, seed=1)
    settings = SstPreprocessSettings(land="all", test_weeks=10, chunk_lat=5, chunk_lon=8)
    store = tmp_path / "sst.zarr"
    preprocess_sst(sst, mask, store, settings, SstProvenance("synthetic"))
    open_sst_store(store, settings)  # intact: opens
    chunk = next(p for p in sorted((store / "mask" / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    with pytest.raises(StoreError) as info:
        open_sst_store(store, settings)
    message = str(info.value)
    assert info.value.variable == "mask" and str(store) in message, message
    assert "missing" in message and "preprocess_sst" in message, message


def test_deleted_time_chunk_of_the_lorenz_store_is_not_read_as_nan(tmp_path):
    """Lorenz `time` with a chunk file deleted used to load silently as NaN."""
    from smnn.data.lorenz import LorenzParams, load_lorenz, write_lorenz_store

    store = write_lorenz_store(LorenzParams(n_points=200), 0, tmp_path / "lorenz.zarr")
    chunk = next(p for p in sorted((store / "time" / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    with pytest.raises(StoreError) as info:
        load_lorenz(store)
    assert info.value.variable == "time" and "missing" in str(info.value)
    assert "snakemake --forcerun generate_lorenz" in str(info.value)


def test_sst_scaling_with_a_huge_batch_marks_every_case_out_of_memory(tmp_path):
    """`sst.scaling.batch_size: 100000000` used to run S-MNN until the kernel's OOM killer
    ended the process (21.6 GB, no message, no output): the memory budget predicted MNN dense
    only. Now every solver's case is predicted, marked out_of_memory and never built; the job
    ends normally with its outputs."""
    import pandas as pd
    from pipeline_support import CLI_CONFIG, merge, write_yaml

    from smnn.cli import main

    cfg = merge(CLI_CONFIG, {"sst": {"scaling": {
        "lengths": [16, 32], "batch_size": 100000000, "solvers": ["smnn", "mnn_dense", "mnn_cg"],
        "repeats": 1, "memory_budget_gb": None,
    }}})  # fmt: skip
    cfg["paths"] = {"data": str(tmp_path / "data"), "results": str(tmp_path / "results")}
    config = write_yaml(tmp_path / "config.yaml", cfg)
    out = tmp_path / "scaling"
    threads = torch.get_num_threads()
    try:
        code = main(["sst-scaling", "--config", str(config), "--out", str(out), "--no-mlflow"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    csv = pd.read_csv(out / "scaling.csv")
    assert len(csv) == 6 and set(csv["status"]) == {"out_of_memory"}, csv[["solver", "note"]]
    assert (csv["predicted_mb"] > csv["memory_budget_mb"]).all()
    assert csv["note"].str.contains("not run").all()
    assert csv["converged"].isna().all()  # nothing ran, nothing converged or failed to
    assert "out_of_memory" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").stat().st_size > 0  # the figure of a study with nothing run
