"""Numba fast path of every engine kernel; same signatures and same bits as :mod:`bispikclm.engine.reference`.

* Linear layers are event-driven: the words of all T time steps of an input are OR-ed and the set bits walked
  with count-trailing-zeros into a list of events (input row, its T-step firing pattern); each listed weight row
  is then read once and added to the accumulator of every step whose bit is set (the gather is fused into the
  accumulation). Threads split the output features into tiles of whole 64-bit words, so each thread writes its
  own words. The row ``PREFETCH_ROWS`` ahead in the list is prefetched while one is added: rows that fired are
  scattered, so the hardware prefetcher cannot guess them (1.6x on weights that are not in cache).
* The int8 head (float LayerNorm output times int8 rows) accumulates rows into tiles of the vocabulary, with the
  same prefetch (2x).
* 4-bit rows (``uint8`` weights, two values per byte, :func:`bispikclm.engine.packing.pack_nibbles`) are added
  the same way, each byte giving two columns.
* :func:`blocks` runs every block of the model for the new tokens in one compiled call: the same kernels in the
  same order as the engine's per-kernel path, looping over the layers inside, with the threads splitting each
  linear layer's outputs and the attention's heads.
* Q·Kᵀ is AND + popcount over packed words (a head's bits taken as 64-bit windows, so heads need not start on a
  word, and a group of query heads reads its shared K/V head); P·V adds the value spikes of the keys whose
  attention neuron fired, walking their set bits.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic, overload


PREFETCH_ROWS = 4  # how many rows ahead to prefetch (measured: 2-8 all help, 4 best on this CPU)
HEAD_TILE = 1024  # vocabulary entries per job of the int8 head
PREFILL_TILE = 512  # output features per job over many tokens: a weight tile [in, 512] stays in L2 across tokens


@intrinsic
def _popcount(typingctx, word):
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@intrinsic
def _ctz(typingctx, word):
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], context.get_constant(types.boolean, True))
    return types.uint64(types.uint64), codegen


@intrinsic
def _prefetch(typingctx, address):
    """Hint the CPU to load the cache line at ``address`` (``llvm.prefetch``, read, keep in all levels)."""
    def codegen(context, builder, signature, args):
        byte_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(prefetch, [builder.inttoptr(args[0], byte_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(types.uintp), codegen


@njit(cache=True, nogil=True, inline="always")
def _prefetch_row(weight, row, c0, width):
    start = weight.ctypes.data + (row * weight.shape[1] + c0) * weight.itemsize
    for line in range(0, width * weight.itemsize, 64):
        _prefetch(start + line)


@njit(cache=True, nogil=True)
def _tile(features, tokens, threads):
    """Output features per job, a multiple of 64: one contiguous share per thread when decoding a token (long
    runs along each weight row), at most :data:`PREFILL_TILE` when many tokens reuse the tile."""
    per_thread = -(-features // threads)
    tile = max(64, -(-per_thread // 64) * 64)
    return tile if tokens <= 4 else min(PREFILL_TILE, tile)


@njit(cache=True, nogil=True)
def _no_events(n_tok, n_in, t_steps, like):
    return (np.empty((n_tok, n_in), np.int64), np.zeros((n_tok, n_in, t_steps), like.dtype),
            np.zeros(n_tok, np.int64))


@njit(cache=True, nogil=True)
def _events_from_spikes(spikes, n_in, like):
    """Per token, the inputs that fired at any step, in increasing order: ``rows [N, n_in]``, their 0/1 factor at
    each step ``factors [N, n_in, T]`` (dtype of ``like``) and how many ``lengths [N]``."""
    n_tok, t_steps, n_words = spikes.shape
    rows, factors, lengths = _no_events(n_tok, n_in, t_steps, like)
    for n in range(n_tok):
        for w in range(n_words):
            fired = np.uint64(0)
            for t in range(t_steps):
                fired |= spikes[n, t, w]
            while fired:
                bit = _ctz(fired)
                fired &= fired - np.uint64(1)
                k = lengths[n]
                rows[n, k] = w * 64 + bit
                for t in range(t_steps):
                    factors[n, k, t] = (spikes[n, t, w] >> bit) & np.uint64(1)
                lengths[n] = k + 1
    return rows, factors, lengths


@njit(cache=True, nogil=True)
def _events_from_counts(counts, like):
    """Like :func:`_events_from_spikes` for integer counts ``[N, T, n_in]``: the inputs with a non-zero count."""
    n_tok, t_steps, n_in = counts.shape
    rows, factors, lengths = _no_events(n_tok, n_in, t_steps, like)
    for n in range(n_tok):
        for i in range(n_in):
            k = lengths[n]
            for t in range(t_steps):
                factors[n, k, t] = counts[n, t, i]
                if counts[n, t, i] != 0:
                    rows[n, k] = i
                    lengths[n] = k + 1
    return rows, factors, lengths


def _add_row(acc, weight, row, c0, width, factor):
    """``acc[:width] += factor * weight[row, c0:c0 + width]`` (compiled only: see the overload below)."""
    raise NotImplementedError


@overload(_add_row, jit_options={"nogil": True})
def _add_row_typed(acc, weight, row, c0, width, factor):
    if weight.dtype == types.uint8:                  # 4-bit rows: byte j holds columns 2j (low) and 2j + 1 (high)
        def add_nibbles(acc, weight, row, c0, width, factor):
            values = weight[row, c0 // 2:(c0 + width + 1) // 2]
            pairs = width // 2
            if factor == 1:                          # a spike: an accumulate
                for j in range(pairs):
                    acc[2 * j] += np.int32(values[j] & np.uint8(15)) - 8
                    acc[2 * j + 1] += np.int32(values[j] >> np.uint8(4)) - 8
                if width % 2:
                    acc[width - 1] += np.int32(values[pairs] & np.uint8(15)) - 8
            else:                                    # an integer count (O = P V)
                for j in range(pairs):
                    acc[2 * j] += factor * (np.int32(values[j] & np.uint8(15)) - 8)
                    acc[2 * j + 1] += factor * (np.int32(values[j] >> np.uint8(4)) - 8)
                if width % 2:
                    acc[width - 1] += factor * (np.int32(values[pairs] & np.uint8(15)) - 8)
        return add_nibbles

    def add(acc, weight, row, c0, width, factor):
        values = weight[row, c0:c0 + width]
        if factor == 1:
            for c in range(width):
                acc[c] += values[c]
        else:
            for c in range(width):
                acc[c] += factor * values[c]
    return add


def _row_bytes(weight, c0, width):
    """``(first, count)``: the bytes of ``weight``'s rows that hold columns ``c0 .. c0 + width - 1``."""
    raise NotImplementedError


