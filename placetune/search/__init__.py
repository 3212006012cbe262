"""The search: seeds, an Optuna study of real measurements, and a final round that names a winner
only beyond the noise. See loop.py for the procedure."""

from placetune.search.config import SearchConfig, Serving, serving_for
from placetune.search.finals import Contender, Decision
from placetune.search.loop import Search
from placetune.search.objective import OBJECTIVES, objective_value
from placetune.search.workers import counted, retried_numbers

__all__ = ["OBJECTIVES", "Contender", "Decision", "Search", "SearchConfig", "Serving", "counted",
           "objective_value", "retried_numbers", "serving_for"]
