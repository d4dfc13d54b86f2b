"""Hostile plan files for show, simulate and launch --dry-run: each refused cleanly.

Besides the classes every file gets (numbers, bombs, bytes, names, ...), a plan is
cross-checked on load: hand edits that no longer describe one job (a stage device not
launched, an unknown replica, no paths, nproc_per_node unlike the host's devices, a
model source that changed, ranks out of range, ...) must be refused alike by all three
commands, naming the field. Cases come from `hostile_cases`; each runs in-process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli

from hostile_cases import Case, all_cases, base_files, cases_of, check, prepare

PLAN_COMMANDS = ("show", "simulate", "launch --dry-run")


@pytest.mark.parametrize("case", [c for c in all_cases() if c.command in PLAN_COMMANDS],
                         ids=lambda c: c.id)
def test_hostile_plan_is_refused(case: Case, tmp_path: Path) -> None:
    problems = check(case, tmp_path, port=1)
    assert not problems, "\n".join(problems)


def test_every_cross_check_is_refused_by_all_three_commands() -> None:
    by_command = {command: {c.name: c.expect for c in all_cases()
                            if c.command == command and c.klass == "plan-xcheck"}
                  for command in PLAN_COMMANDS}
    assert by_command["show"] == by_command["simulate"] == by_command["launch --dry-run"]
    assert len(by_command["show"]) >= 30


def test_simulate_refuses_a_model_the_plan_was_not_made_for(tmp_path: Path) -> None:
    prepare(cases_of("simulate")[0], tmp_path, port=1)
    (tmp_path / "plan.yaml").write_bytes(base_files()["plan.yaml"])
    done = CliRunner().invoke(cli, ["simulate", str(tmp_path / "plan.yaml"), "--model",
                                    "llama-7b"])
    assert done.exit_code == 2
    assert done.stderr == (f"error: {tmp_path / 'plan.yaml'}: --model: llama-7b has name "
                           "llama-7b, but the plan was made for model.name tiny-gpt (plan "
                           "again, or pass the model it was made for)\n")
    done = CliRunner().invoke(cli, ["simulate", str(tmp_path / "plan.yaml"), "--model",
                                    "tiny-gpt", "--json"])
    assert done.exit_code == 0, done.output