@overload(_row_bytes, jit_options={"nogil": True})
def _row_bytes_typed(weight, c0, width):
    if weight.dtype == types.uint8:
        return lambda weight, c0, width: (c0 // 2, (c0 + width + 1) // 2 - c0 // 2)
    return lambda weight, c0, width: (c0, width)


@njit(cache=True, nogil=True)
def _accumulate_job(job, rows, factors, lengths, weight, bias, scale, out, tile):
    """Tile ``job`` of :func:`_accumulate`: output features ``job * tile ..`` of every token."""
    n_tok, t_steps = factors.shape[0], factors.shape[2]
    n_out = bias.shape[0]
    c0 = job * tile
    width = min(tile, n_out - c0)
    first, count = _row_bytes(weight, c0, width)
    acc = np.empty((t_steps, tile), bias.dtype)
    for n in range(n_tok):
        for t in range(t_steps):
            acc[t, :width] = bias[c0:c0 + width]
        for k in range(lengths[n]):
            if k + PREFETCH_ROWS < lengths[n]:
                _prefetch_row(weight, rows[n, k + PREFETCH_ROWS], first, count)
            for t in range(t_steps):
                factor = factors[n, k, t]
                if factor != 0:
                    _add_row(acc[t], weight, rows[n, k], c0, width, factor)
        for t in range(t_steps):
            for c in range(width):
                out[n, t, c0 + c] = np.float32(acc[t, c]) * scale[c0 + c]


@njit(parallel=True, cache=True, nogil=True)
def _accumulate(rows, factors, lengths, weight, bias, scale, out, tile):
    """``out[n, t] = (bias + sum_k factors[n, k, t] * weight[rows[n, k]]) * scale``, reading each listed row once
    for all T steps and prefetching the row ``PREFETCH_ROWS`` ahead."""
    for job in prange((bias.shape[0] + tile - 1) // tile):
        _accumulate_job(job, rows, factors, lengths, weight, bias, scale, out, tile)


def linear_spikes(spikes: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.linear_spikes`."""
    events = _events_from_spikes(spikes, weight.shape[0], bias)
    _accumulate(*events, weight, bias, scale, out, _tile(bias.shape[0], spikes.shape[0], numba.get_num_threads()))


def linear_counts(counts: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.linear_counts`."""
    events = _events_from_counts(counts, bias)
    _accumulate(*events, weight, bias, scale, out, _tile(bias.shape[0], counts.shape[0], numba.get_num_threads()))


@njit(cache=True, nogil=True)
def _lif(current, lo, d, beta, threshold, initial, count, out):
    """:func:`lif` on columns ``lo .. lo + d - 1`` of ``current``; their spikes are bits ``0 .. d - 1`` of
    ``out``."""
    n_tok, t_steps = current.shape[0], current.shape[1]
    for n in range(n_tok):
        for w in range(out.shape[2]):
            for t in range(t_steps):
                out[n, t, w] = 0
        for c in range(d):
            theta = threshold[c]
            if count:
                total = initial[c] + current[n, 0, lo + c]
                current[n, 0, lo + c] = total
                for t in range(1, t_steps):
                    total = total + current[n, t, lo + c]
                    current[n, t, lo + c] = total
                for t in range(t_steps):
                    if total >= np.float32(t + 1) * theta:
                        out[n, t, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
                continue
            u = initial[c]
            s = np.float32(0.0)
            for t in range(t_steps):
                u = beta * u + current[n, t, lo + c] - theta * s
                current[n, t, lo + c] = u
                if u >= theta:
                    s = np.float32(1.0)
                    out[n, t, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
                else:
                    s = np.float32(0.0)


def _per_channel(value, channels: int) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.shape == (channels,) and value.dtype == np.float32 \
            and value.flags.c_contiguous:
        return value
    return np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float32), (channels,)))


def lif(current: np.ndarray, beta: float, threshold, initial, count: bool, out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.lif`."""
    channels = current.shape[-1]
    _lif(current, 0, channels, np.float32(beta), _per_channel(threshold, channels), _per_channel(initial, channels),
         bool(count), out)


@njit(cache=True, nogil=True)
def _gate_current(current, lo, d, gate):
    """:func:`gate_current` on columns ``lo .. lo + d - 1`` of ``current`` (gate bits ``0 .. d - 1``)."""
    n_tok, t_steps = current.shape[0], current.shape[1]
    for n in range(n_tok):
        for t in range(t_steps):
            for c in range(d):
                if not (gate[n, t, c >> 6] >> np.uint64(c & 63)) & np.uint64(1):
                    current[n, t, lo + c] = 0


def gate_current(current: np.ndarray, gate: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.gate_current`."""
    _gate_current(current, 0, current.shape[2], gate)


@njit(cache=True, nogil=True)
def _residual_add(x, spikes, gain):
    n_tok, t_steps, n_words = spikes.shape
    for n in range(n_tok):
        for t in range(t_steps):
            for w in range(n_words):
                bits = spikes[n, t, w]
                while bits:
                    c = w * 64 + _ctz(bits)
                    bits &= bits - np.uint64(1)
                    x[n, t, c] += gain[c]


def residual_add(x: np.ndarray, spikes: np.ndarray, gain: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.residual_add`."""
    _residual_add(x, spikes, gain)


@njit(cache=True, nogil=True, inline="always")
def _window(row, start, n_bits):
    """Bits ``start .. start + n_bits - 1`` (``n_bits`` <= 64) of the packed ``row``, as the low bits of a word."""
    w, shift = start >> 6, start & 63
    bits = row[w] >> np.uint64(shift)
    if shift + n_bits > 64:
        bits |= row[w + 1] << np.uint64(64 - shift)
    if n_bits < 64:
        bits &= (np.uint64(1) << np.uint64(n_bits)) - np.uint64(1)
    return bits


@njit(cache=True, nogil=True, inline="always")
def _head_score(q_bits, q_signed, row, lo, neg, head_dim):
    """``popcount(Q AND K)`` of one head: ``q_bits`` ``[2, chunks]`` (the query's bits; with ``q_signed`` its
    positive, then its negative half), ``row`` a packed K row with the head at bit ``lo`` (and, for signed K,
    its negative half at ``neg + lo``; ``neg`` -1: unsigned). With either signed, the score is the ternary
    product ``(Q⁺ - Q⁻)·(K⁺ - K⁻)``: each AND of a positive with a negative half counts -1."""
    score = np.int64(0)
    for i in range((head_dim + 63) // 64):
        width = min(64, head_dim - 64 * i)
        k_pos = _window(row, lo + 64 * i, width)
        score += np.int64(_popcount(q_bits[0, i] & k_pos))
        if q_signed:
            score -= np.int64(_popcount(q_bits[1, i] & k_pos))
        if neg >= 0:
            k_neg = _window(row, neg + lo + 64 * i, width)
            score -= np.int64(_popcount(q_bits[0, i] & k_neg))
            if q_signed:
                score += np.int64(_popcount(q_bits[1, i] & k_neg))
    return score


@njit(cache=True, nogil=True)
def _sfsa_job(job, q, k_cache, v_cache, past, num_heads, num_kv_heads, head_dim, scale, beta, threshold, initial,
              count, q_neg, k_neg, v_neg, out):
    """Job ``job`` of :func:`_sfsa`: new query ``job // num_heads``, head ``job % num_heads``. ``q_neg``,
    ``k_neg``, ``v_neg``: where the negative half of a signed pair's packed row starts (-1: unsigned)."""
    t_steps = q.shape[1]
    group = num_heads // num_kv_heads
    chunks = (head_dim + 63) // 64
    n, h = job // num_heads, job % num_heads
    q_lo, kv_lo = h * head_dim, (h // group) * head_dim     # a group of query heads shares one K/V head
    q_bits = np.zeros((t_steps, 2, chunks), np.uint64)
    fired = np.empty(t_steps, np.bool_)
    for t in range(t_steps):
        for i in range(chunks):
            q_bits[t, 0, i] = _window(q[n, t], q_lo + 64 * i, min(64, head_dim - 64 * i))
            if q_neg >= 0:
                q_bits[t, 1, i] = _window(q[n, t], q_neg + q_lo + 64 * i, min(64, head_dim - 64 * i))
        for c in range(q_lo, q_lo + head_dim):
            out[n, t, c] = 0
    for j in range(past + n + 1):
        u = initial
        s = np.float32(0.0)
        for t in range(t_steps):
            score = _head_score(q_bits[t], q_neg >= 0, k_cache[t, j], kv_lo, k_neg, head_dim)
            if count:
                u = initial + np.float32(score) * scale if t == 0 else u + np.float32(score) * scale
                continue
            u = beta * u + np.float32(score) * scale - threshold * s
            fired[t] = u >= threshold
            s = np.float32(1.0) if fired[t] else np.float32(0.0)
        if count:
            for t in range(t_steps):
                fired[t] = u >= np.float32(t + 1) * threshold
        for t in range(t_steps):
            if fired[t]:
                for half in range(2 if v_neg >= 0 else 1):      # V⁺ adds one per spike, V⁻ subtracts one
                    lo, sign = (kv_lo, 1) if half == 0 else (v_neg + kv_lo, -1)
                    for i in range(chunks):
                        bits = _window(v_cache[t, j], lo + 64 * i, min(64, head_dim - 64 * i))
                        while bits:
                            c = q_lo + 64 * i + _ctz(bits)
                            bits &= bits - np.uint64(1)
                            out[n, t, c] += sign


@njit(parallel=True, cache=True, nogil=True)
def _sfsa(q, k_cache, v_cache, past, num_heads, num_kv_heads, head_dim, scale, beta, threshold, initial, count,
          q_neg, k_neg, v_neg, out):
    for job in prange(q.shape[0] * num_heads):
        _sfsa_job(job, q, k_cache, v_cache, past, num_heads, num_kv_heads, head_dim, scale, beta, threshold,
                  initial, count, q_neg, k_neg, v_neg, out)


def sfsa(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, num_heads: int, num_kv_heads: int,
         head_dim: int, scale: float, beta: float, threshold: float, initial: float, count: bool,
         out: np.ndarray, signed: tuple[bool, bool, bool] = (False, False, False)) -> None:
    """See :func:`bispikclm.engine.reference.sfsa`."""
    q_neg, k_neg, v_neg = (size if on else -1 for size, on in
                           zip((num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), signed))
    _sfsa(q, k_cache, v_cache, past, num_heads, num_kv_heads, head_dim, np.float32(scale), np.float32(beta),
          np.float32(threshold), np.float32(initial), bool(count), q_neg, k_neg, v_neg, out)


@njit(parallel=True, cache=True, nogil=True)
def _head_int8(h, weight, scale, out, tile):
    n_tok, d = h.shape
    vocab = weight.shape[1]
    for job in prange((vocab + tile - 1) // tile):
        c0 = job * tile
        width = min(tile, vocab - c0)
        acc = np.empty(tile, np.float32)
        for n in range(n_tok):
            acc[:width] = 0
            for i in range(d):
                if i + PREFETCH_ROWS < d:
                    _prefetch_row(weight, i + PREFETCH_ROWS, c0, width)
                x = h[n, i]
                row = weight[i, c0:c0 + width]
                for c in range(width):
                    acc[c] += x * np.float32(row[c])
            for c in range(width):
                out[n, c0 + c] = acc[c] * scale[c0 + c]


def head_int8(h: np.ndarray, weight: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.head_int8`."""
    _head_int8(h, weight, scale, out, HEAD_TILE)


@njit(parallel=True, cache=True, nogil=True)
def _head_nibbles(h, weight, scale, out, tile):
    n_tok, d = h.shape
    vocab, group = scale.shape[1], d // scale.shape[0]
    for job in prange((vocab + tile - 1) // tile):
        c0 = job * tile                                      # tile is even: whole bytes
        width = min(tile, vocab - c0)
        first, count = c0 // 2, (width + 1) // 2
        acc = np.empty(tile, np.float32)
        part = np.empty(tile + 1, np.float32)
        for n in range(n_tok):
            acc[:width] = 0
            for g in range(scale.shape[0]):
                part[:width] = 0
                for i in range(g * group, (g + 1) * group):
                    if i + PREFETCH_ROWS < d:
                        _prefetch_row(weight, i + PREFETCH_ROWS, first, count)
                    x = h[n, i]
                    row = weight[i, first:first + count]
                    for j in range(count):
                        part[2 * j] += x * np.float32(np.int32(row[j] & np.uint8(15)) - 8)
                        part[2 * j + 1] += x * np.float32(np.int32(row[j] >> np.uint8(4)) - 8)
                for c in range(width):
                    acc[c] += part[c] * scale[g, c0 + c]
            for c in range(width):
                out[n, c0 + c] = acc[c]


def head_nibbles(h: np.ndarray, weight: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.head_nibbles`."""
    _head_nibbles(h, weight, scale, out, HEAD_TILE)


# -------------------------------------------------------------------------------- every block in one call
# Neuron slots of a block in the tables of :func:`blocks` (``HIDDEN_AND``: spikes only, gate AND hidden)
ATTN_IN, Q, K, V, ATTN, OUT, FFN_IN, GATE, HIDDEN, FFN_OUT, HIDDEN_AND = range(11)
NEURON_SLOTS, SPIKE_SLOTS = 10, 11
LINEARS = 4              # per block: qkv, out_proj, ffn_in (fc1, or gate and up), ffn_out (fc2 or down_proj)


@njit(cache=True, nogil=True)
def _neuron(current, lo, d, i, slot, betas, thresholds, initials, counting, out):
    _lif(current, lo, d, betas[i, slot], thresholds[NEURON_SLOTS * i + slot], initials[NEURON_SLOTS * i + slot],
         counting[i, slot], out)


@njit(parallel=True, cache=True, nogil=True)
def _blocks(x, past, keys, values, weights, biases, scales, thresholds, initials, betas, counting, gains, dims,
            attn_scale, spikes, counts, threads):
    n, t_steps, d = x.shape
    q_size, kv_size, f, heads, kv_heads, head_dim, gated, gate_and = dims
    for i in range(len(weights) // LINEARS):
        r = i if spikes.shape[0] > 1 else 0                   # recording: every layer's spikes; else reuse one
        s = spikes[r]
        _neuron(x.copy(), 0, d, i, ATTN_IN, betas, thresholds, initials, counting, s[ATTN_IN])
        # q, k, v: one pass over the fired rows of the three matrices side by side
        weight, bias, scale = weights[LINEARS * i], biases[LINEARS * i], scales[LINEARS * i]
        current = np.empty((n, t_steps, bias.shape[0]), np.float32)
        rows, factors, lengths = _events_from_spikes(s[ATTN_IN], d, bias)
        tile = _tile(bias.shape[0], n, threads)
        for job in prange((bias.shape[0] + tile - 1) // tile):
            _accumulate_job(job, rows, factors, lengths, weight, bias, scale, current, tile)
        _neuron(current, 0, q_size, i, Q, betas, thresholds, initials, counting, s[Q])
        _neuron(current, q_size, kv_size, i, K, betas, thresholds, initials, counting, s[K])
        _neuron(current, q_size + kv_size, kv_size, i, V, betas, thresholds, initials, counting, s[V])
        for m in range(n):
            for t in range(t_steps):
                for w in range(keys.shape[3]):
                    keys[i, t, past + m, w] = s[K, m, t, w]
                    values[i, t, past + m, w] = s[V, m, t, w]
        # SFSA against the packed cache, then out_proj on the counts O
        o = counts[r]
        k_cache, v_cache = keys[i], values[i]
        q = s[Q]
        beta, count = betas[i, ATTN], counting[i, ATTN]
        threshold, initial = thresholds[NEURON_SLOTS * i + ATTN][0], initials[NEURON_SLOTS * i + ATTN][0]
        for job in prange(n * heads):        # list items read outside the threads
            _sfsa_job(job, q, k_cache, v_cache, past, heads, kv_heads, head_dim, attn_scale, beta, threshold,
                      initial, count, -1, -1, -1, o)
        weight, bias, scale = weights[LINEARS * i + 1], biases[LINEARS * i + 1], scales[LINEARS * i + 1]
        current = np.empty((n, t_steps, d), np.float32)
        rows, factors, lengths = _events_from_counts(o, bias)
        tile = _tile(d, n, threads)
        for job in prange((d + tile - 1) // tile):
            _accumulate_job(job, rows, factors, lengths, weight, bias, scale, current, tile)
        _neuron(current, 0, d, i, OUT, betas, thresholds, initials, counting, s[OUT])
        _residual_add(x, s[OUT], gains[2 * i])
        # SFFN
        _neuron(x.copy(), 0, d, i, FFN_IN, betas, thresholds, initials, counting, s[FFN_IN])
        weight, bias, scale = weights[LINEARS * i + 2], biases[LINEARS * i + 2], scales[LINEARS * i + 2]
        current = np.empty((n, t_steps, bias.shape[0]), np.float32)
        rows, factors, lengths = _events_from_spikes(s[FFN_IN], d, bias)
        tile = _tile(bias.shape[0], n, threads)
        for job in prange((bias.shape[0] + tile - 1) // tile):
            _accumulate_job(job, rows, factors, lengths, weight, bias, scale, current, tile)
        hidden = HIDDEN
        if not gated:
            _neuron(current, 0, f, i, HIDDEN, betas, thresholds, initials, counting, s[HIDDEN])
        else:
            _neuron(current, 0, f, i, GATE, betas, thresholds, initials, counting, s[GATE])
            if not gate_and:             # select: the up current only where the gate fired
                _gate_current(current, f, f, s[GATE])
            _neuron(current, f, f, i, HIDDEN, betas, thresholds, initials, counting, s[HIDDEN])
            if gate_and:
                s[HIDDEN_AND] = s[GATE] & s[HIDDEN]
                hidden = HIDDEN_AND
        weight, bias, scale = weights[LINEARS * i + 3], biases[LINEARS * i + 3], scales[LINEARS * i + 3]
        current = np.empty((n, t_steps, d), np.float32)
        rows, factors, lengths = _events_from_spikes(s[hidden], f, bias)
        tile = _tile(d, n, threads)
        for job in prange((d + tile - 1) // tile):
            _accumulate_job(job, rows, factors, lengths, weight, bias, scale, current, tile)
        _neuron(current, 0, d, i, FFN_OUT, betas, thresholds, initials, counting, s[FFN_OUT])
        _residual_add(x, s[FFN_OUT], gains[2 * i + 1])


def blocks(x: np.ndarray, past: int, keys: np.ndarray, values: np.ndarray, plan, spikes: np.ndarray,
           counts: np.ndarray) -> None:
    """Every block of the model for ``N`` new tokens in one compiled call, after ``past`` cached positions.

    ``x`` ``[N, T, D]`` float32: the block input, updated in place to the last block's residual stream; ``keys``,
    ``values`` the cache (:class:`bispikclm.engine.PackedCache`), written at positions ``past ..``; ``plan`` the
    blocks' weights and neurons as :class:`bispikclm.engine.engine.FusedPlan` lays them out; ``spikes``
    ``[L or 1, SPIKE_SLOTS, N, T, W]`` uint64 and ``counts`` ``[L or 1, N, T, q_size]`` int32 receive every
    layer's spikes by slot and attention counts (with a first axis of 1, each layer overwrites the last).
    Gives the bits of the engine's per-kernel path (:meth:`bispikclm.engine.PackedEngine.forward` with
    ``fused=False``), which runs the same kernels one call at a time."""
    _blocks(x, past, keys, values, plan.weights, plan.biases, plan.scales, plan.thresholds, plan.initials,
            plan.betas, plan.counting, plan.gains, plan.dims, plan.attn_scale, spikes, counts, numba.get_num_threads())
