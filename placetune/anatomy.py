"""GGUF anatomy: model facts and every tensor's group, size and type, read from the header only.

The `gguf` reader memory-maps the file, so nothing here touches weight data: a 600 GB model
inspects in about a second. Tensor names follow llama.cpp's conventions (`blk.N.ffn_up_exps.weight`).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
import struct
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from placetune.errors import PlacetuneError
from placetune.escape import one_line


class Group(StrEnum):
    """Where a tensor belongs for placement and accounting."""

    EMBED = "embed"  # token embeddings and the output head
    ATTN = "attn"
    NORM = "norm"
    FFN = "ffn"  # dense feed-forward
    ROUTER = "router"  # ffn_gate_inp, exp_probs_b
    SHEXP = "shexp"  # shared expert
    EXPERT = "expert"  # routed experts (see TensorInfo.expert_kind)
    OTHER = "other"


# The one expert-name grammar, mirroring llama.cpp's own (common/common.h LLM_FFN_EXPS_REGEX): --cpu-moe
# and --n-cpu-moe select exactly the tensors LLAMA_EXPERTS_REGEX matches, GroveMoE's chunk experts
# (`chexps`) included. Kinds are listed in llama.cpp's order so rendered rules read like its own.
EXPERT_KINDS: tuple[str, ...] = ("up", "down", "gate", "gate_up")
EXPERT_INFIX = "_(ch|)exps"
LLAMA_EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)" + EXPERT_INFIX

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
# Archs whose layers alternate sliding-window and full attention, with llama.cpp's default pattern
# (src/models/<arch>.cpp: load_swa_pattern(ml, n_pattern, dense_first)); a GGUF's own
# `attention.sliding_window_pattern` (an int or one bool per layer) overrides it.
_SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gpt-oss": (2, False), "gemma2": (2, False), "gemma3": (6, False), "cohere2": (4, False),
    "exaone4": (4, False), "exaone-moe": (4, False), "olmo2": (4, False), "afmoe": (4, False),
    "plamo3": (8, False), "smallthinker": (4, True),
}
# Tables read one row per token (get_rows), not whole.
LOOKUP_TABLES = ("token_embd", "per_layer_token_embd", "position_embd", "token_types")
_EXPERT_RE = re.compile(r"\.ffn_(gate_up|gate|up|down)_(?:ch|)exps")
_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as llama.cpp will see it."""

    name: str
    layer: int | None
    group: Group
    expert_kind: str | None  # gate / up / down / gate_up for routed experts
    is_bias: bool
    ggml_type: str
    shape: tuple[int, ...]
    n_bytes: int


