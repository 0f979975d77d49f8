"""``modelstock.merge_files``: a file-to-file merge that streams layer by layer.

Memory stays bounded whatever the checkpoint's size: each layer's N + 1 inputs are read into a
region of one reused buffer (a ring), merged there, written out and released. A reader thread
fills the next layers' regions while the main thread merges and writes, so disk reads overlap
the arithmetic and the writes.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .checkpoint import CheckpointWriter, SafetensorsFile, ShardedSafetensors, nbytes, open_checkpoint, output_paths
from .merge import cast_output, check_copy, merge_layer_, resolve_backend
from .plan import InputError, Layer, plan_layers
from .reference import EPS
from .report import MergeReport

# Ring capacity beyond the largest layer: lets small layers be read ahead of the arithmetic.
_READ_AHEAD_BYTES = 256 << 20


class _Ring:
    """Regions of one flat buffer, handed out and released in FIFO order (the layer order)."""

    def __init__(self, numel: int, dtype: torch.dtype):
        self.buf = torch.empty(numel, dtype=dtype)
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

    def alloc(self, n: int) -> Tensor | None:
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


def _check_output(out: Path, paths: list[Path], inputs: list, force: bool) -> None:
    if not out.parent.is_dir():
        raise InputError("the output's folder does not exist", str(out))
    input_files = [Path(f) for ck in inputs for f in ck.files()]
    for p in paths:
        for f in input_files:
            if p.exists() and os.path.samefile(p, f) or os.path.realpath(p) == os.path.realpath(f):
                raise InputError("the output would overwrite an input", str(p))
        if p.exists() and not force:
            raise InputError("exists (use --force / force=True to replace it)", str(p))
        if p.is_dir():
            raise InputError("is a folder", str(p))


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
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    shard_size: int | str | None = None,
    force: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Merge checkpoint files into ``out`` (safetensors; ``.pt`` if the name ends so), streaming.

    Inputs may be safetensors files, sharded safetensors (index or folder) or torch files; the
    options are :func:`modelstock.merge`'s. ``shard_size`` (bytes, or "2GB") splits a
    safetensors output into shards with an index. The output keeps the base's metadata and
    records the merge's. Nothing is written unless the whole merge succeeds.
    """
    start = time.perf_counter()
    if isinstance(finetuned, (str, os.PathLike)):
        raise TypeError("finetuned must be a sequence of paths")
    if len(finetuned) < 2:
        raise InputError(f"needs at least two fine-tuned checkpoints, got {len(finetuned)}")
    resolve_backend(backend, torch.device("cpu"))
    inputs = []
    try:
        for path in [base, *finetuned]:
            inputs.append(open_checkpoint(path))
        return _merge_open(inputs, Path(out), start, granularity=granularity, clamp=clamp, exclude=exclude,
                           eps=eps, out_dtype=out_dtype, compute_dtype=compute_dtype,
                           shard_size=_parse_size(shard_size), force=force, progress=progress)
    finally:
        for ck in inputs:
            ck.close()


