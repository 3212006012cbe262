"""Hold back GPU memory so that every contender of a shootout sees the same card: total minus the budget.

A --budget binds placetune's memory model, but not the placements llama.cpp makes itself (--fit). A
helper process therefore allocates the rest of the card with plain device allocations (cudaMalloc,
never managed memory, which the driver could page out) and keeps it until the shootout ends; it dies
with placetune like every other child.

Run as `python -m placetune.holdback BYTES DEVICE`; it prints `held BYTES` once the memory is taken.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from placetune.errors import PlacetuneError
from placetune.runners.process import kill_group, spawn

CHUNK = 1 << 30  # allocate in 1 GiB pieces: one huge allocation can fail where pieces fit


def _cudart() -> ctypes.CDLL:
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcudart not found")


def hold(n_bytes: int, device: int) -> None:
    """Allocate n_bytes on the CUDA device and sleep until stdin closes (the parent is done or gone)."""
    rt = _cudart()
    if rt.cudaSetDevice(ctypes.c_int(device)) != 0:
        raise SystemExit(f"cudaSetDevice({device}) failed")
    pointers = []
    left = n_bytes
    while left > 0:
        size = min(CHUNK, left)
        ptr = ctypes.c_void_p()
        if rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(size)) != 0:
            raise SystemExit(f"cudaMalloc of {size} bytes failed after holding {n_bytes - left}")
        pointers.append(ptr)
        left -= size
    print(f"held {n_bytes}", flush=True)
    sys.stdin.read()


@contextmanager
def held_back(n_bytes: int, device: int) -> Iterator[None]:
    """Keep n_bytes of CUDA device `device` allocated in a helper process for the duration of the block."""
    if n_bytes <= 0:
        yield
        return
    proc = spawn([sys.executable, "-m", "placetune.holdback", str(n_bytes), str(device)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("held"):
            err = proc.stderr.read() if proc.stderr else ""
            raise PlacetuneError(f"could not hold back {n_bytes / 2**30:.1f} GiB on CUDA{device} to enforce the "
                                 f"budget: {(err.strip().splitlines() or ['no answer'])[-1]}")
        yield
    finally:
        kill_group(proc)
        proc.wait()


def main() -> None:
    try:
        hold(int(sys.argv[1]), int(sys.argv[2]))
    except OSError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