@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters that decide memory and speed."""

    arch: str
    name: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_leading_dense: int
    file_type: str
    n_ff: int = 0  # dense FFN width (widest layer)
    n_ff_exp: int = 0  # one routed expert's FFN width
    # Per layer, as llama.cpp reads them (GGUF arrays or one value for all): what the KV cache is sized by.
    n_head_kv_layers: tuple[int, ...] = ()
    swa_window: int = 0  # sliding-window size in tokens; 0 when no layer uses one
    swa_layers: tuple[bool, ...] = ()  # True where a layer attends through the sliding window
    head_dim_k_swa: int = 0
    head_dim_v_swa: int = 0
    # MLA (DeepSeek-V2/V3, Kimi): the cache holds one compressed latent per token, K only.
    kv_lora_rank: int = 0
    head_dim_k_mla: int = 0
    head_dim_v_mla: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def is_mla(self) -> bool:
        return self.head_dim_k_mla > 0 and self.head_dim_v_mla > 0


def classify(name: str) -> tuple[Group, str | None, bool]:
    """Group of a tensor by its llama.cpp name, plus expert kind and whether it is a bias."""
    is_bias = name.endswith(".bias")
    expert = _EXPERT_RE.search(name)
    if expert:
        return Group.EXPERT, expert.group(1), is_bias
    base = name.removesuffix(".weight").removesuffix(".bias")
    leaf = base.split(".")[-1]
    if leaf.endswith("_shexp"):
        return Group.SHEXP, None, is_bias
    if leaf in ("ffn_gate_inp", "exp_probs_b") or leaf.startswith("ffn_gate_inp"):
        return Group.ROUTER, None, is_bias
    if leaf.endswith("norm") or "_norm" in leaf:
        return Group.NORM, None, is_bias
    if leaf in ("token_embd", "output", "token_types", "position_embd", "per_layer_token_embd"):
        return Group.EMBED, None, is_bias
    if leaf.startswith("attn") or leaf.startswith("ssm"):
        return Group.ATTN, None, is_bias
    if leaf.startswith("ffn"):
        return Group.FFN, None, is_bias
    return Group.OTHER, None, is_bias


@dataclass
class Anatomy:
    """A model's facts and tensors, with the byte accounting every other stage builds on."""

    paths: list[str]
    facts: ModelFacts
    tensors: list[TensorInfo]
    file_bytes: int
    header_hash: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors if t.group is Group.EXPERT)

    @property
    def common_bytes(self) -> int:
        return self.total_bytes - self.expert_bytes

    @property
    def active_fraction(self) -> float:
        """Share of routed expert bytes one token reads: used / count (1.0 for dense models)."""
        f = self.facts
        return f.n_expert_used / f.n_expert if f.n_expert else 1.0

    @property
    def active_bytes(self) -> int:
        """Bytes read per generated token (see `reads_per_token`), rounded to whole bytes."""
        return round(sum(n for _, n in self.reads_per_token()))

    def reads_per_token(self) -> list[tuple[TensorInfo, float]]:
        """Every tensor one generated token reads, with the bytes it reads: the one source of that figure.

        Routed experts are read x used / count; lookup tables (token_embd and friends) one row per
        token (get_rows); everything else whole. A tied output head (no output.weight) is listed a
        second time, as `output.weight`, because llama.cpp reads token_embd in full for the logits
        on the output layer's device.
        """
        out = [(t, _read_bytes(t, self.active_fraction)) for t in self.tensors]
        names = {t.name for t in self.tensors}
        if "output.weight" not in names and "token_embd.weight" in names:
            embd = next(t for t in self.tensors if t.name == "token_embd.weight")
            out.append((replace(embd, name="output.weight"), float(embd.n_bytes)))
        return out

    def layer_table(self) -> list[dict[str, Any]]:
        """Per layer: bytes per group (experts split by kind) and the quant types seen."""
        rows: dict[int | None, dict[str, Any]] = {}
        for t in self.tensors:
            row = rows.setdefault(t.layer, {"layer": t.layer, "types": set()})
            key = column_of(t)
            row[key] = row.get(key, 0) + t.n_bytes
            if not t.is_bias and t.group is not Group.NORM:
                row["types"].add(t.ggml_type)
        out = []
        for layer in sorted(rows, key=lambda x: -1 if x is None else x):
            row = rows[layer]
            row["types"] = sorted(row["types"])
            row["total"] = sum(v for k, v in row.items() if k not in ("layer", "types"))
            out.append(row)
        return out

    def group_totals(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            totals[column_of(t)] += t.n_bytes
        return dict(totals)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON document of `placetune inspect --json`."""
        return {
            "paths": self.paths,
            "header_hash": self.header_hash,
            "facts": asdict(self.facts),
            "totals": {
                "total_bytes": self.total_bytes,
                "common_bytes": self.common_bytes,
                "expert_bytes": self.expert_bytes,
                "active_bytes": self.active_bytes,
                "file_bytes": self.file_bytes,
                "groups": self.group_totals(),
            },
            "layers": self.layer_table(),
            "tensors": [
                {**asdict(t), "group": str(t.group), "shape": list(t.shape)} for t in self.tensors
            ],
        }


def _read_bytes(t: TensorInfo, active_fraction: float) -> float:
    if t.group is Group.EXPERT:
        return t.n_bytes * active_fraction
    leaf = t.name.removesuffix(".weight").split(".")[-1]
    if leaf in LOOKUP_TABLES and len(t.shape) >= 2 and t.shape[-1]:
        return t.n_bytes / t.shape[-1]
    return float(t.n_bytes)


def column_of(t: TensorInfo) -> str:
    """Table column for a tensor: its group, or `exp_<kind>[_bias]` for routed experts."""
    if t.group is Group.EXPERT:
        return f"exp_{t.expert_kind}" + ("_bias" if t.is_bias else "")
    return str(t.group)


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model (`-00001-of-0000N.gguf`), or just the file itself."""
    m = _SHARD_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise PlacetuneError(f"{path}: shard(s) missing: {', '.join(missing)}; put all {count} shards together")
    return paths


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the data section

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape) * size // block


