"""`placetune shootout`: placetune's winner against llama.cpp's own answers, on equal terms.

The contenders a user would ask about: llama.cpp out of the box (-c only: --fit on), llama-fit-params'
answer as printed, -ngl all --cpu-moe, the best --n-cpu-moe N (first N layers) and the same sweep with
the last N layers (ik_llama.cpp's semantics), placetune's winner (from a best.json, or a search run
here), and any line the user gives. They are measured interleaved (A B C ... A B C ...) with one
runner, at every depth asked for, and compared with placetune's winner through placetune.compare.

Equal memory for everyone: on a CUDA device a --budget is enforced by holding back the rest of the
card (holdback.py), so llama.cpp's own placements see the same card as placetune. Other devices
(RPC) cannot be held back: there --fit gets the budget as its margin (-fitt), and a fixed line the
memory model says cannot fit is reported as not fitting instead of being given more memory.

Every measurement is written to a journal as it is taken, so a shootout stopped by a deadline (the GPU
kit's 10-minute calls) or a crash resumes where it stopped with --resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from placetune.anatomy import Anatomy
from placetune.budgets import MIB, fit_margins
from placetune.compare import Comparison, Estimate, compare, estimate, latency_rates
from placetune.errors import PlacetuneError, read_user_text
from placetune.escape import md_cell, one_line
from placetune.fit import FitUnavailable, fit_params
from placetune.hardware import Machine, probe_gpus
from placetune.holdback import held_back
from placetune.memory import DEFAULT_MARGIN, check_fit, predict_memory
from placetune.monotone import first_true
from placetune.placement import ALL_LAYERS, ExpertRule, Placement, parse_flags, render_flags
from placetune.runners.base import Measurement, Runner, Stats, Workload
from placetune.runners.llama_bench import FIT_MARGIN_MIB
from placetune.search.config import Serving
from placetune.space import moe_layers

SWEEP_POINTS = (0, 1, 2, 4, 8)  # --n-cpu-moe N0 + these, N0 the fewest expert layers in RAM that fit
OUT_OF_THE_BOX = "llama.cpp out of the box (-c only, --fit on)"
JOURNAL = "shootout.journal.jsonl"


@dataclass
class Entry:
    """One contender: its name, the placement it runs (None: llama.cpp places it, --fit on), and where it
    came from."""

    name: str
    placement: Placement | None
    source: str
    fit_on: bool = False
    by_llama_cpp: bool = False  # llama.cpp's own answer: judged by what it allocates, not by placetune's model
    status: str = "ok"
    reason: str = ""
    runs: dict[int, list[Measurement]] = field(default_factory=dict)  # depth -> final-round measurements

    @property
    def flags(self) -> str:
        return "(-c only; llama.cpp places the tensors)" if self.fit_on else render_flags(self.placement or Placement())

    def samples(self, depth: int, metric: str) -> list[float]:
        """Its speed samples at a depth; none once it failed or went over a budget anywhere (a contender that
        needed more memory than the others had is not a result, whatever it measured before that showed)."""
        if self.status != "ok":
            return []
        return [x for m in self.runs.get(depth, []) if m.ok for x in getattr(m, metric).samples]


@dataclass
class ShootoutConfig:
    """What one shootout measures, with which runner, on how much memory."""

    model: Path
    anatomy: Anatomy
    machine: Machine
    workload: Workload  # depth 0; each depth in `depths` gets a copy
    depths: tuple[int, ...]
    serving: Serving
    runner: Runner
    fit_runner: Runner | None  # the same runner with --fit on; None where the runner cannot run --fit
    budgets: dict[str, int]
    rpc: Sequence[str] = ()
    bin_dir: Path | None = None
    rounds: int = 2
    lines: Sequence[tuple[str, Placement]] = ()
    winner: tuple[str, Placement] | None = None
    journal: Path | None = None  # every measurement as it is taken (None: not kept)
    resume: bool = False  # take the journal's measurements instead of measuring them again

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self.machine.accelerators]

    def at_depth(self, depth: int) -> Workload:
        return replace(self.workload, depth=depth)

    def capacity(self) -> dict[str, int]:
        cap = {d.name: d.free_bytes for d in self.machine.accelerators}
        cap["CPU"] = self.machine.ram_total_bytes
        cap.update(self.budgets)
        return cap


def fits(c: ShootoutConfig, placement: Placement) -> tuple[bool, str]:
    """The memory model's verdict for a fixed line, at the serving context, within the budgets."""
    need = predict_memory(c.anatomy, placement, c.devices, placement.ctx or c.serving.ctx,
                          n_seq=placement.parallel or 1)
    verdict = check_fit(need, c.capacity(), DEFAULT_MARGIN, budgeted=set(c.budgets))
    return verdict.fits, "; ".join(verdict.reasons)


