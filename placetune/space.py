"""Search spaces: the TOML files shipped in placetune/search_spaces/, validated as typed records, and trial
parameters -> Placement.

A space file lists dimensions under [params.NAME]: either `choices = [...]` or `type = "int"` with
`low`/`high` (inclusive) and an optional `step`. Bounds may name a fact of the model or machine:
n_layers, n_gpu_layers_max (= n_layers + 1, the output head included), n_moe_layers, physical_cores.
Only the parameter names in PARAMS exist; each maps to one Placement field or expert-rule choice.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from placetune.anatomy import Anatomy, Group
from placetune.device_bytes import layer_devices
from placetune.errors import PlacetuneError, read_user_text
from placetune.placement import FLASH_ATTN, KV_TYPES, LOAD_MODES, ExpertRule, Placement
from placetune.records import one_line_error

SPACES_PACKAGE = "placetune.search_spaces"
FACTS = ("n_layers", "n_gpu_layers_max", "n_moe_layers", "physical_cores")

# name -> (allowed values or None for "any whole number >= 0", help)
PARAMS: dict[str, tuple[tuple[Any, ...] | None, str]] = {
    "n_gpu_layers": (None, "layers on the accelerator (-ngl); n_gpu_layers_max puts the output head there too"),
    "cpu_moe_layers": (None, "how many MoE layers keep their routed experts in system RAM"),
    "cpu_moe_position": (("first", "last", "block", "interleaved"),
                         "which MoE layers: the first N, the last N, a block, or every k-th layer"),
    "cpu_moe_start": (None, "first MoE layer of the block, or of the interleaved set"),
    "cpu_moe_stride": (None, "k when cpu_moe_position = interleaved: every k-th MoE layer from cpu_moe_start"),
    "cpu_moe_kinds": (("all", "gate_up", "down"), "which expert tensors of those layers go to RAM"),
    "experts_to": (("CPU", "next"), "where those layers' experts go: RAM, or the next accelerator (several devices)"),
    "split_first": (None, "tenths of the offloaded layers on the first accelerator; the others share the rest (-ts)"),
    "threads": (None, "-t"),
    "batch": (None, "-b"),
    "ubatch": (None, "-ub"),
    "flash_attn": (FLASH_ATTN, "-fa"),
    "cache_type_k": (KV_TYPES, "-ctk"),
    "cache_type_v": (KV_TYPES, "-ctv"),
    "load_mode": (LOAD_MODES, "-lm (none = --no-mmap)"),
    "no_op_offload": ((False, True), "--no-op-offload"),
    "repack": ((False, True), "--repack / --no-repack"),
}
ENV_PREFIX = "env:"  # a backend environment knob's dimension name: env:GGML_OP_OFFLOAD_MIN_BATCH
_POSITIVE = {"threads", "batch", "ubatch", "cpu_moe_stride", "split_first"}  # 0 would mean nothing to llama.cpp
_KIND_SETS = {"all": ("up", "down", "gate", "gate_up"), "gate_up": ("up", "gate", "gate_up"), "down": ("down",)}


class DimensionSpec(BaseModel):
    """One [params.NAME] table of a space file, as written."""

    model_config = ConfigDict(extra="forbid")

    choices: list[Any] | None = Field(default=None, min_length=1)
    type: Literal["int"] | None = None
    low: int | str | None = None
    high: int | str | None = None
    step: int = Field(default=1, ge=1)
    help: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> DimensionSpec:
        if self.choices is not None:
            if self.type or self.low is not None or self.high is not None:
                raise ValueError("give either choices = [...] or type = \"int\" with low and high, not both")
        elif self.type != "int" or self.low is None or self.high is None:
            raise ValueError("give choices = [...], or type = \"int\" with low and high")
        for bound in (self.low, self.high):
            if (isinstance(bound, int) and bound < 0) or (isinstance(bound, str) and bound not in FACTS):
                raise ValueError(f"bound {bound!r} must be a whole number >= 0 or one of " + ", ".join(FACTS))
        if isinstance(self.low, int) and isinstance(self.high, int) and self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class EnvKnobSpec(BaseModel):
    """One [env.NAME] table: a backend environment knob's values, and the backends that read it."""

    model_config = ConfigDict(extra="forbid")

    choices: list[int | str] = Field(min_length=1)
    backends: list[str] = Field(min_length=1)
    help: str | None = None


