"""A host's keeper: the process between the launcher and that host's command, so that
nothing of a launch outlives the launcher, even when it is killed with SIGKILL.

    python -m cli.keeper -- COMMAND...

`cli.supervise` starts one keeper per host with a pipe on its stdin that it never writes.
The keeper makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), so workers whose
torchrun dies, and workers torchrun put in sessions of their own, stay its descendants;
it asks for SIGUSR1 when the launcher dies (`PR_SET_PDEATHSIG`), and it reads its stdin:
end of file means the launcher is gone, however it ended. Then every descendant gets
SIGTERM, and SIGKILL after `GRACE_S`, and the keeper exits. When the command ends by
itself, descendants it left behind are stopped the same way and the keeper ends as the
command did (same exit status, or the same signal), so the launcher sees the command's
own result. SIGTERM, SIGHUP and SIGINT reach the keeper only together with the command
(the launcher signals the host's process group), so the keeper leaves them to it.

It runs on the machine of the launcher (`--via ssh` keeps the local ssh client), uses
only the standard library and psutil, and prints nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 3.0
POLL_S = 0.1
EXIT_CANNOT_START = 127


def _prctl(option: int, value: int) -> None:
    """Best effort: without libc's prctl (not Linux) the stdin watch still works."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def stop_descendants(grace_s: float = GRACE_S) -> None:
    """SIGTERM every descendant, then SIGKILL whatever is still there after `grace_s`
    (a stopped process never acts on SIGTERM)."""
    me = psutil.Process()
    for child in me.children(recursive=True):
        with suppress(psutil.Error):
            child.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and me.children(recursive=True):
        _reap()
        time.sleep(POLL_S)
    for child in me.children(recursive=True):
        with suppress(psutil.Error):
            child.kill()
    time.sleep(POLL_S)
    _reap()


def _reap() -> None:
    """Collect exited children (orphans adopted as subreaper included)."""
    with suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


@dataclass
class Launcher:
    """Whether the launcher is gone. A plain flag, no lock: the signal handler sets it,
    and a handler that takes a lock the interrupted main thread holds deadlocks (as
    `threading.Event.set` can)."""

    gone: bool = False

    def watch_stdin(self) -> None:
        """Until stdin ends: the launcher, the pipe's only writer, is gone."""
        with suppress(OSError):
            while os.read(0, 4096):
                pass
        self.gone = True

    def on_signal(self, signum: int, frame: object) -> None:
        self.gone = True


def _end_like(returncode: int) -> None:
    """Exit with `returncode`, or die of the same signal."""
    if returncode < 0:
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
        time.sleep(1)
        os._exit(128 - returncode)
    os._exit(returncode)


def main(argv: list[str]) -> None:
    command = argv[1:] if argv and argv[0] == "--" else argv
    if not command:
        os._exit(EXIT_CANNOT_START)
    launcher = Launcher()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGUSR1, launcher.on_signal)
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1))
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)  # the command gets it too
    threading.Thread(target=launcher.watch_stdin, daemon=True).start()
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    except OSError as exc:
        os.write(2, f"keeper: cannot start {command[0]}: {exc}\n".encode())
        os._exit(EXIT_CANNOT_START)
    while child.poll() is None and not launcher.gone:
        time.sleep(POLL_S)
    stop_descendants()
    if child.returncode is None:  # the launcher is gone
        os._exit(EXIT_CANNOT_START)
    _end_like(child.returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
