"""One rank of bench/wan_exchange_lab.py's timing of the three ways lanes share a DiLoCo
exchange (not run on its own; started by `hetsched launch` under a plan with 2+ lanes
per stage and `diloco.exchange` other than `per_lane`, so the relay groups exist).

    worker.py --numel N --quantization fp4 --repeats R --out OUT.json

Every rank builds the same fp32 vector of N values (one fragment's pseudo-gradient; its
replica's seed), then for each way, R times: a barrier, the exchange, a barrier; the
time is rank 0's wall clock between the barriers (the slowest rank's exchange). `per_lane`
averages the whole vector over each lane's `diloco` group; `lead` and `sharded` go
through `diloco.relay`. Rank 0 writes each way's seconds and the bytes each way handed to
the cross-site groups (summed over ranks), and checks that all three agree (fp32: equal;
quantized: `lead` bit for bit, `sharded` within one quantization step's worth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco import SiteRelay, average_across_replicas, make_codec  # noqa: E402
from diloco.accounting import CountingComm, SyncRecord  # noqa: E402
from holmes.runtime import PlanRun  # noqa: E402


def exchange(way: str, values: torch.Tensor, run: PlanRun, quantization: str) -> tuple:
    codec = make_codec(None if quantization == "none" else quantization, 32)
    comm = CountingComm(run.group_of_kind("diloco"))
    wan, site = SyncRecord("sync", 0, 0), SyncRecord("site", 0, 0)
    if way == "per_lane" or run.relay is None:
        return average_across_replicas(values, codec, comm, wan), wan.sent
    from diloco import relayed_average

    relay = SiteRelay(run.relay.group, run.relay.ranks, way)  # type: ignore[arg-type]
    result = relayed_average(values, codec, comm, relay, CountingComm(relay.group), wan, site)
    return result, wan.sent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, required=True)
    p.add_argument("--quantization", default="fp4")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    run = PlanRun.from_env()
    g = torch.Generator().manual_seed(1000 + run.placement.replica)
    values = torch.randn(args.numel, generator=g) * 1e-2
    results: dict[str, dict] = {}
    outputs = {}
    for way in ("per_lane", "lead", "sharded"):
        seconds, sent = [], 0
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            outputs[way], sent_now = exchange(way, values, run, args.quantization)
            dist.barrier()
            seconds.append(time.perf_counter() - start)
            sent += sent_now
        total = torch.tensor([float(sent)])
        dist.all_reduce(total)
        results[way] = {"seconds": seconds, "wan_sent_per_exchange": total.item() / args.repeats}
    base = outputs["per_lane"]
    for way in ("lead", "sharded"):
        results[way]["max_abs_diff_vs_per_lane"] = (outputs[way] - base).abs().max().item()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    run.exit()


if __name__ == "__main__":
    main()
