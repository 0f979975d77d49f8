"""The CPU file merge: a pipeline that streams layer by layer, the arithmetic on numpy.

Three threads, one layer after another:
  reader  maps the layer's N + 1 input tensors (safetensors: memory-mapped, pre-faulted; inputs
          not in the compute dtype are converted into a buffer) and takes a region of one reused
          buffer (a ring) for the result;
  main    computes the ratio and writes the merged layer into that region;
  writer  appends it to the output file, then releases the region and the mappings.
Memory stays bounded whatever the checkpoint's size: the ring holds the largest layer plus a
little read-ahead, and the bytes mapped at once are capped the same way (and the tensors, so
that file descriptors stay bounded too). Nothing is copied
from the page cache before the arithmetic reads it.
"""
from __future__ import annotations

import collections
import queue
import threading

import numpy as np

from ..backends import numpy_ops
from ..dtypes import NUMPY_DTYPES, nbytes
from ..io import CheckpointWriter
from ..layer import cast_output, check_copy, merge_layer
from ..plan import Layer
from ..report import MergeReport
from .options import MergeOptions

# Ring capacity and mapped bytes beyond the largest layer's: lets small layers be read ahead
# of the arithmetic. More only adds memory to touch (page faults cost as much as the copy).
_READ_AHEAD_BYTES = 32 << 20
# Input tensors mapped at once, whatever their size: each safetensors mapping holds a file
# descriptor (Python's mmap keeps its own), so a checkpoint of many small tensors would
# otherwise run into `ulimit -n` (1024 by default) within its byte budget.
_MAX_MAPPED = 64


class _Budget:
    """Bytes and input tensors in flight, acquired in layer order and released in the same
    order. One request over either cap is granted when nothing else is in flight."""

    def __init__(self, cap: int, max_tensors: int = _MAX_MAPPED):
        self.cap, self.used, self.closed = cap, 0, False
        self.max_tensors, self.tensors = max_tensors, 0
        self._cv = threading.Condition()

    def acquire(self, n: int, tensors: int = 1) -> bool:
        with self._cv:
            while (self.tensors and (self.used + n > self.cap or self.tensors + tensors > self.max_tensors)
                   and not self.closed):
                self._cv.wait()
            self.used += n
            self.tensors += tensors
            return not self.closed

    def release(self, n: int, tensors: int = 1) -> None:
        with self._cv:
            self.used -= n
            self.tensors -= tensors
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()


class _Ring:
    """Regions of one flat buffer, handed out and released in FIFO order (the layer order)."""

    def __init__(self, numel: int, dtype: str):
        self.buf = np.empty(numel, dtype=NUMPY_DTYPES[dtype])
        self.cap = numel
        self._live: collections.deque[tuple[int, int]] = collections.deque()
        self._head = 0
        self._cv = threading.Condition()
        self.closed = False

    def _fit(self, n: int) -> int | None:
        if not self._live:
            return 0 if n <= self.cap else None
        tail = self._live[0][0]
        if self._head >= tail:
            if self.cap - self._head >= n:
                return self._head
            return 0 if tail >= n else None
        return self._head if tail - self._head >= n else None

    def alloc(self, n: int) -> np.ndarray | None:
        with self._cv:
            while (start := self._fit(n)) is None and not self.closed:
                self._cv.wait()
            if self.closed:
                return None
            self._live.append((start, start + n))
            self._head = start + n
            return self.buf[start: start + n]

    def release(self) -> None:
        with self._cv:
            self._live.popleft()
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()


