"""Hugging Face model folders: a ``config.json`` beside the weights (one ``model.safetensors``
or shards with ``model.safetensors.index.json``) and the files that go with them (generation
config, processor and tokenizer files).

Reading: a folder given as a checkpoint is read through the weights it holds. Writing: a merge
whose base is such a folder writes a folder laid out like it: the merged weights, and every
other file of the base copied unchanged, so that the model class's ``from_pretrained`` loads
the result."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from . import hub, index, safetensors, torch_file
from .atomic import write_atomic
from .distributed import METADATA
from .outputs import is_hf_weight_file

WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"  # the weights of folders transformers 4 saved without safetensors
# transformers' save_pretrained(max_shard_size=...) default (transformers 5)
DEFAULT_SHARD_SIZE = "50GB"
# what a folder holds as weights, in any format: never copied from the base
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                    ".h5", ".msgpack", ".gguf", ".distcp")


def is_model_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def is_weights(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def companion_files(folder: Path) -> list[Path]:
    """The base folder's files that are not weights (top level; hidden files left out); of a
    hub cache's snapshot, only the model's own (config, tokenizer: ``hub.COMPANIONS``)."""
    wanted = (lambda name: name in hub.COMPANIONS) if hub.is_snapshot(folder) else (lambda name: True)  # noqa: E731
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not is_weights(p.name) and wanted(p.name))


def check_folder(out: Path, companions: list[Path], force: bool, extra_names=()) -> None:
    """Before any input is read: the output folder's parent exists, and an existing folder
    needs ``force`` if it holds any file the merge would write or replace: Hugging Face weight
    files, the base's companions, ``extra_names``. Applied again when the output is put in
    place (``AtomicFolder.commit`` with ``replaced_files``), on what is there by then."""
    if out.exists() and not out.is_dir():
        raise InputError("the base is a model folder, so the output is a folder, but this is a file", str(out))
    if not out.parent.is_dir():
        raise InputError("the output's folder does not exist", str(out.parent))
    if out.is_dir():
        clash = replaced_files(out, [c.name for c in companions] + list(extra_names))
        if clash and not force:
            raise InputError(f"exists and holds {clash[0]} (use --force / force=True to replace it)", str(out))


def replaced_files(out: Path, names) -> list[str]:
    """The files of the existing folder ``out`` that writing ``names`` into it replaces or makes
    stale: those names, and every Hugging Face weight file (of any layout: another shard count,
    ``pytorch_model*.bin``, which would shadow the new weights for a loader). Nothing else of
    the folder is touched (``outputs.py``)."""
    written = set(names)
    return sorted(p.name for p in out.iterdir()
                  if (is_hf_weight_file(p.name) and (p.is_file() or p.is_symlink())) or p.name in written)


def copy_companions(companions: list[Path], out: Path, durable: bool) -> list[Path]:
    """Copy each file byte for byte, written as the weights are (a temporary, then a rename)."""
    written = []
    for src in companions:
        with open(src, "rb") as f:
            written.append(write_atomic(out / src.name, f, durable))
    return written


def updated_config(config: Path, dtype: str | None = None, values=None) -> bytes | None:
    """The model's ``config.json`` saying the weights' new dtype (``dtype`` as transformers 5
    writes it, ``torch_dtype`` as transformers 4 did: whichever it holds, in sub-configs too),
    so that ``from_pretrained`` loads the merged weights in it, as mergekit's output does, and
    the new ``values`` ({key: value}, wherever the key stands). None when it says all that
    already (the file is then copied byte for byte)."""
    import json

    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot update it: not JSON ({e})", str(config)) from None

    changed = []

    def update(d, new: dict) -> bool:
        found = False
        for key, value in new.items():
            if key in d:
                changed.append(d[key] != value)
                d[key], found = value, True
        for value in d.values():
            if isinstance(value, dict):
                found = update(value, new) or found
        return found

    if not isinstance(cfg, dict):
        raise InputError("cannot update it: not a JSON object", str(config))
    if dtype is not None and not update(cfg, {"dtype": dtype, "torch_dtype": dtype}):
        cfg["dtype"] = dtype
        changed.append(True)
    update(cfg, dict(values or {}))
    return (json.dumps(cfg, indent=2) + "\n").encode() if any(changed) else None


def write_files(out: Path, files, durable: bool) -> list[Path]:
    """Files the merge adds to the folder ({name: bytes}), written as the weights are."""
    return [write_atomic(out / name, data, durable) for name, data in files.items()]


def detect(path: Path) -> bool:
    return path.is_dir()


def reader(path: Path):
    """The folder's weights, as transformers picks them: its one ``*.safetensors.index.json``,
    or its one ``.safetensors``; else (folders written by transformers 4 or torch code)
    ``pytorch_model.bin.index.json`` and its ``.bin`` shards, or ``pytorch_model.bin``, read with
    ``torch.load(weights_only=True)``. Other ``.bin`` files (``training_args.bin``) are not
    weights."""
    indexes = sorted(path.glob("*.safetensors" + index.INDEX_SUFFIX))
    if len(indexes) == 1:
        return index.ShardedIndex(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not indexes and len(files) == 1:
        return safetensors.SafetensorsFile(files[0])
    if not indexes and not files:
        if (path / (TORCH_WEIGHTS + index.INDEX_SUFFIX)).is_file():
            return index.ShardedIndex(path / (TORCH_WEIGHTS + index.INDEX_SUFFIX))
        if (path / TORCH_WEIGHTS).is_file():
            return torch_file.TorchFile(path / TORCH_WEIGHTS)
    if not indexes and not files and any(path.glob("*.distcp")):
        raise InputError(f"holds .distcp files but no {METADATA}: a distributed checkpoint (torch.distributed.checkpoint) missing its "
                         f"metadata (dcp.save writes {METADATA} last, from rank 0: was the save interrupted, or the "
                         "file left out of a copy?)", str(path))
    raise InputError("a folder must hold one *.safetensors.index.json or one .safetensors file (or "
                     f"{TORCH_WEIGHTS}.index.json or {TORCH_WEIGHTS})", str(path))
