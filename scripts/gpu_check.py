"""One check of the GPU engine on a GPU node: tests, solver timings, the SST study, training steps.

Usage (from a checkout, no install step; docs/gpu.md)::

    PYTHONPATH=. python scripts/gpu_check.py OUT [--peer PATH/TO/authors/smnn.py] [--budget 450]
    PYTHONPATH=. python scripts/gpu_check.py OUT --cpu-smoke     # tiny sizes on CPU (CI)

Needs torch and triton (a CUDA build of torch brings triton), numpy and pyyaml; nothing else is
imported unless a part uses it, and a part whose import fails says which package was missing.
Every part runs in its own subprocess with its own timeout, inside the script's total budget
(default 450 s), and writes its rows as it goes, so one slow part cannot starve the others and a
part that times out keeps what it measured:

- ``tests``: ``pytest -m cuda tests/test_triton.py`` (the compiled kernels against the CPU
  paths); says so when pytest is absent;
- ``solver``: the benchmark's named shapes (:data:`smnn.benchmark.catalog.NAMED_SHAPES`),
  float32 and float64, forward + backward of: the Triton engine (``triton``: the normal
  equations; ``triton_qr``: the QR sweep), the torch path (sequential, replayed from CUDA
  graphs), block cyclic reduction, the torch path's QR, and the authors' ``ode_forward`` when
  ``--peer`` names their ``smnn.py``; median of synchronised steps, peak memory above the
  inputs (``torch.cuda.max_memory_allocated``), relative error against a float64 solve by
  cyclic reduction (a different algorithm);
- ``sst``: the solver's step (forward + backward of the ODE layer: B = 12,960 systems, D = 1,
  R = 3, float32) at 52 .. 1727 weeks for S-MNN (``ode_forward`` as users call it, and the
  normal equations on Triton) and MNN dense, beside the paper's figures (4.9x faster
  and half the memory at 208 weeks; MNN dense out of memory beyond 104 weeks on 80 GB);
- ``train``: a few training steps of each experiment (lorenz, sst, kdv) at ``config/paper.yaml``
  on synthetic data: median step time, peak memory.

Outputs in OUT: ``gpu_check.csv`` (one row per measurement, :data:`COLUMNS`) and
``gpu_check.md`` (environment, each part's status, the tables, the paper comparison).
``--cpu-smoke`` runs the same parts on CPU at tiny sizes (Triton under its interpreter, numba
blocked so the solver takes the torch path) in well under two minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = [
    "part", "case", "method", "dtype", "B", "T", "D", "R", "status", "time_ms", "peak_mb",
    "rel_err", "repeats", "metric", "note",
]  # fmt: skip
PARTS = ("tests", "solver", "sst", "train", "kdv")
# each part's share of the total budget (the last part gets what is left)
SHARES = {"tests": 0.15, "solver": 0.35, "sst": 0.2, "train": 0.15, "kdv": 0.15}
KDV_ROLLOUT_STEPS = 40
KDV_AUTHORS_NMSE = 0.0011  # the authors' notebook: 10 epochs on an RTX A6000
SST_LENGTHS = (52, 104, 208, 416, 1727)
SST_BATCH = 12960
SMOKE_SHAPES = ("lorenz", "coupled")
PAPER = {"length": 208, "speedup": 4.9, "memory_ratio": 0.5, "dense_oom_beyond": 104}
MB = 2**20


# ------------------------------------------------------------------ helpers (every part)


def _block(modules: list[str]) -> None:
    """Make ``modules`` unimportable, as on an image without them: ``import`` raises
    ModuleNotFoundError and ``importlib.util.find_spec`` returns None (a ``None`` entry in
    ``sys.modules``; torch probes optional packages with find_spec)."""
    for name in modules:
        sys.modules.setdefault(name, None)


def _rows_file(out: Path, part: str) -> Path:
    return out / f"rows_{part}.jsonl"


class Rows:
    """Append rows of one part to its jsonl file as they are measured."""

    def __init__(self, out: Path, part: str):
        self.path = _rows_file(out, part)
        self.part = part

    def add(self, **row) -> None:
        full = {c: row.get(c, "") for c in COLUMNS}
        full["part"] = self.part
        with self.path.open("a") as f:
            f.write(json.dumps(full) + "\n")
        print(f"[{self.part}] " + ", ".join(f"{k}={v}" for k, v in full.items() if v != ""),
              flush=True)  # fmt: skip


def measure(step, device, *, max_repeats: int = 10, min_total_s: float = 0.3, slow_s: float = 5):
    """(median ms, peak MB above the memory in use before a step, repeats) of ``step()``.

    One untimed warm-up step (compilation, graph capture); a warm-up over ``slow_s`` seconds
    counts as the only (timed) step. Then steps until ``max_repeats`` or, past 3, until they add
    up to ``min_total_s``. Peak memory from torch's allocator on CUDA (NaN on CPU). Each step
    is timed by :func:`smnn.timing.timed_call` (synchronised on CUDA).
    """
    import torch

    from smnn.timing import timed_call

    warm, _ = timed_call(step, device)
    if warm > slow_s:
        return 1e3 * warm, math.nan, 1
    peak = math.nan
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: list[float] = []
    while len(times) < max_repeats and (
        len(times) < min(3, max_repeats) or sum(times) < min_total_s
    ):
        times.append(timed_call(step, device)[0])
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / MB
    return 1e3 * statistics.median(times), peak, len(times)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _load_catalog():
    """:mod:`smnn.benchmark.catalog` loaded from its file: the package's ``__init__`` pulls in
    the report and figure modules (pandas, matplotlib), which a bare GPU image lacks."""
    name = "_gpu_check_catalog"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "smnn/benchmark/catalog.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_peer(path: str):
    """The authors' ``ode_forward`` from their ``smnn.py`` (a private module name, its folder
    appended to sys.path)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"--peer {path}: no such file")
    sys.path.append(str(file.parent))
    spec = importlib.util.spec_from_file_location("_gpu_check_peer", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "ode_forward"):
        raise AttributeError(f"--peer {path}: the file has no function ode_forward")
    return module.ode_forward


