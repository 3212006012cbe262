"""Nothing hangs on an RPC endpoint that accepts TCP and then never answers: one line, in seconds."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from placetune.errors import PlacetuneError
from placetune.hardware import rpc_hello
from placetune.runners.embedded import probe_llama

CLI = [sys.executable, "-c", "from placetune.cli import main; main()"]


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A listening socket nobody reads: the kernel accepts connections, nothing ever answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("command", [
    ["hw"],
    ["bench", "{model}", "-p", "16", "-n", "4", "-r", "1", "--warmups", "0"],
    ["search", "{model}", "--out", "{out}", "--n-trials", "2", "-p", "16", "-n", "4", "-r", "1", "--warmups", "0"],
])
def test_silent_rpc_endpoint_is_one_line_in_seconds(command: list[str], silent_endpoint: str, tiny_moe: Path,
                                                    tmp_path: Path) -> None:
    args = [a.format(model=tiny_moe, out=tmp_path) for a in command]
    started = time.monotonic()
    proc = subprocess.run([*CLI, *args, "--rpc", silent_endpoint], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 15
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and silent_endpoint in lines[0] and "did not answer" in lines[0], proc.stderr


def test_real_rpc_server_passes_the_handshake_and_stays_free(rpc_server: str) -> None:
    rpc_hello(rpc_server)
    rpc_hello(rpc_server)  # ggml-rpc-server serves one client at a time: the first must have let go
    devices, _ = probe_llama([rpc_server])
    assert [d["name"] for d in devices] == ["CPU", "RPC0"]


def test_device_probe_has_its_own_deadline(silent_endpoint: str) -> None:
    started = time.monotonic()
    expected = f"did not answer within 2 s while contacting RPC server {silent_endpoint}"
    with pytest.raises(PlacetuneError, match=re.escape(expected)):
        probe_llama([silent_endpoint], timeout_s=2)
    assert time.monotonic() - started < 10


def test_verify_says_hello_to_the_plans_own_endpoints(silent_endpoint: str, tiny_moe: Path, tmp_path: Path) -> None:
    """A best.json names its RPC servers; verify checks them as --rpc is checked, not through a 20 s probe."""
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"model": {"path": str(tiny_moe)}, "placement": {"n_gpu_layers": 0},
                                "workload": {"n_prompt": 16, "n_gen": 4}, "rpc": [silent_endpoint]}))
    started = time.monotonic()
    proc = subprocess.run([*CLI, "verify", str(best)], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 15
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and silent_endpoint in lines[0] and "did not answer" in lines[0], proc.stderr
