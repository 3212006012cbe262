"""The bandwidth roofline for token generation: what a placement could reach, and how close it gets.

Generating one token reads every active weight once from the device that holds it, so

    seconds per token ≈ Σ over devices (active bytes on that device / that device's bandwidth)

Active bytes: every non-expert tensor, plus routed expert bytes × experts used / expert count.
The bytes come from one function, `Anatomy.reads_per_token` (also `inspect`'s "read per token"):
embedding tables (token_embd and friends) are read one row per token by get_rows, not whole, and a
model with a tied output head reads token_embd in full once more, on the output layer's device.
Without that a model fully on the GPU would appear to spend most of each token reading a 300 MB
embedding table from RAM.

The figure is a ceiling: KV-cache reads at depth, kernel launches and RPC round trips are not in
it. Measured tg is typically 50-70% of it on CPUs and less for small-active MoE models on a GPU,
which is why the measured/predicted efficiency is reported next to it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.table import Table

from placetune.anatomy import Anatomy, Group
from placetune.device_bytes import layer_devices, tensor_buffer
from placetune.errors import PlacetuneError, read_user_text
from placetune.hardware import Gpu, Machine
from placetune.placement import Placement, device_of
from placetune.results import find_best
from placetune.units import human_bytes

LABEL = "PREDICTED"
RAM_PROBE_MIB = 256
RAM_PROBE_PASSES = 5  # best of several: other jobs on the machine only ever make a pass slower
RAM_PROBE_SOURCE = f"measured: {RAM_PROBE_MIB} MiB numpy read, all cores, best of {RAM_PROBE_PASSES}"

T = TypeVar("T")


@dataclass(frozen=True)
class Bandwidth:
    """A device's bandwidth in GB/s (10^9 bytes/s) and where the figure came from."""

    gbs: float
    source: str


@dataclass(frozen=True)
class DeviceTime:
    """One device's part of each generated token."""

    device: str
    read_bytes: float  # bytes read per token on this device
    expert_bytes: float  # the routed-expert part of read_bytes
    bandwidth_gbs: float
    source: str
    seconds: float
    share: float  # of the whole token's time


@dataclass(frozen=True)
class Prediction:
    """Predicted tg for one placement: per-device bytes, seconds and share of each token."""

    devices: tuple[DeviceTime, ...]

    @property
    def seconds_per_token(self) -> float:
        return sum(d.seconds for d in self.devices)

    @property
    def tg(self) -> float:
        """Predicted tokens per second (the roofline ceiling)."""
        s = self.seconds_per_token
        return 1.0 / s if s > 0 else math.inf

    def efficiency(self, measured_tg: float) -> float:
        """measured / predicted: the share of the bandwidth ceiling the placement reaches."""
        return measured_tg / self.tg

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": LABEL,
            "tg": self.tg,
            "seconds_per_token": self.seconds_per_token,
            "devices": [asdict(d) for d in self.devices],
        }


def read_bytes_by_device(anatomy: Anatomy, placement: Placement,
                         devices: Sequence[str] = ()) -> dict[str, tuple[float, float]]:
    """Device -> (bytes read per token, of which routed experts): anatomy.reads_per_token, placed by device."""
    layer_dev = layer_devices(anatomy.facts.n_layers, placement.n_gpu_layers, devices, placement.tensor_split)
    out: dict[str, tuple[float, float]] = {}
    for t, n in anatomy.reads_per_token():
        device = device_of(tensor_buffer(t, placement, layer_dev))
        total, experts = out.get(device, (0.0, 0.0))
        out[device] = (total + n, experts + (n if t.group is Group.EXPERT else 0.0))
    return out


def predict_tg(anatomy: Anatomy, placement: Placement, devices: Sequence[str],
               bandwidths: Mapping[str, float | Bandwidth]) -> Prediction:
    """The roofline tg of a placement. devices: accelerators in llama.cpp's order; bandwidths: GB/s per device."""
    reads = read_bytes_by_device(anatomy, placement, devices)
    return _prediction(reads, bandwidths)


