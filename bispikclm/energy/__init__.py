"""Operation counts and energy of one forward pass on real text, for a BiSpikCLM student and any Hugging Face ANN
(METHOD §6).

* :mod:`.counting`: every operation of one forward pass, counted by tracing what runs (:func:`count_operations`);
* :mod:`.report`: energy per token by part against an ANN, the approximate formula beside the count, and the
  cost table of both conventions (float32 and int8 arithmetic, with and without memory traffic), as text,
  Markdown or JSON;
* the energy per operation and per byte: :mod:`bispikclm.cost_tables`; the text the counts run on:
  :func:`bispikclm.data.text_token_ids`.
"""

from ..ann import same_shape_ann
from ..cost_tables import (BYTES_PER_WEIGHT, KIND_COST, PARTS, PRECISIONS, EnergyTable, MemoryTable,
                           load_energy_table)
from ..data import default_text_path, text_token_ids
from .counting import CostCount, CostEntry, count_operations, firing_rates_by_layer
from .report import (BLOCK_PARTS, CONVENTIONS, bytes_read, cost_table, energy_per_token, energy_report,
                     format_cost_table, format_report, honest_cost, report_json, save_report)

__all__ = ["BLOCK_PARTS", "BYTES_PER_WEIGHT", "CONVENTIONS", "CostCount", "CostEntry", "EnergyTable", "KIND_COST",
           "MemoryTable", "PARTS", "PRECISIONS", "bytes_read", "cost_table", "count_operations", "default_text_path",
           "energy_per_token", "energy_report", "firing_rates_by_layer", "format_cost_table", "format_report",
           "honest_cost", "load_energy_table", "report_json", "save_report", "same_shape_ann", "text_token_ids"]
