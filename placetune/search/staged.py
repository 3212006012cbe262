"""The staged search: a walk along the memory frontier from llama.cpp's defaults, then the sampler.

Forty trials do not go far in a space of hundreds of millions of points when most of it does not fit and
the rest is flat except along a few knobs. So before the sampler, the search walks:
  1. the reference (seeds/filled.py): llama.cpp's default knobs, every layer on the accelerator and the
     fewest expert layers in RAM that fit (what --fit would pick, at the search's own margins);
  2. from the best trial so far (the incumbent), one step at a time, in order of how much each moves speed
     in llama.cpp's own measurements: ubatch together with which expert tensors stay in RAM (both trade the
     accelerator's memory: PR 15346 for ubatch), --no-mmap (PR 14990), threads, op offload, flash
     attention, which layers (first, last, a block, interleaved), how far from the memory edge, -ngl,
     batch. Every candidate is re-filled to the edge for its own knobs (a larger ubatch needs a larger
     compute buffer, so fewer experts fit) and kept as far from it as the incumbent is. A pass visits each
     step once; passes repeat while they find something untried;
  3. when a whole pass finds nothing untried, the sampler (TPE) proposes, having learned from every trial
     of the walk.
Every step is a measured trial; nothing is assumed faster. A change measured once is not measured again
because out-of-memory trials have since moved the edge; one that ran out of memory is tried again at the
new edge, OOM_TRIES times at most. What was tried is read from the study's trials, so a resumed study or
another worker continues the walk rather than starting over.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from optuna.trial import FrozenTrial

from placetune.memory import DEFAULT_BATCH, DEFAULT_UBATCH, OP_OFFLOAD_ENV, op_offload_min_batch
from placetune.placement import Placement
from placetune.runners.base import Workload
from placetune.search.frontier import START, Frontier, conditional, default_params, filled_defaults
from placetune.space import ENV_PREFIX, Dimension, SearchSpace

SLACK = "slack"
# The walk's steps, what moves speed most first (see the module docstring); dimensions not named go last.
# ubatch and which expert tensors stay in RAM are walked together: both trade the same accelerator memory
# (a larger ubatch's compute buffer against experts), so the best of each depends on the other.
ORDER: tuple[tuple[str, ...], ...] = (
    ("ubatch", "cpu_moe_kinds"), ("load_mode",), ("threads",), ("no_op_offload",), ("flash_attn",),
    ("cpu_moe_position",), ("split_first",), (SLACK,), ("n_gpu_layers",), ("cpu_moe_start",), ("cpu_moe_stride",),
    ("batch",), ("cache_type_k",), ("cache_type_v",), ("repack",))
# On several cards, which layers' experts stay in RAM decides which card they free, so the layer family and the
# split between the cards come right after the first step there.
SEVERAL_CARDS_FIRST = (("cpu_moe_position",), ("split_first",), ("cpu_moe_start",))
THREAD_SHARES = (0.75, 0.5, 1.0, 0.875)  # the best -t is often below the core count (13 of 16: shared notes)
SLACK_STEPS = (1, 3, 0)
# Steps after which the split between several cards is re-balanced (frontier.balanced): they change which
# cards the expert layers in RAM come from. A split_first step itself tries the neighbouring splits as they are.
MOVES_SET = {"cpu_moe_position", "cpu_moe_start", "cpu_moe_stride", "cpu_moe_kinds", "experts_to"}
NGL_STEPS = (1, 2)
OP_OFFLOAD_KNOB = ENV_PREFIX + OP_OFFLOAD_ENV
OOM_TRIES = 2  # a change that ran out of memory this often, each time a little further from the edge, is done


def ubatch_sizes(workload: Workload, placement: Placement) -> tuple[int, ...]:
    """The token counts of the batches llama.cpp computes for a workload: the prompt and the depth prefix in
    batches of -b tokens, each in ubatches of -ub (the last of each the remainder); one token per generated one."""
    batch = placement.batch or DEFAULT_BATCH
    ubatch = min(placement.ubatch or DEFAULT_UBATCH, batch)
    sizes = {1} if workload.n_gen else set()
    for tokens in (workload.n_prompt, workload.depth):
        while tokens > 0:
            chunk = min(batch, tokens)
            tokens -= chunk
            sizes |= {min(ubatch, chunk), chunk % ubatch or ubatch}
    return tuple(sorted(sizes))


class Walk:
    """Proposes the next trial's parameters, or None when the sampler should take over.

    fits: whether full parameters (pins included) fit by the memory model at the search's current margins;
    flags: the command line a parameter set runs, to know what the study has already tried;
    batches: the token counts of the batches the measured workload runs with a parameter set (ubatch_sizes), to
    skip op offload thresholds that decide none of them differently.
    """

    def __init__(self, space: SearchSpace, facts: dict[str, int], fits: Callable[[dict[str, Any]], bool],
                 flags: Callable[[dict[str, Any]], str],
                 batches: Callable[[dict[str, Any]], Sequence[int]] | None = None) -> None:
        self.space = space
        self.facts = facts
        self._fits = fits
        self.flags = flags
        self.batches = batches
        self.frontier = Frontier(space, facts, self.fits)
        self.defaults = default_params(space, facts)
        dims = [*space.dimension_names(), *([SLACK] if self.frontier.dim else [])]
        order = ORDER
        if self.frontier.splits:
            order = (ORDER[0], *SEVERAL_CARDS_FIRST, *(step for step in ORDER[1:] if step not in SEVERAL_CARDS_FIRST))
        self.order = [tuple(n for n in step if n in dims) for step in order]
        self.order = [step for step in self.order if step]
        named = {n for step in self.order for n in step}
        self.order += [(n,) for n in dims if n not in named and n != self.frontier.dim]
        self.cursor = 0  # the step the walk is at; each pass visits every one once
        self.proposed_in_pass = False

    def fits(self, params: dict[str, Any]) -> bool:
        return self._fits({**self.space.pinned, **params})

    def propose(self, trials: Sequence[FrozenTrial],
                ranked: Sequence[FrozenTrial]) -> tuple[dict[str, Any], str] | None:
        """The next untried candidate and why it is proposed; None when a whole pass found nothing new.

        trials: the study's trials, none of them waiting (a queued trial is run before anything is proposed);
        ranked: the measured ones, best first. The incumbent is the best with search parameters, or a seed
        that ran the reference's very flags. One step at a time: a trial that only noise makes the
        incumbent does not restart the pass.
        """
        tried = {t.user_attrs.get("flags") for t in trials}
        # A change already measured once is not measured again only because out-of-memory trials since have
        # moved the memory edge; one that ran out of memory may be, at the new edge, until it has OOM_TRIES times.
        measured = {self._identity(t.params) for t in trials
                    if t.params and not t.user_attrs.get("reason", "").startswith(("predicted not to fit", "oom"))}
        ooms = Counter(self._identity(t.params) for t in trials
                       if t.params and t.user_attrs.get("reason", "").startswith("oom"))
        measured |= {identity for identity, n in ooms.items() if n >= OOM_TRIES}

        def untried(candidate: dict[str, Any] | None, by_identity: bool = True) -> dict[str, Any] | None:
            if candidate is None or not self.fits(candidate):
                return None
            candidate = conditional(candidate, self.space)
            if self.flags(candidate) in tried or (by_identity and self._identity(candidate) in measured):
                return None
            return candidate

        reference = filled_defaults(self.space, self.facts, self.fits)  # seeds.filled's candidate
        if untried(reference) is not None:
            return reference, "reference: llama.cpp's default knobs, filled to the memory edge"
        same = self.flags(reference) if reference is not None else None
        incumbent = next((t for t in ranked if t.params or t.user_attrs.get("flags") == same), None)
        if incumbent is None:
            return None
        base = {**self.defaults, **(incumbent.params or reference or {})}
        slack = self.frontier.slack(base)
        for _ in range(2 * len(self.order) + 1):
            if self.cursor >= len(self.order):
                if not self.proposed_in_pass:
                    self.cursor = 0  # converged: the sampler proposes; a new incumbent may open a new pass
                    return None
                self.cursor, self.proposed_in_pass = 0, False
            for changes, why in self.moves(self.order[self.cursor], base):
                if SLACK in changes:
                    candidate = untried(self.frontier.place(base, slack=changes[SLACK]), by_identity=False)
                else:  # a step that moves the expert set moves memory between cards: the split follows it
                    candidate = untried(self.frontier.place({**base, **changes}, slack=slack,
                                                            balance=bool(MOVES_SET & set(changes))))
                if candidate is not None:
                    self.proposed_in_pass = True
                    return candidate, f"from trial {incumbent.number}: {why}"
            self.cursor += 1
        return None

    def _identity(self, params: dict[str, Any]) -> str:
        """A candidate apart from its fill: what a change of one knob or layer family is about."""
        filled = {**self.defaults, **params, **({self.frontier.dim: 1} if self.frontier.dim else {})}
        rest = {k: v for k, v in conditional(filled, self.space).items() if k != self.frontier.dim}
        if self.frontier.centred(params):  # a block that grows from its centre is about that centre
            rest[START] = self.frontier.centre(params)
        return repr(sorted(rest.items()))

    def moves(self, step: tuple[str, ...], base: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
        """Changes of the incumbent in one step's parameters (every combination of a joint step; a layer
        family comes with where it starts)."""
        if step == (SLACK,):
            return [({SLACK: s}, f"{s} step(s) short of the memory edge") for s in SLACK_STEPS]
        dims = {d.name: d for d in self.space.dimensions}
        out: list[tuple[dict[str, Any], str]] = []
        for combo in itertools.product(*(self._values(dims[name], base) for name in step)):
            changes = {name: v for name, v in zip(step, combo, strict=True) if v != base.get(name)}
            if not changes:
                continue
            if changes.get("cpu_moe_position") in ("block", "interleaved") and "cpu_moe_start" in dims:
                # a block from the middle (on several cards centred there: frontier.filled); an interleaved set
                # ending at the last layer, where "last" puts them
                low, high = self.space.bounds(dims["cpu_moe_start"], self.facts)
                middle = (low + high) // 2
                if self.frontier.splits:
                    middle = max(low, middle - int(base.get("cpu_moe_layers") or 0) // 2)
                changes["cpu_moe_start"] = middle if changes["cpu_moe_position"] == "block" else high
            out.append((changes, ", ".join(f"{k} = {x}" for k, x in changes.items())))
        return out

    def _values(self, dim: Dimension, base: dict[str, Any]) -> list[Any]:
        """The values a step tries for one parameter, the incumbent's own first."""
        if dim.choices is not None:
            values = list(dim.choices)
        else:
            low, high = self.space.bounds(dim, self.facts)
            values = [v for v in self._int_values(dim.name, base, low, high) if low <= v <= high]
        values = list(dict.fromkeys([base.get(dim.name), *values]))
        if dim.name == OP_OFFLOAD_KNOB and self.batches is not None:
            values = self._offload_classes(values, base)
        return values

    def _offload_classes(self, values: list[Any], base: dict[str, Any]) -> list[Any]:
        """One op offload threshold per way of deciding the workload's batches (the incumbent's first): a
        threshold offloads a batch of at least that many tokens (ggml-cuda.cu), so thresholds with no batch
        between them run the same measurement, and measuring both would measure noise."""
        sizes = self.batches(base)

        def decides(value: Any) -> tuple[bool, ...]:
            threshold = op_offload_min_batch(Placement(env=((OP_OFFLOAD_ENV, str(value)),)))
            return tuple(size >= threshold for size in sizes)

        kept: dict[tuple[bool, ...], Any] = {}
        for value in values:
            kept.setdefault(decides(value), value)
        return list(kept.values())

    def _int_values(self, name: str, base: dict[str, Any], low: int, high: int) -> list[int]:
        if name == "threads":
            return [max(1, round(share * self.facts["physical_cores"])) for share in THREAD_SHARES]
        if name == "n_gpu_layers":
            return [high, *(high - step for step in NGL_STEPS), low]  # low: nothing offloaded, best on some machines
        if name == "cpu_moe_start":
            if self.frontier.splits:  # a block over two cards' boundary: moved by one layer either way
                return [int(base.get(name, low)) - 1, int(base.get(name, low)) + 1, low, (low + high) // 2, high]
            return [low, (low + high) // 2, high]
        if name == "split_first":
            return [int(base.get(name, low)) - 1, int(base.get(name, low)) + 1]
        return [low, high, int(base.get(name, low))]
