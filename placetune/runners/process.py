"""Process hygiene for llama.cpp children: each runs in its own process group and dies with placetune.

A llama-server left behind keeps its port and the model's memory (VRAM on a GPU), and a llama-bench
left behind keeps measuring, so no child may outlive placetune, however placetune ends:
- kill -9 of placetune, or of its process group: the kernel sends the child SIGKILL (PR_SET_PDEATHSIG);
- SIGTERM or SIGHUP: they raise KeyboardInterrupt, like Ctrl-C, so every command's cleanup runs.
Children keep their own process group (start_new_session) so that a timeout kills all of llama.cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up here, once, so the hook that runs between fork and exec only makes the call.
_prctl = getattr(ctypes.CDLL(None), "prctl", None)


def spawn(command: Sequence[str], preexec: Callable[[], None] | None = None, **popen: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen for every child placetune starts: its own process group, and SIGKILL when placetune dies.

    The death signal follows the thread that forked, not the process. placetune starts each child from
    the thread that then waits for it and stops it (the main thread for the long-lived ones: the
    embedded worker, llama-server, ggml-rpc-server), so that thread never ends before its child.
    `preexec` runs in the child after the death signal is set (e.g. pinning it to a CPU).
    """
    parent = os.getpid()

    def die_with_parent() -> None:
        if _prctl is not None:  # Linux only; elsewhere the group kills on timeout and interrupt remain
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl: no signal will come
                os._exit(1)
        if preexec is not None:
            preexec()

    return subprocess.Popen(list(command), start_new_session=True, preexec_fn=die_with_parent, **popen)


def child_env(knobs: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """The environment of a llama.cpp child: placetune's own, without llama.cpp's LLAMA_ARG_* variables (they
    would silently change the measured line), plus the placement's backend knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env.update(dict(knobs))
    return env


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group (llama.cpp may fork helpers), ignoring one already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def interrupt_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so they take its cleanup path.

    Called once, from the console entry point. A signal the caller ignores (nohup ignores SIGHUP) stays
    ignored. During a search the first Ctrl-C only asks it to stop after the current trial; SIGTERM
    and SIGHUP stop at once, as a second Ctrl-C does: whoever sends them wants placetune gone.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.default_int_handler)
