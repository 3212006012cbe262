"""The feasible frontier: for any choice of the other parameters, the fullest placement the memory model
says fits.

More weights on the accelerator read faster, so the fastest placements sit where memory runs out, and a
point short of it only leaves speed in RAM. Instead of sampling the fill (how many layers' experts stay in
RAM, or -ngl for a dense model) and meeting the memory cliff by pruning, a candidate's fill is set here:
the fewest expert layers in RAM (or the most layers on the accelerator) that the memory model, with the
margins out-of-memory trials have widened, says fit. Memory on the accelerator only shrinks as the fill
moves that way, so a bisection finds it in log(layers) checks. `slack` keeps a candidate that many steps
short of the edge, for cards whose real allocation runs past the model's estimate.

On several cards one set of expert layers in RAM frees memory only on the cards that hold those layers,
so the split between the cards decides how far the fill must go: experts of the last layers in RAM on an
even split empty the last card while the first one still overflows. `balance` sets the split too: the one
that leaves the fewest expert layers in RAM. And a block of layers there grows from its centre, both ways,
so that a block over the boundary between two cards frees memory on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from placetune.monotone import first_true, last_true
from placetune.space import SearchSpace, applies

EXPERTS, LAYERS, SPLIT, START = "cpu_moe_layers", "n_gpu_layers", "split_first", "cpu_moe_start"
# llama.cpp's own value for each knob it has a default for (common/common.h); the others are placetune's
# reference choices: experts of the last layers in RAM, as --fit puts them (ik_llama PR 2262: +10% pp).
LLAMA_DEFAULTS: dict[str, Any] = {
    "ubatch": 512, "batch": 2048, "flash_attn": "auto", "cache_type_k": "f16", "cache_type_v": "f16",
    "load_mode": "auto", "no_op_offload": False, "repack": True,
    "cpu_moe_position": "last", "cpu_moe_kinds": "all", "cpu_moe_start": 0, "cpu_moe_stride": 2,
    "experts_to": "CPU", "split_first": 5,
}


def fill_dimension(space: SearchSpace) -> str | None:
    """The parameter that fills the accelerator: expert layers in RAM for a MoE space, else -ngl."""
    names = space.dimension_names()
    return EXPERTS if EXPERTS in names else LAYERS if LAYERS in names else None


def default_params(space: SearchSpace, facts: dict[str, int]) -> dict[str, Any]:
    """Every dimension at llama.cpp's default (threads: the physical cores; -ngl: everything), clamped into the
    space: the point a user who sets nothing gets, before the fill is put on the frontier."""
    wanted = {**LLAMA_DEFAULTS, "threads": facts["physical_cores"], LAYERS: facts["n_gpu_layers_max"],
              EXPERTS: 0}
    out: dict[str, Any] = {}
    for dim in space.dimensions:
        want = wanted.get(dim.name)
        if dim.choices is not None:
            out[dim.name] = want if want in dim.choices else dim.choices[0]
        else:
            low, high = space.bounds(dim, facts)
            value = low if want is None else min(max(int(want), low), high)
            out[dim.name] = low + (value - low) // dim.step * dim.step
    return out


def conditional(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Only the parameters that mean something given the others (what the sampler itself would ask for)."""
    merged = {**space.pinned, **params}
    return {k: v for k, v in params.items() if applies(k, merged)}


