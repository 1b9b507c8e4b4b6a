"""bispikclm: fully binary spiking causal language models (BiSpikCLM), trained by distillation."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import NEURON_GROUPS, PRESETS, BiSpikCLMConfig
from .modeling import BiSpikCLMForCausalLM, BiSpikCLMModel, BiSpikCLMOutput
from .neurons import LIFNeuron

__version__ = "0.1.0"

AutoConfig.register(BiSpikCLMConfig.model_type, BiSpikCLMConfig, exist_ok=True)
AutoModelForCausalLM.register(BiSpikCLMConfig, BiSpikCLMForCausalLM, exist_ok=True)

__all__ = ["BiSpikCLMConfig", "BiSpikCLMForCausalLM", "BiSpikCLMModel", "BiSpikCLMOutput", "LIFNeuron",
           "NEURON_GROUPS", "PRESETS"]
