"""mergekit's YAML for ``merge_method: model_stock``, read as mergekit reads it, run as this
package's file merge: ``modelstock.mergekit.run_config(CONFIG, OUT_PATH)``, which the command
``modelstock mergekit-yaml CONFIG OUT_PATH`` wraps.

What mergekit's model_stock computes, per tensor (or per row with ``filter_wise``): the mean over
pairs of cos = <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clipped to [-1, 1] only (the authors'
formula: this package's ``clamp=False``), t = N cos / (1 + (N - 1) cos), then
t * mean + (1 - t) * w0. Differences, documented in the README: this package adds eps = 1e-8 to
the norm product instead of flooring it at 1e-6 (the two agree within 1e-8 relative wherever
the norm product is above 1e-6), computes in fp32 whatever ``dtype`` says (mergekit computes in
``dtype``, e.g. bf16), and writes w0 + t mean_i(w_i - w0) (the same value, rounded less).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .dtypes import FLOAT_ALIASES
from .errors import InputError, MergeWarning
from .sizes import parse_kmb

METHOD = "model_stock"
SUPPORTED = ("supported: merge_method: model_stock with base_model and models given as local paths, "
             "parameters: filter_wise, dtype, out_dtype")
# what mergekit's own tokenizer handling copies from the base (--copy-tokenizer, its default)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja")
_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "name", "tokenizer_source"}


@dataclass
class ModelStockConfig:
    base: Path
    finetuned: list[Path]
    filter_wise: bool = False
    dtype: str | None = None
    out_dtype: str | None = None
    text: str = ""
    ignored: list[str] = field(default_factory=list)


def _model_path(entry, where: str, root: Path) -> Path:
    if isinstance(entry, dict):
        if set(entry) - {"model", "parameters"}:
            raise InputError(f"{where}: keys {sorted(set(entry) - {'model', 'parameters'})} are not supported; {SUPPORTED}")
        entry = entry.get("model")
    if not isinstance(entry, str) or not entry:
        raise InputError(f"{where}: a model must be a path; {SUPPORTED}")
    if "+" in entry:
        raise InputError(f"{where}: {entry!r}: a model with a LoRA (+) is not supported; {SUPPORTED}")
    path = Path(entry).expanduser()
    if not path.is_absolute():
        path = root / path if (root / path).exists() else path
    if not path.exists():
        raise InputError(f"{where}: {entry!r} is not a local path (hub ids are not downloaded); {SUPPORTED}")
    return path


def _dtype(value, key: str) -> str | None:
    if value is None:
        return None
    if str(value) not in FLOAT_ALIASES:
        raise InputError(f"{key}: {value!r} is not one of {sorted(FLOAT_ALIASES)}")
    return FLOAT_ALIASES[str(value)]


def load(config_path) -> ModelStockConfig:
    """Parse and check a mergekit config; InputError (one line) for anything this cannot honour."""
    import yaml

    path = Path(config_path)
    try:
        text = path.read_text()
        cfg = yaml.safe_load(text)
    except OSError as e:
        raise InputError(f"cannot read the config: {e.strerror or e}", str(path)) from None
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML: {str(e).splitlines()[0]}", str(path)) from None
    if not isinstance(cfg, dict):
        raise InputError(f"the config must be a mapping; {SUPPORTED}", str(path))
    method = cfg.get("merge_method")
    if method != METHOD:
        raise InputError(f"merge_method {method!r} is not supported; {SUPPORTED}", str(path))
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise InputError(f"keys {unknown} are not supported (slices, tokenizer or chat-template surgery); {SUPPORTED}",
                         str(path))
    if cfg.get("tokenizer_source") not in (None, "base"):
        raise InputError(f"tokenizer_source {cfg['tokenizer_source']!r}: only the base's tokenizer is supported", str(path))
    params = cfg.get("parameters") or {}
    if not isinstance(params, dict) or set(params) - {"filter_wise"}:
        raise InputError(f"parameters {sorted(params) if isinstance(params, dict) else params!r}: model_stock takes "
                         "only filter_wise", str(path))
    root = path.parent
    if "base_model" not in cfg:
        raise InputError(f"model_stock needs a base_model; {SUPPORTED}", str(path))
    base = _model_path(cfg["base_model"], "base_model", root)
    entries = cfg.get("models") or []
    if not isinstance(entries, list):
        raise InputError(f"models must be a list; {SUPPORTED}", str(path))
    ignored = []
    finetuned = []
    for i, entry in enumerate(entries):
        p = _model_path(entry, f"models[{i}]", root)
        if isinstance(entry, dict) and entry.get("parameters"):
            ignored.append(f"models[{i}].parameters (model_stock does not use per-model parameters)")
        if p.resolve() != base.resolve():  # mergekit counts the base once, wherever it is listed
            finetuned.append(p)
    if len(finetuned) < 2:
        raise InputError(f"model_stock needs at least two models besides the base, got {len(finetuned)}", str(path))
    return ModelStockConfig(base=base, finetuned=finetuned, filter_wise=bool(params.get("filter_wise", False)),
                            dtype=_dtype(cfg.get("dtype"), "dtype"), out_dtype=_dtype(cfg.get("out_dtype"), "out_dtype"),
                            text=text, ignored=ignored)


def model_card(cfg: ModelStockConfig, out: Path) -> str:
    """The README.md mergekit writes beside a merge, in the same spirit: what, how, the config."""
    models = "\n".join(f"* {p}" for p in cfg.finetuned)
    return (f"---\nlibrary_name: transformers\ntags:\n- merge\n- model_stock\n---\n# {out.name}\n\n"
            "This is a merge of pre-trained language models made with modelstock-dynopool's "
            "`modelstock mergekit-yaml`, from a mergekit configuration.\n\n## Merge Details\n### Merge Method\n\n"
            f"This model was merged using the Model Stock method (Jang, Yun, Han, ECCV 2024), with {cfg.base} "
            "as the base.\n\n### Models Merged\n\nThe following models were included in the merge:\n"
            f"{models}\n\n### Configuration\n\nThe following YAML configuration was used to produce this "
            f"model:\n\n```yaml\n{cfg.text.strip()}\n```\n")


def _warn(note: str) -> None:
    warnings.warn(note, MergeWarning, stacklevel=3)


def run_config(config, out_path, *, cuda: bool = False, out_shard_size: str | int = "5B", copy_tokenizer: bool = True,
               write_model_card: bool = True, force: bool = False, progress: bool = False,
               notice: Callable[[str], None] = _warn):
    """Run a mergekit config as ``mergekit-yaml CONFIG OUT_PATH`` would: a folder with the merged
    weights (shards of ``out_shard_size``, mergekit's notation), the base's config and other
    files (tokenizer included unless ``copy_tokenizer=False``), ``README.md`` (unless
    ``write_model_card=False``) and the config as ``mergekit_config.yml``. Returns the
    MergeReport; what the config asks that changes nothing here goes to ``notice``."""
    from .io import folders
    from .merging.files import merge_files

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
    extras = {"mergekit_config.yml": cfg.text.encode()}
    if write_model_card:
        extras["README.md"] = model_card(cfg, out).encode()
    return merge_files(
        cfg.base, cfg.finetuned, out, granularity="row" if cfg.filter_wise else "tensor", clamp=False,
        out_dtype=cfg.out_dtype or cfg.dtype, shard_size=shard_size, force=force,
        device="cuda" if cuda else "cpu", progress=progress,
        skip_files=() if copy_tokenizer else TOKENIZER_FILES, extra_files=extras)


def _check_filter_wise(cfg: ModelStockConfig) -> None:
    """filter_wise reduces over the last dim in mergekit, over all but dim 0 here: the same for
    the 1-D and 2-D tensors of transformer LMs, not for convolutions."""
    from .io import open_checkpoint

    with open_checkpoint(cfg.base) as ck:
        for name, (_, shape) in ck.tensors().items():
            if len(shape) > 2:
                raise InputError(f"filter_wise on a {len(shape)}-D tensor: mergekit takes one ratio per "
                                 "last-dim row, this package per output row (dim 0); only 1-D and 2-D "
                                 "tensors agree", str(cfg.base), name)