class SpaceFile(BaseModel):
    """A whole space file: a description, at least one dimension, and backend environment knobs."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    params: dict[str, DimensionSpec] = Field(min_length=1)
    env: dict[str, EnvKnobSpec] = Field(default_factory=dict)


@dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple[Any, ...] | None = None
    low: int | str | None = None
    high: int | str | None = None
    step: int = 1
    backends: tuple[str, ...] = ()  # an environment knob (name `env:NAME`): the backends that read it


@dataclass
class SearchSpace:
    """Dimensions to search and parameters pinned to one value."""

    name: str
    description: str
    dimensions: list[Dimension]
    pinned: dict[str, Any] = field(default_factory=dict)

    def pin(self, name: str, raw: str) -> None:
        """`--set name=value`: fix a parameter (it need not be in the file)."""
        if name == "ctx":
            raise PlacetuneError("--set ctx: the serving context is its own option now; pass --ctx N (and --slots)")
        if name not in PARAMS:
            raise PlacetuneError(f"--set {name}: unknown parameter; known: {', '.join(PARAMS)}")
        self.pinned[name] = _check_value(name, _coerce(raw), f"--set {name}")
        self.dimensions = [d for d in self.dimensions if d.name != name]

    def bounds(self, dim: Dimension, facts: dict[str, int]) -> tuple[int, int]:
        """A dimension's inclusive bounds on this model and machine; low above high is an error, not a clamp."""
        low, high = (_resolve(v, facts) for v in (dim.low, dim.high))
        if low > high:
            named = ", ".join(f"{v}={facts[v]}" for v in (dim.low, dim.high) if isinstance(v, str))
            raise PlacetuneError(f"search space {self.name} [params.{dim.name}]: low {low} is above high {high}"
                                 + (f" here ({named})" if named else "") + "; lower low or pin it with --set")
        if dim.name in _POSITIVE and low < 1:
            raise PlacetuneError(f"search space {self.name} [params.{dim.name}]: values start at 1, not {low}")
        return low, high

    def check(self, facts: dict[str, int]) -> None:
        """Resolve every bound once, before any trial: a space that cannot work on this machine fails up front."""
        for dim in self.dimensions:
            if dim.choices is None:
                self.bounds(dim, facts)

    def suggest(self, trial: optuna.Trial, facts: dict[str, int]) -> dict[str, Any]:
        """Sample a trial's parameters (cpu_moe_start only for a block or interleaved set, cpu_moe_stride only
        for an interleaved one)."""
        params: dict[str, Any] = dict(self.pinned)
        for dim in self.dimensions:
            if not applies(dim.name, params):
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

    def for_devices(self, devices: Sequence[str]) -> list[str]:
        """Keep the environment knobs only where a device of a backend that reads them is present (a CUDA knob
        means nothing on RPC or CPU); return notes on the ones dropped."""
        notes = []
        kept = []
        for dim in self.dimensions:
            if dim.backends and not any(d.startswith(b) for d in devices for b in dim.backends):
                notes.append(f"{dim.name.removeprefix(ENV_PREFIX)} is not searched: only {', '.join(dim.backends)} "
                             "read it, and no such device is here")
                continue
            kept.append(dim)
        self.dimensions = kept
        return notes

    def dimension_names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def identity(self) -> dict[str, Any]:
        """What the space is, for a study to refuse being resumed over another one."""
        dims = [[d.name, list(d.choices) if d.choices is not None else [d.low, d.high, d.step]]
                for d in self.dimensions]
        return {"name": self.name, "dimensions": dims, "pinned": dict(sorted(self.pinned.items()))}


def applies(name: str, params: dict[str, Any]) -> bool:
    """Whether a parameter means anything given the others (Optuna's conditional dimensions)."""
    if name in ("cpu_moe_position", "cpu_moe_kinds", "cpu_moe_start", "cpu_moe_stride", "experts_to") and \
            not params.get("cpu_moe_layers"):
        return False
    if name == "cpu_moe_start":
        return params.get("cpu_moe_position") in ("block", "interleaved")
    if name == "cpu_moe_stride":
        return params.get("cpu_moe_position") == "interleaved"
    return True


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
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise PlacetuneError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    elif not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in _POSITIVE else 0):
        least = 1 if name in _POSITIVE else 0
        raise PlacetuneError(f"{where}: {value!r} must be a whole number >= {least}")
    return value


