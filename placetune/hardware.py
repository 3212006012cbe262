"""The machine: CPU, RAM, NVIDIA GPUs (pynvml) and the devices llama.cpp itself sees.

Every result carries this as its fingerprint, so numbers from different hardware or llama.cpp
builds are never compared silently. The fingerprint leaves out the hostname and free memory:
identical nodes of a fleet share one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from placetune.errors import PlacetuneError


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as the driver reports it; bandwidth is the theoretical peak."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    driver: str
    bus_width_bits: int
    mem_clock_mhz: int

    @property
    def bandwidth_gbs(self) -> float:
        """Bus width x memory clock x 2 (double data rate), in GB/s."""
        return self.bus_width_bits / 8 * self.mem_clock_mhz * 1e6 * 2 / 1e9


@dataclass(frozen=True)
class LlamaDevice:
    """A device as llama.cpp's ggml backend registry lists it (CPU, CUDA0, RPC0, ...)."""

    name: str
    description: str
    buffer_type: str
    free_bytes: int
    total_bytes: int

    @property
    def is_accelerator(self) -> bool:
        return not self.name.upper().startswith("CPU")


@dataclass
class Machine:
    """What this machine is, for feasibility checks and as the fingerprint of every result."""

    hostname: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: list[Gpu] = field(default_factory=list)
    llama_devices: list[LlamaDevice] = field(default_factory=list)
    llama_build: dict[str, Any] = field(default_factory=dict)

    @property
    def accelerators(self) -> list[LlamaDevice]:
        """The accelerators in the order llama.cpp fills them: RPC servers first (it puts them at the front of a
        model's device list), then the local ones as listed."""
        return sorted((d for d in self.llama_devices if d.is_accelerator), key=lambda d: not d.name.startswith("RPC"))

    @property
    def override_targets(self) -> list[str]:
        """What an -ot rule may name here: each device's name and its buffer type name."""
        return [name for d in self.llama_devices for name in (d.name, d.buffer_type)]

    def _hardware(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu_model,
            "cores": [self.physical_cores, self.logical_cores],
            "ram_gib": round(self.ram_total_bytes / 2**30),
            "gpus": [(g.name, round(g.total_bytes / 2**30)) for g in self.gpus],
            "devices": [(d.name, d.description) for d in self.llama_devices],
        }

    def fingerprint(self) -> str:
        """Short stable hash of the hardware and the llama.cpp build (no hostname, no free memory)."""
        llama = self.llama_build.get("id") or {k: v for k, v in self.llama_build.items() if k != "system_info"}
        return _digest({**self._hardware(), "llama": llama})

    def hardware_fingerprint(self) -> str:
        """The hardware alone: each runner runs its own build, so one machine has a fingerprint per runner, and
        comparing runners (verify) asks only whether the hardware is the same."""
        return _digest(self._hardware())

    def short_name(self) -> str:
        """A folder-friendly name: CPU (or first GPU) plus the fingerprint."""
        base = self.gpus[0].name if self.gpus else self.cpu_model
        slug = "".join(c if c.isalnum() else "-" for c in base).strip("-").lower()
        while "--" in slug:
            slug = slug.replace("--", "-")
        return f"{slug[:40]}-{self.fingerprint()}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint()
        d["hardware_fingerprint"] = self.hardware_fingerprint()
        for g, gd in zip(self.gpus, d["gpus"], strict=True):
            gd["bandwidth_gbs"] = g.bandwidth_gbs
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Machine:
        d = {k: v for k, v in d.items() if k not in ("fingerprint", "hardware_fingerprint")}
        d["gpus"] = [Gpu(**{k: v for k, v in g.items() if k != "bandwidth_gbs"}) for g in d.get("gpus", [])]
        d["llama_devices"] = [LlamaDevice(**x) for x in d.get("llama_devices", [])]
        return cls(**d)


