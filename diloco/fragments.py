"""Fragments: which parameters are exchanged together.

A model's parameters are split into P disjoint fragments that Streaming DiLoCo syncs in
turn. The unit of splitting is a *layer*: an entry of the model's largest `nn.ModuleList`
(e.g. the transformer blocks) unless the caller names the layers.

- "strided": layer i goes to fragment i % P (each fragment samples the whole depth).
- "sequential": layer i goes to fragment i * P // L (contiguous runs of layers).

Parameters outside every layer (embeddings, final norm, head) join the nearest layer in
registration order: those registered before the first layer go with the first layer,
the others with the layer registered just before them. Every parameter of the model is in
exactly one fragment; shared (tied) parameters are counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class Fragment:
    """Fragment `index`: its parameters and their names, in model order."""

    index: int
    names: tuple[str, ...]
    params: tuple[torch.nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The entries of the `nn.ModuleList` holding the most parameters, else the top-level
    children that hold parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        return list(max(lists, key=_numel))
    return [child for child in model.children() if _numel(child) > 0]


def split_fragments(
    model: nn.Module,
    count: int,
    pattern: str = "strided",
    layers: Sequence[nn.Module] | None = None,
) -> list[Fragment]:
    """Split `model`'s parameters into `count` fragments by layer (see module docstring)."""
    layers = list(layers) if layers is not None else find_layers(model)
    if count < 1:
        raise ValueError(f"fragments must be >= 1, got {count}")
    if count > 1 and len(layers) < count:
        raise ValueError(
            f"cannot split {len(layers)} layers into {count} fragments: "
            "pass fewer fragments, name the layers, or give explicit fragments"
        )
    layer_of_param = _layer_of_each_param(model, layers)
    fragment_of_layer = [
        _fragment_of_layer(i, len(layers), count, pattern) for i in range(len(layers))
    ]
    grouped: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(count)]
    for name, param, layer in layer_of_param:
        index = fragment_of_layer[layer] if layers else 0
        grouped[index].append((name, param))
    return [_fragment(i, members) for i, members in enumerate(grouped)]


def fragments_from_modules(modules: Sequence[nn.Module]) -> list[Fragment]:
    """Explicit fragments, one per module; a parameter may not be in two of them."""
    seen: dict[int, int] = {}
    fragments = []
    for index, module in enumerate(modules):
        members = []
        for name, param in module.named_parameters():
            if id(param) in seen:
                raise ValueError(
                    f"parameter {name!r} of fragment {index} is also in fragment {seen[id(param)]}"
                )
            seen[id(param)] = index
            members.append((f"{index}.{name}", param))
        fragments.append(_fragment(index, members))
    return fragments


def _fragment_of_layer(layer: int, n_layers: int, count: int, pattern: str) -> int:
    if pattern == "strided":
        return layer % count
    if pattern == "sequential":
        return layer * count // n_layers
    raise ValueError(f"pattern must be 'strided' or 'sequential', got {pattern!r}")


def _layer_of_each_param(
    model: nn.Module, layers: Sequence[nn.Module]
) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, layer index) for every parameter, extras joined to a nearby layer."""
    owner = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    assigned: list[tuple[str, nn.Parameter, int]] = []
    pending: list[tuple[str, nn.Parameter]] = []  # extras seen before any layer
    last_layer: int | None = None
    for name, param in model.named_parameters():
        layer = owner.get(id(param))
        if layer is not None:
            if last_layer is None:
                assigned.extend((n, p, layer) for n, p in pending)
                pending.clear()
            last_layer = layer
            assigned.append((name, param, layer))
        elif last_layer is None:
            pending.append((name, param))
        else:
            assigned.append((name, param, last_layer))
    missing = set(owner) - {id(p) for _, p, _ in assigned}
    if missing:
        raise ValueError("the named layers hold parameters that are not in the model")
    assigned.extend((n, p, 0) for n, p in pending)  # a model without layer parameters
    return assigned


def _fragment(index: int, members: list[tuple[str, nn.Parameter]]) -> Fragment:
    if not members:
        raise ValueError(f"fragment {index} would hold no parameters")
    names, params = zip(*members, strict=True)
    return Fragment(index=index, names=tuple(names), params=tuple(params))


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
