"""Nightly regression runs: re-measure a suite of placements, keep every run in a history store, flag drops.

A slowdown from a new llama.cpp build or driver should be caught the next morning, and a noisy night
should not page anyone. So a drop is a regression only when it is larger than both a relative
threshold and the noise this case has shown, and when it replicates on an immediate re-measure.
Numbers from another machine fingerprint, llama.cpp build, runner or workload are never compared:
such a row says what changed and starts its own baseline.

The history is SQLAlchemy Core: SQLite by default, and any SQLAlchemy URL (postgresql://...) works, so a
fleet can share one store; rows carry the machine fingerprint and only matching rows are compared.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
import tomllib
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich import box
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from placetune.compare import FASTER, SLOWER, Comparison, compare
from placetune.errors import PlacetuneError, read_user_text
from placetune.escape import md_cell, one_line, xml_text
from placetune.hardware import Machine
from placetune.placement import Placement, check_buffer_types, parse_flags, render_flags
from placetune.records import one_line_error
from placetune.results import load_best
from placetune.runners.base import Measurement, Runner, Stats, Workload
from placetune.runners.binaries import build_label
from placetune.storage import engine_options, first_line, mask_url, sqlite_file

METRICS = ("pp", "tg")
BASELINES = ("recent", "pinned")
REGRESSION, IMPROVEMENT, OK, NO_BASELINE, ERROR = "regression", "improvement", "ok", "no baseline", "error"
_WORKLOAD_KEYS = {f.name for f in fields(Workload)}

# ---------------------------------------------------------------------------------------------
# Suites


@dataclass
class Case:
    """One placement of one model to re-measure; `error` says why it cannot run (reported, never skipped)."""

    name: str
    model: Path | None
    placement: Placement
    workload: Workload
    runner: str | None = None
    error: str = ""

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for m, n in (("pp", self.workload.n_prompt), ("tg", self.workload.n_gen)) if n) or METRICS


class WorkloadSpec(BaseModel):
    """A [workload] table: any of the Workload's fields."""

    model_config = ConfigDict(extra="forbid")

    n_prompt: int | None = None
    n_gen: int | None = None
    depth: int | None = None
    repetitions: int | None = None
    warmups: int | None = None
    timeout_s: float | None = None

    def over(self, base: Workload) -> Workload:
        return replace(base, **self.model_dump(exclude_none=True))


class CaseSpec(BaseModel):
    """One [[case]]: a model and flags, or a best.json (whose model and workload it takes)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    model: str | None = None
    flags: str | None = None
    best: str | None = None
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    runner: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CaseSpec:
        if (self.flags is None) == (self.best is None):
            raise ValueError('give exactly one of flags = "..." or best = "best.json"')
        if self.flags is not None and self.model is None:
            raise ValueError('has flags but no model = "path.gguf"')
        return self


class SuiteFile(BaseModel):
    """A suite: default workload and runner, and at least one case."""

    model_config = ConfigDict(extra="forbid")

    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    runner: str | None = None
    case: list[CaseSpec] = Field(min_length=1)


def load_suite(path: Path) -> list[Case]:
    """Cases from a suite TOML file (validated as a typed record), or one case per best.json under a folder.

    Paths in a suite file are relative to the file, so it runs the same from any directory. A case
    that cannot be built (a missing best.json, bad flags) comes back with `error` set.
    """
    if path.is_dir():
        return _cases_from_results(path)
    if not path.exists():
        raise PlacetuneError(f"suite {path} not found; give a suite .toml file or a results folder")
    try:
        doc = tomllib.loads(read_user_text(path, "a suite .toml file or a results folder"))
    except tomllib.TOMLDecodeError as exc:
        raise PlacetuneError(f"{path} is not valid TOML: {exc}") from None
    if not doc.get("case"):
        raise PlacetuneError(f"{path} lists no cases; add [[case]] tables with name, model and flags (or best)")
    try:
        suite = SuiteFile.model_validate(doc)
        defaults = suite.workload.over(Workload())
    except ValidationError as exc:
        raise PlacetuneError(f"{path}: {one_line_error(exc)}") from None
    names = [c.name for c in suite.case]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PlacetuneError(f"{path}: two cases are named {twice[0]!r}; names key the history, make them unique")
    return [_toml_case(path.parent, c, defaults, c.runner or suite.runner) for c in suite.case]


def _toml_case(root: Path, spec: CaseSpec, workload: Workload, runner: str | None) -> Case:
    """Workload keys: the suite's [workload], then a best.json's search workload, then the case's own."""
    model = root / Path(spec.model).expanduser() if spec.model else None
    try:
        if spec.best is not None:
            plan = load_best(root / Path(spec.best).expanduser())
            placement = plan.placement
            model = model or Path(plan.model_path)
            workload = replace(workload, **{k: v for k, v in plan.data.get("workload", {}).items()
                                            if k in _WORKLOAD_KEYS})
        else:
            placement = parse_flags(spec.flags or "")
        workload = spec.workload.over(workload)
    except PlacetuneError as exc:
        return Case(spec.name, model, Placement(), workload, runner, error=str(exc))
    return Case(spec.name, model, placement, workload, runner)


