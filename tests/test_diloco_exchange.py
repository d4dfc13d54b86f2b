"""The exchange thread and replica failures: a dead or hung replica gives a clear error
within the timeout, never a silent hang."""

import threading
import time
from pathlib import Path

import pytest
from diloco_worker import launch

from diloco.exchange import ExchangeWorker, ReplicaFailure, wait_for

FAILING = dict(sync_every=4, fragments=2, overlap_steps=1, quantization="int8", timeout_s=2.0)


def test_worker_runs_work_in_submission_order() -> None:
    worker = ExchangeWorker()
    seen: list[int] = []
    futures = [worker.submit(lambda i=i: seen.append(i) or i) for i in range(20)]
    assert [wait_for(f, 5.0, "work", 1) for f in futures] == list(range(20))
    assert seen == list(range(20))
    assert worker.close()


def test_errors_and_timeouts_become_replica_failures() -> None:
    worker = ExchangeWorker()

    def broken() -> None:
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(ReplicaFailure, match="Connection closed by peer.*probably died"):
        wait_for(worker.submit(broken), 5.0, "exchange of fragment 0", 2)
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(ReplicaFailure, match="did not finish within timeout_s=0.2"):
        wait_for(worker.submit(release.wait), 0.2, "exchange of fragment 1", 2)
    assert time.monotonic() - started < 2.0
    release.set()
    assert worker.close()


def run_with_failure(tmp_path: Path, mode: str) -> list:
    task = {
        "kind": "train",
        "config": FAILING,
        "steps": 40,
        "fail": {"victim": 1, "at_step": 9, "mode": mode},
    }
    started = time.monotonic()
    results, codes = launch(
        [task], 3, tmp_path, timeout_s=60, pg_timeout_s=60, hung=(1,) if mode == "hang" else ()
    )
    assert time.monotonic() - started < 45  # nobody waited for the 60 s gloo timeout
    assert codes[1] == (17 if mode == "die" else None) and results[1] is None
    assert codes[0] == codes[2] == 0
    return [results[0]["train"], results[2]["train"]]


def test_killed_replica_fails_the_others_quickly(tmp_path: Path) -> None:
    for survivor in run_with_failure(tmp_path, "die"):
        failure = survivor["failure"]
        assert "has probably died" in failure["message"]
        assert "Restart every replica from the last DiLoCo checkpoint" in failure["message"]
        assert failure["seconds_in_step"] < FAILING["timeout_s"] + 1.0
        assert "final" not in survivor  # it stopped instead of training on alone


@pytest.mark.slow
def test_hung_replica_fails_the_others_within_the_timeout(tmp_path: Path) -> None:
    for survivor in run_with_failure(tmp_path, "hang"):
        failure = survivor["failure"]
        assert "did not finish within timeout_s=2" in failure["message"]
        assert "died or hung" in failure["message"]
        assert FAILING["timeout_s"] - 0.1 <= failure["seconds_in_step"] < FAILING["timeout_s"] + 1.5
