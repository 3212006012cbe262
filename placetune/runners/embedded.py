"""The default runner: llama.cpp embedded through llama-cpp-python, one fresh child process per measurement.

A fresh process per measurement means a crash, an out-of-memory abort or leaked memory costs one
trial, never the search, and that every measurement starts from the same cold state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from placetune.errors import PlacetuneError
from placetune.placement import ExpertRule, Placement, ggml_type_id
from placetune.runners.base import OK, Measurement, Stats, Workload, classify_failure
from placetune.runners.llamalog import buffer_sizes, check_placement, log_tail
from placetune.runners.process import kill_group


def default_threads() -> int:
    """llama-bench's default: the number of physical cores."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class EmbeddedRunner:
    """Measures with llama-cpp-python's bundled llama.cpp in a child process killed after a timeout."""

    name = "embedded"

    def __init__(self, rpc: Sequence[str] = (), seed: int = 0) -> None:
        self.rpc = list(rpc)
        self.seed = seed

    def request(self, model: Path, placement: Placement, workload: Workload) -> dict[str, Any]:
        overrides = [(o.pattern() if isinstance(o, ExpertRule) else o.pattern, o.buft) for o in placement.overrides]
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
        command = [sys.executable, "-m", "placetune.runners.embedded_child"]
        started = time.perf_counter()
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log_file:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                text=True, start_new_session=True,
            )
            timed_out = False
            try:
                out, _ = proc.communicate(json.dumps(self.request(model, placement, workload)), workload.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
                out, _ = proc.communicate()
            except BaseException:
                kill_group(proc)
                proc.wait()
                raise
            log_file.seek(0)
            log = log_file.read()
        wall = time.perf_counter() - started
        result = _last_json(out)
        m = Measurement(runner=self.name, status="error", command=command, wall_s=wall, log_tail=log_tail(log))
        m.device_memory = buffer_sizes(log).get("model", {})
        if result.get("status") == OK and proc.returncode == 0:
            m.status = OK
            m.pp = Stats(tuple(result["pp"]), workload.n_prompt)
            m.tg = Stats(tuple(result["tg"]), workload.n_gen)
            m.load_s = result["load_s"]
            m.measure_s = result["measure_s"]
            m.peak_rss_bytes = result["peak_rss_bytes"]
            m.build = {**result["build"], "devices": result["devices"], "threads": result["threads"]}
            m.tensor_buffers, m.placement_issues = check_placement(model, placement, log)
        elif result.get("status") and not timed_out:
            m.status, m.reason = result["status"], result["reason"]
            if m.status != "bad-args":
                status, reason = classify_failure(proc.returncode, log)
                if status == "oom":
                    m.status, m.reason = status, reason
        else:
            m.status, m.reason = classify_failure(proc.returncode, log, timed_out)
        return m


def _last_json(out: str | None) -> dict[str, Any]:
    for line in reversed((out or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {}
    return {}


def probe_llama(rpc: Sequence[str] = (), timeout_s: float = 60.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The devices llama-cpp-python's llama.cpp sees (RPC servers included) and its build, from a child."""
    request = json.dumps({"probe": True, "rpc": list(rpc)})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "placetune.runners.embedded_child"],
            input=request, capture_output=True, text=True, timeout=timeout_s, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        where = f" (RPC {', '.join(rpc)})" if rpc else ""
        raise PlacetuneError(f"llama.cpp device probe did not answer in {timeout_s:.0f} s{where}") from None
    result = _last_json(proc.stdout)
    if result.get("status") != OK:
        status, reason = classify_failure(proc.returncode, proc.stderr)
        raise PlacetuneError(f"llama.cpp device probe failed ({status}): {result.get('reason') or reason}")
    return result["devices"], result["build"]
