"""Checkpoint files for DiLoCo replicas, written atomically.

`save_checkpoint` writes to a temporary file in the target's directory, flushes and fsyncs
it, then `os.replace`s it over the target and fsyncs the directory: a reader sees the old
file or the new one, never half of one, even if the writer dies mid-way. `load_checkpoint`
reads with `weights_only=True` (tensors and plain containers only).

One file per replica (`replica_checkpoint_path`): the outer state is the same on every
replica, the local model, inner optimizer and data position are not.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def replica_checkpoint_path(directory: str | os.PathLike[str], rank: int) -> Path:
    return Path(directory) / f"diloco-replica{rank}.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `state` to `path` atomically; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            torch.save(state, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
