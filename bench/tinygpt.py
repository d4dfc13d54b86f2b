"""A tiny byte-level GPT and its corpus: the Python standard library's own source text.

Owns the model and data that benchmarks share, so that every method is compared on the
same network and the same bytes. Readable in one file, after nanoGPT:

- `TinyGPTConfig`, `TinyGPT`: a decoder-only transformer over bytes (vocab 256), pre-norm
  blocks in `TinyGPT.blocks` (an `nn.ModuleList`, one entry per layer), tied embedding/head;
  `embed` and `head_loss` make it a `skippipe.runtime.SkippableModel`.
- `stdlib_corpus(max_bytes, seed)`: the `.py` files under `sysconfig.get_paths()["stdlib"]`,
  shuffled by file with `seed`, split by file into train and eval bytes (no file is in both).
- `batch_at` / `batches`: random windows chosen from (seed, step) alone, so a run that
  resumes at step k sees exactly the batches an uninterrupted run sees at step k.
- `eval_loss`: mean cross-entropy over fixed, non-overlapping windows of the eval split.

Depends on torch only.
"""

from __future__ import annotations

import hashlib
import math
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyGPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer over bytes; `forward(idx, targets)` returns (logits, loss)."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token + position embedding (the input end of `skippipe.runtime.SkippableModel`)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final norm, tied head and mean cross-entropy (the output end of the contract)."""
        logits = self.lm_head(self.ln_f(h))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


@dataclass(frozen=True)
class Corpus:
    """Train and eval bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    eval: torch.Tensor
    train_files: int
    eval_files: int
    source: str

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256(bytes(self.train))
        digest.update(bytes(self.eval))
        return digest.hexdigest()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted, without site-packages and bytecode."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int, seed: int = 0, eval_fraction: float = 0.1) -> Corpus:
    """`max_bytes` of training text and `eval_fraction * max_bytes` of eval text.

    Files are shuffled with `seed`, eval files are taken first, and a file never
    contributes to both splits. Files are joined with a newline.
    """
    if max_bytes <= 0 or not 0.0 < eval_fraction < 1.0:
        raise ValueError("max_bytes must be > 0 and 0 < eval_fraction < 1")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    random.Random(seed).shuffle(files)
    want_eval = max(int(max_bytes * eval_fraction), 1)
    eval_parts, train_parts = bytearray(), bytearray()
    n_eval = n_train = 0
    for path in files:
        if len(eval_parts) < want_eval:
            eval_parts += path.read_bytes() + b"\n"
            n_eval += 1
        elif len(train_parts) < max_bytes:
            train_parts += path.read_bytes() + b"\n"
            n_train += 1
        else:
            break
    if len(train_parts) < max_bytes:
        raise ValueError(f"the stdlib at {root} holds fewer than {max_bytes} bytes of source")
    return Corpus(
        train=torch.frombuffer(train_parts[:max_bytes], dtype=torch.uint8).clone(),
        eval=torch.frombuffer(eval_parts[:want_eval], dtype=torch.uint8).clone(),
        train_files=n_train,
        eval_files=n_eval,
        source=str(root),
    )


def batch_at(
    data: torch.Tensor, step: int, batch_size: int, block_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for `step` of the stream `seed`: inputs and next-byte targets, int64."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + block_size + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def batches(
    data: torch.Tensor, batch_size: int, block_size: int, seed: int, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless `batch_at(data, step, ...)` for step = start, start + 1, ..."""
    step = start
    while True:
        yield batch_at(data, step, batch_size, block_size, seed)
        step += 1


@torch.no_grad()
def eval_loss(model: TinyGPT, data: torch.Tensor, batch_size: int = 32) -> float:
    """Mean loss over every non-overlapping window of `data` (deterministic)."""
    block = model.config.block_size
    n_windows = (len(data) - 1) // block
    if n_windows == 0:
        raise ValueError("eval data is shorter than one window")
    starts = torch.arange(n_windows) * block
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        windows = torch.stack([data[s : s + block + 1] for s in chunk.tolist()]).long()
        _, loss = model(windows[:, :-1], windows[:, 1:])
        total += float(loss) * len(chunk)
    model.train(was_training)
    return total / n_windows
