"""Result files: trials.csv (every trial), best.json (the machine-readable plan), best.sh (a server line).

best.json is self-describing, like a pyperf result: placement, flags, measurements with spread,
the machine fingerprint, the llama.cpp build and the model's size and header hash, so that
export, verify and regress can work from it alone.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from placetune import __version__
from placetune.errors import PlacetuneError
from placetune.placement import Placement


def results_dir(root: Path, model_name: str, machine_name: str) -> Path:
    return root / _slug(model_name) / machine_name


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "model"


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial: number, state, seed name, parameters, reason, pp, tg and their spreads, flags."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "seed": ua.get("seed_name", ""),
            "status": ua.get("status", ""),
            "reason": ua.get("reason", ""),
            "pp": ua.get("pp"),
            "pp_spread": ua.get("pp_spread"),
            "tg": ua.get("tg"),
            "tg_spread": ua.get("tg_spread"),
            "value": t.values[0] if t.values and len(t.values) == 1 else None,
            "flags": ua.get("flags", ""),
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class BestPlan:
    """What a search concluded, as written to best.json."""

    data: dict[str, Any]

    @property
    def placement(self) -> Placement:
        return Placement.from_dict(self.data["placement"])

    @property
    def model_path(self) -> str:
        return self.data["model"]["path"]

    def server_command(self) -> list[str]:
        return list(self.data["server_command"])


def write_results(out_dir: Path, study: optuna.Study, best: dict[str, Any] | None) -> dict[str, Path]:
    """Write trials.csv, and with a winner best.json and best.sh, into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out_dir / "trials.csv", "best": out_dir / "best.json", "script": out_dir / "best.sh"}
    trials_frame(study).to_csv(paths["trials"], index=False)
    if best is None:
        return {"trials": paths["trials"]}
    best = {"placetune_version": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"), **best}
    paths["best"].write_text(json.dumps(best, indent=2) + "\n", encoding="utf-8")
    command = shlex.join(best["server_command"])
    paths["script"].write_text(
        "#!/bin/sh\n"
        f"# Best llama-server placement found by placetune for {Path(best['model']['path']).name}\n"
        f"# on {best['machine'].get('cpu_model', '?')} (fingerprint {best['machine'].get('fingerprint', '?')}).\n"
        f'exec {command} "$@"\n',
        encoding="utf-8",
    )
    paths["script"].chmod(0o755)
    return paths


def _read_json(path: Path, what: str) -> Any:
    if not path.exists():
        raise PlacetuneError(f"{path} not found; give {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlacetuneError(f"{path} is not valid JSON ({exc})") from None


def load_best(path: Path) -> BestPlan:
    """A best.json, or a results folder holding one."""
    if path.is_dir():
        path = path / "best.json"
    data = _read_json(path, "a best.json or the results folder of a search")
    if not isinstance(data, dict) or "placement" not in data or "model" not in data:
        raise PlacetuneError(f"{path} is not a placetune best.json (no placement/model)")
    return BestPlan(data)


def load_placement(path: Path) -> Placement:
    """A placement JSON, or the placement inside a best.json."""
    data = _read_json(path, "a placement JSON or a best.json")
    if not isinstance(data, dict):
        raise PlacetuneError(f"{path} is not a placement (a JSON object with n_gpu_layers, overrides, ...)")
    return Placement.from_dict(data.get("placement", data))
