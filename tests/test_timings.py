"""holmes.runtime.timings under real runs: every rank of a gloo job records its steps.

A two-stage pipeline of two hosts and a two-replica all-reduce plan run
`examples/train_tinygpt.py` through `hetsched launch --via local`; every rank must write
one line per step with its tasks, the receives matching the other rank's sends, its
syncs and bytes; `--no-timings` writes nothing. Times are checked for order, never for
speed.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from test_trainer import make_plan, topology, train

from holmes.runtime.timings import Timings, read_timings


def test_pipeline_ranks_record_tasks_messages_and_bytes(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1", "h2"]}, 1.0), "--stages", "2")
    train(plan, tmp_path / "metrics.json", "--steps", "3")
    lines = read_timings(tmp_path / "timings")
    assert sorted({line["rank"] for line in lines}) == [0, 1]
    assert [line["step"] for line in lines if line["rank"] == 0] == [0, 1, 2]
    by_rank = {(line["rank"], line["step"]): line for line in lines}
    for (rank, step), line in by_rank.items():
        assert line["start"] <= line["end"]
        kinds = {task[0] for task in line["tasks"]}
        assert {"forward", "backward"} <= kinds
        assert all(start <= end for _, _, start, end in line["tasks"])
        assert line["recv"], "a pipeline stage receives something every step"
        other = by_rank[(1 - rank, step)]
        sent = sorted((mb, kind, nbytes) for peer, mb, kind, nbytes, _ in other["send"]
                      if peer == rank)
        got = sorted((mb, kind, nbytes) for _, mb, kind, nbytes, _, _ in line["recv"])
        assert sent == got
        assert sum(line["bytes"].values()) >= sum(s[3] for s in line["send"])
    stage0 = [line for line in lines if line["stage"] == 0]
    assert all(any(t[0] == "loss" for t in line["tasks"]) for line in stage0)


def test_replicas_record_their_syncs(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["a1"], "b": ["b1"]}, 5.0),
                     "--stages", "1", "--sync", "allreduce")
    assert len(yaml.safe_load(plan.read_text())["replicas"]) == 2
    train(plan, tmp_path / "metrics.json", "--steps", "2")
    lines = read_timings(tmp_path / "timings")
    assert len(lines) == 4
    for line in lines:
        syncs = [s for s in line["syncs"] if s[0] == "replica"]
        assert syncs and all(s[1] > 0 and s[2] <= s[3] for s in syncs)
        assert line["bytes"].get("inter_site", 0) > 0


def test_no_timings_writes_nothing(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1"]}, 1.0), "--stages", "1")
    train(plan, tmp_path / "metrics.json", "--steps", "2", "--no-timings")
    assert not (tmp_path / "timings").exists()


def test_a_recorder_that_is_off_records_nothing(tmp_path: Path) -> None:
    off = Timings(None)
    off.task("forward", 0, 0.0)
    with off.sync("data", 10):
        pass
    off.end_step(0, {})
    assert not off.tasks and not off.syncs
    on = Timings(tmp_path / "t", rank=3, flush_every=2)
    on.task("forward", 0, 0.0)
    on.end_step(0, {"intra_site": 5})
    on.close()
    (line,) = read_timings(tmp_path / "t")
    assert line["rank"] == 3 and line["tasks"][0][:2] == ["forward", 0]
