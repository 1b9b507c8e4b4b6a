"""Packed, event-driven inference of BiSpikCLM models (spikes in 64-bit words, no dense activation products).

* :class:`PackedEngine`: prefill and incremental decoding with a packed binary K/V cache, streaming generation.
* :func:`quantize_`: int8 or 4-bit weights on a power-of-two grid, shared by the PyTorch model and the engine.
* :mod:`~bispikclm.engine.reference` (plain NumPy) and :mod:`~bispikclm.engine.kernels` (Numba): the same
  kernels, the same signatures, the same bits; :func:`~bispikclm.engine.kernels.blocks` runs every block in one
  compiled call; :mod:`~bispikclm.engine.dense`: the linear layers of a batched prefill as dense integer
  products, the same bits.
"""

from . import dense, kernels, reference
from .engine import PackedCache, PackedEngine, model_spikes, spike_agreement
from .packing import pack, quantize_, unpack

__all__ = ["PackedCache", "PackedEngine", "model_spikes", "pack", "quantize_", "spike_agreement", "unpack"]
