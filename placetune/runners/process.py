"""Process hygiene for llama.cpp children: each runs in its own process group and dies with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group (llama.cpp may fork helpers), ignoring one already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
