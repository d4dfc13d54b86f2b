"""Tests of holmes.runtime.plan_run's device and backend choices (the GPU path, without a GPU)."""

from __future__ import annotations

import pytest
import torch

from holmes.runtime.plan_run import _cuda_index, _torch_backend


@pytest.mark.parametrize(("device", "index"), [
    ("h1:cuda0", 0), ("h1:cuda3", 3), ("h1:gpu1", 1), ("h1:cuda", 0),
    ("h1:cpu0", None), ("h1:gpux", None), ("h1:mygpu0", None),
])
def test_plan_gpus_map_to_their_cuda_index(monkeypatch, device, index):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cuda_index(device) == index


def test_without_cuda_every_device_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cuda_index("h1:cuda0") is None


def test_nccl_groups_also_get_gloo_for_cpu_tensors():
    assert _torch_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert _torch_backend("gloo") == "gloo"