def _cases_from_results(root: Path) -> list[Case]:
    cases = []
    for best in sorted(root.rglob("best.json")):
        name = best.parent.relative_to(root).as_posix()
        name = root.resolve().name if name == "." else name
        try:
            plan = load_best(best)
            workload = Workload.from_dict(plan.data.get("workload", {}))
            cases.append(Case(name, Path(plan.model_path), plan.placement, workload))
        except PlacetuneError as exc:
            cases.append(Case(name, None, Placement(), Workload(), error=str(exc)))
    if not cases:
        raise PlacetuneError(f"no best.json under {root}; run `placetune search` first or give a suite .toml")
    return cases


# ---------------------------------------------------------------------------------------------
# History store


@dataclass(frozen=True)
class Row:
    """One metric of one case from one run, as stored."""

    case: str
    metric: str
    time: datetime
    run_id: str
    fingerprint: str
    build: str
    runner: str
    workload: str  # canonical JSON without the timeout, which does not change what is measured
    flags: str
    model: str
    samples: tuple[float, ...]
    median: float
    spread: float
    host: str = ""
    id: int | None = None

    @property
    def setup(self) -> tuple[str, str, str, str]:
        """What must match for two rows to be compared."""
        return (self.fingerprint, self.build, self.runner, self.workload)

    @property
    def setup_key(self) -> str:
        return hashlib.sha256(json.dumps(self.setup).encode()).hexdigest()[:16]