def fixed(c: ShootoutConfig, placement: Placement) -> Placement:
    """A line as the shootout runs it: in the serving context unless it names its own."""
    return placement if placement.ctx else c.serving.apply(placement)


def first_n(c: ShootoutConfig, n: int, position: str) -> Placement:
    """-ngl all with the experts of the first (llama.cpp's --n-cpu-moe) or the last n MoE layers in RAM."""
    layers = moe_layers(c.anatomy)
    chosen = layers[:n] if position == "first" else layers[len(layers) - n:]
    overrides = (ExpertRule(layers=tuple(chosen)),) if n else ()
    return c.serving.apply(Placement(n_gpu_layers=ALL_LAYERS, overrides=overrides))


def sweep_range(c: ShootoutConfig, position: str) -> list[int]:
    """Expert layers in RAM worth measuring: the fewest that fit (by the memory model) and a few more."""
    layers = moe_layers(c.anatomy)
    low = first_true(lambda n: fits(c, first_n(c, n, position))[0], 0, len(layers))
    if low is None:
        return []
    return sorted({min(low + k, len(layers)) for k in SWEEP_POINTS})


def latency_s(m: Measurement, w: Workload) -> float:
    rates = latency_rates(m.pp.samples, m.tg.samples, w.n_prompt, w.n_gen)
    return 1 / float(np.median(rates)) if rates else math.inf


def fit_params_margins(machine: Machine, budgets: dict[str, int], held: set[str]) -> list[int]:
    """--fit's and llama-fit-params' -fitt margins (MiB), one per device in llama.cpp's device order.

    A held-back card already is the budget's size, and a card without a budget is as the user has it, so
    both get llama.cpp's own default margin; on a budgeted card that cannot be held back the budget becomes
    the margin (free memory minus the budget).
    """
    free = [(d.name, d.free_bytes) for d in machine.accelerators]
    kept = {dev: size for dev, size in budgets.items() if dev not in held}
    margins = fit_margins(free, kept, FIT_MARGIN_MIB * MIB)
    return [FIT_MARGIN_MIB if name in held else margin for (name, _), margin in zip(free, margins, strict=True)]


def held_devices(machine: Machine, budgets: dict[str, int]) -> set[str]:
    """The budgeted CUDA cards, which `equal_memory` holds back to their budget."""
    return {f"CUDA{g.index}" for g in machine.gpus} & set(budgets)


def contenders(c: ShootoutConfig, measure_once: Callable[[Placement], Measurement],
               notes: list[str], held: set[str] | None = None) -> list[Entry]:
    """Every contender, sweeps measured (once each, at the first depth) to pick their best N."""
    entries: list[Entry] = []
    if c.winner is not None:
        name, placement = c.winner
        entries.append(Entry(name, fixed(c, placement), "placetune"))
    if not c.devices:
        notes.append("no accelerator here: every contender keeps everything on the CPU, so placement barely "
                     "matters and the rows differ by knobs and noise")
    if c.fit_runner is not None:
        entries.append(Entry(OUT_OF_THE_BOX, c.serving.apply(Placement()), "llama.cpp's own --fit", fit_on=True,
                             by_llama_cpp=True))
    elif c.devices:
        notes.append("the embedded runner cannot run --fit; llama-fit-params' answer below is what it places")
    if c.devices:
        try:
            answer = fit_params(c.model, fit_params_margins(c.machine, c.budgets, held or set()), c.serving.ctx, 1,
                                rpc=c.rpc, bin_dir=c.bin_dir)
            entries.append(Entry("llama-fit-params' answer", c.serving.apply(answer.placement),
                                 f"printed: {answer.line}", by_llama_cpp=True))
        except FitUnavailable as exc:
            notes.append(f"no llama-fit-params row: {exc}")
        if moe_layers(c.anatomy):
            entries.append(Entry("-ngl all --cpu-moe", c.serving.apply(
                Placement(n_gpu_layers=ALL_LAYERS, overrides=(ExpertRule(layers=None),))), "by hand"))
            for position, label in (("first", "--n-cpu-moe N"), ("last", "last N layers' experts in RAM")):
                best = _sweep(c, position, label, measure_once, notes)
                if best is not None:
                    entries.append(best)
    for name, placement in c.lines:
        entries.append(Entry(name, fixed(c, placement), "--line"))
    return _one_per_placement(entries)


