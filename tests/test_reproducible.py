"""The same config on the same machine with the same thread count gives the same bytes.

The tiny pipeline of the experiments (Lorenz, SST, KdV) runs twice through the real `snakemake`,
in two scratch directories: first with an empty numba cache (every kernel compiled in that run),
then with the cache that run left behind (every kernel loaded from disk). Every experiment's
metrics.json (recovered equations, forecast and rollout errors, all computed from the generated
data and the trained models) must agree to the byte: numba's on-disk cache must not change what
the kernels compute.
"""

from __future__ import annotations

import pytest
from pipeline_support import (
    CLI_SCALE,
    failure_report,
    make_workdir,
    merge,
    run_snakemake,
    tiny_config,
)

pytestmark = pytest.mark.slow


def test_cold_and_warm_numba_cache_give_identical_results(tmp_path):
    import yaml

    # Lorenz at the command tests' scale (a few epochs): the cache, not the training, is tested
    config = merge(tiny_config(), {"lorenz": CLI_SCALE["lorenz"]})
    config["standalone"]["enabled"] = False
    config["benchmark"]["enabled"] = False
    config["sst"]["scaling"]["enabled"] = False  # timings, not results
    experiments = [name for name in ("lorenz", "sst", "kdv") if config[name]["enabled"]]
    cfg = tmp_path / "experiments_only.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    outputs = []
    for name in ("cold", "warm"):
        work = make_workdir(tmp_path / name)
        run = run_snakemake(
            work,
            ["--cores", "1", "--configfile", str(cfg)],
            env={"NUMBA_CACHE_DIR": str(cache)},
            timeout=1200,
        )
        assert run.proc.returncode == 0, failure_report(work, run)
        outputs.append(
            {e: work / "results" / e / "smnn" / "eval" / "metrics.json" for e in experiments}
        )
        if name == "cold":
            assert any(cache.rglob("*.nbi")), "the first run left no numba cache behind"
    assert experiments == ["lorenz", "sst", "kdv"]
    for name in experiments:
        cold, warm = (run[name].read_bytes() for run in outputs)
        assert cold == warm, f"{name}: metrics.json differs between a cold and a warm numba cache"
