"""placetune's own guess: the placement the bandwidth roofline predicts fastest among those that fit.

It is a candidate, not a baseline: nobody gets it by hand. It is a point of the search space, so the
sampler learns from it like from any trial; the knobs the roofline says nothing about stay at llama.cpp's
defaults, so the seed shows what the placement alone does.
"""

from __future__ import annotations

from typing import Any

from placetune.monotone import first_true
from placetune.predict import rank_by_prediction
from placetune.search.frontier import conditional, default_params
from placetune.search.seeds import CANDIDATE, Seed, SeedContext


class Roofline:
    kind = "bandwidth model"

    def seeds(self, context: SeedContext) -> list[Seed]:
        c = context.config
        if not c.devices:
            return []
        candidates = []
        for ngl in range(context.facts["n_gpu_layers_max"], -1, -1):
            n = self._fewest_experts_in_ram(context, ngl)
            if n is not None:
                params = self._params(ngl, n)
                placement = c.placement_of(params)
                candidates.append(((params, placement), placement))
        ranked = rank_by_prediction(c.anatomy, candidates, c.devices, context.bandwidths())
        if not ranked:
            return []
        (params, _), _ = ranked[0]
        name = f"best by the bandwidth model (-ngl {params['n_gpu_layers']} --n-cpu-moe {params['cpu_moe_layers']})"
        params = conditional({**default_params(c.space, context.facts), **params}, c.space)
        return [Seed(name, c.placement_of(params), CANDIDATE, params)]

    @staticmethod
    def _params(ngl: int, n: int) -> dict[str, Any]:
        return {"n_gpu_layers": ngl, "cpu_moe_layers": n, "cpu_moe_position": "first", "cpu_moe_kinds": "all"}

    def _fewest_experts_in_ram(self, context: SeedContext, ngl: int) -> int | None:
        """The fewest first-N expert layers in RAM that fit at this -ngl (more in RAM never helps the roofline).

        Memory on the accelerator only shrinks as N grows, so a bisection finds it in log(layers) checks.
        """
        c = context.config

        def fits(n: int) -> bool:
            return context.feasibility(c.placement_of(self._params(ngl, n))).fits

        return first_true(fits, 0, context.facts["n_moe_layers"])
