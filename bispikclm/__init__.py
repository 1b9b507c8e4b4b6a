"""bispikclm: fully binary spiking causal language models (BiSpikCLM), trained by distillation.

The names below load on first use (``from bispikclm import BiSpikCLMForCausalLM`` imports the model, and with it
torch and transformers), so that ``import bispikclm.cli`` and ``bispikclm --help`` stay light. Importing
:mod:`bispikclm.configuration` registers the config with ``AutoConfig``, importing :mod:`bispikclm.modeling`
registers the model with ``AutoModelForCausalLM``; any of the names below does both.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {"BiSpikCLMConfig": "configuration", "NEURON_GROUPS": "configuration", "PRESETS": "configuration",
            "same_shape_ann": "ann", "BiSpikCLMForCausalLM": "modeling", "BiSpikCLMModel": "modeling",
            "BiSpikCLMModelOutput": "modeling", "BiSpikCLMOutput": "modeling", "neuron_group": "modeling",
            "FiringRateRecorder": "neurons", "LIFNeuron": "neurons"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bispikclm' has no attribute {name!r}")
    importlib.import_module(".modeling", __name__)      # registers the Auto classes, whatever name is asked for
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
