"""bench/pipeline_vs_torch.py runs all three pipelines on 4 gloo ranks, and they compute the
same first-step loss (timings are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_bench_runs_and_its_three_pipelines_agree(tmp_path: Path) -> None:
    table = tmp_path / "pipeline.md"
    done = subprocess.run(
        [sys.executable, "bench/pipeline_vs_torch.py", "--layers", "4", "--width", "32",
         "--heads", "2", "--seq-len", "16", "--microbatch", "2", "--microbatches", "4",
         "--warmup", "1", "--rounds", "2", "--markdown", str(table)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = table.read_text()
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:5]] == [
        "hetsched", "torch 1F1B", "torch GPipe"]
    assert "(equal)." in text and "Load average" in text