_META = sa.MetaData()
_ROWS = sa.Table(
    "regress_measurements", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("case_name", sa.String(300), nullable=False, index=True),
    sa.Column("metric", sa.String(8), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("build", sa.String(300), nullable=False),
    sa.Column("runner", sa.String(32), nullable=False),
    sa.Column("workload", sa.Text, nullable=False),
    sa.Column("flags", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("samples", sa.Text, nullable=False),
    sa.Column("median", sa.Float, nullable=False),
    sa.Column("spread", sa.Float, nullable=False),
    sa.Column("host", sa.String(300), nullable=False),
)
_PINS = sa.Table(
    "regress_pins", _META,
    sa.Column("case_name", sa.String(300), primary_key=True),
    sa.Column("metric", sa.String(8), primary_key=True),
    sa.Column("setup_key", sa.String(16), primary_key=True),
    sa.Column("measurement_id", sa.Integer, sa.ForeignKey("regress_measurements.id"), nullable=False),
    sa.Column("pinned_at", sa.DateTime(timezone=True), nullable=False),
)


def history_url(text: str) -> str:
    """--history as a SQLAlchemy URL: a URL as given, or a file path for SQLite (its folder created)."""
    if "://" not in text:
        if mask_url(text) != text:
            raise PlacetuneError(f"--history {mask_url(text)!r} holds a password but no scheme; write the URL in "
                                 "full, e.g. postgresql://USER:PASSWORD@HOST/DB")
        path = Path(text).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    try:
        make_url(text)
    except (ArgumentError, ValueError):
        raise PlacetuneError(f"--history {mask_url(text)!r} is neither a file path nor a database URL") from None
    if (database := sqlite_file(text)) is not None:
        database.expanduser().parent.mkdir(parents=True, exist_ok=True)
    return text


class History:
    """Every measured run of every case, plus pinned baselines, in one SQLAlchemy database."""

    def __init__(self, location: str) -> None:
        self.url = history_url(location)
        self.display = mask_url(self.url)
        try:
            self.engine = sa.create_engine(self.url, **engine_options(self.url))
            _META.create_all(self.engine)
        except (ImportError, SQLAlchemyError) as exc:
            raise PlacetuneError(f"cannot open the history store {self.display}: {first_line(exc, self.url)}") from None

    def add(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.insert(_ROWS), [_to_db(r) for r in rows])

    def rows(self, case: str, metric: str | None = None) -> list[Row]:
        """A case's rows, oldest first."""
        query = sa.select(_ROWS).where(_ROWS.c.case_name == case)
        if metric is not None:
            query = query.where(_ROWS.c.metric == metric)
        with self.engine.connect() as conn:
            return [_from_db(r) for r in conn.execute(query.order_by(_ROWS.c.time, _ROWS.c.id))]

    def cases(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(_ROWS.c.case_name).distinct()).scalars())

    def pin(self, case: str) -> list[Row]:
        """Pin the latest run of `case` as its baseline on that run's machine, build, runner and workload."""
        rows = self.rows(case)
        if not rows:
            known = ", ".join(self.cases()) or "none yet"
            raise PlacetuneError(f"no runs of case {case!r} in {self.display} to pin (cases there: {known})")
        latest = [r for r in rows if r.run_id == rows[-1].run_id]
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            for r in latest:
                conn.execute(sa.delete(_PINS).where(_PINS.c.case_name == case, _PINS.c.metric == r.metric,
                                                    _PINS.c.setup_key == r.setup_key))
                conn.execute(sa.insert(_PINS).values(case_name=case, metric=r.metric, setup_key=r.setup_key,
                                                     measurement_id=r.id, pinned_at=now))
        return latest

    def pinned(self, case: str, metric: str, setup_key: str) -> Row | None:
        query = (sa.select(_ROWS).join(_PINS, _PINS.c.measurement_id == _ROWS.c.id)
                 .where(_PINS.c.case_name == case, _PINS.c.metric == metric, _PINS.c.setup_key == setup_key))
        with self.engine.connect() as conn:
            found = conn.execute(query).first()
        return _from_db(found) if found else None

    def pinned_ids(self, case: str) -> set[int]:
        with self.engine.connect() as conn:
            query = sa.select(_PINS.c.measurement_id).where(_PINS.c.case_name == case)
            return set(conn.execute(query).scalars())

    def close(self) -> None:
        self.engine.dispose()


def _to_db(r: Row) -> dict[str, Any]:
    return {"run_id": r.run_id, "time": r.time, "case_name": r.case, "metric": r.metric,
            "fingerprint": r.fingerprint, "build": r.build, "runner": r.runner, "workload": r.workload,
            "flags": r.flags, "model": r.model, "samples": json.dumps(list(r.samples)), "median": r.median,
            "spread": r.spread, "host": r.host}


def _from_db(rec: Any) -> Row:
    when = rec.time if rec.time.tzinfo else rec.time.replace(tzinfo=UTC)  # SQLite keeps no time zone
    return Row(case=rec.case_name, metric=rec.metric, time=when, run_id=rec.run_id, fingerprint=rec.fingerprint,
               build=rec.build, runner=rec.runner, workload=rec.workload, flags=rec.flags, model=rec.model,
               samples=tuple(json.loads(rec.samples)), median=rec.median, spread=rec.spread, host=rec.host,
               id=rec.id)


# ---------------------------------------------------------------------------------------------
# Builds


# ---------------------------------------------------------------------------------------------
# Judging one metric


@dataclass
class Settings:
    """How a suite is run and judged (the CLI's options)."""

    last: int = 5
    baseline: str = "recent"
    threshold: float = 0.05
    confirm: bool = True
    runner: str = "embedded"
    bin_dir: str | Path | None = None
    rpc: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise PlacetuneError(f"--baseline {self.baseline!r}: choose recent or pinned")
        if self.last < 1:
            raise PlacetuneError(f"--last must be at least 1, got {self.last}")
        if self.threshold < 0:
            raise PlacetuneError("--threshold must not be negative")


@dataclass
class Verdict:
    """A row against its baseline: the ratio of speeds with its interval (placetune.compare), and `limit` T,
    the threshold a real change must also pass: below 1/(1+T) is a drop, above 1+T a gain."""

    status: str
    message: str
    baseline: float | None = None
    ratio: float | None = None
    limit: float | None = None
    comparison: Comparison | None = None

    @property
    def floor(self) -> float:
        return (self.baseline or 0.0) / (1 + (self.limit or 0.0))


def judge(current: Row, previous: Sequence[Row], settings: Settings, pinned: Row | None = None) -> Verdict:
    """Compare a fresh row with its baseline: the last N same-setup runs, or the pinned run.

    With several baseline runs their medians are the baseline's samples, so night-to-night drift counts as
    noise; with one, its repetitions are. A change counts only when `compare` puts it beyond the noise and
    it is larger than the threshold too.
    """
    if settings.baseline == "pinned":
        base = [pinned] if pinned else []
    else:
        base = [r for r in previous if r.setup == current.setup][-settings.last:]
    if not base:
        return Verdict(NO_BASELINE, _why_no_baseline(current, previous, settings))
    reference = [r.median for r in base] if len(base) > 1 else list(base[0].samples)
    c = compare(current.samples, reference)
    limit = settings.threshold
    baseline = float(statistics.geometric_mean([x for x in reference if x > 0]))
    what = f"{current.metric} {current.median:.1f} t/s vs baseline {baseline:.1f} t/s"
    source = "pinned run" if settings.baseline == "pinned" else f"{len(base)} run(s)"
    detail = f"({source}): {c.describe()}"
    if c.verdict == SLOWER and c.ratio < 1 / (1 + limit):
        return Verdict(REGRESSION, f"{what} {detail}, {1 - c.ratio:.1%} slower, beyond the noise and the "
                                   f"{limit:.0%} threshold", baseline, c.ratio, limit, c)
    if c.verdict == FASTER and c.ratio > 1 + limit:
        return Verdict(IMPROVEMENT, f"{what} {detail}, {c.ratio - 1:.1%} faster", baseline, c.ratio, limit, c)
    return Verdict(OK, f"{what} {detail}: not a change beyond the noise and the {limit:.0%} threshold",
                   baseline, c.ratio, limit, c)


_SETUP_NAMES = ("machine", "build", "runner", "workload")


def _why_no_baseline(current: Row, previous: Sequence[Row], settings: Settings) -> str:
    if not previous:
        return "first run: no baseline yet"
    if settings.baseline == "pinned" and any(r.setup == current.setup for r in previous):
        return f"no pinned baseline for this machine and build; pin one with --pin {current.case!r}"
    last = previous[-1]
    new = [name for name, a, b in zip(_SETUP_NAMES, current.setup, last.setup, strict=True) if a != b]
    return f"new {' and '.join(new) or 'setup'}: no baseline yet"


def changes(current: Row, previous: Sequence[Row]) -> list[str]:
    """What differs from the case's previous run: shown next to the row, never compared silently."""
    if not previous:
        return []
    last = previous[-1]
    notes = [f"{name} changed (was {b})" for name, a, b in zip(_SETUP_NAMES, current.setup, last.setup, strict=True)
             if a != b and name != "workload"]
    if current.workload != last.workload:
        notes.append(f"workload changed (was {_short_workload(last.workload)})")
    if current.flags != last.flags:
        notes.append(f"placement changed (was {last.flags or 'llama.cpp defaults'})")
    return notes


def _short_workload(text: str) -> str:
    w = json.loads(text)
    depth = f" d{w['depth']}" if w.get("depth") else ""
    return f"pp{w['n_prompt']} tg{w['n_gen']}{depth} r{w['repetitions']} w{w['warmups']}"


# ---------------------------------------------------------------------------------------------
# Running a suite


@dataclass
class Outcome:
    """One testcase: a case's metric in this run, judged (or the error that kept it from running)."""

    case: str
    metric: str
    status: str
    message: str
    row: Row | None = None
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Report:
    suite: str
    history: str
    machine: Machine
    started: datetime
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """2 when a case could not run (never a pass), else 1 on a regression, else 0."""
        if self.count(ERROR):
            return 2
        return 1 if self.count(REGRESSION) else 0

    def summary(self) -> str:
        parts = [f"{self.count(REGRESSION)} regression(s)", f"{self.count(IMPROVEMENT)} improvement(s)",
                 f"{self.count(ERROR)} error(s)", f"{self.count(OK)} within noise",
                 f"{self.count(NO_BASELINE)} without a baseline"]
        head = {0: "PASS", 1: "REGRESSION", 2: "ERROR"}[self.exit_code]
        return f"{head}: " + ", ".join(parts)


RunnerFactory = Callable[[str], Runner]


def run_suite(cases: Sequence[Case], history: History, settings: Settings, machine: Machine,
              get_runner: RunnerFactory, suite: str = "",
              on_case: Callable[[Case, list[Outcome]], None] | None = None) -> Report:
    """Measure every case, judge each metric against its history, then append the rows."""
    report = Report(suite=suite, history=history.display, machine=machine, started=datetime.now(UTC))
    run_id = uuid.uuid4().hex
    for case in cases:
        outcomes = _run_case(case, history, settings, machine, get_runner, run_id)
        report.outcomes += outcomes
        if on_case:
            on_case(case, outcomes)
    return report


def _run_case(case: Case, history: History, settings: Settings, machine: Machine, get_runner: RunnerFactory,
              run_id: str) -> list[Outcome]:
    started = time.monotonic()

    def failed(message: str) -> list[Outcome]:
        took = time.monotonic() - started
        return [Outcome(case.name, metric, ERROR, f"case {case.name!r}: {message}", seconds=took)
                for metric in case.metrics]

    if case.error:
        return failed(case.error)
    if case.model is None or not case.model.is_file():
        return failed(f"model {case.model} not found; generate or download it, or fix the suite")
    name = case.runner or settings.runner
    try:
        check_buffer_types(case.placement, machine.override_targets)  # before llama.cpp is launched
        runner = get_runner(name)
    except PlacetuneError as exc:
        return failed(str(exc))
    first = runner.measure(case.model, case.placement, case.workload)
    if not first.ok:
        return failed(f"{name} runner: {first.status}: {first.reason}")
    runs = [first]
    previous = {metric: history.rows(case.name, metric) for metric in case.metrics}
    rows = _rows(case, first, machine, name, run_id)
    verdicts = _judge_all(rows, previous, history, settings)
    if settings.confirm and any(v.status == REGRESSION for v in verdicts.values()):
        again = runner.measure(case.model, case.placement, case.workload)
        if not again.ok:
            return failed(f"a drop was seen, but the re-measure to confirm it failed: {again.status}: "
                          f"{again.reason}")
        runs.append(again)
        rows = _rows(case, _combined(first, again), machine, name, run_id)
        verdicts = _judge_all(rows, previous, history, settings)
        for metric, v in verdicts.items():
            medians = [_stats(m, metric).median for m in runs]
            if v.status == REGRESSION and not all(x < v.floor for x in medians):
                verdicts[metric] = replace(v, status=OK, message=f"{v.message}; did not replicate on a "
                                                                 "re-measure, so not counted")
    history.add(list(rows.values()))
    took = time.monotonic() - started
    return [Outcome(case.name, metric, verdicts[metric].status, verdicts[metric].message, rows[metric],
                    verdicts[metric], changes(rows[metric], previous[metric]), took) for metric in rows]


def _judge_all(rows: dict[str, Row], previous: dict[str, list[Row]], history: History,
               settings: Settings) -> dict[str, Verdict]:
    out = {}
    for metric, row in rows.items():
        pinned = history.pinned(row.case, metric, row.setup_key) if settings.baseline == "pinned" else None
        out[metric] = judge(row, previous[metric], settings, pinned)
    return out


def _stats(m: Measurement, metric: str) -> Stats:
    return m.pp if metric == "pp" else m.tg


def _combined(a: Measurement, b: Measurement) -> Measurement:
    return replace(b, pp=Stats(a.pp.samples + b.pp.samples, b.pp.tokens_per_sample),
                   tg=Stats(a.tg.samples + b.tg.samples, b.tg.tokens_per_sample))


def _rows(case: Case, m: Measurement, machine: Machine, runner: str, run_id: str) -> dict[str, Row]:
    workload = {k: v for k, v in case.workload.to_dict().items() if k != "timeout_s"}
    common = dict(case=case.name, time=datetime.now(UTC), run_id=run_id, fingerprint=machine.fingerprint(),
                  build=build_label(m.build), runner=runner, workload=json.dumps(workload, sort_keys=True),
                  flags=render_flags(case.placement), model=str(case.model), host=machine.hostname)
    return {metric: Row(metric=metric, samples=_stats(m, metric).samples, median=_stats(m, metric).median,
                        spread=_stats(m, metric).spread, **common)
            for metric in case.metrics}


# ---------------------------------------------------------------------------------------------
# Reports


def _cells(o: Outcome) -> list[str]:
    """case, metric, t/s, spread, baseline, change, limit, verdict, machine, build, notes."""
    r, v = o.row, o.verdict
    rate = _rate(r.median) if r else "-"
    spread = f"{r.spread:.1%}" if r else "-"
    baseline = _rate(v.baseline) if v and v.baseline else "-"
    change = f"{v.ratio - 1:+.1%}" if v and v.ratio is not None else "-"
    limit = f"±{v.limit:.1%}" if v and v.limit is not None else "-"
    notes = "; ".join(o.notes)
    if o.status in (NO_BASELINE, ERROR) or "replicate" in o.message:
        notes = "; ".join(filter(None, [o.message, notes]))
    return [o.case, o.metric, rate, spread, baseline, change, limit, o.status, r.fingerprint if r else "-",
            r.build if r else "-", notes]


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}"


