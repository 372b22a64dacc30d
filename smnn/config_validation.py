"""Validating the whole pipeline configuration, once, with messages that name the key.

The schema is assembled from two parts, so that it always matches the registered experiments:

- ``smnn/schemas/config.schema.yaml``: the global keys (``device``, ``seed``, ``threads``,
  ``paths``, ``mlflow``) and the ``standalone`` and ``benchmark`` sections, with shared
  definitions under ``$defs`` (``solver``: its names are filled in from
  :func:`smnn.solver.registry.solver_names`);
- one section per experiment of :func:`smnn.experiments.base.experiments`, from its ``schema``.

:func:`check_config` checks a merged configuration against it, then (when the schema is
satisfied) builds every experiment's settings once, which holds the cross-key checks (such as a
Lorenz window longer than the trajectory), and raises one :class:`~smnn.config.ConfigError`
listing every problem, one line each::

    Invalid configuration (see config/README.md):
      config key 'lorenz.model.hiden' is not allowed (allowed here: hidden, latent, threshold)
      config key 'lorenz.train.lr': 'fast' is not of type 'number'

The Snakefile calls it before any job starts; ``smnn`` commands call it on the file they are
given (:func:`smnn.jobs.job_config`), so a hand-run stage gets the same messages.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from smnn.config import ConfigError

__all__ = [
    "config_schema",
    "validate_config",
    "check_config",
    "config_problems",
    "coerce_overrides",
]

HINT = "see config/README.md"


def _base_schema() -> dict[str, Any]:
    text = resources.files("smnn").joinpath("schemas", "config.schema.yaml").read_text()
    return yaml.safe_load(text)


def config_schema(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON schema of the whole configuration for the registered experiments."""
    from smnn.experiments.base import experiments
    from smnn.solver.registry import solver_names

    schema = _base_schema()
    schema["$defs"]["solver"]["enum"] = list(solver_names())
    for name, exp in experiments(environ).items():
        schema["properties"][name] = copy.deepcopy(dict(exp.schema))
        schema["required"].append(name)
    return schema


def _dotted(path) -> str:
    """('lorenz', 'model', 'hidden') -> 'lorenz.model.hidden' (list indices as [i])."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _resolve(schema: Any, root: dict) -> Any:
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if ref and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        return _resolve(node, root)
    return schema


def _expects_non_string(schema: Mapping[str, Any]) -> bool:
    """Whether a (resolved) schema node accepts no strings at all."""
    types = schema.get("type")
    if types is None:
        return False
    types = [types] if isinstance(types, str) else types
    return "string" not in types


def coerce_overrides(value: Any, schema: Any, overrides: Any, root: dict | None = None) -> Any:
    """Re-type strings that came from ``snakemake --config key=VALUE`` where the schema wants
    no string.

    Snakemake hands nested values of ``--config`` overrides over as text
    (``--config 'lorenz={train: {cycles: 1}}'`` gives cycles ``'1'``); such a string is read as
    YAML again where the schema expects a number, boolean, null or list. Only values given on
    the command line (``overrides``, the same shape) are touched: a string in a config file
    stays a string, and a wrong type there is reported.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(value, dict) and isinstance(overrides, dict):
        props = schema.get("properties", {})
        return {
            k: coerce_overrides(v, props[k], overrides[k], root)
            if k in props and k in overrides
            else v
            for k, v in value.items()
        }
    if isinstance(value, list) and isinstance(overrides, list) and schema.get("items"):
        return [
            coerce_overrides(v, schema["items"], o, root)
            for v, o in zip(value, overrides, strict=False)
        ]
    if isinstance(value, str) and value == overrides and _expects_non_string(schema):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def config_problems(
    data: Any, schema: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Every problem the schema finds in ``data`` (and solvers an experiment does not
    support), one line each naming the dotted key (sorted, no duplicates)."""
    from jsonschema import Draft202012Validator

    from smnn.experiments.base import experiments
    from smnn.solver.registry import solver_names

    schema = config_schema(environ) if schema is None else schema
    problems = []
    for err in Draft202012Validator(schema).iter_errors(data):
        key = _dotted(err.absolute_path)
        prefix = "" if key == "<top level>" else f"{key}."
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(allowed)):
                problems.append(
                    f"config key '{prefix}{extra}' is not allowed "
                    f"(allowed here: {', '.join(allowed)})"
                )
        elif err.validator == "required":
            for missing in err.validator_value:
                if missing not in err.instance:
                    problems.append(f"config key '{prefix}{missing}' is missing")
        else:
            problems.append(f"config key '{key}': {err.message}")
    if isinstance(data, dict):
        for name, exp in experiments(environ).items():
            section = data.get(name)
            if isinstance(section, dict):
                solvers = section.get("solvers")
                listed = solvers if isinstance(solvers, list) else []
                bad = [s for s in listed if s in solver_names() and s not in exp.solvers]
                if bad:
                    problems.append(
                        f"config key '{name}.solvers': experiment {name} supports "
                        f"{', '.join(exp.solvers)}, not {', '.join(bad)}"
                    )
    return sorted(set(problems))


def check_config(
    data: Any,
    overrides: Any = None,
    source: str = "configuration",
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The validated configuration (plain JSON types; command-line overrides re-typed) and the
    settings of every experiment built from it (name -> frozen settings tree).

    The schema first (:func:`config_problems`); when it is satisfied, each experiment's
    settings are built once, and their cross-key problems join the message.

    Args:
        data: the merged configuration (a mapping).
        overrides: the part of it that came from ``--config`` on the command line (same shape),
            whose strings are re-typed by :func:`coerce_overrides`; None for a file.
        source: where it came from, for the message.

    Raises:
        ConfigError: ``Invalid <source> (see config/README.md):`` and one line per problem.
    """
    from smnn.config import Config, SettingsError
    from smnn.experiments.base import experiments

    schema = config_schema(environ)
    plain = json.loads(json.dumps(data, default=str))
    if overrides:
        plain = coerce_overrides(plain, schema, json.loads(json.dumps(overrides, default=dict)))
    problems = config_problems(plain, schema, environ)
    settings: dict[str, Any] = {}
    if not problems:
        config = Config(plain, source=source)
        for name, exp in experiments(environ).items():
            try:
                settings[name] = exp.settings(config)
            except SettingsError as exc:
                problems += exc.problems
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError(f"Invalid {source} ({HINT}):\n  " + "\n  ".join(sorted(set(problems))))
    return plain, settings


def validate_config(
    data: Any,
    overrides: Any = None,
    source: str = "configuration",
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The validated configuration of :func:`check_config` (without the settings)."""
    return check_config(data, overrides, source, environ)[0]
