"""Where a merge may write: the rules that keep a user's files safe.

- An output (file or folder) is never an input, never holds an input, never lies inside an
  input folder, and never resolves to one (symlinks and hard links included): such a merge is
  refused before anything is read or written.
- ``force`` replaces only what the merge writes, plus, in an output folder, the Hugging Face
  weight files of the layout it replaces (``model*.safetensors``, ``pytorch_model*.bin`` and
  their indexes): a loader would otherwise find two sets of weights. Nothing else in the
  folder (optimizer state, training arguments, other formats) is touched.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import InputError

# The weight files of a Hugging Face model folder, as save_pretrained names them.
HF_WEIGHT_FILE = re.compile(r"(?:model|pytorch_model)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
                            r"|(?:model\.safetensors|pytorch_model\.bin)\.index\.json")


def is_hf_weight_file(name: str) -> bool:
    return HF_WEIGHT_FILE.fullmatch(name) is not None


def _forms(p: str | os.PathLike) -> tuple[Path, Path]:
    """The path as given (made absolute) and as it resolves (symlinks followed)."""
    return Path(os.path.abspath(p)), Path(os.path.realpath(p))


def _within(child: Path, parent: Path) -> bool:
    return parent in child.parents


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """InputError unless ``out`` stays clear of every input file and folder (see the module)."""
    for p in inputs:
        folder = os.path.isdir(p)
        for o, i in zip(_forms(out), _forms(p)):
            if o == i or (os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p)):
                raise InputError("the output would overwrite an input", str(out))
            if _within(i, o):
                raise InputError(f"the output folder holds an input of the merge ({p}); choose another", str(out))
            if folder and _within(o, i):
                raise InputError(f"the output lies inside the input folder {p}; choose a path outside it", str(out))


def names_a_folder(path: str | os.PathLike) -> bool:
    """``dir/``: a path ending in a separator names a folder (``Path`` would drop the slash)."""
    text = os.fspath(path)
    return isinstance(text, str) and text.endswith(tuple(s for s in (os.sep, os.altsep) if s))


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool) -> None:
    """A file the merge will write (a report, a plot, a single-file output): its folder exists,
    it is not a folder, it replaces an existing file only with ``force``, and it is no input."""
    if names_a_folder(path):
        raise InputError("ends with a path separator, so it names a folder; this is a file: name it", str(path))
    p = Path(path)
    if not p.parent.is_dir():
        raise InputError("the output's folder does not exist", str(p))
    if p.is_dir():
        raise InputError("is a folder", str(p))
    check_not_an_input(p, inputs)
    if p.exists() and not force:
        raise InputError("exists (use --force / force=True to replace it)", str(p))
