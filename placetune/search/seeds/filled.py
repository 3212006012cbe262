"""placetune's reference candidate: llama.cpp's default knobs, the accelerator filled to the memory edge.

Every layer on the accelerator and the fewest expert layers in RAM (the last ones, as --fit picks them)
that the memory model says fit, at the search's own margins: the point a user who sets nothing would
want --fit to give, expressed in the search space. It is a candidate, so the sampler and the staged walk
learn from it, and the walk starts from it.
"""

from __future__ import annotations

from typing import Any

from placetune.search.frontier import filled_defaults
from placetune.search.seeds import CANDIDATE, Seed, SeedContext


class FilledDefaults:
    kind = "defaults filled to the memory edge"

    def seeds(self, context: SeedContext) -> list[Seed]:
        c = context.config
        if not c.devices:
            return []

        def fits(params: dict[str, Any]) -> bool:
            return context.feasibility(c.placement_of(params)).fits

        params = filled_defaults(c.space, context.facts, fits)
        if params is None:
            context.notes.append("no reference candidate: nothing fits even with every expert in RAM")
            return []
        return [Seed("llama.cpp's defaults, filled to the memory edge",
                     c.placement_of(params), CANDIDATE, params)]
