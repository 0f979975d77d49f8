"""``tokenizer_source: base``: the embeddings and the output head get one row per token of the
base's tokenizer, as mergekit makes them.

mergekit strips the base's tokenizer to the ids below the model's ``vocab_size``, maps every
model's rows to those tokens, pads the count up to ``pad_to_multiple_of`` with the mean of the
rows, and merges the resized tensors (so the ratio is taken over those rows). Here the
fine-tuned models must number the base's tokens as the base does (fine-tunes of one base do;
tokenizers that differ need mergekit's token surgery, refused with one line). The rows are then
a prefix of each stored tensor (a view, no copy) plus, when padded, the mean rows; the config's
``vocab_size`` says the new count. Fine-tunes that added tokens (rows past the base's tokens,
their tokenizers keeping the base's ids) lose those rows, as in mergekit, whose output has no
place for tokens the base's tokenizer lacks. Checked against mergekit 0.1.5's output in
``benchmarks/mergekit_yaml_vs.py``.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import numpy as np

from ..backends import numpy_ops
from ..errors import InputError
from ..extras import require
from ..io import TensorSource
from ..plan import canonical_name

# Vocabulary-indexed tensors (rows = tokens) of the architectures transformers ships, by name.
_VOCAB_TENSORS = ("*embed_tokens.weight", "*lm_head.weight", "*wte.weight", "*word_embeddings.weight",
                  "*embed_in.weight", "*embed_out.weight", "*tok_embeddings.weight", "output.weight",
                  "*shared.weight")


def vocab_size(folder: Path) -> int:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read config.json ({e})", str(folder)) from None
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if not isinstance(size, int):
        raise InputError("config.json gives no vocab_size, which tokenizer source base needs", str(folder))
    return size


def _vocab(folder: Path) -> dict[str, int] | None:
    """The tokenizer's token -> id, as transformers loads it; None where the folder has none."""
    transformers = require("transformers", "tokenizer source base (reading the tokenizers)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    except Exception:  # no tokenizer, or one transformers cannot load: mergekit assumes the base's
        return None


def plan_rows(base: Path, finetuned: list[Path], pad_to_multiple_of: int | None) -> tuple[int, int]:
    """(rows kept, rows in all) of the vocabulary tensors: the base's tokens, padded."""
    rows = vocab_size(base)
    vocab = _vocab(base)
    if vocab is None:
        raise InputError("tokenizer source base: the base has no tokenizer transformers can load", str(base))
    kept = {tok: i for tok, i in vocab.items() if i < rows}  # mergekit's stripped tokenizer
    if sorted(kept.values()) != list(range(len(kept))):
        raise InputError("tokenizer source base: the tokenizer's ids below vocab_size are not 0..n-1", str(base))
    for folder in finetuned:
        theirs = _vocab(folder) if folder.is_dir() else None
        if theirs is not None and any(theirs.get(tok) != i for tok, i in kept.items()):
            raise InputError("its tokenizer numbers the base's tokens differently; merging across vocabularies "
                             "is mergekit's token surgery, not supported here", str(folder))
    total = len(kept)
    if pad_to_multiple_of:
        total = -(-total // pad_to_multiple_of) * pad_to_multiple_of
    return len(kept), total


def stored_rows(source: TensorSource, names, kept: int) -> int | None:
    """The rows ``source`` stores for the vocabulary tensors ``names`` (None if it has none);
    InputError where they disagree or fall short of the ``kept`` tokens."""
    wanted = set(names)
    found = {canonical_name(n): s[0] for n, (_, s) in source.tensors().items() if canonical_name(n) in wanted}
    if not found:
        return None
    name, rows = min(found.items(), key=lambda kv: kv[1])
    if rows < kept:
        raise InputError(f"tokenizer source base: {rows} rows, fewer than the base's {kept} tokens (mergekit would "
                         "fill the rest from the base: not supported here)", source.path, name)
    return rows


def vocab_tensors(tensors: dict, rows: int) -> list[str]:
    """The canonical names of the vocabulary-indexed tensors (dim 0 of ``rows`` tokens)."""
    names = [canonical_name(n) for n, (_, shape) in tensors.items()
             if shape and shape[0] == rows and any(fnmatch.fnmatchcase(canonical_name(n), p) for p in _VOCAB_TENSORS)]
    if not names:
        raise InputError(f"tokenizer source base: no embedding or output head of {rows} rows found")
    return names


class Resized(TensorSource):
    """A source whose vocabulary tensors have ``kept`` of their rows, then (up to ``total``)
    rows holding the mean of those, as mergekit pads; every other tensor as stored."""

    def __init__(self, inner: TensorSource, names, kept: int, total: int):
        self.inner, self.kept, self.total = inner, kept, total
        self.path, self.metadata = inner.path, inner.metadata
        wanted = set(names)
        self._names = {n for n in inner.tensors() if canonical_name(n) in wanted}

    def tensors(self):
        return {n: (d, (self.total, *s[1:]) if n in self._names else s) for n, (d, s) in self.inner.tensors().items()}

    def view(self, name):
        flat = self.inner.view(name)
        if name not in self._names:
            return flat
        dtype, shape = self.inner.tensors()[name]
        row = math.prod(shape[1:])
        kept = flat[: self.kept * row]
        if self.total == self.kept:
            return kept
        out = np.empty(self.total * row, dtype=flat.dtype)
        out[: kept.size] = kept
        mean = numpy_ops.widen(kept, dtype).reshape(self.kept, row).mean(axis=0, dtype=np.float64)
        pad = numpy_ops.cast(mean.astype(np.float32), dtype)
        out[kept.size:] = np.tile(pad, self.total - self.kept)
        return out

    def files(self):
        return self.inner.files()

    def close(self):
        self.inner.close()