def _prediction(reads: Mapping[str, tuple[float, float]], bandwidths: Mapping[str, float | Bandwidth]) -> Prediction:
    rows = []
    for device, (n, experts) in reads.items():
        bw = bandwidths.get(device)
        if bw is None:
            raise PlacetuneError(
                f"no bandwidth for {device}; give it as --bw {device}=GB/s"
                + (" (or --gpu-bw)" if device.startswith("CUDA") else "")
            )
        gbs, source = (bw.gbs, bw.source) if isinstance(bw, Bandwidth) else (float(bw), "given")
        if gbs <= 0:
            raise PlacetuneError(f"bandwidth of {device} must be positive, got {gbs:g} GB/s")
        rows.append((device, n, experts, gbs, source, n / (gbs * 1e9)))
    total = sum(r[5] for r in rows)
    order = sorted(rows, key=lambda r: (r[0] != "CPU", r[0]))
    return Prediction(tuple(
        DeviceTime(device, n, experts, gbs, source, seconds, seconds / total if total else 0.0)
        for device, n, experts, gbs, source, seconds in order
    ))


@functools.cache
def probe_ram_bandwidth(mib: int = RAM_PROBE_MIB, passes: int = RAM_PROBE_PASSES) -> float:
    """RAM read bandwidth in GB/s: a bitwise-OR reduction over a `mib` MiB buffer, best of `passes`.

    Token generation reads weights and writes almost nothing, so a read is the right kernel. One
    thread per usable core reads its own slice (numpy drops the GIL in the reduction), since a
    single core cannot saturate a server's memory channels. Takes 0.1-0.4 s for 256 MiB, most of
    it first-touching the pages. Cached: one probe per process.
    """
    words = mib * 2**20 // 8
    data = np.empty(words, dtype=np.uint64)
    data.fill(1)  # touch every page; untouched pages would all read the same zero page from cache
    n_threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    slices = np.array_split(data, n_threads)
    best = 0.0
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, slices))
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def resolve_bandwidths(devices: Sequence[str], gpus: Sequence[Gpu] = (), *, ram_gbs: float | None = None,
                       gpu_gbs: float | None = None, overrides: Mapping[str, float] | None = None
                       ) -> dict[str, Bandwidth]:
    """Bandwidth of CPU and each device: user values first, then pynvml (CUDA<i>) and the RAM probe.

    RPC devices get the RAM figure: a ggml-rpc-server keeps its tensors in its host's RAM, and
    here that is taken to be this host (over loopback it is). Give --bw RPC0=GB/s for a remote one.
    """
    overrides = dict(overrides or {})
    out: dict[str, Bandwidth] = {}
    if "CPU" in overrides:
        out["CPU"] = Bandwidth(overrides["CPU"], "user (--bw)")
    elif ram_gbs is not None:
        out["CPU"] = Bandwidth(ram_gbs, "user (--ram-bw)")
    else:
        out["CPU"] = Bandwidth(probe_ram_bandwidth(), RAM_PROBE_SOURCE)
    by_index = {f"CUDA{g.index}": g for g in gpus}
    for device in devices:
        if device in overrides:
            out[device] = Bandwidth(overrides[device], "user (--bw)")
        elif device.startswith("CUDA") and gpu_gbs is not None:
            out[device] = Bandwidth(gpu_gbs, "user (--gpu-bw)")
        elif device in by_index and by_index[device].bandwidth_gbs > 0:
            out[device] = Bandwidth(by_index[device].bandwidth_gbs, "pynvml theoretical peak")
        elif device.startswith("RPC"):
            out[device] = Bandwidth(out["CPU"].gbs, "RAM figure (RPC server on this host)")
    return out


def parse_bandwidths(items: Sequence[str]) -> dict[str, float]:
    """['RPC0=25', 'CUDA1=900'] -> {'RPC0': 25.0, 'CUDA1': 900.0} (GB/s); CPU and RAM both name system RAM."""
    out = {}
    for item in items:
        device, sep, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not sep or not device.strip() or value <= 0:
            raise PlacetuneError(f"--bw {item!r}: write it as DEVICE=GB/s, e.g. --bw RPC0=25 or --bw CPU=80")
        device = device.strip()
        out["CPU" if device.upper() in ("CPU", "RAM") else device] = value
    return out