class Frontier:
    """Fills candidates up to the memory model's edge; `fits` judges a full parameter set (pins included)."""

    def __init__(self, space: SearchSpace, facts: dict[str, int], fits: Callable[[dict[str, Any]], bool]) -> None:
        self.space = space
        self.fits = fits
        self.dim = fill_dimension(space)
        self.values: list[int] = []
        if self.dim is not None:
            spec = next(d for d in space.dimensions if d.name == self.dim)
            low, high = space.bounds(spec, facts)
            self.values = list(range(low, high + 1, spec.step))
        if self.dim == LAYERS:
            self.values.reverse()  # fuller first: most layers on the accelerator
        self.layers: list[int] = []  # -ngl values, ascending, when experts are the fill and -ngl is searched too
        if self.dim == EXPERTS and LAYERS in space.dimension_names():
            spec = next(d for d in space.dimensions if d.name == LAYERS)
            low, high = space.bounds(spec, facts)
            self.layers = list(range(low, high + 1, spec.step))
        self.splits: list[int] = []  # split_first values, when the space splits layers across several cards
        if self.dim == EXPERTS and SPLIT in space.dimension_names():
            spec = next(d for d in space.dimensions if d.name == SPLIT)
            low, high = space.bounds(spec, facts)
            self.splits = list(range(low, high + 1, spec.step))

    def edge(self, params: dict[str, Any]) -> int | None:
        """Index into `values` of the fullest fill that fits with the other parameters as given; None if none."""
        if self.dim is None:
            return None

        def ok(i: int) -> bool:
            return self.fits(self.filled(params, i))

        return first_true(ok, 0, len(self.values) - 1)

    def centred(self, params: dict[str, Any]) -> bool:
        """Whether params' expert layers are a block that grows from its centre (on several cards)."""
        return bool(self.splits) and params.get("cpu_moe_position") == "block"

    @staticmethod
    def centre(params: dict[str, Any]) -> int:
        return int(params.get(START, 0)) + int(params.get(EXPERTS) or 0) // 2

    def filled(self, params: dict[str, Any], i: int) -> dict[str, Any]:
        """params with the i-th fill; on several cards a block keeps its centre (see the module docstring)."""
        out = {**params, self.dim: self.values[i]}
        if self.centred(params):
            out[START] = max(0, self.centre(params) - self.values[i] // 2)
        return out

    def slack(self, params: dict[str, Any]) -> int:
        """How many steps short of the edge a candidate's fill is (0 on it, or past it)."""
        if self.dim is None or params.get(self.dim) not in self.values:
            return 0
        edge = self.edge(params)
        return 0 if edge is None else max(0, self.values.index(params[self.dim]) - edge)

    def place(self, params: dict[str, Any], slack: int = 0, fewer_layers: bool = False,
              balance: bool = False) -> dict[str, Any] | None:
        """params with the fill `slack` steps short of the edge; None when nothing fits with these parameters.

        fewer_layers: when not even every expert in RAM fits with this -ngl, fewer layers go to the
        accelerator (the most that fit with every expert in RAM), then filled as usual.
        balance: on several cards, the split too (see `balanced`).
        """
        if self.dim is None:
            return params if self.fits(params) else None
        if balance and self.splits:
            params = self.balanced(params)
        edge = self.edge(params)
        if edge is None and fewer_layers and self.dim == EXPERTS and self.layers:
            params = self._fewer_layers(params)
            edge = None if params is None else self.edge(params)
        if edge is None or params is None:
            return None
        return self.filled(params, min(edge + slack, len(self.values) - 1))

    def balanced(self, params: dict[str, Any]) -> dict[str, Any]:
        """params with the split between the cards whose edge leaves the fewest expert layers in RAM; of equals,
        the one nearest params' own split. Unchanged when no split fits."""
        own = params.get(SPLIT, self.splits[len(self.splits) // 2])
        best: tuple[int, int] | None = None
        for value in sorted(self.splits, key=lambda v: abs(v - own)):
            edge = self.edge({**params, SPLIT: value})
            if edge is not None and (best is None or edge < best[0]):
                best = (edge, value)
        return params if best is None else {**params, SPLIT: best[1]}

    def _fewer_layers(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """params with the most layers below its -ngl that fit with every expert in RAM; None if none does."""
        below = [v for v in self.layers if v < params.get(LAYERS, self.layers[-1] + 1)]

        def ok(i: int) -> bool:
            return self.fits({**params, LAYERS: below[i], EXPERTS: self.values[-1]})

        i = last_true(ok, 0, len(below) - 1)  # fewer layers, less memory
        return None if i is None else {**params, LAYERS: below[i]}


def filled_defaults(space: SearchSpace, facts: dict[str, int],
                    fits: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """llama.cpp's default knobs with the accelerator filled to the memory edge (what --fit would pick, at the
    search's own margins, as a point of the search space; on several cards split where that leaves the fewest
    expert layers in RAM); None when nothing fits."""
    placed = Frontier(space, facts, fits).place(default_params(space, facts), fewer_layers=True, balance=True)
    return None if placed is None else conditional(placed, space)
