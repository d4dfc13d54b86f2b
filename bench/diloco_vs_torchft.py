"""Our Streaming DiLoCo vs torchft's (`torchft.local_sgd.DiLoCo`) on the same tiny GPT.

Same model, data streams, inner AdamW schedule, steps, H, fragments (the same strided
split: torchft gets our fragments as modules), tau (torchft's `fragment_sync_delay`) and
alpha (`fragment_update_alpha`), same outer Nesterov SGD. Runs (`--methods`, default
local,ours,torchft), each as `--replicas` processes on 127.0.0.1:

- local:      no communication at all: the step-time baseline (and a lone replica's loss);
- ours:       our Streaming DiLoCo with fp4 exchange (the configuration of issue 5);
- ours-fp32:  our Streaming DiLoCo with fp32 exchange (what torchft sends on CPU);
- torchft:    torchft 0.2 DiLoCo, a Manager per replica (replica groups of 1 process,
              torchft's ProcessGroupGloo), its Rust lighthouse started by this script.
              torchft quantizes only with Triton on CUDA (`should_quantize`), so on CPU it
              all-reduces fp32 pseudo-gradients.

torchft's bytes are counted the way ours are: the tensors handed to its process group's
`allreduce` (a subclass of torchft's ProcessGroupGloo records them). Step-time overhead is
(seconds per inner step of a method) / (seconds per inner step of `local`) - 1, from the
same script on the same machine. Targets (issue 5): torchft's eval loss within 2% of ours;
our bytes per inner step and our step-time overhead no worse than torchft's.

torchft is not a dependency of hetsched: install it next to torch without letting pip
replace torch, e.g. `pip install --no-deps torchft==0.2.0` plus its pure-Python
dependencies (opentelemetry-api, opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http),
or put such an install on `--torchft-path`. Without it, the script runs what it can and
says why torchft did not run.

    python bench/diloco_vs_torchft.py --torchft-path /tmp/torchft-libs
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.diloco_tinygpt import (  # noqa: E402
    MethodResult,
    RunSpec,
    method_specs,
    parse_args,
    prepare_corpus,
    run_method,
)
from bench.tinygpt import TinyGPT, TinyGPTConfig, batch_at, eval_loss  # noqa: E402
from bench.workers import cosine_lr  # noqa: E402
from diloco import split_fragments  # noqa: E402

TORCHFT_STEPS = 1000  # inner steps by default: the comparison needs no more than this


def torchft_status(path: str | None) -> str | None:
    """None if torchft imports and has what we need, else why not."""
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's lighthouse and managers log a lot
    if path:
        sys.path.insert(0, path)
    try:
        from torchft.coordination import LighthouseServer  # noqa: F401
        from torchft.local_sgd import DiLoCo  # noqa: F401
        from torchft.manager import Manager  # noqa: F401
        from torchft.process_group import ProcessGroupGloo  # noqa: F401
    except Exception as exc:  # ImportError, or a compiled extension that does not load
        return f"import torchft failed: {type(exc).__name__}: {exc}"
    return None


# ---- one torchft replica ------------------------------------------------------------------


def torchft_replica(spec: RunSpec, rank: int) -> dict:
    from torch.distributed import TCPStore
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    class CountingProcessGroupGloo(ProcessGroupGloo):
        """torchft's gloo group, recording the bytes handed to allreduce per manager step."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.events: dict[int, int] = {}
            self.step_of = lambda: 0

        def allreduce(self, tensors: list[torch.Tensor], opts: object) -> object:
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            step = self.step_of()
            self.events[step] = self.events.get(step, 0) + 2 * nbytes  # sent + received
            return super().allreduce(tensors, opts)

    corpus = torch.load(spec.corpus_path, weights_only=True)
    config = TinyGPTConfig(**spec.model)
    torch.manual_seed(spec.seed)
    model = TinyGPT(config)
    inner = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay
    )
    fragment_modules = _fragment_modules(model, spec.diloco["fragments"])
    outer = [
        torch.optim.SGD(
            m.parameters(), lr=spec.diloco["outer_lr"], momentum=spec.diloco["outer_momentum"],
            nesterov=True,
        )
        for m in fragment_modules
    ]  # fmt: skip
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pg = CountingProcessGroupGloo(timeout=datetime.timedelta(seconds=120))

    def load_state(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner"])

    manager = Manager(
        pg=pg,
        load_state_dict=load_state,
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        min_replica_size=spec.replicas,
        use_async_quorum=False,
        replica_id=str(rank),
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=spec.extra["lighthouse"],
        hostname="127.0.0.1",
        timeout=datetime.timedelta(seconds=120),
        quorum_timeout=datetime.timedelta(seconds=600),
        init_sync=False,  # every replica starts from the same seed
    )  # fmt: skip
    pg.step_of = manager.current_step
    stream_seed = spec.seed * 1000 + rank
    losses: list[float] = []
    started = time.perf_counter()
    with DiLoCo(
        manager,
        fragment_modules,
        inner,
        outer,
        sync_every=spec.diloco["sync_every"],
        backup_device=torch.device("cpu"),
        pin_memory=False,
        should_quantize=False,
        fragment_sync_delay=spec.diloco["overlap_steps"],
        fragment_update_alpha=spec.diloco["alpha"],
    ) as diloco:
        for step in range(spec.steps):
            for group in inner.param_groups:
                group["lr"] = cosine_lr(step, spec.lr, spec.warmup, spec.steps)
            x, y = batch_at(corpus["train"], step, spec.batch_size, config.block_size, stream_seed)
            _, loss = model(x, y)
            loss.backward()
            inner.step()  # torchft's DiLoCo hooks run the sync here
            inner.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    total = sum(pg.events.values())
    result = {
        "train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": seconds,
        "bytes_total": total,
        "peak_sync_bytes": max(pg.events.values(), default=0),
        "syncs": len(pg.events),
        "commits": manager.current_step(),
        "per_fragment": {},
    }
    if rank == 0:
        result["eval_loss_local"] = eval_loss(model, corpus["eval"])
        result["eval_loss"] = eval_loss(_torchft_global_model(model, diloco), corpus["eval"])
    manager.shutdown(wait=False)
    return result


def _fragment_modules(model: TinyGPT, count: int) -> list[torch.nn.Module]:
    """Our strided fragments as modules torchft accepts (same parameters, same split)."""
    owner = {id(p): name for name, p in model.named_parameters()}
    modules = []
    for fragment in split_fragments(model, count, "strided"):
        holders = torch.nn.ModuleDict()
        for name in fragment.names:
            module_name = name.rsplit(".", 1)[0]
            key = module_name.replace(".", "_")
            if key not in holders:
                holders[key] = model.get_submodule(module_name)
        got = {owner[id(p)] for p in holders.parameters()}
        if got != set(fragment.names):
            raise RuntimeError(f"fragment {fragment.index} cannot be expressed as modules")
        modules.append(holders)
    return modules


def _torchft_global_model(model: TinyGPT, diloco: object) -> TinyGPT:
    """A copy of `model` holding torchft's global ("original") parameters."""
    consensus = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for fragment in diloco._fragments:  # noqa: SLF001 - torchft keeps them private
            for name, p in fragment._model_fragment.named_parameters():  # noqa: SLF001
                consensus.get_parameter(names[id(p)]).copy_(fragment.original_parameters[name])
    return consensus


def worker_main(spec_path: str, rank: int, torchft_path: str | None) -> None:
    torch.set_num_threads(1)
    if torchft_path:
        sys.path.insert(0, torchft_path)
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    result = torchft_replica(spec, rank)
    Path(spec.out_dir, f"rank{rank}.json").write_text(json.dumps(result))


# ---- the driver ---------------------------------------------------------------------------


def print_comparison(results: dict[str, MethodResult], torchft_error: str | None) -> None:
    local = results.get("local")
    print()
    print(
        f"{'method':<10} {'eval loss':>9} {'local r0':>9} {'bytes/step':>11} {'peak/sync':>10} "
        f"{'syncs':>6} {'s/step':>7} {'overhead':>9}"
    )
    for r in results.values():
        overhead = f"{r.seconds_per_step / local.seconds_per_step - 1:+.1%}" if local else "-"
        print(
            f"{r.method:<10} {r.eval_loss:>9.4f} {r.eval_loss_local:>9.4f} "
            f"{r.bytes_per_step:>11.0f} {r.peak_sync_bytes:>10} {r.syncs:>6} "
            f"{r.seconds_per_step:>7.3f} {overhead:>9}"
        )
    print()
    ours = results.get("ours") or results.get("ours-fp32")
    theirs = results.get("torchft")
    if ours is None:
        return
    if torchft_error or theirs is None:
        print(f"[SKIP] torchft did not run: {torchft_error}")
        return
    checks = [
        (
            f"torchft eval loss within 2% of {ours.method} "
            f"({theirs.eval_loss / ours.eval_loss:.4f})",
            abs(theirs.eval_loss / ours.eval_loss - 1) <= 0.02,
        ),
        (
            f"{ours.method} bytes/inner step no worse than torchft's "
            f"({ours.bytes_per_step:.0f} vs {theirs.bytes_per_step:.0f}, "
            f"{theirs.bytes_per_step / ours.bytes_per_step:.1f}x fewer)",
            ours.bytes_per_step <= theirs.bytes_per_step,
        ),
    ]
    if local:
        ours_over = ours.seconds_per_step / local.seconds_per_step - 1
        theirs_over = theirs.seconds_per_step / local.seconds_per_step - 1
        checks.append(
            (
                f"{ours.method} step-time overhead no worse than torchft's ({ours_over:+.1%} vs "
                f"{theirs_over:+.1%}; noisy on shared CPUs)",
                ours_over <= theirs_over,
            )
        )
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")


def main(argv: list[str] | None = None) -> int:
    parser_argv = list(sys.argv[1:] if argv is None else argv)
    torchft_path = _pop_option(parser_argv, "--torchft-path")
    worker = _pop_option(parser_argv, "--torchft-worker")
    args = parse_args(parser_argv, steps=TORCHFT_STEPS)
    if worker is not None:
        worker_main(args.worker_spec, args.worker_rank, torchft_path)
        return 0
    torch.set_num_threads(1)
    torchft_error = torchft_status(torchft_path)
    if args.methods == "ddp,diloco,streaming":
        args.methods = "local,ours,torchft"  # add ours-fp32 for torchft's own wire format
    results: dict[str, MethodResult] = {}
    with tempfile.TemporaryDirectory(prefix="diloco-vs-torchft-") as tmp:
        work_dir = Path(tmp)
        corpus_path = prepare_corpus(args, work_dir)
        for name in args.methods.split(","):
            if name == "torchft" and torchft_error:
                print(f"torchft: not run ({torchft_error})")
                continue
            t0 = time.perf_counter()
            try:
                results[name] = _run(name, args, corpus_path, work_dir, torchft_path, torchft_error)
            except Exception as exc:  # report and go on with the others
                if name != "torchft":
                    raise
                torchft_error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print_comparison(results, torchft_error)
    if args.json:
        payload = {"results": {k: asdict(v) for k, v in results.items()}}
        Path(args.json).write_text(json.dumps(payload | {"torchft_error": torchft_error}, indent=2))
    return 0


def _run(
    name: str,
    args: argparse.Namespace,
    corpus_path: Path,
    work_dir: Path,
    torchft_path: str | None,
    torchft_error: str | None,
) -> MethodResult:
    (stream,) = (s for s in method_specs(_only(args, "streaming"), corpus_path))
    if name == "local":
        spec = RunSpec(**{**asdict(stream), "method": "local", "diloco": None})
        return run_method(spec, work_dir)
    if name == "ours":
        return run_method(RunSpec(**{**asdict(stream), "method": "ours"}), work_dir)
    if name == "ours-fp32":
        fp32 = dict(stream.diloco, quantization=None)
        return run_method(
            RunSpec(**{**asdict(stream), "method": "ours-fp32", "diloco": fp32}), work_dir
        )
    if name != "torchft":
        raise SystemExit(f"unknown method {name!r}")
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=args.replicas)
    try:
        spec = RunSpec(
            **{**asdict(stream), "method": "torchft", "extra": {"lighthouse": lighthouse.address()}}
        )
        extra_args = ["--torchft-worker", "1"] + (
            ["--torchft-path", torchft_path] if torchft_path else []
        )
        return run_method(spec, work_dir, script=__file__, extra_args=extra_args)
    finally:
        lighthouse.shutdown()


def _only(args: argparse.Namespace, method: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "methods": method})


def _pop_option(argv: list[str], flag: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
