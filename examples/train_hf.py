"""Train a Hugging Face causal LM (Llama, Qwen2/3, Mistral, GPT-2) under a hetsched plan.

    hetsched plan topology.yaml -m hf:tiny-llama -o plan.yaml
    hetsched launch plan.yaml -- examples/train_hf.py --steps 100

The model is the plan's `hf:` source (or `--model hf:...`): a built-in config (random
init), a config.json, or a local directory with config.json and safetensors weights;
`holmes.runtime.hf` splits it into the runtime's embed / blocks / head_loss, so any plan
runs it: pipeline stages, skip routes, data parallelism, all-reduce or DiLoCo between
replicas. The plan must have been made from the same config (layers, hidden and
sequence length are checked).

Data: by default the Python standard library's `.py` files as bytes (vocab 256, like
examples/train_tinygpt.py, so nothing is downloaded); `--text DIR` reads a folder of text
files (bytes, or `--tokenizer tokenizer.json`); `--tokens FILE` memory-maps a binary
file of token ids (`--token-dtype`). `--write-tokens FILE` only tokenizes the text into
such a file (no plan, no launch). Batches depend on (seed, step, microbatch) alone
(`holmes.runtime.data`), so a restart from a checkpoint replays exactly.

Rank 0 prints the loss, tokens/s and bytes per link class; `--metrics` writes them as
JSON with the eval loss; `--save DIR` writes the trained model as config.json +
model.safetensors (loadable again as `hf:DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from holmes.plan import PlanModel, load_plan
from holmes.runtime import PlanRun, Trainer
from holmes.runtime.data import TokenBatches, Tokens, save_token_file, text_tokens, token_file
from holmes.runtime.hf import HFCausalLM, load_hf_model
from topology.errors import InputError


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="hf:SOURCE (default: the plan's model source)")
    p.add_argument("--text", help="a folder of text files (default: the stdlib's .py files)")
    p.add_argument("--pattern", default="*.txt", help="which files of --text (default *.txt)")
    p.add_argument("--tokenizer", help="a local tokenizer.json for --text (default: bytes)")
    p.add_argument("--tokens", help="a binary file of token ids (memory-mapped)")
    p.add_argument("--token-dtype", default="uint16")
    p.add_argument("--write-tokens", help="tokenize the text into this file and exit")
    p.add_argument("--corpus-bytes", type=int, default=2_000_000,
                   help="bytes of the default stdlib corpus")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-dir", help="where to checkpoint and resume from")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--metrics", help="rank 0 writes the loss curve and eval loss here (JSON)")
    p.add_argument("--save", help="rank 0 writes the trained model here (safetensors)")
    return p.parse_args()


def load_tokens(args: argparse.Namespace) -> Tokens:
    if args.tokens:
        return token_file(args.tokens, args.token_dtype)
    if args.text:
        return text_tokens(args.text, pattern=args.pattern, tokenizer=args.tokenizer)
    if args.tokenizer:
        raise InputError("--tokenizer needs --text")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return text_tokens(stdlib, pattern="*.py", max_bytes=args.corpus_bytes)


def check_agrees(model: HFCausalLM, planned: PlanModel, source: str) -> None:
    """The plan must have been made for this model: same layers, width, positions."""
    config = model.config
    positions = config.max_position_embeddings
    if (len(model.blocks), config.hidden_size) != (planned.layers, planned.hidden):
        raise InputError(f"the plan is for {planned.layers} layers of width {planned.hidden}, "
                         f"but {source} has {len(model.blocks)} of width {config.hidden_size}; "
                         f"plan it with -m {source}")
    if planned.seq_len > positions:
        raise InputError(f"the plan's seq_len {planned.seq_len} exceeds the "
                         f"{positions} positions of {source}")


def prepare(args: argparse.Namespace) -> tuple[HFCausalLM, TokenBatches, PlanModel]:
    """Everything that can be refused, before this rank joins the job."""
    if not os.environ.get("HETSCHED_PLAN"):
        raise InputError("HETSCHED_PLAN is not set: start this script with `hetsched launch`")
    plan = load_plan(os.environ["HETSCHED_PLAN"])
    source = args.model or plan.model.source or ""
    if not source.startswith("hf:"):
        raise InputError(f"the plan's model is {source or plan.model.name!r}, not an hf: "
                         "source: plan with -m hf:... or pass --model hf:...")
    quiet_transformers()
    model = load_hf_model(source, seed=args.seed)
    check_agrees(model, plan.model, source)
    data = TokenBatches(load_tokens(args), seq_len=plan.model.seq_len,
                        batch_size=plan.model.microbatch, microbatches_per_step=len(plan.paths),
                        seed=args.seed, eval_fraction=0.05, vocab=model.config.vocab_size)
    return model, data, plan.model


def quiet_transformers() -> None:
    """No progress bars or advice from transformers in the training log."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def set_lr(trainer: Trainer, args: argparse.Namespace, step: int) -> None:
    warm = min(1.0, (step + 1) / args.warmup)
    decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
    for group in trainer.optimizer.param_groups:
        group["lr"] = args.lr * warm * (0.1 + 0.9 * decay)


@torch.no_grad()
def eval_loss(model: HFCausalLM, data: TokenBatches, windows: int = 64) -> float:
    model.eval()
    batches = data.eval_batches(windows)
    total = sum(float(model(x, y)) * len(x) for x, y in batches)
    return total / sum(len(x) for x, _ in batches)


def train(args: argparse.Namespace, model: HFCausalLM, data: TokenBatches,
          m: PlanModel) -> None:
    run = PlanRun.from_env()
    trainer = Trainer(
        run, model, lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
        activation_shape=(m.microbatch, m.seq_len, model.config.hidden_size),
        total_steps=args.steps, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    curve, start = [], time.perf_counter()
    for step in trainer.steps():
        set_lr(trainer, args, step)
        log = trainer.step(step, {mb: data.batch(step, mb) for mb in trainer.microbatches()})
        if log is not None:
            curve.append(vars(log))
    trainer.finish()
    train_s = time.perf_counter() - start
    if trainer.gather_model(model):
        loss = eval_loss(model.cpu(), data)
        print(f"eval loss {loss:.4f} after {args.steps} steps", flush=True)
        if args.save:
            model.hf_model.save_pretrained(args.save)
            if args.tokenizer:
                shutil.copy(args.tokenizer, Path(args.save) / "tokenizer.json")
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(
                {"eval_loss": loss, "steps": args.steps, "train_s": train_s, "curve": curve,
                 "resumed_from": trainer.start_step}, indent=2))
    run.exit()  # every rank leaves together, without a gloo abort at interpreter exit


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    try:
        if args.write_tokens:
            save_token_file(load_tokens(args), args.write_tokens, args.token_dtype)
            return
        model, data, planned = prepare(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    train(args, model, data, planned)


if __name__ == "__main__":
    main()
