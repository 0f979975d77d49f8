"""Checkpoint I/O: reading tensors one at a time from any registered format, writing them
streamed and atomically. Knows nothing of the merge; needs no torch unless a file is a torch
one.

The formats, in the order ``open_checkpoint`` asks them (the first that claims a path opens it):
  distributed checkpoint
                 a folder holding a ``.metadata``: ``torch.distributed.checkpoint``'s
                 ``*.distcp`` files, a tensor at a time (``distributed.py``)
  model folder   any other folder: the weights it holds (``folders.py``)
  index          an ``*.index.json`` and the shards it names (``index.py``)
  torch file     ``.pt/.pth/.bin/.ckpt`` through ``torch.load(weights_only=True)`` (``torch_file.py``)
  safetensors    any other file (``safetensors.py``)
Writing: every output is built out of sight (a temporary beside each file, a private folder
for a folder) and put in place at the end under a lock on the output's folder, with the rule
"replaced only with force" applied to what is there at that moment (``atomic.py``,
``commit.py``).
A new format is one module registered here (``source.register``), held to the reader
contract (``source.TensorSource``) by the test every format shares.
"""
from . import distributed, folders, index, safetensors, torch_file
from .arrays import to_numpy, to_torch
from .atomic import write_atomic
from .source import TensorSource, open_checkpoint, register
from .writer import CheckpointWriter, output_paths, remove_stale_temporaries

register("distributed checkpoint", distributed.detect, distributed.reader, single_file=False)
register("model folder", folders.detect, folders.reader, single_file=False)
register("index", index.detect, index.reader, single_file=False)
register("torch file", torch_file.detect, torch_file.reader, single_file=True)
register("safetensors", safetensors.detect, safetensors.reader, single_file=True)

__all__ = ["CheckpointWriter", "TensorSource", "open_checkpoint", "output_paths", "register",
           "remove_stale_temporaries", "to_numpy", "to_torch", "write_atomic"]
