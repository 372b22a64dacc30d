# Helpers shared by the stage files: config checks, paths, targets, the effective config file and
# the MLflow store initialisation. Rule files hold rules only; functions live here.

import json
import os
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

SOLVERS = ["smnn", "mnn_dense", "mnn_cg"]
SCHEMA = Path(workflow.basedir, "workflow", "schemas", "config.schema.yaml")


# ------------------------------------------------------------------ config checks


def _dotted(path):
    """('lorenz', 'model', 'hidden') -> 'lorenz.model.hidden' (list indices as [i])."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _expects_non_string(schema):
    """Whether a (resolved) schema node accepts no strings at all."""
    types = schema.get("type")
    if types is None:
        return False
    types = [types] if isinstance(types, str) else types
    return "string" not in types


def _resolve(schema, root):
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if ref and ref.startswith("#/"):
        node = root
        for part in ref[2:].split("/"):
            node = node[part]
        return _resolve(node, root)
    return schema


def coerce_overrides(value, schema, overrides, root=None):
    """Re-type strings that came from `--config key=VALUE` where the schema wants no string.

    Snakemake parses nested values of `--config` overrides as plain strings
    (`--config 'lorenz={train: {cycles: 1}}'` gives cycles '1'); such a string is read as YAML
    again when the schema expects a number, boolean, null or list at that place. Only values given
    on the command line (`overrides`, the same shape) are touched: a string in a config file stays
    a string, and a wrong type there is reported.
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
        return [coerce_overrides(v, schema["items"], o, root) for v, o in zip(value, overrides)]
    if isinstance(value, str) and value == overrides and _expects_non_string(schema):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def config_problems(cfg, schema):
    """Every schema violation of `cfg` as one line naming the dotted key."""
    from jsonschema import Draft202012Validator

    problems = []
    for err in Draft202012Validator(schema).iter_errors(cfg):
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
    lorenz = cfg.get("lorenz") if isinstance(cfg, dict) else None
    data = lorenz.get("data") if isinstance(lorenz, dict) else None
    if isinstance(data, dict):
        n, w = data.get("n_points"), data.get("window")
        if isinstance(n, int) and isinstance(w, int) and w > n:
            problems.append(
                f"config key 'lorenz.data.window': {w} is larger than lorenz.data.n_points ({n})"
            )
    return sorted(set(problems))


def check_config(cfg):
    """Validate the merged config in place (with --config strings re-typed) or stop the run."""
    with open(SCHEMA) as f:
        schema = yaml.safe_load(f)
    plain = json.loads(json.dumps(cfg))
    overrides = json.loads(json.dumps(dict(workflow.config_settings.config), default=dict))
    fixed = coerce_overrides(plain, schema, overrides)
    problems = config_problems(fixed, schema)
    if problems:
        raise WorkflowError(
            "Invalid configuration (see config/README.md and "
            "workflow/schemas/config.schema.yaml):\n  " + "\n  ".join(problems)
        )
    cfg.clear()
    cfg.update(fixed)


# ------------------------------------------------------------------ paths and settings


def data_path(*parts):
    return str(Path(config["paths"]["data"], *parts))


def results_path(*parts):
    return str(Path(config["paths"]["results"], *parts))


def effective_config_path():
    """Where the validated, merged config is written for the jobs (see write_effective_config)."""
    return results_path("config", "effective.yaml")


def settings(*keys):
    """The config values at dotted `keys` as canonical JSON.

    Used as a rule parameter so that Snakemake's params rerun trigger reruns a job when (and only
    when) a setting it depends on changes.
    """
    picked = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


def mlflow_tracking_uri():
    """The tracking URI for commands that take no --config (`smnn bench`).

    Same precedence as smnn.tracking: mlflow.tracking_uri of the config, else the environment
    variable MLFLOW_TRACKING_URI, else the SQLite store in the results directory.
    """
    uri = config["mlflow"]["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path(results_path("mlflow.db")).resolve())


def lorenz_solvers():
    return config["lorenz"]["solvers"]


# ------------------------------------------------------------------ targets


def standalone_targets():
    names = ["metrics.json", "errors.csv", "errors.md", "solutions.png"]
    return [results_path("standalone", n) for n in names]


def benchmark_targets():
    names = ["bench.csv", "bench.md", "scaling_T.png", "scaling_batch.png"]
    return [results_path("benchmark", n) for n in names]


def lorenz_targets():
    return [
        results_path("lorenz", solver, "eval", "metrics.json") for solver in lorenz_solvers()
    ]


def all_targets():
    """Everything the default target builds: each enabled stage of each experiment."""
    targets = []
    if config["standalone"]["enabled"]:
        targets += standalone_targets()
    if config["benchmark"]["enabled"]:
        targets += benchmark_targets()
    if config["lorenz"]["enabled"]:
        targets += lorenz_targets()
    return targets


# ------------------------------------------------------------------ start of a run


def write_effective_config(cfg, path):
    """Write `cfg` as YAML to `path`, atomically, and only when the content changes.

    Every job reads this one file (`smnn ... --config results/config/effective.yaml`), so the
    jobs see exactly what this run validated, including --configfile and --config overrides,
    also on SLURM nodes. An unchanged file keeps its modification time.
    """
    text = (
        "# Written by the smnn workflow at the start of a run: the validated, merged config\n"
        "# (config/config.yaml + --configfile + --config). Do not edit; edit config/ instead.\n"
        + yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False)
    )
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


onstart:
    # Runs once in the main Snakemake process before any job (not in dry runs, not in jobs).
    write_effective_config(config, effective_config_path())
    Path(results_path("logs")).mkdir(parents=True, exist_ok=True)
    shell(
        "smnn tracking-init --config {cfg} > {logfile} 2>&1",
        cfg=effective_config_path(),
        logfile=results_path("logs", "tracking_init.log"),
    )