def _digest(stable: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:12]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_gpus() -> list[Gpu]:
    """NVIDIA GPUs through pynvml; no driver or no library simply means no GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # pynvml raises NVMLError subclasses or OSError when no driver is installed
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                Gpu(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(h)),
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    driver=_text(driver),
                    bus_width_bits=int(pynvml.nvmlDeviceGetMemoryBusWidth(h)),
                    mem_clock_mhz=int(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def probe_machine(rpc: Sequence[str] = (), runner: str = "embedded", bin_dir: str | Path | None = None) -> Machine:
    """Probe everything; llama.cpp's devices and build come from what the runner will run.

    The embedded runner asks llama-cpp-python in a child process; llama-bench and llama-server are asked
    themselves (`--list-devices`), so a machine with only its own llama.cpp build needs no llama-cpp-python.
    """
    mem = psutil.virtual_memory()
    if runner == "embedded":
        from placetune.runners.embedded import probe_llama

        devices, build = probe_llama(rpc)
    else:
        from placetune.runners.binaries import binary_build, find_binary, list_devices

        binary = find_binary(runner, bin_dir)
        build = binary_build(binary)
        cpu = {"name": "CPU", "description": cpu_model(), "buffer_type": "CPU",
               "free_bytes": int(mem.available), "total_bytes": int(mem.total)}
        devices = [cpu, *list_devices(binary, rpc)]
    return Machine(
        hostname=socket.gethostname(),
        cpu_model=cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or 1,
        logical_cores=psutil.cpu_count(logical=True) or 1,
        ram_total_bytes=int(mem.total),
        ram_available_bytes=int(mem.available),
        gpus=probe_gpus(),
        llama_devices=[LlamaDevice(**d) for d in devices],
        llama_build=build,
    )


# ggml RPC's HELLO (ggml/src/ggml-rpc/ggml-rpc.cpp): command byte 14, a little-endian uint64 size, then
# rpc_msg_hello_req, RPC_CONN_CAPS_SIZE = 24 bytes of transport capabilities (zeros: plain TCP) in protocol 7.
_RPC_HELLO = struct.pack("<BQ", 14, 24) + bytes(24)
# The answer: uint64 size, then rpc_msg_hello_rsp (major, minor, patch, padding, 24 bytes of capabilities).
_RPC_HELLO_ANSWER = 8 + 4 + 24


def rpc_endpoints(text: str | None, timeout_s: float = 3.0) -> list[str]:
    """Parse --rpc HOST:PORT[,HOST:PORT] and check each answers, so a dead endpoint is one line, not a hang."""
    if not text:
        return []
    endpoints = [e.strip() for e in text.split(",") if e.strip()]
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise PlacetuneError(f"--rpc {endpoint!r}: write it as HOST:PORT with a port of 1 to 65535, e.g. "
                                 "127.0.0.1:50052")
        rpc_hello(endpoint, timeout_s)
    return endpoints


def rpc_hello(endpoint: str, timeout_s: float = 3.0) -> None:
    """Say ggml RPC's HELLO to HOST:PORT and wait for any answer; PlacetuneError when none comes in time.

    Accepting a connection proves little: llama.cpp's RPC client then waits forever for a silent peer.
    Any answer, or the peer closing the connection (a server of another protocol version does), counts
    as alive: llama.cpp itself reports what it then finds wrong. A ggml-rpc-server serves one client
    at a time, so one busy with another client is silent too. The response is read to its end before
    closing, so the server goes back to accepting the next client.
    """
    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PlacetuneError(
            f"RPC server {endpoint} is unreachable ({reason}); start it there with "
            f"`ggml-rpc-server -H {host} -p {port}` or fix --rpc"
        ) from None
    answer = b""
    with sock:
        try:
            sock.sendall(_RPC_HELLO)
            while len(answer) < _RPC_HELLO_ANSWER:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            if answer:
                return
            raise PlacetuneError(
                f"RPC server {endpoint} accepted the connection but did not answer ggml RPC's handshake within "
                f"{timeout_s:g} s: it is not a ggml-rpc-server, or it is busy with another client (a "
                "ggml-rpc-server serves one at a time); stop that client or fix --rpc"
            ) from None
        except OSError:
            return  # reset by the peer: it answered, if only by hanging up