def _sweep(c: ShootoutConfig, position: str, label: str, measure_once: Callable[[Placement], Measurement],
           notes: list[str]) -> Entry | None:
    points = sweep_range(c, position)
    if not points:
        notes.append(f"no {label} fits the budget, not even with every expert in RAM")
        return None
    tried = []
    for n in points:
        m = measure_once(first_n(c, n, position))
        if m.ok:
            tried.append((latency_s(m, c.at_depth(c.depths[0])), n))
    if not tried:
        notes.append(f"every {label} point failed ({', '.join(map(str, points))})")
        return None
    _, n = min(tried)
    name = f"best --n-cpu-moe {n}" if position == "first" else f"best last {n} layers' experts in RAM"
    return Entry(name, first_n(c, n, position), f"sweep of N = {', '.join(map(str, points))} (one run each)")


def _one_per_placement(entries: list[Entry]) -> list[Entry]:
    out: dict[str, Entry] = {}
    for e in entries:
        key = "fit-on" if e.fit_on else render_flags(e.placement or Placement())
        if key in out:
            out[key].name += f" = {e.name}"
        else:
            out[key] = e
    return list(out.values())


@contextmanager
def equal_memory(c: ShootoutConfig, notes: list[str]) -> Iterator[set[str]]:
    """Hold back every budgeted CUDA device to its budget for the whole run; say what cannot be held.

    Yields the devices held back; on the others the budget is checked against what llama.cpp allocated.
    """
    held: set[str] = set()
    with ExitStack() as stack:
        gpus = {f"CUDA{g.index}": g for g in probe_gpus()}
        for dev, budget in c.budgets.items():
            if dev in gpus:
                g = gpus[dev]
                stack.enter_context(held_back(g.free_bytes - budget, g.index))
                held.add(dev)
                notes.append(f"{dev}: held back {(g.free_bytes - budget) / 2**30:.1f} GiB, so every contender "
                             f"sees {budget / 2**30:.1f} GiB")
            elif dev != "CPU":
                notes.append(f"{dev} cannot be held back: --fit gets the budget as its margin, and a line for "
                             "which llama.cpp allocates more than the budget there is reported as not fitting")
        yield held


def over_budget(c: ShootoutConfig, m: Measurement, held: set[str]) -> str:
    """Why a run used more than a budget that could not be held back (from llama.cpp's own buffer sizes)."""
    for dev, budget in c.budgets.items():
        if dev in held or dev == "CPU":
            continue
        used = sum(sizes.get(dev, 0) for sizes in m.reported.values())
        if used > budget:
            return f"llama.cpp allocated {used / 2**20:.2f} MiB on {dev}, over its {budget / 2**20:.2f} MiB budget"
    return ""


class Journal:
    """Every measurement of a shootout, written as it is taken, so that a stopped run resumes where it stopped.

    The first line names what the measurements mean (model, workload, budgets, runner, machine); a journal
    written with other settings is refused instead of mixed in. Each later line is one measurement under a
    key naming what was measured (a sweep point, or a contender's round at a depth).
    """

    def __init__(self, c: ShootoutConfig) -> None:
        self.path = c.journal
        self.identity = {"model": str(c.model), "header_hash": c.anatomy.header_hash,
                         "workload": {k: v for k, v in c.workload.to_dict().items() if k != "timeout_s"},
                         "budgets": c.budgets, "runner": c.runner.name, "machine": c.machine.fingerprint()}
        self.done: dict[str, Measurement] = {}
        if self.path is None:
            return
        if c.resume and self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.identity) + "\n", encoding="utf-8")

    def _load(self) -> None:
        assert self.path is not None
        lines = read_user_text(self.path, "a shootout journal, or drop --resume").splitlines()
        head = json.loads(lines[0]) if lines else {}
        changed = sorted(k for k in self.identity if head.get(k) != self.identity[k])
        if changed:
            raise PlacetuneError(f"--resume: {self.path} was measured with another {', '.join(changed)}; "
                                 "drop --resume to start over, or give another --out")
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                break
            self.done[record["key"]] = Measurement.from_dict(record["measurement"])
            kept.append(line)
        self.path.write_text("\n".join(kept) + "\n", encoding="utf-8")

    def measure(self, key: str, take: Callable[[], Measurement]) -> tuple[Measurement, bool]:
        """The journal's measurement under key, else a new one (written at once); True when it came from the
        journal."""
        if key in self.done:
            return self.done[key], True
        m = take()
        self.done[key] = m
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "measurement": m.to_dict()}) + "\n")
        return m, False


