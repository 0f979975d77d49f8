"""File-to-file merges on a GPU (``merge_files(..., device="cuda")``): a four-stage pipeline.

  reader  (thread)  preads every tensor of the next chunk of layers into one of two pinned host
                    buffers (no mapping: the bytes land where the copy engine reads them);
  main    (thread)  copies a filled buffer to the GPU on a copy stream, merges the chunk there on
                    the compute stream (``InPlaceMerge`` on views of the device buffer: the Triton
                    kernels, with the same checks and figures as an in-memory merge), and copies
                    the result into one of two pinned output buffers on a second copy stream;
  writer  (thread)  waits for that copy and appends the chunk's tensors to the output file.
Events order the streams, so the host blocks only to reuse a buffer. With two buffers a side,
chunk k + 1 is read and copied in while chunk k computes and chunk k - 1 is copied out and
written. A chunk is consecutive layers up to ``chunk_bytes`` of input (or one larger layer);
memory is two chunks' inputs and outputs pinned on the host and the same on the GPU, whatever
the checkpoint's size.
"""
from __future__ import annotations

import contextlib
import glob
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..backends import numpy_ops
from ..dtypes import NUMPY_DTYPES, nbytes
from ..errors import InputError
from ..plan import Layer
from ..report import MergeReport
from .in_memory import InPlaceMerge
from .options import MergeOptions

_ALIGN = 64  # bytes: every tensor starts 64-byte aligned in the buffers (vector loads, any dtype)
_STOP = object()


def check_device(device: str) -> torch.device:
    """The CUDA device a file merge runs on, or a clear error."""
    if not torch.cuda.is_available():
        raise InputError(f"device={device!r}: torch sees no CUDA device (use device='cpu')")
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _Chunk:
    layers: list[int]                          # indices into the merge's layers, in order
    inputs: list[list[tuple[int, int]]]        # per layer, per input: (offset, bytes)
    outputs: list[tuple[int, int]]             # per layer: (offset, bytes) of the result
    in_bytes: int
    out_bytes: int


def plan_chunks(layers: list[Layer], out_dtypes: list[str], chunk_bytes: int) -> list[_Chunk]:
    """Consecutive layers, each chunk holding at most ``chunk_bytes`` of input unless one
    layer alone is larger; every tensor 64-byte aligned in its buffer."""
    chunks: list[_Chunk] = []
    for i, (layer, dtype) in enumerate(zip(layers, out_dtypes)):
        sizes = [nbytes(d, layer.shape) for d in layer.dtypes]
        if not chunks or (chunks[-1].in_bytes + sum(map(_aligned, sizes)) > chunk_bytes and chunks[-1].layers):
            chunks.append(_Chunk([], [], [], 0, 0))
        c = chunks[-1]
        spans = []
        for size in sizes:
            spans.append((c.in_bytes, size))
            c.in_bytes += _aligned(size)
        c.layers.append(i)
        c.inputs.append(spans)
        c.outputs.append((c.out_bytes, nbytes(dtype, layer.shape)))
        c.out_bytes += _aligned(nbytes(dtype, layer.shape))
    return chunks