@dataclass
class _Header:
    """What placetune needs from a GGUF header: scalar metadata, array lengths, the tensor table."""

    fields: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[_Tensor]
    data_offset: int


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SMALL_ARRAY = 4096  # numeric arrays up to this long (per-layer values) are kept; longer ones only counted


def _read_header(path: Path) -> _Header:
    """Parse the GGUF header without touching tensor data.

    gguf's own GGUFReader builds a numpy view of every array element, which takes seconds for a
    150k-token vocabulary; here string arrays are skipped by their lengths, so a 600 GB model's
    header parses in well under a second.
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0
        where = "the header"

        def room(n: int, what: str) -> None:
            if n < 0 or pos + n > len(mm):
                raise _Corrupt(f"{what} runs past the end of the file (at byte {pos}, {len(mm)} in all)")

        def take(fmt: str) -> Any:
            nonlocal pos
            room(struct.calcsize("<" + fmt), where)
            value = struct.unpack_from("<" + fmt, mm, pos)[0]
            pos += struct.calcsize("<" + fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("Q")
            room(n, f"a text of {n} bytes in {where}")
            text = mm[pos : pos + n].decode("utf-8", errors="replace")
            pos += n
            return text

        if mm[:4] != b"GGUF":
            raise _BadMagic
        pos = 4
        version = take("I")
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version} is not one llama.cpp reads (2 or 3)")
        n_tensors, n_kv = take("Q"), take("Q")
        # Every entry takes at least 12 bytes: a count that cannot fit in the file is damage, not a model.
        for count, what in ((n_kv, "metadata entries"), (n_tensors, "tensors")):
            if count * 12 > len(mm):
                raise _Corrupt(f"the header claims {count} {what}, more than the file could hold")
        fields: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for i in range(n_kv):
            where = f"metadata entry {i + 1} of {n_kv}"
            key = string()
            where = f"metadata {key!r}"
            vtype = take("I")
            if vtype == 8:
                fields[key] = string()
            elif vtype == 9:
                etype, count = take("I"), take("Q")
                lengths[key] = count
                if etype == 8:
                    room(8 * count, f"a list of {count} texts in {where}")
                    for _ in range(count):
                        skip = take("Q")  # take() moves pos past the length first
                        room(skip, f"a text of {skip} bytes in {where}")
                        pos += skip
                elif etype in _SCALARS:
                    size = struct.calcsize(_SCALARS[etype])
                    room(size * count, f"a list of {count} values in {where}")
                    if count <= _SMALL_ARRAY:
                        fields[key] = list(struct.unpack_from(f"<{count}{_SCALARS[etype]}", mm, pos))
                    pos += size * count
                else:
                    raise _Corrupt(f"{where} is a list of an unknown value type ({etype})")
            elif vtype in _SCALARS:
                fields[key] = take(_SCALARS[vtype])
            else:
                raise _Corrupt(f"{where} has an unknown value type ({vtype})")
        tensors = []
        for i in range(n_tensors):
            where = f"tensor {i + 1} of {n_tensors}"
            name = string()
            where = f"tensor {name!r}"
            n_dims = take("I")
            if n_dims > 8:
                raise _Corrupt(f"{where} claims {n_dims} dimensions (GGUF allows at most 4)")
            dims = tuple(take("Q") for _ in range(n_dims))
            type_id = take("I")
            try:
                ggml_type = GGMLQuantizationType(type_id)
            except ValueError:
                raise _Corrupt(f"{where} has tensor type {type_id}, which this gguf library does not know "
                               "(a newer quantization? upgrade gguf)") from None
            tensors.append(_Tensor(name, dims, ggml_type, take("Q")))
        alignment = int(fields.get("general.alignment", 32))
        if alignment <= 0:
            raise _Corrupt(f"general.alignment is {alignment}")
        data_offset = pos + (-pos % alignment)
        return _Header(fields, lengths, tensors, data_offset)


class _Corrupt(Exception):
    """A header that cannot be a GGUF model's, said in terms of the file."""


