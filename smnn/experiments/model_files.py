"""Reading back the ``model.pt`` a training job wrote (any experiment's): the checks every
experiment's ``load_model`` shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["read_model_file"]


def read_model_file(path: str | Path, what: str, kind: str | None = None) -> dict[str, Any]:
    """The payload of ``model.pt`` at ``path`` (on the CPU), checked.

    Args:
        what: the model's name for messages (``"KdV"``).
        kind: when given, the payload's ``kind`` must be this.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file lacks ``state_dict`` / ``model_args`` or holds another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train first)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or any(k not in payload for k in ("state_dict", "model_args")):
        raise ValueError(f"{path} is not a {what} model file (no state_dict / model_args)")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} model, expected {kind!r}")
    return payload
