"""smnn.jobs: the preamble every job command shares (real files, real torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from smnn.config import ConfigError
from smnn.data.kdv.lpsda import KdvFileError
from smnn.data.sst.download import DownloadError
from smnn.data.sst.layout import SstFileError
from smnn.errors import UserError
from smnn.experiments.lorenz.settings import LorenzSettings
from smnn.jobs import apply_threads, clean_errors, job_config, job_settings, run_context

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def _write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_job_config_loads_a_complete_config(tmp_path):
    config = job_config(_write(tmp_path))
    assert config.get_int("seed") == 0
    assert config.get_str("device") == "cpu"


@pytest.mark.parametrize(
    "changes, key",
    [({"seed": -1}, "seed"), ({"threads": 0}, "threads"), ({"device": "tpu"}, "device")],
)
def test_job_config_names_a_bad_global_key(tmp_path, changes, key):
    message = rf"config.yaml \(see config/README.md\):\n  config key '{key}'"
    with pytest.raises(ConfigError, match=message):
        job_config(_write(tmp_path, **changes))


def test_job_config_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        job_config(tmp_path / "nowhere.yaml")


def test_apply_threads_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert apply_threads(job_config(_write(tmp_path, threads=1))) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_job_settings_builds_every_experiments_settings_once(tmp_path):
    config, settings = job_settings(_write(tmp_path))
    assert set(settings) == {"lorenz", "sst", "kdv"}
    assert isinstance(settings["lorenz"], LorenzSettings)
    assert settings["lorenz"].data.n_points == config.get_int("lorenz.data.n_points")


def test_threads_option_replaces_the_configs_threads(tmp_path):
    path = _write(tmp_path, threads=3)
    assert job_config(path).get_int("threads") == 3
    assert job_config(path, threads=1).get_int("threads") == 1
    before = torch.get_num_threads()
    try:
        context = run_context(job_config(path, threads=2))
        assert (context.threads, torch.get_num_threads()) == (2, 2)
        assert context.device == torch.device("cpu") and context.seed == 0
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        job_config(path, threads=0)


def test_cross_key_problems_are_reported_with_the_schemas(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["lorenz"]["data"]["window"] = data["lorenz"]["data"]["n_points"] + 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"config key 'lorenz.data.window': \d+ is larger"):
        job_config(path)


def test_experiment_errors_are_user_errors():
    for error in (ConfigError, DownloadError, SstFileError, KdvFileError):
        assert issubclass(error, UserError), error


def test_clean_errors_turns_input_errors_into_exit_code_2(capsys):
    @clean_errors
    def job(exc):
        if exc is not None:
            raise exc
        return 0

    assert job(None) == 0
    assert job(ConfigError("run.yaml: seed is missing")) == 2
    assert "error: run.yaml: seed is missing" in capsys.readouterr().err
    assert job(SstFileError("sst.nc: no time axis")) == 2
    assert "error: sst.nc: no time axis" in capsys.readouterr().err
    assert job(FileNotFoundError("model.pt does not exist")) == 2
    assert "error: model.pt does not exist" in capsys.readouterr().err
    # a bug is not an input error: it keeps its traceback
    with pytest.raises(ZeroDivisionError):
        job(ZeroDivisionError("bug"))
