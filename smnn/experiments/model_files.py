"""Reading back the ``model.pt`` a training job wrote (any experiment's): the checks every
experiment's ``load_model`` shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smnn.io import load_torch_verified

__all__ = ["read_model_file"]


def read_model_file(path: str | Path, what: str, kind: str | None = None) -> dict[str, Any]:
    """The payload of ``model.pt`` at ``path`` (on the CPU), checked.

    Args:
        what: the model's name for messages (``"KdV"``).
        kind: when given, the payload's ``kind`` must be this.

    Raises:
        FileNotFoundError: no such file.
        smnn.io.StoreError: the file is damaged (truncated, a member's bytes do not match its
            CRC-32) or cannot be unpickled; the message names the file and the rerun command.
        ValueError: the file lacks ``state_dict`` / ``model_args`` or holds another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train first)")
    payload = load_torch_verified(
        path, "cpu", remedy=f"rerun the job that writes it: snakemake --forcerun {path}"
    )
    if not isinstance(payload, dict) or any(k not in payload for k in ("state_dict", "model_args")):
        raise ValueError(f"{path} is not a {what} model file (no state_dict / model_args)")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} model, expected {kind!r}")
    return payload
