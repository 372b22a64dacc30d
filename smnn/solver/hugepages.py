"""Large CPU work arrays backed by transparent huge pages.

The fused solver allocates its factors and outputs afresh on every call. glibc's malloc serves
blocks of up to 32 MiB (the cap of its dynamic mmap threshold) from the heap, where memory freed
by the previous call is reused; larger blocks always come straight from the operating system,
zero-filled one 4 KiB page fault at a time, and on a virtual machine every fault is expensive:
writing a fresh 34 MB array took 11.8 ms here. Asking the kernel for 2 MiB pages
(``madvise(MADV_HUGEPAGE)``, honoured when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``) cut that to 2.9 ms. Below 32 MiB huge pages only lose (the heap's
recycled memory needs no faults at all: the Lorenz benchmark step took 17.7 ms with huge pages
from 4 MiB on and 8.9 ms with the heap).

:func:`empty` returns an ordinary torch tensor in either case; where huge pages are unavailable
(other operating systems, small arrays) it is plain :func:`torch.empty`. The tensor keeps its
memory mapping alive and the mapping is released with the last reference.
"""

from __future__ import annotations

import math
import mmap

import torch

__all__ = ["empty", "HUGE_PAGE_MIN_BYTES"]

HUGE_PAGE_MIN_BYTES = 32 * 2**20  # glibc's largest mmap threshold: smaller blocks are recycled


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
