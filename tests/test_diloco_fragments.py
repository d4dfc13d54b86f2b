"""Fragments cover every parameter exactly once, for both patterns."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from diloco.fragments import find_layers, fragments_from_modules, split_fragments


class TiedNet(nn.Module):
    """Embedding, `depth` blocks, a norm and a head tied to the embedding."""

    def __init__(self, depth: int, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth)
        )
        self.aux = nn.ModuleList([nn.Linear(width, 1)])  # a smaller ModuleList: not the layers
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.embed.weight


def fragment_of(fragments: list, param: torch.Tensor) -> int:
    (index,) = [f.index for f in fragments if any(p is param for p in f.params)]
    return index


@given(
    depth=st.integers(1, 12),
    count=st.integers(1, 12),
    pattern=st.sampled_from(["strided", "sequential"]),
)
def test_every_parameter_in_exactly_one_fragment(depth: int, count: int, pattern: str) -> None:
    model = TiedNet(depth)
    if count > depth and count > 1:
        with pytest.raises(ValueError, match="cannot split"):
            split_fragments(model, count, pattern)
        return
    fragments = split_fragments(model, count, pattern)
    assert [f.index for f in fragments] == list(range(count))
    ids = [id(p) for f in fragments for p in f.params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    names = [n for f in fragments for n in f.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(f.numel > 0 for f in fragments)


def test_strided_puts_layer_i_in_fragment_i_mod_p() -> None:
    model = TiedNet(depth=8)
    fragments = split_fragments(model, 3, "strided")
    for i, block in enumerate(model.blocks):
        assert {fragment_of(fragments, p) for p in block.parameters()} == {i % 3}


def test_sequential_puts_contiguous_layers_together() -> None:
    model = TiedNet(depth=8)
    fragments = split_fragments(model, 3, "sequential")
    owners = [fragment_of(fragments, next(b.parameters())) for b in model.blocks]
    assert owners == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("pattern, last", [("strided", 7 % 4), ("sequential", 3)])
def test_extras_join_the_nearest_layer(pattern: str, last: int) -> None:
    model = TiedNet(depth=8)
    fragments = split_fragments(model, 4, pattern)
    assert fragment_of(fragments, model.embed.weight) == 0  # before the first layer
    assert fragment_of(fragments, model.norm.weight) == last  # after the last layer
    assert fragment_of(fragments, model.aux[0].weight) == last


def test_find_layers_picks_the_largest_module_list() -> None:
    model = TiedNet(depth=3)
    assert find_layers(model) == list(model.blocks)
    flat = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert find_layers(flat) == [flat[0], flat[2]]


def test_named_layers_override_the_default() -> None:
    model = TiedNet(depth=2)
    fragments = split_fragments(model, 2, "strided", layers=[model.embed, model.norm])
    assert fragment_of(fragments, model.norm.weight) == 1
    assert fragment_of(fragments, model.blocks[1][0].weight) == 0


def test_explicit_fragments_must_not_share_parameters() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    fragments = fragments_from_modules([a, b])
    assert fragments[1].names == ("1.weight", "1.bias")
    with pytest.raises(ValueError, match="also in fragment 0"):
        fragments_from_modules([a, nn.Sequential(b, a)])
