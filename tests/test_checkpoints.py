"""Checkpoints that lose nothing: checked files, a fallback past damaged steps, other plans.

In one process: `holmes.runtime.checkpoints` finds each kind of damage (truncated, empty,
flipped bytes, garbage, a missing file, a damaged manifest), ignores what is not a
checkpoint and refuses a checkpoint path that is not a folder (the example script exits 2
before any process group); `holmes.runtime.train_state` picks each replica's entries
across DiLoCo and allreduce plans. On gloo ranks (tests/trainer_worker.py, the tiny GPT,
20 steps on a 2-stage plan): a resume skips a damaged newest step with one line naming
the file and continues bit for bit from the intact one, both ranks agreeing although only
one of them needs the damaged file; with nothing intact it stops with one error. Then the
per-layer format: the 2-stage checkpoint resumes on a 4-stage plan with another layer
split and on one stage of 2 ZeRO-1 lanes, and the next two steps' losses equal one
process's from the same state (1e-5); the 2-lane plan writes back the very entries it
read. DiLoCo's per-replica and outer state move from one stage to two stages per replica
entry for entry, and to a plan without DiLoCo as replica 0's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from diloco_worker import single_process_group
from trainer_worker import launch, lr_at, make_batch, make_model, make_optimizer

from diloco import DiLoCo
from holmes.estimate import DilocoChoice
from holmes.model import load_model
from holmes.plan import load_plan, save_plan
from holmes.plan_build import build_plan, summary
from holmes.planner import PlanOptions, decide
from holmes.runtime import PlanRun, checkpoints, train_state
from holmes.runtime.checkpoints import FORMAT, FileEntry, Manifest, Problem
from holmes.runtime.plan_run import Placement
from topology.errors import InputError
from topology.schema import load_topology

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAML = """\
version: 1
model: {name: ckpt-gpt, arch: gpt, layers: 8, hidden: 32, heads: 2, ffn: 128, vocab: 256,
        seq_len: 16, dtype: fp32, tie_embeddings: true}
training: {global_batch: 8, microbatch: 2, steps: 10, recompute: none}
"""
RUN = {"model": {"block_size": 16, "n_layer": 8, "n_head": 2, "n_embd": 32}, "seed": 7,
       "optimizer": "adamw", "lr": 1e-2, "steps": 6, "schedule": True}
MICROBATCHES, MICROBATCH = 4, 2


def topology(sites: dict[str, int], wan_gbps: float = 5.0) -> dict[str, Any]:
    hosts = [{"name": f"{site}{i + 1}", "site": site, "address": "127.0.0.1", "cpu_cores": 2,
              "memory_gb": 8, "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 8,
                                           "tflops": 0.05}],
              "nics": [{"name": "lo", "kind": "ethernet", "virtual": True, "state": "up",
                        "netdev": "lo"}]}
             for site, count in sites.items() for i in range(count)]
    links = [{"a": a["name"], "b": b["name"], "latency_ms": 0.2,
              "bandwidth_gbps": 1.0 if a["site"] == b["site"] else wan_gbps}
             for i, a in enumerate(hosts) for b in hosts[i + 1:]]
    return {"version": 1, "sites": [{"name": s} for s in sites], "hosts": hosts, "links": links}


def make_plan(folder: Path, sites: dict[str, int], stages: int,
              layers: list[tuple[int, int]] | None = None, wan_gbps: float = 5.0,
              **options: Any) -> Path:
    """A planner's plan; `layers` overrides each replica's split (stage by stage)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "topology.yaml").write_text(
        yaml.safe_dump(topology(sites, wan_gbps), sort_keys=False))
    (folder / "model.yaml").write_text(MODEL_YAML)
    decision = decide(load_topology(folder / "topology.yaml"),
                      load_model(str(folder / "model.yaml")),
                      PlanOptions(stages=stages, **options))
    plan = build_plan(decision, topology_file="topology.yaml")
    if layers is not None:
        split = {sid: layers[i] for r in plan.replicas for i, sid in enumerate(r.stages)}
        plan = plan.model_copy(update={"stages": [
            s.model_copy(update={"layers": split[s.id]}) for s in plan.stages]})
    path = folder / "plan.yaml"
    save_plan(plan, path, summary(decision, plan, "test"))
    assert len(load_plan(path).replicas[0].stages) == stages
    return path


