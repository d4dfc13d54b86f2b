"""The checkpoint folder of a run: `DIR/step-NNNNNNNN/rank-R.pt`, one file per plan rank.

Files are written atomically (`diloco.save_checkpoint`); the latest step that every rank
has is the one a restart resumes from; older step folders beyond `KEEP_CHECKPOINTS` are
removed by rank 0 once every rank has written the new one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from diloco import load_checkpoint, save_checkpoint

KEEP_CHECKPOINTS = 2


def step_folder(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}"


def rank_file(directory: Path, step: int, plan_rank: int) -> Path:
    return step_folder(directory, step) / f"rank-{plan_rank}.pt"


def save_rank_state(directory: Path, step: int, plan_rank: int, state: dict[str, Any]) -> Path:
    """Write one rank's state for `step`; returns the step's folder."""
    save_checkpoint(state, rank_file(directory, step, plan_rank))
    return step_folder(directory, step)


def load_rank_state(directory: Path, step: int, plan_rank: int) -> dict[str, Any]:
    return load_checkpoint(rank_file(directory, step, plan_rank))


def steps_with(directory: Path, plan_rank: int) -> list[int]:
    """The steps for which `plan_rank` has a file, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.parent.name.split("-", 1)[1])
                  for p in directory.glob(f"step-*/rank-{plan_rank}.pt"))


def prune(directory: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    folders = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
