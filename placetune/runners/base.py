"""What every runner takes (a Workload) and returns (a Measurement), and the statistics on samples.

Runners live behind one small protocol so that the search, verify and regress never care whether
numbers came from embedded llama.cpp, llama-bench or llama-server.
"""

from __future__ import annotations

import math
import re
import signal
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from placetune.errors import PlacetuneError
from placetune.placement import Placement

OK, OOM, CRASH, TIMEOUT, BAD_ARGS, ERROR = "ok", "oom", "crash", "timeout", "bad-args", "error"
STATUSES = (OK, OOM, CRASH, TIMEOUT, BAD_ARGS, ERROR)


@dataclass(frozen=True)
class Workload:
    """What one measurement does: a prompt of n_prompt tokens and n_gen generated tokens at a KV depth."""

    n_prompt: int = 512
    n_gen: int = 128
    depth: int = 0
    repetitions: int = 5
    warmups: int = 3
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for flag, value, least in (("--prompt-tokens/-p", self.n_prompt, 0), ("--gen-tokens/-n", self.n_gen, 0),
                                   ("--depth/-d", self.depth, 0), ("--reps/-r", self.repetitions, 1),
                                   ("--warmups", self.warmups, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise PlacetuneError(f"{flag} must be a whole number >= {least}, got {value!r}")
        if not self.n_prompt and not self.n_gen:
            raise PlacetuneError("-p and -n are both 0: nothing to measure; give a prompt or a generation length")
        if not 0 < self.timeout_s < math.inf:
            raise PlacetuneError(f"the timeout must be a positive number of seconds, got {self.timeout_s!r}")

    @property
    def context_needed(self) -> int:
        """Context one request fills: the depth prefix, the prompt, and n_gen + 1 sampled tokens."""
        return self.depth + max(self.n_prompt, 1) + self.n_gen + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlacetuneError(f"workload has unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class Stats:
    """Per-repetition tokens/s samples and their summaries."""

    samples: tuple[float, ...]
    tokens_per_sample: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def spread(self) -> float:
        """Relative spread: stdev / median (0 when there is a single sample)."""
        return self.stdev / self.median if self.median else 0.0

    @property
    def time_weighted(self) -> float:
        """Total tokens / total time: the harmonic mean of the rates, not their mean."""
        if not self.samples or any(s <= 0 for s in self.samples):
            return 0.0
        return len(self.samples) / sum(1.0 / s for s in self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": list(self.samples),
            "tokens_per_sample": self.tokens_per_sample,
            "median": self.median,
            "stdev": self.stdev,
            "spread": self.spread,
            "time_weighted": self.time_weighted,
        }


@dataclass
class Measurement:
    """One placement measured once by one runner, with everything needed to trust or reject it."""

    runner: str
    status: str
    reason: str = ""
    pp: Stats = field(default_factory=lambda: Stats((), 0))
    tg: Stats = field(default_factory=lambda: Stats((), 0))
    load_s: float | None = None
    peak_rss_bytes: int | None = None
    device_memory: dict[str, int] = field(default_factory=dict)  # buffer type -> model bytes llama.cpp reported
    # What llama.cpp reported per kind (model, KV, compute, output) and device, from its own log lines
    reported: dict[str, dict[str, int]] = field(default_factory=dict)
    tensor_buffers: dict[str, str] = field(default_factory=dict)  # tensor -> buffer type llama.cpp reported
    placement_issues: list[str] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    log_tail: str = ""
    wall_s: float = 0.0
    measure_s: float = 0.0  # time llama.cpp spent in the timed passes

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pp"] = self.pp.to_dict()
        d["tg"] = self.tg.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        d = dict(d)
        for key in ("pp", "tg"):
            s = d.get(key) or {}
            d[key] = Stats(tuple(s.get("samples", ())), int(s.get("tokens_per_sample", 0)))
        return cls(**d)


class Runner(Protocol):
    """Measures one placement of one model under one workload. Never raises for llama.cpp failures:
    those come back as a Measurement with a non-ok status and a one-line reason."""

    name: str

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement: ...


def classify_failure(returncode: int | None, log: str, timed_out: bool = False) -> tuple[str, str]:
    """Status and one-line reason for a failed llama.cpp run, from its exit and its log."""
    if timed_out:
        return TIMEOUT, "llama.cpp did not finish within the timeout and was killed"
    lower = log.lower()
    oom_marks = ("out of memory", "failed to allocate", "unable to allocate", "cudamalloc failed", "bad_alloc")
    for line in reversed(log.splitlines()):
        low = line.lower()
        if any(m in low for m in oom_marks):
            return OOM, line.strip()[:300]
    if any(m in lower for m in oom_marks):
        return OOM, "out of memory"
    arg_marks = ("invalid argument", "unknown argument", "error while handling argument", "invalid parameter",
                 "unknown buffer type", "error: invalid")
    for line in reversed(log.splitlines()):
        if any(m in line.lower() for m in arg_marks):
            return BAD_ARGS, line.strip()[:300]
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = ""
        if re.search(r"^\S+:\s+AMX model buffer size", log, re.M):
            hint = ("; llama.cpp was using its AMX buffer type, which crashes on some CPUs and VMs "
                    "(llama.cpp issue 20824): try --no-repack")
        return CRASH, f"llama.cpp was killed by {name}{hint}"
    last = _last_meaningful(log)
    return ERROR, f"llama.cpp exited with status {returncode}: {last}" if returncode else last


def _last_meaningful(log: str) -> str:
    for line in reversed(log.splitlines()):
        line = line.strip()
        if line and not line.startswith(("llama_perf", "~", "common_perf")):
            return line[:300]
    return "no output"