def run(c: ShootoutConfig, on_progress: Callable[[str], None] | None = None) -> ShootoutResult:
    """Pick the contenders, then measure them interleaved at each depth for `rounds` rounds."""
    say = on_progress or (lambda _: None)
    notes: list[str] = []
    journal = Journal(c)
    if journal.done:
        notes.append(f"resumed: {len(journal.done)} measurement(s) taken from {c.journal}")
    with equal_memory(c, notes) as held:
        def measure_once(placement: Placement) -> Measurement:
            w = c.at_depth(c.depths[0])
            m, kept = journal.measure(f"sweep at depth {w.depth}: {render_flags(placement)}",
                                      lambda: c.runner.measure(c.model, placement, w))
            say(f"sweep {render_flags(placement)} -> "
                + (f"{latency_s(m, w):.3f} s per request" if m.ok else f"{m.status}")
                + (" (journal)" if kept else ""))
            return m

        entries = contenders(c, measure_once, notes, held)
        for e in entries:  # a fixed line the memory model says cannot fit is not given more memory
            if not e.by_llama_cpp and e.placement is not None:
                ok, why = fits(c, e.placement)
                if not ok:
                    e.status, e.reason = "does not fit", f"predicted not to fit: {why}"
        for depth in c.depths:
            w = c.at_depth(depth)
            for r in range(c.rounds):
                for e in entries:
                    if e.status != "ok":
                        continue
                    runner = c.fit_runner if e.fit_on else c.runner
                    assert runner is not None
                    placement = e.placement or Placement()
                    what = ("--fit on " if e.fit_on else "") + render_flags(placement)
                    m, kept = journal.measure(f"round {r + 1} at depth {depth}: {what}",
                                              lambda runner=runner, placement=placement, w=w:
                                              runner.measure(c.model, placement, w))
                    e.runs.setdefault(depth, []).append(m)
                    over = over_budget(c, m, held)
                    if not m.ok or over:
                        e.status = "does not fit" if m.status == "oom" or over else m.status
                        e.reason = over or m.reason
                    say(f"depth {depth} round {r + 1}: {e.name} -> "
                        + (f"pp {m.pp.median:.1f} tg {m.tg.median:.1f}" if m.ok else f"{m.status}: {m.reason}")
                        + (" (journal)" if kept else ""))
    return ShootoutResult(c, entries, notes)


@dataclass
class Row:
    """One contender at one depth against the reference (placetune's winner, else the fastest)."""

    name: str
    flags: str
    source: str
    status: str
    reason: str
    pp: Stats | None
    tg: Stats | None
    latency_s: float | None
    vs_reference: Comparison | None
    intervals: dict[str, Estimate] = field(default_factory=dict)  # pp, tg (t/s) and latency (s), 95%

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "flags": self.flags, "source": self.source, "status": self.status,
                "reason": self.reason, "pp": self.pp.to_dict() if self.pp else None,
                "tg": self.tg.to_dict() if self.tg else None, "latency_s": self.latency_s,
                "intervals": {k: asdict(v) for k, v in self.intervals.items()},
                "vs_reference": self.vs_reference.to_dict() if self.vs_reference else None}


