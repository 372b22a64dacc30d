"""The benchmark's tables: the tidy CSV, the comparison against the best S-MNN method, the floors
and the markdown report.

``bench.csv``: one row per method x dtype x case (columns :data:`TABLE_COLUMNS`). Besides the
measurement (:mod:`smnn.benchmark.measure`) every row says how it compares with the fastest
S-MNN method (family ``smnn``) of the same case and dtype: ``best_smnn_method``,
``time_vs_best_smnn`` (this median / that median; for a peer such as the authors' solver, the
factor by which the best S-MNN method is faster) and ``memory_vs_best_smnn`` (this peak / that
method's peak; NaN when that peak rounds to 0 MB).

Accuracy: ``error_median`` and ``error_max`` of a row are the median and the maximum over the
batch of each system's max relative error of u against the float64 reference solve
(:mod:`smnn.benchmark.accuracy`), for the methods that compute the S-MNN function (families
``smnn`` and ``peer``), measured on the warm-up step's solution; ``max_ms`` is the slowest timed
step.

``floors.csv``: per named shape and dtype measured with an S-MNN method on a CPU, the floor of
:mod:`smnn.roofline` on this machine, the best S-MNN time and their ratio. Always written (only
its header when no row applies, e.g. on CUDA), so the workflow can declare it.

``bench.md``: one table per shape group (rows shapes, columns method/dtype with ms, MB and the
median error), the accuracy of every method per named shape and dtype (median and max error
beside the time), the side-by-side comparison (every method that is not S-MNN against the best
S-MNN method, per shape) with the check of docs/solver.md, "Complexity and performance targets"
(best S-MNN at least :data:`PEER_TARGET` x faster than each peer on every named shape), and the
floors.

Non-convergence is marked wherever a method's numbers appear: a row whose CG solves stopped at
the iteration cap (column ``converged`` False: ``mnn_cg``) has ``(not converged)`` in its cell,
and its method is named ``mnn_cg (not converged)`` (:func:`smnn.solver.mnn.convergence_label`)
in the column headers, the accuracy table and the side-by-side comparison.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from smnn.benchmark.catalog import DTYPES, NAMED_SHAPES
from smnn.benchmark.measure import COLUMNS, MB
from smnn.plotting import QUICK_NOTE
from smnn.solver.mnn import NOT_CONVERGED, converged_flag, convergence_label

__all__ = [
    "TABLE_COLUMNS",
    "FLOOR_COLUMNS",
    "PEER_TARGET",
    "make_table",
    "floor_table",
    "markdown_report",
    "method_label",
]

TABLE_COLUMNS = [*COLUMNS, "best_smnn_method", "time_vs_best_smnn", "memory_vs_best_smnn"]
FLOOR_COLUMNS = [
    "case",
    "dtype",
    "B",
    "T",
    "D",
    "R",
    "mb_moved",
    "mflop",
    "bandwidth_gb_s",
    "gflops",
    "floor_ms",
    "best_method",
    "best_ms",
    "ratio",
]
# docs/solver.md, "Complexity and performance targets": at least 10x faster than the authors' solver
PEER_TARGET = 10.0


def make_table(rows: Sequence[dict]):
    """The rows of :func:`smnn.benchmark.measure.run_grid` as a DataFrame with the comparison
    columns (module docstring)."""
    import pandas as pd

    table = pd.DataFrame(list(rows), columns=COLUMNS)
    best_method, time_ratio, memory_ratio = [], [], []
    ok = table[(table["status"] == "ok") & (table["family"] == "smnn")]
    best = {
        key: part.loc[part["median_ms"].idxmin()]
        for key, part in ok.groupby(["case", "dtype"], sort=False)
    }
    for _, r in table.iterrows():
        b = best.get((r["case"], r["dtype"]))
        if b is None or r["status"] != "ok":
            best_method.append(b["method"] if b is not None else "")
            time_ratio.append(math.nan)
            memory_ratio.append(math.nan)
            continue
        best_method.append(b["method"])
        time_ratio.append(r["median_ms"] / b["median_ms"])
        memory_ratio.append(r["peak_mb"] / b["peak_mb"] if b["peak_mb"] > 0 else math.nan)
    table["best_smnn_method"] = best_method
    table["time_vs_best_smnn"] = time_ratio
    table["memory_vs_best_smnn"] = memory_ratio
    return table


# --------------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------------


def floor_table(table, device: torch.device, quick: bool):
    """Per named shape and dtype measured with an S-MNN method: the floor of
    :mod:`smnn.roofline` on this machine, the best S-MNN time and their ratio (no rows when no
    such measurement exists or the device is not a CPU: the rates are measured on the CPU)."""
    import pandas as pd

    from smnn.roofline import floor_ms, measure_machine_rates, solver_step_cost

    ours = table[
        (table["group"] == "named") & (table["status"] == "ok") & (table["family"] == "smnn")
    ]
    if ours.empty or device.type != "cpu":
        return pd.DataFrame(columns=FLOOR_COLUMNS)
    rows = []
    for name, part in ours.groupby("dtype", sort=False):
        dtype = DTYPES[name]
        if quick:
            rates = measure_machine_rates(dtype, stream_mb=64, matmul_n=512, repeats=3)
        else:
            rates = measure_machine_rates(dtype)
        for case, rs in part.groupby("case", sort=False):
            best = rs.loc[rs["median_ms"].idxmin()]
            cost = solver_step_cost(
                int(best["B"]), int(best["T"]), int(best["D"]), int(best["R"]), dtype.itemsize
            )
            floor = floor_ms(cost, rates)
            rows.append(
                {
                    "case": case,
                    "dtype": name,
                    "B": int(best["B"]),
                    "T": int(best["T"]),
                    "D": int(best["D"]),
                    "R": int(best["R"]),
                    "mb_moved": cost.bytes / MB,
                    "mflop": cost.flops / 1e6,
                    "bandwidth_gb_s": rates.bandwidth / 1e9,
                    "gflops": rates.flop_rate / 1e9,
                    "floor_ms": floor,
                    "best_method": best["method"],
                    "best_ms": float(best["median_ms"]),
                    "ratio": float(best["median_ms"]) / floor,
                }
            )
    return pd.DataFrame(rows, columns=FLOOR_COLUMNS)


def _floor_lines(floors) -> list[str]:
    lines = [
        "",
        "## Floors (smnn.roofline)",
        "",
        "Unavoidable data movement and arithmetic of one forward+backward step over the "
        "machine's measured streaming bandwidth and matrix-multiply rate; the floor is the "
        "larger of the two times, the ratio is the best S-MNN method's median over it.",
        "",
        "| case | dtype | MB moved | MFLOP | GB/s | GFLOP/s | floor ms | best method | best ms "
        "| best / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in floors.iterrows():
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['mb_moved']:.4g} | {r['mflop']:.4g} | "
            f"{r['bandwidth_gb_s']:.3g} | {r['gflops']:.3g} | {r['floor_ms']:.3g} | "
            f"{r['best_method']} | {r['best_ms']:.4g} | {r['ratio']:.1f}x |"
        )
    return lines


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _error_text(row) -> str:
    value = row.get("error_median", math.nan)
    return "" if value is None or value != value else f"err {value:.1e}"


def _not_converged(row) -> bool:
    """Whether the row's solves stopped before converging (column ``converged`` False)."""
    return converged_flag(row.get("converged")) is False