def _resolve(value: int | str | None, facts: dict[str, int]) -> int:
    if isinstance(value, int):
        return value
    return facts[str(value)]


def load_space(path: Path) -> SearchSpace:
    """Read and validate a space file; any bad key or value is reported in one line."""
    if not path.exists():
        raise PlacetuneError(f"search space {path} not found; pass a .toml file or one of {', '.join(list_spaces())}")
    try:
        data = tomllib.loads(read_user_text(path, "a search space .toml file"))
    except tomllib.TOMLDecodeError as exc:
        raise PlacetuneError(f"{path}: not valid TOML ({exc})") from None
    return parse_space(path.stem, data, str(path))


def parse_space(name: str, data: dict[str, Any], where: str) -> SearchSpace:
    """A space from its TOML document: the typed record first, then each value against its parameter."""
    if not data.get("params"):
        raise PlacetuneError(f"{where}: no [params.*] dimensions to search")
    try:
        doc = SpaceFile.model_validate(data)
    except ValidationError as exc:
        raise PlacetuneError(f"{where}: {one_line_error(exc)}") from None
    dims = []
    for param, spec in doc.params.items():
        at = f"{where} [params.{param}]"
        if param not in PARAMS:
            raise PlacetuneError(f"{at}: unknown parameter; known: {', '.join(PARAMS)}")
        if spec.choices is not None:
            dims.append(Dimension(param, tuple(_check_value(param, c, at) for c in spec.choices)))
        else:
            if PARAMS[param][0] is not None:
                raise PlacetuneError(f"{at}: takes choices = [...] from {', '.join(map(str, PARAMS[param][0]))}")
            for bound in (spec.low, spec.high):
                if isinstance(bound, int):
                    _check_value(param, bound, at)
            dims.append(Dimension(param, None, spec.low, spec.high, spec.step))
    for knob, env in doc.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", knob):
            raise PlacetuneError(f"{where} [env.{knob}]: not an environment variable name")
        dims.append(Dimension(f"{ENV_PREFIX}{knob}", tuple(str(c) for c in env.choices), backends=tuple(env.backends)))
    return SearchSpace(name, doc.description, dims)


def _builtin(name: str) -> str | None:
    entry = resources.files(SPACES_PACKAGE) / f"{name}.toml"
    return entry.read_text(encoding="utf-8") if entry.is_file() else None


def list_spaces() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files(SPACES_PACKAGE).iterdir()
                  if p.name.endswith(".toml"))


