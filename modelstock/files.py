"""``modelstock.merge_files``: a file-to-file merge that streams layer by layer.

Three threads, one layer after another:
  reader  maps the layer's N + 1 input tensors (safetensors: memory-mapped, pre-faulted; inputs
          not in the compute dtype are converted into a buffer) and takes a region of one reused
          buffer (a ring) for the result;
  main    computes the ratio and writes the merged layer into that region;
  writer  appends it to the output file, then releases the region and the mappings.
Memory stays bounded whatever the checkpoint's size: the ring holds the largest layer plus a
little read-ahead, and the bytes mapped at once are capped the same way. Nothing is copied
from the page cache before the arithmetic reads it.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import stream_math
from .checkpoint import CheckpointWriter, open_checkpoint, output_paths, remove_stale_temporaries
from . import folders
from .outputs import check_not_an_input, check_output_file
from .layer import cast_output, check_copy, merge_layer
from .plan import FLOATS, NUMPY_DTYPES, InputError, Layer, dtype_name, nbytes, plan_layers
from .ratio import EPS
from .report import MergeReport

# Ring capacity and mapped bytes beyond the largest layer's: lets small layers be read ahead
# of the arithmetic. More only adds memory to touch (page faults cost as much as the copy).
_READ_AHEAD_BYTES = 32 << 20


class _Budget:
    """Bytes in flight, acquired in layer order and released in the same order. One request
    larger than the cap is granted when nothing else is in flight."""

    def __init__(self, cap: int):
        self.cap, self.used, self.closed = cap, 0, False
        self._cv = threading.Condition()

    def acquire(self, n: int) -> bool:
        with self._cv:
            while self.used and self.used + n > self.cap and not self.closed:
                self._cv.wait()
            self.used += n
            return not self.closed

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
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


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    s = size.strip().upper().removesuffix("B")
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(s)


def _check_output(paths: list[Path], inputs: list, force: bool) -> None:
    input_files = [f for ck in inputs for f in ck.files()]
    for p in paths:
        check_output_file(p, input_files, force)


def merge_files(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    granularity: str = "tensor",
    clamp: bool = True,
    exclude: Sequence[str] = (),
    eps: float = EPS,
    backend: str = "auto",
    out_dtype=None,
    compute_dtype="float32",
    shard_size: int | str | None = None,
    force: bool = False,
    durable: bool = False,
    progress: bool = False,
    device: str = "cpu",
    chunk_size: int | str = "256MiB",
    skip_files: Sequence[str] = (),
) -> MergeReport:
    """Merge checkpoint files into ``out`` (safetensors; ``.pt`` if the name ends so), streaming.

    Inputs may be safetensors files, sharded safetensors (index or folder) or torch files; the
    options are :func:`modelstock.merge`'s (dtypes as torch dtypes or names, "bfloat16").
    The arithmetic runs on numpy (``modelstock/stream_math.py``): torch is imported only for
    torch-format files. ``shard_size`` (bytes, or "2GB") splits a safetensors output into
    shards with an index. The output keeps the base's metadata and records the merge's.
    When the base is a Hugging Face model folder (``config.json`` beside its weights), ``out``
    is a folder laid out like the base's: ``model.safetensors`` (or shards of ``shard_size``,
    default 50GB as transformers' ``save_pretrained``, with ``model.safetensors.index.json``)
    and every other file of the base copied unchanged (but those named in ``skip_files``), so
    ``from_pretrained(out)`` loads it.
    Nothing is written unless the whole merge succeeds (files are renamed into place at the
    end); ``durable`` also fsyncs them, so they survive a power cut.

    ``device="cuda"`` (or "cuda:N") runs the arithmetic on that GPU (the Triton kernels, or
    the torch reference with ``backend="torch"`` or ``compute_dtype="float64"``): layers go
    in chunks of about ``chunk_size`` input bytes (or one layer, if larger) through pinned
    host buffers and copy streams, so reading, copying, computing and writing overlap and
    memory stays at two chunks on each side (see ``modelstock/device_files.py``).
    """
    start = time.perf_counter()
    if isinstance(finetuned, (str, os.PathLike)):
        raise TypeError("finetuned must be a sequence of paths")
    if len(finetuned) < 2:
        raise InputError(f"needs at least two fine-tuned checkpoints, got {len(finetuned)}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if backend == "triton" and device == "cpu":
        raise ValueError("backend='triton' merges files on a GPU: pass device='cuda' (the CPU merge runs on numpy)")
    out_dtype = None if out_dtype is None else dtype_name(out_dtype)
    compute_dtype = dtype_name(compute_dtype)
    if out_dtype is not None and out_dtype not in FLOATS:
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    if compute_dtype not in ("float32", "float64"):
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    chunk_bytes = _parse_size(chunk_size)
    if not chunk_bytes or chunk_bytes <= 0:
        raise ValueError(f"chunk_size must be a positive size, got {chunk_size!r}")
    gpu = None  # the CUDA device of a merge on a GPU; None: the numpy merge
    if device != "cpu":
        from .device_files import check_device

        gpu = check_device(device)
    # Before any input is opened: the output is none of them, holds none, lies in none.
    check_not_an_input(out, [base, *finetuned])
    inputs = []
    try:
        for path in [base, *finetuned]:
            inputs.append(open_checkpoint(path))
        # ... nor any file they name (an index's shards, symlinks followed).
        check_not_an_input(out, [f for ck in inputs for f in ck.files()])
        options = dict(granularity=granularity, clamp=clamp, exclude=exclude, eps=eps, out_dtype=out_dtype,
                       compute_dtype=compute_dtype, force=force, durable=durable, progress=progress, device=gpu,
                       chunk_bytes=chunk_bytes, backend=backend)
        if folders.is_model_folder(base):
            return _merge_into_folder(inputs, Path(base), Path(out), start, shard_size, skip_files, **options)
        return _merge_open(inputs, Path(out), start, shard_size=_parse_size(shard_size), **options)
    finally:
        for ck in inputs:
            ck.close()


def _merge_into_folder(inputs, base: Path, out: Path, start: float, shard_size, skip_files,
                       **options) -> MergeReport:
    """The base is a model folder: the output is a folder laid out like it (``folders.py``)."""
    companions = [p for p in folders.companion_files(base) if p.name not in set(skip_files)]
    created = folders.prepare(out, companions, options["force"])
    size = _parse_size(shard_size if shard_size is not None else folders.DEFAULT_SHARD_SIZE)
    try:
        report = _merge_open(inputs, out / folders.WEIGHTS_NAME, start, shard_size=size, **options)
        copied = folders.copy_companions(companions, out, options["durable"])
    except BaseException:
        if created:  # nothing of ours is left in it (each file is written atomically)
            shutil.rmtree(out, ignore_errors=True)
        raise
    weights = [Path(p) for p in report.output]
    folders.remove_old_weights(out, weights)
    report.output = [str(p) for p in weights + copied]
    report.seconds = time.perf_counter() - start
    return report


def _merge_open(inputs, out: Path, start: float, *, granularity, clamp, exclude, eps, out_dtype,
                compute_dtype, shard_size, force, durable, progress, device, chunk_bytes, backend) -> MergeReport:
    sources = [ck.path for ck in inputs]
    layers = plan_layers([ck.tensors() for ck in inputs], sources, granularity=granularity, exclude=exclude)
    entries = [(layer.name, layer.dtypes[0] if layer.kind == "copy" else (out_dtype or layer.dtypes[0]),
                layer.shape) for layer in layers]
    _check_output(output_paths(out, entries, shard_size), inputs, force)
    remove_stale_temporaries(out)

    n = len(inputs) - 1
    report = MergeReport(n=n, granularity=granularity, clamp=clamp, eps=eps, inputs=sources)
    metadata = dict(inputs[0].metadata)
    metadata["modelstock"] = json.dumps({
        "method": "model_stock", "n": n, "granularity": granularity, "clamp": clamp, "eps": eps,
        "exclude": list(exclude), "base": os.path.basename(sources[0]),
        "finetuned": [os.path.basename(s) for s in sources[1:]]})

    report.bytes_read = sum(layer.nbytes_in for layer in layers)
    report.bytes_written = sum(nbytes(d, s) for _, d, s in entries)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=report.bytes_read, unit="B", unit_scale=True, desc="merging", leave=False)
    options = dict(eps=eps, clamp=clamp, compute_dtype=compute_dtype)
    try:
        with CheckpointWriter(out, entries, metadata, shard_size, durable) as writer:
            with _Writer(writer) as write:
                if device is None:
                    _stream(inputs, layers, entries, write, report, bar, **options)
                else:
                    from . import device_files

                    device_files.stream(inputs, layers, entries, write, report, bar, device=device,
                                        granularity=granularity, exclude=exclude, chunk_bytes=chunk_bytes,
                                        backend=backend, **options)
            report.output = [str(p) for p in writer.commit()]
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _stream(inputs, layers: list[Layer], entries, write, report: MergeReport, bar, *, eps, clamp,
            compute_dtype) -> None:
    """The CPU merge: the reader thread maps layers ahead, this thread computes on numpy, the
    writer writes; appends each layer's figures to ``report`` in order."""
    sources = report.inputs
    floats = [layer for layer in layers if layer.kind != "copy"]
    buffer_elems = {layer.name: _buffer_elems(layer, dtype, compute_dtype)
                    for layer, (_, dtype, _) in zip(layers, entries) if layer.kind != "copy"}
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
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            if layer.kind == "copy":
                stats = check_copy(layer, item, sources, stream_math)
                write(layer.name, item[0])
            else:
                (w0, *ws), region = item
                out_buf = region[: layer.numel]
                # out_buf: the region's head; inputs converted to the compute dtype lie past it
                merged, stats = merge_layer(layer, w0, ws, out_buf, sources, stream_math, eps=eps, clamp=clamp,
                                            out_is_separate=True)
                spare = None
                if dtype != compute_dtype:  # the region's tail is reserved for the cast
                    spare = region[region.size - _cast_elems(layer, dtype, compute_dtype):]
                    spare = spare.view(np.uint8)[: nbytes(dtype, layer.shape)].view(NUMPY_DTYPES[dtype])
                merged = cast_output(merged, dtype, stats, stream_math, out=spare)
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
        mapped.release(layer.nbytes_in)
    return release


class _Writer:
    """A thread that writes merged layers in order, then calls each one's ``release``, so that
    writing overlaps the next layer's arithmetic. Used as ``with _Writer(...) as write:``;
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
            if layer.kind == "copy":
                ready.put([ck.read(name) for ck, name in zip(inputs, layer.names)])
                continue
            if not mapped.acquire(layer.nbytes_in):
                return  # the main thread stopped
            region = ring.alloc(buffer_elems[layer.name])
            if region is None:
                return
            rows, spare = [], region[layer.numel:]
            for ck, name, dtype in zip(inputs, layer.names, layer.dtypes):
                w = ck.view(name)
                if dtype != compute_dtype:
                    w, spare = stream_math.to_float(w, dtype, spare[: layer.numel]), spare[layer.numel:]
                rows.append(w)
            ready.put((rows, region))
            del rows, w, spare, region
    except BaseException as e:  # handed to the main thread, which raises it
        ready.put(e)
