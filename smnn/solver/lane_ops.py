"""Lane operations for the numba lane kernels, generated for any number of lanes.

A lane kernel works on ``W`` systems (or columns) side by side: every array it computes with has
the lane as its last axis, and every arithmetic step is one small helper over the ``W`` lanes.
Each helper is written out lane by lane as *one* tuple assignment (all loads before all stores),
so that LLVM's SLP vectoriser turns it into vector instructions; a loop over the lanes would stay
scalar (numba cannot prove that the destination and the sources do not overlap).

Those helpers are not written by hand: :data:`LANE_OPS` holds one template per helper, in which
``{i}`` stands for the lane, and :func:`helper_source` spells them out for a width. A kernel
module is then one width-independent source file (its "body", e.g.
``lane_kernels_source.py``) that uses ``LANES`` and the helpers; :func:`kernel_module` writes the
helpers at width ``W`` followed by the body into the cache directory, once, under a name that
carries the hash of the text, and imports it, so numba compiles and caches it like any module
(its cache goes to ``__pycache__`` beside the file). Every width runs the same operations in the
same order in each lane, so the widths give the same bits lane by lane.

Cache directory: ``$SMNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/smnn``, else ``~/.cache/smnn``
(``lane_kernels/`` in it); where it cannot be written, ``<temp dir>/smnn-<uid>``.

Numba settings shared by every lane kernel (:data:`KERNEL_OPTIONS`, :data:`helper`):

- no fast-math licences (contraction into FMAs, reassociation, no signed zeros, reciprocals).
  With them, the results depended on how a kernel had been compiled: a process that compiles the
  kernels (cold numba cache) calls some helpers in their separately compiled form, a process that
  loads them from the cache calls the copies optimized into each kernel, and LLVM may fuse and
  reorder floating-point operations differently in each (cold and warm runs differed in the last
  bits). Without the licences every compilation computes the same bits; the helpers are
  element-wise over the lanes, so they vectorise without reassociation.
- ``error_model="numpy"``: a float division by zero gives inf or NaN (IEEE) instead of raising
  ZeroDivisionError. Python's model put a compare and branch in front of every division, so the
  divisions of a lane helper stayed scalar; the quotients are the same bits either way.
- helpers run without numba's reference counting (``_nrt=False``): with it, every array view and
  every array passed to a function that is not inlined costs an atomic increment and decrement
  of its parent's counter (36-50 % of a forward+backward step at the Lorenz shape, measured with
  perf). Helpers allocate nothing and return no array, so nothing needs the counters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from numba import njit

__all__ = [
    "KERNEL_OPTIONS",
    "LANE_OPS",
    "LaneOp",
    "cache_dir",
    "helper",
    "helper_source",
    "inline_helper",
    "kernel_module",
]

KERNEL_OPTIONS = dict(cache=True, fastmath=False, error_model="numpy")
helper = njit(**KERNEL_OPTIONS, _nrt=False)
# the same, inlined where called (numba's own inlining; LLVM leaves the larger ones as calls)
inline_helper = njit(**KERNEL_OPTIONS, _nrt=False, inline="always")


class LaneOp:
    """One lane helper: ``params`` (its arguments, as written in ``def``), ``lane`` (the
    template of one lane, ``{i}`` for the lane index) and ``doc``.

    ``lane`` is either an assignment ``"<target> = <expression>"``, spelled out as one tuple
    assignment over the lanes, or an expression, whose lanes are returned as a tuple (a *lane
    value*, which LLVM keeps in vector registers)."""

    def __init__(self, params: str, lane: str, doc: str):
        self.params, self.lane, self.doc = params, lane, doc

    def source(self, name: str, width: int) -> str:
        """The helper's ``def`` at ``width`` lanes (decorated with ``@helper``)."""
        lanes = [self.lane.format(i=i) for i in range(width)]
        head = f'@helper\ndef {name}({self.params}):\n    """{self.doc}"""\n'
        if " = " in self.lane:
            targets = ", ".join(lane.split(" = ", 1)[0] for lane in lanes)
            values = ", ".join(lane.split(" = ", 1)[1] for lane in lanes)
            return f"{head}    ({targets},) = ({values},)\n"
        return f"{head}    return ({', '.join(lanes)},)\n"


