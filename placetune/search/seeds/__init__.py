"""Seeds: placements measured before the sampler starts, so a search can only improve on them.

Baselines are what a user gets or tries by hand (llama.cpp out of the box, everything on the
accelerator, all experts in RAM, no offload). They are measured exactly as their label says: their
Placement is fixed, knobs they leave out stay at llama.cpp's defaults, and the sampler never fills
them in. Candidates are placetune's own guesses (the bandwidth model's pick): points of the search
space, so the sampler learns from them.

A new seed kind is one module here with a class that has a `kind` and a `seeds(context)` method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from placetune.memory import FitVerdict
from placetune.placement import Placement

if TYPE_CHECKING:
    from placetune.search.config import SearchConfig

BASELINE, CANDIDATE = "baseline", "candidate"


@dataclass(frozen=True)
class Seed:
    """One named placement to measure first. A candidate also carries its search-space parameters."""

    name: str
    placement: Placement
    role: Literal["baseline", "candidate"]
    params: dict[str, Any] | None = None
    kind: str = ""  # the source's kind, filled in by the search


@dataclass
class SeedContext:
    """What seed kinds may use: the configuration, the model and machine facts, feasibility, bandwidths."""

    config: SearchConfig
    facts: dict[str, int]
    feasibility: Callable[[Placement], FitVerdict]
    bandwidths: Callable[[], dict[str, Any]]
    notes: list[str] = field(default_factory=list)


class SeedSource(Protocol):
    kind: str

    def seeds(self, context: SeedContext) -> list[Seed]: ...


def standard_sources() -> Sequence[SeedSource]:
    """The seed kinds every search uses unless its configuration names others."""
    from placetune.search.seeds.by_hand import ByHand
    from placetune.search.seeds.even_split import EvenSplit
    from placetune.search.seeds.filled import FilledDefaults
    from placetune.search.seeds.fit import LlamaFitParams
    from placetune.search.seeds.roofline import Roofline

    return (LlamaFitParams(), ByHand(), EvenSplit(), Roofline(), FilledDefaults())
