"""A bad configuration stops `snakemake` before any job runs, with a message naming the key.

Each case starts a real (not dry) run in a scratch directory and checks that it failed at once,
named the offending key, and created neither results/ nor data/ (no job, no MLflow store, no
effective config).
"""

from __future__ import annotations

import copy

import pytest
from pipeline_support import (
    TINY_CONFIG,
    make_workdir,
    run_snakemake,
    tiny_config,
    write_config,
)


def _without(data: dict, dotted: str) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    return data


def _with(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


def _run_with_config(tmp_path, data: dict, extra: list[str] = ()):
    work = make_workdir(tmp_path / "work")
    cfg = write_config(tmp_path / "bad.yaml", data)
    run = run_snakemake(work, ["--cores", "1", "--configfile", str(cfg), *extra], timeout=300)
    return work, run


def _assert_stopped(work, run, *needles: str):
    assert run.proc.returncode != 0, run.output
    assert "Invalid configuration" in run.output, run.output
    for needle in needles:
        assert needle in run.output, f"{needle!r} not in:\n{run.output}"
    for name in ("results", "data"):
        assert not (work / name).exists(), f"{name}/ was created before the config was checked"
    assert "Finished jobid" not in run.output


def test_unknown_key_is_named(tmp_path):
    data = _with(tiny_config(), "lorenz.model.hiden", 32)
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.model.hiden' is not allowed")


def test_unknown_top_level_section_is_named(tmp_path):
    data = _with(tiny_config(), "lorentz", {"enabled": True})
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorentz' is not allowed")


def test_wrong_type_is_named(tmp_path):
    data = _with(tiny_config(), "lorenz.train.lr", "fast")
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.train.lr'", "'fast' is not of type 'number'")


def test_out_of_range_and_enum_are_named(tmp_path):
    data = _with(tiny_config(), "lorenz.train.cycles", 0)
    data = _with(data, "lorenz.solvers", ["smnn", "euler"])
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.train.cycles'", "'lorenz.solvers[1]'", "euler")


def test_missing_required_value_is_named(tmp_path):
    # a complete config file without the key; config/config.yaml is not loaded underneath
    # (the Snakefile's default would fill it in), so run with the tiny config as the only file
    data = _without(tiny_config(), "lorenz.train.epochs_per_cycle")
    work = make_workdir(tmp_path / "work")
    (work / "config").unlink()
    (work / "config").mkdir()
    write_config(work / "config" / "config.yaml", data)
    run = run_snakemake(work, ["--cores", "1"], timeout=300)
    _assert_stopped(work, run, "'lorenz.train.epochs_per_cycle' is missing")


def test_quoted_number_in_a_config_file_is_a_wrong_type(tmp_path):
    """Only command-line overrides are re-typed; a string in a file is an error."""
    data = _with(tiny_config(), "lorenz.model.hidden", "64")
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.model.hidden'", "'64' is not of type 'integer'")


def test_null_for_required_value_is_named(tmp_path):
    data = _with(tiny_config(), "lorenz.model.hidden", None)
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.model.hidden'", "None is not of type 'integer'")


def test_window_longer_than_trajectory_is_named(tmp_path):
    data = _with(tiny_config(), "lorenz.data.window", 5000)
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.data.window'", "n_points")


def test_bad_command_line_override_is_named(tmp_path):
    work, run = _run_with_config(tmp_path, tiny_config(), ["--config", "device=gpu", "seed=-3"])
    _assert_stopped(work, run, "'device'", "'gpu' is not one of", "'seed'")


@pytest.mark.parametrize(
    "override",
    [
        "lorenz={train: {cycles: 5, max_windows: null}, solvers: [smnn, mnn_cg]}",
        "benchmark={quick: false}",
    ],
)
def test_nested_command_line_overrides_are_typed(tmp_path, override):
    """Snakemake passes nested --config values as strings; the workflow re-types them."""
    work = make_workdir(tmp_path / "work")
    run = run_snakemake(
        work, ["-n", "--configfile", str(TINY_CONFIG), "--config", override], timeout=300
    )
    assert run.proc.returncode == 0, run.output
    if "mnn_cg" in override:
        assert "results/lorenz/mnn_cg/model.pt" in run.output
    assert not (work / "results").exists()
