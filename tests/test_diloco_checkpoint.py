"""Checkpoints: atomic files, and a restart from the last outer checkpoint that continues
bit for bit like the uninterrupted run (same seed, gloo)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diloco_worker import launch, single_process_group
from torch import nn

from diloco import DiLoCo, load_checkpoint, replica_checkpoint_path, save_checkpoint

CONFIG = dict(
    sync_every=8,
    fragments=4,
    pattern="strided",
    overlap_steps=1,
    alpha=0.5,
    quantization="fp4",
    error_feedback=True,  # its residuals are part of the state, too
)


def test_save_is_atomic_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = replica_checkpoint_path(tmp_path / "ckpt", rank=3)
    save_checkpoint({"step": 1, "t": torch.arange(3)}, path)
    assert path.name == "diloco-replica3.pt"

    def dies_half_way(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["t"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with single_process_group():
        yield


def test_state_dict_refuses_while_an_exchange_is_in_flight(group: None) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with DiLoCo(model, sync_every=4, fragments=2, overlap_steps=1) as diloco:
        diloco.step()
        diloco.step()  # fragment 1 (offset 2) starts
        assert not diloco.quiescent
        with pytest.raises(RuntimeError, match="in flight"):
            diloco.state_dict()
        diloco.step()
        state = diloco.state_dict()
    assert state["step"] == 3 and state["fragment_names"] == [
        ["0.weight", "0.bias"],
        ["1.weight", "1.bias"],
    ]
    with (
        DiLoCo(model, sync_every=4, fragments=1) as other,
        pytest.raises(ValueError, match="fragments"),
    ):
        other.load_state_dict(state)


def test_state_round_trips_through_a_file(group: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    inner = torch.optim.AdamW(model.parameters())
    with DiLoCo(model, inner, sync_every=2, fragments=2) as diloco:
        for _ in range(5):
            model(torch.randn(3, 2)).sum().backward()
            inner.step()
            diloco.step()
        save_checkpoint(diloco.state_dict(), tmp_path / "c.pt")
        expected = diloco.state_dict()
    fresh = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    fresh_inner = torch.optim.AdamW(fresh.parameters())
    with DiLoCo(fresh, fresh_inner, sync_every=2, fragments=2) as restored:
        restored.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
        got = restored.state_dict()
    assert got["step"] == expected["step"] == 5
    for a, b in zip(
        got["global"] + [got["outer"]["buffers"][0]],
        expected["global"] + [expected["outer"]["buffers"][0]],
        strict=True,
    ):
        assert torch.equal(a, b)
    for name, tensor in expected["modules"][0].items():
        assert torch.equal(got["modules"][0][name], tensor)


def test_parameter_states_move_between_fragmentations(group: None) -> None:
    # the outer state cut by parameter is restored under another split into fragments:
    # global values, momentum and error-feedback residuals land on the same parameters,
    # a fragment mixing parameters with and without momentum gets zeros (what the outer
    # step does with none), and the inner step count comes along
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(4)))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with DiLoCo(model, inner, **dict(CONFIG, sync_every=4, overlap_steps=0)) as diloco:
        for _ in range(5):  # fragments 1, 2, 3 sync after steps 1, 2, 3 and fragment 0 after 4
            model(torch.randn(2, 3)).sum().backward()
            inner.step()
            inner.zero_grad()
            diloco.step()
        saved = diloco.parameter_states()
        step = diloco.inner_steps
    assert set(saved) == {n for n, _ in model.named_parameters()}
    assert all({"global", "momentum", "residual"} <= set(parts) for parts in saved.values())
    partial = {n: dict(parts) for n, parts in saved.items()}
    del partial["0.weight"]["momentum"]
    with DiLoCo(model, **dict(CONFIG, fragments=2, pattern="sequential")) as other:
        other.load_parameter_states(partial, step)
        got = other.parameter_states()
        assert other.inner_steps == step == 5
    for name, parts in saved.items():
        for kind, value in parts.items():
            want = torch.zeros_like(value) if (name, kind) == ("0.weight", "momentum") else value
            assert torch.equal(got[name][kind], want), (name, kind)
    del partial["3.bias"]["global"]
    with (DiLoCo(model, **CONFIG) as third,
          pytest.raises(ValueError, match="no global value for 1 parameter.*3.bias")):
        third.load_parameter_states(partial, step)


@pytest.mark.slow
def test_restart_from_checkpoint_equals_uninterrupted_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    train = {"kind": "train", "config": CONFIG, "steps": 24, "checkpoint_dir": str(ckpt)}
    uninterrupted, codes = launch([dict(train, checkpoint_at=11)], 2, tmp_path / "a")
    assert codes == [0, 0], uninterrupted
    resumed, codes = launch([dict(train, resume=True)], 2, tmp_path / "b")
    assert codes == [0, 0], resumed
    for a, b in zip(uninterrupted, resumed, strict=True):
        a, b = a["train"], b["train"]
        assert b["resumed_at"] == 11
        assert b["final"] == a["final"]  # global, local, inner and outer state, bit for bit
        assert b["merges"] == [m for m in a["merges"] if m["step"] > 11]
    assert (
        uninterrupted[0]["train"]["final"]["local"] != uninterrupted[1]["train"]["final"]["local"]
    )

    # the outer state does not depend on the world size: one survivor can go on alone
    alone, codes = launch([dict(train, resume=True, resume_rank=1)], 1, tmp_path / "c")
    assert codes == [0], alone
    assert alone[0]["train"]["resumed_at"] == 11 and alone[0]["train"]["final"]["step"] == 24