def _merge_open(inputs, out: Path, start: float, *, granularity, clamp, exclude, eps, out_dtype,
                compute_dtype, shard_size, force, progress) -> MergeReport:
    sources = [ck.path for ck in inputs]
    layers = plan_layers([ck.tensors() for ck in inputs], sources, granularity=granularity, exclude=exclude)
    entries = [(layer.name, layer.dtypes[0] if layer.kind == "copy" else (out_dtype or layer.dtypes[0]),
                layer.shape) for layer in layers]
    _check_output(out, output_paths(out, entries, shard_size), inputs, force)

    n = len(inputs) - 1
    report = MergeReport(n=n, granularity=granularity, clamp=clamp, eps=eps, inputs=sources)
    metadata = dict(inputs[0].metadata)
    metadata["modelstock"] = json.dumps({
        "method": "model_stock", "n": n, "granularity": granularity, "clamp": clamp, "eps": eps,
        "exclude": list(exclude), "base": os.path.basename(sources[0]),
        "finetuned": [os.path.basename(s) for s in sources[1:]]})

    floats = [layer for layer in layers if layer.kind != "copy"]
    itemsize = compute_dtype.itemsize
    largest = max((len(inputs) * layer.numel for layer in floats), default=0)
    total = sum(len(inputs) * layer.numel for layer in floats)
    ring = _Ring(min(total, largest + _READ_AHEAD_BYTES // itemsize), compute_dtype)
    report.bytes_read = sum(nbytes(d, layer.shape) for layer in layers for d in layer.dtypes)
    report.bytes_written = sum(nbytes(d, s) for _, d, s in entries)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=report.bytes_read, unit="B", unit_scale=True, desc="merging", leave=False)

    ready: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_layers, args=(inputs, layers, ring, compute_dtype, ready), daemon=True)
    reader.start()
    try:
        with CheckpointWriter(out, entries, metadata, shard_size) as writer:
            with _Writer(writer, ring) as write:
                for layer, (_, dtype, _) in zip(layers, entries):
                    item = ready.get()
                    if isinstance(item, BaseException):
                        raise item
                    if layer.kind == "copy":
                        stats = check_copy(layer, item, sources)
                        write(layer.name, item[0], in_ring=False)
                    else:
                        stack = item.view(len(inputs), -1)
                        merged, stats = merge_layer_(layer, stack, sources, eps=eps, clamp=clamp)
                        spare = None
                        if dtype != merged.dtype:  # cast into a row the result does not occupy
                            row = stack[1] if merged.data_ptr() == stack[0].data_ptr() else stack[0]
                            spare = row.view(torch.uint8)[: nbytes(dtype, layer.shape)].view(dtype)
                        merged = cast_output(merged, dtype, stats, out=spare)
                        write(layer.name, merged.view(layer.shape), in_ring=True)
                    report.layers.append(stats)
                    if bar is not None:
                        bar.update(sum(nbytes(d, layer.shape) for d in layer.dtypes))
            report.output = [str(p) for p in writer.commit()]
    finally:
        ring.close()
        reader.join()
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - start
    return report


class _Writer:
    """A thread that writes merged layers in order and then frees their ring regions, so that
    writing overlaps the next layer's arithmetic. Used as ``with _Writer(...) as write:``;
    leaving the block waits for every write and raises the writer's error, if any."""

    def __init__(self, writer: CheckpointWriter, ring: _Ring):
        self._writer, self._ring = writer, ring
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            name, tensor, in_ring = item
            try:
                if self._error is None:
                    self._writer.write(name, tensor)
            except BaseException as e:
                self._error = e
            finally:
                if in_ring:
                    self._ring.release()

    def __call__(self, name: str, tensor: Tensor, *, in_ring: bool) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((name, tensor, in_ring))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._q.put(None)
        self._thread.join()
        if self._error is not None and exc_type is None:
            raise self._error


def _read_layers(inputs, layers: list[Layer], ring: _Ring, compute_dtype: torch.dtype, ready: queue.Queue) -> None:
    """Reader thread: fill each layer's stack (or, for non-float layers, read the tensors) in
    order and hand it to the main thread; an error is handed over in place of the layer."""
    staging = torch.empty(0, dtype=torch.uint8)
    try:
        for layer in layers:
            if layer.kind == "copy":
                ready.put([ck.read(name) for ck, name in zip(inputs, layer.names)])
                continue
            stack = ring.alloc(len(inputs) * layer.numel)
            if stack is None:  # the main thread stopped
                return
            rows = stack.view(len(inputs), -1)
            for ck, name, dtype, row in zip(inputs, layer.names, layer.dtypes, rows):
                if dtype != compute_dtype and isinstance(ck, (SafetensorsFile, ShardedSafetensors)):
                    need = nbytes(dtype, layer.shape)
                    if staging.numel() < need:
                        staging = torch.empty(need, dtype=torch.uint8)
                ck.read_into(name, row, staging)
            ready.put(stack)
    except BaseException as e:  # handed to the main thread, which raises it
        ready.put(e)
