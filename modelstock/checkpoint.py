"""Checkpoint files: reading tensors one at a time, writing them streamed and atomically.

Knows nothing of the merge, and needs no torch unless a file is a torch one: tensors are numpy
arrays here, dtypes go by name ("bfloat16", travelling as its uint16 bits). Readers:
  - safetensors, one file: our own header parser; each tensor is memory-mapped on its own
    (pre-faulted, read-only) and unmapped as soon as the caller drops it, so resident memory
    holds the tensors in use, never the whole file, and nothing is copied;
  - sharded safetensors: an ``*.index.json`` (Hugging Face layout) or a folder holding one;
  - torch ``.pt/.pth/.bin``: ``torch.load(weights_only=True)`` only (a checkpoint never runs
    code), unwrapping open_clip's ``{"state_dict": ...}``.
Writers: safetensors streamed tensor by tensor (header first), optionally sharded with an
index, or a ``.pt`` file; always into a temporary file beside the target, renamed at the end.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .plan import NUMPY_DTYPES, InputError, dtype_name, nbytes

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
INDEX_SUFFIX = ".index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array sharing its memory (bfloat16 as uint16 bits)."""
    import torch

    t = t.detach().cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def to_torch(a: np.ndarray, dtype: str):
    """The inverse of ``to_numpy``: a torch tensor sharing the array's memory."""
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class SafetensorsFile:
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
            raise InputError(f"cannot be mapped ({e}); truncated while open?", self.path, name) from None
        return np.frombuffer(mapped, dtype=np_dtype, offset=first - aligned, count=(end - start) // np.dtype(np_dtype).itemsize)

    def read(self, name: str) -> np.ndarray:
        """The tensor, in memory (a copy)."""
        return self.view(name).reshape(self._entries[name][1]).copy()

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

    def files(self) -> list[str]:
        return [self.path]


class ShardedSafetensors:
    """A Hugging Face sharded checkpoint: ``*.safetensors.index.json`` plus its shard files."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = str(index_path)
        try:
            index = json.loads(Path(self.path).read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except FileNotFoundError:
            raise InputError("no such file", self.path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise InputError("not a safetensors index (no JSON 'weight_map')", self.path) from None
        if not isinstance(weight_map, dict):
            raise InputError("not a safetensors index ('weight_map' is not a mapping)", self.path)
        folder = Path(self.path).parent
        for name, shard in weight_map.items():
            if not is_plain_file_name(shard):
                raise InputError(f"names the shard {shard!r}: a shard must be a file name in the index's folder",
                                 self.path, name)
        self._shards: dict[str, SafetensorsFile] = {}
        try:
            for shard in dict.fromkeys(weight_map.values()):
                self._shards[shard] = SafetensorsFile(folder / shard)
        except BaseException:
            self.close()
            raise
        self._where: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if name not in self._shards[shard].tensors():
                self.close()
                raise InputError(f"listed in the index but not in {shard}", self.path, name)
            self._where[name] = self._shards[shard]
        first = next(iter(self._shards.values()), None)
        self.metadata = dict(first.metadata) if first else {}
        order = {}
        for shard in self._shards.values():
            order.update((n, m) for n, m in shard.tensors().items() if self._where.get(n) is shard)
        self._tensors = order

    def tensors(self):
        return dict(self._tensors)

    def view(self, name):
        return self._where[name].view(name)

    def read(self, name):
        return self._where[name].read(name)

    def read_into(self, name, dest, at=0):
        self._where[name].read_into(name, dest, at)

    def close(self):
        for s in self._shards.values():
            s.close()

    def files(self):
        return [self.path] + [s.path for s in self._shards.values()]


class TorchFile:
    """A ``torch.save`` checkpoint, loaded with ``weights_only=True`` (memory-mapped when the
    file is in the zip format, so tensors are paged in as they are read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise InputError("no such file", self.path)
        import torch

        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) format cannot be mapped
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only errors all mean the same to a user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise InputError("refused: the file holds Python objects, not only tensors "
                                 "(loaded with weights_only=True)", self.path) from None
            raise InputError(f"not a checkpoint, or corrupt ({first})", self.path) from None
        self._sd = unwrap_state_dict(obj, self.path)
        self.metadata: dict[str, str] = {}

    def tensors(self):
        return {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in self._sd.items()}

    def view(self, name):
        return to_numpy(self._sd[name].reshape(-1))

    def read(self, name):
        return to_numpy(self._sd[name]).copy()

    def read_into(self, name, dest, at=0):
        flat = dest.reshape(-1).view(np.uint8)
        flat[:] = self.view(name).reshape(-1).view(np.uint8)[at: at + flat.nbytes]

    def close(self):
        self._sd = {}

    def files(self):
        return [self.path]


def is_plain_file_name(name) -> bool:
    """A name that stays in its folder: no separator, no parent, not absolute (an index's shard)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and (os.altsep is None or os.altsep not in name) and "\0" not in name)


def unwrap_state_dict(obj, source: str) -> dict:
    """The state dict inside what training scripts save: open_clip's ``{"epoch", "name",
    "state_dict", "optimizer"}`` and the common ``{"model": ...}`` wrapper."""
    from torch import Tensor

    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError("not a checkpoint (no mapping of names to tensors)", source)
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise InputError(f"not a state dict: '{bad[0]}' is a {type(obj[bad[0]]).__name__}, not a tensor", source)
    unsupported = [k for k, v in obj.items() if dtype_name(v.dtype) not in NUMPY_DTYPES]
    if unsupported:
        raise InputError(f"dtype {dtype_name(obj[unsupported[0]].dtype)} is not supported", source, unsupported[0])
    return dict(obj)


def open_checkpoint(path: str | os.PathLike):
    """Open a checkpoint for reading, choosing the reader from the path."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors" + INDEX_SUFFIX))
        if len(indexes) == 1:
            return ShardedSafetensors(indexes[0])
        files = sorted(p.glob("*.safetensors"))
        if not indexes and len(files) == 1:
            return SafetensorsFile(files[0])
        raise InputError("a folder must hold one *.safetensors.index.json (or one .safetensors file)", str(p))
    if p.name.endswith(INDEX_SUFFIX):
        return ShardedSafetensors(p)
    if p.suffix in TORCH_SUFFIXES:
        return TorchFile(p)
    if not p.exists():
        raise InputError("no such file", str(p))
    return SafetensorsFile(p)


