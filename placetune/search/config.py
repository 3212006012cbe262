"""Everything one search needs besides the runner, and the serving context it measures for."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from placetune.anatomy import Anatomy
from placetune.errors import PlacetuneError
from placetune.hardware import Machine
from placetune.memory import DEFAULT_MARGIN
from placetune.placement import Placement
from placetune.runners.base import Workload
from placetune.search.objective import check_objective
from placetune.space import SearchSpace, facts_for, to_placement

KNOB_PARAMS = ("threads", "batch", "ubatch", "flash_attn", "cache_type_k", "cache_type_v", "load_mode",
               "no_op_offload", "repack")
STRATEGIES = ("staged", "tpe")  # staged.py's walk along the memory frontier, then TPE; or TPE from the seeds on
DEFAULT_CTX = 8192  # llama-server's own default (-c 0) is the training context: 40k-256k tokens on MoE models


@dataclass(frozen=True)
class Serving:
    """The serving context a placement is sized, measured and exported for: llama-server's -c and -np.

    Every measured placement carries it, so the KV cache that was predicted and measured is the one a
    pasted server line allocates. With -np N slots (and llama-server's default split cache for an explicit
    -np) each request gets ctx / N tokens.
    """

    ctx: int
    slots: int = 1

    def __post_init__(self) -> None:
        if self.ctx < 1 or self.slots < 1:
            raise PlacetuneError(f"--ctx {self.ctx} and --slots {self.slots} must be at least 1")

    @property
    def per_slot(self) -> int:
        return self.ctx // self.slots

    def apply(self, placement: Placement) -> Placement:
        return replace(placement, ctx=self.ctx, parallel=self.slots)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def serving_for(anatomy: Anatomy, workload: Workload, ctx: int | None = None, slots: int = 1) -> Serving:
    """--ctx as given, else 8192 (or the training context if smaller) and at least what the workload needs.

    The measured workload must fit in one slot: a depth the serving context cannot hold is refused here.
    """
    need = workload.context_needed
    if ctx is None:
        train = anatomy.facts.n_ctx_train or DEFAULT_CTX
        ctx = max(min(DEFAULT_CTX, train), need) * slots
    serving = Serving(ctx, slots)
    if serving.per_slot < need:
        raise PlacetuneError(
            f"the workload needs {need} tokens of context (depth {workload.depth} + prompt {workload.n_prompt} + "
            f"generated {workload.n_gen} + 1) but --ctx {ctx} gives each of {slots} slot(s) {serving.per_slot}; "
            "raise --ctx or shrink -d/-p/-n")
    return serving


@dataclass
class SearchConfig:
    """Everything one search needs besides the runner.

    `bandwidths` and `seed_sources` are for callers that describe the machine themselves (the twin
    benchmark): given, the search runs no RAM probe and no llama-fit-params.
    """

    model: Path
    anatomy: Anatomy
    machine: Machine
    space: SearchSpace
    workload: Workload
    serving: Serving
    objective: str = "latency"
    strategy: str = "staged"
    n_trials: int = 30
    timeout_s: float | None = None
    seed: int = 0
    storage: str = "sqlite:///results/placetune.db"
    study_name: str | None = None
    budgets: dict[str, int] = field(default_factory=dict)
    margin: int = DEFAULT_MARGIN
    min_pp: float | None = None
    top_k: int = 3
    final_rounds: int = 2
    screen: bool = True
    rpc: Sequence[str] = ()
    runner_name: str = "embedded"
    bin_dir: Path | None = None
    heartbeat_s: int = 60
    grace_s: int | None = None
    allow_mixed_hardware: bool = False
    allow_colocated: bool = False
    bandwidths: dict[str, Any] | None = None
    seed_sources: Sequence[Any] | None = None
    on_note: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        """Options are checked before a study or a folder is written, so a typo costs nothing."""
        check_objective(self.objective)
        if self.strategy not in STRATEGIES:
            raise PlacetuneError(f"--strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        for flag, value in (("--n-trials", self.n_trials), ("--top-k", self.top_k),
                            ("--final-rounds", self.final_rounds), ("--heartbeat", self.heartbeat_s)):
            if value < 1:
                raise PlacetuneError(f"{flag} must be at least 1, got {value}")
        for flag, number in (("--timeout", self.timeout_s), ("--min-pp", self.min_pp)):
            if number is not None and not 0 < number < math.inf:
                raise PlacetuneError(f"{flag} must be a positive number, got {number!r}")
        if self.grace_s is not None and self.grace_s <= self.heartbeat_s:
            raise PlacetuneError(f"--grace {self.grace_s} must be longer than --heartbeat {self.heartbeat_s}: a "
                                 "live worker's trial would be taken for dead between two heartbeats")
        self.space.check(self.facts)

    @property
    def facts(self) -> dict[str, int]:
        """What the space's bounds may name on this model and machine (layers, cores, ...)."""
        return facts_for(self.anatomy, self.machine.physical_cores)

    @property
    def grace(self) -> int:
        """Seconds without a heartbeat after which a worker, and its running trial, count as dead."""
        return self.grace_s or 3 * self.heartbeat_s

    @property
    def devices(self) -> list[str]:
        """Accelerators llama.cpp will fill, in its order (RPC servers first)."""
        return [d.name for d in self.machine.accelerators]

    @property
    def n_ctx(self) -> int:
        return self.serving.ctx

    def placement_of(self, params: dict[str, Any]) -> Placement:
        """A point of the search space as it is run: its pins, the devices it splits over, the serving context."""
        return self.serving.apply(to_placement({**self.space.pinned, **params}, self.anatomy, self.devices))

    def fixed(self, placement: Placement) -> Placement:
        """A seed's placement as it is run: the serving context, and the knobs the user pinned with --set.

        A pin is the user's own constraint (say --set repack=false where repacking crashes), so it binds the
        baselines too, and their flags show it; the seeds' placements themselves are never changed.
        """
        knobs = {k: v for k, v in self.space.pinned.items() if k in KNOB_PARAMS}
        return self.serving.apply(replace(placement, **knobs))

    def capacity(self) -> dict[str, int]:
        """Budget if given, else what the device reports free; CPU: total RAM (mmap pages are reclaimable)."""
        cap = {d.name: d.free_bytes for d in self.machine.accelerators}
        cap["CPU"] = self.machine.ram_total_bytes
        cap.update(self.budgets)
        return cap

    def default_study_name(self) -> str:
        return f"{self.model.stem}-{self.anatomy.header_hash[:8]}-{self.machine.fingerprint()}-{self.objective}"
