"""Reading YAML files into plain mappings and writing outputs atomically.

Every file hetsched reads goes through `load_yaml_mapping`, so a missing file, a YAML
syntax error, a key given twice in one mapping (YAML would keep the last silently) or a
document that is not a mapping all become one `InputError` naming the file (and line).

Every file hetsched writes goes through `write_text_atomic` / `write_bytes_atomic`
(a temporary file in the same folder, then a rename), so a crash or a refused input
never leaves a half-written output behind. Commands call `check_output` on their output
paths before doing any work: an output that is one of the command's inputs, that exists
and is not a regular file (a device such as /dev/null, a folder, a symbolic link), or
whose folder cannot be written is refused in one line, and the writers check again.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from topology.errors import InputError

# libyaml's parser when PyYAML was built with it (about 5x faster on large topologies).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
MAX_INPUT_BYTES = 256 * 2**20


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc,valid-type]
    """The safe loader (libyaml's parser when there is one) refusing duplicate keys.

    Only construction is in Python, so the check costs one dict per mapping. Merge keys
    (`<<: *defaults`) may still be overridden: they are not duplicates. A scalar's tag is
    resolved once per distinct (text, implicit) pair of a file: a large topology repeats
    the same few values (`gpu`, a model name, a speed) hundreds of thousands of times,
    and PyYAML's resolver, in Python, tries its patterns on each (half the load time).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._scalar_tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is not yaml.ScalarNode or not isinstance(value, str):
            return super().resolve(kind, value, implicit)
        key = (value, tuple(implicit))
        tag = self._scalar_tags.get(key)
        if tag is None:
            tag = self._scalar_tags[key] = super().resolve(kind, value, implicit)
        return tag

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Hashable, int] = {}
            for key_node, _ in node.value:
                key = _key_of(self, key_node)
                if key is None:
                    continue
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r} (first on line "
                        f"{first_line[key]})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _key_of(loader: yaml.BaseLoader, node: yaml.Node) -> tuple[str, Any] | None:
    """What makes a mapping key the same as another: a string's text (cheap: nearly every
    key), else its constructed value (`1` and `01` are one int); None for a merge key or
    an unhashable key (the base constructor reports that one)."""
    if node.tag == _MERGE_TAG:
        return None
    if node.tag == _STR_TAG:
        return node.tag, node.value
    value = loader.construct_object(node, deep=True)
    return (node.tag, value) if isinstance(value, Hashable) else None


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Parse `path` as YAML and return its top-level mapping."""
    path = Path(path)
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(f"{where}{problem}", path) from None
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping at the top level, got {type(data).__name__}", path)
    return data


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, at most MAX_INPUT_BYTES (a device like /dev/zero ends too)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc.__class__.__name__}", path) from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"larger than {MAX_INPUT_BYTES // 2**20} MiB: not a hetsched file", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", path) from None


def check_output(path: str | Path, *inputs: str | Path | None,
                 field: str | None = None) -> Path:
    """Refuse `path` as an output: it is one of `inputs`, it exists and is not a regular
    file, or its folder cannot be made or written. Returns it as a Path."""
    path = Path(path)
    mode = _mode(path, field)
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"is {_kind(mode)}, not a regular file: refusing to replace it "
                         "(write to a regular file or a new path)", path, field)
    for source in inputs:
        if source is not None and mode is not None and _same_file(path, Path(source)):
            raise InputError(f"is also an input of this command ({source}): refusing to "
                             "write over it (choose another output)", path, field)
    _check_folder(path, field)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"cannot write: {exc.strerror or exc}", path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode(path: Path, field: str | None) -> int | None:
    """st_mode of `path` itself (a link is not followed); None when nothing is there."""
    try:
        return path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there (a file above it is reported by _check_folder)
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", path, field) from None


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_folder(path: Path, field: str | None) -> None:
    """The nearest existing folder above `path` must be a folder this process may write."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write: {folder} is not a folder", path, field)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write: no permission to write in {folder}", path, field)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
