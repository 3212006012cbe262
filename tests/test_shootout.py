"""placetune shootout on the RPC rig: every contender measured interleaved, compared with intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from placetune.hardware import LlamaDevice, Machine
from placetune.placement import parse_flags
from placetune.runners.base import Measurement
from placetune.shootout import JOURNAL, OUT_OF_THE_BOX, ShootoutConfig, fit_params_margins, over_budget

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
    proc = shootout(str(tiny_moe), "--runner", "llama-server", "--line", "one thread\n# | x=-t 1 --no-repack",
                    "--out", str(tmp_path), *SHORT)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    md = (tmp_path / "shootout.md").read_text()
    assert "placement barely matters" in md and OUT_OF_THE_BOX in md
    assert "| one thread\\n# \\| x |" in md  # an outside name stays inside its table cell


def test_a_stopped_shootout_resumes_from_its_journal(tiny_moe: Path, tmp_path: Path) -> None:
    args = [str(tiny_moe), "--runner", "llama-bench", "--line", "one thread=-t 1 --no-repack", "--out", str(tmp_path),
            *SHORT]
    assert shootout(*args).returncode == 0
    journal = tmp_path / JOURNAL
    lines = journal.read_text().splitlines()
    assert len(lines) == 3  # what was measured, then out of the box and the line, one round each
    journal.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])  # stopped while writing the last
    proc = shootout(*args, "--resume")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "resumed: 1 measurement(s)" in proc.stdout and proc.stdout.count("(journal)") == 1
    assert len(journal.read_text().splitlines()) == 3
    summary = json.loads((tmp_path / "shootout.json").read_text())
    assert [d["depth"] for d in summary["depths"]] == [0] and len(summary["depths"][0]["rows"]) == 2
    refused = shootout(*[a if a != "16" else "8" for a in args], "--resume")
    assert refused.returncode == 2 and "measured with another workload" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_llama_fit_params_sees_a_held_back_card_as_llama_cpp_would() -> None:
    machine = Machine("m", "cpu", 2, 2, 2**34, 2**34, llama_devices=[
        LlamaDevice("CUDA0", "gpu", "CUDA0", 80 * 2**30, 80 * 2**30),
        LlamaDevice("RPC0", "rpc", "RPC0", 1024 * 2**20, 1024 * 2**20),
        LlamaDevice("RPC1", "rpc", "RPC1", 2048 * 2**20, 2048 * 2**20)])
    budgets = {"CUDA0": 12 * 2**30, "RPC0": 64 * 2**20, "RPC1": 1024 * 2**20}
    # RPC devices come first in llama.cpp's order; the held-back card is already 12 GiB: llama.cpp's own margin.
    # Every budget that cannot be held back becomes that device's own margin.
    assert fit_params_margins(machine, budgets, held={"CUDA0"}) == [960, 1024, 1024]
    assert fit_params_margins(machine, budgets, held=set()) == [960, 1024, 68 * 1024]
    # A device without a budget is as the user has it: llama.cpp's own margin, as out of the box.
    assert fit_params_margins(machine, {"RPC0": 64 * 2**20}, held=set()) == [960, 1024, 1024]


def test_a_budget_that_cannot_be_held_is_checked_against_what_llama_cpp_allocated() -> None:
    config = ShootoutConfig.__new__(ShootoutConfig)
    config.budgets = {"RPC0": 10 * 2**20, "CPU": 2**30}
    m = Measurement("llama-bench", "ok", reported={"model": {"RPC0": 6 * 2**20}, "KV": {"RPC0": 5 * 2**20}})
    assert "11.00 MiB on RPC0, over its 10.00 MiB budget" in over_budget(config, m, held=set())
    assert over_budget(config, m, held={"RPC0"}) == ""
    assert parse_flags("-ngl 99 --n-cpu-moe 1").overrides  # the --line spelling is llama-server's


def test_a_contender_over_its_budget_shows_no_speed(tiny_moe: Path, rpc_server: str, tmp_path: Path) -> None:
    """On a device that cannot be held back, a line the memory model says cannot fit is never run, and one that
    allocated more than the budget is reported as not fitting: its speeds are not results at any depth."""
    proc = shootout(str(tiny_moe), "--rpc", rpc_server, "--runner", "llama-bench", "--budget", "RPC0=1MiB",
                    "--depth", "0,32", "--line", "all on RPC0=-ngl 99 --no-repack", "--out", str(tmp_path), *SHORT)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "shootout.json").read_text())
    for depth in summary["depths"]:
        rows = {r["name"]: r for r in depth["rows"]}
        line = rows["all on RPC0"]
        assert line["status"] == "does not fit" and "predicted not to fit" in line["reason"]
        for row in rows.values():
            if row["status"] != "ok":
                assert row["pp"] is None and row["intervals"] == {} and row["vs_reference"] is None
    records = [json.loads(x) for x in (tmp_path / "shootout.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["contender"] == "all on RPC0"]  # never launched
    md = (tmp_path / "shootout.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| all on RPC0 |"))
    assert "| does not fit |" in row


def test_a_shootout_can_run_placetune_search_first(tiny_moe: Path, tmp_path: Path) -> None:
    """--search-minutes: placetune's winner comes from a search on the shootout's own memory and context."""
    proc = shootout(str(tiny_moe), "--runner", "llama-bench", "--search-minutes", "0.1", "--set", "repack=false",
                    "--out", str(tmp_path), *SHORT)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "shootout.json").read_text())
    rows = summary["depths"][0]["rows"]
    winner = next(r for r in rows if r["source"] == "placetune")
    assert winner["status"] == "ok" and winner["intervals"]["pp"]["n"] == 2
    assert (tmp_path / "search.db").is_file()  # the search's study, beside the shootout's journal


def test_holding_back_a_card_that_is_not_there_is_one_line() -> None:
    """On a machine without CUDA the helper cannot allocate: one line saying so, and no helper left behind."""
    import psutil

    from placetune.errors import PlacetuneError
    from placetune.holdback import held_back

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with (pytest.raises(PlacetuneError, match=r"could not hold back 1\.0 GiB on CUDA0 to enforce the budget"),
          held_back(2**30, 0)):
        raise AssertionError("held back memory on a machine without CUDA")
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
