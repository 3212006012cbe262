"""The llama-bench runner: a placement measured by llama.cpp's own benchmark tool, exactly as users run it.

pp and tg are llama-bench's two tests (`-p n_prompt -n n_gen -d depth -r repetitions`), read from its
JSONL output, so numbers here match what `llama-bench` prints for the same flags and build.
Warm-ups: llama-bench runs one untimed warm-up pass per test (a full prompt for pp, one token for tg);
warmups=0 turns it off with --no-warmup, and each warm-up beyond the first is one more repetition
whose samples are dropped, so the kept samples come after `warmups` passes in the same process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from placetune.placement import Placement, render_bench_command, render_fit_target
from placetune.runners.base import BAD_ARGS, ERROR, OK, Measurement, Stats, Workload, classify_failure
from placetune.runners.binaries import binary_build, find_binary, run_to_end
from placetune.runners.llamalog import buffer_sizes, check_placement, log_tail, overridden_tensors

# Process flags, not placement: -v prints the DEBUG `buffer type overridden` lines the check reads.
VERBOSE = "-v"
NO_WARMUP = "--no-warmup"
FIT_MARGIN_MIB = 1024  # llama.cpp's default --fit-target (common/common.h)


class LlamaBenchRunner:
    """Runs llama-bench once per measurement and keeps its per-repetition samples."""

    name = "llama-bench"

    def __init__(self, bin_dir: str | Path | None = None, rpc: Sequence[str] = (), fit_on: bool = False,
                 fit_margins_mib: Sequence[int] = ()) -> None:
        """fit_on: let llama.cpp's --fit place the tensors (llama-bench -fitt MARGINS, one per device; none:
        llama.cpp's own), as a user who sets nothing gets; the placement's own layers and overrides must then
        be empty."""
        self.bin_dir = bin_dir
        self.rpc = tuple(rpc)
        self.fit_on = fit_on
        self.fit_margins_mib = list(fit_margins_mib) or [FIT_MARGIN_MIB]

    def command(self, model: Path, placement: Placement, workload: Workload) -> list[str]:
        """The exact llama-bench command line a measurement runs."""
        binary = find_binary("llama-bench", self.bin_dir)
        cmd = render_bench_command(
            str(model), placement, binary=str(binary), n_prompt=workload.n_prompt, n_gen=workload.n_gen,
            depth=workload.depth, repetitions=workload.repetitions + _extra_warmups(workload), rpc=self.rpc,
            output="jsonl",
        )
        fit = render_fit_target(self.fit_margins_mib) if self.fit_on else []
        return [*cmd, *fit, VERBOSE] + ([NO_WARMUP] if workload.warmups == 0 else [])

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        command = self.command(model, placement, workload)
        run = run_to_end(command, workload.timeout_s, env=placement.env)
        m = Measurement(runner=self.name, status=ERROR, command=command, wall_s=run.wall_s,
                        log_tail=log_tail(run.log), peak_rss_bytes=run.peak_rss_bytes)
        m.build = binary_build(command[0])
        # one context per test: the pp test's is the largest
        m.reported = buffer_sizes(run.log, peak=True, rpc=self.rpc)
        m.device_memory = m.reported.get("model", {})
        tests = _jsonl(run.stdout)
        # llama-bench prints argument errors to stdout, and drops a bad -ot without failing when more
        # flags follow it, so an `error:` line there fails the measurement whatever the exit status.
        said = _error_lines("\n".join(line for line in run.stdout.splitlines() if not line.startswith("{")))
        if said and not run.timed_out:
            m.status, m.reason = BAD_ARGS, "; ".join(filter(None, (said, _error_lines(run.log))))[:300]
            return m
        if run.timed_out or run.returncode != 0 or not tests:
            m.status, m.reason = classify_failure(run.returncode, run.log, run.timed_out)
            if run.returncode == 0 and not run.timed_out:
                m.reason = "llama-bench printed no results: " + m.reason
            return m
        drop = _extra_warmups(workload)
        pp = [t for t in tests if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0]
        tg = [t for t in tests if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
        if (workload.n_prompt and not pp) or (workload.n_gen and not tg):
            m.reason = f"llama-bench printed {len(tests)} result lines but not the pp and tg tests asked for"
            return m
        m.status = OK
        if pp:
            m.pp = Stats(tuple(pp[0]["samples_ts"][drop:]), workload.n_prompt)
        if tg:
            m.tg = Stats(tuple(tg[0]["samples_ts"][drop:]), workload.n_gen)
        m.measure_s = sum(ns for t in pp[:1] + tg[:1] for ns in t["samples_ns"][drop:]) / 1e9
        first = tests[0]
        m.build.update(
            build_number=first.get("build_number"), commit=first.get("build_commit"),
            backends=[b for b in str(first.get("backends", "")).split(",") if b] or m.build.get("backends"),
            cpu_info=first.get("cpu_info"), gpu_info=first.get("gpu_info"),
            threads=first.get("n_threads"),
        )
        if self.fit_on:  # --fit chose the overrides: report where tensors went, there is no plan to check
            m.tensor_buffers = overridden_tensors(run.log, self.rpc)
        else:
            m.tensor_buffers, m.placement_issues = check_placement(model, placement, run.log, self.rpc)
        return m


def _extra_warmups(workload: Workload) -> int:
    return max(workload.warmups - 1, 0)


def _jsonl(out: str) -> list[dict[str, Any]]:
    tests = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                tests.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return tests


def _error_lines(log: str) -> str:
    """The `error: ...` lines of llama-bench output, joined: they say what was wrong, unlike its usage dump."""
    return "; ".join(dict.fromkeys(line.strip() for line in log.splitlines() if line.lower().startswith("error")))
