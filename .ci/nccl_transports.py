"""On a GPU machine: create an NCCL group the way hetsched's runtime does for one network
and print what NCCL chose. Run by .ci/gpu_smoke.sh under torchrun with NCCL_DEBUG=INFO:

    torchrun --standalone --nproc-per-node 1 .ci/nccl_transports.py --net Socket

It prints what the installed torch offers (`holmes.transports.net_support`), creates the
group with `holmes.transports.nccl_options` (`ncclConfig_t.net_name`; with `--net none`
NCCL's own choice), runs one all-reduce so NCCL creates the communicator, and prints
`net_name asked: X`. NCCL's own `NCCL INFO ... Using network ...` lines on stderr say
what it really used; the shell script collects them per network. Exit 0 when the group
worked, 1 when NCCL refused it (say, IB on a machine without an HCA).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from holmes.transports import nccl_options, net_support


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--net", choices=["IB", "Socket", "none"], required=True)
    net = parser.parse_args().net
    support = net_support()
    print(f"per-communicator NCCL network: {support.per_communicator} ({support.detail})")
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl")
    config = {} if net == "none" else {"net_name": net}
    try:
        options = nccl_options(f"smoke-{net}", config)
        group = dist.new_group(list(range(dist.get_world_size())), backend="nccl",
                               pg_options=options)
        value = torch.ones(1, device="cuda")
        dist.all_reduce(value, group=group)
        torch.cuda.synchronize()
    except (RuntimeError, dist.DistBackendError) as exc:
        print(f"net_name asked: {net}: refused: {exc}".splitlines()[0], flush=True)
        return 1
    asked = options.config.net_name if options is not None else "NCCL's default"
    print(f"net_name asked: {asked}; all-reduce gave {value.item():g}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