# Arrays a, b, c, d, dst, src are (W,) (one lane each); s and v scalars; acc a lane value.
LANE_OPS: dict[str, LaneOp] = {
    "_fill": LaneOp("dst, v", "dst[{i}] = v", "dst = v."),
    "_copy": LaneOp("dst, a", "dst[{i}] = a[{i}]", "dst = a."),
    "_gather": LaneOp("dst, src, index", "dst[{i}] = src[index[{i}]]", "dst = src[index]."),
    "_add_product": LaneOp(
        "dst, a, b", "dst[{i}] = dst[{i}] + a[{i}] * b[{i}]", "dst += a * b (two roundings)."
    ),
    "_subtract_product": LaneOp(
        "dst, a, b", "dst[{i}] = dst[{i}] - a[{i}] * b[{i}]", "dst -= a * b (two roundings)."
    ),
    "_scale": LaneOp("dst, s", "dst[{i}] = dst[{i}] * s", "dst *= s."),
    "_set_scaled": LaneOp("dst, s, a", "dst[{i}] = s * a[{i}]", "dst = s * a."),
    "_add_scalar": LaneOp("dst, s", "dst[{i}] = dst[{i}] + s", "dst += s."),
    "_add_scaled": LaneOp("dst, s, a", "dst[{i}] = dst[{i}] + s * a[{i}]", "dst += s * a."),
    "_subtract_from": LaneOp("dst, a", "dst[{i}] = a[{i}] - dst[{i}]", "dst = a - dst."),
    "_add_scaled_product": LaneOp(
        "dst, s, a, b", "dst[{i}] = dst[{i}] + s * a[{i}] * b[{i}]", "dst += s * a * b."
    ),
    "_multiply": LaneOp("dst, a", "dst[{i}] = dst[{i}] * a[{i}]", "dst *= a."),
    "_set_scaled_product": LaneOp(
        "dst, s, a, b", "dst[{i}] = s * a[{i}] * b[{i}]", "dst = s * a * b."
    ),
    "_add_scaled_cross_difference": LaneOp(
        "dst, s, a, b, c, d",
        "dst[{i}] = dst[{i}] + s * (a[{i}] * b[{i}] - c[{i}] * d[{i}])",
        "dst += s * (a * b - c * d).",
    ),
    # lane values (tuples of the lanes, held in registers): a chain of operations on one
    # destination (a dot product) keeps its partial sums out of memory:
    # ``acc = _value_of(dst)``, ``acc = _minus_products(acc, a, b)`` for every k,
    # ``_store_value(dst, acc)``
    "_value_of": LaneOp("a", "a[{i}]", "The lanes of a as a lane value."),
    "_store_value": LaneOp("dst, acc", "dst[{i}] = acc[{i}]", "dst = the lane value acc."),
    "_minus_products": LaneOp(
        "acc, a, b", "_minus_product(acc[{i}], a[{i}], b[{i}])", "acc - a * b (a lane value)."
    ),
    "_plus_products": LaneOp(
        "acc, a, b", "_plus_product(acc[{i}], a[{i}], b[{i}])", "acc + a * b (a lane value)."
    ),
    "_plus_scaled_products": LaneOp(
        "acc, s, a, b",
        "_plus_product(acc[{i}], s * a[{i}], b[{i}])",
        "acc + (s * a) * b (a lane value).",
    ),
    "_value_times": LaneOp("acc, a", "acc[{i}] * a[{i}]", "acc * a (a lane value)."),
    "_lane_rows": LaneOp(
        "first, n_real",
        "first + min({i}, n_real - 1)",
        "The rows (or columns) of the lanes: first .. first + n_real - 1, the last repeated.",
    ),
}

# scalar helpers the lane values use (the same in every lane)
_SCALAR_SOURCE = '''
@helper
def _minus_product(c, a, b):
    """c - a * b for one lane, two roundings (an explicit FMA through ``llvm.fma`` measured 7 %
    slower at the KdV shape: these chains are latency-bound, and an FMA has a longer latency than
    the subtraction that ends a chain of multiply-subtracts)."""
    return c - a * b


@helper
def _plus_product(c, a, b):
    """c + a * b for one lane, two roundings."""
    return c + a * b
'''


def helper_source(width: int, ops: dict[str, LaneOp] | None = None) -> str:
    """Python source defining ``LANES = width`` and the helpers of ``ops`` (default
    :data:`LANE_OPS`; a kernel module may add its own) at ``width`` lanes."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    ops = LANE_OPS if ops is None else ops
    parts = [
        "from smnn.solver.lane_ops import helper\n",
        f"LANES = {width}\n",
        _SCALAR_SOURCE,
        *(op.source(name, width) for name, op in ops.items()),
    ]
    return "\n\n".join(parts)


def cache_dir() -> Path:
    """Where generated kernel modules live (module docstring)."""
    if os.environ.get("SMNN_CACHE_DIR"):
        return Path(os.environ["SMNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smnn"


def _write_once(folder: Path, name: str, source: str) -> Path:
    """``folder/name.py`` holding ``source``, written unless it exists (the name carries the
    source's hash), under a temporary name and renamed: a concurrent process sees all or
    nothing."""
    path = folder / f"{name}.py"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return path


def kernel_module(
    prefix: str, body: Path, width: int, ops: dict[str, LaneOp] | None = None
) -> ModuleType:
    """The kernels of the source file ``body`` at ``width`` lanes, imported as a module.

    The module's text is :func:`helper_source` (``width``, ``ops``) followed by ``body``'s text
    (which must not use ``from __future__``); it is written once to
    ``<cache dir>/lane_kernels/<prefix>_w<width>_<hash>.py`` and imported under that name.
    Callers cache the result (a second import would compile a second copy)."""
    header = (
        f'"""{prefix} at {width} lanes: generated by smnn.solver.lane_ops from {body.name}."""\n'
    )
    source = header + helper_source(width, ops) + "\n\n" + body.read_text()
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"{prefix}_w{width}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        path = _write_once(cache_dir() / "lane_kernels", name, source)
    except OSError:  # e.g. a read-only home directory on a cluster node
        fallback = Path(tempfile.gettempdir()) / f"smnn-{os.getuid()}" / "lane_kernels"
        path = _write_once(fallback, name, source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cache locates functions through their module
    spec.loader.exec_module(module)
    return module
