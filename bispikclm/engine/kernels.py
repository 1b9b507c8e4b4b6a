"""Numba fast path of every engine kernel; same signatures and same bits as :mod:`bispikclm.engine.reference`.

* Linear layers are event-driven: the words of all T time steps of an input are OR-ed and the set bits walked
  with count-trailing-zeros into a list of events (input row, its T-step firing pattern); each listed weight row
  is then read once and added to the accumulator of every step whose bit is set (the gather is fused into the
  accumulation). Threads split the output features into tiles of whole 64-bit words, so each thread writes its
  own words. The row ``PREFETCH_ROWS`` ahead in the list is prefetched while one is added: rows that fired are
  scattered, so the hardware prefetcher cannot guess them (1.6x on weights that are not in cache).
* The int8 head (float LayerNorm output times int8 rows) accumulates rows into tiles of the vocabulary, with the
  same prefetch (2x).
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
from numba.extending import intrinsic


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


def _tile(features: int, tokens: int) -> int:
    """Output features per job, a multiple of 64: one contiguous share per thread when decoding a token (long
    runs along each weight row), at most :data:`PREFILL_TILE` when many tokens reuse the tile."""
    per_thread = -(-features // numba.get_num_threads())
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


@njit(parallel=True, cache=True, nogil=True)
def _accumulate(rows, factors, lengths, weight, bias, scale, out, tile):
    """``out[n, t] = (bias + sum_k factors[n, k, t] * weight[rows[n, k]]) * scale``, reading each listed row once
    for all T steps and prefetching the row ``PREFETCH_ROWS`` ahead."""
    n_tok, t_steps = factors.shape[0], factors.shape[2]
    n_out = weight.shape[1]
    for job in prange((n_out + tile - 1) // tile):
        c0 = job * tile
        width = min(tile, n_out - c0)
        acc = np.empty((t_steps, tile), bias.dtype)
        for n in range(n_tok):
            for t in range(t_steps):
                acc[t, :width] = bias[c0:c0 + width]
            for k in range(lengths[n]):
                if k + PREFETCH_ROWS < lengths[n]:
                    _prefetch_row(weight, rows[n, k + PREFETCH_ROWS], c0, width)
                row = weight[rows[n, k], c0:c0 + width]
                for t in range(t_steps):
                    factor = factors[n, k, t]
                    a = acc[t]
                    if factor == 1:                     # a spike: an accumulate
                        for c in range(width):
                            a[c] += row[c]
                    elif factor != 0:                   # an integer count (O = P V)
                        for c in range(width):
                            a[c] += factor * row[c]
            for t in range(t_steps):
                for c in range(width):
                    out[n, t, c0 + c] = np.float32(acc[t, c]) * scale[c0 + c]


def linear_spikes(spikes: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.linear_spikes`."""
    events = _events_from_spikes(spikes, weight.shape[0], bias)
    _accumulate(*events, weight, bias, scale, out, _tile(weight.shape[1], spikes.shape[0]))


def linear_counts(counts: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.linear_counts`."""
    events = _events_from_counts(counts, bias)
    _accumulate(*events, weight, bias, scale, out, _tile(weight.shape[1], counts.shape[0]))


@njit(cache=True, nogil=True)
def _lif(current, beta, threshold, initial, count, out):
    n_tok, t_steps, d = current.shape
    for n in range(n_tok):
        for w in range(out.shape[2]):
            for t in range(t_steps):
                out[n, t, w] = 0
        for c in range(d):
            theta = threshold[c]
            if count:
                total = initial[c] + current[n, 0, c]
                current[n, 0, c] = total
                for t in range(1, t_steps):
                    total = total + current[n, t, c]
                    current[n, t, c] = total
                for t in range(t_steps):
                    if total >= np.float32(t + 1) * theta:
                        out[n, t, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
                continue
            u = initial[c]
            s = np.float32(0.0)
            for t in range(t_steps):
                u = beta * u + current[n, t, c] - theta * s
                current[n, t, c] = u
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
    _lif(current, np.float32(beta), _per_channel(threshold, channels), _per_channel(initial, channels), bool(count),
         out)


@njit(cache=True, nogil=True)
def _gate_current(current, gate):
    n_tok, t_steps, d = current.shape
    for n in range(n_tok):
        for t in range(t_steps):
            for c in range(d):
                if not (gate[n, t, c >> 6] >> np.uint64(c & 63)) & np.uint64(1):
                    current[n, t, c] = 0


def gate_current(current: np.ndarray, gate: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.gate_current`."""
    _gate_current(current, gate)


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


@njit(parallel=True, cache=True, nogil=True)
def _sfsa(q, k_cache, v_cache, past, num_heads, num_kv_heads, head_dim, scale, beta, threshold, initial, count, out):
    n_new, t_steps = q.shape[0], q.shape[1]
    group = num_heads // num_kv_heads
    chunks = (head_dim + 63) // 64
    for job in prange(n_new * num_heads):
        n, h = job // num_heads, job % num_heads
        q_lo, kv_lo = h * head_dim, (h // group) * head_dim     # a group of query heads shares one K/V head
        q_bits = np.empty((t_steps, chunks), np.uint64)
        fired = np.empty(t_steps, np.bool_)
        for t in range(t_steps):
            for i in range(chunks):
                q_bits[t, i] = _window(q[n, t], q_lo + 64 * i, min(64, head_dim - 64 * i))
            for c in range(q_lo, q_lo + head_dim):
                out[n, t, c] = 0
        for j in range(past + n + 1):
            u = initial
            s = np.float32(0.0)
            for t in range(t_steps):
                score = np.uint64(0)
                for i in range(chunks):
                    score += _popcount(q_bits[t, i] & _window(k_cache[t, j], kv_lo + 64 * i,
                                                              min(64, head_dim - 64 * i)))
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
                    for i in range(chunks):
                        bits = _window(v_cache[t, j], kv_lo + 64 * i, min(64, head_dim - 64 * i))
                        while bits:
                            c = q_lo + 64 * i + _ctz(bits)
                            bits &= bits - np.uint64(1)
                            out[n, t, c] += 1


def sfsa(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, num_heads: int, num_kv_heads: int,
         head_dim: int, scale: float, beta: float, threshold: float, initial: float, count: bool,
         out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.sfsa`."""
    _sfsa(q, k_cache, v_cache, past, num_heads, num_kv_heads, head_dim, np.float32(scale), np.float32(beta),
          np.float32(threshold), np.float32(initial), bool(count), out)


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
