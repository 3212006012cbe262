"""`placetune report`: one self-contained HTML page (plus PNG files) from a search's results.

The plots are static PNGs embedded as base64, so the page opens offline, from an e-mail or a CI
artifact, with no JavaScript and nothing fetched. Optuna's matplotlib visualizations draw what
they can (history, importances); pandas draws the rest. Optuna's Pareto plot is not used: on a
single-objective study it takes the front over the objective's own directions, not over pp and
tg, and it leaves out screened trials, which were measured too.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sqlite3
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from placetune.anatomy import read_anatomy
from placetune.compare import Comparison
from placetune.errors import PlacetuneError, read_user_text
from placetune.hardware import Machine, cpu_model
from placetune.placement import Placement
from placetune.predict import LABEL, Bandwidth, machine_bandwidths, predict_tg
from placetune.results import trials_frame
from placetune.storage import load_existing_study, mask_url

HISTORY_SCHEMA = """\
Expected regress history: table regress_measurements, as `placetune regress` writes it, or any
table of the SQLite file with these columns (matched case-insensitively):
  case_name (or case, name)                   the regress case
  time   (or timestamp, created, created_at)  ISO-8601 text or Unix seconds
  metric (pp / tg) and median (or value)      one row per case, run and metric
     ... or wide: columns pp and tg (or pp_median, tg_median), one row per case and run
  build  (or llama_build, commit)             optional: the llama.cpp build, marked on the plot
