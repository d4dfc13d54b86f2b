"""The `hetsched` click group. Sub-commands are imported when used, so `hetsched plan`
does not pay for the lab's or the probe's imports."""

from __future__ import annotations

import importlib

import click

# command name -> (module, attribute)
COMMANDS = {
    "calibrate": ("cli.calibrate", "calibrate"),
    "demo": ("cli.demo", "demo"),
    "lab": ("cli.lab", "lab"),
    "launch": ("cli.launch", "launch"),
    "plan": ("cli.plan", "plan"),
    "probe": ("cli.probe", "probe"),
    "report": ("cli.calibrate", "report"),
    "show": ("cli.plan", "show"),
    "simulate": ("cli.plan", "simulate"),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands live in COMMANDS and load on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
      hetsched launch plan.yaml -- train.py            one torchrun per host
      hetsched report RUN_DIR --gantt step.png         predicted vs measured
      hetsched calibrate RUN_DIR -o calibration.yaml   fit the cost model to the run
      hetsched plan topology.yaml -m llama-7b --calibration calibration.yaml -o plan.yaml
    """


def main() -> None:
    cli(prog_name="hetsched")
