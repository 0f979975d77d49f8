"""The per-layer math of ``modelstock/reference.py`` on numpy arrays, for the streamed file
merge: numpy imports in 0.1 s where torch takes ~1.8 s and 0.65 GB, which is most of a
ViT-B-32 merge's wall time. Same formulas, same order of operations (the merge is bitwise
equal to the reference's; the Gram's runs are summed by numpy's matmul instead of torch's
bmm, so cos may differ in the last bits); the tests hold both to an fp64 formula.

bfloat16, which numpy lacks, travels as its raw uint16 bits: widened to fp32 exactly by a
16-bit shift, narrowed with round-to-nearest-even as torch does.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Sequence

import numpy as np

from ..dtypes import NUMPY_DTYPES
from ..tiles import BLOCK, CHUNK, tiles

def gram(w0: np.ndarray, ws: Sequence[np.ndarray], rows: int = 1, mean_delta: np.ndarray | None = None) -> np.ndarray:
    """``(rows, N, N)`` fp64 Gram matrices of ``d_i = ws[i] - w0``; see reference.gram (the
    same runs of CHUNK products in fp32, the same fp64 sums of the runs). The tiles' partial
    sums are computed on all cores and added in tile order: the result does not depend on
    the number of threads.

    ``mean_delta`` (an array of the layer's size that shares no memory with the inputs): also
    store ``mean_i(d_i)`` there, from the deltas this pass forms anyway, for
    ``merge_from_mean_delta``; the merge then reads 2 arrays instead of N + 1 (a ViT-B-32 file
    merge: ~0.05 s of its ~0.6 s on 2 cores). The same operations as ``merge_into``'s, so the
    same bits."""
    n = len(ws)
    k = w0.size // rows
    w0 = w0.reshape(rows, k)
    ws = [w.reshape(rows, k) for w in ws]
    md = None if mean_delta is None else mean_delta.reshape(rows, k)
    out = np.zeros((rows, n, n), dtype=np.float64)
    k_runs = k // CHUNK * CHUNK

    def partials(taken):
        scratch = np.empty(n * min(BLOCK, rows * k_runs), dtype=w0.dtype)
        result = []
        for index, (r0, r1, c0, c1) in taken:
            d = scratch[: n * (r1 - r0) * (c1 - c0)].reshape(n, r1 - r0, c1 - c0)
            for i, w in enumerate(ws):
                np.subtract(w[r0:r1, c0:c1], w0[r0:r1, c0:c1], out=d[i])
            if md is not None:
                _mean_of(d, out=md[r0:r1, c0:c1])
            runs = d.reshape(n, r1 - r0, -1, CHUNK)
            tile = np.empty((r1 - r0, n, n), dtype=np.float64)
            # one run's dot product per (1, CHUNK) x (CHUNK, 1) matmul: 15% faster than einsum
            # here, and a batched matmul of (N, CHUNK) blocks is 2x slower than either
            for i in range(n):
                for j in range(i, n):
                    dots = np.matmul(runs[i][..., None, :], runs[j][..., :, None])
                    tile[:, i, j] = tile[:, j, i] = dots.reshape(r1 - r0, -1).sum(1, dtype=np.float64)
            result.append((index, (r0, r1, tile)))
        return result

    for r0, r1, tile in _in_parallel(partials, list(tiles(rows, k_runs))):
        out[r0:r1] += tile
    for r0, r1, _, _ in tiles(rows, k - k_runs) if k_runs < k else ():
        base = w0[r0:r1, k_runs:].astype(np.float64)
        d = np.stack([w[r0:r1, k_runs:].astype(np.float64) - base for w in ws], axis=1)
        out[r0:r1] += np.matmul(d, d.transpose(0, 2, 1))
        if md is not None:  # the columns past the whole runs, from deltas in the compute dtype
            _mean_of(np.stack([w[r0:r1, k_runs:] - w0[r0:r1, k_runs:] for w in ws]), out=md[r0:r1, k_runs:])
    return out


def _mean_of(d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``(d[0] + d[1] + ... ) / N`` into ``out``, summed in order (reference.merge_into's)."""
    np.add(d[0], d[1], out=out)
    for x in d[2:]:
        out += x
    out /= len(d)
    return out


def merge_into(out: np.ndarray, w0: np.ndarray | None, ws: Sequence[np.ndarray], t=None, weights=None) -> np.ndarray:
    """``out = w0 + t mean_i(weights_i (w_i - w0))`` per row, or the plain mean; see reference.merge_into.
    Tiles are independent: they are computed on all cores."""
    rows = 1 if t is None else len(t)
    k = out.size // rows
    out2, ws2 = out.reshape(rows, k), [w.reshape(rows, k) for w in ws]
    base2 = None if w0 is None else w0.reshape(rows, k)
    weight = None if t is None else np.asarray(t, dtype=out.dtype).reshape(rows, 1)
    per_model = None if weights is None else np.asarray(weights, dtype=out.dtype).reshape(rows, -1)

    def merge_tiles(taken):
        scratch = np.empty((2, min(BLOCK, out.size)), dtype=out.dtype)
        for _, (r0, r1, c0, c1) in taken:
            tile = (slice(r0, r1), slice(c0, c1))
            mean, d = (s[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0) for s in scratch)
            if base2 is None:
                out2[tile] = _mean_of([w[tile] for w in ws2], out=mean)
            else:
                np.subtract(ws2[0][tile], base2[tile], out=mean)
                if per_model is not None:
                    mean *= per_model[r0:r1, :1]
                for i, w in enumerate(ws2[1:], 1):
                    np.subtract(w[tile], base2[tile], out=d)
                    if per_model is not None:
                        d *= per_model[r0:r1, i: i + 1]
                    mean += d
                mean /= len(ws)
                mean *= weight[r0:r1]
                np.add(base2[tile], mean, out=out2[tile])
        return ()

    _in_parallel(merge_tiles, list(tiles(rows, k)))
    return out


def merge_from_mean_delta(out: np.ndarray, w0: np.ndarray, t) -> np.ndarray:
    """``out = w0 + t out`` per row, where ``out`` holds ``mean_i(d_i)`` (``gram(...,
    mean_delta=out)``): merge_into's result, bit for bit, from 2 arrays instead of N + 1."""
    rows = len(t)
    k = out.size // rows
    out2, base2 = out.reshape(rows, k), w0.reshape(rows, k)
    weight = np.asarray(t, dtype=out.dtype).reshape(rows, 1)

    def merge_tiles(taken):
        for _, (r0, r1, c0, c1) in taken:
            tile = out2[r0:r1, c0:c1]
            tile *= weight[r0:r1]
            tile += base2[r0:r1, c0:c1]
        return ()

    _in_parallel(merge_tiles, list(tiles(rows, k)))
    return out


def threads() -> int:
    """Threads the tile loops use: ``MODELSTOCK_THREADS``, else every core this process may
    run on. numpy releases the GIL inside each tile's arithmetic."""
    env = os.environ.get("MODELSTOCK_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _in_parallel(fn, items: list) -> list:
    """Each item's result, in items' order. ``fn(taken)`` works through ``taken``, an iterator of
    (index, item), and returns the (index, result) pairs of the items it took. The items are
    shared out as the threads ask for them, not cut in fixed parts: the cores are also the
    reader's and the writer's, and with fixed halves one thread waited for a descheduled
    other (a ViT-B-32 file merge's streaming part: 0.58-0.60 s against 0.61-0.68 s with
    halves, 2 cores). A single item runs on the calling thread: the pool's hand-off would
    cost more."""
    workers = min(threads(), len(items))
    counter = itertools.count()  # next() on it is atomic under the GIL: each item is taken once
    if workers <= 1:
        pairs = fn(_taken(items, counter))
    else:
        global _pool, _pool_size
        with _pool_lock:
            if _pool_size < workers:  # more threads asked for (MODELSTOCK_THREADS raised): a bigger pool
                if _pool is not None:
                    _pool.shutdown(wait=False)
                _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modelstock-tiles"), workers
            pool = _pool
        stop: list[bool] = []
        futures = [pool.submit(fn, _taken(items, counter, stop)) for _ in range(workers - 1)]
        try:
            pairs = list(fn(_taken(items, counter, stop)))  # the caller works too
        except BaseException:
            # (Ctrl-C, or a failing tile): the others take no new tile and are waited for, so
            # nothing reads the arrays, which the caller may unmap, once this returns
            stop.append(True)
            wait(futures)
            raise
        wait(futures)  # all of them, before any one's error is raised
        for f in futures:
            pairs.extend(f.result())
    results = [None] * len(items)
    for index, result in pairs:
        results[index] = result
    return results


def _taken(items: list, counter, stop=()):
    while not stop and (index := next(counter)) < len(items):
        yield index, items[index]


def all_finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


def equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def maximum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The elementwise largest of same-shaped arrays, in the first one's dtype."""
    out = np.array(arrays[0], copy=True)
    for a in arrays[1:]:
        np.maximum(out, a.astype(out.dtype, copy=False), out=out)
    return out


def widen(x: np.ndarray, dtype: str) -> np.ndarray:
    """An array stored as ``dtype`` (bfloat16 as bits) in fp32 (the inverse of ``cast``)."""
    return to_float(x, dtype, np.empty(x.shape, dtype=np.float32))


def to_float(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """A stored float array (bfloat16 as uint16 bits) widened into ``out`` (fp32 or fp64)."""
    if dtype == "bfloat16":
        bits = out.view(np.uint32) if out.dtype == np.float32 else None
        if bits is not None:
            np.left_shift(raw, 16, out=bits, dtype=np.uint32)  # exact: bf16 is fp32's top half
            return out
        wide = np.left_shift(raw.astype(np.uint32), 16).view(np.float32)
        out[...] = wide
        return out
    out[...] = raw
    return out


def cast(x: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` (fp32/fp64) in the dtype named ``dtype``; bfloat16 as uint16 bits, rounded to
    nearest even like torch's ``.to(torch.bfloat16)``."""
    target = NUMPY_DTYPES[dtype]
    if out is None:
        if x.dtype == target:  # already in the output dtype: no copy (a whole output's worth)
            return x
        out = np.empty(x.shape, dtype=target)
    if dtype != "bfloat16":
        out[...] = x
        return out
    x32 = x if x.dtype == np.float32 else x.astype(np.float32)
    for start in range(0, x32.size, BLOCK):  # in tiles: the uint32 temporaries stay small
        bits = x32.reshape(-1)[start: start + BLOCK].view(np.uint32)
        lsb = (bits >> 16) & 1
        rounded = bits + (np.uint32(0x7FFF) + lsb)
        out.reshape(-1)[start: start + BLOCK] = rounded >> 16
    return out
