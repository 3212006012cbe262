"""The llama-server runner: a placement measured through the server users deploy, over its HTTP API.

The server is started from `render_server_command` plus process flags only (port, verbosity for the
DEBUG override lines, one slot, no web UI, and `-fit off` so llama.cpp does not change the placement
being measured), then timed with fixed `/completion` requests of random token ids. Samples are the
server's own `timings`: pp is prompt_per_second; tg is decoded tokens over predicted_ms, asking for
n_gen + 1 tokens because the first one is sampled from the prompt pass without a decode.

Warm-ups are whole requests of the same shape whose timings are dropped. Depth d > 0: a d-token prefix
is sent once with cache_prompt on, then every request is that prefix plus fresh prompt tokens, so the
server reuses the cached prefix and times only n_prompt tokens at depth d (checked from cache_n and
prompt_n); tg then runs at depth d + n_prompt, where llama-bench's tg runs at depth d.
The log runs at debug verbosity (the only level with the override lines), which costs the server
about 0.1 ms per generated token in log writes: small beside a real model's tens of ms per token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from placetune.errors import PlacetuneError
from placetune.placement import Placement, render_fit_target, render_server_command
from placetune.runners.base import BAD_ARGS, ERROR, OK, TIMEOUT, Measurement, Stats, Workload, classify_failure
from placetune.runners.binaries import binary_build, binary_help, exit_status, find_binary, reap
from placetune.runners.llamalog import buffer_sizes, check_placement, log_tail, overridden_tensors
from placetune.runners.process import child_env, kill_group, spawn

# Process flags, not placement: (flags, the --help text that shows this build has them). -lv 5 prints
# the DEBUG `buffer type overridden` lines; plain lines (no prefix or timestamps) are what llamalog
# parses. The serving context (-c, -np) and -fit off come with the placement's own server line.
_SERVER_FLAGS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("-lv", "5"), None),
    (("--no-log-prefix",), "--no-log-prefix"),
    (("--no-log-timestamps",), "--no-log-timestamps"),
    (("--no-webui",), "--no-webui"),
)
STOP_GRACE_S = 10.0


def server_flags(binary: str | Path) -> list[str]:
    """The process flags the runner adds, minus optional ones this llama-server build does not know."""
    text = binary_help(binary)
    return [f for flags, needs in _SERVER_FLAGS if needs is None or needs in text for f in flags]


class ServerStartError(PlacetuneError):
    """llama-server exited or did not answer /health before its deadline; carries its log."""

    def __init__(self, message: str, returncode: int | None, log: str, timed_out: bool) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log = log
        self.timed_out = timed_out


@dataclass
class Server:
    """A started llama-server. After the `running_server` block: how it ended, its whole log and peak RSS."""

    url: str
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]
    ready_s: float = 0.0
    exited_by_itself: bool = False
    returncode: int | None = None
    log: str = ""
    peak_rss_bytes: int | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(command: Sequence[str], port: int, timeout_s: float = 600.0, env: Sequence[tuple[str, str]] = (),
                   host: str = "127.0.0.1") -> Iterator[Server]:
    """Start this exact command line, wait until GET /health answers 200, yield it, and always stop it.

    The server gets its own process group; on leaving the block (normally, on error or on Ctrl-C) the
    group gets SIGTERM, then SIGKILL after STOP_GRACE_S, so no server outlives the block. Raises
    ServerStartError when the server exits early or is not ready within timeout_s.
    """
    started = time.monotonic()
    # An anonymous file: nothing is left behind even when placetune is killed with -9.
    with tempfile.TemporaryFile() as log_file:
        # Append mode: the child shares the file offset with the parent's reads, but always writes at the end.
        fcntl.fcntl(log_file, fcntl.F_SETFL, fcntl.fcntl(log_file, fcntl.F_GETFL) | os.O_APPEND)
        proc = spawn(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(env))
        server = Server(url=f"http://{host}:{port}", proc=proc, log_file=log_file)
        try:
            _wait_ready(server, started + timeout_s)
            server.ready_s = time.monotonic() - started
            yield server
        finally:
            _stop(server)
            server.log = _read_log(server)
            server.returncode = proc.returncode


def _wait_ready(server: Server, deadline: float) -> None:
    while True:
        status = exit_status(server.proc)
        if status is not None:
            _stop(server)
            log = _read_log(server)
            raise ServerStartError(f"llama-server exited with status {status} before it was ready: {_last_line(log)}",
                                   status, log, timed_out=False)
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise ServerStartError("llama-server did not answer /health with 200 before the timeout",
                                   None, _read_log(server), timed_out=True)
        time.sleep(0.1)


def _stop(server: Server) -> None:
    """SIGTERM the group, SIGKILL it after the grace period, then reap (only then may the pid be reused)."""
    proc = server.proc
    if proc.returncode is not None:
        return
    server.exited_by_itself = exit_status(proc) is not None
    if not server.exited_by_itself:
        kill_group(proc, signal.SIGTERM)
        grace_end = time.monotonic() + STOP_GRACE_S
        while exit_status(proc) is None and time.monotonic() < grace_end:
            time.sleep(0.02)
    kill_group(proc, signal.SIGKILL)  # the rest of the group, or the leader itself after the grace period
    server.peak_rss_bytes = reap(proc)


def _read_log(server: Server) -> str:
    server.log_file.seek(0)
    return server.log_file.read().decode("utf-8", errors="replace")


def _last_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST a JSON body and return the JSON answer; an HTTP error status becomes RuntimeError with its text."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=max(timeout_s, 0.1)) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}") from None


def get_json(url: str, timeout_s: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=max(timeout_s, 0.1)) as resp:
        return json.loads(resp.read())


class _Failed(Exception):
    """A request-level problem that makes this measurement fail with a status and reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class LlamaServerRunner:
    """Starts llama-server per measurement, times /completion requests, and stops it whatever happens."""

    name = "llama-server"

    def __init__(self, bin_dir: str | Path | None = None, rpc: Sequence[str] = (), seed: int = 0,
                 fit_on: bool = False, fit_margins_mib: Sequence[int] = ()) -> None:
        """fit_on: start the line as a user who passes only -m and -c would (--fit on, -np auto): llama.cpp
        places the tensors itself, and nothing placetune would add to pin them is added. fit_margins_mib:
        its -fitt per device, where a budget cannot be enforced otherwise (none: llama.cpp's own)."""
        self.bin_dir = bin_dir
        self.rpc = tuple(rpc)
        self.seed = seed
        self.fit_on = fit_on
        self.fit_margins_mib = list(fit_margins_mib)

    def command(self, model: Path, placement: Placement, workload: Workload, port: int) -> list[str]:
        """The exact llama-server command line a measurement starts (the context sized to the workload)."""
        binary = find_binary("llama-server", self.bin_dir)
        if placement.ctx is None:
            placement = replace(placement, ctx=workload.context_needed)
        if placement.parallel is None and not self.fit_on:  # -np auto would size the cache for 4 slots
            placement = replace(placement, parallel=1)
        margin = render_fit_target(self.fit_margins_mib) if self.fit_on else []
        return render_server_command(str(model), placement, binary=str(binary), host="127.0.0.1", port=port,
                                     rpc=self.rpc, fit_off=not self.fit_on and "--fit" in binary_help(binary),
                                     extra=[*margin, *server_flags(binary)])

    def measure(self, model: Path, placement: Placement, workload: Workload) -> Measurement:
        port = free_port()
        command = self.command(model, placement, workload, port)
        m = Measurement(runner=self.name, status=ERROR, command=command)
        m.build = binary_build(command[0])
        per_slot = (placement.ctx or 0) // (placement.parallel or 1)
        if placement.ctx is not None and per_slot < workload.context_needed:
            m.status = BAD_ARGS
            m.reason = (f"-c {placement.ctx} gives each of {placement.parallel or 1} slot(s) {per_slot} tokens, less "
                        f"than depth + prompt + gen + 1 = {workload.context_needed}; raise -c or shrink the workload")
            return m
        started = time.monotonic()
        deadline = started + workload.timeout_s
        try:
            with running_server(command, port, workload.timeout_s, env=placement.env) as server:
                m.load_s = server.ready_s
                try:
                    pp, tg, measure_s = self._time_requests(server.url, workload, deadline)
                except _Failed as exc:
                    m.status, m.reason = exc.status, exc.reason
                else:
                    m.status = OK
                    m.pp, m.tg, m.measure_s = pp, tg, measure_s
        except ServerStartError as exc:
            m.wall_s = time.monotonic() - started
            m.log_tail = log_tail(exc.log)
            m.reported = buffer_sizes(exc.log, rpc=self.rpc)
            m.device_memory = m.reported.get("model", {})
            m.status, m.reason = classify_failure(exc.returncode, exc.log, exc.timed_out)
            if m.status == TIMEOUT:
                m.reason = "llama-server was not ready before the timeout and was stopped"
            return m
        m.wall_s = time.monotonic() - started
        m.log_tail = log_tail(server.log)
        m.peak_rss_bytes = server.peak_rss_bytes
        m.reported = buffer_sizes(server.log, rpc=self.rpc)
        m.device_memory = m.reported.get("model", {})
        rc = server.returncode
        crashed = rc is not None and rc < 0 and rc not in (-signal.SIGTERM, -signal.SIGKILL)
        if m.status == ERROR and (server.exited_by_itself or crashed):
            m.status, m.reason = classify_failure(server.returncode, server.log)
        if m.status == OK and self.fit_on:  # --fit chose the overrides: there is no plan to check them against
            m.tensor_buffers = overridden_tensors(server.log, self.rpc)
        elif m.status == OK:
            m.tensor_buffers, m.placement_issues = check_placement(model, placement, server.log, self.rpc)
        return m

    def measure_running(self, url: str, workload: Workload) -> Measurement:
        """Time the workload against a llama-server started elsewhere, with the requests `measure` sends.

        `placetune verify` starts the exported command line itself, so the server's flags are the user's,
        not the ones `command` would add; only the timing is shared.
        """
        m = Measurement(runner=self.name, status=ERROR)
        started = time.monotonic()
        try:
            m.pp, m.tg, m.measure_s = self._time_requests(url, workload, started + workload.timeout_s)
        except _Failed as exc:
            m.status, m.reason = exc.status, exc.reason
        else:
            m.status = OK
        m.wall_s = time.monotonic() - started
        return m

    def _time_requests(self, url: str, workload: Workload, deadline: float) -> tuple[Stats, Stats, float]:
        """Warm-ups, then `repetitions` timed /completion requests: pp and tg samples and the seconds timed."""
        n_vocab = self._n_vocab(url, deadline)
        rng = random.Random(self.seed)
        prompt_len = max(workload.n_prompt, 1)  # a request needs one token; its pp is not kept when n_prompt=0
        prefix = [rng.randrange(n_vocab) for _ in range(workload.depth)]
        if prefix:
            self._complete(url, prefix, 0, True, deadline)
        previous_first = -1
        pp: list[float] = []
        tg: list[float] = []
        measure_ms = 0.0
        for i in range(workload.warmups + workload.repetitions):
            fresh = [rng.randrange(n_vocab) for _ in range(prompt_len)]
            if fresh[0] == previous_first:  # a repeated first token would extend the reused prefix
                fresh[0] = (fresh[0] + 1) % n_vocab
            previous_first = fresh[0]
            t = self._complete(url, prefix + fresh, workload.n_gen + 1 if workload.n_gen else 0, bool(prefix),
                               deadline)
            if t.get("cache_n", 0) != len(prefix) or t.get("prompt_n") != prompt_len:
                why = "; it cannot reuse the cached depth prefix for this model" if prefix else ""
                raise _Failed(ERROR, f"llama-server processed {t.get('prompt_n')} prompt tokens with "
                                     f"{t.get('cache_n')} cached, expected {prompt_len} with {len(prefix)} cached{why}")
            if workload.n_gen and t.get("predicted_n") != workload.n_gen + 1:
                raise _Failed(ERROR, f"llama-server generated {t.get('predicted_n')} tokens, "
                                     f"expected {workload.n_gen + 1} (ignore_eos was set)")
            if i < workload.warmups:
                continue
            if workload.n_prompt:
                pp.append(t["prompt_per_second"])
                measure_ms += t["prompt_ms"]
            if workload.n_gen:
                if t["predicted_ms"] <= 0:
                    raise _Failed(ERROR, "llama-server reported zero generation time")
                tg.append(workload.n_gen * 1000.0 / t["predicted_ms"])
                measure_ms += t["predicted_ms"]
        return Stats(tuple(pp), workload.n_prompt), Stats(tuple(tg), workload.n_gen), measure_ms / 1000.0

    def _n_vocab(self, url: str, deadline: float) -> int:
        try:
            models = get_json(url + "/v1/models", deadline - time.monotonic())
            return int(models["data"][0]["meta"]["n_vocab"])
        except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
            raise _Failed(ERROR, f"could not read n_vocab from llama-server /v1/models: {exc}") from None

    def _complete(self, url: str, prompt: list[int], n_predict: int, cache_prompt: bool,
                  deadline: float) -> dict[str, Any]:
        body = {"prompt": prompt, "n_predict": n_predict, "cache_prompt": cache_prompt, "ignore_eos": True,
                "temperature": 0.0, "seed": self.seed, "stream": False}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failed(TIMEOUT, "llama-server did not finish the requests within the timeout and was stopped")
        try:
            answer = post_json(url + "/completion", body, remaining)
        except OSError as exc:
            if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
                raise _Failed(TIMEOUT, "llama-server did not finish the requests within the timeout and was "
                                       "stopped") from None
            raise _Failed(ERROR, f"/completion failed: {exc}") from None
        except (RuntimeError, ValueError) as exc:
            raise _Failed(ERROR, f"/completion failed: {exc}") from None
        timings = answer.get("timings")
        if not isinstance(timings, dict):
            raise _Failed(ERROR, "llama-server's /completion answer has no timings")
        return timings

