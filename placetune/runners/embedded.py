"""The default runner: llama.cpp embedded through llama-cpp-python, in a child process.

By default every measurement gets a fresh child, so a crash, an out-of-memory abort or leaked
memory costs one measurement, never the caller, and each starts from the same cold state. With
reuse=True (the search) the child keeps the model loaded while the model-level placement (layers,
overrides, load mode, repack, RPC) stays the same: screening's remaining repetitions and
context-only knobs (threads, batch, ubatch, flash attention, KV types) then cost no reload. A
child that fails is always discarded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from placetune.errors import PlacetuneError
from placetune.placement import Placement, ggml_type_id, rule_pattern
from placetune.runners.base import OK, Measurement, Stats, Workload, classify_failure
from placetune.runners.binaries import files_digest
from placetune.runners.embedded_child import model_key
from placetune.runners.llamalog import buffer_sizes, check_placement, log_tail
from placetune.runners.process import child_env, kill_group, spawn

# Listing devices takes about a second on a CPU; CUDA initialisation of several GPUs can take several.
PROBE_TIMEOUT_S = 20.0


def embedded_build_id(build: dict[str, Any]) -> str:
    """The embedded runner's llama.cpp build: llama-cpp-python's version and a digest of its shared libraries
    (the same version can be built against other backends, or rebuilt)."""
    return f"llama-cpp-python {build.get('llama_cpp_python', '?')} #{_library_digest()}"


@functools.cache
def _library_digest() -> str:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return "missing"
    lib = Path(spec.origin).parent / "lib"
    return files_digest([*lib.glob("*.so*")]) if lib.is_dir() else "no-lib"


def default_threads() -> int:
    """llama-bench's default: the number of physical cores."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class EmbeddedRunner:
    """Measures with llama-cpp-python's bundled llama.cpp in a child process killed after a timeout."""

    name = "embedded"

    def __init__(self, rpc: Sequence[str] = (), seed: int = 0, reuse: bool = False) -> None:
        self.rpc = list(rpc)
        self.seed = seed
        self.reuse = reuse
        self._worker: _Worker | None = None

    def request(self, model: Path, placement: Placement, workload: Workload) -> dict[str, Any]:
        overrides = [(rule_pattern(o), o.buft) for o in placement.overrides]
        types = {k: ggml_type_id(v) for k in ("cache_type_k", "cache_type_v") if (v := getattr(placement, k))}
        return {
            "model": str(model),
            "placement": placement.to_dict(),
            "overrides": overrides,
            "ggml_types": types,
            "workload": workload.to_dict(),
            "default_threads": default_threads(),
            "seed": self.seed,
            "rpc": self.rpc,
        }

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        request = self.request(model, placement, workload)
        key = model_key(request)
        if not (self.reuse and self._worker and self._worker.key == key and self._worker.alive()):
            self.close()
            self._worker = _Worker(key, placement.env)
        worker = self._worker
        started = time.perf_counter()
        try:
            result, timed_out = worker.ask(request, workload.timeout_s)
        except BaseException:  # Ctrl-C, SIGTERM: the child is mid-measurement and would not read a close
            kill_group(worker.proc)
            self.close()
            raise
        wall = time.perf_counter() - started
        log = worker.log()
        m = Measurement(runner=self.name, status="error", command=worker.command, wall_s=wall,
                        log_tail=log_tail(log))
        m.reported = buffer_sizes(log, rpc=self.rpc)
        m.device_memory = m.reported.get("model", {})
        if result.get("status") == OK:
            m.status = OK
            m.pp = Stats(tuple(result["pp"]), workload.n_prompt)
            m.tg = Stats(tuple(result["tg"]), workload.n_gen)
            m.load_s = result["load_s"]
            m.measure_s = result["measure_s"]
            m.peak_rss_bytes = result["peak_rss_bytes"]
            m.build = {**result["build"], "id": embedded_build_id(result["build"]), "devices": result["devices"],
                       "threads": result["threads"],
                       "reused_model": result["reused_model"]}
            m.tensor_buffers, m.placement_issues = check_placement(model, placement, log, self.rpc)
            if not self.reuse:
                self.close()
            return m
        returncode = worker.stop()
        self._worker = None
        if result.get("status") and not timed_out:
            m.status, m.reason = result["status"], result["reason"]
            if m.status != "bad-args":
                status, reason = classify_failure(returncode, log)
                if status == "oom":
                    m.status, m.reason = status, reason
        else:
            m.status, m.reason = classify_failure(returncode, log, timed_out)
        m.log_tail = log_tail(worker.log())
        worker.close_log()
        return m

    def close(self) -> None:
        """Stop the child that holds a loaded model, if any (it also exits when this process dies)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker.close_log()
            self._worker = None


class _Worker:
    """One embedded_child process: requests and answers as JSON lines, its log in a temporary file."""

    def __init__(self, key: str, env: Sequence[tuple[str, str]] = ()) -> None:
        self.key = key
        self.command = [sys.executable, "-m", "placetune.runners.embedded_child"]
        # Lives as long as the child; stop() closes it.
        self.log_file = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.proc = spawn(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file,
                          env=child_env(env))
        self.pending = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], bool]:
        """Send one request and wait for its answer; ({}, True) when the deadline passes."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {}, False
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return {}, True
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:  # the child died: the log says why
                    return {}, False
                self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return _last_json(line.decode(errors="replace")), False

    def log(self) -> str:
        self.log_file.flush()
        self.log_file.seek(0)
        return self.log_file.read()

    def stop(self) -> int | None:
        """Close the child's input (it exits) or kill its group; return its exit status."""
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def close_log(self) -> None:
        self.log_file.close()


def _last_json(out: str | None) -> dict[str, Any]:
    for line in reversed((out or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {}
    return {}


def probe_llama(rpc: Sequence[str] = (), timeout_s: float = PROBE_TIMEOUT_S
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The devices llama-cpp-python's llama.cpp sees (RPC servers included) and its build, from a child.

    llama.cpp's RPC client waits forever for a server that accepted the connection but does not
    answer, so the probe has its own short deadline, after which the child is killed.
    """
    worker = _Worker(key="probe")
    timed_out = True  # until the child answers: on a timeout or an interrupt it is killed, not asked to close
    try:
        result, timed_out = worker.ask({"probe": True, "rpc": list(rpc)}, timeout_s)
    finally:
        if timed_out:
            kill_group(worker.proc)
        returncode = worker.stop()
        log = worker.log()
        worker.close_log()
    if timed_out:
        where = ""
        if rpc:
            who = (f"server {rpc[0]}; check that it runs" if len(rpc) == 1
                   else f"servers {', '.join(rpc)}; check that each runs")
            where = f" while contacting RPC {who} ggml-rpc-server and serves no other client (one is served at a time)"
        raise PlacetuneError(f"llama.cpp device probe did not answer within {timeout_s:.0f} s{where}")
    if result.get("status") != OK:
        status, reason = classify_failure(returncode, log)
        raise PlacetuneError(f"llama.cpp device probe failed ({status}): {result.get('reason') or reason}")
    return result["devices"], {**result["build"], "id": embedded_build_id(result["build"])}