# --------------------------------------------------------------------------------------------
# Writing


class _AtomicFile:
    """A file written under a temporary name beside its target and renamed on commit. The
    name carries the writing process's id (``.<target>.<pid>-<random>.tmp``), so that what a
    killed process left behind can be told from what a live one is writing."""

    def __init__(self, target: Path, durable: bool = False):
        self.target, self.durable = target, durable
        self.tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self.f = open(self.tmp, "xb")

    def write(self, data) -> None:
        self.f.write(data)

    def finish(self) -> None:
        self.f.flush()
        if self.durable:  # survive a power cut too, not only a failing process (costs ~0.3 s/GB)
            os.fsync(self.f.fileno())
        self.f.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, data, durable: bool = False) -> Path:
    """One file written as every output is (``_AtomicFile``): under a temporary name beside
    ``target``, then renamed into place. ``data``: bytes, or a binary file object to copy."""
    f = _AtomicFile(Path(target), durable)
    try:
        if isinstance(data, (bytes, bytearray)):
            f.write(data)
        else:
            shutil.copyfileobj(data, f.f)
        f.finish()
        f.commit()
    except BaseException:
        f.abort()
        raise
    return f.target


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of the output ``out`` (its file, its shards under any count, its
    index) that no live process owns: what a merge killed with SIGKILL (or a power cut) left
    behind. Returns what was removed."""
    out = Path(out)
    stem = _shard_stem(out)
    names = (rf"(?:{re.escape(out.name)}|{re.escape(out.name + INDEX_SUFFIX)}"
             rf"|{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors)")
    pattern = re.compile(rf"\.{names}\.(\d+)-[0-9a-f]{{8}}\.tmp")
    removed = []
    if out.parent.is_dir():
        for entry in os.scandir(out.parent):
            m = pattern.fullmatch(entry.name)
            if m and not _process_alive(int(m.group(1))):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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


def _shard_stem(out: Path) -> str:
    return out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name


def shard_paths(out: Path, count: int) -> tuple[list[Path], Path]:
    """Hugging Face naming: ``model.safetensors`` -> ``model-00001-of-00003.safetensors`` and
    ``model.safetensors.index.json``."""
    stem = _shard_stem(out)
    return ([out.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)],
            out.with_name(out.name + INDEX_SUFFIX))


class CheckpointWriter:
    """Writes tensors in a fixed order, streamed: header first, then each tensor as it comes.

    ``entries`` lists (name, dtype, shape) in the order ``write`` will be called. Output kinds:
    ``.pt`` (collected, then ``torch.save``), one ``.safetensors`` file, or shards of at most
    ``shard_size`` bytes with an index. Nothing appears at the target paths before ``commit``;
    ``abort`` (or an exception inside ``with``) removes every temporary file. ``durable``
    fsyncs each file before its rename.
    """

    def __init__(self, out: str | os.PathLike, entries: Sequence[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, shard_size: int | None = None,
                 durable: bool = False):
        self.out = Path(out)
        self._durable = durable
        self._metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._entries = list(entries)
        self._files: list[_AtomicFile] = []
        self._pt: dict | None = None
        self._index: Path | None = None
        self._where: list[int] = []
        self._next = 0
        self.paths: list[Path] = []
        if self.out.suffix in TORCH_SUFFIXES:
            self._pt = {}
            self.paths = [self.out]
            return
        groups = self._shard(shard_size)
        if len(groups) > 1:
            self.paths, self._index = shard_paths(self.out, len(groups))
        else:
            self.paths = [self.out]
        try:
            for path, group in zip(self.paths, groups):
                f = _AtomicFile(path, durable)
                self._files.append(f)
                f.write(_header_bytes([self._entries[i] for i in group], self._metadata))
        except BaseException:
            self.abort()
            raise
        self._where = [0] * len(self._entries)
        for s, group in enumerate(groups):
            for i in group:
                self._where[i] = s
        if self._index:
            self.paths.append(self._index)

    def _shard(self, shard_size: int | None) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        used = 0
        for i, (_, dtype, shape) in enumerate(self._entries):
            size = nbytes(dtype, shape)
            if shard_size and groups[-1] and used + size > shard_size:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += size
        return groups

    def write(self, name: str, array) -> None:
        """Append the next tensor: a numpy array (bfloat16 as uint16 bits) or a torch tensor."""
        if not isinstance(array, np.ndarray):
            array = to_numpy(array)
        i = self._next
        ename, dtype, shape = self._entries[i]
        if name != ename or array.dtype != NUMPY_DTYPES[dtype] or tuple(array.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {ename} {dtype} {list(shape)}, got {name} {array.dtype} {list(array.shape)}")
        self._next += 1
        if self._pt is not None:
            self._pt[name] = to_torch(array.copy(), dtype)
            return
        buf = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        f = self._files[self._where[i]]
        for pos in range(0, len(buf), _WRITE_PIECE):
            f.write(buf[pos: pos + _WRITE_PIECE])

    def commit(self) -> list[Path]:
        if self._next != len(self._entries):
            raise RuntimeError(f"writer got {self._next} of {len(self._entries)} tensors")
        if self._pt is not None:
            f = _AtomicFile(self.out, self._durable)
            self._files = [f]
            try:
                import torch

                torch.save(self._pt, f.f)
            except BaseException:
                self.abort()
                raise
        try:
            for f in self._files:
                f.finish()
            index_file = None
            if self._index:
                index_file = _AtomicFile(self._index, self._durable)
                self._files.append(index_file)
                total = sum(nbytes(d, s) for _, d, s in self._entries)
                weight_map = {n: self.paths[self._where[i]].name for i, (n, _, _) in enumerate(self._entries)}
                index_file.write(json.dumps({"metadata": {"total_size": total, **self._metadata},
                                             "weight_map": weight_map}, indent=2).encode())
                index_file.finish()
        except BaseException:
            self.abort()
            raise
        # The index goes last: a reader never finds an index naming shards not yet in place.
        for f in self._files:
            f.commit()
        return self.paths

    def abort(self) -> None:
        for f in self._files:
            f.abort()
        self._files = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def output_paths(out: str | os.PathLike, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 shard_size: int | None) -> list[Path]:
    """Every path a CheckpointWriter with these arguments would create (to check before work)."""
    out = Path(out)
    entries = list(entries)
    if out.suffix in TORCH_SUFFIXES or not shard_size:
        return [out]
    total = sum(nbytes(d, s) for _, d, s in entries)
    if total <= shard_size:
        return [out]
    # Count shards the way the writer cuts them.
    count, used = 1, 0
    for _, d, s in entries:
        size = nbytes(d, s)
        if used and used + size > shard_size:
            count, used = count + 1, 0
        used += size
    if count == 1:
        return [out]
    shards, index = shard_paths(out, count)
    return shards + [index]
