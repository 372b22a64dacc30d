"""The same config on the same machine with the same thread count gives the same bytes.

The tiny Lorenz pipeline runs twice through the real `snakemake`, in two scratch directories:
first with an empty numba cache (every kernel compiled in that run), then with the cache that run
left behind (every kernel loaded from disk). Data, recovered equations and every evaluation
metric must agree to the byte: numba's on-disk cache must not change what the kernels compute.
"""

from __future__ import annotations

import pytest
from pipeline_support import failure_report, make_workdir, run_snakemake, tiny_config

pytestmark = pytest.mark.slow


def test_cold_and_warm_numba_cache_give_identical_results(tmp_path):
    import yaml

    config = tiny_config()
    config["standalone"]["enabled"] = False
    config["benchmark"]["enabled"] = False
    cfg = tmp_path / "lorenz_only.yaml"
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
        outputs.append(work / "results" / "lorenz" / "smnn" / "eval" / "metrics.json")
        if name == "cold":
            assert any(cache.rglob("*.nbi")), "the first run left no numba cache behind"
    cold, warm = (p.read_bytes() for p in outputs)
    assert cold == warm, "metrics.json differs between a cold and a warm numba cache"
