"""The `hf:` model source (holmes.hf_config): a Hugging Face config.json as the planner's
model.yaml, without transformers; `hetsched plan -m hf:...` end to end; bad configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from holmes import hf_config
from holmes.model import load_model
from topology.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "holmes" / "hf_configs"


def write_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((CONFIGS / "tiny-llama.json").read_text()) | changes
    path = folder / "config.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if v != "DROP"}))
    return path


def test_every_built_in_maps_its_config_fields() -> None:
    assert hf_config.builtin_names() == ["tiny-gpt2", "tiny-llama", "tiny-mistral",
                                         "tiny-qwen2", "tiny-qwen3"]
    for name in hf_config.builtin_names():
        raw = json.loads((CONFIGS / f"{name}.json").read_text())
        model = load_model(f"hf:{name}").model
        if raw["model_type"] == "gpt2":
            got = (raw["n_layer"], raw["n_embd"], raw["n_head"], 4 * raw["n_embd"], "gpt")
        else:
            got = (raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"],
                   raw["intermediate_size"], "llama")
        assert (model.layers, model.hidden, model.heads, model.ffn, model.arch) == got
        assert model.vocab == raw["vocab_size"] == 256
        assert model.tie_embeddings == raw["tie_word_embeddings"]
        assert model.name == name and model.dtype == "fp32" and model.seq_len == 128


def test_a_directory_or_config_file_names_the_model_and_caps_the_sequence(
        tmp_path: Path) -> None:
    path = write_config(tmp_path / "My Llama!", max_position_embeddings=32768,
                        torch_dtype="DROP", dtype="bfloat16", num_key_value_heads="DROP")
    model = load_model(f"hf:{path.parent}").model
    assert (model.name, model.seq_len, model.dtype, model.kv_heads) == (
        "My-Llama-", hf_config.MAX_SEQ_LEN, "bf16", None)
    assert hf_config.resolve(f"hf:{path.parent}").weights_dir == path.parent
    assert hf_config.resolve(f"hf:{path}").weights_dir is None  # a file: random init
    assert load_model(f"hf:{path}").model.layers == 4


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_hidden_layers": "DROP"}, "config.json: num_hidden_layers: missing"),
    ({"hidden_size": 64.5}, "config.json: hidden_size: must be an integer > 0, got 64.5"),
    ({"vocab_size": True}, "config.json: vocab_size: must be an integer > 0, got True"),
    ({"model_type": "bert"}, "config.json: model_type: 'bert' is not supported"),
    ({"torch_dtype": "int8"}, "config.json: torch_dtype: 'int8' is not one of"),
    ({"tie_word_embeddings": "yes"}, "config.json: tie_word_embeddings: must be true or false"),
    ({"num_attention_heads": 5}, "heads: 5 heads do not divide hidden 64"),
])
def test_a_bad_config_is_one_error_naming_file_and_field(
        tmp_path: Path, changes: dict, message: str) -> None:
    path = write_config(tmp_path / "m", **changes)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        load_model(f"hf:{path.parent}")


def test_unreadable_or_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json: line 1, column 2"):
        load_model(f"hf:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no config.json in this directory"):
        load_model(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(InputError, match=r"nope: not found: hf: takes a built-in \(tiny-gpt2"):
        load_model("hf:nope")


def test_plan_from_an_hf_source_agrees_with_the_config(tmp_path: Path) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_text((ROOT / "examples" / "holmes-ib-roce" / "topology.yaml").read_text())
    plan = tmp_path / "plan.yaml"
    done = subprocess.run([sys.executable, "-m", "cli", "plan", str(topology), "-m",
                           "hf:tiny-qwen3", "-o", str(plan)], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    model = yaml.safe_load(plan.read_text())["model"]
    assert (model["source"], model["layers"], model["hidden"], model["seq_len"]) == (
        "hf:tiny-qwen3", 4, 64, 128)
    shown = subprocess.run([sys.executable, "-m", "cli", "show", str(plan)],
                           capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    bad = subprocess.run([sys.executable, "-m", "cli", "plan", str(topology), "-m",
                          f"hf:{tmp_path}", "-o", str(tmp_path / "p2.yaml")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "p2.yaml").exists()
