"""The experiment registry and protocol (smnn.experiments.base), the lazily built CLI, and the
rule that generic code names no experiment."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from smnn.experiments.base import (
    MEMBERS,
    REQUIRED,
    Experiment,
    ExperimentError,
    experiment_commands,
    experiments,
)

REPO = Path(__file__).resolve().parents[1]

# modules and rule files that serve every experiment and must name none
GENERIC = (
    "smnn/cli.py",
    "smnn/jobs.py",
    "smnn/devices.py",
    "smnn/timing.py",
    "smnn/memory.py",
    "smnn/commands/experiment.py",
    "smnn/config_validation.py",
    "workflow/rules/common.smk",
    "workflow/rules/experiment.smk",
    "Snakefile",
    "smnn/training.py",
    "smnn/tracking.py",
)
NAMES = ("lorenz", "sst", "kdv")


def _code_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every name and string token of ``path`` that is code: comments and
    prose strings (a string that is a whole statement: docstrings) left out."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    out = []
    for i, tok in enumerate(tokens):
        if tok.type not in (tokenize.NAME, tokenize.STRING):
            continue
        if tok.type == tokenize.STRING:
            before = tokens[i - 1].type if i else tokenize.NEWLINE
            after = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.NEWLINE
            starts = before in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
            if starts and after in (tokenize.NEWLINE, tokenize.NL):
                continue  # a docstring
        out.append((tok.start[0], tok.string))
    return out


@pytest.mark.parametrize("relpath", GENERIC)
def test_generic_code_names_no_experiment(relpath):
    hits = [
        f"{relpath}:{line}: {text[:60]}"
        for line, text in _code_text(REPO / relpath)
        if any(name in text.lower() for name in NAMES)
    ]
    assert not hits, "generic code names an experiment:\n" + "\n".join(hits)


def test_the_name_check_sees_code_and_skips_prose(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Lorenz in a docstring."""\n# sst in a comment\nx = "kdv"\n')
    assert [text for _, text in _code_text(sample)] == ["x", '"kdv"']


def test_builtin_experiments_define_every_required_member():
    found = experiments()
    assert list(found) == ["lorenz", "sst", "kdv"]
    for exp in found.values():
        assert isinstance(exp, Experiment)
        for member in MEMBERS:
            assert hasattr(exp, member), (exp.name, member)
        assert {"enabled", "solvers"} <= set(exp.schema["required"])
    assert found["sst"].baselines == ("adagvae",) and found["lorenz"].baselines == ()


def test_optional_members_have_defaults():
    class Bare(Experiment):
        name = "bare"

    bare = Bare()
    optional = [m for m in MEMBERS if m not in REQUIRED]
    assert set(optional) == {
        "baselines", "commands", "build_baseline_task", "extra_targets", "train_document",
        "summary_lines", "config_problems",
    }  # fmt: skip
    assert bare.baselines == () and bare.commands == ()
    assert bare.extra_targets(None) == [] and bare.summary_lines({}) == []
    assert bare.train_document({"state_dict": {}}) == {}
    with pytest.raises(ExperimentError, match="no trained baseline 'x'"):
        bare.build_baseline_task(None, "x", Path("d"), None)


def _plugin(tmp_path: Path, text: str) -> dict[str, str]:
    (tmp_path / "plugin_exp.py").write_text(text)
    sys.path.insert(0, str(tmp_path))
    return {"SMNN_EXPERIMENTS": "plugin_exp"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("X = 1\n", "must define EXPERIMENT, an instance of a subclass"),
        ("EXPERIMENT = object()\n", "must define EXPERIMENT, an instance of a subclass"),
        (
            "from smnn.experiments.base import Experiment\n"
            "class E(Experiment):\n    name = 'e'\nEXPERIMENT = E()\n",
            "does not define title, mlflow_experiment, solvers",
        ),
        ("import no_such_module_here\n", "cannot import experiment module 'plugin_exp'"),
    ],
)
def test_a_broken_registration_fails(tmp_path, text, message):
    env = _plugin(tmp_path, text)
    try:
        with pytest.raises(ExperimentError, match=message):
            experiments(env)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("plugin_exp", None)


def test_cli_declares_the_help_its_modules_give():
    """Every subcommand is declared (name, module, help) and its module adds it with that help."""
    from smnn.cli import build_parser, commands

    parser = build_parser("all")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    added = {c.dest: c.help for c in sub._choices_actions}
    declared = {c.name: c.help for c in commands()}
    assert added == declared
    names = {c.name for c in experiment_commands()}
    assert names == {
        "generate-lorenz", "download-sst", "synthesize-sst", "preprocess-sst", "sst-scaling",
        "generate-kdv", "import-kdv",
    }  # fmt: skip


def test_top_level_help_imports_no_experiment_code():
    """``smnn --help`` lists every subcommand without importing torch or an experiment's code."""
    code = (
        "import sys\n"
        "from smnn.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('smnn.experiments.')"
        " and m.count('.') > 2 or m.startswith('smnn.data')]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:]
    for name in ("generate-lorenz", "preprocess-sst", "import-kdv", "train", "evaluate"):
        assert name in proc.stdout


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_subcommand_help_imports_no_torch(command):
    """``smnn <command> --help`` builds that command's parser without importing torch (it took
    9 s when the solver package, the trainer and the CG baseline were imported to build it)."""
    code = (
        "import sys\n"
        "from smnn.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "usage: smnn" in proc.stdout
    assert "TORCH False" in proc.stdout, proc.stdout[-2000:]


def test_a_subcommand_parses_its_full_options():
    from smnn.cli import build_parser

    args = build_parser("train").parse_args(
        ["train", "--experiment", "sst", "--baseline", "adagvae", "--config", "c.yaml",
         "--threads", "3", "--data", "d", "--out", "o"]
    )  # fmt: skip
    assert (args.baseline, args.solver, args.threads) == ("adagvae", None, 3)
