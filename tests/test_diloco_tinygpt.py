"""bench/tinygpt.py, the model and data the DiLoCo benchmarks (and later ones) share."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tinygpt import (  # noqa: E402
    Corpus,
    TinyGPT,
    TinyGPTConfig,
    batch_at,
    batches,
    eval_loss,
    stdlib_corpus,
    stdlib_files,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return stdlib_corpus(200_000, seed=3, eval_fraction=0.1)


def test_corpus_is_deterministic_and_split_by_file(corpus: Corpus) -> None:
    assert len(corpus.train) == 200_000 and len(corpus.eval) == 20_000
    assert corpus.train.dtype == torch.uint8
    assert stdlib_corpus(200_000, seed=3, eval_fraction=0.1).sha256 == corpus.sha256
    assert stdlib_corpus(200_000, seed=4, eval_fraction=0.1).sha256 != corpus.sha256
    text = bytes(corpus.train[:5000]).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text  # it is Python source
    files = stdlib_files()
    assert files and all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)


def test_batches_depend_only_on_seed_and_step(corpus: Corpus) -> None:
    x, y = batch_at(corpus.train, step=7, batch_size=4, block_size=16, seed=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    stream = batches(corpus.train, 4, 16, seed=1, start=7)
    assert torch.equal(next(stream)[0], x)
    assert not torch.equal(batch_at(corpus.train, 8, 4, 16, 1)[0], x)
    assert not torch.equal(batch_at(corpus.train, 7, 4, 16, 2)[0], x)


def test_model_learns_and_ties_its_head(corpus: Corpus) -> None:
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(block_size=16, n_layer=2, n_embd=32))
    assert model.lm_head.weight is model.wte.weight
    assert len(model.blocks) == 2
    before = eval_loss(model, corpus.eval[:2000])
    assert before == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        _, loss = model(*batch_at(corpus.train, step, 16, 16, seed=0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert eval_loss(model, corpus.eval[:2000]) < before - 1.0