"""
HISTORY_TABLE = "regress_measurements"
_CASE = ("case_name", "case", "name")
_TIME = ("time", "timestamp", "created", "created_at")
_BUILD = ("build", "llama_build", "commit")
_VALUE = ("median", "value")
_WIDE = {"pp": ("pp", "pp_median"), "tg": ("tg", "tg_median")}


@dataclass
class Section:
    """One plot of the page: its PNG (None when it could not be drawn) and what to say about it."""

    name: str
    title: str
    png: bytes | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportInputs:
    """Everything the page is drawn from."""

    study: optuna.Study
    objective: str
    source: str
    best: dict[str, Any] | None = None  # best.json, when there is one
    notes: list[str] = field(default_factory=list)

    @property
    def attrs(self) -> dict[str, Any]:
        """Study attributes, completed from best.json (a study rebuilt from trials.csv has none)."""
        attrs = dict(self.study.user_attrs.get("placetune") or {})
        if self.best:
            attrs.setdefault("model", self.best.get("model"))
            attrs.setdefault("machine", self.best.get("machine"))
            attrs.setdefault("workload", self.best.get("workload"))
        return attrs


# ---------------------------------------------------------------------------------------------
# Loading


def _is_url(text: str) -> bool:
    return "://" in text


def _study_from_csv(path: Path, objective: str) -> optuna.Study:
    """An in-memory study rebuilt from trials.csv, for a results folder copied without its database.

    Parameter distributions are not in the CSV, so each parameter becomes categorical over the
    values seen: enough for the history and importance plots.
    """
    frame = pd.read_csv(path)
    params = [c for c in frame.columns if c.startswith("param_")]
    dists = {c[6:]: CategoricalDistribution(sorted(frame[c].dropna().unique().tolist(), key=str)) for c in params}
    directions = ["maximize", "maximize"] if objective == "pareto" else [
        "minimize" if objective == "latency" else "maximize"]
    study = optuna.create_study(directions=directions)
    for row in frame.to_dict("records"):
        state = TrialState[row["state"]]
        if state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        values = None
        if state is TrialState.COMPLETE:
            values = [row["pp"], row["tg"]] if objective == "pareto" else [row["value"]]
            if any(pd.isna(v) for v in values):
                state, values = TrialState.FAIL, None
        chosen = {c[6:]: _plain(row[c]) for c in params if not pd.isna(row[c])}
        attrs = {k: _plain(row[k]) for k in ("pp", "tg", "pp_spread", "tg_spread", "flags", "reason")
                 if not pd.isna(row.get(k))}
        for key in ("role", "name"):
            attrs[key] = "" if pd.isna(row.get(key)) else row[key]
        study.add_trial(optuna.trial.create_trial(
            state=state, values=values, params=chosen, distributions={k: dists[k] for k in chosen}, user_attrs=attrs,
        ))
    return study


def _objective(study: optuna.Study) -> str:
    return (study.user_attrs.get("placetune") or {}).get("objective", "latency")


def _plain(value: Any) -> Any:
    """numpy scalars from pandas -> Python values (Optuna's storages and json want plain ones)."""
    return value.item() if hasattr(value, "item") else value


def load_inputs(results: str | Path, study_name: str | None = None) -> ReportInputs:
    """A results folder (best.json, trials.csv), a best.json, an SQLite study file or a storage URL."""
    text = str(results)
    if _is_url(text):
        study = load_existing_study(text, study_name)
        return ReportInputs(study, _objective(study), mask_url(text))
    path = Path(results)
    if path.is_file() and path.name == "best.json":
        path = path.parent
    if path.is_file():
        study = load_existing_study(f"sqlite:///{path.resolve()}", study_name)
        return ReportInputs(study, _objective(study), str(path))
    if not path.is_dir():
        raise PlacetuneError(f"{mask_url(str(path))} not found; give a results folder (with best.json), a .db file or "
                             "a storage URL")
    best_path = path / "best.json"
    if not best_path.exists():
        db = path / "placetune.db"
        if db.exists():
            study = load_existing_study(f"sqlite:///{db.resolve()}", study_name)
            return ReportInputs(study, _objective(study), str(db))
        raise PlacetuneError(f"{path} holds neither best.json nor placetune.db; give a search's results folder")
    try:
        best = json.loads(read_user_text(best_path, "a search's results folder"))
        info = best["study"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PlacetuneError(f"{best_path} is not a placetune best.json ({type(exc).__name__})") from None
    objective = info.get("objective", "latency")
    try:
        study = load_existing_study(info["storage"], info["name"])
        return ReportInputs(study, objective, str(path), best, list(best.get("notes") or []))
    except PlacetuneError as exc:
        csv = path / "trials.csv"
        if not csv.exists():
            raise
        return ReportInputs(_study_from_csv(csv, objective), objective, str(path), best,
                            [*(best.get("notes") or []),
                             f"{exc}; trials read from {csv.name}, so parameter types are approximate"])


# ---------------------------------------------------------------------------------------------
# Figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _target(objective: str) -> tuple[Callable[[FrozenTrial], float] | None, str]:
    if objective == "pareto":
        return (lambda t: t.values[1]), "tg t/s"
    names = {"latency": "latency s (lower is better)", "tg": "tg t/s", "pp": "pp t/s"}
    return None, names.get(objective, "objective")


def history_section(inputs: ReportInputs) -> Section:
    section = Section("history", "Optimization history")
    complete = inputs.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        section.notes.append("no completed trial, so no history to draw")
        return section
    target, name = _target(inputs.objective)
    ax = optuna.visualization.matplotlib.plot_optimization_history(inputs.study, target=target, target_name=name)
    ax.figure.set_size_inches(8, 4.5)
    section.png = _png(ax.figure)
    section.notes.append("completed trials only: screened-out, pruned and failed trials have no objective value")
    return section


def pareto_front(frame: pd.DataFrame) -> pd.Series:
    """Mask of the trials no other trial beats on both pp and tg (ties on both keep each other)."""
    pp, tg = frame["pp"].to_numpy(), frame["tg"].to_numpy()
    return pd.Series(
        [not ((pp >= p) & (tg >= t) & ((pp > p) | (tg > t))).any() for p, t in zip(pp, tg, strict=True)],
        index=frame.index,
    )


def pareto_section(trials: pd.DataFrame) -> Section:
    section = Section("pareto", "pp vs tg of every measured trial, Pareto front highlighted")
    measured = trials.dropna(subset=["pp", "tg"])
    if measured.empty:
        section.notes.append("no trial was measured")
        return section
    measured = measured.assign(front=pareto_front(measured))
    fig, ax = plt.subplots(figsize=(8, 5))
    for state, group in measured.groupby("state"):
        label = "screened out (1 repetition)" if state == "PRUNED" else state.lower()
        group.plot.scatter(x="pp", y="tg", ax=ax, alpha=0.6, label=label,
                           color="tab:gray" if state == "PRUNED" else "tab:blue")
    front = measured[measured["front"]].sort_values("pp")
    front.plot(x="pp", y="tg", ax=ax, drawstyle="steps-post", color="tab:red", marker="o", label="Pareto front")
    seeds = measured[measured["role"].isin(["baseline", "candidate"])]
    for (pp, tg), group in seeds.groupby(["pp", "tg"]):  # seeds often coincide (e.g. defaults = fullest fit)
        ax.annotate("seed " + ", ".join(f"#{n}" for n in group["trial"]), (pp, tg), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("pp t/s (prompt processing); seeds are named in the summary table")
    ax.set_ylabel("tg t/s (generation)")
    ax.legend(fontsize=8)
    section.png = _png(fig)
    section.notes.append(f"{len(front)} of {len(measured)} measured trials are on the front; "
                         "duplicates of a placement repeat its numbers")
    return section


def importance_section(inputs: ReportInputs) -> Section:
    section = Section("importances", "Parameter importances")
    complete = inputs.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        section.notes.append(f"only {len(complete)} completed trial(s): importances need at least 3; run more trials")
        return section
    target, name = _target(inputs.objective)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # PED-ANOVA's small-sample warnings belong on the page
        try:
            ax = optuna.visualization.matplotlib.plot_param_importances(
                inputs.study, evaluator=PedAnovaImportanceEvaluator(), target=target, target_name=name)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            section.notes.append(f"importances could not be computed: {exc}")
            return section
    ax.figure.set_size_inches(8, 4.5)
    section.png = _png(ax.figure)
    section.notes.append(f"PED-ANOVA (Optuna, no scikit-learn needed) over the {len(complete)} completed trials; "
                         "with few trials treat it as a hint")
    section.notes += sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return section


def expert_layers_section(trials: pd.DataFrame) -> Section:
    section = Section("expert_layers", "tg and pp against the number of MoE layers whose experts are in RAM")
    column = "param_cpu_moe_layers"
    if column not in trials.columns or trials[column].dropna().empty:
        section.notes.append("this search had no cpu_moe_layers parameter (no accelerator, or a dense model), "
                             "so experts never moved between devices")
        return section
    measured = trials.dropna(subset=[column, "pp", "tg"])
    if measured.empty:
        section.notes.append("no trial with cpu_moe_layers was measured")
        return section
    color = "param_n_gpu_layers" if "param_n_gpu_layers" in measured.columns else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, metric in zip(axes, ("tg", "pp"), strict=True):
        measured.plot.scatter(x=column, y=metric, ax=ax, c=color, colormap="viridis" if color else None,
                              colorbar=bool(color) and metric == "pp", alpha=0.8)
        measured.groupby(column)[metric].median().plot(ax=ax, color="tab:red", label="median")
        ax.set_xlabel("cpu_moe_layers (experts in RAM)")
        ax.set_ylabel(f"{metric} t/s")
    if color:
        fig.axes[-1].set_ylabel("n_gpu_layers")
    section.png = _png(fig)
    section.notes.append("colour: -ngl of the trial; layers not on the accelerator keep their experts in RAM too")
    return section


def _trial_bandwidths(inputs: ReportInputs, machine: Machine, devices: list[str], ram_gbs: float | None,
                      overrides: Mapping[str, float] | None, notes: list[str]) -> dict[str, Bandwidth]:
    recorded = (inputs.best or {}).get("predicted", {}).get("bandwidths")
    if recorded and ram_gbs is None and not overrides:
        notes.append("bandwidths as recorded in best.json by the search")
        return {k: Bandwidth(float(v["gbs"]), v["source"]) for k, v in recorded.items()}
    if ram_gbs is None and machine.cpu_model != cpu_model():
        notes.append(f"RAM bandwidth probed on this machine ({cpu_model()}), not on the measured one "
                     f"({machine.cpu_model}); give --ram-bw for a fair prediction")
    return machine_bandwidths(machine, devices, ram_gbs=ram_gbs, overrides=overrides)


def predicted_frame(inputs: ReportInputs, trials: pd.DataFrame, ram_gbs: float | None = None,
                    overrides: Mapping[str, float] | None = None) -> tuple[pd.DataFrame | None, list[str]]:
    """trial, measured tg and predicted tg for every measured trial; None (and why) when the model is gone."""
    notes: list[str] = []
    attrs = inputs.attrs
    model, machine_doc = attrs.get("model") or {}, attrs.get("machine")
    path = Path(model.get("path", ""))
    if not model.get("path") or not path.exists():
        return None, [f"model {model.get('path') or '(unknown)'} is not on this machine; no prediction"]
    anatomy = read_anatomy(path)
    if model.get("header_hash") and anatomy.header_hash != model["header_hash"]:
        return None, [f"{path} changed since the search (header hash differs); no prediction"]
    if not machine_doc:
        return None, ["the results do not record the machine; no prediction"]
    machine = Machine.from_dict(machine_doc)
    devices = [d.name for d in machine.accelerators]
    bandwidths = _trial_bandwidths(inputs, machine, devices, ram_gbs, overrides, notes)
    placements = {t.number: t.user_attrs.get("placement") for t in inputs.study.get_trials(deepcopy=False)}
    rows = []
    for row in trials.dropna(subset=["tg"]).itertuples():
        doc = placements.get(row.trial)
        if doc:
            p = predict_tg(anatomy, Placement.from_dict(doc), devices, bandwidths)
            rows.append({"trial": row.trial, "state": row.state, "tg": row.tg, "predicted_tg": p.tg,
                         "efficiency": row.tg / p.tg})
    if not rows:
        return None, ["the trials carry no placement (a study rebuilt from trials.csv); no prediction"]
    notes.append("bandwidths: " + ", ".join(f"{k} {v.gbs:.1f} GB/s ({v.source})" for k, v in bandwidths.items()))
    return pd.DataFrame(rows), notes


def predicted_section(predicted: pd.DataFrame | None, notes: list[str]) -> Section:
    section = Section("predicted", f"Measured vs {LABEL} tg (bandwidth roofline)", notes=list(notes))
    if predicted is None:
        return section
    fig, ax = plt.subplots(figsize=(6.5, 5))
    predicted.plot.scatter(x="predicted_tg", y="tg", ax=ax, alpha=0.7, label="trials")
    top = max(predicted["predicted_tg"].max(), predicted["tg"].max()) * 1.05
    ax.plot([0, top], [0, top], color="tab:gray", linestyle="--", label="measured = predicted")
    for share in (0.7, 0.5):
        ax.plot([0, top], [0, top * share], color="tab:gray", linestyle=":", linewidth=0.8)
        ax.annotate(f"{share:.0%}", (top, top * share), fontsize=7, color="tab:gray", ha="right", va="bottom")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"{LABEL} tg t/s")
    ax.set_ylabel("measured tg t/s")
    ax.legend(fontsize=8)
    section.png = _png(fig)
    eff, tg = predicted["efficiency"], predicted["predicted_tg"]
    section.notes.insert(0, f"efficiency (measured / predicted): median {eff.median():.0%}, "
                            f"range {eff.min():.0%} to {eff.max():.0%}; CPUs typically reach 50-70%")
    if tg.max() <= tg.min() * 1.01:
        section.notes.insert(1, "every trial has the same prediction: all its weights are read at one bandwidth "
                                "(one device, or an RPC server reading this host's RAM), so the spread in measured "
                                "tg comes from runtime knobs and overheads (threads, RPC round trips), not bandwidth")
    return section


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def load_history(path: Path) -> tuple[pd.DataFrame | None, str]:
    """The regress history as rows of (time, case, metric, value, build), or None and why (see HISTORY_SCHEMA)."""
    if not path.is_file():
        return None, f"history file {path} not found"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            tables.sort(key=lambda t: t != HISTORY_TABLE)
            for table in tables:
                frame = pd.read_sql_query(f'SELECT * FROM "{table}"', con)
                rows = _history_rows(frame)
                if rows is not None:
                    if rows.empty:
                        return None, f"history table {table!r} has no rows yet"
                    return rows, f"regress history from table {table!r} of {path.name}"
    except (sqlite3.Error, pd.errors.DatabaseError) as exc:
        return None, f"history {path} is not a readable SQLite file ({exc})"
    return None, f"no table in {path.name} has the expected columns"


def _history_rows(frame: pd.DataFrame) -> pd.DataFrame | None:
    cols = list(frame.columns)
    case, when, build = _pick(cols, _CASE), _pick(cols, _TIME), _pick(cols, _BUILD)
    if case is None or when is None:
        return None
    metric, value = _pick(cols, ("metric",)), _pick(cols, _VALUE)
    if metric and value:
        rows = frame[[when, case, metric, value]].set_axis(["time", "case", "metric", "value"], axis=1)
    else:
        wide = {m: _pick(cols, names) for m, names in _WIDE.items()}
        wide = {m: c for m, c in wide.items() if c}
        if not wide:
            return None
        rows = frame[[when, case, *wide.values()]].set_axis(["time", "case", *wide], axis=1)
        rows = rows.melt(id_vars=["time", "case"], var_name="metric", value_name="value")
    rows["build"] = frame[build].astype(str).str.slice(0, 40).to_numpy() if build else ""
    numeric = pd.to_numeric(rows["time"], errors="coerce")
    rows["time"] = (pd.to_datetime(numeric, unit="s", utc=True) if numeric.notna().all()
                    else pd.to_datetime(rows["time"], utc=True, errors="coerce", format="mixed"))
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce")
    return rows.dropna(subset=["time", "value"]).sort_values("time")


def history_regress_section(path: Path | None) -> Section | None:
    if path is None:
        return None
    section = Section("regress", "Regress history: each case's metric over time, llama.cpp builds marked")
    rows, note = load_history(path)
    section.notes.append(note)
    if rows is None:
        section.notes.append(HISTORY_SCHEMA)
        return section
    metrics = sorted(rows["metric"].unique())
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 3.5 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        part = rows[rows["metric"] == metric]
        part.pivot_table(index="time", columns="case", values="value").plot(ax=ax, marker="o")
        changes = part.sort_values("time").drop_duplicates("build")
        for row in changes.itertuples():
            if row.build:
                ax.axvline(row.time, color="tab:gray", linestyle=":")
                ax.annotate(f"build {row.build}", (row.time, ax.get_ylim()[1]), rotation=90, fontsize=7,
                            va="top", ha="right", color="tab:gray")
        ax.set_ylabel(f"{metric} t/s")
        ax.legend(fontsize=7)
    section.png = _png(fig)
    return section


# ---------------------------------------------------------------------------------------------
# Summary table


def summary_frame(inputs: ReportInputs, trials: pd.DataFrame, predicted: pd.DataFrame | None) -> pd.DataFrame:
    """The final round from best.json: every contender, its rates and spreads, and winner/this with the
    interval and verdict the search computed (placetune.compare). Without best.json there was no final
    round, so the baselines and seeds are listed with their search-phase rates and no ratio."""
    if inputs.best and inputs.best.get("rows"):
        rows = []
        for r in inputs.best["rows"]:
            pp, tg = r.get("pp") or {}, r.get("tg") or {}
            vs = (r.get("vs_winner") or {}).get("objective")
            ratio = "winner" if r["role"] == "winner" else (
                Comparison(**vs).describe() if vs else r.get("status", ""))
            rows.append({"placement": f"{r['name']} ({r['role']})", "trial": r.get("trial"),
                         "pp": pp.get("median"), "pp_spread": pp.get("spread"), "tg": tg.get("median"),
                         "tg_spread": tg.get("spread"), "winner/this": ratio, "flags": r.get("flags", "")})
        frame = pd.DataFrame(rows)
    else:
        done = trials[trials["state"] == "COMPLETE"]  # a baseline repeating another's placement keeps its name
        seeds = done[done["role"].isin(["baseline", "candidate"])] if "role" in done else done.iloc[:0]
        if done.empty:
            return pd.DataFrame()
        rows = [{"placement": f"{r['name']} ({r['role']})", "trial": r["trial"], "pp": r["pp"],
                 "pp_spread": r["pp_spread"], "tg": r["tg"], "tg_spread": r["tg_spread"],
                 "winner/this": "no final round", "flags": r["flags"]} for r in seeds.to_dict("records")]
        frame = pd.DataFrame(rows, columns=["placement", "trial", "pp", "pp_spread", "tg", "tg_spread",
                                            "winner/this", "flags"])
    if predicted is not None and not frame.empty:
        by_trial = predicted.set_index("trial")["predicted_tg"]
        frame["predicted tg"] = frame["trial"].map(by_trial)
        frame["efficiency"] = frame["tg"] / frame["predicted tg"]
    return frame


def _summary_html(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p>No trial finished, so there is nothing to compare.</p>"
    shown = frame.drop(columns=["flags"]).copy()
    fmt: dict[str, Callable[[Any], str]] = {
        "pp": "{:,.1f}".format, "tg": "{:,.1f}".format, "predicted tg": "{:,.1f}".format,
        "pp_spread": "±{:.1%}".format, "tg_spread": "±{:.1%}".format, "efficiency": "{:.0%}".format,
    }
    for col, f in fmt.items():
        if col in shown.columns:
            shown[col] = shown[col].map(lambda v, f=f: "–" if pd.isna(v) else f(v))
    shown["trial"] = shown["trial"].map(lambda v: "–" if pd.isna(v) else str(int(v)))
    shown.insert(1, "flags", frame["flags"].fillna(""))
    return shown.rename(columns={"pp_spread": "± pp", "tg_spread": "± tg"}).to_html(
        index=False, escape=True, classes="summary", na_rep="–")


# ---------------------------------------------------------------------------------------------
# The page


@dataclass
class ReportFiles:
    html: Path
    pngs: list[Path]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table.summary { border-collapse: collapse; font-size: 0.85rem; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
table.summary td:nth-child(2) { text-align: left; font-family: monospace; font-size: 0.75rem; }
table.summary td:first-child { text-align: left; }
.note { color: #555; font-size: 0.9rem; white-space: pre-wrap; } img { max-width: 100%; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; } dt { font-weight: bold; }
"""


def _page(inputs: ReportInputs, sections: list[Section], summary: pd.DataFrame, notes: list[str]) -> str:
    attrs = inputs.attrs
    model = (attrs.get("model") or {}).get("path", "?")
    machine = attrs.get("machine") or {}
    counts = pd.Series([t.state.name for t in inputs.study.trials]).value_counts().to_dict()
    facts = {
        "model": model,
        "machine": f"{machine.get('cpu_model', '?')} (fingerprint {machine.get('fingerprint', '?')})",
        "objective": inputs.objective,
        "workload": json.dumps(attrs.get("workload") or {}),
        "trials": ", ".join(f"{v} {k.lower()}" for k, v in counts.items()) or "none",
        "source": inputs.source,
    }
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>placetune report: {e(Path(model).name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>placetune report: {e(Path(model).name)}</h1><dl>",
        *(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in facts.items()), "</dl>",
        *(f'<p class="note">{e(n)}</p>' for n in notes),
        "<h2>Final round: the winner against every baseline</h2>", _summary_html(summary),
        '<p class="note">winner/this: how many times faster the winner is than that row on the objective, with '
        "its 95% interval and verdict, from the interleaved final round; ± is the relative spread of the "
        f"repetitions; predicted tg is the {LABEL} bandwidth roofline.</p>",
    ]
    for s in sections:
        parts.append(f'<h2 id="{s.name}">{e(s.title)}</h2>')
        if s.png is not None:
            data = base64.b64encode(s.png).decode("ascii")
            parts.append(f'<img alt="{e(s.title)}" src="data:image/png;base64,{data}">')
        parts += [f'<p class="note">{e(n)}</p>' for n in s.notes]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(results: str | Path, out_dir: Path | None = None, *, history: Path | None = None,
                 study_name: str | None = None, ram_gbs: float | None = None,
                 bandwidth_overrides: Mapping[str, float] | None = None) -> ReportFiles:
    """Write report.html (self-contained) and one PNG per plot into out_dir (default: RESULTS/report)."""
    inputs = load_inputs(results, study_name)
    plt.switch_backend("agg")  # figures only ever become PNGs, with or without a display
    if out_dir is None:
        base = Path(results) if not _is_url(str(results)) else Path.cwd()
        out_dir = (base if base.is_dir() else base.parent) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(inputs.study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        predicted, predicted_notes = predicted_frame(inputs, trials, ram_gbs, bandwidth_overrides)
        sections = [history_section(inputs), pareto_section(trials), importance_section(inputs),
                    expert_layers_section(trials), predicted_section(predicted, predicted_notes)]
        regress = history_regress_section(history)
    if regress is not None:
        sections.append(regress)
    pngs = []
    for s in sections:
        if s.png is not None:
            png = out_dir / f"{s.name}.png"
            png.write_bytes(s.png)
            pngs.append(png)
    page = out_dir / "report.html"
    page.write_text(_page(inputs, sections, summary_frame(inputs, trials, predicted), inputs.notes), encoding="utf-8")
    return ReportFiles(page, pngs)