def _device(args):
    import torch

    if args.cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke")
    return torch.device("cuda")


def _triton_solve(c, b, u0, h, central=False, method="sequential"):
    """u from the Triton engine (the entry point behind ``ode_forward(backend='triton')``):
    ``method`` 'sequential' (the normal equations) or 'qr' (the orthogonal sweep)."""
    from smnn.solver.inputs import prepare_problem
    from smnn.solver.triton_engine import triton_ode_forward

    problem = prepare_problem(c, b, u0, h, None, None, False)
    return triton_ode_forward(problem, (1.0, 1.0, 1.0), False, True, central, method)


def _triton_qr_solve(c, b, u0, h):
    """u from the Triton engine's QR sweep (``ode_forward(backend='triton', method='qr')``)."""
    return _triton_solve(c, b, u0, h, method="qr")


# ------------------------------------------------------------------ part: tests


def part_tests(args, rows: Rows) -> None:
    if importlib.util.find_spec("pytest") is None:
        rows.add(case="cuda-marked tests", status="skipped", note="pytest is not installed here")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           str(ROOT / "tests/test_triton.py")]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t0
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    status = "ok" if proc.returncode in (0, 5) else "failed"  # 5: nothing collected/selected
    rows.add(case="cuda-marked tests", status=status, time_ms=round(1e3 * took),
             note=summary.replace("=", "").strip())  # fmt: skip
    if status == "failed":
        (args.out / "tests_output.txt").write_text(proc.stdout + proc.stderr)


# ------------------------------------------------------------------ part: solver


def _solver_methods(args):
    """name -> solve(c, b, u0, h) for the solver part."""
    from smnn import ode_forward
    from smnn.solver.api import METHODS as SOLVER_METHODS

    methods = {
        "triton": _triton_solve,
        "triton_qr": _triton_qr_solve,
        "torch_graphs": lambda c, b, u0, h: ode_forward(
            c, b, u0, h, backend="torch", method="sequential", prefer_cuda_graph=True
        ),
        "cyclic": lambda c, b, u0, h: ode_forward(c, b, u0, h, backend="torch", method="cyclic"),
    }
    if "qr" in SOLVER_METHODS:
        methods["qr"] = lambda c, b, u0, h: ode_forward(c, b, u0, h, backend="torch", method="qr")
    if args.peer:
        peer = _load_peer(args.peer)
        methods["authors"] = lambda c, b, u0, h: peer(c, b, u0, h)
    return methods


