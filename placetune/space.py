"""Search spaces: the TOML files in search_spaces/, their validation, and trial parameters -> Placement.

A space file lists dimensions under [params.NAME]: either `choices = [...]` or `type = "int"` with
`low`/`high` (inclusive) and an optional `step`. Bounds may name a fact of the model or machine:
n_layers, n_gpu_layers_max (= n_layers + 1, the output head included), n_moe_layers, physical_cores.
Only the parameter names in PARAMS exist; each maps to one Placement field or expert-rule choice.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from placetune.anatomy import Anatomy, Group
from placetune.errors import PlacetuneError
from placetune.placement import FLASH_ATTN, KV_TYPES, LOAD_MODES, ExpertRule, Placement

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
FACTS = ("n_layers", "n_gpu_layers_max", "n_moe_layers", "physical_cores")

# name -> (allowed values or None for "any positive int", help)
PARAMS: dict[str, tuple[tuple[Any, ...] | None, str]] = {
    "n_gpu_layers": (None, "layers on the accelerator (-ngl); n_gpu_layers_max puts the output head there too"),
    "cpu_moe_layers": (None, "how many MoE layers keep their routed experts in system RAM"),
    "cpu_moe_position": (("first", "last", "block"), "which MoE layers: the first N, the last N, or a block"),
    "cpu_moe_start": (None, "first MoE layer of the block when cpu_moe_position = block"),
    "cpu_moe_kinds": (("all", "gate_up", "down"), "which expert tensors of those layers go to RAM"),
    "threads": (None, "-t"),
    "batch": (None, "-b"),
    "ubatch": (None, "-ub"),
    "flash_attn": (FLASH_ATTN, "-fa"),
    "cache_type_k": (KV_TYPES, "-ctk"),
    "cache_type_v": (KV_TYPES, "-ctv"),
    "load_mode": (LOAD_MODES, "-lm (none = --no-mmap)"),
    "no_op_offload": ((False, True), "--no-op-offload"),
    "repack": ((False, True), "--repack / --no-repack"),
    "ctx": (None, "-c, the context size the KV cache is sized for"),
}
_KIND_SETS = {"all": ("gate", "up", "down", "gate_up"), "gate_up": ("gate", "up", "gate_up"), "down": ("down",)}


@dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple[Any, ...] | None = None
    low: int | str | None = None
    high: int | str | None = None
    step: int = 1


@dataclass
class SearchSpace:
    """Dimensions to search and parameters pinned to one value."""

    name: str
    description: str
    dimensions: list[Dimension]
    pinned: dict[str, Any] = field(default_factory=dict)

    def pin(self, name: str, raw: str) -> None:
        """`--set name=value`: fix a parameter (it need not be in the file)."""
        if name not in PARAMS:
            raise PlacetuneError(f"--set {name}: unknown parameter; known: {', '.join(PARAMS)}")
        self.pinned[name] = _check_value(name, _coerce(raw), f"--set {name}")
        self.dimensions = [d for d in self.dimensions if d.name != name]

    def bounds(self, dim: Dimension, facts: dict[str, int]) -> tuple[int, int]:
        low, high = (_resolve(v, facts, dim.name) for v in (dim.low, dim.high))
        return low, max(low, high)

    def suggest(self, trial: optuna.Trial, facts: dict[str, int]) -> dict[str, Any]:
        """Sample a trial's parameters (cpu_moe_start only when the position is a block)."""
        params: dict[str, Any] = dict(self.pinned)
        for dim in self.dimensions:
            if dim.name == "cpu_moe_start" and params.get("cpu_moe_position") != "block":
                continue
            if dim.name in ("cpu_moe_position", "cpu_moe_kinds", "cpu_moe_start") and not params.get("cpu_moe_layers"):
                continue
            if dim.choices is not None:
                params[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
            else:
                low, high = self.bounds(dim, facts)
                params[dim.name] = trial.suggest_int(dim.name, low, high, step=dim.step)
        return params

    def outside(self, params: dict[str, Any], facts: dict[str, int]) -> list[str]:
        """The names of a seed's parameters that this space cannot take (Optuna refuses those)."""
        bad = []
        for dim in self.dimensions:
            if dim.name not in params:
                continue
            value = params[dim.name]
            if dim.choices is not None:
                inside = value in dim.choices
            else:
                low, high = self.bounds(dim, facts)
                inside = low <= value <= high and not (value - low) % dim.step
            if not inside:
                bad.append(dim.name)
        return bad + [k for k, v in params.items() if k in self.pinned and self.pinned[k] != v]

    def dimension_names(self) -> list[str]:
        return [d.name for d in self.dimensions]


def _coerce(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(raw)
    except ValueError:
        return raw


def _check_value(name: str, value: Any, where: str) -> Any:
    allowed, _ = PARAMS[name]
    if allowed is not None:
        if value not in allowed:
            raise PlacetuneError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlacetuneError(f"{where}: {value!r} must be a whole number >= 0")
    return value


def _resolve(value: int | str | None, facts: dict[str, int], name: str) -> int:
    if isinstance(value, int):
        return value
    if value in facts:
        return facts[value]
    raise PlacetuneError(f"[params.{name}]: bound {value!r} is neither a number nor one of {', '.join(FACTS)}")


def load_space(path: Path) -> SearchSpace:
    """Read and validate a space file; any bad key or value is reported in one line."""
    if not path.exists():
        raise PlacetuneError(f"search space {path} not found; pass a .toml file or one of {', '.join(list_spaces())}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PlacetuneError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"description", "params"}
    if unknown:
        raise PlacetuneError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected description and [params.*]")
    dims = []
    for name, spec in data.get("params", {}).items():
        where = f"{path.name} [params.{name}]"
        if name not in PARAMS:
            raise PlacetuneError(f"{where}: unknown parameter; known: {', '.join(PARAMS)}")
        if not isinstance(spec, dict):
            raise PlacetuneError(f"{where}: must be a table with choices = [...] or type/low/high")
        bad = set(spec) - {"choices", "type", "low", "high", "step", "help"}
        if bad:
            raise PlacetuneError(f"{where}: unknown key(s) {sorted(bad)}; use choices, or type/low/high/step")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise PlacetuneError(f"{where}: choices must be a non-empty list")
            dims.append(Dimension(name, tuple(_check_value(name, c, where) for c in choices)))
        elif spec.get("type") == "int":
            if PARAMS[name][0] is not None:
                raise PlacetuneError(f"{where}: takes choices = [...] from {', '.join(map(str, PARAMS[name][0]))}")
            for key in ("low", "high"):
                v = spec.get(key)
                if not (isinstance(v, int) and v >= 0) and v not in FACTS:
                    raise PlacetuneError(f"{where}: {key} = {v!r} must be a whole number or one of {', '.join(FACTS)}")
            step = spec.get("step", 1)
            if not isinstance(step, int) or step < 1:
                raise PlacetuneError(f"{where}: step must be a whole number >= 1")
            dims.append(Dimension(name, None, spec["low"], spec["high"], step))
        else:
            raise PlacetuneError(f"{where}: give choices = [...] or type = \"int\" with low and high")
    if not dims:
        raise PlacetuneError(f"{path}: no [params.*] dimensions to search")
    return SearchSpace(path.stem, str(data.get("description", "")), dims)


def list_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.toml"))


def resolve_space(arg: str | None, anatomy: Anatomy, has_accelerator: bool) -> SearchSpace:
    """The user's file or built-in name, else moe/dense by model and cpu when there is no accelerator."""
    if arg:
        path = Path(arg)
        if not path.suffix:
            path = SPACES_DIR / f"{arg}.toml"
        return load_space(path)
    name = "cpu" if not has_accelerator else "moe" if anatomy.facts.is_moe else "dense"
    return load_space(SPACES_DIR / f"{name}.toml")


def moe_layers(anatomy: Anatomy) -> list[int]:
    """Layers that hold routed experts (leading dense layers have none)."""
    return sorted({t.layer for t in anatomy.tensors if t.group is Group.EXPERT and t.layer is not None})


def facts_for(anatomy: Anatomy, physical_cores: int) -> dict[str, int]:
    n = anatomy.facts.n_layers
    return {"n_layers": n, "n_gpu_layers_max": n + 1, "n_moe_layers": len(moe_layers(anatomy)),
            "physical_cores": physical_cores}


def to_placement(params: dict[str, Any], anatomy: Anatomy) -> Placement:
    """Trial parameters -> the Placement llama.cpp will be given."""
    overrides: tuple[ExpertRule, ...] = ()
    n_cpu = int(params.get("cpu_moe_layers") or 0)
    layers = moe_layers(anatomy)
    if n_cpu and layers:
        n_cpu = min(n_cpu, len(layers))
        position = params.get("cpu_moe_position", "first")
        if position == "last":
            chosen = layers[-n_cpu:]
        elif position == "block":
            start = min(int(params.get("cpu_moe_start", 0)), len(layers) - n_cpu)
            chosen = layers[start : start + n_cpu]
        else:
            chosen = layers[:n_cpu]
        # Layers not offloaded keep their experts in RAM anyway: a rule for them changes nothing, and
        # dropping it lets identical placements be recognised (and measured once).
        ngl = params.get("n_gpu_layers")
        if ngl is not None:
            first_offloaded = anatomy.facts.n_layers + 1 - int(ngl)
            chosen = [layer for layer in chosen if layer >= first_offloaded]
        kinds = _KIND_SETS[params.get("cpu_moe_kinds", "all")]
        # With all kinds and the first N layers this is exactly --n-cpu-moe N (biases included).
        all_kinds = kinds == _KIND_SETS["all"]
        if chosen:
            overrides = (ExpertRule(layers=tuple(chosen), kinds=kinds, buft="CPU", include_bias=all_kinds),)
    knobs = {k: params[k] for k in ("n_gpu_layers", "threads", "batch", "ubatch", "flash_attn", "cache_type_k",
                                     "cache_type_v", "load_mode", "repack", "ctx") if k in params}
    return Placement(overrides=overrides, no_op_offload=bool(params.get("no_op_offload", False)), **knobs)
