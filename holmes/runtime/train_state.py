"""A rank's training state as named checkpoint entries: what it writes, what it reads back
under any plan, and the two collectives that save and resume a step.

Entries (stored by `holmes.runtime.checkpoints`) for a parameter NAME, the model's fully
qualified name (`blocks.3.attn.qkv.weight`; the embedding and head live at stage 0):

    model/NAME              its value
    optim/NAME/FIELD        its optimizer state (exp_avg, exp_avg_sq, step, momentum_buffer...)
    group/NAME              the settings of its optimizer's param group (lr, betas, ...)
    outer/global/NAME       DiLoCo's global value (fp32)
    outer/momentum/NAME     DiLoCo's outer momentum, once its fragment has stepped
    residual/NAME           DiLoCo's error feedback (one replica's), when quantizing with it

Each entry is written once. Under `sync: allreduce` every replica holds the same weights
and optimizer state, so replica 0 writes them: lane 0 of each stage the weights, the owner
of each parameter its optimizer state (ZeRO-1: the lane whose shard holds it; without
sharding, lane 0). Under `sync: diloco` the replicas differ between syncs, so replica r
writes its own, under `replica{r}/` (model, optim, group, residual); the outer state is
the same on every replica and lane 0 of replica 0 writes it.

A rank reads the weights of the parameters its stage holds and the optimizer state of
those it owns, by name, whatever plan wrote them: another stage count or layer split,
another data-parallel width, with or without ZeRO-1. Between DiLoCo runs, replica r reads
replica r's state; a replica the checkpoint does not have starts from the global
parameters with a fresh optimizer (as a replica joining a run would), and replicas the
checkpoint has beyond the plan's are left out (their steps since their last sync are
lost). A plan without DiLoCo resumes a DiLoCo checkpoint's replica 0 (the model
`Trainer.gather_model` evaluates) and drops the outer state; a DiLoCo plan resuming a
checkpoint without DiLoCo starts its outer state from the resumed weights. Rank 0 says
each of these in one line.

`resume`: the ranks agree on the checkpoints of their sources (the folder the run writes,
then the one it resumes from), newest first; for each step every rank checks the files it
needs against the manifest and reads its entries; the step is used when no rank found a
problem, otherwise rank 0 prints one line per damaged file and the ranks try the next
one. No usable step among existing checkpoints is an error, never a silent fresh start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diloco import DiLoCo
from holmes.runtime import checkpoints
from holmes.runtime.checkpoints import FORMAT, FileEntry, Manifest, Problem
from holmes.runtime.plan_run import PlanRun
from topology.errors import InputError


@dataclass
class RankState:
    """What one rank trains, seen by name: its parameters, its (maybe ZeRO-1 restricted)
    optimizer, its DiLoCo and DiLoCo's name for each parameter (-> the model's)."""

    run: PlanRun
    named: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    zero1: bool
    diloco: DiLoCo | None = None
    diloco_names: dict[str, str] = field(default_factory=dict)

    @property
    def replica(self) -> int:
        """This rank's replica by position in the plan (0: the first)."""
        return [r.id for r in self.run.plan.replicas].index(self.run.placement.replica)

    @property
    def uses_diloco(self) -> bool:
        return self.run.plan.sync == "diloco"


@dataclass
class ReadPlan:
    """The entries one rank reads from a step, by role."""

    weights: dict[str, str]  # parameter -> entry
    optim: dict[str, list[str]]  # owned parameter -> its optimizer state entries
    groups: dict[str, str]  # owned parameter -> its group settings entry
    outer: dict[str, dict[str, str]]  # parameter -> {"global"|"momentum"|"residual": entry}
    inner_steps: int
    notes: list[str]

    def entries(self) -> set[str]:
        found = set(self.weights.values()) | set(self.groups.values())
        found.update(e for entries in self.optim.values() for e in entries)
        found.update(e for parts in self.outer.values() for e in parts.values())
        return found


@dataclass
class Resumed:
    step: int
    folder: Path
    bytes: dict[str, int]


# ---- writing


def entries(state: RankState) -> dict[str, Any]:
    """The entries this rank writes (see the module docstring); often none."""
    if not state.uses_diloco and state.replica != 0:
        return {}
    scope = f"replica{state.replica}/" if state.uses_diloco else ""
    lane0 = state.run.placement.lane == 0
    out: dict[str, Any] = {}
    if lane0:
        out.update({f"{scope}model/{n}": _portable(p) for n, p in state.named})
    if state.zero1 or lane0:
        out.update(_optimizer_entries(state, scope))
    if state.diloco is not None and lane0:
        for diloco_name, parts in state.diloco.parameter_states().items():
            name = state.diloco_names[diloco_name]
            if state.replica == 0:
                out[f"outer/global/{name}"] = parts["global"]
                if "momentum" in parts:
                    out[f"outer/momentum/{name}"] = parts["momentum"]
            if "residual" in parts:
                out[f"{scope}residual/{name}"] = parts["residual"]
    return out


