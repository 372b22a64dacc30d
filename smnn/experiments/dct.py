"""The orthonormal DCT-II as a torch layer (a shared model part: SST, KdV).

For a signal ``x`` of ``n`` points the orthonormal DCT-II is ``y = D x`` with

    D[k, t] = s_k * cos(pi * (t + 1/2) * k / n),   s_0 = sqrt(1/n),  s_k = sqrt(2/n) (k > 0),

for ``k, t = 0 .. n-1``. ``D`` is orthogonal (``D D^T = I``), so the inverse is ``x = D^T y``,
the transform preserves squared norms (an MSE over all ``n`` coefficients equals the MSE in time)
and it equals ``scipy.fft.dct(x, type=2, norm="ortho")``. Low ``k`` are the slow components:
keeping the first ``n_keep`` coefficients is a low-pass representation of the signal.

The matrix is built in float64 and stored as a non-persistent buffer (recomputed from ``n``, not
saved in ``state_dict``), so it follows the module's ``.to(dtype, device)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["dct_matrix", "Dct"]


def dct_matrix(
    n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` ``(n, n)``: row ``k`` is the ``k``-th basis vector.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"a DCT needs at least one point, got n = {n}")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    t = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (t + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] *= math.sqrt(0.5)
    return d.to(dtype=dtype, device=device)


class Dct(nn.Module):
    """The first ``n_keep`` orthonormal DCT-II coefficients along the last axis.

    Args:
        n: points of the signal.
        n_keep: coefficients kept (``1 <= n_keep <= n``; default all).
    """

    def __init__(self, n: int, n_keep: int | None = None):
        super().__init__()
        n_keep = n if n_keep is None else n_keep
        if not 1 <= n_keep <= n:
            raise ValueError(f"n_keep must be in 1..{n}, got {n_keep}")
        self.n, self.n_keep = n, n_keep
        self.register_buffer("matrix", dct_matrix(n)[:n_keep].contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"n={self.n}, n_keep={self.n_keep}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., n)`` -> coefficients ``(..., n_keep)``."""
        if x.shape[-1] != self.n:
            raise ValueError(
                f"the DCT expects signals of {self.n} points, got shape {tuple(x.shape)}"
            )
        return x @ self.matrix.to(x.dtype).T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Coefficients ``y`` ``(..., n_keep)`` -> signal ``(..., n)`` (the dropped coefficients
        taken as zero: the projection onto the kept basis vectors when ``n_keep < n``)."""
        if y.shape[-1] != self.n_keep:
            raise ValueError(
                f"the inverse DCT expects {self.n_keep} coefficients, got shape {tuple(y.shape)}"
            )
        return y @ self.matrix.to(y.dtype)
