"""Result files: trials.csv (every trial), best.json (the machine-readable plan), best.sh (a server line).

best.json is self-describing, like a pyperf result: placement, flags, measurements with spread,
the machine fingerprint, the llama.cpp build and the model's size and header hash, so that
export, verify and regress can work from it alone.
"""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from placetune import __version__
from placetune.errors import PlacetuneError, read_user_text
from placetune.escape import comment
from placetune.placement import Placement, render_env
from placetune.records import one_line_error
from placetune.storage import mask_url


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
            "role": ua.get("role", "search"),
            "name": ua.get("name", ""),
            "proposed": ua.get("proposed", ""),  # why the staged walk proposed it (search/staged.py)
            "status": ua.get("status", ""),
            "reason": ua.get("reason", ""),
            "repeat_of": ua.get("duplicate_of"),
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


SCHEMA_VERSION = 2
BEST_KEY = "placetune_best"  # the study's copy of its latest best.json


class ModelRef(BaseModel):
    """The model a plan is for: an absolute path, so export and verify work from any directory."""

    model_config = ConfigDict(extra="ignore")

    path: str
    header_hash: str = ""
    total_bytes: int | None = None
    arch: str = ""


class BestRecord(BaseModel):
    """best.json: what a search concluded, self-describing like a pyperf result.

    Only model, placement and workload are needed to export or verify a plan; the rest says how the
    decision was made: every final-round row with its ratio, interval and verdict against the winner.
    """

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    placetune_version: str = __version__
    created: str = ""
    model: ModelRef
    machine: dict[str, Any] = Field(default_factory=dict)
    llama_build: dict[str, Any] = Field(default_factory=dict)
    study: dict[str, Any] = Field(default_factory=dict)
    workload: dict[str, Any]
    serving: dict[str, int] = Field(default_factory=dict)
    runner: str = "embedded"
    rpc: list[str] = Field(default_factory=list)
    placement: dict[str, Any]
    flags: str = ""
    server_command: list[str] = Field(default_factory=list)
    measurement: dict[str, Any] = Field(default_factory=dict)
    objective_value: float | None = None
    decision: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = Field(default_factory=list)
    front: list[dict[str, Any]] = Field(default_factory=list)
    predicted: dict[str, Any] | None = None
    memory: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        """A newer placetune may have changed what a field means: refuse rather than misread it."""
        if version > SCHEMA_VERSION:
            raise ValueError(f"written by a newer placetune (schema {version}, this one reads up to "
                             f"{SCHEMA_VERSION}); upgrade placetune")
        return version

    @field_validator("study")
    @classmethod
    def _masked_storage(cls, study: dict[str, Any]) -> dict[str, Any]:
        """A storage password never travels in a plan, even in one written by hand or by an older placetune."""
        if isinstance(study.get("storage"), str):
            return {**study, "storage": mask_url(study["storage"])}
        return study


class BestPlan:
    """A loaded best.json: the validated record, and its plain-JSON form for the code that reads fields."""

    def __init__(self, data: dict[str, Any], where: str = "the plan") -> None:
        try:
            self.record = BestRecord.model_validate(data)
        except ValidationError as exc:
            raise PlacetuneError(f"{where} is not a placetune best.json: {one_line_error(exc)}") from None
        self.data = self.record.model_dump(mode="json")
        try:
            Placement.from_dict(self.data["placement"])  # checked here, so a bad value names its file
        except PlacetuneError as exc:
            raise PlacetuneError(f"{where}: {exc}") from None

    @property
    def placement(self) -> Placement:
        return Placement.from_dict(self.data["placement"])

    @property
    def model_path(self) -> str:
        return self.record.model.path


def best_script(record: BestRecord) -> str:
    """best.sh: the server line, with every outside string in its comments escaped (a file name may hold a
    newline, and a comment must not end early)."""
    env = render_env(Placement.from_dict(record.placement))
    command = shlex.join(["env", *env, *record.server_command] if env else record.server_command)
    machine = record.machine
    return "\n".join([
        "#!/bin/sh",
        comment(f"Best llama-server placement found by placetune for {Path(record.model.path).name}"),
        comment(f"on {machine.get('cpu_model', '?')} (fingerprint {machine.get('fingerprint', '?')})."),
        f'exec {command} "$@"',
        "",
    ])


def write_results(out_dir: Path, study: optuna.Study, best: BestRecord | None) -> dict[str, Path]:
    """Write trials.csv, and with a winner best.json and best.sh, into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out_dir / "trials.csv", "best": out_dir / "best.json", "script": out_dir / "best.sh"}
    trials_frame(study).to_csv(paths["trials"], index=False)
    if best is None:
        return {"trials": paths["trials"]}
    best = best.model_copy(update={"created": datetime.now(UTC).isoformat(timespec="seconds")})
    paths["best"].write_text(best.model_dump_json(indent=2) + "\n", encoding="utf-8")
    # The study keeps the decision too, so `export STUDY` gives the final round's winner, not a search-phase trial.
    study.set_user_attr(BEST_KEY, best.model_dump(mode="json"))
    paths["script"].write_text(best_script(best), encoding="utf-8")
    paths["script"].chmod(0o755)
    return paths


def _read_json(path: Path, what: str) -> Any:
    text = read_user_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlacetuneError(f"{path} is not valid JSON ({exc})") from None


def find_best(path: Path) -> Path:
    """The best.json a path names: the file, or the one a search's --out folder holds at any depth.

    A search writes OUT/<model>/<machine>/best.json, so users give OUT and expect it found.
    """
    if not path.is_dir() or (path / "best.json").exists():
        return path / "best.json" if path.is_dir() else path
    found = sorted(path.rglob("best.json"))
    if len(found) > 1:
        listed = ", ".join(str(p.parent) for p in found[:5])
        raise PlacetuneError(f"{path} holds {len(found)} results ({listed}); give one of those folders")
    return found[0] if found else path / "best.json"


def load_best(path: Path) -> BestPlan:
    """A best.json, or a results folder holding one."""
    path = find_best(path)
    data = _read_json(path, "a best.json or the results folder of a search")
    if not isinstance(data, dict):
        raise PlacetuneError(f"{path} is not a placetune best.json (not a JSON object)")
    return BestPlan(data, str(path))


def load_placement(path: Path) -> Placement:
    """A placement JSON, or the placement inside a best.json."""
    data = _read_json(path, "a placement JSON or a best.json")
    if not isinstance(data, dict):
        raise PlacetuneError(f"{path} is not a placement (a JSON object with n_gpu_layers, overrides, ...)")
    return Placement.from_dict(data.get("placement", data))
