"""The GPU kit's CPU dry run, so that the kit cannot rot between the rare GPU runs: pack (and its size), install
into a fresh venv without llama-cpp-python, then every step on a tiny model with ggml-rpc-server standing in for
CUDA0; then a second call on a bare machine that resumes from what the first one brought back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "scripts" / "gpu-kit.sh"


def kit(*args: str, work: Path, pack: Path, rpc: str) -> subprocess.CompletedProcess[str]:
    """The kit as a device call runs it; one RPC server for both calls, so that the machine's fingerprint (which
    names the RPC endpoint) stays the same, as a GPU's does."""
    env = {**os.environ, "GPUKIT_WORK": str(work), "GPUKIT_PACK": str(pack), "GPUKIT_PYTHON": sys.executable,
           "GPUKIT_RPC": rpc, "COLUMNS": "200"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(KIT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_gpu_kit_dry_run_then_a_bare_machine_resumes(tmp_path: Path, rpc_server: str) -> None:
    pack, work, out = tmp_path / "pack", tmp_path / "work", tmp_path / "work" / "out"
    first = kit("--dry-run", "all", work=work, pack=pack, rpc=rpc_server)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    assert "finished: pack build model run-search run-shootout report" in log

    manifest = json.loads((pack / "pack.json").read_text())
    assert manifest["total_bytes"] <= manifest["limit_bytes"] == 64 * 2**20
    assert "total, as one call carries it" in log and manifest["parts"]["llama.cpp sources"] > 2**20
    wheels = set(manifest["wheels"])
    assert any(w.startswith("placetune-") for w in wheels) and not any("llama_cpp" in w for w in wheels)
    assert {"optuna", "gguf", "pydantic", "sqlalchemy"} <= {w.split("-")[0].lower() for w in wheels}

    # placetune ran from the pack's wheels in a venv that has only the GPU image's packages: no llama-cpp-python
    where = "import importlib.util as u, placetune; print(placetune.__file__, u.find_spec('llama_cpp'))"
    probe = subprocess.run([str(work / "venv" / "bin" / "python"), "-P", "-c", where], capture_output=True, text=True,
                           env={"PYTHONPATH": str(work / "site")}, check=True)
    assert probe.stdout.startswith(str(work / "site")) and probe.stdout.strip().endswith("None")
    assert "nvcc skipped" in log

    doc = (out / "docs" / "benchmarks" / "dry-run.md").read_text()
    for part in ("not a GPU result", "## What ran", "$ placetune search", "$ placetune shootout", "### depth 0",
                 "### depth 32", "llama.cpp out of the box", "placetune's winner (best.json)", "## Verdict"):
        assert part in doc, part
    raw = [json.loads(line) for line in (out / "docs" / "benchmarks" / "dry-run.jsonl").read_text().splitlines()]
    assert {r["depth"] for r in raw} == {0, 32} and all(r["pp_samples"] or r["status"] != "ok" for r in raw)

    # The machine goes back while the shootout is half done; a bare one gets what the call brought back
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copytree(out, saved, dirs_exist_ok=True)
    shutil.rmtree(work)
    state = tmp_path / "state"
    with tarfile.open(saved / "gpukit-state.tar.gz") as tar:
        tar.extractall(state, filter="data")
    (state / "runs" / "shootout" / "DONE").unlink()
    journal = state / "runs" / "shootout" / "shootout.journal.jsonl"
    journal.write_text("\n".join(journal.read_text().splitlines()[:3]) + "\n")
    with tarfile.open(pack / "gpukit-state.tar.gz", "w:gz") as tar:
        tar.add(state / "runs", "runs")
    for part in saved.glob("gpukit-build.tar.xz.part*"):
        shutil.copy2(part, pack / part.name)
    second = kit("--dry-run", "run-all", str(tmp_path / "out2"), work=work, pack=pack, rpc=rpc_server)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert "unpacked the build an earlier call brought back" in log and "restored the earlier calls' state" in log
    assert "run-search: done in an earlier call" in log and "resumed: 2 measurement(s)" in log
    assert "finished: build model run-search run-shootout report" in log
    assert (tmp_path / "out2" / "docs" / "benchmarks" / "dry-run.md").is_file()


def test_the_kit_document_keeps_outside_strings_on_their_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reason llama.cpp printed, a flag or the search's note cannot start a markdown line of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpukit", ROOT / "scripts" / "gpukit.py")
    assert spec and spec.loader
    gpukit = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpukit", gpukit)  # its dataclasses look their module up there
    spec.loader.exec_module(gpukit)
    hostile = "oom\n# injected heading\n| a | b |"
    summary = {"depths": [{"depth": 0, "rows": [
        {"source": "placetune", "name": "placetune's winner", "status": "crash", "reason": hostile, "pp": None,
         "flags": hostile},
        {"source": "llama.cpp", "name": "llama.cpp out of the box (--fit on)", "status": "ok", "reason": "",
         "pp": {"median": 1.0}},
    ]}]}
    lines = gpukit.verdict(summary, hostile)
    assert not any(line.startswith(("# injected", "| a")) for text in lines for line in text.split("\n"))
    assert any("oom\\n# injected heading" in line for line in lines)
