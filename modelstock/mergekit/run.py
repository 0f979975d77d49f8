"""Running a mergekit config as ``mergekit-yaml CONFIG OUT_PATH`` would, on this package's file
merge: ``modelstock.mergekit.run_config``, which ``modelstock mergekit-yaml`` wraps."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from ..errors import InputError, MergeWarning
from ..sizes import parse_kmb
from .config import TOKENIZER_FILES, ModelStockConfig, load, model_card


def _warn(note: str) -> None:
    warnings.warn(note, MergeWarning, stacklevel=3)


def run_config(config, out_path, *, cuda: bool = False, device: str | None = None, out_shard_size: str | int = "5B",
               copy_tokenizer: bool = True, write_model_card: bool = True, force: bool = False, progress: bool = False,
               notice: Callable[[str], None] = _warn):
    """Run a mergekit config as ``mergekit-yaml CONFIG OUT_PATH`` would: a folder with the merged
    weights (shards of ``out_shard_size``, mergekit's notation), the base's config and other
    files (tokenizer included unless ``copy_tokenizer=False``), ``README.md`` (unless
    ``write_model_card=False``) and the config as ``mergekit_config.yml``. Returns the
    MergeReport; what the config asks that changes nothing here goes to ``notice``. ``cuda``
    runs the arithmetic on the GPU; ``device`` ("cpu", "cuda", "cuda:N") says where, if given."""
    from ..io import folders
    from ..merging.files import merge_files

    out = Path(out_path)
    cfg = load(config)
    if not folders.is_model_folder(cfg.base):
        raise InputError("the base_model must be a model folder (config.json beside its weights), as "
                         "mergekit-yaml's are", str(cfg.base))
    if cfg.filter_wise:
        _check_filter_wise(cfg)
    for note in cfg.ignored:
        notice(f"ignoring {note}")
    shard_size = out_shard_size if isinstance(out_shard_size, int) else parse_kmb(out_shard_size)
    transform, config_values = _vocabulary(cfg, notice)
    extras = {"mergekit_config.yml": cfg.text.encode()}
    if write_model_card:
        extras["README.md"] = model_card(cfg, out).encode()
    return merge_files(
        cfg.base, cfg.finetuned, out, granularity="row" if cfg.filter_wise else "tensor", clamp=False,
        out_dtype=cfg.out_dtype or cfg.dtype, shard_size=shard_size, force=force,
        device=device or ("cuda" if cuda else "cpu"), progress=progress,
        skip_files=() if copy_tokenizer else TOKENIZER_FILES, extra_files=extras, config_values=config_values,
        transform=transform)


def _vocabulary(cfg: ModelStockConfig, notice):
    """With the base's tokenizer asked for: the inputs' vocabulary tensors resized to it and the
    config's new vocab_size (``vocabulary.py``); else nothing to change."""
    if cfg.tokenizer_source != "base":
        return None, None
    from ..io.adapters import is_adapter

    if any(is_adapter(p) for p in cfg.finetuned):
        raise InputError("tokenizer_source: base with LoRA models (base+lora): not supported (an adapter has "
                         "no vocabulary of its own to resize)")
    from ..io import open_checkpoint
    from . import vocabulary

    kept, total = vocabulary.plan_rows(cfg.base, cfg.finetuned, cfg.pad_to_multiple_of)
    with open_checkpoint(cfg.base) as ck:
        names = vocabulary.vocab_tensors(ck.tensors(), vocabulary.vocab_size(cfg.base))
    resized = []  # "where (rows)" of each input whose rows change: the base's padding, fine-tunes' added tokens
    for path in [cfg.base, *cfg.finetuned]:
        with open_checkpoint(path) as ck:
            rows = vocabulary.stored_rows(ck, names, kept)
        if rows is not None and rows != total:
            resized.append(f"{path} ({rows} rows)")
    if not resized:
        return None, None
    notice(f"tokenizer source base: {', '.join(names)} resized to {total} rows ({kept} tokens"
           f"{', padded' if total > kept else ''}) from {', '.join(resized)}, as mergekit does")
    return (lambda source: vocabulary.Resized(source, names, kept, total)), {"vocab_size": total}


def _check_filter_wise(cfg: ModelStockConfig) -> None:
    """filter_wise reduces over the last dim in mergekit, over all but dim 0 here: the same for
    the 1-D and 2-D tensors of transformer LMs, not for convolutions."""
    from ..io import open_checkpoint

    with open_checkpoint(cfg.base) as ck:
        for name, (_, shape) in ck.tensors().items():
            if len(shape) > 2:
                raise InputError(f"filter_wise on a {len(shape)}-D tensor: mergekit takes one ratio per "
                                 "last-dim row, this package per output row (dim 0); only 1-D and 2-D "
                                 "tensors agree", str(cfg.base), name)
