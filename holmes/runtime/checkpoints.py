"""The checkpoint folder of a run: step folders of entries named by parameter, and their checks.

    DIR/step-00000020/rank-0.pt       entries plan rank 0 wrote (ranks that own nothing write none)
    DIR/step-00000020/rank-2.pt
    DIR/step-00000020/manifest.json   written last: the step, each file's sha256, size and entries

An entry is one tensor (or small value) under a name such as `model/blocks.3.attn.qkv.weight`
or `optim/wte.weight/exp_avg` (`holmes.runtime.train_state` says which rank writes and reads
which), so a run under any plan finds a parameter's state by its name, whichever rank of
whichever plan wrote it. The folder must be the same for every rank (one host, or a shared
file system): a rank may read what another wrote.

Integrity. Each rank file is written atomically (temporary file, fsync, rename) and hashed
back from disk; rank 0 then writes the manifest, atomically and with a sha256 of its own
text. A step folder without a manifest is a checkpoint cut short, not a checkpoint. Before
a step is used, a reader checks every file it needs against the manifest: missing,
truncated, empty, flipped bytes or garbage each give one problem naming the file
(`verify`), and the caller moves on to an older step. Anything under DIR that is not a
folder named `step-` and eight digits (`step-latest/`, `step-abc`, a file
`step-00000010`) is ignored, and pruning never removes it.

Why not `torch.distributed.checkpoint` (DCP), which reshards by fully qualified name:
- it keeps no checksum, so the manifest would be built around files whose names and byte
  ranges are private to its `FileSystemWriter` (`__R_N.distcp`, `.metadata`), and a reader
  could check the files it needs only through that private index;
- its resharding is for tensors split across ranks (DTensor, ShardedTensor). This runtime
  never splits a tensor: a stage holds whole blocks, ZeRO-1 owns whole parameters
  (`holmes.runtime.zero`), so an index of whole tensors by name is all a new plan needs;
- its load fills tensors allocated beforehand, but a fresh optimizer has no state yet
  (torch allocates it at the first step), and its save and load are collectives, while
  these files can be read by one process with no process group (a test's reference, a
  re-planner looking at a run).
Were tensor parallelism to split parameters, DCP would be the tool; the entry names are
already the fully qualified names it keys by.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from diloco import save_checkpoint
from topology.errors import InputError
from topology.files import write_text_atomic
from topology.validation import Strict, describe_validation_error

FORMAT = "hetsched.checkpoint/2"
RESUME_FROM_ENV = "HETSCHED_RESUME_FROM"  # a folder to resume from, for `Trainer`
MANIFEST = "manifest.json"
KEEP_CHECKPOINTS = 2
_STEP = re.compile(r"step-(\d{8})")


class FileEntry(Strict):
    """One rank file of a step: its checksum, size and the names of its entries."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    entries: list[str]


class Manifest(Strict):
    """What a step folder holds. `sync` and `replicas` say how it was written (DiLoCo runs
    keep one set of weights per replica); `inner_steps`: DiLoCo's, None without it;
    `bytes`: what the run had sent per link class, over every rank."""

    format: Literal["hetsched.checkpoint/2"]
    step: int = Field(ge=0)
    sync: Literal["allreduce", "diloco"]
    replicas: int = Field(ge=1)
    optimizer: str
    inner_steps: int | None = None
    bytes: dict[str, int] = Field(default_factory=dict)
    files: dict[str, FileEntry]

    def file_of(self) -> dict[str, str]:
        """Entry name -> the file that holds it."""
        return {entry: name for name, f in self.files.items() for entry in f.entries}


@dataclass(frozen=True)
class Problem:
    """Why a step cannot be used: the file at fault and what is wrong with it."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ---- folders


def checkpoint_folder(path: str | os.PathLike[str] | None, *,
                      must_exist: bool = False) -> Path | None:
    """`path` as a checkpoint folder, refused (InputError) when it is something else than a
    folder, or is missing although `must_exist` (a folder to resume from). Call it before
    any process group work: the error is the script's bad input."""
    if path is None or str(path) == "":
        return None
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError("is not a directory; a checkpoint folder must be one", folder)
    if must_exist and not folder.is_dir():
        raise InputError("no such checkpoint folder", folder)
    return folder


def step_folder(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}"


def steps(directory: Path | None) -> list[int]:
    """The steps under `directory` whose folder has a manifest (maybe a damaged one),
    oldest first. Other names, files and folders cut short are not checkpoints."""
    return sorted(step for step, folder in _step_folders(directory)
                  if (folder / MANIFEST).is_file())


def cut_short(directory: Path | None) -> list[Path]:
    """Step folders without a manifest: a write that did not finish (or a folder written
    before checkpoints had manifests)."""
    return sorted(folder for _, folder in _step_folders(directory)
                  if not (folder / MANIFEST).exists())


