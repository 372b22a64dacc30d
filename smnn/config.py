"""The pipeline configuration: loading, typed access with clear errors, flattening and hashing.

The whole file is validated once, against the schema of :mod:`smnn.config_validation`, by the
workflow before any job starts and by every ``smnn`` command on the file it is given. The typed
accessors here still check every key they read, so code that builds a :class:`Config` by hand
fails with the dotted key and the source named, e.g.
``config/config.yaml: lorenz.train.lr must be a number > 0, got 'fast'``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from smnn.errors import UserError

__all__ = ["Config", "ConfigError", "SettingsError", "load_config", "flatten_config", "config_hash"]

_MISSING = object()


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class SettingsError(ConfigError):
    """Keys of a config that contradict each other (found when an experiment's settings are
    built); ``problems`` holds one message per key (``config key 'sst.model.n_dct': ...``)."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.problems = tuple(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class Config:
    """A parsed YAML configuration with typed, validated access by dotted key.

    Args:
        data: the parsed mapping (top level of the YAML file).
        source: where it came from (used in error messages).
    """

    def __init__(self, data: Mapping[str, Any], source: str = "<config>"):
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: the top level must be a mapping, got {type(data).__name__}"
            )
        self.data: dict[str, Any] = dict(data)
        self.source = source

    def __repr__(self) -> str:
        return f"Config(source={self.source!r})"

    # ------------------------------------------------------------------ raw access

    def _fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} {message}")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value at dotted ``key`` (e.g. ``"lorenz.train.lr"``), untyped.

        Raises ConfigError naming the key when it is missing and no default is given.
        """
        node: Any = self.data
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, Mapping):
                where = ".".join(parts[:i])
                raise self._fail(key, f"cannot be read: {where} is not a mapping")
            if part not in node:
                if default is not _MISSING:
                    return default
                raise self._fail(key, "is missing")
            node = node[part]
        return node

    def has(self, key: str) -> bool:
        """Whether dotted ``key`` is present (its value may be null)."""
        return self.raw(key, default=_MISSING_SENTINEL) is not _MISSING_SENTINEL

    def section(self, key: str) -> dict[str, Any]:
        """The mapping at ``key`` (a copy)."""
        value = self.raw(key)
        if not isinstance(value, Mapping):
            raise self._fail(key, f"must be a mapping, got {_describe(value)}")
        return dict(value)

    # ------------------------------------------------------------------ typed access

    def get_int(
        self, key: str, *, min_value: int | None = None, allow_none: bool = False
    ) -> int | None:
        """An integer (``bool`` is not an integer here) >= ``min_value``."""
        value = self.raw(key)
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer{_bound(min_value)}, got {_describe(value)}")
        if min_value is not None and value < min_value:
            raise self._fail(key, f"must be an integer{_bound(min_value)}, got {value}")
        return value

    def get_float(
        self,
        key: str,
        *,
        positive: bool = False,
        non_negative: bool = False,
        allow_none: bool = False,
    ) -> float | None:
        """A finite number (int or float); optionally > 0 or >= 0."""
        value = self.raw(key)
        if value is None and allow_none:
            return None
        what = "a number" + (" > 0" if positive else " >= 0" if non_negative else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be {what}, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0) or (non_negative and value < 0):
            raise self._fail(key, f"must be {what}, got {value}")
        return value

    def get_bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {_describe(value)}")
        return value

    def get_str(
        self, key: str, *, choices: Sequence[str] | None = None, allow_none: bool = False
    ) -> str | None:
        value = self.raw(key)
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, got {_describe(value)}")
        if choices is not None and value not in choices:
            raise self._fail(key, f"must be one of {list(choices)}, got {value!r}")
        return value

    def get_float_list(self, key: str, *, length: int | None = None) -> list[float]:
        """A list of finite numbers, optionally of a fixed length."""
        value = self.raw(key)
        want = f"a list of {length} numbers" if length is not None else "a list of numbers"
        if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
        ):
            raise self._fail(key, f"must be {want}, got {_describe(value)}")
        if length is not None and len(value) != length:
            raise self._fail(key, f"must be {want}, got {len(value)} values")
        out = [float(v) for v in value]
        if not all(math.isfinite(v) for v in out):
            raise self._fail(key, f"must contain finite numbers only, got {value}")
        return out

    def get_str_list(self, key: str, *, choices: Sequence[str] | None = None) -> list[str]:
        value = self.raw(key)
        if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
            raise self._fail(key, f"must be a list of strings, got {_describe(value)}")
        if choices is not None:
            bad = [v for v in value if v not in choices]
            if bad:
                raise self._fail(key, f"entries must be among {list(choices)}, got {bad}")
        return list(value)


_MISSING_SENTINEL = object()


def _bound(min_value: int | None) -> str:
    return "" if min_value is None else f" >= {min_value}"


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def load_config(path: str | Path) -> Config:
    """Read a YAML configuration file.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or its top level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    return Config(data, source=str(path))


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` with string values (MLflow params).

    Lists and scalars become their JSON text (``null`` for None), so the params read the same as
    the YAML they came from.
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, prefix=name + "."))
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def config_hash(data: Mapping[str, Any]) -> str:
    """A short stable hash (12 hex digits of SHA-256) of a mapping's canonical JSON."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