_COLUMNS = ("case", "metric", "t/s", "spread", "baseline", "change", "limit", "verdict", "machine", "build", "notes")
_STYLES = {REGRESSION: "bold red", ERROR: "bold red", IMPROVEMENT: "green", NO_BASELINE: "dim"}


def report_table(report: Report) -> Table:
    """The run for a terminal: each row names its setup (machine fingerprint and build) in the caption."""
    setups: dict[tuple[str, str], str] = {}
    for o in report.outcomes:
        if o.row is not None:
            setups.setdefault((o.row.fingerprint, o.row.build), chr(ord("A") + len(setups) % 26))
    caption = "; ".join(f"setup {key}: machine {fp}, build {build}" for (fp, build), key in setups.items())
    table = Table(title=f"placetune regress {report.suite}", caption=caption or None, box=box.SIMPLE_HEAD)
    for col in ("case", "metric", "t/s", "baseline", "change", "limit", "verdict", "setup", "notes"):
        table.add_column(col, justify="right" if col in ("t/s", "baseline", "change", "limit") else "left",
                         no_wrap=col != "notes", overflow="fold", ratio=1 if col == "notes" else None)
    for o in report.outcomes:
        case, metric, rate, spread, baseline, change, limit, verdict, _, _, notes = _cells(o)
        setup = setups[(o.row.fingerprint, o.row.build)] if o.row else "-"
        table.add_row(case, metric, f"{rate} ±{spread}" if o.row else rate, baseline, change, limit, verdict, setup,
                      notes, style=_STYLES.get(o.status, ""))
    return table