def prune(directory: Path, newest: int, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the `keep` newest checkpoints up to step `newest` (the one just written);
    remove the step folders older than them. Later steps (left by a run that went back
    past a damaged one) and names that are not step folders stay."""
    kept = [s for s in steps(directory) if s <= newest][-keep:]
    if len(kept) < keep:
        return
    for step, folder in _step_folders(directory):
        if step < kept[0]:
            shutil.rmtree(folder, ignore_errors=True)


def _step_folders(directory: Path | None) -> list[tuple[int, Path]]:
    if directory is None or not directory.is_dir():
        return []
    return [(int(match.group(1)), path) for path in directory.iterdir()
            if (match := _STEP.fullmatch(path.name)) and path.is_dir()]


def clear_step(folder: Path) -> None:
    """Make way for a new write of `folder`'s step: the manifest goes first, so that a
    crash half-way leaves no checkpoint there rather than a mixed one."""
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


# ---- writing


def write_rank_file(folder: Path, plan_rank: int, entries: Mapping[str, Any]) -> dict[str, Any]:
    """Write one rank's entries; returns its manifest record (name, sha256, size, entries),
    hashed from what is on disk."""
    path = save_checkpoint(dict(entries), folder / f"rank-{plan_rank}.pt")
    return {"name": path.name, "sha256": sha256_of(path), "size": path.stat().st_size,
            "entries": sorted(entries)}


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """The manifest, last: atomically, with a sha256 of its own text, and the folder synced
    so the step is complete on disk once the manifest is there."""
    body = manifest.model_dump(mode="json")
    text = json.dumps({"manifest": body, "sha256": _text_sha256(body)}, indent=1)
    path = folder / MANIFEST
    write_text_atomic(path, text + "\n")
    _fsync_directory(folder)
    return path


# ---- reading


def read_manifest(folder: Path) -> Manifest | Problem:
    """The step's manifest, or the problem that makes it unusable."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Problem(path, "missing (is the checkpoint folder shared by every host?)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Problem(path, f"not readable JSON ({_first_line(exc)})")
    if not isinstance(data, dict) or set(data) != {"manifest", "sha256"}:
        return Problem(path, "not a checkpoint manifest")
    if _text_sha256(data["manifest"]) != data["sha256"]:
        return Problem(path, "its sha256 does not match its text (damaged)")
    try:
        manifest = Manifest.model_validate(data["manifest"])
    except ValidationError as exc:
        field, message = describe_validation_error(exc)
        return Problem(path, f"{field}: {message}")
    if step_folder(folder.parent, manifest.step) != folder:
        return Problem(path, f"says step {manifest.step}, its folder is {folder.name}")
    return manifest


def verify(folder: Path, manifest: Manifest, names: Iterable[str]) -> list[Problem]:
    """Check the files `names` against the manifest: present, of its size and sha256."""
    problems = []
    for name in sorted(set(names)):
        entry, path = manifest.files[name], folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(Problem(path, "missing"))
            continue
        if size != entry.size:
            what = "empty" if size == 0 else "truncated" if size < entry.size else "too long"
            problems.append(Problem(path, f"{size} bytes, the manifest says {entry.size} "
                                          f"({what})"))
        elif sha256_of(path) != entry.sha256:
            problems.append(Problem(path, "sha256 differs from the manifest (damaged bytes)"))
    return problems


def read_entries(folder: Path, manifest: Manifest, wanted: Iterable[str]) -> dict[str, Any]:
    """The entries `wanted` (each named in the manifest), read from their files; check the
    files with `verify` first. Raises `CheckpointReadError` for a file torch cannot read."""
    file_of = manifest.file_of()
    by_file: dict[str, list[str]] = {}
    for entry in wanted:
        by_file.setdefault(file_of[entry], []).append(entry)
    out: dict[str, Any] = {}
    for name, entries in sorted(by_file.items()):
        path = folder / name
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # whatever torch finds wrong, the file is unusable
            raise CheckpointReadError(Problem(path, f"unreadable ({_first_line(exc)})")) from exc
        missing = [e for e in entries if e not in content]
        if missing:
            raise CheckpointReadError(Problem(path, f"lacks {missing[0]} that the manifest "
                                                    "names"))
        out.update({e: _unmapped(content[e]) for e in entries})
    return out


def _unmapped(value: Any) -> Any:
    """A tensor read through `mmap` copied to memory of its own (the mapping only spares
    reading the entries of a file that this rank does not need)."""
    return value.clone() if isinstance(value, torch.Tensor) else value


class CheckpointReadError(Exception):
    """A file that passed its checks but cannot be read as the manifest says."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _text_sha256(body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
