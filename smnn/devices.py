"""The one device resolver: a device name from a config key or a command-line flag -> a
:class:`torch.device`.

Every entry point (jobs, ``smnn standalone``, ``smnn bench``) resolves its device here, so that
``auto``, ``cpu``, ``cuda`` and ``cuda:N`` mean the same everywhere and a bad name or a missing
GPU is reported naming the key or flag it came from.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_NAMES", "resolve_device"]

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str, what: str = "device") -> torch.device:
    """The device for ``name``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or
    ``cuda:N``.

    Args:
        name: the device name as given.
        what: the config key or flag it came from (``"device"``, ``"--device"``), named in the
            error.

    Raises:
        ValueError: ``"{what}: ..."`` for a name that is none of these, or a CUDA device that
            this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if (
        device is None
        or device.type not in ("cpu", "cuda")
        or (device.type == "cpu" and device.index is not None)
    ):
        raise ValueError(f"{what} must be one of {', '.join(DEVICE_NAMES)}, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name} was requested but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{what}: {name} was requested but this machine has {count} CUDA device(s)"
            )
    return device
