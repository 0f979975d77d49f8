"""The safetensors format: a reader that parses the header itself and maps each tensor on its
own, and the streamed writer of one file (header first, then each tensor as it comes).

Reading: each tensor is memory-mapped on its own (pre-faulted, read-only) and unmapped as soon
as the caller drops it, so resident memory holds the tensors in use, never the whole file, and
nothing is copied. The header is checked as the safetensors library checks it.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..dtypes import NUMPY_DTYPES, nbytes
from ..errors import InputError
from .atomic import AtomicFile, Sink
from .source import TensorSource

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's limit (bytes of header)
_MAX_IO = 1 << 30        # Linux moves at most ~2 GiB per read call
# Bytes per write call. On the 2-core VM, a ViT-B-32 merge's 605 MB written a layer (up to
# 96 MB) per call took 0.85-1.33 s in one run of two, with ~1 s of kernel time, against
# 0.67-0.74 s every run in 1 MiB calls (2, 4 MiB: spikes again; 256, 512 KiB: slower):
# why the kernel took that time is not known (large page-cache folios to find or compact is
# a guess).
_WRITE_PIECE = 1 << 20


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; tensors are read on demand into caller-supplied buffers."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError("no such file", self.path) from None
        except IsADirectoryError:
            raise InputError("is a folder without a *.safetensors.index.json", self.path) from None
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", self.path) from None
        try:
            self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise InputError("not a safetensors file (shorter than its 8-byte header size)", self.path)
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER:
            raise InputError(f"not a safetensors file, or corrupt (a header of {hlen} bytes; the format allows "
                             f"{_MAX_HEADER})", self.path)
        if 8 + hlen > size:
            raise InputError("not a safetensors file, or truncated (header size out of range)", self.path)
        try:
            header = json.loads(os.pread(self._fd, hlen, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError("not a safetensors file, or corrupt (header is not JSON)", self.path) from None
        if not isinstance(header, dict):
            raise InputError("not a safetensors file (header is not a JSON object)", self.path)
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._data_start = 8 + hlen
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(x) for x in e["data_offsets"])
                dtype = SAFETENSORS_DTYPES.get(e["dtype"])
            except (KeyError, TypeError, ValueError):
                raise InputError("corrupt header entry", self.path, name) from None
            if dtype is None:
                raise InputError(f"dtype {e['dtype']} is not supported", self.path, name)
            if any(s < 0 for s in shape) or end - start != nbytes(dtype, shape) or start < 0:
                raise InputError("corrupt header entry (offsets do not match the shape)", self.path, name)
            self._entries[name] = (dtype, shape, start, end)
        # State-dict order, as far as the file keeps it: the order of the data.
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: (kv[1][2], kv[1][3])))
        # The format's rule, as the safetensors library checks it: the tensors tile the data
        # exactly, no overlap (two names over the same bytes), no gap, nothing after the last.
        at = 0
        for name, (_, _, start, end) in self._entries.items():
            if start != at:
                what = "overlaps the tensor before it" if start < at else f"leaves a gap of {start - at} bytes before it"
                raise InputError(f"corrupt header: its data {what} (offsets {start}..{end})", self.path, name)
            at = end
        if self._data_start + at > size:
            raise InputError(
                f"truncated: the header needs {self._data_start + at} bytes, the file has {size}", self.path)
        if self._data_start + at < size:
            last = next(reversed(self._entries), None)
            raise InputError(f"corrupt: {size - self._data_start - at} bytes follow the last tensor's data",
                             self.path, last)

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: (e[0], e[1]) for n, e in self._entries.items()}

    def view(self, name: str) -> np.ndarray:
        """The tensor's data, flat and read-only, memory-mapped from the file. The mapping is
        undone when the returned array (and every view of it) is freed."""
        dtype, _, start, end = self._entries[name]
        np_dtype = NUMPY_DTYPES[dtype]
        if start == end:
            return np.empty(0, dtype=np_dtype)
        first = self._data_start + start
        aligned = first // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        try:
            # MAP_POPULATE maps every page now, in the caller's (reader) thread, instead of one
            # page fault at a time in whichever thread touches the data first.
            mapped = mmap.mmap(self._fd, first + (end - start) - aligned, prot=mmap.PROT_READ,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), offset=aligned)
        except (OSError, ValueError) as e:
            if os.fstat(self._fd).st_size < self._data_start + end:
                raise InputError(f"truncated while open: cannot be mapped ({e})", self.path, name) from None
            if isinstance(e, OSError):  # out of descriptors or memory: not the file's fault
                raise OSError(e.errno, f"cannot map tensor '{name}': {e.strerror}", self.path) from None
            raise InputError(f"cannot be mapped ({e})", self.path, name) from None
        return np.frombuffer(mapped, dtype=np_dtype, offset=first - aligned, count=(end - start) // np.dtype(np_dtype).itemsize)

    def read_into(self, name: str, dest: np.ndarray, at: int = 0) -> None:
        """``dest.nbytes`` bytes of the tensor from byte ``at`` on into ``dest`` (e.g. pinned
        memory for a copy to a GPU), by pread: no mapping, no page faults in the caller's
        buffer. Threads may read parts of one tensor at once."""
        _, _, start, end = self._entries[name]
        if at < 0 or at + dest.nbytes > end - start:
            raise ValueError(f"{name}: {end - start} bytes into a buffer of {dest.nbytes} at {at}")
        view = memoryview(dest.reshape(-1).view(np.uint8))
        pos = 0
        while pos < len(view):
            got = os.preadv(self._fd, [view[pos: pos + _MAX_IO]], self._data_start + start + at + pos)
            if got <= 0:
                raise InputError("truncated while open (a read came back short)", self.path, name)
            pos += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _header_bytes(entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsSink(Sink):
    """The files of a safetensors output: one, or shards (``groups`` of entry indices) with
    the index written by the caller. Each file is an AtomicFile with its header written at
    once; tensors are appended in entry order."""

    def __init__(self, paths: Sequence[Path], entries, groups: Sequence[Sequence[int]], metadata: Mapping[str, str],
                 durable: bool):
        super().__init__()
        self._where = [0] * len(entries)
        try:
            for s, (path, group) in enumerate(zip(paths, groups)):
                f = AtomicFile(path, durable)
                self._files.append(f)
                f.write(_header_bytes([entries[i] for i in group], metadata))
                for i in group:
                    self._where[i] = s
        except BaseException:
            self.abort()
            raise

    def write(self, i: int, array: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        f = self._files[self._where[i]]
        for pos in range(0, len(buf), _WRITE_PIECE):
            f.write(buf[pos: pos + _WRITE_PIECE])

    def shard_of(self, i: int) -> int:
        return self._where[i]


def detect(path: Path) -> bool:
    return True  # any file no other format claims


def reader(path: Path) -> SafetensorsFile:
    return SafetensorsFile(path)
