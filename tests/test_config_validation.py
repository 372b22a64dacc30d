"""A bad configuration stops the run before any job, with a message naming the key.

The package validates (smnn.config_validation); most cases call it directly. A real (not dry)
`snakemake` run checks that the workflow stops at once through the same check, naming the key and
creating neither results/ nor data/ (no job, no MLflow store, no effective config), and that
nested command-line overrides are re-typed.
"""

from __future__ import annotations

import copy

import pytest
from pipeline_support import (
    REPO,
    TINY_CONFIG,
    make_workdir,
    run_snakemake,
    tiny_config,
    write_yaml,
)

from smnn.config import ConfigError
from smnn.config_validation import validate_config


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
    cfg = write_yaml(tmp_path / "bad.yaml", data)
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


def _problems(data: dict) -> str:
    """The message validate_config raises for ``data`` (fails the test when it accepts it)."""
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    text = str(info.value)
    assert text.startswith("Invalid configuration (see config/README.md):"), text
    return text


def test_bad_config_stops_snakemake_before_any_job(tmp_path):
    """The workflow validates through the package, once, before anything is written."""
    data = _with(tiny_config(), "lorenz.model.hiden", 32)
    work, run = _run_with_config(tmp_path, data)
    _assert_stopped(work, run, "'lorenz.model.hiden' is not allowed")


def test_unknown_keys_are_named():
    assert "'lorenz.model.hiden' is not allowed (allowed here: hidden, latent, threshold)" in (
        _problems(_with(tiny_config(), "lorenz.model.hiden", 32))
    )
    assert "'lorentz' is not allowed" in _problems(_with(tiny_config(), "lorentz", {}))


def test_wrong_types_ranges_and_enums_are_named():
    text = _problems(_with(tiny_config(), "lorenz.train.lr", "fast"))
    assert "'lorenz.train.lr': 'fast' is not of type 'number'" in text
    data = _with(tiny_config(), "lorenz.train.cycles", 0)
    data = _with(data, "lorenz.solvers", ["smnn", "euler"])
    text = _problems(data)
    assert "'lorenz.train.cycles'" in text and "'lorenz.solvers[1]'" in text and "euler" in text
    assert "'lorenz.model.hidden': '64' is not of type 'integer'" in _problems(
        _with(tiny_config(), "lorenz.model.hidden", "64")
    )
    assert "'lorenz.model.hidden': None is not of type 'integer'" in _problems(
        _with(tiny_config(), "lorenz.model.hidden", None)
    )


def test_solve_dtype_and_method_keys_are_checked():
    """The optional solve keys of kdv.model and sst.model (issue 15): the allowed values pass,
    others are named with the key."""
    for section in ("kdv", "sst"):
        data = _with(tiny_config(), f"{section}.model.solve_dtype", "float32")
        validate_config(_with(data, f"{section}.model.solve_method", "qr"))
        validate_config(_with(tiny_config(), f"{section}.model.solve_dtype", None))
        text = _problems(_with(tiny_config(), f"{section}.model.solve_dtype", "float16"))
        assert f"'{section}.model.solve_dtype': 'float16' is not one of" in text, text
        text = _problems(_with(tiny_config(), f"{section}.model.solve_method", "lu"))
        assert f"'{section}.model.solve_method': 'lu' is not one of" in text, text


def test_missing_required_value_is_named():
    text = _problems(_without(tiny_config(), "lorenz.train.epochs_per_cycle"))
    assert "'lorenz.train.epochs_per_cycle' is missing" in text
    assert "'lorenz' is missing" in _problems(_without(tiny_config(), "lorenz"))


def test_window_longer_than_trajectory_is_named():
    text = _problems(_with(tiny_config(), "lorenz.data.window", 5000))
    assert "'lorenz.data.window'" in text and "n_points" in text


def test_schema_and_code_agree_on_lorenz_minimums():
    """The schema accepts exactly what smnn.data.lorenz accepts (window, n_points >= 2)."""
    from smnn.config import Config
    from smnn.data.lorenz import LorenzParams

    data = _with(_with(tiny_config(), "lorenz.data.window", 2), "lorenz.data.n_points", 2)
    validate_config(data)
    LorenzParams.from_config(Config(data))
    _problems(_with(tiny_config(), "lorenz.data.window", 1))


def test_schema_solver_names_are_the_registry():
    from smnn.config_validation import config_schema
    from smnn.solver.registry import solver_names

    schema = config_schema()
    assert schema["$defs"]["solver"]["enum"] == list(solver_names())
    # one section per registered experiment, each with the generic keys
    from smnn.experiments.base import experiments

    for name, exp in experiments().items():
        section = schema["properties"][name]
        assert name in schema["required"]
        assert {"enabled", "solvers"} <= set(section["required"])
        assert set(exp.solvers) <= set(solver_names())


def test_shipped_configs_are_valid():
    import yaml

    for path in (REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml", TINY_CONFIG):
        validate_config(yaml.safe_load(path.read_text()), source=f"configuration {path}")


def test_hand_run_command_gives_the_same_message(tmp_path):
    """`smnn` commands validate their --config file with the same messages."""
    from pipeline_support import run_smnn

    cfg = write_yaml(tmp_path / "bad.yaml", _with(tiny_config(), "lorenz.model.hiden", 1))
    proc = run_smnn("generate-lorenz", "--config", cfg, "--out", tmp_path / "x.zarr")
    assert proc.returncode == 2, proc.stderr
    assert "'lorenz.model.hiden' is not allowed" in proc.stderr
    assert not (tmp_path / "x.zarr").exists()


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
