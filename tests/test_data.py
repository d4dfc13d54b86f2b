"""holmes.runtime.data: token streams from text folders and token files, and the
deterministic batch of every (step, microbatch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from holmes.runtime.data import (
    TokenBatches,
    Tokens,
    _permute,
    save_token_file,
    text_tokens,
    token_file,
)
from topology.errors import InputError


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257, 1024, 1025])
def test_the_window_order_is_a_permutation_per_key(n: int) -> None:
    orders = [[_permute(i, n, key) for i in range(n)] for key in (0, 1)]
    for order in orders:
        assert sorted(order) == list(range(n))
    if n > 8:
        assert orders[0] != orders[1] and orders[0] != list(range(n))


def test_a_text_folder_is_read_in_path_order_without_hidden_or_site_packages(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_bytes(b"second")
    (tmp_path / "1.txt").write_bytes(b"first")
    (tmp_path / ".hidden.txt").write_bytes(b"no")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "x.txt").write_bytes(b"no")
    (tmp_path / "notes.md").write_bytes(b"no")
    tokens = text_tokens(tmp_path)
    assert bytes(tokens.ids.astype(np.uint8)) == b"first\nsecond\n"
    assert bytes(text_tokens(tmp_path, max_bytes=4).ids.astype(np.uint8)) == b"firs"
    with pytest.raises(InputError, match="no files matching \\*.rst"):
        text_tokens(tmp_path, pattern="*.rst")
    with pytest.raises(InputError, match="not a directory"):
        text_tokens(tmp_path / "1.txt")


def test_a_local_tokenizer_json_encodes_the_folder(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world")
    (tmp_path / "text" / "b.txt").write_text("world again zzz")
    tokens = text_tokens(tmp_path / "text", tokenizer=tmp_path / "tokenizer.json")
    assert tokens.ids.tolist() == [1, 2, 2, 3, 0]
    with pytest.raises(InputError, match="missing.json: file not found"):
        text_tokens(tmp_path / "text", tokenizer=tmp_path / "missing.json")
    (tmp_path / "text" / "c.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="c.txt: not UTF-8 text"):
        text_tokens(tmp_path / "text", tokenizer=tmp_path / "tokenizer.json")


def test_a_token_file_is_memory_mapped_and_checked(tmp_path) -> None:
    ids = np.arange(1000, dtype=np.int64) % 700
    save_token_file(Tokens(ids, "mem"), tmp_path / "t.bin", "uint16")
    tokens = token_file(tmp_path / "t.bin", "uint16")
    assert isinstance(tokens.ids, np.memmap) and tokens.ids.tolist() == ids.tolist()
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(InputError, match="7 bytes is not a whole number of uint32 token ids"):
        token_file(tmp_path / "odd.bin", "uint32")
    with pytest.raises(InputError, match="nothing.bin: file not found"):
        token_file(tmp_path / "nothing.bin")
    with pytest.raises(InputError, match="token dtype 'float32' is not one of"):
        token_file(tmp_path / "t.bin", "float32")
    with pytest.raises(InputError, match="token ids up to 70000 do not fit uint16"):
        save_token_file(Tokens(np.array([70000]), "mem"), tmp_path / "big.bin", "uint16")
    assert not (tmp_path / "big.bin").exists()


def stream(n: int) -> Tokens:
    return Tokens(np.arange(n, dtype=np.int64), "arange")


def test_batches_replay_exactly_and_targets_are_the_next_tokens() -> None:
    a = TokenBatches(stream(10_000), seq_len=16, batch_size=3, microbatches_per_step=4, seed=9)
    b = TokenBatches(stream(10_000), seq_len=16, batch_size=3, microbatches_per_step=4, seed=9)
    other_seed = TokenBatches(stream(10_000), seq_len=16, batch_size=3,
                              microbatches_per_step=4, seed=10)
    idx, targets = a.batch(57, 2)
    assert idx.dtype == torch.int64 and idx.shape == (3, 16)
    assert torch.equal(targets, idx + 1)  # the stream is 0, 1, 2, ...
    assert torch.equal(idx % 16, torch.zeros_like(idx) + torch.arange(16))  # whole windows
    assert all(torch.equal(x, y) for x, y in zip(a.batch(57, 2), b.batch(57, 2), strict=True))
    assert not torch.equal(other_seed.batch(57, 2)[0], idx)
    with pytest.raises(ValueError, match="no microbatch 4 at step 0"):
        a.batch(0, 4)


def test_an_epoch_deals_every_training_window_once_and_never_an_eval_window() -> None:
    data = TokenBatches(stream(20 * 8 + 1), seq_len=8, batch_size=2, microbatches_per_step=3,
                        eval_fraction=0.1)
    assert (data.train_windows, data.eval_windows) == (18, 2)
    seen = [int(row[0]) // 8 for step in range(3) for mb in range(3)
            for row in data.batch(step, mb)[0]]  # 3 steps x 3 microbatches x 2 = 18
    assert sorted(seen) == list(range(18))
    assert [int(x[0, 0]) // 8 for x, _ in data.eval_batches()] == [18]
    assert len(data.eval_batches()[0][0]) == 2
    next_epoch = [int(row[0]) // 8 for mb in range(3) for row in data.batch(3, mb)[0]]
    assert next_epoch != seen[:6]  # the next epoch is dealt in another order


def test_too_little_data_or_a_token_beyond_the_vocabulary_is_an_input_error() -> None:
    with pytest.raises(InputError, match="arange: 10 tokens are too few for windows of 17"):
        TokenBatches(stream(10), seq_len=16, batch_size=1, microbatches_per_step=1)
    data = TokenBatches(stream(1000), seq_len=16, batch_size=2, microbatches_per_step=1,
                        vocab=256)
    with pytest.raises(InputError, match="outside the model's vocabulary of 256"):
        for step in range(40):
            data.batch(step, 0)
