"""Numba fast path of every engine kernel; same signatures and same bits as :mod:`bispikclm.engine.reference`.

* Linear layers are event-driven: the words of all T time steps of an input are OR-ed, the set bits are walked
  with count-trailing-zeros, and each weight row that fired at any step is read once and added to the
  accumulator of every step whose bit is set (the gather is fused into the accumulation). Threads split the
  output features into tiles of whole 64-bit words, so each thread writes its own words.
  The fired rows are listed first and the row ``PREFETCH_ROWS`` ahead is prefetched while one is added: rows
  that fired are scattered, so the hardware prefetcher cannot guess them (1.6x on weights that are not in cache).
* The int8 head (float LayerNorm output times int8 rows) accumulates rows into tiles of the vocabulary, with the
  same prefetch (2x).
* Q·Kᵀ is AND + popcount over packed words; P·V adds the value spikes of the keys whose attention neuron
  fired, walking their set bits.
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


@njit(parallel=True, cache=True, nogil=True)
def _linear_spikes(spikes, weight, bias, scale, out, tile):
    n_tok, t_steps, n_words = spikes.shape
    n_in, n_out = weight.shape
    n_tiles = (n_out + tile - 1) // tile
    for job in prange(n_tiles):
        c0 = job * tile
        width = min(tile, n_out - c0)
        acc = np.empty((t_steps, tile), bias.dtype)
        rows = np.empty(n_in, np.int64)
        for n in range(n_tok):
            for t in range(t_steps):
                acc[t, :width] = bias[c0:c0 + width]
            count = 0                                   # the inputs that fired at any step, in increasing order
            for w in range(n_words):
                fired = np.uint64(0)
                for t in range(t_steps):
                    fired |= spikes[n, t, w]
                while fired:
                    rows[count] = w * 64 + _ctz(fired)
                    fired &= fired - np.uint64(1)
                    count += 1
            for k in range(count):
                if k + PREFETCH_ROWS < count:
                    _prefetch_row(weight, rows[k + PREFETCH_ROWS], c0, width)
                i = rows[k]
                row = weight[i, c0:c0 + width]          # read once, added at every step whose bit is set
                for t in range(t_steps):
                    if (spikes[n, t, i >> 6] >> np.uint64(i & 63)) & np.uint64(1):
                        a = acc[t]
                        for c in range(width):
                            a[c] += row[c]
            for t in range(t_steps):
                for c in range(width):
                    out[n, t, c0 + c] = np.float32(acc[t, c]) * scale[c0 + c]


def linear_spikes(spikes: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.linear_spikes`."""
    _linear_spikes(spikes, weight, bias, scale, out, _tile(weight.shape[1], spikes.shape[0]))


@njit(parallel=True, cache=True, nogil=True)
def _linear_counts(counts, weight, bias, scale, out, tile):
    n_tok, t_steps, n_in = counts.shape
    n_out = weight.shape[1]
    n_tiles = (n_out + tile - 1) // tile
    for job in prange(n_tiles):
        c0 = job * tile
        width = min(tile, n_out - c0)
        acc = np.empty((t_steps, tile), bias.dtype)
        rows = np.empty(n_in, np.int64)
        for n in range(n_tok):
            for t in range(t_steps):
                acc[t, :width] = bias[c0:c0 + width]
            count = 0                                   # the inputs with a non-zero count at any step
            for i in range(n_in):
                for t in range(t_steps):
                    if counts[n, t, i] != 0:
                        rows[count] = i
                        count += 1
                        break
            for k in range(count):
                if k + PREFETCH_ROWS < count:
                    _prefetch_row(weight, rows[k + PREFETCH_ROWS], c0, width)
                i = rows[k]
                row = weight[i, c0:c0 + width]
                for t in range(t_steps):
                    factor = counts[n, t, i]
                    if factor != 0:
                        a = acc[t]
                        for c in range(width):
                            a[c] += factor * row[c]
            for t in range(t_steps):
                for c in range(width):
                    out[n, t, c0 + c] = np.float32(acc[t, c]) * scale[c0 + c]


def linear_counts(counts: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.linear_counts`."""
    _linear_counts(counts.astype(bias.dtype), weight, bias, scale, out, _tile(weight.shape[1], counts.shape[0]))


@njit(cache=True, nogil=True)
def _lif(current, beta, threshold, out):
    n_tok, t_steps, d = current.shape
    for n in range(n_tok):
        for w in range(out.shape[2]):
            for t in range(t_steps):
                out[n, t, w] = 0
        for c in range(d):
            u = np.float32(0.0)
            s = np.float32(0.0)
            for t in range(t_steps):
                u = beta * u + current[n, t, c] - threshold * s
                current[n, t, c] = u
                if u >= threshold:
                    s = np.float32(1.0)
                    out[n, t, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
                else:
                    s = np.float32(0.0)


def lif(current: np.ndarray, beta: float, threshold: float, out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.lif`."""
    _lif(current, np.float32(beta), np.float32(threshold), out)


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


@njit(parallel=True, cache=True, nogil=True)
def _sfsa(q, k_cache, v_cache, past, num_heads, scale, beta, threshold, out):
    n_new, t_steps, n_words = q.shape
    head_dim = out.shape[2] // num_heads
    for job in prange(n_new * num_heads):
        n = job // num_heads
        lo = (job % num_heads) * head_dim
        hi = lo + head_dim
        w0, w1 = lo >> 6, (hi - 1) >> 6
        masks = np.empty(w1 - w0 + 1, np.uint64)
        for w in range(w0, w1 + 1):
            first, last = max(lo, w * 64) - w * 64, min(hi, w * 64 + 64) - w * 64
            span = last - first
            full = np.uint64(0xFFFFFFFFFFFFFFFF)
            masks[w - w0] = (full if span == 64 else (np.uint64(1) << np.uint64(span)) - np.uint64(1)) \
                << np.uint64(first)
        for t in range(t_steps):
            for c in range(lo, hi):
                out[n, t, c] = 0
        for j in range(past + n + 1):
            u = np.float32(0.0)
            s = np.float32(0.0)
            for t in range(t_steps):
                score = np.uint64(0)
                for w in range(w0, w1 + 1):
                    score += _popcount(q[n, t, w] & k_cache[t, j, w] & masks[w - w0])
                u = beta * u + np.float32(score) * scale - threshold * s
                if u >= threshold:
                    s = np.float32(1.0)
                    for w in range(w0, w1 + 1):
                        bits = v_cache[t, j, w] & masks[w - w0]
                        while bits:
                            c = w * 64 + _ctz(bits)
                            bits &= bits - np.uint64(1)
                            out[n, t, c] += 1
                else:
                    s = np.float32(0.0)


def sfsa(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, num_heads: int, scale: float,
         beta: float, threshold: float, out: np.ndarray) -> None:
    """See :func:`bispikclm.engine.reference.sfsa`."""
    _sfsa(q, k_cache, v_cache, past, num_heads, np.float32(scale), np.float32(beta), np.float32(threshold), out)



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
