"""Writing a checkpoint: tensors in a fixed order, streamed, atomically, in the format the
output's name asks for (safetensors, optionally sharded with a Hugging Face index, or ``.pt``).

One shard plan serves the writer and ``output_paths`` (what a merge checks before it starts),
so the two can never disagree on the files an output consists of.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..dtypes import NUMPY_DTYPES, nbytes
from .arrays import to_numpy
from .atomic import AtomicFile, remove_stale
from .commit import committing, taken
from .index import INDEX_SUFFIX
from .safetensors import SafetensorsSink
from .torch_file import TORCH_SUFFIXES, TorchSink

Entry = tuple[str, str, tuple[int, ...]]  # (name, dtype name, shape)


def plan_shards(entries: Sequence[Entry], shard_size: int | None) -> list[list[int]]:
    """Entry indices per shard, in order: a new shard starts where the next tensor would take
    the current one past ``shard_size`` (a tensor larger than that gets a shard of its own)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, (_, dtype, shape) in enumerate(entries):
        size = nbytes(dtype, shape)
        if shard_size and groups[-1] and used + size > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def _shard_stem(out: Path) -> str:
    return out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name


def shard_paths(out: Path, count: int) -> tuple[list[Path], Path]:
    """Hugging Face naming: ``model.safetensors`` -> ``model-00001-of-00003.safetensors`` and
    ``model.safetensors.index.json``."""
    stem = _shard_stem(out)
    return ([out.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)],
            out.with_name(out.name + INDEX_SUFFIX))


def _layout(out: Path, entries: Sequence[Entry], shard_size: int | None):
    """(file paths, index path or None, shard groups) of an output."""
    if out.suffix in TORCH_SUFFIXES:
        return [out], None, [list(range(len(entries)))]
    groups = plan_shards(entries, shard_size)
    if len(groups) == 1:
        return [out], None, groups
    shards, index = shard_paths(out, len(groups))
    return shards, index, groups


def output_paths(out: str | os.PathLike, entries: Iterable[Entry], shard_size: int | None) -> list[Path]:
    """Every path a CheckpointWriter with these arguments would create (to check before work)."""
    files, index, _ = _layout(Path(out), list(entries), shard_size)
    return files + ([index] if index else [])


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of the output ``out`` (its file, its shards under any count, its
    index) that no live process owns: what a merge killed with SIGKILL (or a power cut) left
    behind. Returns what was removed."""
    out = Path(out)
    stem = _shard_stem(out)
    names = (rf"(?:{re.escape(out.name)}|{re.escape(out.name + INDEX_SUFFIX)}"
             rf"|{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors)")
    return remove_stale(out.parent, names)


class CheckpointWriter:
    """Writes tensors in a fixed order, streamed: header first, then each tensor as it comes.

    ``entries`` lists (name, dtype, shape) in the order ``write`` will be called. Output kinds:
    ``.pt`` (collected, then ``torch.save``), one ``.safetensors`` file, or shards of at most
    ``shard_size`` bytes with an index. Nothing appears at the target paths before ``commit``;
    ``abort`` (or an exception inside ``with``) removes every temporary file. ``durable``
    fsyncs each file before its rename.
    """

    def __init__(self, out: str | os.PathLike, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                 shard_size: int | None = None, durable: bool = False):
        self.out = Path(out)
        self._durable = durable
        self._metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._entries = list(entries)
        self._next = 0
        files, self._index, groups = _layout(self.out, self._entries, shard_size)
        if self.out.suffix in TORCH_SUFFIXES:
            self._sink = TorchSink(self.out, self._entries, durable)
        else:
            self._sink = SafetensorsSink(files, self._entries, groups, self._metadata, durable)
        self.paths: list[Path] = files + ([self._index] if self._index else [])

    def write(self, name: str, array) -> None:
        """Append the next tensor: a numpy array (bfloat16 as uint16 bits) or a torch tensor."""
        if not isinstance(array, np.ndarray):
            array = to_numpy(array)
        i = self._next
        ename, dtype, shape = self._entries[i]
        if name != ename or array.dtype != NUMPY_DTYPES[dtype] or tuple(array.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {ename} {dtype} {list(shape)}, got {name} {array.dtype} {list(array.shape)}")
        self._next += 1
        self._sink.write(i, array)

    def commit(self, replace: bool = True) -> list[Path]:
        """Put every file in place, under the output's lock (``commit.py``). Without
        ``replace``, a file that exists by then (another process wrote it during the merge)
        is an ``OutputTaken`` error and none of this output's files is put in place."""
        if self._next != len(self._entries):
            raise RuntimeError(f"writer got {self._next} of {len(self._entries)} tensors")
        try:
            files = self._sink.finish()  # the sink's own list: its abort covers the index too
            if self._index:
                index_file = AtomicFile(self._index, self._durable)
                files.append(index_file)
                total = sum(nbytes(d, s) for _, d, s in self._entries)
                weight_map = {n: self.paths[self._sink.shard_of(i)].name for i, (n, _, _) in enumerate(self._entries)}
                index_file.write(json.dumps({"metadata": {"total_size": total, **self._metadata},
                                             "weight_map": weight_map}, indent=2).encode())
                index_file.finish()
        except BaseException:
            self.abort()
            raise
        with committing(self.out):
            if not replace:
                for p in self.paths:
                    if os.path.lexists(p):
                        raise taken(p)
            done = []
            try:
                # The index goes last: a reader never finds an index naming shards not yet in place.
                for f in files:
                    f.commit(replace)
                    done.append(f)
            except BaseException:
                if not replace:  # a process that takes no lock raced us: only ours were put in place
                    for f in done:
                        f.target.unlink(missing_ok=True)
                self.abort()
                raise
        return self.paths

    def abort(self) -> None:
        self._sink.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
