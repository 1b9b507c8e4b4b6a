"""Cost tables of the energy report and the spike-cost loss: the energy of each kind of operation
(:data:`KIND_COST`, :class:`EnergyTable`, :data:`PRECISIONS`) and of each byte read (:class:`MemoryTable`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .validation import check_types

#: Energy of each kind of operation, in units of the table's ``mac_pj`` and ``ac_pj``.
KIND_COST = {
    "mac": (1, 0),              # multiply-accumulate with a real-valued input
    "ac": (0, 1),               # accumulate driven by a spike (or by one unit of an integer count)
    "bias_add": (0, 1),         # bias added to a product's output
    "neuron_update": (1, 1),    # U = β·U + I (one MAC), U >= θ (one comparison)
    "spike_reset": (0, 1),      # U -= θ after a spike
    "elementwise_add": (0, 1),  # residual additions, embedding sum, time sum
    "elementwise_mul": (1, 0),  # input gain, 1/T of the time average, LayerNorm (4 per element)
    "and_popcount": (0, 0),     # bit operations of Q·Kᵀ, charged through its AC line
    "gate": (0, 0),             # a binary gate routing a current or a spike (gated SFFN): a select or an AND
    "lookup": (0, 0),           # embedding rows read from memory
    "weight_read": (0, 0),      # weights read per token (elements), priced by MemoryTable
    "cache_read": (0, 0),       # K/V cache entries read per token (elements; binary spikes for the student)
}
PARTS = ("embedding", "attention", "ffn", "neurons", "residual", "head")


@dataclass(frozen=True)
class EnergyTable:
    """Energy per 32-bit operation, in picojoules (default: 45 nm CMOS, Horowitz, ISSCC 2014)."""

    name: str = "45 nm CMOS, 32-bit float (Horowitz 2014)"
    mac_pj: float = 4.6
    ac_pj: float = 0.9

    def pj(self, kind: str) -> float:
        """Energy of one operation of ``kind`` (a key of :data:`KIND_COST`)."""
        macs, acs = KIND_COST[kind]
        return macs * self.mac_pj + acs * self.ac_pj


#: Arithmetic at 45 nm (Horowitz, "Computing's energy problem", ISSCC 2014, Fig. 1.1.9): a float32 MAC is a
#: multiply (3.7 pJ) and an add (0.9 pJ); an int8 MAC a multiply (0.2 pJ) and an add (0.03 pJ).
PRECISIONS = {
    "float32": EnergyTable(),
    "int8": EnergyTable(name="45 nm CMOS, 8-bit integer (Horowitz 2014)", mac_pj=0.23, ac_pj=0.03),
}
BYTES_PER_WEIGHT = {"float32": 4, "int8": 1}


@dataclass(frozen=True)
class MemoryTable:
    """Energy per byte read, in picojoules, at 45 nm (Horowitz, ISSCC 2014, Fig. 1.1.9: 10 pJ per 64-bit read
    of an 8 KB SRAM, 1.3-2.6 nJ per 64-bit DRAM access; tabulated per 32-bit word as 5 pJ SRAM and 640 pJ DRAM
    by Han et al., "EIE", ISCA 2016, Table I)."""

    sram_pj_per_byte: float = 5.0 / 4
    dram_pj_per_byte: float = 640.0 / 4


def load_energy_table(path: str | Path) -> EnergyTable:
    """An :class:`EnergyTable` from a YAML or JSON file with keys ``name``, ``mac_pj``, ``ac_pj``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read energy table {path}: {err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"energy table {path} is not UTF-8 text ({err.reason})") from None
    if not isinstance(data, dict) or not {"mac_pj", "ac_pj"} <= set(data):
        raise UserError(f"energy table {path} must hold keys mac_pj, ac_pj (and optionally name), got {data!r}")
    check_types(f"energy table {path}", data, {"name": "str", "mac_pj": "float", "ac_pj": "float"})
    if data["mac_pj"] <= 0 or data["ac_pj"] <= 0:
        raise UserError(f"energy table {path}: mac_pj and ac_pj must be > 0, got {data['mac_pj']}, {data['ac_pj']}")
    return EnergyTable(name=str(data.get("name", Path(path).stem)), mac_pj=float(data["mac_pj"]),
                       ac_pj=float(data["ac_pj"]))