class _BadMagic(Exception):
    pass


def _open(path: Path) -> _Header:
    if not path.exists():
        raise PlacetuneError(f"{path}: no such file; give the path of a .gguf model")
    if path.is_dir():
        raise PlacetuneError(f"{path} is a directory; give the path of a .gguf model file")
    if path.stat().st_size < 24:
        raise PlacetuneError(f"{path} is not a GGUF file (too short to hold a header)")
    try:
        header = _read_header(path)
    except _BadMagic:
        raise PlacetuneError(f"{path} is not a GGUF file (bad magic); give a .gguf model") from None
    except _Corrupt as exc:
        raise PlacetuneError(f"{path} is truncated or damaged: {exc}; download or convert it again") from None
    size = path.stat().st_size
    for t in header.tensors:
        end = header.data_offset + t.offset + t.n_bytes
        if end > size:
            raise PlacetuneError(
                f"{path} is truncated: tensor {t.name} ends at byte {end} but the file has {size}; download it again"
            )
    return header


def _field(header: _Header, key: str, default: Any = None) -> Any:
    return header.fields.get(key, default)


def _int_field(header: _Header, key: str, default: int = 0) -> int:
    value = _field(header, key, default)
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): the largest is what memory needs
        return int(max(value)) if value else default
    return int(value)


def _per_layer(header: _Header, key: str, n_layers: int, default: int) -> tuple[int, ...]:
    """A value llama.cpp reads per layer (get_key_or_arr): a GGUF array, or one value for every layer."""
    value = _field(header, key, default)
    if isinstance(value, list):
        return tuple(int(v) for v in value[:n_layers]) + (default,) * (n_layers - len(value))
    return (int(value),) * n_layers


def _swa_layers(header: _Header, arch: str, n_layers: int) -> tuple[int, tuple[bool, ...]]:
    """Sliding window and which layers use it, as llama.cpp's load_swa_pattern decides (llama-hparams.cpp)."""
    window = _int_field(header, f"{arch}.attention.sliding_window")
    if arch not in _SWA_PATTERNS or window <= 0:
        return 0, (False,) * n_layers
    pattern = _field(header, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return window, tuple(bool(x) for x in pattern[:n_layers]) + (False,) * (n_layers - len(pattern))
    n_pattern, dense_first = _SWA_PATTERNS[arch]
    if pattern is not None:
        n_pattern = int(pattern)
    if dense_first:
        return window, tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layers))
    return window, tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layers))


def _tensor_width(tensors: list[TensorInfo], leaf: str) -> int:
    widths = [t.shape[1] for t in tensors if t.name.endswith(leaf) and len(t.shape) >= 2]
    return max(widths, default=0)


