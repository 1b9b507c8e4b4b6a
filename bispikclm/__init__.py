"""bispikclm: fully binary spiking causal language models (BiSpikCLM), trained by distillation."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import NEURON_GROUPS, PRESETS, BiSpikCLMConfig
from .ann import same_shape_ann
from .modeling import BiSpikCLMForCausalLM, BiSpikCLMModel, BiSpikCLMModelOutput, BiSpikCLMOutput, neuron_group
from .neurons import FiringRateRecorder, LIFNeuron

__version__ = "0.1.0"

AutoConfig.register(BiSpikCLMConfig.model_type, BiSpikCLMConfig, exist_ok=True)
AutoModelForCausalLM.register(BiSpikCLMConfig, BiSpikCLMForCausalLM, exist_ok=True)

__all__ = ["BiSpikCLMConfig", "BiSpikCLMForCausalLM", "BiSpikCLMModel", "BiSpikCLMModelOutput", "BiSpikCLMOutput",
           "FiringRateRecorder", "LIFNeuron", "NEURON_GROUPS", "PRESETS", "neuron_group", "same_shape_ann"]