def markdown(report: Report) -> str:
    """The run as a markdown summary (for a CI job summary or a chat message)."""
    m = report.machine
    lines = [
        f"## placetune regress: {one_line(report.suite)}",
        "",
        f"{report.started:%Y-%m-%d %H:%M} UTC on machine `{m.fingerprint()}` ({one_line(m.cpu_model)}, "
        f"{m.physical_cores} cores, host {one_line(m.hostname)}); history `{one_line(report.history)}`",
        "",
        f"**{report.summary()}**",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---:" if c in ("t/s", "spread", "baseline", "change", "limit") else "---"
                       for c in _COLUMNS) + "|",
    ]
    for o in report.outcomes:
        cells = [md_cell(c) for c in _cells(o)]
        if o.status in (REGRESSION, ERROR):
            cells[7] = f"**{cells[7]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def junit_xml(report: Report) -> ET.ElementTree:
    """One testcase per case and metric: regressions are failures, cases that could not run are errors,
    rows with no comparable baseline are skipped (never a silent pass)."""
    counts = {k: str(report.count(s)) for k, s in (("failures", REGRESSION), ("errors", ERROR),
                                                  ("skipped", NO_BASELINE))}
    total = f"{sum(o.seconds for o in _first_per_case(report.outcomes)):.3f}"
    root = ET.Element("testsuites", name="placetune regress", tests=str(len(report.outcomes)), time=total,
                      **counts)
    suite = ET.SubElement(root, "testsuite", name=report.suite or "placetune regress",
                          tests=str(len(report.outcomes)), time=total, hostname=report.machine.hostname,
                          timestamp=report.started.isoformat(timespec="seconds"), **counts)
    props = ET.SubElement(suite, "properties")
    for key, value in (("fingerprint", report.machine.fingerprint()), ("history", report.history),
                       ("cpu", report.machine.cpu_model)):
        ET.SubElement(props, "property", name=key, value=value)
    for o in report.outcomes:
        case = ET.SubElement(suite, "testcase", classname=o.case, name=o.metric, time=f"{o.seconds:.3f}")
        if o.status == REGRESSION:
            ET.SubElement(case, "failure", message=o.message, type="regression").text = _details(o)
        elif o.status == ERROR:
            ET.SubElement(case, "error", message=o.message, type="error").text = o.message
        elif o.status == NO_BASELINE:
            ET.SubElement(case, "skipped", message=o.message)
        if o.row is not None:
            ET.SubElement(case, "system-out").text = _details(o)
    for element in root.iter():  # case names, messages and the CPU name come from outside
        element.attrib = {k: xml_text(v) for k, v in element.attrib.items()}
        if element.text:
            element.text = xml_text(element.text)
    ET.indent(root)
    return ET.ElementTree(root)


