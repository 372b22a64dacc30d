"""Optional CUDA-graph capture of the sequential solver's torch path (small batches on a GPU).

With a small batch, every one of the T sequential steps is a handful of tiny kernel launches, so
launch overhead dominates. A CUDA graph records the whole loop once per shape and replays it with
one launch. The graphs live in a :class:`CudaGraphPool` that the caller creates and passes to
``ode_forward(..., cuda_graphs=pool)``; nothing is cached globally.

Captured graphs read and write static buffers. Every result is cloned out of those buffers before
it is returned, so calling the solver twice with the same shapes before a backward pass is safe:
the second replay overwrites the static buffers, never the first call's factors or solution.
"""

from __future__ import annotations

import torch

from smnn.solver.banded import BlockTridiagonalFactor, _factor_torch, _solve_torch

__all__ = ["CudaGraphPool", "default_pool", "clear_default_pool"]


class _Graphed:
    """One captured callable: static inputs -> static outputs."""

    def __init__(self, fn, example_inputs: tuple[torch.Tensor, ...]):
        self.inputs = tuple(x.clone() for x in example_inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, kernels)
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor):
        for static, x in zip(self.inputs, args, strict=True):
            static.copy_(x)
        self.graph.replay()
        return self.outputs


def _factor_outputs(diag: torch.Tensor, sub: torch.Tensor):
    f = _factor_torch(diag, sub)
    return f.lmul, f.dchol, f.failed_at


class CudaGraphPool:
    """Caller-owned CUDA graphs of the sequential factorization and substitution, by shape.

    Args:
        max_entries: the most graphs kept (each holds its static buffers on the GPU); the
            oldest is dropped first.
    """

    def __init__(self, max_entries: int = 16):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._graphs: dict[tuple, _Graphed] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def _get(self, key: tuple, fn, inputs: tuple[torch.Tensor, ...]) -> _Graphed:
        graphed = self._graphs.get(key)
        if graphed is None:
            if len(self._graphs) >= self.max_entries:
                self._graphs.pop(next(iter(self._graphs)))
            graphed = _Graphed(fn, inputs)
            self._graphs[key] = graphed
        return graphed

    @staticmethod
    def check_device(*tensors: torch.Tensor) -> None:
        """Raise a ValueError unless every tensor is on a CUDA device."""
        for x in tensors:
            if x.device.type != "cuda":
                raise ValueError(
                    f"cuda_graphs needs CUDA tensors, got a tensor on {x.device}; "
                    "pass cuda_graphs=None on CPU"
                )

    def factorize(self, diag: torch.Tensor, sub: torch.Tensor) -> BlockTridiagonalFactor:
        """Sequential block LDL^T of ``diag`` (N, T, n, n), ``sub`` (N, T-1, n, n) by replay."""
        self.check_device(diag, sub)
        diag, sub = diag.detach().contiguous(), sub.detach().contiguous()
        key = ("factor", tuple(diag.shape), diag.dtype, diag.device)
        lmul, dchol, failed_at = self._get(key, _factor_outputs, (diag, sub))(diag, sub)
        return BlockTridiagonalFactor(lmul.clone(), dchol.clone(), failed_at.clone(), graphs=self)

    def solve(self, factor: BlockTridiagonalFactor, rhs: torch.Tensor) -> torch.Tensor:
        """Solve with ``factor`` for ``rhs`` (N, T, n, P) by replay; returns a fresh tensor."""
        self.check_device(rhs)
        rhs = rhs.contiguous()
        key = ("solve", tuple(factor.dchol.shape), tuple(rhs.shape), rhs.dtype, rhs.device)

        def solve(lmul, dchol, r):
            return _solve_torch(BlockTridiagonalFactor(lmul, dchol, None), r)

        graphed = self._get(key, solve, (factor.lmul, factor.dchol, rhs))
        return graphed(factor.lmul, factor.dchol, rhs).clone()


_DEFAULT_POOL: CudaGraphPool | None = None


def default_pool() -> CudaGraphPool:
    """The pool that ``ode_forward(..., prefer_cuda_graph=True)`` uses when no ``cuda_graphs``
    is passed: created on first use, at most 16 graphs (oldest dropped first);
    :func:`clear_default_pool` frees it."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = CudaGraphPool()
    return _DEFAULT_POOL


def clear_default_pool() -> None:
    """Drop the default pool's graphs and their static buffers."""
    global _DEFAULT_POOL
    _DEFAULT_POOL = None