def _optimizer_entries(state: RankState, scope: str) -> dict[str, Any]:
    name_of = {id(p): n for n, p in state.named}
    out: dict[str, Any] = {}
    for group in state.optimizer.param_groups:
        settings = {k: _portable(v) for k, v in group.items() if k != "params" and _plain(v)}
        for param in group["params"]:
            name = name_of[id(param)]
            out[f"{scope}group/{name}"] = settings
            for key, value in state.optimizer.state.get(param, {}).items():
                out[f"{scope}optim/{name}/{key}"] = _portable(value)
    return out


def save(state: RankState, directory: Path, step: int, sent: Mapping[str, int]) -> Path:
    """Every rank: write this rank's entries of `step`, then rank 0 the manifest (with the
    bytes every rank has `sent`) and prunes old steps. Returns the step's folder."""
    folder = checkpoints.step_folder(directory, step)
    if dist.get_rank() == 0:
        checkpoints.clear_step(folder)
    dist.barrier()
    mine = entries(state)
    record = (checkpoints.write_rank_file(folder, state.run.placement.plan_rank, mine)
              if mine else None)
    inner = state.diloco.inner_steps if state.diloco is not None else None
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 \
        else None
    dist.gather_object((record, dict(sent), inner), gathered, dst=0)
    if gathered is not None:
        checkpoints.write_manifest(folder, _manifest(state, step, gathered))
        checkpoints.prune(directory, newest=step)
    return folder


def _manifest(state: RankState, step: int, gathered: list[Any]) -> Manifest:
    files = {record["name"]: FileEntry(sha256=record["sha256"], size=record["size"],
                                       entries=record["entries"])
             for record, _, _ in gathered if record is not None}
    sent: dict[str, int] = {}
    for _, counts, _ in gathered:
        for kind, count in counts.items():
            sent[kind] = sent.get(kind, 0) + int(count)
    inner = [steps for _, _, steps in gathered if steps is not None]
    plan = state.run.plan
    return Manifest(format=FORMAT, step=step, sync=plan.sync, replicas=len(plan.replicas),
                    optimizer=type(state.optimizer).__name__,
                    inner_steps=max(inner) if inner else None, bytes=sent, files=files)


# ---- reading


def resume(state: RankState, sources: Sequence[Path],
           log: Callable[[str], None]) -> Resumed | None:
    """Every rank: load the newest step of `sources` that every rank can read intact (see
    the module docstring); None when there is no checkpoint at all."""
    if dist.get_rank() == 0:
        for folder in (f for source in sources for f in checkpoints.cut_short(source)):
            log(f"{folder}: no {checkpoints.MANIFEST}, not a checkpoint (a write cut short, "
                "or one from before checkpoints had manifests); ignored")
    mine = [(step, i) for i, folder in enumerate(sources) for step in checkpoints.steps(folder)]
    candidates = sorted({c for part in _all_gather(mine) for c in part},
                        key=lambda c: (-c[0], c[1]))
    first_problem = ""
    for step, source in candidates:
        folder = checkpoints.step_folder(sources[source], step)
        outcome = _read(state, folder)
        problems = outcome if isinstance(outcome, list) else []
        lines = sorted({str(p) for part in _all_gather(problems) for p in part})
        if not lines:
            plan, values, manifest = outcome  # type: ignore[misc]
            _apply(state, plan, values)
            if dist.get_rank() == 0:
                for note in plan.notes:
                    log(f"resume: {note}")
            return Resumed(step, folder, dict(manifest.bytes))
        first_problem = first_problem or lines[0]
        if dist.get_rank() == 0:
            for line in lines:
                log(f"checkpoint step {step} skipped: {line}")
    if not candidates:
        return None
    raise InputError(f"no checkpoint that every rank can read intact ({len(candidates)} "
                     f"tried; the newest: {first_problem})", sources[0])


def _read(state: RankState, folder: Path) -> tuple[ReadPlan, dict[str, Any], Manifest] \
        | list[Problem]:
    """This rank's entries of the step in `folder`, or the problems that stop it."""
    manifest = checkpoints.read_manifest(folder)
    if isinstance(manifest, Problem):
        return [manifest]
    plan = read_plan(state, manifest, folder)
    if isinstance(plan, Problem):
        return [plan]
    file_of = manifest.file_of()
    problems = checkpoints.verify(folder, manifest, {file_of[e] for e in plan.entries()})
    if problems:
        return problems
    try:
        values = checkpoints.read_entries(folder, manifest, plan.entries())
    except checkpoints.CheckpointReadError as exc:
        return [exc.problem]
    mismatch = _shape_problem(state, plan, values, folder)
    return [mismatch] if mismatch else (plan, values, manifest)