@dataclass
class ShootoutResult:
    config: ShootoutConfig
    entries: list[Entry]
    notes: list[str]

    def reference(self, depth: int) -> Entry | None:
        """placetune's winner when it ran, else the contender with the shortest requests at this depth."""
        measured = [e for e in self.entries if e.samples(depth, "pp")]  # none once a contender failed
        placetune = [e for e in measured if e.source == "placetune"]
        if placetune:
            return placetune[0]
        return max(measured, key=lambda e: float(np.median(self._rates(e, depth))), default=None)

    def _rates(self, e: Entry, depth: int) -> list[float]:
        w = self.config.at_depth(depth)
        return latency_rates(e.samples(depth, "pp"), e.samples(depth, "tg"), w.n_prompt, w.n_gen)

    def rows(self, depth: int) -> list[Row]:
        w = self.config.at_depth(depth)
        ref = self.reference(depth)
        out = []
        for e in self.entries:
            pp, tg = e.samples(depth, "pp"), e.samples(depth, "tg")
            rates = self._rates(e, depth)
            vs = compare(self._rates(ref, depth), rates) if ref is not None and rates and e is not ref else None
            intervals = {k: v for k, v in (("pp", estimate(pp)), ("tg", estimate(tg)),
                                           ("latency", estimate(rates).inverse())) if v.n}
            out.append(Row(e.name, e.flags, e.source, e.status, e.reason,
                           Stats(tuple(pp), w.n_prompt) if pp else None, Stats(tuple(tg), w.n_gen) if tg else None,
                           1 / float(np.median(rates)) if rates else None, vs, intervals))
        return out

    def records(self) -> Iterator[dict[str, Any]]:
        """The raw measurements, one JSON object each (shootout.jsonl)."""
        for e in self.entries:
            for depth, runs in e.runs.items():
                for i, m in enumerate(runs):
                    yield {"contender": e.name, "source": e.source, "flags": e.flags, "depth": depth, "round": i + 1,
                           "contender_status": e.status, "contender_reason": e.reason,
                           "runner": m.runner, "status": m.status, "reason": m.reason,
                           "pp_samples": list(m.pp.samples), "tg_samples": list(m.tg.samples),
                           "command": m.command, "build": m.build.get("id"), "reported": m.reported}

    def summary(self, machine_label: str) -> dict[str, Any]:
        """shootout.json: the tables as data (every row against the reference at each depth), for reports."""
        c = self.config
        return {"model": str(c.model), "machine": machine_label, "runner": c.runner.name,
                "workload": c.workload.to_dict(), "serving": c.serving.to_dict(), "budgets": c.budgets,
                "rounds": c.rounds, "notes": self.notes,
                "depths": [{"depth": d, "reference": ref.name if (ref := self.reference(d)) else None,
                            "rows": [r.to_dict() for r in self.rows(d)]} for d in c.depths]}

    def markdown(self, machine_label: str) -> str:
        """shootout.md: one table per depth, every figure and every ratio with its 95% interval."""
        c = self.config
        w = c.workload
        lines = [f"# placetune shootout: {one_line(c.model.name)}", "",
                 f"Machine: {one_line(machine_label)}. Runner: {c.runner.name}. Serving context: -c {c.serving.ctx} "
                 f"-np {c.serving.slots}. Workload: pp{w.n_prompt} + tg{w.n_gen}, {w.repetitions} repetitions after "
                 f"{w.warmups} warm-up(s), {c.rounds} interleaved round(s) per depth. Budgets: "
                 f"{', '.join(f'{k}={v / 2**30:.2f} GiB' for k, v in c.budgets.items()) or 'none'}.", ""]
        lines += [f"- {one_line(n)}" for n in self.notes] + [""] if self.notes else []
        for depth in c.depths:
            ref = self.reference(depth)
            lines += [f"## depth {depth}", "",
                      f"Ratios are {one_line(ref.name) if ref else 'the reference'}'s requests per second over each "
                      "row's, "
                      "with the 95% interval (placetune.compare): 'faster' means the reference is faster than that "
                      "row beyond the noise. Each speed is the geometric mean of its samples with its 95% interval.",
                      "",
                      "| contender | flags | pp t/s | tg t/s | s per request | reference/this |",
                      "|---|---|---:|---:|---:|---|"]
            for r in self.rows(depth):
                pp = r.intervals["pp"].describe() if "pp" in r.intervals else r.status
                tg = r.intervals["tg"].describe() if "tg" in r.intervals else ""
                latency = r.intervals.get("latency")
                lat = latency.describe(_digits(latency.center)) if latency else ""
                vs = r.vs_reference.describe() if r.vs_reference else ("reference" if ref and r.name == ref.name
                                                                         else r.reason)
                lines.append(f"| {md_cell(r.name)} | `{md_cell(r.flags)}` | {pp} | {tg} | {lat} | {md_cell(vs)} |")
            lines.append("")
        return "\n".join(lines)


def _digits(seconds: float) -> int:
    """Decimals that show a request time to about three significant figures (0.002 s on a tiny model)."""
    if not math.isfinite(seconds) or seconds <= 0:
        return 3
    return max(1, 2 - math.floor(math.log10(seconds)))


def write(result: ShootoutResult, out: Path, machine_label: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "shootout.md", "raw": out / "shootout.jsonl", "summary": out / "shootout.json"}
    paths["markdown"].write_text(result.markdown(machine_label) + "\n", encoding="utf-8")
    paths["summary"].write_text(json.dumps(result.summary(machine_label), indent=1) + "\n", encoding="utf-8")
    with open(paths["raw"], "w", encoding="utf-8") as fh:
        for record in result.records():
            fh.write(json.dumps(record) + "\n")
    return paths


def parse_line(text: str, rpc: Sequence[str] = ()) -> tuple[str, Placement]:
    """--line NAME='FLAGS' -> (name, placement), parsed before anything is measured so a typo costs no sweep."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise PlacetuneError(f"--line {text!r}: write it as NAME='FLAGS', e.g. --line mine='-ngl 99 --n-cpu-moe 20'")
    return name.strip(), parse_flags(flags, rpc=rpc)
