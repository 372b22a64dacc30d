"""Large CPU work arrays backed by transparent huge pages.

The fused solver allocates its factors and outputs afresh on every call (tens of MB at the
benchmark shapes). Memory that large comes straight from the operating system, zero-filled one
4 KiB page fault at a time, and on a virtual machine every fault is expensive: writing a fresh
34 MB array took 11.8 ms here, of which the arithmetic of the solver needs a fraction. Asking the
kernel for 2 MiB pages (``madvise(MADV_HUGEPAGE)``, honoured when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``) cuts that to 2.9 ms.

:func:`empty` returns an ordinary torch tensor in either case; where huge pages are unavailable
(other operating systems, small arrays) it is plain :func:`torch.empty`. The tensor keeps its
memory mapping alive and the mapping is released with the last reference.
"""

from __future__ import annotations

import math
import mmap

import torch

__all__ = ["empty", "HUGE_PAGE_MIN_BYTES"]

HUGE_PAGE_MIN_BYTES = 32 * 2**20  # below this, the ordinary allocator is as fast


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` and ``dtype``, on huge pages when large."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE_MIN_BYTES or advise is None:
        return torch.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(advise)
    except OSError:  # the kernel refuses (e.g. THP disabled): ordinary pages, same result
        pass
    return torch.frombuffer(mapping, dtype=dtype).view(shape)
