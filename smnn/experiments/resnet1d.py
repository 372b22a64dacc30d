"""A one-dimensional residual CNN over a periodic axis (the KdV model's coefficient and
right-hand-side nets; docs/experiments.md, KdV).

:class:`ResNet1D` maps ``(B, C_in, N)`` to ``(B, C_out, N)`` on a periodic grid of ``N`` points:
every convolution pads circularly and has stride 1, so the output has the input's length and the
net is equivariant to circular shifts (shifting the input by ``s`` points shifts the output by
``s`` points). It is a stem convolution ``C_in -> base_filters`` followed by ``n_blocks``
residual blocks (:class:`ResidualBlock1D`); block ``i`` (0-based) has
``base_filters * 2 ** (i // double_every)`` channels, so the width doubles every
``double_every`` blocks. Where a block widens, its shortcut is the input with zero channels
appended (parameter-free), so only the convolutions hold weights:
``C_in K F + F`` for the stem and ``K (c_in c_out + c_out^2) + 2 c_out`` per block
(``K`` the kernel size, ``F`` the base filters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNet1D", "ResidualBlock1D", "circular_conv", "block_widths"]


def circular_conv(n_in: int, n_out: int, kernel_size: int, stride: int = 1) -> nn.Conv1d:
    """A ``Conv1d`` with circular padding ``kernel_size // 2`` (length kept at stride 1).

    Raises:
        ValueError: ``kernel_size`` is even (the output would not be centred on its input).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    return nn.Conv1d(
        n_in, n_out, kernel_size, stride=stride, padding=kernel_size // 2,
        padding_mode="circular",
    )  # fmt: skip


def block_widths(base_filters: int, n_blocks: int, double_every: int) -> list[int]:
    """The channels of each residual block: ``base_filters * 2 ** (i // double_every)``."""
    if min(base_filters, n_blocks, double_every) < 1:
        raise ValueError(
            f"base_filters, n_blocks and double_every must be positive, got {base_filters}, "
            f"{n_blocks}, {double_every}"
        )
    return [base_filters * 2 ** (i // double_every) for i in range(n_blocks)]


class ResidualBlock1D(nn.Module):
    """``y = relu(shortcut(x) + conv2(relu(conv1(x))))``, both convolutions circular.

    Args:
        n_in, n_out: channels in and out (``n_out >= n_in``; the shortcut appends
            ``n_out - n_in`` zero channels).
        kernel_size: odd.
    """

    def __init__(self, n_in: int, n_out: int, kernel_size: int):
        super().__init__()
        if n_out < n_in:
            raise ValueError(f"a block cannot narrow ({n_in} -> {n_out} channels)")
        self.n_in, self.n_out = n_in, n_out
        self.conv1 = circular_conv(n_in, n_out, kernel_size)
        self.conv2 = circular_conv(n_out, n_out, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_in, N)`` -> ``(B, n_out, N)``."""
        h = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.pad(x, (0, 0, 0, self.n_out - self.n_in)) if self.n_out > self.n_in else x
        return F.relu(h + shortcut)


class ResNet1D(nn.Module):
    """Stem convolution and residual blocks over a periodic axis (see the module docstring).

    Args:
        in_channels: C_in (for KdV the input steps).
        base_filters: channels of the stem and the first blocks.
        kernel_size: of every convolution (odd).
        n_blocks: residual blocks.
        double_every: blocks per width; the width doubles after each group.
    """

    def __init__(
        self, in_channels: int, base_filters: int, kernel_size: int, n_blocks: int,
        double_every: int,
    ):  # fmt: skip
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        widths = block_widths(base_filters, n_blocks, double_every)
        self.in_channels = in_channels
        self.stem = circular_conv(in_channels, base_filters, kernel_size)
        self.blocks = nn.Sequential(
            *(
                ResidualBlock1D(n_in, n_out, kernel_size)
                for n_in, n_out in zip([base_filters, *widths[:-1]], widths, strict=True)
            )
        )
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, N)`` -> ``(B, out_channels, N)``.

        Raises:
            ValueError: ``x`` is not ``(B, in_channels, N)``.
        """
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet1D expects (B, {self.in_channels}, N), got {tuple(x.shape)}")
        return self.blocks(F.relu(self.stem(x)))