def _shapes(args):
    catalog = _load_catalog()
    # smallest first (B*T*D): when the part runs out of time, the biggest shapes are the ones cut
    shapes = sorted(catalog.NAMED_SHAPES, key=lambda s: s.B * s.T * s.D)
    if args.cpu_smoke:  # the interpreter runs about a second per step: few, tiny shapes
        shapes = [
            catalog.Shape(s.case, s.group, 2, 6, s.D, s.R, full_B=s.B)
            for s in shapes
            if s.case in SMOKE_SHAPES
        ]
    return catalog, shapes


def part_solver(args, rows: Rows) -> None:
    import torch

    from smnn.timing import release

    device = _device(args)
    catalog, shapes = _shapes(args)
    methods = _solver_methods(args)
    from smnn import ode_forward

    for shape in shapes:
        base = dict(case=shape.case, B=shape.B, T=shape.T, D=shape.D, R=shape.R)
        inputs64 = catalog.make_inputs(shape, torch.float64, device)
        with torch.no_grad():
            ref = ode_forward(*inputs64, backend="torch", method="cyclic")
        del inputs64
        for dtype in (torch.float32, torch.float64):
            inputs = catalog.make_inputs(shape, dtype, device)
            weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(
                device, dtype
            )
            for name, solve in methods.items():
                row = dict(base, method=name, dtype=str(dtype).removeprefix("torch."))

                def step(solve=solve, inputs=inputs, weight=weight):
                    for x in inputs:
                        x.grad = None
                    u = solve(*inputs)
                    (u * weight).sum().backward()
                    return u

                try:
                    with torch.no_grad():
                        u = solve(*(x.detach() for x in inputs))
                    err = float((u.double() - ref).abs().max() / ref.abs().max())
                    del u
                    ms, peak, n = measure(
                        step, device, max_repeats=args.repeats, slow_s=args.slow_s
                    )
                    rows.add(**row, status="ok", time_ms=round(ms, 3), peak_mb=round(peak, 1),
                             rel_err=f"{err:.2e}", repeats=n)  # fmt: skip
                except Exception as exc:  # recorded, the part goes on
                    status = "out_of_memory" if _is_oom(exc) else "failed"
                    rows.add(**row, status=status, note=f"{type(exc).__name__}: {exc}"[:300])
                release(device)
            del inputs


# ------------------------------------------------------------------ part: sst


def part_sst(args, rows: Rows) -> None:
    """The solver's step at the SST study's sizes: S-MNN (as users call it on this device, and
    the Triton engine) and MNN dense. MNN dense runs until the allocator refuses it."""
    import torch

    from smnn import ode_forward
    from smnn.memory import solver_step_bytes
    from smnn.solver.registry import solver_info
    from smnn.timing import release

    device = _device(args)
    catalog = _load_catalog()
    lengths = (8, 16) if args.cpu_smoke else SST_LENGTHS
    batch = 4 if args.cpu_smoke else SST_BATCH
    dtype = torch.float32  # sst.train.dtype of config/paper.yaml
    dense = solver_info("mnn_dense").function
    solvers = {
        # ode_forward as users call it (float32 'auto': the QR sweep, on Triton where it runs)
        "smnn": lambda c, b, u0, h: ode_forward(c, b, u0, h),
        # the normal equations on Triton
        "smnn_triton": _triton_solve,
        "mnn_dense": dense,
    }
    gone: set[str] = set()
    for T in lengths:
        shape = catalog.Shape(f"sst_T{T}", "sst", batch, T, 1, 3)
        predicted = solver_step_bytes("mnn_dense", batch, T, 1, 3, dtype) / MB
        for name, solve in solvers.items():
            row = dict(case=shape.case, method=name, dtype="float32", B=batch, T=T, D=1, R=3)
            if name in gone:
                rows.add(**row, status="skipped", note=f"{name} was too slow or out of memory "
                         "at a shorter length")  # fmt: skip
                continue
            try:
                inputs = catalog.make_inputs(shape, dtype, device)

                def step(solve=solve, inputs=inputs):
                    for x in inputs:
                        x.grad = None
                    u = solve(*inputs)
                    u.square().mean().backward()

                ms, peak, n = measure(
                    step, device, max_repeats=min(5, args.repeats), slow_s=args.slow_s
                )
                note = f"predicted dense memory {predicted:.0f} MB" if name == "mnn_dense" else ""
                rows.add(**row, status="ok", time_ms=round(ms, 3), peak_mb=round(peak, 1),
                         repeats=n, note=note)  # fmt: skip
                if ms > 1e3 * args.slow_s:
                    gone.add(name)
            except Exception as exc:
                oom = _is_oom(exc)
                rows.add(**row, status="out_of_memory" if oom else "failed",
                         note=(f"predicted {predicted:.0f} MB; " if oom else "")
                         + f"{type(exc).__name__}: {exc}"[:250])  # fmt: skip
                gone.add(name)
            finally:
                inputs = None
                release(device)


