"""Training data a user brings: token streams, and the batch of every (step, microbatch).

Two sources, each one 1-D stream of token ids:

- `text_tokens(folder, ...)`: the files of a directory (sorted by path, hidden files and
  `site-packages`/`__pycache__` folders left out), each followed by a newline, as bytes
  (byte-level, vocab 256) or through a local `tokenizer.json` (the `tokenizers`
  package, imported only then);
- `token_file(path, dtype)`: a flat binary file of token ids (uint16, uint32, int32 or
  int64, native byte order), memory-mapped with numpy: nothing is read until a batch
  needs it. `save_token_file` writes one.

`TokenBatches` cuts the stream into non-overlapping windows of `seq_len + 1` tokens, keeps
the last `eval_fraction` of them for evaluation and deals the rest out by sample number:
sample `i` of microbatch `mb` at step `s` is number `g = (s * microbatches_per_step + mb)
* batch_size + i`, and takes window `P_e(g mod N)` of epoch `e = g div N`, where `P_e` is
a pseudo-random permutation of the N training windows keyed by (seed, e) (a Feistel
network: no table, the same on every machine). So within an epoch no window repeats,
the plan's microbatches (numbered across all replicas) never share one, and a batch
depends on (seed, step, microbatch) alone: a restart replays exactly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from topology.errors import InputError

__all__ = ["TokenBatches", "Tokens", "save_token_file", "text_tokens", "token_file"]

TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Tokens:
    """A stream of token ids (a numpy array or memmap) and where it came from."""

    ids: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def text_tokens(folder: str | Path, *, pattern: str = "*.txt",
                tokenizer: str | Path | None = None, max_bytes: int | None = None) -> Tokens:
    """The files under `folder` matching `pattern`, byte-level or via `tokenizer`."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError("not a directory", root)
    files = [p for p in sorted(root.rglob(pattern), key=lambda p: p.relative_to(root).parts)
             if p.is_file() and not _skipped(p.relative_to(root))]
    if not files:
        raise InputError(f"no files matching {pattern}", root)
    encode = _byte_encoder() if tokenizer is None else _tokenizer_encoder(Path(tokenizer))
    parts, read = [], 0
    for path in files:
        if max_bytes is not None and read >= max_bytes:
            break
        data = path.read_bytes() + b"\n"
        read += len(data)
        parts.append(encode(data, path))
    ids = np.concatenate(parts)
    return Tokens(ids[:max_bytes] if tokenizer is None and max_bytes else ids, str(root))


def token_file(path: str | Path, dtype: str = "uint16") -> Tokens:
    """A binary file of token ids, memory-mapped."""
    path = Path(path)
    if dtype not in TOKEN_DTYPES:
        raise InputError(f"token dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}", path)
    if not path.is_file():
        raise InputError("file not found", path)
    size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
    if size == 0 or size % itemsize:
        raise InputError(f"{size} bytes is not a whole number of {dtype} token ids", path)
    return Tokens(np.memmap(path, dtype=dtype, mode="r"), str(path))


def save_token_file(tokens: Tokens, path: str | Path, dtype: str = "uint16") -> None:
    """Write `tokens` as a flat binary file (refused if an id does not fit `dtype`)."""
    if dtype not in TOKEN_DTYPES:
        raise InputError(f"token dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    info = np.iinfo(dtype)
    if len(tokens) and (int(tokens.ids.max()) > info.max or int(tokens.ids.min()) < 0):
        raise InputError(f"token ids up to {int(tokens.ids.max())} do not fit {dtype}", path)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.ascontiguousarray(tokens.ids, dtype=dtype).tofile(handle)
        os.replace(tmp, path)  # never a half-written token file under its name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class TokenBatches:
    """Deterministic batches of windows of `tokens` (see the module docstring)."""

    tokens: Tokens
    seq_len: int
    batch_size: int
    microbatches_per_step: int
    seed: int = 0
    eval_fraction: float = 0.0
    vocab: int | None = None
    eval_windows: int = field(init=False)
    train_windows: int = field(init=False)

    def __post_init__(self) -> None:
        if min(self.seq_len, self.batch_size, self.microbatches_per_step) < 1:
            raise ValueError("seq_len, batch_size and microbatches_per_step must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        windows = (len(self.tokens) - 1) // self.seq_len
        self.eval_windows = int(windows * self.eval_fraction)
        self.train_windows = windows - self.eval_windows
        if self.train_windows < 1 or (self.eval_fraction > 0 and self.eval_windows < 1):
            raise InputError(f"{len(self.tokens)} tokens are too few for windows of "
                             f"{self.seq_len + 1} (training and eval)", self.tokens.source)

    def batch(self, step: int, microbatch: int) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets (int64, `batch_size x seq_len`) of one microbatch."""
        if step < 0 or not 0 <= microbatch < self.microbatches_per_step:
            raise ValueError(f"no microbatch {microbatch} at step {step}: steps start at 0, "
                             f"microbatches are 0..{self.microbatches_per_step - 1}")
        first = (step * self.microbatches_per_step + microbatch) * self.batch_size
        n = self.train_windows
        windows = [_permute(g % n, n, self._key(g // n))
                   for g in range(first, first + self.batch_size)]
        return self._windows(np.array(windows, dtype=np.int64))

    def eval_batches(self, max_windows: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The held-out windows in order, `batch_size` at a time."""
        count = self.eval_windows if max_windows is None else min(max_windows,
                                                                  self.eval_windows)
        starts = np.arange(self.train_windows, self.train_windows + count, dtype=np.int64)
        return [self._windows(chunk) for chunk in np.array_split(
            starts, max(1, -(-count // self.batch_size))) if len(chunk)]

    def _key(self, epoch: int) -> int:
        return (self.seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF

    def _windows(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        span = self.seq_len + 1
        rows = np.stack([np.asarray(self.tokens.ids[i * self.seq_len: i * self.seq_len + span])
                         for i in indices.tolist()]).astype(np.int64)
        if self.vocab is not None and (rows.max() >= self.vocab or rows.min() < 0):
            bad = int(rows.max() if rows.max() >= self.vocab else rows.min())
            raise InputError(f"token id {bad} is outside the model's vocabulary of "
                             f"{self.vocab}", self.tokens.source)
        window = torch.from_numpy(rows)
        return window[:, :-1], window[:, 1:].contiguous()


def _permute(index: int, n: int, key: int) -> int:
    """Position `index` of a pseudo-random permutation of `range(n)` keyed by `key`: a
    4-round Feistel network on the smallest even number of bits that covers n, walked
    until the result falls below n (each walk step stays a bijection)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = index
    while True:
        left, right = x >> half, x & mask
        for round_ in range(4):
            left, right = right, left ^ (_mix(right, key, round_) & mask)
        x = (left << half) | right
        if x < n:
            return x


def _mix(value: int, key: int, round_: int) -> int:
    """splitmix64's finaliser of (value, key, round): the Feistel round function."""
    z = (value + key + (round_ + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part in SKIPPED_FOLDERS for part in relative.parts)


def _byte_encoder() -> Callable[[bytes, Path], np.ndarray]:
    return lambda data, path: np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def _tokenizer_encoder(path: Path) -> Callable[[bytes, Path], np.ndarray]:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("a tokenizer.json needs tokenizers: pip install 'hetsched[hf]'",
                         path) from None
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers package raises a bare Exception
        raise InputError(f"not a tokenizer.json: {str(exc).splitlines()[0]}", path) from None

    def encode(data: bytes, source: Path) -> np.ndarray:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text (byte {exc.start})", source) from None
        return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)

    return encode