def builtin_space(name: str) -> SearchSpace:
    """A space shipped with placetune (moe, dense, cpu, ...)."""
    text = _builtin(name)
    if text is None:
        raise PlacetuneError(f"--space {name}: no such built-in space; use one of {', '.join(list_spaces())} "
                             "or a path to a .toml file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a broken built-in is a packaging bug, still said in one line
        raise PlacetuneError(f"built-in space {name}: not valid TOML ({exc})") from None
    return parse_space(name, data, f"built-in space {name}")


def resolve_space(arg: str | None, anatomy: Anatomy, devices: Sequence[str]) -> SearchSpace:
    """The user's file or a built-in name, else by model and hardware: cpu without an accelerator, multi with
    several, moe or dense with one. devices: the accelerators."""
    if arg and (arg.endswith(".toml") or "/" in arg):
        return load_space(Path(arg).expanduser())
    if arg:
        return builtin_space(arg)
    if not devices:
        return builtin_space("cpu")
    if len(devices) > 1 and anatomy.facts.is_moe:
        return builtin_space("multi")
    return builtin_space("moe" if anatomy.facts.is_moe else "dense")


def moe_layers(anatomy: Anatomy) -> list[int]:
    """Layers that hold routed experts (leading dense layers have none)."""
    return sorted({t.layer for t in anatomy.tensors if t.group is Group.EXPERT and t.layer is not None})


def interleaved(layers: list[int], count: int, start: int, stride: int) -> list[int]:
    """Every stride-th of `layers` from index `start`, `count` of them: club-3090's issue 816 found such sets
    beating a contiguous block. The start moves back so that all `count` fit when it can; a stride too wide
    for `count` layers gives as many as there are from the first."""
    stride = max(1, stride)
    start = max(0, min(start, len(layers) - 1 - (count - 1) * stride))
    return layers[start::stride][:count]


def facts_for(anatomy: Anatomy, physical_cores: int) -> dict[str, int]:
    n = anatomy.facts.n_layers
    return {"n_layers": n, "n_gpu_layers_max": n + 1, "n_moe_layers": len(moe_layers(anatomy)),
            "physical_cores": physical_cores}


def to_placement(params: dict[str, Any], anatomy: Anatomy, devices: Sequence[str] = ()) -> Placement:
    """Trial parameters -> the Placement llama.cpp will be given (the serving context is added by the caller).

    devices: the accelerators in llama.cpp's order. With two or more, split_first sets -ts (tenths on the
    first, the rest shared evenly, under -sm layer) and experts_to = next pins each chosen layer's
    experts to the accelerator after its own instead of RAM (the hand-written per-device -ot recipe).
    """
    overrides: tuple[ExpertRule, ...] = ()
    n_cpu = int(params.get("cpu_moe_layers") or 0)
    layers = moe_layers(anatomy)
    split = _split(params, devices)
    if n_cpu and layers:
        n_cpu = min(n_cpu, len(layers))
        position = params.get("cpu_moe_position", "first")
        if position == "last":
            chosen = layers[-n_cpu:]
        elif position == "block":
            start = min(int(params.get("cpu_moe_start", 0)), len(layers) - n_cpu)
            chosen = layers[start : start + n_cpu]
        elif position == "interleaved":
            chosen = interleaved(layers, n_cpu, int(params.get("cpu_moe_start", 0)),
                                 int(params.get("cpu_moe_stride", 2)))
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
        if chosen and params.get("experts_to", "CPU") == "next" and len(devices) > 1:
            overrides = _to_next_device(chosen, anatomy, params.get("n_gpu_layers"), devices, split, kinds,
                                        all_kinds)
        elif chosen:
            overrides = (ExpertRule(layers=tuple(chosen), kinds=kinds, buft="CPU", include_bias=all_kinds),)
    knobs = {k: params[k] for k in ("n_gpu_layers", "threads", "batch", "ubatch", "flash_attn", "cache_type_k",
                                     "cache_type_v", "load_mode", "repack") if k in params}
    multi = {"tensor_split": split, "split_mode": "layer"} if split else {}
    env = tuple((k.removeprefix(ENV_PREFIX), str(v)) for k, v in params.items() if k.startswith(ENV_PREFIX))
    return Placement(overrides=overrides, no_op_offload=bool(params.get("no_op_offload", False)), env=env,
                     **multi, **knobs)


def _split(params: dict[str, Any], devices: Sequence[str]) -> tuple[float, ...] | None:
    """-ts from split_first (tenths on the first accelerator), when there are several accelerators."""
    if len(devices) < 2 or "split_first" not in params or params.get("n_gpu_layers") == 0:
        return None  # nothing offloaded: a split would only rename the same placement
    first = min(max(int(params["split_first"]), 1), 9)
    rest = (10 - first) / (len(devices) - 1)
    return (float(first), *(rest,) * (len(devices) - 1))


def _to_next_device(chosen: list[int], anatomy: Anatomy, ngl: int | None, devices: Sequence[str],
                    split: tuple[float, ...] | None, kinds: tuple[str, ...], bias: bool) -> tuple[ExpertRule, ...]:
    """One rule per target device: each chosen layer's experts on the accelerator after its own (wrapping)."""
    home = layer_devices(anatomy.facts.n_layers, ngl, devices, split)
    by_target: dict[str, list[int]] = {}
    for layer in chosen:
        target = devices[(devices.index(home[layer]) + 1) % len(devices)] if home[layer] in devices else "CPU"
        by_target.setdefault(target, []).append(layer)
    return tuple(ExpertRule(layers=tuple(ls), kinds=kinds, buft=dev, include_bias=bias)
                 for dev, ls in sorted(by_target.items()))