# ------------------------------------------------------------------ part: train


def _paper_config(smoke: bool):
    import yaml

    from smnn.config import Config

    data = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    if smoke:  # tiny sizes, same code
        data["lorenz"]["model"].update(hidden=16, latent=4)
        data["lorenz"]["train"]["batch_size"] = 4
        data["sst"]["model"].update(window=24, n_dct=6, encoder_hidden=16, decoder_hidden=16,
                                    encoder_layers=2)  # fmt: skip
        data["sst"]["train"]["batch_size"] = 2
        data["sst"]["evaluate"].update(encode_weeks=24, forecast_weeks=24)
        data["kdv"]["model"].update(base_filters=4, n_blocks=2, init_hidden=4)
        data["kdv"]["train"]["batch_size"] = 2
    return Config(data, "config/paper.yaml" + (" (cpu smoke sizes)" if smoke else ""))


def _lorenz_step(config, device):
    import torch

    from smnn.experiments.lorenz.settings import LorenzSettings
    from smnn.experiments.lorenz.tasks import LorenzTask

    s = LorenzSettings.from_config(config)
    g = torch.Generator().manual_seed(0)
    windows = torch.randn(s.batch_size, s.data.window, 3, generator=g, dtype=torch.float64)
    task = LorenzTask(s, windows, "smnn", device)
    return task, s.batch_size


def _sst_step(config, device):
    import torch

    from smnn.data.windows import RowPartners
    from smnn.experiments.sst.settings import SstSettings
    from smnn.experiments.sst.tasks import MiTask, PairSampler

    s = SstSettings.from_config(config)
    grid = (4, 16)
    g = torch.Generator().manual_seed(0)
    series = torch.randn(2 * s.window, grid[0] * grid[1], generator=g, dtype=torch.float64)
    sampler = PairSampler(
        series.to(device=device, dtype=s.torch_dtype),
        RowPartners(grid, s.neighbour_offsets),
        s.window,
        s.batch_size,
    )
    torch.manual_seed(s.seed)
    return MiTask(s, sampler, None, "smnn", device), s.batch_size


def _kdv_step(config, device):
    import torch

    from smnn.experiments.kdv.settings import KdvSettings
    from smnn.experiments.kdv.tasks import KdvTask

    s = KdvSettings.from_config(config)
    n_x = config.get_int("kdv.generate.n_x")
    g = torch.Generator().manual_seed(0)
    steps = 2 * s.window + 8
    train = torch.randn(4, steps, n_x, generator=g, dtype=torch.float64)
    valid = torch.randn(2, steps, n_x, generator=g, dtype=torch.float64)
    train, valid = (x.to(device=device, dtype=s.torch_dtype) for x in (train, valid))
    torch.manual_seed(0)
    return KdvTask(s, train, valid, "smnn"), s.batch_size


def _importer(exc: BaseException) -> str:
    """' (at smnn/x.py:N)': the last frame of the package in the traceback."""
    import traceback

    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT / "smnn") in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).relative_to(ROOT)}:{f.lineno})"


def part_train(args, rows: Rows) -> None:
    import torch

    from smnn.timing import release

    device = _device(args)
    config = _paper_config(args.cpu_smoke)
    for name, build in (("lorenz", _lorenz_step), ("sst", _sst_step), ("kdv", _kdv_step)):
        row = dict(case=f"{name} paper config", method="smnn")
        try:
            task, batch = build(config, device)
            optimizer, _ = task.configure_optimizers()
            indices = torch.arange(batch)

            def step(task=task, optimizer=optimizer, indices=indices):
                optimizer.zero_grad(set_to_none=True)
                loss, _ = task.training_step(indices)
                loss.backward()
                optimizer.step()

            ms, peak, n = measure(
                step, device, max_repeats=min(5, args.repeats), slow_s=args.slow_s
            )
            dtype = next(task.model.parameters()).dtype
            rows.add(**row, dtype=str(dtype).removeprefix("torch."), B=batch, status="ok",
                     time_ms=round(ms, 3), peak_mb=round(peak, 1), repeats=n,
                     note="synthetic data; peak above model and inputs")  # fmt: skip
        except ImportError as exc:
            rows.add(**row, status="skipped", note=f"import failed: {exc}{_importer(exc)}"[:300])
        except Exception as exc:
            status = "out_of_memory" if _is_oom(exc) else "failed"
            rows.add(**row, status=status, note=f"{type(exc).__name__}: {exc}"[:300])
        release(device)