def read_plan(state: RankState, manifest: Manifest, folder: Path) -> ReadPlan | Problem:
    """Which entries of `manifest` this rank reads, or why it cannot resume from it."""
    at = folder / checkpoints.MANIFEST
    if manifest.optimizer != type(state.optimizer).__name__:
        return Problem(at, f"written with the optimizer {manifest.optimizer}, this run uses "
                           f"{type(state.optimizer).__name__}")
    known = manifest.file_of()
    source = _source_scope(state, manifest)
    names = [n for n, _ in state.named]
    weights = {n: f"{source}model/{n}" if source is not None else f"outer/global/{n}"
               for n in names}
    outer: dict[str, dict[str, str]] = {}
    if state.diloco is not None and manifest.sync == "diloco":
        for n in names:
            parts = {"global": f"outer/global/{n}", "momentum": f"outer/momentum/{n}"}
            if source is not None:
                parts["residual"] = f"{source}residual/{n}"
            outer[n] = {k: e for k, e in parts.items() if k == "global" or e in known}
    missing = [e for e in [*weights.values(), *(p["global"] for p in outer.values())]
               if e not in known]
    if missing:
        return Problem(at, f"has no entry {missing[0]} (written for another model?)")
    optim, groups = _optimizer_plan(state, source, known) if source is not None else ({}, {})
    inner = manifest.inner_steps if manifest.sync == "diloco" else 0
    return ReadPlan(weights, optim, groups, outer, inner or 0, _notes(state, manifest))


def _source_scope(state: RankState, manifest: Manifest) -> str | None:
    """The prefix of the entries this rank's replica resumes (None: the global ones)."""
    if manifest.sync != "diloco":
        return ""
    if not state.uses_diloco:
        return "replica0/"
    return f"replica{state.replica}/" if state.replica < manifest.replicas else None


def _optimizer_plan(state: RankState, source: str,
                    known: Mapping[str, str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    stepped = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    owned = [n for n, p in state.named if id(p) in stepped]
    fields: dict[str, list[str]] = {}
    prefix = f"{source}optim/"
    for entry in known:
        if entry.startswith(prefix):
            fields.setdefault(entry[len(prefix):].split("/", 1)[0], []).append(entry)
    optim = {n: sorted(fields.get(n, [])) for n in owned}
    groups = {n: f"{source}group/{n}" for n in owned if f"{source}group/{n}" in known}
    return optim, groups


def _notes(state: RankState, manifest: Manifest) -> list[str]:
    then, now = manifest.replicas, len(state.run.plan.replicas)
    if manifest.sync != "diloco":
        return ["DiLoCo starts its outer state from the resumed weights"] \
            if state.uses_diloco else []
    if not state.uses_diloco:
        return [f"step {manifest.step} was written by DiLoCo over {then} replica(s): every "
                "replica resumes replica 0's weights and optimizer; the outer state is dropped"]
    if now > then:
        return [f"replicas {then}..{now - 1} are new to the run: they start from the global "
                "parameters with a fresh optimizer"]
    if now < then:
        return [f"the checkpoint's replicas {now}..{then - 1} are left out: their steps since "
                "their last sync are lost"]
    return []


def _shape_problem(state: RankState, plan: ReadPlan, values: Mapping[str, Any],
                   folder: Path) -> Problem | None:
    named = dict(state.named)
    checks = [(n, e) for n, e in plan.weights.items()]
    checks += [(n, parts["global"]) for n, parts in plan.outer.items()]
    for name, entry in checks:
        value = values[entry]
        if not isinstance(value, Tensor) or value.shape != named[name].shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return Problem(folder / checkpoints.MANIFEST,
                           f"{entry} is {shape}, the model's {name} is "
                           f"{tuple(named[name].shape)}")
    return None


@torch.no_grad()
def _apply(state: RankState, plan: ReadPlan, values: Mapping[str, Any]) -> None:
    named = dict(state.named)
    for name, entry in plan.weights.items():
        named[name].copy_(values[entry])
    _load_optimizer(state, plan, values)
    if state.diloco is None:
        return
    model_of = state.diloco_names
    if plan.outer:
        parts = {d: {k: values[e] for k, e in plan.outer[model_of[d]].items()}
                 for d in model_of}
    else:
        parts = {d: {"global": named[model_of[d]].detach()} for d in model_of}
    state.diloco.load_parameter_states(parts, plan.inner_steps)


def _load_optimizer(state: RankState, plan: ReadPlan, values: Mapping[str, Any]) -> None:
    """Through torch's own `load_state_dict`, which casts each state to its parameter."""
    name_of = {id(p): n for n, p in state.named}
    saved = state.optimizer.state_dict()
    for group, saved_group in zip(state.optimizer.param_groups, saved["param_groups"],
                                  strict=True):
        names = [name_of[id(p)] for p in group["params"]]
        settings = next((values[plan.groups[n]] for n in names if n in plan.groups), {})
        saved_group.update({k: v for k, v in settings.items() if k in saved_group
                            and k != "params"})
        for name, index in zip(names, saved_group["params"], strict=True):
            fields = {e.rsplit("/", 1)[1]: values[e] for e in plan.optim.get(name, [])}
            if fields:
                saved["state"][index] = fields
    state.optimizer.load_state_dict(saved)


# ---- helpers


def _portable(value: Any) -> Any:
    """A tensor as a compact CPU copy (what a checkpoint keeps); other values as they are."""
    return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value


def _plain(value: Any) -> bool:
    """Whether a group setting survives `torch.load(weights_only=True)`."""
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str | Tensor)


def _all_gather(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
