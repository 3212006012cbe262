"""Placement: where every tensor goes and with which runtime knobs, and its llama.cpp spelling.

This is the only module that knows how llama.cpp flags are spelled. llama-server and llama-bench
differ in small ways (llama-bench joins several -ot rules with ';' and takes booleans as 0/1), so
both spellings come from the tables here, and `parse_flags` reads either back into a Placement.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gguf import GGMLQuantizationType

from placetune.anatomy import EXPERT_INFIX, EXPERT_KINDS, LLAMA_EXPERTS_REGEX
from placetune.errors import PlacetuneError

ALL_LAYERS = 999  # -ngl value meaning "every layer and the output head"
ALL_EXPERT_KINDS: tuple[str, ...] = EXPERT_KINDS
LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")
FLASH_ATTN = ("on", "off", "auto")
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# The layer universe used to read a hand-written -ot regex back into layers.
_PARSE_MAX_LAYERS = 256
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SPLIT_MODES = ("none", "layer", "row")


@dataclass(frozen=True)
class ExpertRule:
    """Routed-expert tensors of some layers (None: all layers) and kinds, pinned to a buffer type."""

    layers: tuple[int, ...] | None
    kinds: tuple[str, ...] = ALL_EXPERT_KINDS
    buft: str = "CPU"
    include_bias: bool = True

    def __post_init__(self) -> None:
        if self.layers is not None:
            if not all(_is_count(x, 0) for x in self.layers):
                raise PlacetuneError(f"an expert rule's layers are layer numbers (0 or more), got "
                                     f"{list(self.layers)!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        object.__setattr__(self, "kinds", tuple(k for k in ALL_EXPERT_KINDS if k in set(self.kinds)))
        if not self.kinds or (self.layers is not None and not self.layers):
            raise PlacetuneError("an expert rule needs at least one layer and one expert kind")

    @property
    def is_n_cpu_moe(self) -> bool:
        """True when llama.cpp's --n-cpu-moe/--cpu-moe means exactly this rule."""
        first_n = self.layers is None or self.layers == tuple(range(len(self.layers)))
        return self.buft == "CPU" and self.include_bias and self.kinds == ALL_EXPERT_KINDS and first_n

    def pattern(self) -> str:
        """The regex llama.cpp is given; with every layer, kind and bias it is llama.cpp's own --cpu-moe pattern."""
        if self.layers is None and self.kinds == ALL_EXPERT_KINDS and self.include_bias:
            return LLAMA_EXPERTS_REGEX
        kinds = self.kinds[0] if len(self.kinds) == 1 else "(" + "|".join(self.kinds) + ")"
        suffix = "" if self.include_bias else r"\.weight"
        prefix = "" if self.layers is None else rf"blk\.{layers_regex(self.layers)}"
        return rf"{prefix}\.ffn_{kinds}{EXPERT_INFIX}{suffix}"


@dataclass(frozen=True)
class RawOverride:
    """An -ot rule placetune does not model structurally; kept verbatim and applied as llama.cpp would."""

    pattern: str
    buft: str


Override = ExpertRule | RawOverride


