"""Softmax-Free Spiking Attention (SFSA), METHOD §3, with grouped-query heads.

Per head and time step, with binary input ``A``::

    Q, K, V = SN(A Wq + bq), SN(A Wk + bk), SN(A Wv + bv)     # binary
    S = (Q K^T) AND M                                        # integer scores in [0, head_dim]
    P = SN_attn(attn_scale * S)                              # binary map; one neuron per (i, j) over T steps
    O = P V                                                  # integer counts
    Y = SN(O Wo + bo)                                        # binary

No softmax, exponential or division. The attention neuron of entry (i, j) integrates only over the T time
steps of query token i, so a cache of the binary K and V spikes is all incremental decoding needs. With
``num_key_value_heads < num_attention_heads`` (grouped-query attention, as in Llama-family teachers) each group of
query heads reads the same head of K and V spikes, and the cache holds only the key/value heads.

With Q, K or V signed neuron pairs (``neuron_overrides: {q: {signed: true}, ...}``) each head reads the pair's
ternary ``S⁺ - S⁻``: the scores become sums of ±1 products in [-head_dim, head_dim] (an AND of the four spike
combinations, added or subtracted) and ``O = P (V⁺ - V⁻)`` signed counts; the cache then holds both binary halves.

Q·Kᵀ and P·V are integer sums of spikes; they run in float32 whatever the autocast (float32 sums of integers
are exact up to 2^24; bfloat16 ones only up to 256).
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import BiSpikCLMConfig
from .neurons import LIFNeuron
from .spike_ops import SpikeLinear, net_spikes, spike_matmul


def causal_mask(query_length: int, key_length: int, key_mask: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """Binary mask ``[B or 1, 1, N, Nk]``: query ``i`` (the last ``N`` of ``Nk`` positions) may see key ``j``."""
    past = key_length - query_length
    q_pos = torch.arange(past, key_length, device=device)[:, None]
    k_pos = torch.arange(key_length, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
    return mask


class SFSA(nn.Module):
    """Softmax-free spiking self-attention. Input ``[T, B, N, D]`` spikes -> output ``[T, B, N, D]`` spikes."""

    def __init__(self, config: BiSpikCLMConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.attention_head_dim
        self.num_kv_heads = config.key_value_heads
        self.attn_scale = config.effective_attn_scale
        self.chunk_size = config.attn_chunk_size
        signed = config.signed("block_in")       # the block-input neurons are signed pairs: [S⁺, S⁻] in
        self.q_proj = SpikeLinear(d, self.num_heads * self.head_dim, signed=signed)
        self.k_proj = SpikeLinear(d, self.num_kv_heads * self.head_dim, signed=signed)
        self.v_proj = SpikeLinear(d, self.num_kv_heads * self.head_dim, signed=signed)
        self.out_proj = SpikeLinear(self.num_heads * self.head_dim, d, binary=False)
        self.q_neuron = LIFNeuron(**config.neuron_kwargs("q", self.q_proj.out_features))
        self.k_neuron = LIFNeuron(**config.neuron_kwargs("k", self.k_proj.out_features))
        self.v_neuron = LIFNeuron(**config.neuron_kwargs("v", self.v_proj.out_features))
        self.attn_neuron = LIFNeuron(**config.neuron_kwargs("attn"))
        self.out_neuron = LIFNeuron(**config.neuron_kwargs("attn_out", d))
        self.signed = tuple(config.signed(group) for group in ("q", "k", "v"))

    @staticmethod
    def _heads(x: torch.Tensor, heads: int, signed: bool = False) -> torch.Tensor:
        """``[T, B, N, H·dh]`` -> ``[T, B, H, N, dh]``; a signed pair's ``[S⁺ | S⁻]`` (each ``H·dh`` wide) ->
        ``[T, B, H, N, 2dh]``, each head's ``S⁺`` then its ``S⁻``."""
        t, b, n, _ = x.shape
        if signed:
            return x.view(t, b, n, 2, heads, -1).permute(0, 1, 4, 2, 3, 5).reshape(t, b, heads, n, -1)
        return x.view(t, b, n, heads, -1).transpose(2, 3)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The spikes of Q, K and V per head, ``[T, B, H or Hkv, N, dh or 2dh]`` (binary; ``2dh`` for a pair)."""
        sq, sk, sv = self.signed
        return (self._heads(self.q_neuron(self.q_proj(x)), self.num_heads, sq),
                self._heads(self.k_neuron(self.k_proj(x)), self.num_kv_heads, sk),
                self._heads(self.v_neuron(self.v_proj(x)), self.num_kv_heads, sv))

    def read_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        """What attention reads of the spikes: a pair's ``S⁺ - S⁻``, K and V repeated over their query-head
        group, all in a dtype whose integer sums are exact (float32 at least)."""
        exact = torch.promote_types(dtype, torch.float32)
        q, k, v = ((net_spikes(x.to(exact)) if signed else x.to(exact)) for x, signed in zip((q, k, v), self.signed))
        return q, self._repeat_kv(k), self._repeat_kv(v)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Key/value heads ``[T, B, Hkv, Nk, dh]`` -> one per query head ``[T, B, H, Nk, dh]`` (GQA groups)."""
        group = self.num_heads // self.num_kv_heads
        if group == 1:
            return x
        t, b, h, n, dh = x.shape
        return x[:, :, :, None].expand(t, b, h, group, n, dh).reshape(t, b, h * group, n, dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """Binary attention map and integer output for queries ``q`` ``[T,B,H,N,dh]`` against ``k, v``
        ``[T,B,H,Nk,dh]``."""
        sq, sk, sv = self.signed
        scores = spike_matmul(q, k.transpose(-1, -2), not sq, not sk)   # [T, B, H, N, Nk], integers
        scores = scores.masked_fill(~mask, 0)                  # AND with the binary mask
        attn = self.attn_neuron(scores, valid=mask, input_scale=self.attn_scale)
        return attn, spike_matmul(attn, v, True, not sv)       # P, O = P V (integer counts)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, cache=None,
                output_attentions: bool = False):
        """``x`` ``[T,B,N,D]`` binary; ``key_mask`` ``[B, Nk]`` (1 = real token) over past and new positions;
        ``cache``: a Hugging Face ``Cache`` holding binary K/V spikes ``[B, T, Hkv, Nk, dh]`` (bool;
        ``2dh`` for a signed pair).

        Returns ``(Y [T,B,N,D], mean_t P [B,H,N,Nk] or None)``."""
        t, b, n, d = x.shape
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.update(k.transpose(0, 1).bool(), v.transpose(0, 1).bool(), self.layer_idx)
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        q, k, v = self.read_qkv(q, k, v, x.dtype)               # integer sums stay exact
        mask = causal_mask(n, k.shape[-2], key_mask, x.device)
        chunk = self.chunk_size if (self.chunk_size and not torch.is_grad_enabled()) else n
        maps, outs = [], []
        with torch.autocast(device_type=x.device.type, enabled=False):
            for start in range(0, n, chunk):
                attn, out = self.attend(q[..., start:start + chunk, :], k, v, mask[..., start:start + chunk, :])
                outs.append(out)
                if output_attentions:
                    maps.append(attn.mean(0))
        o = torch.cat(outs, dim=-2).transpose(2, 3).reshape(t, b, n, self.num_heads * self.head_dim).to(x.dtype)
        y = self.out_neuron(self.out_proj(o))
        return y, (torch.cat(maps, dim=-2) if output_attentions else None)
