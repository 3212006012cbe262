"""llama.cpp out of the box: what `llama-server -m MODEL -c N` gives with its default --fit on.

That is llama-fit-params' answer for the same memory, measured exactly as printed. A CPU budget cannot
be handed to llama-fit-params (it has no host margin), so its answer meets the CPU budget in the same
feasibility check as every other placement.
"""

from __future__ import annotations

from placetune.budgets import fit_margins
from placetune.fit import FitAnswer, FitUnavailable, fit_params
from placetune.search.seeds import BASELINE, Seed, SeedContext


class LlamaFitParams:
    """The out-of-the-box baseline; `answer` given (the twin's fit-style answer), no binary is run."""

    kind = "llama-fit-params"

    def __init__(self, answer: FitAnswer | None = None) -> None:
        self.answer = answer

    def seeds(self, context: SeedContext) -> list[Seed]:
        c = context.config
        if not c.devices:
            return []
        answer = self.answer
        if answer is None:
            free = [(d.name, d.free_bytes) for d in c.machine.accelerators]
            try:
                answer = fit_params(c.model, fit_margins(free, c.budgets, c.margin), c.serving.ctx,
                                    c.serving.slots, rpc=c.rpc, bin_dir=c.bin_dir)
            except FitUnavailable as exc:
                context.notes.append(f"no out-of-the-box (--fit) row: {exc}")
                return []
        label = "llama-fit-params for the budget" if c.budgets else "llama.cpp out of the box (--fit on)"
        return [Seed(label, c.fixed(answer.placement), BASELINE)]