def entries_of(folder: Path) -> dict[str, Any]:
    """Every entry of a step folder, read the plain way (a reference independent of the
    runtime's reader)."""
    manifest = json.loads((folder / "manifest.json").read_text())["manifest"]
    out: dict[str, Any] = {}
    for name in manifest["files"]:
        out.update(torch.load(folder / name, weights_only=True))
    return out


def log_lines(out: Path) -> list[str]:
    return (out / "rank0.log").read_text().splitlines()


# ---------------------------------------------------------------- in one process


def write_step(directory: Path, step: int, entries: dict[str, Any]) -> Path:
    folder = checkpoints.step_folder(directory, step)
    record = checkpoints.write_rank_file(folder, 0, entries)
    checkpoints.write_manifest(folder, Manifest(
        format=FORMAT, step=step, sync="allreduce", replicas=1, optimizer="AdamW",
        files={record["name"]: FileEntry(sha256=record["sha256"], size=record["size"],
                                         entries=record["entries"])}))
    return folder


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 4] = bytes(b ^ 0xFF for b in data[middle: middle + 4])
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"\(truncated\)"),
    "zero bytes": (lambda p: p.write_bytes(b""), r"0 bytes, the manifest says \d+ \(empty\)"),
    "flipped bytes": (flip_bytes, "sha256 differs from the manifest"),
    "garbage": (lambda p: p.write_bytes(bytes(range(256)) * (p.stat().st_size // 256 + 1)),
                r"\(too long\)"),
    "same-size garbage": (lambda p: p.write_bytes(b"\x17" * p.stat().st_size),
                          "sha256 differs from the manifest"),
    "missing": (lambda p: p.unlink(), "missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_found_and_names_the_file(tmp_path: Path, kind: str) -> None:
    folder = write_step(tmp_path, 10, {"model/w": torch.arange(1000.0)})
    manifest = checkpoints.read_manifest(folder)
    assert isinstance(manifest, Manifest)
    assert checkpoints.verify(folder, manifest, ["rank-0.pt"]) == []
    damage, reason = DAMAGE[kind]
    damage(folder / "rank-0.pt")
    problems = checkpoints.verify(folder, manifest, ["rank-0.pt"])
    assert len(problems) == 1 and problems[0].path == folder / "rank-0.pt"
    assert re.search(reason, problems[0].reason), problems


def test_a_damaged_manifest_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    folder = write_step(tmp_path, 10, {"model/w": torch.zeros(3)})
    path = folder / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"step": 10', '"step": 11'))  # valid JSON, edited
    assert "does not match its text" in checkpoints.read_manifest(folder).reason
    path.write_text(text[: len(text) // 2])
    assert "not readable JSON" in checkpoints.read_manifest(folder).reason
    path.unlink()
    problem = checkpoints.read_manifest(folder)
    assert isinstance(problem, Problem) and problem.path == path and "missing" in problem.reason


def test_what_is_not_a_checkpoint_is_ignored_and_never_pruned(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        write_step(tmp_path, step, {"model/w": torch.zeros(3)})
    (tmp_path / "step-latest").mkdir()
    (tmp_path / "step-abc").mkdir()
    (tmp_path / "step-123").mkdir()
    (tmp_path / "step-00000045").write_text("a file, not a folder")
    (tmp_path / "step-00000050").mkdir()  # cut short: no manifest
    (tmp_path / "step-00000005").mkdir()  # cut short, older than every checkpoint
    assert checkpoints.steps(tmp_path) == [10, 20, 30, 40]
    assert checkpoints.cut_short(tmp_path) == [tmp_path / "step-00000005",
                                               tmp_path / "step-00000050"]
    # just written: step 30 (step 40 is from a run that went back past it): keep 20 and 30
    checkpoints.prune(tmp_path, newest=30, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000020", "step-00000030", "step-00000040", "step-00000045", "step-00000050",
        "step-123", "step-abc", "step-latest"]
    assert checkpoints.steps(tmp_path) == [20, 30, 40]


def test_a_checkpoint_path_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    assert checkpoints.checkpoint_folder(None) is None
    assert checkpoints.checkpoint_folder(tmp_path / "new") == tmp_path / "new"  # made later
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file: is not a directory"):
        checkpoints.checkpoint_folder(tmp_path / "file")
    with pytest.raises(InputError, match="new: no such checkpoint folder"):
        checkpoints.checkpoint_folder(tmp_path / "new", must_exist=True)


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--resume-from"])
def test_the_example_script_refuses_a_bad_folder_before_training(tmp_path: Path,
                                                                   flag: str) -> None:
    (tmp_path / "ckpt").write_text("a file where the folder should be")
    target = tmp_path / ("ckpt" if flag == "--checkpoint-dir" else "absent")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tinygpt.py"), flag,
                           str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {target}: " + ("is not a directory; a checkpoint folder must be one"
                                if flag == "--checkpoint-dir" else "no such checkpoint folder")]


# ---------------------------------------------------------------- which entries a rank reads


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with single_process_group():
        yield


def rank_state(plan_path: Path, replica: int, diloco: bool) -> train_state.RankState:
    """Replica `replica`'s first device of `plan_path` as a RankState (no pipeline: the
    read plan only needs the placement, the parameters, the optimizer and the DiLoCo)."""
    plan = load_plan(plan_path)
    stage = plan.stage(plan.replicas[replica].stages[0])
    device = stage.devices[0]
    placement = Placement(device.split(":")[0], device, plan.rank_of()[device], 0,
                          plan.replicas[replica].id, 0, 0)
    run = PlanRun(plan, plan_path, placement, {}, {}, None, 0)  # type: ignore[arg-type]
    model = torch.nn.Linear(2, 2)
    named = list(model.named_parameters())
    outer = DiLoCo(model, sync_every=4, broadcast_initial=False) if diloco else None
    return train_state.RankState(run, named, torch.optim.AdamW(model.parameters()), False,
                                 outer, {n: n for n, _ in named})


def manifest_of(sync: str, replicas: int, entries: list[str]) -> Manifest:
    return Manifest(format=FORMAT, step=8, sync=sync, replicas=replicas, optimizer="AdamW",
                    inner_steps=8 if sync == "diloco" else None, files={"rank-0.pt": FileEntry(
                        sha256="0" * 64, size=1, entries=entries)})


def diloco_entries(replicas: int) -> list[str]:
    names = ["weight", "bias"]
    return [*(f"replica{r}/{kind}/{n}" for r in range(replicas) for n in names
              for kind in ("model", "optim", "group")),
            *(f"outer/{kind}/{n}" for n in names for kind in ("global", "momentum"))]


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plans")
    return {"diloco-2": make_plan(root / "d2", {"a": 1, "b": 1}, 1, wan_gbps=0.01,
                                  sync="diloco"),
            "allreduce": make_plan(root / "a1", {"a": 1}, 1, sync="allreduce")}


def read(state: train_state.RankState, manifest: Manifest) -> train_state.ReadPlan:
    plan = train_state.read_plan(state, manifest, Path("ckpt/step-00000008"))
    assert isinstance(plan, train_state.ReadPlan), plan
    return plan


def test_each_replica_reads_its_own_or_the_global_state(group: None,
                                                          plans: dict[str, Path]) -> None:
    assert len(load_plan(plans["diloco-2"]).replicas) == 2
    kept = read(rank_state(plans["diloco-2"], 1, diloco=True),
                manifest_of("diloco", 2, diloco_entries(2)))
    assert kept.weights == {"weight": "replica1/model/weight", "bias": "replica1/model/bias"}
    assert kept.optim == {"weight": ["replica1/optim/weight"], "bias": ["replica1/optim/bias"]}
    assert kept.outer["weight"] == {"global": "outer/global/weight",
                                    "momentum": "outer/momentum/weight"}
    assert kept.inner_steps == 8
    one = manifest_of("diloco", 1, diloco_entries(1))
    new = read(rank_state(plans["diloco-2"], 1, diloco=True), one)
    assert new.weights == {"weight": "outer/global/weight", "bias": "outer/global/bias"}
    assert new.optim == {} and new.groups == {}
    assert new.notes == ["replicas 1..1 are new to the run: they start from the global "
                         "parameters with a fresh optimizer"]
    assert read(rank_state(plans["diloco-2"], 0, diloco=True), one).weights == {
        "weight": "replica0/model/weight", "bias": "replica0/model/bias"}
    fewer = read(rank_state(plans["diloco-2"], 0, diloco=True),
                 manifest_of("diloco", 3, diloco_entries(3)))
    assert fewer.notes == ["the checkpoint's replicas 2..2 are left out: their steps since "
                           "their last sync are lost"]


def test_reads_across_sync_kinds_and_refusals(group: None, plans: dict[str, Path]) -> None:
    synced = read(rank_state(plans["allreduce"], 0, diloco=False),
                  manifest_of("diloco", 2, diloco_entries(2)))
    assert synced.weights == {"weight": "replica0/model/weight", "bias": "replica0/model/bias"}
    assert synced.outer == {} and "the outer state is dropped" in synced.notes[0]
    flat = manifest_of("allreduce", 2, ["model/weight", "model/bias", "optim/weight/step"])
    started = read(rank_state(plans["diloco-2"], 1, diloco=True), flat)
    assert started.weights == {"weight": "model/weight", "bias": "model/bias"}
    assert started.optim == {"weight": ["optim/weight/step"], "bias": []}
    assert started.outer == {} and started.inner_steps == 0
    assert started.notes == ["DiLoCo starts its outer state from the resumed weights"]
    state = rank_state(plans["allreduce"], 0, diloco=False)
    other_model = manifest_of("allreduce", 2, ["model/weight"])
    problem = train_state.read_plan(state, other_model, Path("ckpt/step-00000008"))
    assert isinstance(problem, Problem)
    assert problem.reason == "has no entry model/bias (written for another model?)"
    sgd = flat.model_copy(update={"optimizer": "SGD"})
    problem = train_state.read_plan(state, sgd, Path("ckpt/step-00000008"))
    assert problem.reason == "written with the optimizer SGD, this run uses AdamW"


# ---------------------------------------------------------------- resuming on gloo ranks


@dataclass
class Straight:
    """20 steps on a 2-stage plan (layers [0, 5) and [5, 8)), checkpoints at 10 and 20."""

    plan: Path
    folder: Path
    ranks: list[dict[str, Any]]
    run: dict[str, Any]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Straight:
    root = tmp_path_factory.mktemp("two-stages")
    plan = make_plan(root / "plan", {"a": 2}, stages=2, layers=[(0, 5), (5, 8)])
    folder = root / "ckpt"
    run = dict(RUN, steps=20, checkpoint_every=10, checkpoint_dir=str(folder))
    ranks = launch(plan, run, root / "out")
    assert checkpoints.steps(folder) == [10, 20]
    return Straight(plan, folder, ranks, run)


def copy_of(straight: Straight, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path / "ckpt"
    shutil.copytree(straight.folder, folder)
    return folder, dict(straight.run, checkpoint_dir=str(folder))


# rank 0 (stage 0) reads only rank-0.pt, rank 1 only rank-1.pt: damage to one file is
# found by one rank, and both must go back to step 10
@pytest.mark.parametrize("kind, damaged", [("truncated", "rank-0.pt"),
                                           ("flipped bytes", "rank-1.pt")])
def test_a_damaged_newest_step_is_skipped_and_the_run_continues_bit_for_bit(
        tmp_path: Path, straight: Straight, kind: str, damaged: str) -> None:
    folder, run = copy_of(straight, tmp_path)
    DAMAGE[kind][0](folder / "step-00000020" / damaged)
    (folder / "step-latest").mkdir()  # strays: never fatal, never removed
    (folder / "step-00000030").write_text("not a folder")
    (folder / "step-00000015").mkdir()  # a write cut short: said, then ignored
    resumed = launch(straight.plan, run, tmp_path / "out")
    assert [r["start_step"] for r in resumed] == [10, 10]
    lines = log_lines(tmp_path / "out")
    skipped = [line for line in lines if "skipped" in line]
    prefix = f"checkpoint step 20 skipped: {folder / 'step-00000020' / damaged}: "
    assert len(skipped) == 1 and skipped[0].startswith(prefix), skipped
    assert re.search(DAMAGE[kind][1], skipped[0].removeprefix(prefix))
    assert f"resumed from step 10 ({folder / 'step-00000010'})" in lines
    assert f"{folder / 'step-00000015'}: no manifest.json, not a checkpoint (a write cut " \
        "short, or one from before checkpoints had manifests); ignored" in lines
    for again, whole in zip(resumed, straight.ranks, strict=True):
        for name, value in again["params"].items():
            assert torch.equal(value, whole["params"][name]), name
    assert (folder / "step-latest").is_dir() and (folder / "step-00000030").is_file()
    assert checkpoints.steps(folder) == [10, 20]  # step 20 written anew


def test_with_nothing_intact_every_rank_stops_with_one_error(tmp_path: Path,
                                                             straight: Straight) -> None:
    folder, run = copy_of(straight, tmp_path)
    flip_bytes(folder / "step-00000020" / "rank-0.pt")
    (folder / "step-00000010" / "rank-1.pt").unlink()
    with pytest.raises(RuntimeError, match="no checkpoint that every rank can read intact "
                                           r"\(2 tried; the newest: .*step-00000020"):
        launch(straight.plan, run, tmp_path / "refused")  # not a silent fresh start
    lines = [line for line in log_lines(tmp_path / "refused") if "skipped" in line]
    assert lines == [  # one line per damaged file, from rank 0 only
        f"checkpoint step 20 skipped: {folder / 'step-00000020' / 'rank-0.pt'}: sha256 "
        "differs from the manifest (damaged bytes)",
        f"checkpoint step 10 skipped: {folder / 'step-00000010' / 'rank-1.pt'}: missing"]


# ---------------------------------------------------------------- another plan


def reference_losses(folder: Path, run: dict[str, Any], steps: list[int]) -> list[float]:
    """One process, the whole model and its AdamW loaded by name from `folder`; the mean
    loss of each step over every microbatch of the global batch."""
    entries = entries_of(folder)
    model = make_model(run)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(entries[f"model/{name}"])
    optimizer = make_optimizer(run, list(params.values()))
    state = optimizer.state_dict()
    for index, name in enumerate(params):
        state["state"][index] = {e.rsplit("/", 1)[1]: v for e, v in entries.items()
                                 if e.startswith(f"optim/{name}/")}
    optimizer.load_state_dict(state)
    losses = []
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(run, step)
        total = 0.0
        for mb in range(MICROBATCHES):
            _, loss = model(*make_batch(run, step, mb, MICROBATCH))
            (loss / MICROBATCHES).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / MICROBATCHES)
    return losses


RESHARDED = {
    "4 stages, layers [0,2) [2,4) [4,6) [6,8)": ({"a": 4}, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    "1 stage of 2 lanes with ZeRO-1": ({"a": 2}, 1, None),
}


@pytest.mark.parametrize("case", list(RESHARDED))
def test_resume_under_another_plan_steps_like_one_process(
        tmp_path: Path, straight: Straight, case: str) -> None:
    sites, stages, layers = RESHARDED[case]
    plan = make_plan(tmp_path / "plan", sites, stages, layers, optimizer_sharding="zero1")
    assert len(load_plan(plan).stages[0].devices) == (2 if stages == 1 else 1)
    run = dict(RUN, steps=22, log_every=1, resume_from=str(straight.folder),
               checkpoint_dir=str(tmp_path / "ckpt"))
    ranks = launch(plan, run, tmp_path / "out")
    assert {r["start_step"] for r in ranks} == {20}
    got = ranks[0]["losses"]
    want = reference_losses(straight.folder / "step-00000020", run, [20, 21])
    assert sorted(got) == [21, 22]
    assert got[21] == pytest.approx(want[0], abs=1e-5)
    assert got[22] == pytest.approx(want[1], abs=1e-5)  # the optimizer state came too
    assert checkpoints.steps(tmp_path / "ckpt") == [22]


def test_another_plan_writes_back_the_entries_it_read(
        tmp_path: Path, straight: Straight, monkeypatch: pytest.MonkeyPatch) -> None:
    # one stage of two ZeRO-1 lanes: the weights come back from lane 0, each optimizer
    # state from the lane that owns it, every entry equal to what the 2-stage plan wrote.
    # The folder to resume from reaches the ranks as a launcher would hand it over: in
    # HETSCHED_RESUME_FROM, not as an argument of the script.
    plan = make_plan(tmp_path / "plan", {"a": 2}, 1, optimizer_sharding="zero1")
    out = tmp_path / "ckpt"
    monkeypatch.setenv(checkpoints.RESUME_FROM_ENV, str(straight.folder))
    ranks = launch(plan, dict(RUN, steps=20, checkpoint_dir=str(out)), tmp_path / "out")
    assert [r["start_step"] for r in ranks] == [20, 20]  # nothing to train: finish()
    # writes step 20 under this plan
    before, after = entries_of(straight.folder / "step-00000020"), entries_of(
        out / "step-00000020")
    assert before.keys() == after.keys()
    for entry, value in before.items():
        same = torch.equal(value, after[entry]) if isinstance(value, torch.Tensor) \
            else value == after[entry]
        assert same, entry
    files = json.loads((out / "step-00000020" / "manifest.json").read_text())["manifest"][
        "files"]
    optim = [{e.split("/")[1] for e in files[f]["entries"] if e.startswith("optim/")}
             for f in ("rank-0.pt", "rank-1.pt")]
    assert optim[0] and optim[1] and not optim[0] & optim[1]


@pytest.mark.slow
def test_diloco_state_moves_to_more_stages_entry_for_entry(tmp_path: Path) -> None:
    # DiLoCo between two sites: one stage per replica, then two stages per replica. Every
    # replica's weights and optimizer, the outer global values and momentum and the inner
    # step count come back under the new split exactly; the new plan then trains on.
    wan = 0.01
    choice = DilocoChoice(sync_every=4, fragments=2, overlap_steps=1)
    one = make_plan(tmp_path / "one", {"a": 1, "b": 1}, 1, wan_gbps=wan, sync="diloco",
                    diloco=choice)
    two = make_plan(tmp_path / "two", {"a": 2, "b": 2}, 2, wan_gbps=wan, sync="diloco",
                    diloco=choice)
    assert [len(load_plan(p).replicas) for p in (one, two)] == [2, 2]
    first = tmp_path / "ckpt-one"
    launch(one, dict(RUN, steps=8, checkpoint_every=8, checkpoint_dir=str(first)),
           tmp_path / "out-one")
    second = tmp_path / "ckpt-two"
    run = dict(RUN, steps=8, resume_from=str(first), checkpoint_dir=str(second))
    launch(two, run, tmp_path / "out-two")
    before, after = entries_of(first / "step-00000008"), entries_of(second / "step-00000008")
    assert before.keys() == after.keys()
    assert any(e.startswith("outer/momentum/") for e in before)
    assert any(e.startswith("replica1/optim/") for e in before)
    for entry, value in before.items():
        same = torch.equal(value, after[entry]) if isinstance(value, torch.Tensor) \
            else value == after[entry]
        assert same, entry
    manifests = [json.loads((f / "step-00000008" / "manifest.json").read_text())["manifest"]
                 for f in (first, second)]
    assert manifests[0]["inner_steps"] == manifests[1]["inner_steps"] == 8
    ranks = launch(two, dict(run, steps=12, log_every=1), tmp_path / "out-more")
    assert {r["start_step"] for r in ranks} == {8}
    assert sorted(ranks[0]["losses"]) == [9, 10, 11, 12]

    # a plan without DiLoCo (one process) takes replica 0's weights and optimizer
    alone = make_plan(tmp_path / "alone", {"a": 1}, 1)
    third = tmp_path / "ckpt-alone"
    launch(alone, dict(RUN, steps=8, resume_from=str(first), checkpoint_dir=str(third)),
           tmp_path / "out-alone")
    assert any("every replica resumes replica 0's weights and optimizer; the outer state is "
               "dropped" in line for line in log_lines(tmp_path / "out-alone"))
    taken = entries_of(third / "step-00000008")
    assert taken.keys() == {e.removeprefix("replica0/") for e in before
                            if e.startswith("replica0/")}
    for entry, value in taken.items():
        same = torch.equal(value, before[f"replica0/{entry}"]) \
            if isinstance(value, torch.Tensor) else value == before[f"replica0/{entry}"]
        assert same, entry
