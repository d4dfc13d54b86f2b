"""What crosses ssh: the `ssh` argv and the one shell command each remote host runs.

This module owns `SshOptions` (ssh config file, identity, user, extra `-o` options and
the remote working directory), checking them, and building from them:

- the argv of the local `ssh` process: a list, never a shell string, ending in
  `-- ADDRESS REMOTE_COMMAND`; `BatchMode=yes` (never prompts) and `LogLevel=ERROR`
  (no "Connection closed" noise), `-tt` for launches so that when the launcher stops
  `ssh`, sshd closes the remote pty and the remote torchrun gets SIGHUP;
- the remote command, which ssh hands to the remote login shell (a POSIX shell: sh,
  bash, dash, zsh) as one string: `cd -- WORKDIR && exec env K=V ... ARGV...`, every
  word passed through `shlex.quote`, so a value with spaces, quotes, `$(...)`, `;` or
  newlines arrives as one word, verbatim;
- the pre-flight command, which checks the working directory and the program on a host
  and answers with an exit status (`CHECK_NO_WORKDIR`, `CHECK_NO_PROGRAM`).

It does no I/O.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from topology.errors import InputError

BASE_OPTIONS = ("-o", "BatchMode=yes", "-o", "LogLevel=ERROR")
SSH_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*[= ]\S")
CHECK_NO_WORKDIR = 3
CHECK_NO_PROGRAM = 4


@dataclass(frozen=True)
class SshOptions:
    """How this machine reaches the hosts, and where the job runs on them."""

    workdir: str = "/"
    config: Path | None = None
    identity: Path | None = None
    user: str | None = None
    options: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse values ssh or the remote shell could misread, naming the flag."""
        if not self.workdir.startswith("/") or not _printable(self.workdir, newline=True):
            raise InputError(f"{self.workdir!r} must be an absolute path on the remote hosts, "
                             "without NUL", field="--workdir")
        for path, flag in ((self.config, "--ssh-config"), (self.identity, "--identity")):
            if path is not None and not path.is_file():
                why = "is not a file" if path.exists() else "not found"
                raise InputError(f"{path} {why}", field=flag)
        if self.user is not None and not SSH_USER.match(self.user):
            raise InputError(f"{self.user!r} is not a user name (letters, digits, '_', '.', "
                             "'-'; not first '-' or '.')", field="--ssh-user")
        for option in self.options:
            if not SSH_OPTION.match(option) or not _printable(option, newline=False):
                raise InputError(f"{option!r} is not an ssh option KEY=VALUE",
                                 field="--ssh-option")


def _printable(text: str, *, newline: bool) -> bool:
    allowed = {"\n", "\t"} if newline else set()
    return "\0" not in text and all(c.isprintable() or c in allowed for c in text)


def ssh_argv(ssh: SshOptions, address: str, remote: str, *, tty: bool,
             extra: Sequence[str] = ()) -> tuple[str, ...]:
    """`ssh [options] -- ADDRESS REMOTE`: ssh's own options from `ssh`, then `extra`."""
    argv = ["ssh", *BASE_OPTIONS, *(["-tt"] if tty else [])]
    if ssh.config is not None:
        argv += ["-F", str(ssh.config)]
    if ssh.identity is not None:
        argv += ["-i", str(ssh.identity), "-o", "IdentitiesOnly=yes"]
    if ssh.user is not None:
        argv += ["-l", ssh.user]
    for option in (*ssh.options, *extra):
        argv += ["-o", option]
    return (*argv, "--", address, remote)


def remote_command(workdir: str, env: Mapping[str, str], argv: Sequence[str]) -> str:
    """The shell command a host runs: go to `workdir`, then become `argv` with `env`.

    Variable names are checked by the caller (`[A-Za-z_][A-Za-z0-9_]*`), so `NAME=value`
    is never read as an option of `env`; every word is quoted on its own."""
    words = ["env", *(f"{name}={value}" for name, value in env.items()), *argv]
    return f"cd -- {shlex.quote(workdir)} && exec {shlex.join(words)}"


def remote_check(workdir: str, program: str) -> str:
    """Exit `CHECK_NO_WORKDIR` without `workdir`, `CHECK_NO_PROGRAM` without `program`."""
    return (f"cd -- {shlex.quote(workdir)} || exit {CHECK_NO_WORKDIR}; "
            f"command -v {shlex.quote(program)} >/dev/null || exit {CHECK_NO_PROGRAM}")


def remote_program(words: Sequence[str], flag: str) -> tuple[str, ...]:
    """A remote program's words (`--python`, `--torchrun`): not empty, no leading '-'."""
    if not words or not words[0] or words[0].startswith("-"):
        raise InputError(f"{shlex.join(words)!r} must name a program (not empty, not "
                         "starting with '-')", field=flag)
    if not all(_printable(w, newline=False) for w in words):
        raise InputError("may not hold control characters", field=flag)
    return tuple(words)