def _is_count(value: object, least: int) -> bool:
    """A whole number (not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class Placement:
    """Layers on the accelerator, tensor overrides in llama.cpp's first-match order, and runtime knobs.

    None means "not given": llama.cpp's own default applies and no flag is rendered.
    """

    n_gpu_layers: int | None = None
    overrides: tuple[Override, ...] = ()
    threads: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    flash_attn: str | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    load_mode: str | None = None
    no_op_offload: bool = False
    repack: bool | None = None
    ctx: int | None = None
    parallel: int | None = None
    tensor_split: tuple[float, ...] | None = None
    split_mode: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        """Every value is one llama.cpp accepts, whichever way the placement came in (flags, a placement file,
        best.json, a search space), so nothing invalid is launched or exported."""
        if self.env:
            object.__setattr__(self, "env", tuple(sorted((str(k), str(v)) for k, v in self.env)))
            for name, _ in self.env:
                if not _ENV_NAME.fullmatch(name):
                    raise PlacetuneError(f"environment knob {name!r} is not a variable name (letters, digits, _)")
        if self.n_gpu_layers is not None and not _is_count(self.n_gpu_layers, 0):
            raise PlacetuneError(f"n_gpu_layers (-ngl) must be 0 or more layers, got {self.n_gpu_layers!r}")
        for name in ("threads", "batch", "ubatch", "ctx", "parallel"):
            value = getattr(self, name)
            if value is not None and not _is_count(value, 1):
                raise PlacetuneError(f"{name} must be a whole number of 1 or more, got {value!r}")
        for name, allowed in (("flash_attn", FLASH_ATTN), ("cache_type_k", KV_TYPES), ("cache_type_v", KV_TYPES),
                              ("load_mode", LOAD_MODES), ("split_mode", SPLIT_MODES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise PlacetuneError(f"{name} takes one of {', '.join(allowed)}, got {value!r}")
        if not isinstance(self.no_op_offload, bool) or not isinstance(self.repack, bool | None):
            raise PlacetuneError("no_op_offload and repack are true or false (repack may also be left out)")
        if self.tensor_split is not None:
            ts = self.tensor_split
            if not ts or any(not math.isfinite(x) or x < 0 for x in ts) or not sum(ts) > 0:
                raise PlacetuneError(f"tensor split (-ts) takes shares of 0 or more, not all 0, like 3,1; got "
                                     f"{','.join(map(str, ts))}")
        for o in self.overrides:
            if not isinstance(o.buft, str) or not o.buft:  # which names exist: check_buffer_types, per build
                raise PlacetuneError(f"an -ot buffer type must be a name such as CPU or CUDA0, got {o.buft!r}")
            if isinstance(o, RawOverride) and (not isinstance(o.pattern, str) or not o.pattern):
                raise PlacetuneError(f"an -ot rule needs a regex, got {o.pattern!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [
            {"type": "experts", **asdict(o)} if isinstance(o, ExpertRule) else {"type": "raw", **asdict(o)}
            for o in self.overrides
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlacetuneError(f"placement has unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        overrides: list[Override] = []
        for o in d.get("overrides", []):
            o = dict(o)
            kind = o.pop("type", "raw")
            if kind == "experts":
                layers = o.get("layers")
                overrides.append(
                    ExpertRule(
                        layers=None if layers is None else tuple(layers),
                        kinds=tuple(o.get("kinds", ALL_EXPERT_KINDS)),
                        buft=o.get("buft", "CPU"),
                        include_bias=bool(o.get("include_bias", True)),
                    )
                )
            elif kind == "raw" and "pattern" in o and "buft" in o:
                overrides.append(RawOverride(pattern=o["pattern"], buft=o["buft"]))
            else:
                raise PlacetuneError(f"placement override {o!r}: an override is experts (layers, kinds, buft) or raw "
                                     "(pattern, buft)")
        ts = d.get("tensor_split")
        try:
            split = None if ts is None else tuple(float(x) for x in ts)
            env = tuple(dict(d.get("env", ())).items())  # __post_init__ makes names and values strings
        except (TypeError, ValueError):
            raise PlacetuneError(f"placement: tensor_split is a list of numbers and env a list of [NAME, VALUE] "
                                 f"pairs, got {ts!r} and {d.get('env')!r}") from None
        return cls(**{**d, "overrides": tuple(overrides), "tensor_split": split, "env": env})



# ---------------------------------------------------------------------------------------------
# Regex for a set of layer numbers


def _range_stops(lo: int, hi: int) -> list[int]:
    """Ends of the sub-ranges of lo..hi that each fit one `prefix[a-b][0-9]*` shape."""
    stops = {hi}
    nines = 1
    stop = int(str(lo)[:-nines] + "9" * nines) if nines < len(str(lo)) else int("9" * nines)
    while lo <= stop < hi:
        stops.add(stop)
        nines += 1
        stop = int(str(lo)[:-nines] + "9" * nines) if nines < len(str(lo)) else int("9" * nines)
    zeros = 1
    stop = (hi + 1) - (hi + 1) % 10**zeros - 1
    while lo < stop <= hi:
        stops.add(stop)
        zeros += 1
        stop = (hi + 1) - (hi + 1) % 10**zeros - 1
    return sorted(stops)


def _range_regex(lo: int, hi: int) -> list[str]:
    """Alternatives matching exactly the decimal integers lo..hi (the to-regex-range method)."""
    out, start = [], lo
    for stop in _range_stops(lo, hi):
        a, b = str(start), str(stop)
        alt = "".join(x if x == y else f"[{x}-{y}]" for x, y in zip(a, b, strict=True))
        out.append(alt)
        start = stop + 1
    return out


def layer_runs(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs of a set of layer numbers, as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def layers_regex(layers: Iterable[int]) -> str:
    """A compact regex for exactly these layers: `7`, or `(1[0-9]|2[0-3])` for 10..23."""
    return _layers_regex(tuple(sorted(set(layers))))


@functools.lru_cache(maxsize=4096)
def _layers_regex(layers: tuple[int, ...]) -> str:
    """Cached: every tensor's buffer is decided by matching its name against each rule's pattern."""
    alts = [alt for lo, hi in layer_runs(layers) for alt in _range_regex(lo, hi)]
    if not alts:
        raise PlacetuneError("no layers given for an expert rule")
    return alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")"


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Knob:
    """One runtime knob: its Placement field and its spelling in llama-server and llama-bench."""

    name: str
    server: str
    bench: str | None
    aliases: tuple[str, ...] = field(default=())


# Value-taking knobs, spelled as llama-server spells them (common/arg.cpp) and as llama-bench does.
_KNOBS: tuple[_Knob, ...] = (
    _Knob("threads", "-t", "-t", ("--threads",)),
    _Knob("batch", "-b", "-b", ("--batch-size",)),
    _Knob("ubatch", "-ub", "-ub", ("--ubatch-size",)),
    _Knob("flash_attn", "-fa", "-fa", ("--flash-attn",)),
    _Knob("cache_type_k", "-ctk", "-ctk", ("--cache-type-k",)),
    _Knob("cache_type_v", "-ctv", "-ctv", ("--cache-type-v",)),
    _Knob("load_mode", "-lm", "-lm", ("--load-mode",)),
    _Knob("ctx", "-c", None, ("--ctx-size",)),
    _Knob("parallel", "-np", None, ("--parallel",)),
    _Knob("split_mode", "-sm", "-sm", ("--split-mode",)),
)


def _override_groups(placement: Placement, rpc: Sequence[str] = ()) -> list[list[str] | int | None]:
    """Overrides in order: lists of -ot rules, an int for --n-cpu-moe N, None for --cpu-moe."""
    out: list[list[str] | int | None] = []
    last = len(placement.overrides) - 1
    for i, o in enumerate(placement.overrides):
        # llama-bench appends its --n-cpu-moe rules after every -ot rule, so only a trailing
        # first-N rule can be spelled --n-cpu-moe without changing llama.cpp's first-match order.
        if isinstance(o, ExpertRule) and o.is_n_cpu_moe and i == last:
            out.append(None if o.layers is None else len(o.layers))
            continue
        rule = f"{rule_pattern(o)}={buffer_type(o.buft, rpc)}"
        if out and isinstance(out[-1], list):
            out[-1].append(rule)
        else:
            out.append([rule])
    return out


def render_args(placement: Placement, tool: str = "server", rpc: Sequence[str] = ()) -> list[str]:
    """The placement as llama.cpp arguments for `server` (llama-server/llama-cli) or `bench` (llama-bench).

    rpc: the --rpc endpoints the line runs with, so that an override naming RPCk gets its buffer type name.
    """
    if tool not in ("server", "bench"):
        raise ValueError(f"unknown tool {tool!r}")
    bench = tool == "bench"
    args: list[str] = []
    if placement.n_gpu_layers is not None:
        args += ["-ngl", str(placement.n_gpu_layers)]
    if placement.tensor_split is not None:
        sep = "/" if bench else ","
        args += ["-ts", sep.join(f"{x:g}" for x in placement.tensor_split)]
    groups = _override_groups(placement, rpc)
    if bench:
        rules = [r for g in groups if isinstance(g, list) for r in g]
        if None in groups:  # llama-bench has no --cpu-moe
            rules.append(f"{ExpertRule(layers=None).pattern()}=CPU")
        if rules:
            args += ["-ot", ";".join(rules)]
        n_cpu_moe = [g for g in groups if isinstance(g, int) and not isinstance(g, bool)]
        if n_cpu_moe:
            args += ["-ncmoe", str(n_cpu_moe[0])]
    else:
        for g in groups:
            if isinstance(g, list):
                args += ["-ot", ",".join(g)]
            elif g is None:
                args += ["--cpu-moe"]
            else:
                args += ["--n-cpu-moe", str(g)]
    for knob in _KNOBS:
        value = getattr(placement, knob.name)
        if value is None or (bench and knob.bench is None):
            continue
        args += [knob.bench if bench else knob.server, str(value)]
    if placement.no_op_offload:
        args += ["-nopo", "1"] if bench else ["--no-op-offload"]
    if placement.repack is not None:
        if bench:
            args += ["--repack", "1" if placement.repack else "0"]
        else:
            args += ["--repack" if placement.repack else "--no-repack"]
    return args


def render_flags(placement: Placement) -> str:
    """The placement as one shell-quoted string: llama-server flags, after the environment knobs they need
    (`NAME=VALUE ...`). It names a placement everywhere: in tables, trial records and comparisons."""
    return shell_line(placement, render_args(placement, "server"))


def render_env(placement: Placement) -> list[str]:
    """Backend environment knobs as NAME=VALUE words, unquoted: for `env`, llama-swap's `env:` and messages."""
    return [f"{name}={value}" for name, value in placement.env]


