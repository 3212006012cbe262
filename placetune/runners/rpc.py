"""ggml-rpc-server on loopback: a real second device, so a CPU-only machine can test placement for real."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from placetune.errors import PlacetuneError
from placetune.runners.binaries import find_binary
from placetune.runners.llama_server import free_port
from placetune.runners.process import spawn


@contextmanager
def rpc_server(cpu: int | None = None, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Start ggml-rpc-server on a free 127.0.0.1 port (optionally pinned to one CPU), yield HOST:PORT, stop it."""
    port = free_port()
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = spawn([str(find_binary("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port)], preexec=pin,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise PlacetuneError(f"ggml-rpc-server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
