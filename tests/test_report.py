"""`placetune report` on a real (tiny, fast) search: the page holds its plots, the PNGs exist, Chromium renders it."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from placetune.anatomy import read_anatomy
from placetune.cli import app
from placetune.errors import PlacetuneError
from placetune.placement import Placement
from placetune.predict import Bandwidth, prediction_record
from placetune.report import expert_layers_section, load_history, pareto_front, write_report

PLOTS = ("history", "pareto", "importances", "expert_layers", "predicted")


@pytest.fixture(scope="module")
def results(tiny_moe: Path, rpc_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real moe-space search (RPC0 as the accelerator), every trial fully measured so importances exist."""
    out = tmp_path_factory.mktemp("search")
    proc = subprocess.run(
        [sys.executable, "-c", "from placetune.cli import main; main()", "search", str(tiny_moe),
         "--rpc", rpc_server, "--out", str(out), "--n-trials", "8", "-p", "16", "-n", "4", "-r", "2",
         "--warmups", "1", "--top-k", "2", "--no-screen", "--set", "repack=false", "--set", "threads=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return next(out.glob("*/*/best.json")).parent


@pytest.fixture(scope="module")
def report(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = write_report(results, tmp_path_factory.mktemp("report"), ram_gbs=20.0)
    return files.html


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)]


def test_html_holds_every_plot_and_nothing_external(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    pngs = images(page)
    assert len(pngs) == len(PLOTS)
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    for name in PLOTS:
        assert f'id="{name}"' in page
        file = report.parent / f"{name}.png"
        assert file.read_bytes().startswith(b"\x89PNG") and file.stat().st_size > 5000
    assert "<script" not in page and not re.search(r'(src|href)="https?:', page)


def test_summary_compares_best_with_each_baseline(results: Path, report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    best = json.loads((results / "best.json").read_text())
    assert "(winner)" in page and "winner/this" in page
    for row in best["rows"]:  # table cells: markup escaped, quotes as they are (pandas' to_html)
        assert html.escape(row["name"], quote=False) in page
    assert "predicted tg" in page and "efficiency" in page and html.escape(best["notes"][0]) in page
    assert "CPU 20.0 GB/s (user (--ram-bw))" in page


def test_storage_file_and_csv_fallback(results: Path, tmp_path: Path) -> None:
    db = results.parents[1] / "placetune.db"
    files = write_report(db, tmp_path / "from-db", ram_gbs=20.0)
    page = files.html.read_text()
    assert len(images(page)) == len(PLOTS) and "no final round" in page and "everything on the accelerator" in page
    # A results folder copied without its database still reports, from trials.csv.
    moved = tmp_path / "copied"
    shutil.copytree(results, moved, ignore=shutil.ignore_patterns("report"))
    best = json.loads((moved / "best.json").read_text())
    best["study"]["storage"] = f"sqlite:///{tmp_path / 'gone.db'}"
    (moved / "best.json").write_text(json.dumps(best))
    files = write_report(moved, ram_gbs=20.0)
    page = files.html.read_text()
    assert files.html.parent == moved / "report"
    assert "trials read from trials.csv" in page and not (tmp_path / "gone.db").exists()
    assert "the trials carry no placement" in page  # so no prediction; the other plots are drawn
    assert len(images(page)) == len(PLOTS) - 1


def test_bandwidths_recorded_in_best_json_are_used(results: Path, tmp_path: Path) -> None:
    copied = tmp_path / "with-prediction"
    shutil.copytree(results, copied, ignore=shutil.ignore_patterns("report"))
    best = json.loads((copied / "best.json").read_text())
    anatomy = read_anatomy(best["model"]["path"])
    bandwidths = {"CPU": Bandwidth(7.0, "probe at search time"), "RPC0": Bandwidth(70.0, "user (--bw)")}
    best["predicted"] = prediction_record(anatomy, Placement.from_dict(best["placement"]), ["RPC0"], bandwidths,
                                          measured_tg=best["measurement"]["tg"]["median"])
    (copied / "best.json").write_text(json.dumps(best))
    page = write_report(copied).html.read_text()
    assert "bandwidths as recorded in best.json" in page
    assert "CPU 7.0 GB/s (probe at search time), RPC0 70.0 GB/s (user (--bw))" in page


def test_regress_history_plot_and_tolerance(results: Path, tmp_path: Path) -> None:
    history = tmp_path / "history.db"
    with sqlite3.connect(history) as con:
        con.execute("CREATE TABLE regress_measurements (time TEXT, case_name TEXT, metric TEXT, build TEXT,"
                    " median REAL, spread REAL)")
        rows = [(f"2026-01-0{day} 03:00:00", case, metric, "b7000" if day < 3 else "b7100",
                 value * scale * (1 + day / 50), 0.02)
                for day in range(1, 5) for case, scale in (("tiny-moe", 1.0), ("tiny-dense", 1.5))
                for metric, value in (("pp", 900.0), ("tg", 120.0))]
        con.executemany("INSERT INTO regress_measurements VALUES (?, ?, ?, ?, ?, ?)", rows)
    frame, note = load_history(history)
    assert frame is not None and len(frame) == 16 and "regress_measurements" in note
    with pytest.raises(PlacetuneError, match="--history"):  # and optuna has not written its tables into it
        write_report(history)
    files = write_report(results, tmp_path / "r", history=history, ram_gbs=20.0)
    assert (tmp_path / "r" / "regress.png").stat().st_size > 5000
    assert len(images(files.html.read_text())) == len(PLOTS) + 1

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    frame, note = load_history(empty)
    assert frame is None and "expected columns" in note
    page = write_report(results, tmp_path / "e", history=empty, ram_gbs=20.0).html.read_text()
    assert "case_name" in page and "regress_measurements" in page  # the expected schema is stated
    frame, note = load_history(tmp_path / "missing.db")
    assert frame is None and "not found" in note


def test_sections_without_data_say_why() -> None:
    trials = pd.DataFrame({"trial": [0, 1], "state": ["COMPLETE"] * 2, "pp": [1.0, 2.0], "tg": [2.0, 1.0]})
    section = expert_layers_section(trials)
    assert section.png is None and "no cpu_moe_layers parameter" in section.notes[0]
    frame = pd.DataFrame({"pp": [1.0, 2.0, 1.0, 3.0], "tg": [3.0, 2.0, 1.0, 0.5]})
    assert pareto_front(frame).tolist() == [True, True, False, True]


def test_cli_report(results: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(results), "--out", str(tmp_path), "--ram-bw", "20"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").exists() and "report.html" in result.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "not found" in str(missing.exception)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here when missing (make test does it first), skipped only without apt."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and apt-get cannot install it here (not Debian, or not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=1200, env=env)
    return shutil.which("chromium") or pytest.fail("apt-get installed chromium but it is not on PATH")


def test_page_renders_in_headless_chromium(report: Path, chromium: str, tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,2400", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
         report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert shot.exists() and shot.stat().st_size > 20000, log[-3000:]
    assert "Uncaught" not in log and not re.search(r"CONSOLE\(\d+\)", log), log[-3000:]
    assert "Failed to load resource" not in log and "ERR_" not in log, log[-3000:]
    pixels = matplotlib.image.imread(shot)[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 200  # text, table and plots, not a blank page