def shell_line(placement: Placement, argv: Sequence[str]) -> str:
    """A shell command: the placement's environment knobs as assignments, then argv, all quoted for POSIX sh.

    Only the value is quoted (`NAME='a b' cmd`): a quoted whole word ('NAME=a b') is a command name to sh.
    """
    env = [f"{name}={shlex.quote(value)}" for name, value in placement.env]
    return " ".join([*env, shlex.join(argv)]) if argv else " ".join(env)


def render_ot(placement: Placement, rpc: Sequence[str] = ()) -> str:
    """Just the -ot value (llama-server spelling), with --n-cpu-moe rules written out as regexes."""
    return ",".join(f"{rule_pattern(o)}={buffer_type(o.buft, rpc)}" for o in placement.overrides)


def render_fit_target(margins_mib: Sequence[int]) -> list[str]:
    """--fit's free-memory target per device (-fitt, MiB, in llama.cpp's device order); nothing for none."""
    return ["-fitt", ",".join(map(str, margins_mib))] if margins_mib else []


def render_server_command(
    model: str,
    placement: Placement,
    *,
    binary: str = "llama-server",
    host: str = "127.0.0.1",
    port: int | None = None,
    rpc: Sequence[str] = (),
    fit_off: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """A complete llama-server command line for this placement, as measured.

    llama-server's --fit is on by default and would re-place the tensors this line pins, so the line turns
    it off; flash attention is spelled out even at its default (auto), since it changes memory and speed.
    """
    cmd = [binary, "-m", model, "--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    if rpc:
        cmd += ["--rpc", ",".join(rpc)]
    args = render_args(placement, "server", rpc)
    if placement.flash_attn is None:
        args += ["-fa", "auto"]
    if fit_off:
        args += ["-fit", "off"]
    return cmd + args + list(extra)


def render_bench_command(
    model: str,
    placement: Placement,
    *,
    binary: str = "llama-bench",
    n_prompt: int = 512,
    n_gen: int = 128,
    depth: int = 0,
    repetitions: int = 5,
    rpc: Sequence[str] = (),
    output: str | None = "jsonl",
) -> list[str]:
    """A llama-bench command line measuring this placement."""
    cmd = [binary, "-m", model, "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repetitions)]
    if depth:
        cmd += ["-d", str(depth)]
    if rpc:
        cmd += ["--rpc", ",".join(rpc)]
    cmd += render_args(placement, "bench", rpc)
    if output:
        cmd += ["-o", output]
    return cmd


def python_kwargs(placement: Placement) -> tuple[dict[str, Any], list[str]]:
    """llama-cpp-python `Llama(...)` keyword arguments for this placement, and what `Llama()` cannot express.

    Every knob is mapped faithfully or named in the second list, never approximated: `Llama()` has no
    tensor overrides, no --no-repack, no slots, and only forces flash attention on or off.
    """
    kw: dict[str, Any] = {}
    cannot: list[str] = []
    if placement.n_gpu_layers is not None:
        kw["n_gpu_layers"] = placement.n_gpu_layers
    if placement.tensor_split is not None:
        kw["tensor_split"] = list(placement.tensor_split)
    if placement.split_mode is not None:  # llama.h's enum llama_split_mode
        kw["split_mode"] = SPLIT_MODES.index(placement.split_mode)
    for name, key in (("threads", "n_threads"), ("batch", "n_batch"), ("ubatch", "n_ubatch"), ("ctx", "n_ctx")):
        if getattr(placement, name) is not None:
            kw[key] = getattr(placement, name)
    if placement.threads is not None:
        kw["n_threads_batch"] = placement.threads
    if placement.flash_attn in ("on", "off"):
        kw["flash_attn"] = placement.flash_attn == "on"
    else:
        cannot.append("-fa auto (llama.cpp's default): Llama() only forces flash attention on (flash_attn=True) "
                      "or off, and is off without it")
    mode = placement.load_mode
    if mode in ("none", "mmap", "mlock", "mmap+mlock"):
        kw["use_mmap"] = mode in ("mmap", "mmap+mlock")
        if "mlock" in mode:
            kw["use_mlock"] = True
    elif mode == "dio":
        cannot.append("-lm dio (direct I/O loading)")
    if placement.no_op_offload:
        kw["op_offload"] = False
    for name in ("cache_type_k", "cache_type_v"):
        value = getattr(placement, name)
        if value is not None:
            kw["type_" + name[-1]] = ggml_type_id(value)
    if placement.repack is False:
        cannot.append("--no-repack (weight repacking stays on)")
    if placement.parallel and placement.parallel > 1:
        cannot.append(f"-np {placement.parallel} (Llama() serves one sequence)")
    cannot += [f"-ot {rule_pattern(o)}={o.buft}" for o in placement.overrides]
    return kw, cannot


def ggml_type_id(name: str) -> int:

    return int(GGMLQuantizationType[name.upper()])


# ---------------------------------------------------------------------------------------------
# Parsing


# Expert tensor names to read a rule against: (layer, kind, suffix), each present as exps and chexps.
_EXPERT_UNIVERSE = [(layer, kind, sfx) for layer in range(_PARSE_MAX_LAYERS) for kind in ALL_EXPERT_KINDS
                    for sfx in ("weight", "bias")]


def _read_rule(pattern: str, buft: str) -> Override:
    """An -ot rule as an ExpertRule only when it is, character for character, the regex placetune renders for
    some layers and kinds (llama.cpp's own --cpu-moe pattern included); any other rule stays verbatim.

    A hand-written rule that also moves another tensor (`blk\\.3\\.(ffn_.*_exps|attn_kv_a_mqa)=CPU`) or that
    spells its layers differently is applied as written, never narrowed to the nearest expert rule.
    """
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise PlacetuneError(f"-ot pattern {pattern!r} is not a valid regex: {exc}") from None
    hits = {(layer, kind, sfx) for layer, kind, sfx in _EXPERT_UNIVERSE
            if rx.search(f"blk.{layer}.ffn_{kind}_exps.{sfx}")}
    if not hits or {h[2] for h in hits} == {"bias"}:
        return RawOverride(pattern, buft)
    layers = sorted({h[0] for h in hits})
    rule = ExpertRule(
        layers=None if len(layers) == _PARSE_MAX_LAYERS else tuple(layers),
        kinds=tuple(k for k in ALL_EXPERT_KINDS if any(h[1] == k for h in hits)),
        buft=buft,
        include_bias=any(h[2] == "bias" for h in hits),
    )
    return rule if rule.pattern() == pattern else RawOverride(pattern, buft)


def split_rules(value: str, tool: str = "server") -> list[tuple[str, str]]:
    """An -ot value split into (pattern, buffer type) as llama.cpp splits it.

    llama-server (common/arg.cpp) separates rules with ','; llama-bench separates rules with ';' and test
    configurations with ','. A rule splits into pattern and buffer type at its first '='.
    """
    if tool == "bench":
        if "," in value:
            raise PlacetuneError(f"-ot {value!r}: in llama-bench spelling ',' separates test configurations and "
                                 "placetune measures one; join the rules of one configuration with ';'")
        parts = value.split(";")
    else:
        parts = value.split(",")
    rules = []
    for part in parts:
        if not part:
            continue
        pattern, sep, buft = part.partition("=")
        if not sep:
            raise PlacetuneError(f"-ot rule {part!r} has no '=BUFTYPE'; write it as REGEX=CPU (or =CUDA0)")
        if not pattern or not buft:
            raise PlacetuneError(f"-ot rule {part!r} needs both a regex and a buffer type, as REGEX=CPU")
        rules.append((pattern, buft))
    return rules


def check_buffer_types(placement: Placement, known: Sequence[str], tool: str = "server") -> None:
    """Refuse, before anything is launched, an override naming a buffer type this llama.cpp build lacks."""
    for o in placement.overrides:
        if o.buft in known:
            continue
        hint = ""
        if ";" in o.buft or "=" in o.buft:
            hint = (" (llama-server spelling separates rules with ','; ';' is llama-bench's separator)"
                    if tool == "server" else " (llama-bench spelling separates rules with ';')")
        raise PlacetuneError(f"-ot buffer type {o.buft!r} is not one this llama.cpp offers "
                             f"({', '.join(known) or 'none'}){hint}")


_IGNORED_WITH_VALUE = {"-m", "--model", "--host", "--port", "-p", "-n", "-r", "-d", "-o", "--repetitions"}
_KNOB_BY_FLAG = {name: k for k in _KNOBS for name in (k.server, *k.aliases) if name}
_INT_KNOBS = {"threads", "batch", "ubatch", "ctx", "parallel"}


def _knob_value(knob: _Knob, raw: str, flag: str) -> Any:
    if knob.name in _INT_KNOBS:
        try:
            value = int(raw)
        except ValueError:
            raise PlacetuneError(f"{flag} needs a whole number, got {raw!r}") from None
        if value <= 0:
            raise PlacetuneError(f"{flag} must be positive, got {value}")
        return value
    if knob.name == "flash_attn":
        value = {"1": "on", "0": "off", "true": "on", "false": "off"}.get(raw, raw)
        if value not in FLASH_ATTN:
            raise PlacetuneError(f"{flag} takes on, off or auto, got {raw!r}")
        return value
    if knob.name == "split_mode":
        if raw not in SPLIT_MODES:
            raise PlacetuneError(f"{flag} takes one of {', '.join(SPLIT_MODES)}, got {raw!r}")
        return raw
    if knob.name == "load_mode":
        if raw not in LOAD_MODES:
            raise PlacetuneError(f"{flag} takes one of {', '.join(LOAD_MODES)}, got {raw!r}")
        return raw
    if raw not in KV_TYPES:
        raise PlacetuneError(f"{flag} takes a KV cache type ({', '.join(KV_TYPES)}), got {raw!r}")
    return raw


def parse_flags(args: str | Sequence[str], tool: str = "server", rpc: Sequence[str] = ()) -> Placement:
    """Read llama-server (tool="server") or llama-bench (tool="bench") placement flags back into a Placement.

    A leading binary name and -m/--host/--port are skipped, so a whole command line works. The two tools
    spell several -ot rules differently (',' vs ';'), so the caller says which spelling it holds. An RPC
    buffer type (`RPC0[host:port]`) is read as the device llama.cpp gives that endpoint in `rpc` (RPCk).
    Flags that are not about placement or runtime knobs are refused, never silently dropped.
    """
    tokens = shlex.split(args) if isinstance(args, str) else list(args)
    env = []
    while tokens and "=" in tokens[0] and _ENV_NAME.fullmatch(tokens[0].split("=", 1)[0]):
        env.append(tuple(tokens.pop(0).split("=", 1)))
    if tokens and not tokens[0].startswith("-"):
        tokens = tokens[1:]
    values: dict[str, Any] = {}
    overrides: list[Override] = []
    i = 0

    def take(flag: str) -> str:
        nonlocal i
        if i + 1 >= len(tokens):
            raise PlacetuneError(f"{flag} needs a value")
        i += 1
        return tokens[i]

    while i < len(tokens):
        tok = tokens[i]
        flag, _, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        if inline:
            tokens[i : i + 1] = [flag, inline]
        if flag in ("-ngl", "--gpu-layers", "--n-gpu-layers"):
            raw = take(flag)
            if raw in ("all", "-1"):  # -1: llama.cpp's own value for every layer (llama-fit-params prints it)
                values["n_gpu_layers"] = ALL_LAYERS
            elif raw != "auto":
                if not raw.isdigit():
                    raise PlacetuneError(f"{flag} takes a layer count (0 or more), 'all' or 'auto', got {raw!r}")
                values["n_gpu_layers"] = int(raw)
        elif flag in ("-ot", "--override-tensor"):
            overrides += [_read_rule(p, device_of(b, rpc) if "[" in b else b) for p, b in split_rules(take(flag), tool)]
        elif flag in ("-cmoe", "--cpu-moe"):
            overrides.append(ExpertRule(layers=None))
        elif flag in ("-ncmoe", "--n-cpu-moe"):
            raw = take(flag)
            if not raw.isdigit():
                raise PlacetuneError(f"{flag} takes a layer count, got {raw!r}")
            if int(raw) > 0:
                overrides.append(ExpertRule(layers=tuple(range(int(raw)))))
        elif flag in ("-ts", "--tensor-split"):
            raw = take(flag)
            try:
                values["tensor_split"] = tuple(float(x) for x in re.split(r"[,/]", raw))
            except ValueError:
                raise PlacetuneError(f"{flag} takes numbers like 3,1, got {raw!r}") from None
        elif flag in _KNOB_BY_FLAG:
            knob = _KNOB_BY_FLAG[flag]
            values[knob.name] = _knob_value(knob, take(flag), flag)
        elif flag == "--no-mmap":
            values["load_mode"] = "none"
        elif flag == "--mmap":
            values["load_mode"] = "mmap"
        elif flag in ("-mmp", "--mmap-bench"):
            values["load_mode"] = "mmap" if take(flag) == "1" else "none"
        elif flag == "--no-op-offload":
            values["no_op_offload"] = True
        elif flag == "-nopo":
            values["no_op_offload"] = take(flag) == "1"
        elif flag in ("--no-repack", "-nr"):
            values["repack"] = False
        elif flag == "--repack":
            if i + 1 < len(tokens) and tokens[i + 1] in ("0", "1"):
                values["repack"] = take(flag) == "1"
            else:
                values["repack"] = True
        elif flag in ("-fit", "--fit"):
            if take(flag) not in ("off", "0", "false"):
                raise PlacetuneError(f"{flag} on lets llama.cpp re-place the tensors at start-up; placetune measures "
                                     "a placement as given: pass -fit off, or run llama-fit-params for its answer")
        elif flag in _IGNORED_WITH_VALUE:
            take(flag)
        else:
            raise PlacetuneError(
                f"unsupported llama.cpp flag {tok!r}; placetune reads -ngl, -ot, --cpu-moe, --n-cpu-moe, -ts, -t, -b, "
                "-ub, -fa, -ctk, -ctv, -c, -np, -fit off, -lm/--no-mmap, --no-op-offload and --repack/--no-repack"
            )
        i += 1
    return Placement(overrides=tuple(overrides), env=tuple(env), **values)


# ---------------------------------------------------------------------------------------------
# Devices and buffer type names





def device_of(buft: str, rpc: Sequence[str] = ()) -> str:
    """The device behind a buffer type name. The one place this is decided.

    CPU_REPACK, AMX and pinned host buffers (CUDA_Host) are RAM. An RPC buffer type names the server's own
    device and its endpoint (`RPC0[127.0.0.1:50052]`), while llama.cpp numbers RPC devices across the
    --rpc list: with rpc given, the k-th endpoint is RPCk (one device per ggml-rpc-server).
    """
    name, _, rest = buft.partition("[")
    name = name.strip()
    if rest and rpc and rest.rstrip("]") in rpc:
        return f"RPC{list(rpc).index(rest.rstrip(']'))}"
    upper = name.upper()
    if upper.startswith(("CPU", "AMX")) or upper.endswith("_HOST"):
        return "CPU"
    return name


def buffer_type(device: str, rpc: Sequence[str] = ()) -> str:
    """llama.cpp's buffer type name for a device an override names: RPCk is `RPC0[endpoint k]`, others as they
    are (llama-server and llama-bench accept only buffer type names in -ot)."""
    m = re.fullmatch(r"RPC(\d+)", device)
    if m and int(m[1]) < len(rpc):
        return f"RPC0[{rpc[int(m[1])]}]"
    return device


def rule_pattern(o: Override) -> str:
    """The regex of an override, as llama.cpp receives it."""
    return o.pattern() if isinstance(o, ExpertRule) else o.pattern
