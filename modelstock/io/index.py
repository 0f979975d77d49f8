"""Sharded checkpoints: an ``*.index.json`` (the Hugging Face layout: ``{"weight_map": {tensor:
shard file}}``) beside its shards, each opened by the reader of its own format
(``model-00001-of-00002.safetensors``, ``pytorch_model-00001-of-00002.bin``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from .source import TensorSource, open_checkpoint

INDEX_SUFFIX = ".index.json"


def is_plain_file_name(name) -> bool:
    """A name that stays in its folder: no separator, no parent, not absolute (an index's shard)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and (os.altsep is None or os.altsep not in name) and "\0" not in name)


class ShardedIndex(TensorSource):
    """A sharded checkpoint: its index and the shard files it names (each a plain file name in
    the index's folder)."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = str(index_path)
        try:
            index = json.loads(Path(self.path).read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except FileNotFoundError:
            raise InputError("no such file", self.path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"not a {_kind(self.path)} (no JSON 'weight_map')", self.path) from None
        if not isinstance(weight_map, dict):
            raise InputError(f"not a {_kind(self.path)} ('weight_map' is not a mapping)", self.path)
        folder = Path(self.path).parent
        for name, shard in weight_map.items():
            if not is_plain_file_name(shard):
                raise InputError(f"names the shard {shard!r}: a shard must be a file name in the index's folder",
                                 self.path, name)
        self._shards: dict[str, TensorSource] = {}
        try:
            for shard in dict.fromkeys(weight_map.values()):
                self._shards[shard] = open_checkpoint(folder / shard, files_only=True)
        except BaseException:
            self.close()
            raise
        held = {shard: source.tensors() for shard, source in self._shards.items()}
        self._where: dict[str, TensorSource] = {}
        for name, shard in weight_map.items():
            if name not in held[shard]:
                self.close()
                raise InputError(f"listed in the index but not in {shard}", self.path, name)
            self._where[name] = self._shards[shard]
        first = next(iter(self._shards.values()), None)
        self.metadata = dict(first.metadata) if first else {}
        order = {}
        for shard, source in self._shards.items():
            order.update((n, m) for n, m in held[shard].items() if self._where.get(n) is source)
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


def _kind(path: str) -> str:
    return "safetensors index" if path.endswith(".safetensors" + INDEX_SUFFIX) else "sharded checkpoint index"


def detect(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def reader(path: Path) -> ShardedIndex:
    return ShardedIndex(path)