def _facts(reader: _Header, tensors: list[TensorInfo]) -> ModelFacts:
    arch = str(_field(reader, "general.architecture", "unknown"))
    a = arch

    n_layers = _int_field(reader, f"{a}.block_count")
    if not n_layers:
        layers = {t.layer for t in tensors if t.layer is not None}
        n_layers = max(layers) + 1 if layers else 0
    n_embd = _int_field(reader, f"{a}.embedding_length")
    n_head = _int_field(reader, f"{a}.attention.head_count")
    n_head_kv = _int_field(reader, f"{a}.attention.head_count_kv", n_head)
    default_dim = n_embd // n_head if n_head else 0
    n_expert = _int_field(reader, f"{a}.expert_count")
    n_vocab = reader.array_lengths.get("tokenizer.ggml.tokens") or _int_field(reader, f"{a}.vocab_size")
    n_shared = _int_field(reader, f"{a}.expert_shared_count")
    if not n_shared and any(t.group is Group.SHEXP for t in tensors):
        n_shared = 1
    leading = _int_field(reader, f"{a}.leading_dense_block_count")
    if not leading and n_expert:
        moe_layers = {t.layer for t in tensors if t.group is Group.EXPERT}
        leading = next((i for i in range(n_layers) if i in moe_layers), 0)
    weight_groups = (Group.EMBED, Group.ATTN, Group.FFN, Group.SHEXP, Group.EXPERT)
    types = sorted({t.ggml_type for t in tensors if t.group in weight_groups and not t.is_bias and len(t.shape) >= 2})
    head_dim_k = _int_field(reader, f"{a}.attention.key_length", default_dim)
    head_dim_v = _int_field(reader, f"{a}.attention.value_length", default_dim)
    swa_window, swa_layers = _swa_layers(reader, a, n_layers)
    n_head_kv_layers = _per_layer(reader, f"{a}.attention.head_count", n_layers, 0)  # llama.cpp's default: n_head
    if f"{a}.attention.head_count_kv" in reader.fields:
        n_head_kv_layers = _per_layer(reader, f"{a}.attention.head_count_kv", n_layers, 0)
    return ModelFacts(
        arch=arch,
        name=str(_field(reader, "general.name", "")),
        n_layers=n_layers,
        n_ctx_train=_int_field(reader, f"{a}.context_length"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=n_vocab,
        n_expert=n_expert,
        n_expert_used=_int_field(reader, f"{a}.expert_used_count"),
        n_expert_shared=n_shared,
        n_leading_dense=leading,
        file_type="/".join(types) or "unknown",
        n_ff=_int_field(reader, f"{a}.feed_forward_length") or _tensor_width(tensors, "ffn_up.weight"),
        n_ff_exp=_int_field(reader, f"{a}.expert_feed_forward_length") or _tensor_width(tensors, "ffn_up_exps.weight"),
        n_head_kv_layers=n_head_kv_layers,
        swa_window=swa_window,
        swa_layers=swa_layers,
        head_dim_k_swa=_int_field(reader, f"{a}.attention.key_length_swa", head_dim_k),
        head_dim_v_swa=_int_field(reader, f"{a}.attention.value_length_swa", head_dim_v),
        kv_lora_rank=_int_field(reader, f"{a}.attention.kv_lora_rank"),
        head_dim_k_mla=_int_field(reader, f"{a}.attention.key_length_mla"),
        head_dim_v_mla=_int_field(reader, f"{a}.attention.value_length_mla"),
    )


def _header_hash(paths: list[Path], readers: list[_Header]) -> str:
    """Hash of the headers (metadata and tensor table): identifies a model without reading weights."""
    h = hashlib.sha256()
    for path, reader in zip(paths, readers, strict=True):
        with open(path, "rb") as fh:
            h.update(fh.read(reader.data_offset))
    return h.hexdigest()[:16]


def read_anatomy(path: str | os.PathLike[str]) -> Anatomy:
    """Read a (possibly sharded) GGUF model's anatomy without loading its weights."""
    first = Path(path)
    try:
        str(first).encode("utf-8")
    except UnicodeEncodeError:
        # Such a name cannot go into a study, best.json or a UTF-8 script; llama.cpp's own logs mangle it too.
        raise PlacetuneError(f"model path {one_line(os.fsdecode(first))!r} is not valid UTF-8; rename the file "
                             "(or link it) to a UTF-8 name") from None
    paths = shard_paths(first) if first.exists() else [first]
    return _anatomy(paths, [_open(p) for p in paths], sum(p.stat().st_size for p in paths))


def read_header_anatomy(path: str | os.PathLike[str], file_bytes: int) -> Anatomy:
    """The anatomy of a header written without its tensor data (synth.planned_anatomy): the same reader and
    facts as a real file, for a model that is never written."""
    p = Path(path)
    return _anatomy([p], [_read_header(p)], file_bytes)


def _anatomy(paths: list[Path], readers: list[_Header], file_bytes: int) -> Anatomy:
    tensors: list[TensorInfo] = []
    for reader in readers:
        for t in reader.tensors:
            group, kind, is_bias = classify(t.name)
            m = _LAYER_RE.match(t.name)
            tensors.append(
                TensorInfo(
                    name=t.name,
                    layer=int(m.group(1)) if m else None,
                    group=group,
                    expert_kind=kind,
                    is_bias=is_bias,
                    ggml_type=t.ggml_type.name,
                    shape=t.shape,
                    n_bytes=t.n_bytes,
                )
            )
    if not tensors:
        raise PlacetuneError(f"{paths[0]} holds no tensors; is it a vocab-only GGUF?")
    return Anatomy(
        paths=[str(p) for p in paths],
        facts=_facts(readers[0], tensors),
        tensors=tensors,
        file_bytes=file_bytes,
        header_hash=_header_hash(paths, readers),
    )