class _Streams:
    """Two copy streams and a compute stream with events between them on CUDA; on the CPU
    (the tests run this pipeline under TRITON_INTERPRET=1) every step is synchronous."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.h2d, self.compute, self.d2h = (torch.cuda.Stream(device) for _ in range(3))

    def on(self, name: str):
        return torch.cuda.stream(getattr(self, name)) if self.cuda else contextlib.nullcontext()

    def record(self, name: str):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(getattr(self, name))
        return event

    def wait(self, name: str, event) -> None:
        if event is not None:
            getattr(self, name).wait_event(event)


def _view(buf: torch.Tensor, span: tuple[int, int], dtype: str, shape) -> torch.Tensor:
    offset, size = span
    return buf[offset: offset + size].view(getattr(torch, dtype)).view(shape)


def stream(inputs, layers: list[Layer], entries, write, report: MergeReport, bar, options: MergeOptions, *,
           device: torch.device, chunk_bytes: int, check=lambda: None) -> None:
    """Merge ``layers`` chunk by chunk on ``device``, handing each result to ``write`` in order
    and appending each layer's figures to ``report``."""
    out_dtypes = [dtype for _, dtype, _ in entries]
    chunks = plan_chunks(layers, out_dtypes, chunk_bytes)
    if not chunks:
        return
    in_size = max(c.in_bytes for c in chunks)
    out_size = max(c.out_bytes for c in chunks)
    pin = device.type == "cuda"
    host_in = [torch.empty(in_size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    host_out = [torch.empty(out_size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    dev_in = [torch.empty(in_size, dtype=torch.uint8, device=device) for _ in range(2)]
    dev_out = [torch.empty(out_size, dtype=torch.uint8, device=device) for _ in range(2)]
    streams = _Streams(device)
    free_in: list[queue.Queue] = [queue.Queue() for _ in range(2)]
    for q in free_in:
        q.put(None)
    out_free = [threading.Semaphore(1) for _ in range(2)]
    computed, copied_out = [None, None], [None, None]
    ready: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_chunks, args=(inputs, layers, chunks, host_in, free_in, ready), daemon=True)
    reader.start()
    merge_options = dict(granularity=options.granularity, eps=options.eps,
                         clamp=options.clamp, backend=options.backend, compute_dtype=options.torch_compute_dtype,
                         int_tensors=options.int_tensors, missing=options.missing, method=options.method)
    try:
        for k, chunk in enumerate(chunks):
            s = k % 2
            check()
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            with streams.on("h2d"):
                streams.wait("h2d", computed[s])  # the merge of chunk k - 2 has read dev_in[s]
                dev_in[s][: chunk.in_bytes].copy_(host_in[s][: chunk.in_bytes], non_blocking=True)
                loaded = streams.record("h2d")
            free_in[s].put(loaded)  # the reader refills host_in[s] once this copy is done
            with streams.on("compute"):
                streams.wait("compute", loaded)
                streams.wait("compute", copied_out[s])  # chunk k - 2's result has left dev_out[s]
                report.layers.extend(_merge_chunk(chunk, layers, out_dtypes, dev_in[s], dev_out[s], report.inputs,
                                                  merge_options))
                computed[s] = streams.record("compute")
            out_free[s].acquire()  # the writer is done with host_out[s] (chunk k - 2)
            with streams.on("d2h"):
                streams.wait("d2h", computed[s])
                host_out[s][: chunk.out_bytes].copy_(dev_out[s][: chunk.out_bytes], non_blocking=True)
                copied_out[s] = streams.record("d2h")
            _hand_to_writer(chunk, layers, entries, host_out[s], copied_out[s], out_free[s], write)
            if bar is not None:
                bar.update(sum(layers[i].nbytes_in for i in chunk.layers))
    finally:
        for q in free_in:
            q.put(_STOP)
        reader.join()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _merge_chunk(chunk: _Chunk, layers, out_dtypes, dev_in, dev_out, sources, options) -> list:
    base, fts = {}, [{} for _ in range(len(sources) - 1)]
    targets = {}
    for i, spans, out_span in zip(chunk.layers, chunk.inputs, chunk.outputs):
        layer = layers[i]
        views = [_view(dev_in, span, d, layer.shape) for span, d in zip(spans, layer.dtypes)]
        base[layer.names[0]] = views[0]
        for ft, name, v in zip(fts, layer.names[1:], views[1:]):
            ft[name] = v
        targets[layer.name] = _view(dev_out, out_span, out_dtypes[i], layer.shape)
    part = MergeReport()
    # the file's plan decided which layers are excluded: the chunk's merge gets their names
    excluded = [glob.escape(layers[i].name) for i in chunk.layers if layers[i].kind == "average"]
    InPlaceMerge([targets], base, fts, sources=sources, exclude=excluded, **options)(part)
    return part.layers


def _hand_to_writer(chunk: _Chunk, layers, entries, host_out: torch.Tensor, copied, out_free, write) -> None:
    arrays = host_out.numpy()
    for n, (i, (offset, size)) in enumerate(zip(chunk.layers, chunk.outputs)):
        name, dtype, shape = entries[i]
        array = arrays[offset: offset + size].view(NUMPY_DTYPES[dtype]).reshape(shape)

        def ready(array=array):
            if copied is not None:
                copied.synchronize()
            return array

        last = n == len(chunk.layers) - 1
        write(name, ready, release=out_free.release if last else None)


# A chunk is read in pieces of at most this many bytes by up to _READ_THREADS threads: one
# thread copies the page cache at ~5.6 GB/s (an H200 host), and a disk serves several
# requests in flight faster than one.
_READ_PIECE = 16 << 20
_READ_THREADS = 8


def _pieces(inputs, layers, chunk: _Chunk, buf):
    """``(checkpoint, tensor name, byte offset in the tensor, destination)`` covering a chunk."""
    for i, spans in zip(chunk.layers, chunk.inputs):
        for ck, name, (offset, size) in zip(inputs, layers[i].names, spans):
            for at in range(0, max(size, 1), _READ_PIECE):
                yield ck, name, at, buf[offset + at: offset + min(size, at + _READ_PIECE)]


def _read_chunks(inputs, layers, chunks, host_in, free_in, ready: queue.Queue) -> None:
    """Reader thread: each chunk's tensors into the next free pinned buffer, in order, the
    pieces read by a pool of threads (pread releases the GIL)."""
    threads = min(_READ_THREADS, numpy_ops.threads())
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="modelstock-read") as pool:
            for k, chunk in enumerate(chunks):
                s = k % 2
                copied = free_in[s].get()  # None, or the event of the copy that last read host_in[s]
                if copied is _STOP:
                    return
                if copied is not None:
                    copied.synchronize()
                buf = host_in[s].numpy()
                for done in [pool.submit(ck.read_into, name, dest, at)
                             for ck, name, at, dest in _pieces(inputs, layers, chunk, buf)]:
                    done.result()
                ready.put(k)
    except BaseException as e:  # handed to the main thread, which raises it
        ready.put(e)
