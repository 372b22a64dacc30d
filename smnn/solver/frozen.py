"""The bounded cache behind ``ode_forward(..., frozen_lhs_cache_version=v)`` (docs/solver.md
"Inputs, shapes, broadcasting" and "Reusing a factorization").

The authors' ``ode_forward`` keeps every factorized left-hand side in a global dict keyed by the
integer version ``v`` alone, forever. For drop-in compatibility we support the argument, but on
top of the explicit object of "Reusing a factorization" (:func:`smnn.solver.factorize`) and with
three limits:

- **opt-in**: nothing is stored unless a caller passes ``v > 0``;
- **keyed by more than v**: the key also holds the shapes of the coefficients and steps, T, S, K,
  the dtype, the device, the weights, the central flag and the method and backend, so that a
  reused ``v`` with a different problem gets its own entry instead of a wrong answer;
- **bounded and clearable**: at most :attr:`FrozenLhsCache.max_entries` entries (8 by default),
  least recently used dropped first; :func:`clear_frozen_lhs_cache` empties it.

Prefer :func:`smnn.solver.factorize` in new code: the caller then owns the factorization.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["FrozenLhsCache", "FROZEN_LHS_CACHE", "clear_frozen_lhs_cache"]


class FrozenLhsCache:
    """A thread-safe LRU map from keys to factorizations.

    Args:
        max_entries: the most entries kept (>= 1); the least recently used is dropped first.
    """

    def __init__(self, max_entries: int = 8):
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {value!r}")
        with getattr(self, "_lock", threading.Lock()):
            self._max_entries = value
            while len(self._entries) > value:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get_or_create(self, key: Hashable, make: Callable[[], object]) -> object:
        """The entry for ``key``, made by ``make()`` (outside the lock) when missing."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = make()
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


FROZEN_LHS_CACHE = FrozenLhsCache()


def clear_frozen_lhs_cache() -> None:
    """Drop every factorization stored for ``frozen_lhs_cache_version`` (frees their memory)."""
    FROZEN_LHS_CACHE.clear()