def devices_for(gpus: Sequence[Gpu], n_rpc: int, extra: Sequence[str] = (), hypothetical_gpu: bool = False
                ) -> list[str]:
    """Accelerators in llama.cpp's order (RPC servers first, then CUDA by index) without launching llama.cpp.

    extra adds devices the user named in --bw; hypothetical_gpu adds CUDA0 when the user gave a
    GPU bandwidth on a machine without one, to ask what a GPU would do.
    """
    names = [f"RPC{i}" for i in range(n_rpc)] + [f"CUDA{g.index}" for g in gpus]
    if hypothetical_gpu and not gpus:
        names.append("CUDA0")
    names += [d for d in extra if d != "CPU" and d not in names]
    return sorted(names, key=lambda n: (not n.startswith("RPC"), not n.startswith("CUDA"), len(n), n))


def load_measured(path: Path) -> tuple[Placement, float, int]:
    """A best.json or `placetune bench --json` document: its placement, measured tg and RPC server count."""
    path = find_best(path)
    if not path.exists():
        raise PlacetuneError(f"{path} not found; give a best.json (or its results folder) or bench --json output")
    try:
        data = json.loads(read_user_text(path, "a best.json or bench --json output"))
        tg = float(data["measurement"]["tg"]["median"])
        placement = Placement.from_dict(data["placement"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise PlacetuneError(f"{path}: not a best.json or bench --json document ({type(exc).__name__} {exc})") from None
    return placement, tg, len(data.get("rpc") or [])


def machine_bandwidths(machine: Machine, devices: Sequence[str], *, ram_gbs: float | None = None,
                       overrides: Mapping[str, float] | None = None) -> dict[str, Bandwidth]:
    """resolve_bandwidths for a probed Machine (its pynvml GPUs), as the search and the report use it."""
    return resolve_bandwidths(devices, machine.gpus, ram_gbs=ram_gbs, overrides=overrides)


def rank_by_prediction(anatomy: Anatomy, candidates: Sequence[tuple[T, Placement]], devices: Sequence[str],
                       bandwidths: Mapping[str, float | Bandwidth]) -> list[tuple[T, Prediction]]:
    """Candidates (key, placement) ordered by predicted tg, fastest first; ties keep their given order."""
    scored = [(key, predict_tg(anatomy, placement, devices, bandwidths)) for key, placement in candidates]
    return sorted(scored, key=lambda kp: -kp[1].tg)


def prediction_record(anatomy: Anatomy, placement: Placement, devices: Sequence[str],
                      bandwidths: Mapping[str, Bandwidth], measured_tg: float | None = None) -> dict[str, Any]:
    """The `predicted` block of best.json: the prediction, the bandwidths used and, if measured, the efficiency."""
    p = predict_tg(anatomy, placement, devices, bandwidths)
    record = p.to_dict()
    record["bandwidths"] = {k: asdict(v) for k, v in bandwidths.items()}
    if measured_tg:
        record["measured_tg"] = measured_tg
        record["efficiency"] = p.efficiency(measured_tg)
    return record


# ---------------------------------------------------------------------------------------------
# What-if: hardware the user does not have, no GGUF needed


def what_if(active_params: float, common_fraction: float, bits_per_weight: float, gpu_bw: float | None,
            ram_bw: float, experts_on_gpu_fraction: float = 0.0, second_gpu_bw: float | None = None,
            experts_on_second_gpu_fraction: float = 0.0) -> Prediction:
    """Roofline tg of a hypothetical machine: the common part on the GPU (CUDA0), experts split CUDA0/CUDA1/RAM.

    common_fraction is the non-expert share of the active parameters; the expert fractions are
    shares of the routed-expert bytes (routing is taken as uniform, so every expert is read equally).
    Without a GPU (gpu_bw None) everything is read from RAM.
    """
    if active_params <= 0 or bits_per_weight <= 0:
        raise PlacetuneError("--active-params and --bits must be positive")
    for name, value in (("--common-fraction", common_fraction), ("--experts-on-gpu", experts_on_gpu_fraction),
                        ("second GPU expert share", experts_on_second_gpu_fraction)):
        if not 0.0 <= value <= 1.0:
            raise PlacetuneError(f"{name} must be between 0 and 1, got {value:g}")
    if experts_on_gpu_fraction + experts_on_second_gpu_fraction > 1.0 + 1e-9:
        raise PlacetuneError("expert shares on the GPUs add up to more than 1")
    if gpu_bw is None and (experts_on_gpu_fraction or experts_on_second_gpu_fraction):
        raise PlacetuneError("experts on a GPU need --gpu-bw")
    if second_gpu_bw is None and experts_on_second_gpu_fraction:
        raise PlacetuneError("experts on a second GPU need --second-gpu-bw")
    active = active_params * bits_per_weight / 8
    common, experts = active * common_fraction, active * (1 - common_fraction)
    on_gpu1 = experts * experts_on_second_gpu_fraction
    on_gpu0 = experts * experts_on_gpu_fraction
    in_ram = experts - on_gpu0 - on_gpu1
    reads: dict[str, tuple[float, float]] = {"CPU": (in_ram, in_ram)}
    bandwidths: dict[str, Bandwidth] = {"CPU": Bandwidth(ram_bw, "what-if")}
    if gpu_bw is None:
        reads["CPU"] = (in_ram + common, in_ram)
    else:
        reads["CUDA0"] = (common + on_gpu0, on_gpu0)
        bandwidths["CUDA0"] = Bandwidth(gpu_bw, "what-if")
    if second_gpu_bw is not None:
        reads["CUDA1"] = (on_gpu1, on_gpu1)
        bandwidths["CUDA1"] = Bandwidth(second_gpu_bw, "what-if")
    return _prediction(reads, bandwidths)


def second_gpu_table(active_params: float, common_fraction: float, bits_per_weight: float, gpu_bw: float,
                     ram_bw: float, experts_on_gpu_fraction: float, second_gpu_bw: float,
                     steps: int = 4) -> list[tuple[float, Prediction]]:
    """How much a second GPU helps: the experts left in RAM moved to it in `steps` equal parts.

    Returns (share of all expert bytes on the second GPU, prediction), starting from none.
    """
    left = 1.0 - experts_on_gpu_fraction
    return [
        (left * i / steps, what_if(active_params, common_fraction, bits_per_weight, gpu_bw, ram_bw,
                                   experts_on_gpu_fraction, second_gpu_bw, left * i / steps))
        for i in range(steps + 1)
    ]


# ---------------------------------------------------------------------------------------------
# Terminal views


def prediction_table(p: Prediction, title: str, measured_tg: float | None = None) -> Table:
    """Per-device split of each token's time, labelled PREDICTED, with the efficiency when measured."""
    caption = f"{LABEL} tg {p.tg:,.1f} t/s ({p.seconds_per_token * 1e3:.4g} ms per token)"
    if measured_tg:
        caption += f"; measured {measured_tg:,.1f} t/s = {p.efficiency(measured_tg):.0%} of the prediction"
    table = Table(title=f"{title}: {LABEL}", caption=caption)
    for name in ("device", "read per token", "of which experts", "GB/s", "ms per token", "share of token"):
        table.add_column(name, justify="left" if name == "device" else "right")
    table.add_column("bandwidth from")
    for d in p.devices:
        table.add_row(d.device, human_bytes(d.read_bytes), human_bytes(d.expert_bytes), f"{d.bandwidth_gbs:,.1f}",
                      f"{d.seconds * 1e3:.4g}", f"{d.share:.1%}", d.source)
    return table


def second_gpu_view(rows: list[tuple[float, Prediction]]) -> Table:
    """The second-GPU table: expert split, predicted tg, and the gain over one GPU."""
    base = rows[0][1].tg
    table = Table(title=f"how much a second GPU helps ({LABEL})")
    for name in ("experts on GPU 2", "experts in RAM", "tg t/s", "vs one GPU", "RAM share of token"):
        table.add_column(name, justify="right")
    for share, p in rows:
        ram = next((d for d in p.devices if d.device == "CPU"), None)
        experts_total = sum(d.expert_bytes for d in p.devices)
        in_ram = ram.expert_bytes / experts_total if ram and experts_total else 0.0
        table.add_row(f"{share:.0%}", f"{in_ram:.0%}", f"{p.tg:,.1f}", f"{p.tg / base:.2f}x",
                      f"{ram.share if ram else 0.0:.0%}")
    return table
