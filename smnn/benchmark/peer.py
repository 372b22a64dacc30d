"""Peers: other implementations of the same function, timed beside S-MNN in the same process.

A peer is given as ``PATH_OR_MODULE:FUNCTION[=LABEL]`` (``smnn bench --peer``, or the config's
``benchmark.peers``):

- ``PATH_OR_MODULE``: a ``.py`` file (e.g. the authors' published ``smnn.py``, fetched by the
  user; nothing is vendored or downloaded here) or the dotted name of an importable module;
- ``FUNCTION``: a function with the public signature of docs/solver.md, "Inputs, shapes,
  broadcasting", called as ``FUNCTION(coefficients, rhs_equation, init_vars, steps)`` with the
  benchmark's inputs in the default layout (batch first, ``is_step_dim_first=False``),
  returning ``u (B, T, D, R)``;
- ``LABEL``: the method name in the outputs (default ``<file stem or module>.<FUNCTION>``).

A file is loaded under a private module name (``_smnn_peer_<label>``), so a file called
``smnn.py`` never shadows this package; its directory is appended (not prepended) to
``sys.path``, so the file can import modules beside it without hiding installed ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from smnn.benchmark.catalog import METHODS, Method

__all__ = ["PeerSpec", "parse_peer", "load_peer"]

_LABEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class PeerSpec:
    """A parsed ``--peer`` value: where the function lives, its name and its label."""

    target: str
    function: str
    label: str

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py") or "/" in self.target


def parse_peer(text: str) -> PeerSpec:
    """``PATH_OR_MODULE:FUNCTION[=LABEL]`` -> :class:`PeerSpec` (ValueError naming ``--peer``)."""
    spec, label = text, ""
    if "=" in text:
        spec, label = text.rsplit("=", 1)
    if ":" not in spec:
        raise ValueError(f"--peer {text!r}: expected PATH_OR_MODULE:FUNCTION[=LABEL]")
    target, function = spec.rsplit(":", 1)
    if not target or not function.isidentifier():
        raise ValueError(
            f"--peer {text!r}: expected PATH_OR_MODULE:FUNCTION[=LABEL] with FUNCTION a Python name"
        )
    if not label:
        stem = Path(target).stem if target.endswith(".py") or "/" in target else target
        label = f"{stem}.{function}"
    if not _LABEL.match(label):
        raise ValueError(
            f"--peer {text!r}: label {label!r} may hold only letters, digits, '_', '.' and '-'"
        )
    if label in METHODS:
        raise ValueError(
            f"--peer {text!r}: label {label!r} is a built-in method; give another with =LABEL"
        )
    return PeerSpec(target, function, label)


def _import(spec: PeerSpec):
    if not spec.is_file:
        try:
            return importlib.import_module(spec.target)
        except ImportError as exc:
            raise ValueError(f"--peer {spec.target}: cannot import module ({exc})") from exc
    path = Path(spec.target).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"--peer {spec.target}: file does not exist")
    name = "_smnn_peer_" + re.sub(r"\W", "_", spec.label)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--peer {spec.target}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(
            f"--peer {spec.target}: importing it failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def load_peer(spec: PeerSpec | str) -> Method:
    """The peer's function as a benchmark :class:`Method` of family ``peer``."""
    spec = parse_peer(spec) if isinstance(spec, str) else spec
    module = _import(spec)
    fn = getattr(module, spec.function, None)
    if not callable(fn):
        raise ValueError(f"--peer {spec.target}: has no function {spec.function!r}")

    def solve(c, b, u0, h) -> tuple[torch.Tensor, dict]:
        u = fn(c, b, u0, h)
        if isinstance(u, (tuple, list)):
            u = u[0]
        want = (*h.shape[:-1], c.shape[-4], c.shape[-2], c.shape[-1])
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != want:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"peer {spec.label} returned {got}, expected a tensor {want}")
        return u, {}

    where = spec.target if spec.is_file else f"module {spec.target}"
    return Method(
        spec.label,
        solve,
        family="peer",
        label=spec.label,
        description=f"peer: {spec.function} from {where}",
    )