# ------------------------------------------------------------------ part: kdv


def rollout_nmse(predict, window: int, truth, batch_size: int):
    """(NMSE, per-trajectory NMSE (N,)) of an autoregressive rollout from the first ``window``
    steps of ``truth`` ``(N, T, n_x)``: the protocol and metric of
    :mod:`smnn.experiments.kdv.evaluation` (which also draws figures, so it imports
    matplotlib, absent from a bare GPU image; tests/test_gpu_check.py holds the two equal).
    ``predict`` maps ``(B, window, n_x)`` to ``(B, window, n_x)``, its first step being the
    last input step. Each call adds ``window - 1`` steps (the last call clipped); the NMSE of a
    step is sum_x (pred - true)^2 / sum_x true^2, averaged over trajectories, then over the
    predicted steps."""
    import numpy as np

    N, T, _ = truth.shape
    out = []
    for batch in truth.split(batch_size):
        pred = batch.clone()
        first = window
        while first < T:
            n_new = min(window - 1, T - first)
            y = predict(pred[:, first - window : first])
            pred[:, first : first + n_new] = y[:, 1 : 1 + n_new]
            first += n_new
        out.append(pred.double().cpu().numpy())
    p = np.concatenate(out)[:, window:]
    t = truth.double().cpu().numpy()[:, window:]
    nmse = np.sum((p - t) ** 2, axis=2) / np.sum(t**2, axis=2)  # (N, T - window)
    return float(nmse.mean(axis=0).mean()), nmse.mean(axis=1)


def part_kdv(args, rows: Rows) -> None:
    """:func:`kdv_fixed_budget`, its failure recorded as a row."""
    try:
        kdv_fixed_budget(args, rows)
    except Exception as exc:
        status = "out_of_memory" if _is_oom(exc) else "failed"
        rows.add(case="kdv paper config, fixed-budget training", method="smnn", status=status,
                 note=f"{type(exc).__name__}: {exc}{_importer(exc)}"[:300])  # fmt: skip