def method_label(table, method: str) -> str:
    """``method`` as the tables and figures name it: ``mnn_cg (not converged)`` when any of
    its rows in ``table`` did not converge."""
    rows = table[table["method"] == method]
    unconverged = "converged" in rows and any(converged_flag(c) is False for c in rows["converged"])
    return convergence_label(method, False if unconverged else None)


def _cell(row) -> str:
    error = _error_text(row)
    if row["status"] != "ok":
        return f"{row['status']} ({error})" if error else row["status"]
    text = f"{row['median_ms']:.4g} ms, {row['peak_mb']:.4g} MB"
    text = f"{text}, {error}" if error else text
    return f"{text} ({NOT_CONVERGED})" if _not_converged(row) else text


def _accuracy_lines(table, reference: str) -> list[str]:
    """Per named shape, dtype and method: time, median and max error (families smnn, peer)."""
    part = table[(table["group"] == "named") & table["error_median"].notna()]
    if part.empty:
        return []
    lines = [
        "",
        "## Accuracy on the named shapes",
        "",
        f"Error against the float64 {reference} solve of the same problem: per system, max |u - "
        "u_ref| / max |u_ref| over every step, state and order; median and max over the batch "
        "(float32 inputs are the float64 problem rounded). Time: median forward+backward step.",
        "",
        "| case | B | dtype | method | time ms | error (median) | error (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in part.iterrows():
        time = f"{r['median_ms']:.4g}" if r["status"] == "ok" else r["status"]
        lines.append(
            f"| {r['case']} | {r['B']} | {r['dtype']} | "
            f"{convergence_label(r['method'], r.get('converged'))} | {time} | "
            f"{r['error_median']:.2e} | {r['error_max']:.2e} |"
        )
    return lines


def _ratio(value: float) -> str:
    return "" if value != value else f"{value:.3g}x"  # NaN -> empty


def _comparison_lines(table) -> list[str]:
    """Every method that is not S-MNN against the best S-MNN method, per case and dtype."""
    others = list(dict.fromkeys(table.loc[table["family"] != "smnn", "method"]))
    compared = table[table["best_smnn_method"].astype(str) != ""]
    if not others or compared.empty:
        return []
    lines = [
        "",
        "## Side by side: against the best S-MNN method",
        "",
        "Same inputs, same process, forward+backward. Each cell: time / best S-MNN time and "
        "peak memory / its peak memory (how many times faster and smaller the best S-MNN "
        "method is).",
        "",
    ]
    header = ["case", "dtype", "B", "best S-MNN", *(method_label(table, m) for m in others)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for (case, dtype), rows in compared.groupby(["case", "dtype"], sort=False):
        first = rows.iloc[0]
        best = rows[rows["method"] == first["best_smnn_method"]].iloc[0]
        cells = [
            case,
            dtype,
            str(first["B"]),
            f"{best['method']} {best['median_ms']:.4g} ms, {best['peak_mb']:.4g} MB",
        ]
        for m in others:
            match = rows[rows["method"] == m]
            if match.empty:
                cells.append("")
            elif match.iloc[0]["status"] != "ok":
                cells.append(match.iloc[0]["status"])
            else:
                r = match.iloc[0]
                cells.append(
                    f"time {_ratio(r['time_vs_best_smnn'])}, "
                    f"memory {_ratio(r['memory_vs_best_smnn'])}"
                    + (f" ({NOT_CONVERGED})" if _not_converged(r) else "")
                )
        lines.append("| " + " | ".join(cells) + " |")
    lines += _target_lines(table)
    return lines


def _target_lines(table) -> list[str]:
    """The peer target of docs/solver.md, "Complexity and performance targets" on the named shapes,
    per peer and dtype."""
    peers = list(dict.fromkeys(table.loc[table["family"] == "peer", "method"]))
    named = [s.case for s in NAMED_SHAPES]
    lines = []
    for peer in peers:
        for dtype in dict.fromkeys(table["dtype"]):
            part = table[
                (table["method"] == peer) & (table["dtype"] == dtype) & table["case"].isin(named)
            ]
            if part.empty:
                continue
            measured = part[part["time_vs_best_smnn"].notna()]
            missing = [case for case in named if case not in set(measured["case"])]
            scaled = bool((measured["B"] != measured["full_B"]).any())
            if measured.empty:
                verdict = "not measured"
            else:
                worst = measured.loc[measured["time_vs_best_smnn"].idxmin()]
                met = bool((measured["time_vs_best_smnn"] >= PEER_TARGET).all())
                verdict = (
                    f"{'met' if met else 'NOT met'} (smallest: "
                    f"{worst['time_vs_best_smnn']:.3g}x on {worst['case']})"
                )
            extra = f"; not measured: {', '.join(missing)}" if missing else ""
            extra += "; batch scaled (quick), not the published shapes" if scaled else ""
            lines.append(
                f"- Target: best S-MNN at least {PEER_TARGET:g}x faster than {peer} "
                f"on every named shape, {dtype}: {verdict}{extra}."
            )
    return [""] + lines if lines else []


def _note_lines(part) -> list[str]:
    """The rows' notes, each note once with the rows it applies to (the batch scaling of quick
    mode is in the B column instead: "81 (of 1536)")."""
    grouped: dict[str, list[str]] = {}
    for _, r in part.iterrows():
        note = re.sub(r"^quick: batch scaled from \d+(; )?", "", str(r["note"]))
        if note:
            grouped.setdefault(note, []).append(f"{r['method']} {r['dtype']} {r['case']}")
    if not grouped:
        return []
    return ["", "Notes:", *(f"- {', '.join(rows)}: {note}" for note, rows in grouped.items())]


def _machine_line(machine: Mapping[str, Any]) -> str:
    start, end = machine.get("load_start"), machine.get("load_end")
    if start is None:
        return ""
    cpus = machine.get("cpu_count") or 1
    line = (
        f"Machine load (1-minute load average) {start:.1f} at the start and "
        f"{end if end is not None else float('nan'):.1f} at the end, on {cpus} CPUs."
    )
    policy = machine.get("omp_wait_policy")
    if policy is not None:
        line += f" OpenMP wait policy: {policy or 'the default (spin, then sleep)'}."
    if start + (machine.get("threads") or 1) > cpus + 0.5:
        line += (
            " Other processes competed for the cores: timings (of parallel kernels above "
            "all) are inflated and noisy; rerun on a quiet machine for numbers to quote."
        )
    return line


def markdown_report(
    table,
    quick: bool = False,
    floors=None,
    machine: Mapping[str, Any] | None = None,
    reference: str = "",
    contention=None,
) -> str:
    """bench.md (module docstring) from :func:`make_table`'s table and :func:`floor_table`;
    ``machine`` (``load_start``, ``load_end``, ``cpu_count``, ``threads``) adds the load line;
    ``reference``: the method of the accuracy reference (default:
    :func:`smnn.benchmark.accuracy.reference_method`); ``contention``: the table of
    :func:`smnn.benchmark.contention.run_contention`, when measured."""
    if not reference:
        from smnn.benchmark.accuracy import reference_method

        reference = reference_method()
    if "best_smnn_method" not in table.columns:
        table = make_table(table.to_dict("records"))
    lines = ["# Solver benchmark: forward + backward", ""]
    first = table.iloc[0] if len(table) else None
    repeats = sorted({int(r) for r in table["repeats"]}) if len(table) else []
    lines.append(
        "Median wall time over the timed repeats (after a warm-up step on the same shape) and "
        "peak memory above the inputs (device "
        f"{first['device'] if first is not None else '?'}, "
        f"{first['threads'] if first is not None else '?'} threads, repeats "
        f"{'/'.join(map(str, repeats)) or '?'})."
    )
    if machine and _machine_line(machine):
        lines += ["", _machine_line(machine)]
    if quick:
        lines += [
            "",
            f"**{QUICK_NOTE}**: trimmed sweeps, named shapes with scaled batch "
            "(B column: run (of published)), short time budget.",
        ]
    columns = list(dict.fromkeys(zip(table["method"], table["dtype"], strict=True)))
    titles = {
        "named": "Named shapes (docs/solver.md, 'Complexity and performance targets')",
        "T_sweep": "Sweep over T",
        "batch_sweep": "Sweep over batch size",
    }
    for group, title in titles.items():
        part = table[table["group"] == group]
        if part.empty:
            continue
        lines += ["", f"## {title}", ""]
        header = [
            "case",
            "B",
            "T",
            "D",
            "R",
            *(f"{method_label(table, m)} {d}" for m, d in columns),
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for case in dict.fromkeys(part["case"]):
            rows = part[part["case"] == case]
            first = rows.iloc[0]
            batch = str(first["B"])
            if int(first["B"]) != int(first["full_B"]):
                batch += f" (of {first['full_B']})"
            cells = [case, batch, str(first["T"]), str(first["D"]), str(first["R"])]
            for m, d in columns:
                match = rows[(rows["method"] == m) & (rows["dtype"] == d)]
                cells.append(_cell(match.iloc[0]) if len(match) else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines += _note_lines(part)
    lines += _accuracy_lines(table, reference)
    lines += _comparison_lines(table)
    diffs = table[table["max_rel_diff_vs_smnn"].notna()]
    if not diffs.empty:
        worst = diffs.groupby(["method", "dtype"], sort=False)["max_rel_diff_vs_smnn"].max()
        lines += [
            "",
            "Agreement of each peer with S-MNN on the same inputs (largest max |u - "
            "u_smnn| / max |u_smnn| over the cases): "
            + "; ".join(f"{m} {d}: {v:.1e}" for (m, d), v in worst.items())
            + ".",
        ]
    if floors is not None and not floors.empty:
        lines += _floor_lines(floors)
    if contention is not None and len(contention):
        from smnn.benchmark.contention import contention_lines

        lines += contention_lines(contention)
    return "\n".join(lines) + "\n"
