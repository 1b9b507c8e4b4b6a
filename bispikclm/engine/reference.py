"""Plain NumPy reference of every engine kernel: readable, slow, and the specification of the fast path.

Each function has the same signature as its fast twin in :mod:`bispikclm.engine.kernels` and the same float
operations in the same order, so the two give identical bits. Shapes: ``N`` tokens, ``T`` time steps,
``W = ceil(D / 64)`` words of packed spikes (see :mod:`bispikclm.engine.packing`).
"""

from __future__ import annotations

import numpy as np

from .packing import pack, unpack, unpack_nibbles


def integer_rows(weight: np.ndarray, n_out: int) -> np.ndarray:
    """The weight rows ``[in, n_out]`` as values: 4-bit rows (uint8, two per byte) unpacked to int8, others as
    they are."""
    return unpack_nibbles(weight, n_out) if weight.dtype == np.uint8 else weight


def linear_spikes(spikes: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """Event-driven linear layer: ``out[n, t] = (bias + sum of the rows i of weight whose input fired at
    (n, t)) * scale``, summing rows in increasing ``i``.

    ``spikes`` ``[N, T, W_in]`` uint64; ``weight`` ``[in, out]`` float32 (or int8, or 4-bit: ``[in, ceil(out / 2)]``
    uint8 as :func:`~bispikclm.engine.packing.pack_nibbles` stores them); ``bias`` ``[out]`` float32 (int32 with
    integer weights); ``scale`` ``[out]`` float32; ``out`` ``[N, T, out]`` float32, written."""
    weight = integer_rows(weight, bias.shape[0])
    fired = unpack(spikes, weight.shape[0])
    for n in range(spikes.shape[0]):
        for t in range(spikes.shape[1]):
            acc = bias.copy()
            for i in np.flatnonzero(fired[n, t]):
                acc += weight[i]
            out[n, t] = acc.astype(np.float32) * scale


def linear_counts(counts: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """Linear layer on integer spike counts (``O = P V``): ``out[n, t] = (bias + sum_i counts[n, t, i] *
    weight[i]) * scale`` over the non-zero counts in increasing ``i``. ``counts`` ``[N, T, in]`` int32."""
    weight = integer_rows(weight, bias.shape[0])
    for n in range(counts.shape[0]):
        for t in range(counts.shape[1]):
            acc = bias.copy()
            for i in np.flatnonzero(counts[n, t]):
                acc += bias.dtype.type(counts[n, t, i]) * weight[i]
            out[n, t] = acc.astype(np.float32) * scale


def lif(current: np.ndarray, beta: float, threshold, initial, count: bool, out: np.ndarray) -> None:
    """LIF neurons with soft reset over the time axis of ``current`` ``[N, T, D]`` float32, in place:
    ``current`` becomes the membrane potential ``U``; ``out`` ``[N, T, W]`` uint64 gets the packed spikes
    ``U >= threshold``. ``U[t] = beta * U[t-1] + I[t] - threshold * S[t-1]`` in float32 from ``U[-1] = initial``;
    ``threshold`` and ``initial`` are one number or one per channel ``[D]``.

    With ``count`` (:mod:`bispikclm.neurons`, ``fire="count"``): ``current`` becomes the running sums
    ``A[t] = initial + I[0] + ... + I[t]`` and the spikes are ``A[T-1] >= (t + 1) * threshold``."""
    beta, threshold = np.float32(beta), np.asarray(threshold, np.float32)
    initial = np.asarray(initial, np.float32)
    if count:
        total = initial + current[:, 0]
        current[:, 0] = total
        for t in range(1, current.shape[1]):
            total = total + current[:, t]
            current[:, t] = total
        steps = np.arange(1, current.shape[1] + 1, dtype=np.float32)[:, None]     # (t + 1) * threshold in float32
        out[...] = pack(total[:, None] >= steps * threshold)
        return
    u = np.zeros_like(current[:, 0]) + initial
    s = np.zeros_like(u)
    for t in range(current.shape[1]):
        u = beta * u + current[:, t] - threshold * s
        s = (u >= threshold).astype(np.float32)
        current[:, t] = u
    out[...] = pack(current >= threshold)


def gate_current(current: np.ndarray, gate: np.ndarray) -> None:
    """Binary gate of a gated SFFN (``ffn_gate="select"``), in place: ``current`` ``[N, T, D]`` float32 is set to
    0 where the gate spike (``gate`` ``[N, T, W]`` packed) did not fire and kept where it did."""
    current[~unpack(gate, current.shape[-1])] = 0


def residual_add(x: np.ndarray, spikes: np.ndarray, gain: np.ndarray) -> None:
    """``x += spikes * gain`` in place: each spike adds its channel's weight. ``x`` ``[N, T, D]`` float32,
    ``spikes`` ``[N, T, W]`` uint64, ``gain`` ``[D]`` float32."""
    fired = unpack(spikes, x.shape[-1])
    x[fired] += np.broadcast_to(gain, x.shape)[fired]


def sfsa(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, num_heads: int, num_kv_heads: int,
         head_dim: int, scale: float, beta: float, threshold: float, initial: float, count: bool,
         out: np.ndarray, signed: tuple[bool, bool, bool] = (False, False, False)) -> None:
    """Softmax-free spiking attention of ``N`` new queries against the binary K/V cache.

    ``q`` ``[N, T, W]`` packed (``num_heads`` heads of ``head_dim``); ``k_cache``, ``v_cache`` ``[T, N_max, W_kv]``
    packed (``num_kv_heads`` heads; query head ``h`` reads K/V head ``h // (num_heads / num_kv_heads)``), rows
    ``0 .. past + N - 1`` filled; query ``n`` is position ``past + n`` and sees keys ``0 .. past + n``. Per head
    and key: ``S = popcount(Q AND K)``, ``P = LIF(scale * S)`` over the T steps (membrane from ``initial``; with
    ``count``, the attention neuron fires as :func:`lif` does with ``count``), and ``out``
    ``[N, T, num_heads * head_dim]`` int32 gets ``O = P V``, the count of the value spikes of the keys whose
    attention neuron fired.

    ``signed`` says which of Q, K, V are signed neuron pairs: their packed rows hold the positive half, then the
    negative half (twice the width), and attention reads ``S⁺ - S⁻``: ternary scores ``(Q⁺ - Q⁻)·(K⁺ - K⁻)``
    and signed counts ``O = P (V⁺ - V⁻)``."""
    n_new, t_steps, _ = q.shape
    keys, group = past + n_new, num_heads // num_kv_heads

    def net(packed, size, is_signed):   # the values a row holds: 0/1, or S⁺ - S⁻ for a signed pair (int32)
        bits = unpack(packed, 2 * size if is_signed else size).astype(np.int32)
        return bits[..., :size] - bits[..., size:] if is_signed else bits

    qb = net(q, num_heads * head_dim, signed[0]).reshape(n_new, t_steps, num_heads, 1, head_dim)

    def per_query_head(cache, is_signed):   # [T, H, keys, head_dim]: each K/V head repeated for its query heads
        values = net(cache[:, :keys], num_kv_heads * head_dim, is_signed)
        values = values.reshape(t_steps, keys, num_kv_heads, head_dim)
        return np.repeat(values.transpose(0, 2, 1, 3), group, axis=1)

    kb, vb = per_query_head(k_cache, signed[1]), per_query_head(v_cache, signed[2])
    scores = (qb * kb[None]).sum(-1)                                         # [N, T, H, keys]
    current = scores.astype(np.float32) * np.float32(scale)
    causal = np.arange(keys)[None, :] <= past + np.arange(n_new)[:, None]   # [N, keys]
    beta, threshold, initial = np.float32(beta), np.float32(threshold), np.float32(initial)
    fired = np.empty(current.shape, bool)
    if count:
        total = initial + current[:, 0]
        for t in range(1, t_steps):
            total = total + current[:, t]
        for t in range(t_steps):
            fired[:, t] = total >= np.float32(t + 1) * threshold
    else:
        u = np.zeros_like(current[:, 0]) + initial
        s = np.zeros_like(u)
        for t in range(t_steps):
            u = beta * u + current[:, t] - threshold * s
            s = (u >= threshold).astype(np.float32)
            fired[:, t] = u >= threshold
    for t in range(t_steps):
        attn = fired[:, t] & causal[:, None, :]                              # P[t], [N, H, keys]
        counts = np.einsum("nhk,hkd->nhd", attn.astype(np.int32), vb[t])
        out[:, t] = counts.reshape(n_new, num_heads * head_dim)


def head_int8(h: np.ndarray, weight: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """Float head on int8 weights: ``out[n] = (sum_i h[n, i] * weight[i]) * scale``, summing over ``i`` in order
    in float32. ``h`` ``[N, D]`` float32 (the LayerNorm output); ``weight`` ``[D, V]`` int8; ``scale`` ``[V]``
    float32; ``out`` ``[N, V]`` float32, written."""
    for n in range(h.shape[0]):
        acc = np.zeros(weight.shape[1], np.float32)
        for i in range(h.shape[1]):
            acc += h[n, i] * weight[i].astype(np.float32)
        out[n] = acc * scale


def head_nibbles(h: np.ndarray, weight: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """Float head on 4-bit weights with a scale per group of inputs: ``out[n] = sum_g scale[g] * (sum_{i in g}
    h[n, i] * value[i])``, each group's sum over ``i`` in order, then the groups in order, in float32.
    ``weight`` ``[D, ceil(V / 2)]`` uint8 (4-bit values, :func:`~bispikclm.engine.packing.pack_nibbles`);
    ``scale`` ``[G, V]`` float32 with ``G`` groups of ``D / G`` inputs; ``out`` ``[N, V]`` float32, written."""
    values = unpack_nibbles(weight, scale.shape[1])
    group = h.shape[1] // scale.shape[0]
    for n in range(h.shape[0]):
        acc = np.zeros(scale.shape[1], np.float32)
        for g in range(scale.shape[0]):
            part = np.zeros(scale.shape[1], np.float32)
            for i in range(g * group, (g + 1) * group):
                part += h[n, i] * values[i].astype(np.float32)
            acc += part * scale[g]
        out[n] = acc