def kdv_fixed_budget(args, rows: Rows) -> None:
    """The KdV model at the paper config, trained for a fixed time on freshly generated
    trajectories (the pipeline's seeded generator), then rolled out over
    :data:`KDV_ROLLOUT_STEPS` steps on test trajectories: the NMSE beside the authors'."""
    import numpy as np
    import torch

    from smnn.data.kdv.generate import KdvGenerateSettings, regenerate
    from smnn.experiments.kdv.settings import KdvSettings
    from smnn.experiments.kdv.tasks import KdvTask
    from smnn.timing import sync

    device = _device(args)
    start = time.perf_counter()
    config = _paper_config(args.cpu_smoke)
    s = KdvSettings.from_config(config)
    gen = KdvGenerateSettings.from_config(config)
    n_train, n_test = (4, 2) if args.cpu_smoke else (256, 32)
    data = {
        split: torch.from_numpy(regenerate(gen, split, list(range(n)))).to(device, s.torch_dtype)
        for split, n in (("train", n_train), ("valid", 2), ("test", n_test))
    }
    generated_s = time.perf_counter() - start
    task = KdvTask(s, data["train"], data["valid"], "smnn")
    optimizer, _ = task.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    # train until the part's time is nearly spent (a reserve kept for the rollout and the row)
    train_s = max(2.0, args.part_seconds - (time.perf_counter() - start) - args.kdv_reserve_s)
    if args.cpu_smoke:
        train_s = min(train_s, 5.0)
    steps, t0 = 0, time.perf_counter()
    task.model.train()
    while time.perf_counter() - t0 < train_s:
        indices = torch.randint(0, task.n_samples, (task.batch_size,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.training_step(indices)
        loss.backward()
        optimizer.step()
        steps += 1
    sync(device)
    trained_s = time.perf_counter() - t0
    task.model.eval()
    w = s.window
    n_steps = w + KDV_ROLLOUT_STEPS
    truth = data["test"][:, :n_steps]
    with torch.no_grad():
        nmse, per_trajectory = rollout_nmse(task.model.predict, w, truth, task.batch_size)
    epochs = steps * task.batch_size / task.n_samples
    rows.add(
        case=f"kdv paper config, {trained_s:.0f} s of training",
        method="smnn",
        dtype=str(s.torch_dtype).removeprefix("torch."),
        B=task.batch_size,
        status="ok",
        time_ms=round(1e3 * trained_s / max(steps, 1), 3),
        repeats=steps,
        metric=f"nmse{KDV_ROLLOUT_STEPS}={nmse:.4g}",
        note=(
            f"time_ms: mean training step; {steps} steps ({epochs:.2f} epochs of {n_train} "
            f"generated trajectories, {generated_s:.0f} s to generate); rollout NMSE over "
            f"{KDV_ROLLOUT_STEPS} steps on {n_test} test trajectories {nmse:.4g} (median "
            f"trajectory {float(np.median(per_trajectory)):.4g}); the authors' notebook: "
            f"{KDV_AUTHORS_NMSE} after 10 epochs of 512 trajectories on an RTX A6000"
        ),
    )


PART_FUNCTIONS = {
    "tests": part_tests,
    "solver": part_solver,
    "sst": part_sst,
    "train": part_train,
    "kdv": part_kdv,
}


# ------------------------------------------------------------------ the driver


def _environment(args) -> dict[str, str]:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["device"] = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
        )
    except ImportError as exc:
        env["torch"] = f"missing ({exc})"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"missing ({exc})"
    env["mode"] = "cpu smoke (tiny sizes, Triton interpreter)" if args.cpu_smoke else "GPU"
    return env


def _child_command(args, part: str, seconds: float) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), str(args.out), "--part", part,
           "--slow-s", str(args.slow_s), "--part-seconds", str(seconds)]  # fmt: skip
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    if args.peer:
        cmd += ["--peer", args.peer]
    if args.block:
        cmd += ["--block", ",".join(args.block)]
    return cmd


def _child_env(args) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if args.cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_parts(args) -> dict[str, dict]:
    """Run each part in a subprocess within the budget; returns part -> status."""
    start = time.perf_counter()
    status: dict[str, dict] = {}
    parts = [p for p in PARTS if p in args.parts]
    for i, part in enumerate(parts):
        left = args.budget - (time.perf_counter() - start)
        later = sum(SHARES[p] for p in parts[i + 1 :])
        share = left if not later else min(left, args.budget * SHARES[part])
        share = max(0.0, share)
        _rows_file(args.out, part).unlink(missing_ok=True)
        if share < 5:
            status[part] = {"status": "skipped", "seconds": 0, "note": "no time left in budget"}
            continue
        t0 = time.perf_counter()
        log = (args.out / f"log_{part}.txt").open("w")
        try:
            proc = subprocess.run(_child_command(args, part, share), env=_child_env(args), cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=share)  # fmt: skip
            state = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
            note = "" if proc.returncode == 0 else _tail(args.out / f"log_{part}.txt")
        except subprocess.TimeoutExpired:
            state, note = "timed out", f"stopped after {share:.0f} s (its rows so far are kept)"
        finally:
            log.close()
        status[part] = {"status": state, "seconds": round(time.perf_counter() - t0, 1),
                        "note": note}  # fmt: skip
        print(f"part {part}: {state} in {status[part]['seconds']} s", flush=True)
    return status


def _tail(path: Path, n: int = 400) -> str:
    text = path.read_text(errors="replace").strip()
    return text[-n:].replace("\n", " | ")


