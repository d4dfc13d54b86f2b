"""Byte accounting: records what was handed to torch.distributed, summaries per fragment."""

from collections.abc import Iterator

import pytest
import torch
from diloco_worker import single_process_group
from torch import nn

from diloco import ByteLedger, CountingComm, DiLoCo


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with single_process_group():
        yield


def test_counting_comm_counts_input_and_output_tensors(group: None) -> None:
    comm = CountingComm()
    ledger = ByteLedger()
    record = ledger.open("sync", fragment=0, step=1)
    tensor = torch.ones(10)  # 40 bytes
    comm.all_reduce(tensor, record)
    gathered = torch.empty(6, dtype=torch.uint8)
    comm.all_gather(gathered, torch.arange(6, dtype=torch.uint8), record)
    out = torch.empty(4, dtype=torch.bfloat16)
    comm.all_to_all(out, torch.ones(4, dtype=torch.bfloat16), record)
    assert torch.equal(gathered, torch.arange(6, dtype=torch.uint8))  # it really ran
    assert record.calls == [
        ("all_reduce", 40, 40),
        ("all_gather", 6, 6),
        ("all_to_all_single", 8, 8),
    ]
    assert (record.sent, record.received, record.total) == (54, 54, 108)


def test_summary_per_fragment_peak_and_per_step() -> None:
    ledger = ByteLedger()
    for fragment, step, sent in [(0, 1, 10), (1, 2, 30), (0, 3, 20)]:
        ledger.open("sync", fragment, step).add("x", sent, 2 * sent)
    ledger.open("broadcast", 0, 0).add("broadcast", 1000, 0)
    summary = ledger.summary()
    assert summary.syncs == 3 and (summary.sent, summary.received) == (60, 120)
    assert summary.per_fragment == {0: (30, 60), 1: (30, 60)}
    assert (summary.peak_sync_sent, summary.peak_sync_total) == (30, 90)
    assert summary.per_inner_step(3) == 60.0
    assert ledger.summary("broadcast").sent == 1000


def test_diloco_records_one_event_per_fragment_sync(group: None) -> None:
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    with DiLoCo(model, sync_every=4, fragments=4, quantization="bf16") as diloco:
        for _ in range(8):
            diloco.step()
    records = diloco.ledger.records()
    assert [(r.fragment, r.step) for r in records] == [
        (1, 1), (2, 2), (3, 3), (0, 4), (1, 5), (2, 6), (3, 7), (0, 8)
    ]  # fmt: skip
    # one replica: all_to_all of one bf16 shard (72 values, 144 bytes) + all_gather of it
    assert all((r.sent, r.received) == (288, 288) for r in records)
    assert diloco.ledger.summary().peak_sync_total == 576
