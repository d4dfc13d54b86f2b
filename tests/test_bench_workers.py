"""bench/workers.py: the lr schedule and the port helper the training benchmarks share."""

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workers import cosine_lr, free_port  # noqa: E402


def test_cosine_lr_warms_up_peaks_and_ends_at_a_tenth() -> None:
    lrs = [cosine_lr(step, peak=1.0, warmup=10, steps=110) for step in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    decay = lrs[10:111]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
