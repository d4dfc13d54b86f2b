"""Hugging Face models in the pipeline runtime (holmes.runtime.hf).

The reference is always transformers' own model run whole in one process (its forward,
masks, rotary embeddings and loss with `shift_labels`); the runtime runs the adapter on
real gloo ranks over 127.0.0.1 (tests/hf_worker.py). For skip routes the reference is
the transformers model whose layer list is the route's layers in visit order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_worker import launch, make_batch, make_model, make_schedule
from torch import nn

pytest.importorskip("transformers", reason="the hf extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from holmes.runtime.hf import load_hf_model  # noqa: E402
from topology.errors import InputError  # noqa: E402

TOLERANCE = 1e-5
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2"]

TWO_STAGES = {
    "stages": [["o"], ["a"]],
    "layers": [[0, 2], [2, 4]],
    "routes": [[mb, ["o", "a"]] for mb in range(4)],
    "ranks": {"o": 0, "a": 1},
    "batch": 2, "seq": 48, "iterations": 2,
}
SKIP_ROUTES = {
    "stages": [["o0", "o1"], ["a"], ["b"]],
    "layers": [[0, 1], [1, 3], [3, 4]],
    "routes": [[0, ["o0", "a", "b"]], [1, ["o1", "b"]], [2, ["o0", "b", "a"]],
               [3, ["o1", "a"]], [4, ["o1", "b", "a"]], [5, ["o0", "a"]]],
    "ranks": {"o0": 0, "o1": 1, "a": 2, "b": 3},
    "batch": 2, "seq": 40, "iterations": 2,
}


def scenarios(base: dict) -> list[dict]:
    return [dict(base, model="hf:tiny-llama", seed=5), dict(base, model="hf:tiny-gpt2", seed=6)]


def hf_reference(scenario: dict, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
    """transformers' model, each microbatch run whole over its route's layers in order."""
    lm = make_model(scenario).hf_model
    body, attr = (lm.transformer, "h") if lm.config.model_type == "gpt2" else (lm.model, "layers")
    layers = getattr(body, attr)
    schedule = make_schedule(scenario)
    losses = {}
    for route in schedule.routes:
        order = [layers[i] for start, end in schedule.block_ranges(route)
                 for i in range(start, end)]
        setattr(body, attr, nn.ModuleList(order))
        idx, targets = make_batch(scenario, iteration, route.microbatch)
        loss = lm(input_ids=idx, labels=targets, shift_labels=targets).loss
        (loss / len(schedule.routes)).backward()
        losses[route.microbatch] = float(loss.detach())
        setattr(body, attr, layers)
    return {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}, losses


def assert_matches_reference(results: list[list[dict]], scenario_index: int,
                             scenario: dict) -> None:
    per_rank = [rank[scenario_index] for rank in results]
    lm = make_model(scenario).hf_model
    for r in per_rank:
        assert len(set(r["hf_names"])) == len(r["hf_names"])  # a tied weight counts once
    held = {n for r in per_rank for n in r["hf_names"]}
    assert held == {n for n, _ in lm.named_parameters()}  # every parameter is trained
    for it in range(scenario["iterations"]):
        want, want_losses = hf_reference(scenario, it)
        got_losses: dict[int, float] = {}
        for r in per_rank:
            got_losses |= r["iterations"][it]["losses"]
            for name, grad in r["iterations"][it]["grads"].items():
                assert want[name].abs().max() > 1e-4, f"{name}: reference gradient is ~0"
                diff = (grad - want[name]).abs().max().item()
                assert diff <= TOLERANCE, f"{scenario['model']} {name}: max |diff| {diff:.2e}"
        assert got_losses == pytest.approx(want_losses, abs=1e-6)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    return launch(scenarios(TWO_STAGES), world=2, out=tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def skip_routes(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    return launch(scenarios(SKIP_ROUTES), world=4, out=tmp_path_factory.mktemp("skip"))


# ---------------------------------------------------------------- real gloo ranks


@pytest.mark.parametrize("index", [0, 1], ids=["llama", "gpt2"])
def test_two_stages_give_the_gradients_of_transformers_run_whole(
        two_stages: list[list[dict]], index: int) -> None:
    assert_matches_reference(two_stages, index, scenarios(TWO_STAGES)[index])


@pytest.mark.parametrize("index", [0, 1], ids=["llama", "gpt2"])
def test_skip_routes_give_the_gradients_of_transformers_along_each_route(
        skip_routes: list[list[dict]], index: int) -> None:
    assert_matches_reference(skip_routes, index, scenarios(SKIP_ROUTES)[index])


def test_the_tied_embedding_is_one_parameter_of_the_origin(
        two_stages: list[list[dict]]) -> None:
    origin, other = (rank[1] for rank in two_stages)  # scenario 1: GPT-2, tied
    assert origin["hf_names"].count("transformer.wte.weight") == 1
    assert "lm_head.weight" not in origin["hf_names"] + other["hf_names"]
    assert "transformer.wte.weight" not in other["hf_names"]
    llama_origin = two_stages[0][0]  # untied: embedding and head are two parameters
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(llama_origin["hf_names"])


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_computes_what_transformers_computes(family: str) -> None:
    model = load_hf_model(f"hf:{family}", seed=1)
    lm = load_hf_model(f"hf:{family}", seed=1).hf_model
    tokens = torch.randint(256, (3, 65), generator=torch.Generator().manual_seed(2))
    idx, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
    loss = model(idx, targets)
    loss.backward()
    want = lm(input_ids=idx, labels=targets, shift_labels=targets).loss
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    theirs = dict(lm.named_parameters())
    for name, hf_name in model.hf_names().items():
        got = dict(model.named_parameters())[name].grad
        assert torch.allclose(got, theirs[hf_name].grad, atol=1e-6, rtol=0), name
    assert model.tied == (family in ("tiny-qwen2", "tiny-qwen3", "tiny-gpt2"))


def test_a_sliding_window_layer_masks_as_transformers_does() -> None:
    # tiny-mistral attends over 32 tokens; at 64 tokens a plain causal mask differs.
    model = load_hf_model("hf:tiny-mistral", seed=1)
    tokens = torch.randint(256, (2, 65), generator=torch.Generator().manual_seed(3))
    idx, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
    with torch.no_grad():
        want = model.hf_model(input_ids=idx, labels=targets, shift_labels=targets).loss
        got = model(idx, targets)
        model.hf_model.config.sliding_window = None
        plain = model.hf_model(input_ids=idx, labels=targets, shift_labels=targets).loss
    assert float(plain) != pytest.approx(float(want), abs=1e-5)
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_a_built_in_is_the_same_on_every_build_and_seeded() -> None:
    a, b, c = (load_hf_model("hf:tiny-qwen3", seed=s) for s in (4, 4, 5))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters(),
                                                     strict=True))


def test_a_saved_directory_loads_with_its_weights(tmp_path: Path) -> None:
    model = load_hf_model("hf:tiny-gpt2", seed=7)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)  # trained: no longer the init
    model.hf_model.save_pretrained(tmp_path / "m")
    loaded = load_hf_model(f"hf:{tmp_path / 'm'}")
    assert loaded.tied and loaded.training
    for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_directory_without_weights_or_config_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(InputError, match="no config.json in this directory"):
        load_hf_model(f"hf:{folder}")
    config = json.loads((ROOT / "holmes" / "hf_configs" / "tiny-llama.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"no model.safetensors .*pytorch_model.bin is not read"):
        load_hf_model(f"hf:{folder}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="shard model-00001-of-00002.safetensors is missing "
                                         r"\(and 1 more\)"):
        load_hf_model(f"hf:{folder}")


def test_the_core_package_does_not_import_transformers() -> None:
    code = ("import sys, cli.main, holmes.runtime, holmes.model, holmes.planner, skippipe.runtime;"
            " from holmes.model import load_model; load_model('hf:tiny-llama');"
            " print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
