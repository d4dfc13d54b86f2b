"""The `hetsched` click group: registers each sub-command group from its own module."""

from __future__ import annotations

import click

from cli.demo import demo
from cli.lab import lab
from cli.plan import plan, show, simulate
from cli.probe import probe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hetsched")
def cli() -> None:
    """hetsched: plan and run LLM training across clusters whose networks differ.

    \b
    Typical flow:
      hetsched demo                                    all of it on a built-in example
      hetsched probe agent --token-file T              on every host
      hetsched probe run hosts.yaml -o topology.yaml   measure the network
      hetsched lab up; hetsched probe lab              or emulate one on this machine
      hetsched plan topology.yaml -m llama-7b -o plan.yaml
      hetsched show plan.yaml --gantt plan.png         review before any GPU hour
      hetsched simulate plan.yaml --baseline naive     predicted speed vs Megatron order
    """


cli.add_command(probe)
cli.add_command(lab)
cli.add_command(demo)
cli.add_command(plan)
cli.add_command(show)
cli.add_command(simulate)


def main() -> None:
    cli(prog_name="hetsched")