def _first_per_case(outcomes: Sequence[Outcome]) -> list[Outcome]:
    seen: dict[str, Outcome] = {}
    for o in outcomes:
        seen.setdefault(o.case, o)
    return list(seen.values())


def _details(o: Outcome) -> str:
    r = o.row
    if r is None:
        return o.message
    lines = [o.message, f"samples (t/s): {', '.join(f'{s:.2f}' for s in r.samples)}",
             f"machine {r.fingerprint}, build {r.build}, runner {r.runner}, workload {_short_workload(r.workload)}",
             f"model {r.model}", f"flags {r.flags or '(llama.cpp defaults)'}"]
    return "\n".join(lines + o.notes)


def history_table(history: History, case: str) -> Table:
    """`regress --show CASE`: every stored run of a case, oldest first; * marks a pinned baseline."""
    rows = history.rows(case)
    if not rows:
        known = ", ".join(history.cases()) or "none yet"
        raise PlacetuneError(f"no runs of case {case!r} in {history.display} (cases there: {known})")
    pinned = history.pinned_ids(case)
    setups: dict[tuple[str, str, str, str], str] = {}
    for r in rows:
        setups.setdefault(r.setup, chr(ord("A") + len(setups) % 26))
    caption = "\n".join(f"setup {key}: machine {fp}, build {build}, runner {runner}, workload {_short_workload(w)}"
                        for (fp, build, runner, w), key in setups.items())
    table = Table(title=f"history of {case} ({history.display})", caption=caption, box=box.SIMPLE_HEAD)
    for col in ("time (UTC)", "metric", "t/s", "n", "setup", "flags", "pin"):
        table.add_column(col, justify="right" if col in ("t/s", "n") else "left", no_wrap=col != "flags")
    for r in rows:
        table.add_row(f"{r.time:%Y-%m-%d %H:%M:%S}", r.metric, f"{_rate(r.median)} ±{r.spread:.1%}",
                      str(len(r.samples)), setups[r.setup], r.flags or "(defaults)", "*" if r.id in pinned else "")
    return table


def regress(suite: Path, history: str, settings: Settings,
            on_case: Callable[[Case, list[Outcome]], None] | None = None) -> Report:
    """Load the suite, probe this machine, run every case, and append the results to the history."""
    from placetune.hardware import probe_machine
    from placetune.runners import get_runner

    cases = load_suite(suite)
    store = History(history)
    try:
        machine = probe_machine(settings.rpc, settings.runner, settings.bin_dir)
        runners: dict[str, Runner] = {}

        def runner_for(name: str) -> Runner:
            if name not in runners:
                runners[name] = get_runner(name, bin_dir=settings.bin_dir, rpc=settings.rpc)
            return runners[name]

        return run_suite(cases, store, settings, machine, runner_for, suite=str(suite), on_case=on_case)
    finally:
        store.close()
