"""What users with several accelerators write by hand: layers split evenly (-ts 1,1,...), and experts either
kept off the cards with --n-cpu-moe, or balanced with one -ot rule per card.

--n-cpu-moe under -sm layer leaves every accelerator-resident expert on the cards that hold the last
layers (llama.cpp issues 15263, 15136), so people pin each card's expert layers to it explicitly and send
the rest to RAM. Both recipes are baselines: measured exactly as written, at the fewest experts in RAM
that the memory model says fit.
"""

from __future__ import annotations

from placetune.device_bytes import layer_devices
from placetune.monotone import first_true, last_true
from placetune.placement import ALL_LAYERS, ExpertRule, Placement
from placetune.search.seeds import BASELINE, Seed, SeedContext
from placetune.space import moe_layers


class EvenSplit:
    kind = "even split"

    def seeds(self, context: SeedContext) -> list[Seed]:
        c = context.config
        layers = moe_layers(c.anatomy)
        if len(c.devices) < 2 or not layers:
            return []
        even = tuple(1.0 for _ in c.devices)

        def placement(overrides: tuple[ExpertRule, ...]) -> Placement:
            return c.fixed(Placement(n_gpu_layers=ALL_LAYERS, tensor_split=even, split_mode="layer",
                                     overrides=overrides))

        def fits(p: Placement) -> bool:
            return context.feasibility(p).fits

        seeds = []
        # --n-cpu-moe N: the fewest first expert layers in RAM that fit.
        n = first_true(lambda n: fits(placement(_first_in_ram(layers, n))), 0, len(layers))
        if n is not None:
            seeds.append(Seed(f"even -ts with --n-cpu-moe {n}", placement(_first_in_ram(layers, n)), BASELINE))
        # One -ot per card: each keeps the experts of its first k layers, all other experts in RAM.
        home = layer_devices(c.anatomy.facts.n_layers, ALL_LAYERS, c.devices, even)
        per_device = {d: [layer for layer in layers if home[layer] == d] for d in c.devices}
        most = max(len(v) for v in per_device.values())

        def balanced(k: int) -> tuple[ExpertRule, ...]:
            own = tuple(ExpertRule(layers=tuple(ls[:k]), buft=d) for d, ls in per_device.items() if ls[:k])
            return (*own, ExpertRule(layers=None)) if k < most else own

        k = last_true(lambda k: fits(placement(balanced(k))), 0, most)
        if k is not None:
            seeds.append(Seed(f"even -ts, {k} expert layers kept per card (-ot per card)", placement(balanced(k)),
                              BASELINE))
        return seeds


def _first_in_ram(layers: list[int], n: int) -> tuple[ExpertRule, ...]:
    return (ExpertRule(layers=tuple(layers[:n])),) if n else ()
