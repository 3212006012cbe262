"""What a user tries by hand: everything on the accelerator, all experts in RAM, no offload.

On a machine without an accelerator there is nothing to place, and the one baseline is llama.cpp's
defaults with the serving context. Knobs the user pinned with --set bind these too (config.fixed).
"""

from __future__ import annotations

from placetune.placement import ALL_LAYERS, ExpertRule, Placement
from placetune.search.seeds import BASELINE, Seed, SeedContext


class ByHand:
    kind = "by hand"

    def seeds(self, context: SeedContext) -> list[Seed]:
        fixed = context.config.fixed
        if not context.config.devices:
            return [Seed("llama.cpp defaults", fixed(Placement()), BASELINE)]
        seeds = [Seed("everything on the accelerator (-ngl all)", fixed(Placement(n_gpu_layers=ALL_LAYERS)),
                      BASELINE)]
        if context.facts["n_moe_layers"]:
            every_expert = Placement(n_gpu_layers=ALL_LAYERS, overrides=(ExpertRule(layers=None),))
            seeds.append(Seed("all experts in RAM (-ngl all --cpu-moe)", fixed(every_expert), BASELINE))
        seeds.append(Seed("no offload (-ngl 0)", fixed(Placement(n_gpu_layers=0)), BASELINE))
        return seeds
