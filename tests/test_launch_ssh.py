"""`hetsched launch --via ssh`: what would be executed, with hostile values everywhere.

ssh hands its last argument to the remote login shell as `$SHELL -c COMMAND`. These tests
take the argv that `launch --dry-run --json` would start and run that command in the real
shells of this machine (dash, bash, zsh when present) exactly as sshd would, with a
recorder in place of the interpreter: the working directory, every argument and every
variable of the plan must arrive verbatim, and nothing hostile may run. The ssh options
are checked word for word, and bad flags are refused with one line and exit status 2.
The same launch over a real sshd is tests/test_launch_ssh_lab.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import test_launch_ssh_lab as lab
from test_launch import edit_plan, hetsched, make_plan, two_local_topology

from cli.remote import SshOptions, remote_check, remote_command, ssh_argv

ROOT = Path(__file__).resolve().parents[1]

# Each must reach the program as one word, unchanged; none may run anything.
HOSTILE = ["$(touch PWNED1)", ";touch PWNED2", "`touch PWNED3`", "a b", "'", '"', "\\",
           "$HOME", "*", "&& touch PWNED4 ||", "|cat", "line\nnext", "-e", "--", "",
           "x'\"'\"y", "${IFS}touch${IFS}PWNED5", "\t"]
HOSTILE_DIR = "w d $(touch PWNED6); `touch PWNED7` 'q' \"dq\" & \\ *\nnl"
HOSTILE_VALUE = "$(touch PWNED8); `touch PWNED9` 'q' \"dq\"\nsecond line"
SHELLS = [s for s in ("sh", "dash", "bash", "zsh") if shutil.which(s)]
RECORDER = """#!{python}
import json, os, sys
keep = ("HETSCHED_", "GLOO_", "NCCL_", "HS_", "PYTHONUNBUFFERED")
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
           "env": {{k: v for k, v in os.environ.items() if k.startswith(keep)}}}}
with open(os.environ["RECORD_TO"], "w") as out:
    json.dump(record, out)
"""


@pytest.fixture(scope="module")
def ssh_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-host plan whose gloo group also carries a hostile variable for h2."""
    plan = make_plan(tmp_path_factory.mktemp("plan"), two_local_topology(), "-m", "tiny-gpt")

    def hostile_env(data: dict[str, Any]) -> None:
        data["groups"][0].setdefault("env_per_host", {})["h2"] = {"HS_HOSTILE": HOSTILE_VALUE}

    return edit_plan(plan, tmp_path_factory.mktemp("hostile"), hostile_env)


