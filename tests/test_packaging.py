"""Packaging: the lean solver install, the `workflow` and `dev` extras, environment.yml in step.

- `pip install smnn` needs torch, numpy, scipy and numba only; the pipeline's packages are the
  `workflow` extra, the test tools the `dev` extra (which includes `workflow`).
- environment.yml (conda, for HPC users) lists exactly the packages of `smnn[workflow]` with the
  same lower bounds; conda names differ from PyPI names only as listed in CONDA_NAMES.
- The solver's import path works with every workflow-only package made unimportable.
- A wheel carries the package's data files (config schemas), not only its .py files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# what `pip install smnn` brings: the solver
SOLVER_PACKAGES = {"torch", "numpy", "scipy", "numba"}
# what `smnn[workflow]` adds: the pipeline
WORKFLOW_PACKAGES = {
    "snakemake",
    "snakemake-executor-plugin-slurm",
    "mlflow",
    "xarray",
    "dask",
    "zarr",
    "netcdf4",
    "h5py",
    "matplotlib",
    "pandas",
    "tqdm",
    "pyyaml",
    "jsonschema",
    "pygments",  # snakemake --report
    "requests",  # smnn download-sst
    "distributed",  # Dask clusters for preprocess-sst
}
DEV_PACKAGES = {"pytest", "ruff"}
# conda-forge name -> PyPI name, where they differ
CONDA_NAMES = {"matplotlib-base": "matplotlib"}
# conda-only entries of environment.yml that are not Python packages of ours
CONDA_TOOLING = {"python", "pip"}
# the import names of the workflow-only packages, blocked in the lean-import check
WORKFLOW_MODULES = (
    "snakemake",
    "snakemake_executor_plugin_slurm",
    "mlflow",
    "xarray",
    "dask",
    "zarr",
    "netCDF4",
    "h5py",
    "matplotlib",
    "pandas",
    "tqdm",
    "yaml",
    "jsonschema",
    "pygments",
    "requests",
    "distributed",
)


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _lower_bounds(requirements: list[str], where: str) -> dict[str, str | None]:
    """{canonical name: lower bound or None} of PEP 508 strings, refusing anything but >=."""
    out: dict[str, str | None] = {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        specs = list(req.specifier)
        assert all(s.operator == ">=" for s in specs), f"{where}: {text!r}: use >= bounds only"
        assert len(specs) <= 1, f"{where}: {text!r}: one lower bound per package"
        assert name not in out, f"{where}: {name} listed twice"
        out[name] = specs[0].version if specs else None
    return out


def _conda_lower_bounds() -> dict[str, str | None]:
    """{PyPI canonical name: lower bound} of environment.yml, conda and pip sections together."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = [], []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            assert set(entry) == {"pip"}, f"environment.yml: unexpected entry {entry}"
            pip.extend(entry["pip"])
        else:
            conda.append(entry)
    out: dict[str, str | None] = {}
    for text in conda:
        name, _, rest = text.partition(">=")
        name = name.strip()
        if name in CONDA_TOOLING:
            continue
        assert not any(op in name for op in "<=!~ "), f"environment.yml: {text!r}: use >= bounds"
        pypi = canonicalize_name(CONDA_NAMES.get(name, name))
        assert pypi not in out, f"environment.yml: {pypi} listed twice"
        out[pypi] = rest.strip() or None
    for name, bound in _lower_bounds(pip, "environment.yml pip section").items():
        assert name not in out, f"environment.yml: {name} in both the conda and the pip section"
        out[name] = bound
    return out


def test_solver_dependencies_are_lean():
    deps = _lower_bounds(_pyproject()["project"]["dependencies"], "dependencies")
    assert set(deps) == SOLVER_PACKAGES
    assert deps["torch"] == "2.4"
    assert all(bound for bound in deps.values()), "every dependency needs a lower bound"


def test_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(extras) == {"workflow", "dev", "gpu"}
    assert _lower_bounds(extras["gpu"], "gpu extra") == {"triton": "3.0"}
    workflow = _lower_bounds(extras["workflow"], "workflow extra")
    assert set(workflow) == WORKFLOW_PACKAGES
    assert all(bound for bound in workflow.values()), "every workflow package needs a lower bound"
    reqs = [Requirement(r) for r in extras["dev"]]
    self_refs = [r for r in reqs if canonicalize_name(r.name) == "smnn"]
    assert [r.extras for r in self_refs] == [{"workflow"}], "dev must include smnn[workflow]"
    dev = _lower_bounds([str(r) for r in reqs if r not in self_refs], "dev extra")
    assert set(dev) == DEV_PACKAGES


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    expected = _lower_bounds(project["dependencies"], "dependencies")
    expected |= _lower_bounds(project["optional-dependencies"]["workflow"], "workflow extra")
    conda = _conda_lower_bounds()
    assert set(conda) - set(expected) == set(), "in environment.yml but not in pyproject.toml"
    assert set(expected) - set(conda) == set(), "in pyproject.toml but not in environment.yml"
    differ = {n: (expected[n], conda[n]) for n in expected if expected[n] != conda[n]}
    assert differ == {}, f"lower bounds differ (pyproject, environment.yml): {differ}"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python and ">=" + project["requires-python"].removeprefix(">=") in python[0]


LEAN_IMPORT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = set(sys.argv[2].split(","))

    class BlockWorkflowPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is a workflow-only package (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockWorkflowPackages())
    sys.path.insert(0, sys.argv[1])

    import torch

    from smnn import factorize, ode_forward

    T = 12
    c = torch.zeros(2, 1, 1, 1, 3, dtype=torch.float64)  # u' + u = 0
    c[..., 0] = 1.0
    c[..., 1] = 1.0
    b = torch.zeros(2, 1, 1, dtype=torch.float64)
    u0 = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    h = torch.full((2, 1), 0.1, dtype=torch.float64)
    u = ode_forward(c, b, u0, h, n_steps=T)
    assert u.shape == (2, T, 1, 3), u.shape
    assert abs(float(u[0, -1, 0, 0]) - 0.3329) < 1e-2, float(u[0, -1, 0, 0])  # exp(-1.1)
    fac = factorize(c, h, n_init_orders=1, n_steps=T)
    assert float((fac.solve(b, u0) - u).abs().max()) < 1e-10
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("lean import ok")
    """
)


def test_solver_imports_without_workflow_packages():
    """`from smnn import ode_forward, factorize` and a solve need none of the pipeline's packages.

    On failure the traceback names the import that reached a workflow-only package.
    """
    proc = subprocess.run(
        [sys.executable, "-c", LEAN_IMPORT, str(ROOT), ",".join(WORKFLOW_MODULES)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT.parent,
    )
    assert proc.returncode == 0, (
        "the solver's import path needs a workflow-only package:\n" + proc.stderr[-4000:]
    )
    assert "lean import ok" in proc.stdout


def test_wheel_carries_package_data(tmp_path):
    """Every non-.py file inside smnn/ (config schemas, ...) lands in the wheel."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    shutil.copytree(ROOT / "smnn", src / "smnn", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("smnn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {
        p.relative_to(src).as_posix()
        for p in (src / "smnn").rglob("*")
        if p.is_file() and p.suffix != ".py"
    }
    assert data, "expected data files (config schemas) inside smnn/"
    assert data - names == set(), f"missing from the wheel: {sorted(data - names)}"
    assert "smnn/solver/api.py" in names


def test_ci_and_post_deploy_install_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[dev]'" in ci
    post = (ROOT / "environment.post-deploy.sh").read_text()
    assert "pip install --no-deps -e ." in post
