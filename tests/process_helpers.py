"""Subprocess helpers shared by the launcher and sweep tests."""

import signal
import subprocess
import time
from collections.abc import Callable


def sigterm_when_ready(cmd: list[str], ready: Callable[[], bool], timeout: float = 60) -> tuple[int, str]:
    """Starts `cmd`, waits until `ready()` (at most `timeout` s), sends it SIGTERM; returns (exit status, stdout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not ready() and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out
