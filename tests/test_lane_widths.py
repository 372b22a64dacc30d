"""The lane kernels at two widths, both generated from one source (smnn.solver.lane_kernels,
lane_ops): 32 lanes, and 8 lanes for calls with few systems. Both are checked against the dense
reference, and against each other bit for bit where no sum over jobs depends on the width."""

from __future__ import annotations

import ast

import pytest
import torch
from conftest import INPUT_LABELS, random_problem, rel_err

from smnn import ode_forward
from smnn.solver import fused, lane_kernels, lane_ops
from smnn.solver.reference import dense_reference


def _solve(inputs, width: int, monkeypatch, **kw):
    """u and the gradients of a weighted sum of u, with the kernels of ``width`` lanes."""
    monkeypatch.setattr(
        fused, "kernels_for", lambda N, P, threads=None: lane_kernels.kernels(width)
    )
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    u = ode_forward(*inputs, **kw)
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(3), dtype=u.dtype)
    grads = torch.autograd.grad((u * weight).sum(), inputs)
    return u.detach(), grads, inputs, weight


def test_helpers_are_generated_for_any_width():
    """Every helper of the table is spelled out lane by lane as one tuple assignment (or one
    returned tuple) over exactly ``width`` lanes; nothing else depends on the width."""
    for width in (1, 8, 32):
        source = lane_ops.helper_source(width)
        tree = ast.parse(source)
        assert f"\nLANES = {width}\n" in source
        defs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert set(lane_ops.LANE_OPS) <= set(defs)
        for name in lane_ops.LANE_OPS:
            stmt = defs[name].body[-1]
            values = stmt.value if isinstance(stmt, (ast.Assign, ast.Return)) else None
            assert isinstance(values, ast.Tuple) and len(values.elts) == width, name
            # lane k touches index k only (for the gather: index[k])
            for k, elt in enumerate(values.elts):
                lanes = {n.value for n in ast.walk(elt) if isinstance(n, ast.Constant)}
                assert lanes <= {k, 1}, (name, k, lanes)
    add = lane_ops.LANE_OPS["_add_product"].source("_add_product", 2)
    assert "(dst[0], dst[1],) = (dst[0] + a[0] * b[0], dst[1] + a[1] * b[1],)" in add
    with pytest.raises(ValueError, match="width must be a positive int"):
        lane_ops.helper_source(0)


def test_both_widths_come_from_one_source():
    narrow, wide = lane_kernels.kernels(8), lane_kernels.kernels(32)
    assert (narrow.LANES, wide.LANES) == (8, 32)
    assert lane_kernels.kernels(8) is narrow
    assert narrow._CHUNK_VALUES * 8 == wide._CHUNK_VALUES * 32  # the same bytes per chunk
    body = lane_kernels.SOURCE.read_text()
    for module in (narrow, wide):
        text = open(module.__file__).read()
        assert str(lane_ops.cache_dir()) in module.__file__
        assert text.endswith(body)
        assert lane_ops.helper_source(module.LANES, lane_kernels.OPS) in text


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SMNN_CACHE_DIR", str(tmp_path / "c"))
    assert lane_ops.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SMNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert lane_ops.cache_dir() == tmp_path / "x" / "smnn"


def test_width_choice():
    wide = lane_kernels.LANES
    assert fused.kernels_for(8, 1).LANES == 8  # few systems: 8 lanes
    assert fused.kernels_for(2 * wide - 1, 1).LANES == 8
    assert fused.kernels_for(2 * wide, 1).LANES == wide
    assert fused.kernels_for(8192, 1).LANES == wide
    assert fused.kernels_for(1, 4).LANES == 8  # one shared system, 4 columns
    assert fused.kernels_for(1, 1536).LANES == wide  # one shared system, many columns


CASES = {
    "N37_R5": dict(batch=(37,), T=9, R=5, seed=1),
    "N9_multi_state": dict(batch=(9,), T=7, E=3, D=2, R=4, S=2, K=2, seed=2),
    "N70_shared_step": dict(batch=(70,), T=6, h_time=1, seed=3),
}


@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_both_widths_match_reference_and_each_other(name, central, monkeypatch):
    pk = CASES[name]
    kw = dict(n_steps=pk["T"], n_init_var_steps=pk.get("S", 1), enable_central_smoothness=central)
    inputs = random_problem(**pk)
    u8, g8, leaves, weight = _solve(inputs, 8, monkeypatch, **kw)
    u32, g32, _, _ = _solve(inputs, lane_kernels.LANES, monkeypatch, **kw)
    ref = dense_reference(*leaves, **kw)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    tol = 1e-8 if pk.get("R", 3) >= 4 else 1e-10  # R >= 4: the dense oracle's own rounding
    assert rel_err(u32, ref) < tol
    assert torch.equal(u8, u32)
    for label, a, b, r in zip(INPUT_LABELS, g8, g32, ref_grads, strict=True):
        assert rel_err(b, r) < tol, label
        assert torch.equal(a, b), label


def test_lanes_as_columns_at_both_widths(monkeypatch):
    """One shared system, 40 right-hand sides: lanes are columns at both widths; u and the
    per-column gradients agree to the bit, the shared coefficients' and steps' gradients (sums
    over a width-dependent number of jobs) to rounding."""
    pk = dict(batch=(40,), T=8, E=2, D=2, K=2, c_batch=(1,), h_batch=(1,), seed=4)
    kw = dict(n_steps=8)
    inputs = random_problem(**pk)
    assert fused.lanes_are_columns(1, 40, 8) and fused.lanes_are_columns(1, 40, 32)
    u8, g8, leaves, weight = _solve(inputs, 8, monkeypatch, **kw)
    u32, g32, _, _ = _solve(inputs, lane_kernels.LANES, monkeypatch, **kw)
    ref = dense_reference(*leaves, **kw)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    assert torch.equal(u8, u32)
    for label, a, b, r in zip(INPUT_LABELS, g8, g32, ref_grads, strict=True):
        assert rel_err(a, r) < 1e-10 and rel_err(b, r) < 1e-10, label
        if label in ("rhs_equation", "init_vars"):
            assert torch.equal(a, b), label
        else:
            assert rel_err(a, b) < 1e-13, label