def recorder(folder: Path) -> Path:
    """An executable that writes its argv, cwd and environment as JSON to $RECORD_TO;
    its own path holds spaces, quotes and `$(...)`."""
    path = folder / "bin $(touch PWNED10) 'q'" / "py;thon"
    path.parent.mkdir(parents=True)
    path.write_text(RECORDER.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_as_sshd_would(shell: str, command: str, record: Path, cwd: Path) -> dict[str, Any]:
    """`$SHELL -c COMMAND`, as sshd runs a command; the recorder's JSON."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "RECORD_TO": str(record)}
    done = subprocess.run([shell, "-c", command], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(record.read_text())


def pwned(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("PWNED*") if p.is_file()]


def test_hostile_values_arrive_verbatim_through_the_remote_shell(
        ssh_plan: Path, tmp_path: Path) -> None:
    workdir = tmp_path / HOSTILE_DIR
    workdir.mkdir()
    program = recorder(tmp_path)
    key, config = tmp_path / "id $(touch PWNED11)", tmp_path / "config; touch PWNED12"
    key.write_text("")
    config.write_text("")
    done = hetsched("launch", str(ssh_plan), "--via", "ssh", "--dry-run", "--json",
                    "--python", str(program), "--workdir", str(workdir),
                    "--identity", str(key), "--ssh-config", str(config), "--ssh-user", "root",
                    "--ssh-option", "Port=2222", "--ssh-option", "ServerAliveInterval=5",
                    "--rdzv-id", "job 1; $(x)", "--", "train.py", *HOSTILE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hosts = json.loads(done.stdout)["hosts"]
    for node, host in enumerate(hosts):
        argv = host["argv"]
        assert argv[:-2] == ["ssh", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-tt",
                             "-F", str(config), "-i", str(key), "-o", "IdentitiesOnly=yes",
                             "-l", "root", "-o", "Port=2222", "-o", "ServerAliveInterval=5",
                             "--"]
        assert argv[-2] == "127.0.0.1" and argv[-1] == host["remote_command"]
        expected = ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                    "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", host["rdzv_endpoint"], "--rdzv-id", "job 1; $(x)",
                    "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0",
                    "--local-addr", "127.0.0.1", "train.py", *HOSTILE]
        for shell in SHELLS:
            record = run_as_sshd_would(shell, argv[-1], tmp_path / "record.json", tmp_path)
            assert record["argv"] == expected, shell
            assert record["cwd"] == str(workdir), shell
            assert record["env"] == host["env"], shell
    assert hosts[1]["env"]["HS_HOSTILE"] == HOSTILE_VALUE
    assert "HS_HOSTILE" not in hosts[0]["env"]
    assert not pwned(tmp_path, ssh_plan.parent)


def test_the_builders_quote_every_word(tmp_path: Path) -> None:
    """cli.remote alone: hostile names of files, user options and variables."""
    ssh = SshOptions(workdir=str(tmp_path), config=tmp_path / "c f", identity=tmp_path / "k;",
                     user="ops.user-1", options=("ProxyJump=bastion",))
    argv = ssh_argv(ssh, "host-1", "REMOTE", tty=False, extra=("ConnectTimeout=5",))
    assert argv == ("ssh", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                    "-F", str(tmp_path / "c f"), "-i", str(tmp_path / "k;"),
                    "-o", "IdentitiesOnly=yes", "-l", "ops.user-1", "-o", "ProxyJump=bastion",
                    "-o", "ConnectTimeout=5", "--", "host-1", "REMOTE")
    program = recorder(tmp_path)
    env = {"HS_A": HOSTILE_VALUE, "HS_B": "", "HS_C": "=x y"}
    command = remote_command(str(tmp_path), env, [str(program), *HOSTILE])
    for shell in SHELLS:
        record = run_as_sshd_would(shell, command, tmp_path / "r.json", Path("/"))
        assert record == {"argv": HOSTILE, "cwd": str(tmp_path), "env": env}, shell
    assert not pwned(tmp_path)


@pytest.mark.parametrize(("workdir", "program", "status"), [
    ("HERE", "RECORDER", 0), ("HERE/missing $(touch PWNED)", "RECORDER", 3),
    ("HERE", "HERE/no such python", 4)])
def test_the_preflight_names_a_missing_workdir_or_program(
        tmp_path: Path, workdir: str, program: str, status: int) -> None:
    here = str(tmp_path)
    path = str(recorder(tmp_path)) if program == "RECORDER" else program.replace("HERE", here)
    check = remote_check(workdir.replace("HERE", here), path)
    for shell in SHELLS:
        done = subprocess.run([shell, "-c", check], capture_output=True, timeout=30)
        assert done.returncode == status, shell
    assert not pwned(tmp_path)


@pytest.mark.parametrize(("args", "words"), [
    (["--ssh-user", "-oProxyCommand=touch PWNED"], "--ssh-user: '-oProxyCommand"),
    (["--ssh-user", "root; touch PWNED"], "--ssh-user: 'root; touch PWNED' is not"),
    (["--ssh-option", "ProxyCommand"], "--ssh-option: 'ProxyCommand' is not"),
    (["--ssh-option", "Port=22\nProxyCommand=x"], "--ssh-option: "),
    (["--workdir", "relative/dir"], "--workdir: 'relative/dir' must be an absolute path"),
    (["--identity", "no-such-key"], "--identity: no-such-key not found"),
    (["--ssh-config", "."], "--ssh-config: . is not a file"),
    (["--python", "/p", "--torchrun", "torchrun"], "--python: give --python or --torchrun"),
    (["--python", "-c"], "--python: '-c' must name a program"),
    (["--torchrun", ""], "--torchrun: '' must name a program"),
    (["--torchrun", "'unclosed"], "--torchrun: cannot be split into words"),
    (["--via", "local", "--workdir", "/tmp"], "--workdir: is only for --via ssh"),
    (["--via", "lab", "--python", "/p"], "--python: is only for --via ssh"),
])
def test_bad_ssh_flags_are_refused_in_one_line(ssh_plan: Path, tmp_path: Path,
                                               args: list[str], words: str) -> None:
    done = hetsched("launch", str(ssh_plan), "--dry-run", *args, "--", "t.py", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    assert not pwned(tmp_path)


def test_the_default_workdir_is_this_directory(ssh_plan: Path, tmp_path: Path) -> None:
    done = hetsched("launch", str(ssh_plan), "--dry-run", "--json", "--", "t.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for host in json.loads(done.stdout)["hosts"]:
        words = host["remote_command"].split(" && exec ")[0]
        assert words == f"cd -- {tmp_path}"
        assert "'torchrun' --nnodes" not in host["remote_command"]
        assert " torchrun --nnodes 2 " in host["remote_command"]


def doc_commands(text: str) -> list[list[str]]:
    """Every command line of the page's ```sh blocks (continuations joined), as words."""
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", textwrap.dedent(block))
        commands.extend(shlex.split(line) for line in joined.splitlines() if line.strip())
    return commands


def test_the_walkthrough_is_what_the_lab_test_runs() -> None:
    """docs/launch.md shows the very commands and files test_launch_ssh_lab.py uses."""
    text = (ROOT / "docs" / "launch.md").read_text()
    commands = doc_commands(text)
    keys, repo = "$KEYS", "$REPO"
    assert lab.plan_argv(["hetsched"]) in commands
    assert lab.keygen_argv(f"{keys}/id_ed25519") in commands
    assert lab.keygen_argv(f"{keys}/host_ed25519") in commands
    assert lab.sshd_argv("$NS", keys, "$ADDR", "$HOST") in commands
    assert lab.launch_argv(["hetsched"], f"{repo}/.venv/bin/python", keys,
                           f"{repo}/examples/train_tinygpt.py") in commands
    assert lab.SSHD_CONFIG.format(keys=keys) in text
    assert lab.SSH_CONFIG.format(keys=keys) in text
    assert lab.JOB_DIR in text
    assert "[docs/launch.md](docs/launch.md)" in (ROOT / "README.md").read_text()
    assert "[launch.md](launch.md)" in (ROOT / "docs" / "runtime.md").read_text()
