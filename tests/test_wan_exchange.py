"""One DiLoCo exchange per stage across the WAN, on real gloo ranks (tests/trainer_worker.py).

Two sites of two loopback hosts, one stage per replica: each replica's stage has 2
lanes, each lane in its own cross-site `diloco` group. Under `diloco.exchange: per_lane`
(the old behaviour) both lanes exchange the whole pseudo-gradient; under `lead` lane 0
exchanges and broadcasts it in its site, under `sharded` (the default) each lane
exchanges half and they all-gather. Claims: the parameters every rank ends with equal
the per-lane run's (1e-6, in fp32 and in fp4), the cross-site groups carry half the
bytes, and a run that stops and resumes from a checkpoint ends where the straight run
does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_zero import RUN, assert_params_close, make_plan
from trainer_worker import launch

from holmes.plan import load_plan, save_plan

SITES = {"a": (2, 0.05), "b": (2, 0.05)}
STEPS = 6


def diloco_plan(folder: Path, exchange: str, quantization: str = "none") -> Path:
    """The planner's 2 x 2-lane DiLoCo plan, set to exchange every 2 steps in 2 fragments
    (so 6 steps make 6 exchanges, one overlapping a step)."""
    path = make_plan(folder, SITES, sync="diloco")
    plan = load_plan(path)
    assert [len(plan.stage(r.stages[0]).devices) for r in plan.replicas] == [2, 2]
    assert plan.diloco is not None
    plan = plan.model_copy(update={"diloco": plan.diloco.model_copy(update={
        "sync_every": 2, "fragments": 2, "overlap_steps": 1, "alpha": 0.5,
        "quantization": quantization, "exchange": exchange})})
    save_plan(plan, path, [f"diloco exchange: {exchange}"])
    return path


def run(tmp_path: Path, exchange: str, quantization: str = "none", **extra: object) -> list:
    plan = diloco_plan(tmp_path / f"plan-{exchange}-{quantization}", exchange, quantization)
    return launch(plan, dict(RUN, steps=STEPS, **extra),
                  tmp_path / f"out-{exchange}-{quantization}")


class PerLane(dict):
    """The old behaviour's runs by quantization, each made once, when first asked for."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, quantization: str) -> list:
        self[quantization] = run(self.folder, "per_lane", quantization)
        return self[quantization]


@pytest.fixture(scope="module")
def per_lane(tmp_path_factory: pytest.TempPathFactory) -> PerLane:
    return PerLane(tmp_path_factory.mktemp("per-lane"))


def wan_sent(ranks: list[dict]) -> int:
    return sum(r["diloco_sent"]["sync"] + r["diloco_sent"]["broadcast"] for r in ranks)


@pytest.mark.parametrize("exchange", ["lead", "sharded"])
def test_one_exchange_per_stage_trains_like_one_per_lane_on_half_the_wan_bytes(
        tmp_path: Path, exchange: str, per_lane: PerLane) -> None:
    old = per_lane["none"]
    new = run(tmp_path, exchange)
    for before, after in zip(old, new, strict=True):
        assert (before["replica"], before["lane"]) == (after["replica"], after["lane"])
        assert_params_close(after["params"], before["params"])
    assert all(r["diloco_sent"]["site"] == 0 for r in old)
    assert sum(r["diloco_sent"]["site"] for r in new) > 0  # the lanes passed it on
    # 2 lanes: the WAN carries each exchange once instead of twice (fp32 is not padded
    # to blocks: two halves of a vector padded to an even length, <= 4 bytes more each)
    assert 2 * wan_sent(new) - wan_sent(old) in range(0, 2 * 4 * 4 * (STEPS + 2))
    if exchange == "lead":  # only lane 0 of each replica talks across the WAN
        assert [r["diloco_sent"]["sync"] > 0 for r in new] == [r["lane"] == 0 for r in new]


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["lead", "sharded"])
def test_one_exchange_per_stage_is_the_per_lane_exchange_under_fp4(
        tmp_path: Path, exchange: str, per_lane: PerLane) -> None:
    old = per_lane["fp4"]
    new = run(tmp_path, exchange, "fp4")
    for before, after in zip(old, new, strict=True):
        assert_params_close(after["params"], before["params"])
    if exchange == "lead":
        assert 2 * wan_sent(new) == wan_sent(old)
    else:  # each half padded to whole blocks of 32 for 2 replicas: at most 63 more values
        assert 0 <= 2 * wan_sent(new) - wan_sent(old) <= 16 * 1024


@pytest.mark.slow
def test_one_exchange_per_stage_resumes_from_a_checkpoint_where_the_straight_run_ends(
        tmp_path: Path) -> None:
    plan = diloco_plan(tmp_path / "plan", "sharded", "fp4")
    straight = launch(plan, dict(RUN, steps=STEPS), tmp_path / "straight")
    ckpt = str(tmp_path / "ckpt")
    launch(plan, dict(RUN, steps=STEPS, checkpoint_dir=ckpt, checkpoint_every=2,
                      stop_after=4), tmp_path / "first")
    resumed = launch(plan, dict(RUN, steps=STEPS, checkpoint_dir=ckpt, checkpoint_every=2),
                     tmp_path / "resumed")
    assert {r["start_step"] for r in resumed} == {4}
    for want, got in zip(straight, resumed, strict=True):
        assert_params_close(got["params"], want["params"])


def test_estimate_counts_one_wan_exchange_per_stage(tmp_path: Path) -> None:
    # the same 2 x 2-lane plan estimated per lane and with one exchange per stage: the
    # WAN carries half, and the sites' links carry the fp32 average to the other lane
    from holmes.model import load_model
    from holmes.review import estimate_plan
    from topology.schema import load_topology

    path = make_plan(tmp_path, SITES, sync="diloco")
    plan = load_plan(path)
    assert plan.diloco is not None
    topo, model = load_topology(tmp_path / "topology.yaml"), load_model(
        str(tmp_path / "model.yaml"))
    sent = {}
    for exchange in ("per_lane", "lead", "sharded"):
        edited = plan.model_copy(update={"diloco": plan.diloco.model_copy(
            update={"exchange": exchange})})
        sent[exchange] = estimate_plan(edited, topo, model).bytes_per_step
    assert sent["lead"]["inter_site"] == pytest.approx(sent["per_lane"]["inter_site"] / 2)
    assert sent["sharded"]["inter_site"] == pytest.approx(sent["lead"]["inter_site"])
    assert sent["lead"].get("intra_fabric", 0) > sent["per_lane"].get("intra_fabric", 0)
