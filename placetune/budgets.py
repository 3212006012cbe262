"""Per-device memory budgets (--budget DEV=SIZE): parsed, checked against the devices this machine has.

A budget binds placetune's memory model. llama-fit-params takes margins (memory to leave free) per
accelerator, so a budget becomes that device's margin; it has no host-memory margin, so a CPU budget
cannot be passed on and placetune checks llama-fit-params' answer against it instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from placetune.errors import PlacetuneError
from placetune.units import parse_size

MIB = 2**20


def parse_budgets(items: Sequence[str], devices: Sequence[str] | None = None) -> dict[str, int]:
    """['CUDA0=20GiB', 'RPC0=64MiB,CPU=1.5G'] -> bytes per device; devices, when given, are the names allowed."""
    out: dict[str, int] = {}
    for item in items:
        for part in item.split(","):
            dev, sep, size = part.partition("=")
            dev = dev.strip()
            if not sep or not dev or not size.strip():
                raise PlacetuneError(f"--budget {part!r} must look like DEVICE=SIZE, e.g. CUDA0=20GiB or CPU=64GiB")
            if devices is not None and dev not in devices:
                raise PlacetuneError(f"--budget {dev}: no such device here; this machine has {', '.join(devices)} "
                                     "(RPC devices need --rpc, CUDA devices a GPU build of llama.cpp)")
            if dev in out:
                raise PlacetuneError(f"--budget {dev} is given twice; give each device one budget")
            out[dev] = parse_size(size)
            if out[dev] <= 0:
                raise PlacetuneError(f"--budget {dev}={size.strip()}: a budget must be larger than zero")
    return out


def fit_margins(devices: Sequence[tuple[str, int]], budgets: Mapping[str, int], default_margin: int) -> list[int]:
    """Per-device -fitt margins in MiB, in llama.cpp's device order: free memory minus the budget."""
    margins = []
    for name, free in devices:
        budget = budgets.get(name)
        margin = free - budget if budget is not None else default_margin
        margins.append(max(0, -(-margin // MIB)))  # rounded up: fit may use no more than the budget
    return margins