def stream(inputs, layers: list[Layer], entries, write, report: MergeReport, bar, options: MergeOptions,
           check=lambda: None) -> None:
    """The CPU merge: the reader thread maps layers ahead, this thread computes on numpy, the
    writer writes; appends each layer's figures to ``report`` in order. ``check()`` runs before
    each layer (``io/leases.py``: it raises if an input is about to change)."""
    sources = report.inputs
    compute_dtype = options.compute_dtype
    floats = [layer for layer in layers if not layer.copied]
    buffer_elems = {layer.name: _buffer_elems(layer, dtype, compute_dtype)
                    for layer, (_, dtype, _) in zip(layers, entries) if not layer.copied}
    itemsize = np.dtype(NUMPY_DTYPES[compute_dtype]).itemsize
    ring = _Ring(min(sum(buffer_elems.values()), max(buffer_elems.values(), default=0) + _READ_AHEAD_BYTES // itemsize),
                 compute_dtype)
    mapped = _Budget(max((layer.nbytes_in for layer in floats), default=0) + _READ_AHEAD_BYTES)
    ready: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_layers, daemon=True,
                              args=(inputs, layers, buffer_elems, ring, mapped, compute_dtype, ready))
    reader.start()
    try:
        for layer, (_, dtype, _) in zip(layers, entries):
            check()
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            if layer.copied:
                value, stats = check_copy(layer, item, sources, numpy_ops, options.int_tensors)
                if dtype != layer.dtypes[0]:  # a float the base alone has, written in the output dtype
                    value = numpy_ops.cast(numpy_ops.widen(value, layer.dtypes[0]), dtype)
                write(layer.name, value)
            else:
                (w0, *ws), region = item
                out_buf = region[: layer.numel]
                # out_buf: the region's head; inputs converted to the compute dtype lie past it
                merged, stats = merge_layer(layer, w0, ws, out_buf, sources, numpy_ops, method=options.method,
                                            out_is_separate=True)
                spare = None
                if dtype != compute_dtype:  # the region's tail is reserved for the cast
                    spare = region[region.size - _cast_elems(layer, dtype, compute_dtype):]
                    spare = spare.view(np.uint8)[: nbytes(dtype, layer.shape)].view(NUMPY_DTYPES[dtype])
                merged = cast_output(merged, dtype, stats, numpy_ops, out=spare)
                # The inputs' mappings are released with the region, once written, by the
                # writer thread: unmapping them costs ~0.1 s per GB, off the arithmetic's path.
                write(layer.name, merged.reshape(layer.shape), release=_releaser(ring, mapped, layer, item))
                del w0, ws, item
            report.layers.append(stats)
            if bar is not None:
                bar.update(layer.nbytes_in)
    finally:
        ring.close()
        mapped.close()
        reader.join()


def _cast_elems(layer: Layer, dtype: str, compute_dtype: str) -> int:
    return 0 if dtype == compute_dtype else -(-nbytes(dtype, layer.shape) // nbytes(compute_dtype, (1,)))


def _buffer_elems(layer: Layer, dtype: str, compute_dtype: str) -> int:
    """Ring elements a layer needs: its result, each input stored in another dtype (converted),
    and room for the result cast to the output dtype."""
    converted = sum(d != compute_dtype for d in layer.dtypes)
    return layer.numel * (1 + converted) + _cast_elems(layer, dtype, compute_dtype)


def _releaser(ring: "_Ring", mapped: _Budget, layer: Layer, inputs):
    held = [inputs]  # the last references to the layer's mapped inputs

    def release():
        held.clear()
        ring.release()
        mapped.release(layer.nbytes_in, len(layer.names))
    return release


class Writer:
    """A thread that writes merged layers in order, then calls each one's ``release``, so that
    writing overlaps the next layer's arithmetic. Used as ``with Writer(...) as write:``;
    leaving the block waits for every write and raises the writer's error, if any."""

    def __init__(self, writer: CheckpointWriter):
        self._writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            name, tensor, release = item
            try:
                if self._error is None:
                    # a function stands for an array that is not ready yet (a copy from a GPU)
                    self._writer.write(name, tensor() if callable(tensor) else tensor)
            except BaseException as e:
                self._error = e
            finally:
                del tensor, item
                if release is not None:
                    release()

    def __call__(self, name: str, tensor: np.ndarray, release=None) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, tensor, release))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._error is None:
            self._error = exc  # the merge failed or was interrupted: skip the writes still queued
        self._q.put(None)
        self._thread.join()
        if self._error is not None and exc_type is None:
            raise self._error


def _read_layers(inputs, layers: list[Layer], buffer_elems: dict[str, int], ring: "_Ring", mapped: _Budget,
                 compute_dtype: str, ready: queue.Queue) -> None:
    """Reader thread: for each layer in order, map its inputs (converting those stored in
    another dtype into the ring) and take its result's region; hand both to the main thread.
    An error is handed over in place of the layer."""
    try:
        for layer in layers:
            if layer.copied:
                ready.put([ck.read(name) for ck, name in zip(inputs, layer.names)])
                continue
            if not mapped.acquire(layer.nbytes_in, len(layer.names)):
                return  # the main thread stopped
            region = ring.alloc(buffer_elems[layer.name])
            if region is None:
                return
            rows, spare = [], region[layer.numel:]
            for ck, name, dtype in zip(inputs, layer.names, layer.dtypes):
                w = ck.view(name)
                if dtype != compute_dtype:
                    w, spare = numpy_ops.to_float(w, dtype, spare[: layer.numel]), spare[layer.numel:]
                rows.append(w)
            ready.put((rows, region))
            del rows, w, spare, region
    except BaseException as e:  # handed to the main thread, which raises it
        ready.put(e)
