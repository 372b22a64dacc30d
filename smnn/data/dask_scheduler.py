"""The Dask scheduler of a data stage (SST preprocessing, KdV generation), chosen in its config.

``scheduler`` is one of :data:`SCHEDULERS`:

- ``threads``: Dask's threaded scheduler with the rule's ``threads`` workers (numpy releases the
  GIL in its array loops, so the threads share the work);
- ``local_cluster``: a ``distributed.LocalCluster`` in this process (one in-process worker with
  ``threads`` threads; its dashboard off);
- ``address``: an existing Dask cluster at ``address`` (``tcp://host:8786``); its workers must see
  the input files and the output directory at the same paths, e.g. on a shared file system.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from smnn.config import ConfigError

__all__ = ["SCHEDULERS", "CONNECT_TIMEOUT_S", "check_scheduler", "dask_scheduler"]

SCHEDULERS = ("threads", "local_cluster", "address")
CONNECT_TIMEOUT_S = 10


def check_scheduler(scheduler: str, address: str | None, key: str, source: str = "") -> None:
    """Raise ConfigError naming ``{key}.scheduler`` when it is unknown, or ``address`` with no
    address given.

    Args:
        key: the config section holding ``scheduler`` and ``address`` (e.g. ``"kdv.generate"``).
        source: the config file, for the message (empty: not named).
    """
    where = f"{source}: " if source else ""
    if scheduler not in SCHEDULERS:
        raise ConfigError(
            f"{where}{key}.scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}"
        )
    if scheduler == "address" and not address:
        raise ConfigError(
            f"{where}{key}.scheduler is 'address' but {key}.address is null: set it to the Dask "
            f"scheduler's address (e.g. tcp://host:8786), or use scheduler: threads"
        )


def _memory_limit(threads: int) -> int:
    """Bytes for an in-process LocalCluster worker: half this machine's RAM, at most 2 GiB
    per thread (the data stages need a few hundred MB)."""
    import psutil

    return int(min(psutil.virtual_memory().total // 2, threads * 2 * 2**30))


@contextmanager
def dask_scheduler(
    scheduler: str,
    threads: int,
    address: str | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    key: str = "the config",
) -> Iterator[str]:
    """Make ``scheduler`` the one Dask computations inside the block use (module docstring).

    Args:
        scheduler: one of :data:`SCHEDULERS`.
        threads: worker threads for ``threads`` and ``local_cluster``.
        address: the scheduler's address for ``address``.
        connect_timeout: seconds to wait for the scheduler at ``address``.
        key: the config section, for the messages (e.g. ``"sst.preprocess"``).

    Yields:
        a description of it for the log (e.g. ``"threads (2)"``).

    Raises:
        ConfigError: an unknown scheduler, ``address`` without an address, or no scheduler
            answers at the address.
    """
    import dask

    check_scheduler(scheduler, address, key)
    if scheduler == "threads":
        with dask.config.set(scheduler="threads", num_workers=threads):
            yield f"threads ({threads})"
        return
    from distributed import Client, LocalCluster

    if scheduler == "local_cluster":
        limit = _memory_limit(threads)
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=threads,
                processes=False,
                memory_limit=limit,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield (
                f"distributed.LocalCluster (1 in-process worker, {threads} threads, "
                f"memory limit {limit / 2**30:.1f} GiB, {client.scheduler.address})"
            )
        return
    try:
        client = Client(address, timeout=connect_timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {key}.address {address!r} "
            f"({type(exc).__name__}: {exc}); start it (dask scheduler; dask worker "
            f"{address}) or set {key}.scheduler: threads"
        ) from exc
    with client:
        n = sum(client.nthreads().values())
        yield f"Dask cluster at {address} ({n} worker threads)"