def read_rows(out: Path) -> list[dict]:
    rows = []
    for part in PARTS:
        f = _rows_file(out, part)
        if f.exists():
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def write_csv(out: Path, rows: list[dict]) -> Path:
    import csv

    path = out / "gpu_check.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return lines


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def sst_comparison(rows: list[dict]) -> list[str]:
    """The paper's SST figures beside this run's (S-MNN on Triton against MNN dense)."""
    sst = [r for r in rows if r["part"] == "sst"]
    by = {(r["method"], int(r["T"])): r for r in sst}
    lines = []
    L = PAPER["length"]
    d = by.get(("mnn_dense", L))
    for method in ("smnn", "smnn_triton"):
        s = by.get((method, L))
        if s and d and s["status"] == d["status"] == "ok":
            speed = _num(d["time_ms"]) / _num(s["time_ms"])
            mem = _num(s["peak_mb"]) / _num(d["peak_mb"])
            lines.append(f"- at {L} weeks: {method} is {speed:.3g}x faster than MNN dense "
                         f"(paper: {PAPER['speedup']}x) and uses {mem:.3g} of its memory "
                         f"(paper: {PAPER['memory_ratio']})")  # fmt: skip
        elif sst:
            lines.append(f"- at {L} weeks: no ratio for {method} ({s and s['status']}; MNN "
                         f"dense {d and d['status']})")  # fmt: skip
    oom = sorted(int(r["T"]) for r in sst if r["method"] == "mnn_dense"
                 and r["status"] == "out_of_memory")  # fmt: skip
    ok = sorted(int(r["T"]) for r in sst if r["method"] == "mnn_dense" and r["status"] == "ok")
    if sst:
        lines.append(f"- MNN dense ran at {ok or 'no length'} weeks and was out of memory at "
                     f"{oom or 'no length'} (paper: out of memory beyond "
                     f"{PAPER['dense_oom_beyond']} weeks on an 80 GB GPU)")  # fmt: skip
    return lines


def write_markdown(out: Path, env: dict, status: dict, rows: list[dict], args) -> Path:
    lines = ["# GPU check", "", "Command: `PYTHONPATH=. python scripts/gpu_check.py "
             + " ".join(sys.argv[1:]) + "`", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        "",
        "## Parts",
        "",
        *_table(
            [{"part": p, **s} for p, s in status.items()], ["part", "status", "seconds", "note"]
        ),
    ]
    titles = {
        "tests": "CUDA-marked tests",
        "solver": "Named shapes, forward + backward",
        "sst": "SST long-sequence study (solver step)",
        "train": "Training steps",
        "kdv": "KdV: fixed-budget training and rollout",
    }
    for part in PARTS:
        part_rows = [r for r in rows if r["part"] == part]
        if not part_rows:
            continue
        cols = [c for c in COLUMNS if c != "part" and any(r.get(c) != "" for r in part_rows)]
        lines += ["", f"## {titles[part]}", "", *_table(part_rows, cols)]
        if part == "sst":
            lines += ["", *sst_comparison(rows)]
    lines += [
        "",
        "Times: medians of steps between device synchronisations, in ms; peak_mb: "
        "peak allocated memory above what was allocated before the step (CUDA only); "
        "rel_err: max |u - u64| / max |u64| against a float64 solve by cyclic reduction.",
    ]
    path = out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.csv and gpu_check.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--peer", help="path to the authors' smnn.py (their ode_forward)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="total seconds for all parts (default 450; 300 with --cpu-smoke)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {PARTS}")
    parser.add_argument("--slow-s", type=float, default=None,
                        help="a step slower than this is timed once and the method stops "
                        "growing (default 10 s; 20 s with --cpu-smoke)")  # fmt: skip
    parser.add_argument("--block", default="", help="modules to refuse (emulate a bare image)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--kdv-reserve-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.block = [m for m in args.block.split(",") if m]
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    if args.budget is None:
        args.budget = 300.0 if args.cpu_smoke else 450.0
    if args.slow_s is None:
        args.slow_s = 20.0 if args.cpu_smoke else 10.0
    args.repeats = 1 if args.cpu_smoke else 10
    if args.kdv_reserve_s is None:  # the rollout and the row after the training (kdv part)
        args.kdv_reserve_s = 15.0 if args.cpu_smoke else 25.0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:  # a child: one part
        _block(args.block + (["numba"] if args.cpu_smoke else []))
        PART_FUNCTIONS[args.part](args, Rows(args.out, args.part))
        return 0
    _block(args.block)
    status = run_parts(args)
    rows = read_rows(args.out)
    write_csv(args.out, rows)
    md = write_markdown(args.out, _environment(args), status, rows, args)
    print(f"wrote {args.out / 'gpu_check.csv'} and {md}")
    return 0 if all(s["status"] == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
