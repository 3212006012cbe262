"""placetune as a user installs it: a wheel in a fresh virtual environment, run from another directory,
with only the llama.cpp binaries (no llama-cpp-python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from placetune.runners.binaries import package_bin_dir

ROOT = Path(__file__).resolve().parent.parent
# Everything placetune needs comes from the test's own environment, except what a venv should not see.
HIDDEN = ("placetune", "__editable__", "llama_cpp-", "llama_cpp_python")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(ROOT)], check=True, timeout=300, capture_output=True)
    return next(out.glob("placetune-*.whl"))


def venv_without_llama_cpp_python(root: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed and placetune's dependencies linked in, llama-cpp-python left out."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    deps = root / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        hidden = entry.name == "llama_cpp" or entry.name.startswith(HIDDEN)
        if not hidden and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "placetune-test-deps.pth").write_text(f"{deps}\n")
    return root


def test_wheel_ships_the_search_spaces(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {"placetune/search_spaces/moe.toml", "placetune/search_spaces/cpu.toml"} <= set(names)


def test_search_with_only_the_binaries_from_another_directory(wheel: Path, tmp_path: Path,
                                                             make_model: Callable[..., Path]) -> None:
    venv = venv_without_llama_cpp_python(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import placetune, importlib.util; print(placetune.__file__, "
                            "importlib.util.find_spec('llama_cpp'))"], capture_output=True, text=True, cwd=elsewhere,
                           env=env, check=True)
    assert str(venv) in probe.stdout and probe.stdout.strip().endswith("None")  # the wheel, and no embedded runner
    model = make_model("qwen3moe")
    bin_dir = package_bin_dir()  # the user's own build, as far as placetune can tell
    done = subprocess.run(
        [str(venv / "bin" / "placetune"), "search", str(model), "--runner", "llama-bench", "--llama-bin-dir",
         str(bin_dir), "--out", "results", "--n-trials", "3", "-p", "16", "-n", "4", "-r", "2", "--warmups", "1",
         "--top-k", "1", "--set", "repack=false"],
        capture_output=True, text=True, cwd=elsewhere, env={**env, "COLUMNS": "200"}, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "space cpu" in done.stdout  # the built-in space, read from the installed package
    best = json.loads(next((elsewhere / "results").glob("*/*/best.json")).read_text())
    assert best["runner"] == "llama-bench" and best["llama_build"]["binary"].startswith(str(bin_dir))
    assert best["machine"]["llama_build"]["id"] == best["llama_build"]["id"]
