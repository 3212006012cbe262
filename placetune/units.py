"""Byte sizes as people write them (20GiB, 512M) and as placetune prints them."""

from __future__ import annotations

import re

from placetune.errors import PlacetuneError

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.I)
_FACTORS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    value = float(n)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'20GiB', '512M', '1.5G' or a plain byte count -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise PlacetuneError(f"cannot read size {text!r}; write it like 20GiB, 512MiB or 1.5G")
    return int(float(m.group(1)) * _FACTORS[m.group(2).lower()])
