"""placetune shootout on the RPC rig: every contender measured interleaved, compared with intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from placetune.placement import parse_flags
from placetune.runners.base import Measurement
from placetune.shootout import OUT_OF_THE_BOX, ShootoutConfig, over_budget

CLI = [sys.executable, "-c", "from placetune.cli import main; main()"]
SHORT = ["-p", "16", "-n", "4", "-r", "2", "--warmups", "1", "--rounds", "1"]


def shootout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "shootout", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


def test_shootout_on_the_rpc_rig(tiny_moe: Path, rpc_server: str, tmp_path: Path) -> None:
    proc = shootout(str(tiny_moe), "--rpc", rpc_server, "--runner", "llama-bench", "--budget", "RPC0=64MiB",
                    "--depth", "0,32", "--line", "mine=-ngl 99 --n-cpu-moe 1 --no-repack", "--out", str(tmp_path),
                    *SHORT)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    md = (tmp_path / "shootout.md").read_text()
    for name in (OUT_OF_THE_BOX, "llama-fit-params' answer", "-ngl all --cpu-moe", "best --n-cpu-moe",
                 "best last", "mine"):
        assert name in md, name
    assert "## depth 0" in md and "## depth 32" in md and "RPC0 cannot be held back" in md
    assert "[" in md and ("faster" in md or "slower" in md or "not distinguishable" in md)  # intervals, verdicts
    records = [json.loads(line) for line in (tmp_path / "shootout.jsonl").read_text().splitlines()]
    assert {r["depth"] for r in records} == {0, 32}
    fit = [r for r in records if r["contender"].startswith(OUT_OF_THE_BOX)]
    assert fit and all("-fitt" in r["command"] for r in fit)  # --fit on, with the budget as its margin
    fixed = [r for r in records if r["contender"] == "mine"]
    assert fixed and all("-fitt" not in r["command"] for r in fixed)


def test_shootout_on_cpu_says_placement_barely_matters(tiny_moe: Path, tmp_path: Path) -> None:
    proc = shootout(str(tiny_moe), "--runner", "llama-server", "--line", "one thread=-t 1 --no-repack",
                    "--out", str(tmp_path), *SHORT)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    md = (tmp_path / "shootout.md").read_text()
    assert "placement barely matters" in md and OUT_OF_THE_BOX in md and "one thread" in md


def test_a_budget_that_cannot_be_held_is_checked_against_what_llama_cpp_allocated() -> None:
    config = ShootoutConfig.__new__(ShootoutConfig)
    config.budgets = {"RPC0": 10 * 2**20, "CPU": 2**30}
    m = Measurement("llama-bench", "ok", reported={"model": {"RPC0": 6 * 2**20}, "KV": {"RPC0": 5 * 2**20}})
    assert "11.00 MiB on RPC0, over its 10.00 MiB budget" in over_budget(config, m, held=set())
    assert over_budget(config, m, held={"RPC0"}) == ""
    assert parse_flags("-ngl 99 --n-cpu-moe 1").overrides  # the --line spelling is llama-server's
