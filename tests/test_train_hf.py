"""examples/train_hf.py under real plans: `hetsched launch --via local` (one torchrun per
plan host, gloo over loopback) with Hugging Face models planned from `hf:` sources.

Skip routes with GPT-2 (tied head), DiLoCo between two sites with Qwen3 from a token file,
100 steps of a Llama pipeline with two lanes per stage (slow) whose saved model loads
again, and the refusal of a plan made for another model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_trainer import failure_report, losses, topology

pytest.importorskip("transformers", reason="the hf extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_hf.py")
sys.path.insert(0, str(ROOT / "examples"))

from train_hf import eval_loss, load_tokens  # noqa: E402

from holmes.plan import load_plan  # noqa: E402
from holmes.runtime.data import TokenBatches  # noqa: E402
from holmes.runtime.hf import load_hf_model  # noqa: E402


def make_plan(folder: Path, topo: dict[str, Any], model: str, *options: str) -> Path:
    (folder / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    plan = folder / "plan.yaml"
    done = subprocess.run([sys.executable, "-m", "cli", "plan", str(folder / "topology.yaml"),
                           "-m", model, "-o", str(plan), *options],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return plan


def train(plan: Path, metrics: Path, *args: str, timeout: float = 400) -> dict[str, Any]:
    argv = [sys.executable, "-m", "cli", "launch", str(plan), "--via", "local", "--",
            SCRIPT, "--metrics", str(metrics), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, failure_report(done.stdout + done.stderr)
    return json.loads(metrics.read_text())


def test_gpt2_trains_along_skip_routes(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1", "h2", "h3", "h4"]}, 1.0), "hf:tiny-gpt2",
                     "--stages", "4", "--skip-ratio", "0.34")
    assert all(len(p["route"]) == 3 for p in yaml.safe_load(plan.read_text())["paths"])
    figures = train(plan, tmp_path / "m.json", "--steps", "6", "--log-every", "1")
    curve = losses(figures["curve"])
    assert sorted(curve) == list(range(1, 7)) and curve[6] < curve[1]
    assert math.isfinite(figures["eval_loss"])


def test_qwen3_trains_with_diloco_from_a_token_file(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"{i}.txt").write_bytes((ROOT / "README.md").read_bytes())
    tokens = tmp_path / "tokens.bin"
    done = subprocess.run([sys.executable, SCRIPT, "--text", str(text), "--write-tokens",
                           str(tokens)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert tokens.stat().st_size == 2 * 4 * ((ROOT / "README.md").stat().st_size + 1)
    plan = make_plan(tmp_path, topology({"a": ["a1"], "b": ["b1"]}, 0.01), "hf:tiny-qwen3",
                     "--stages", "1", "--sync", "diloco", "--sync-every", "4",
                     "--fragments", "2")
    figures = train(plan, tmp_path / "m.json", "--steps", "8", "--log-every", "1",
                    "--tokens", str(tokens))
    curve = losses(figures["curve"])
    assert curve[8] < curve[1]
    assert figures["curve"][-1]["bytes_per_class"].get("inter_site", 0) > 0


@pytest.mark.slow
def test_a_hundred_llama_steps_lower_the_loss_and_the_saved_model_loads(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1", "h2"]}, 1.0), "hf:tiny-llama",
                     "--stages", "2")
    saved = tmp_path / "saved"
    figures = train(plan, tmp_path / "m.json", "--steps", "100", "--log-every", "10",
                    "--save", str(saved), timeout=900)
    curve = losses(figures["curve"])
    assert sorted(curve) == list(range(10, 101, 10))
    assert curve[100] < curve[10] - 1.0  # bytes start at ln 256 = 5.5
    assert figures["eval_loss"] < curve[10]
    # the saved model is the trained one: its eval loss, here, is the run's
    model = load_hf_model(f"hf:{saved}")
    m = load_plan(plan).model
    tokens = load_tokens(argparse.Namespace(tokens=None, text=None, tokenizer=None,
                                            corpus_bytes=2_000_000))
    data = TokenBatches(tokens, seq_len=m.seq_len, batch_size=m.microbatch,
                        microbatches_per_step=4, eval_fraction=0.05)
    assert eval_loss(model, data) == pytest.approx(figures["eval_loss"], abs=1e-5)


def test_a_plan_for_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, topology({"a": ["h1"]}, 1.0), "tiny-gpt")
    env = dict(os.environ, HETSCHED_PLAN=str(plan))
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: the plan's model is 'tiny-gpt', not an hf: source: "
                                   "plan with -m hf:... or pass --model hf:...")
    done = subprocess.run([sys.executable, SCRIPT, "--model", "hf:tiny-gpt2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: the plan is for 8 layers of width 128, but "
                                          "hf:tiny-gpt2 has 4 of width 64")
