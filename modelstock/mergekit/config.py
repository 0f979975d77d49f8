"""mergekit's YAML for ``merge_method: model_stock``, read as mergekit reads it.

What mergekit's model_stock computes, per tensor (or per row with ``filter_wise``): the mean over
pairs of cos = <d_i, d_j> / max(|d_i| |d_j|, 1e-6), clipped to [-1, 1] only (the authors'
formula: this package's ``clamp=False``), t = N cos / (1 + (N - 1) cos), then
t * mean + (1 - t) * w0. Differences, documented in docs/mergekit.md: this package adds eps = 1e-8 to
the norm product instead of flooring it at 1e-6 (the two agree within 1e-8 relative wherever
the norm product is above 1e-6), computes in fp32 whatever ``dtype`` says (mergekit computes in
``dtype``, e.g. bf16), and writes w0 + t mean_i(w_i - w0) (the same value, rounded less).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import FLOAT_ALIASES
from ..errors import InputError
from ..extras import require
from ..io import hub
from ..io.hub import TOKENIZER_FILES

METHOD = "model_stock"
SUPPORTED = ("supported: merge_method: model_stock with base_model and models given as local paths or hub ids "
             "(org/name, org/name@revision; a model may be base_model+lora_path, a PEFT LoRA adapter of the base), "
             "parameters: filter_wise, dtype, out_dtype, tokenizer_source: base (or tokenizer: {source: base})")
_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "name", "tokenizer_source",
         "tokenizer"}


@dataclass
class ModelStockConfig:
    base: Path
    finetuned: list[Path]
    filter_wise: bool = False
    dtype: str | None = None
    out_dtype: str | None = None
    text: str = ""
    ignored: list[str] = field(default_factory=list)
    tokenizer_source: str | None = None     # "base": embeddings and head resized to the base's tokenizer
    pad_to_multiple_of: int | None = None
    given: dict[Path, str] = field(default_factory=dict)  # each model as the config names it (a hub id, a path)


def _model_path(entry, where: str, root: Path, given: dict, base: Path | None = None) -> Path:
    path = _resolve(entry, where, root, base)
    given[path] = entry["model"] if isinstance(entry, dict) else entry
    return path


def _resolve(entry, where: str, root: Path, base: Path | None = None) -> Path:
    """A model entry's local path (a hub id's snapshot); ``base+adapter`` (mergekit's LoRA
    syntax, in ``models``) is the adapter's, merged natively from its factors, when its base is
    ``base``."""
    if isinstance(entry, dict):
        if set(entry) - {"model", "parameters"}:
            raise InputError(f"{where}: keys {sorted(set(entry) - {'model', 'parameters'})} are not supported; {SUPPORTED}")
        entry = entry.get("model")
    if not isinstance(entry, str) or not entry:
        raise InputError(f"{where}: a model must be a path or a hub id; {SUPPORTED}")
    if "+" in entry:
        return _lora_path(entry, where, root, base)
    path = Path(entry).expanduser()
    if not path.is_absolute() and (root / path).exists():  # beside the config first, as a path
        return root / path
    if hub.parse(entry) is not None:  # a local path wins; else the hub's snapshot (cache first offline)
        try:
            return hub.resolve(entry)
        except InputError as e:
            raise InputError(f"{where}: {entry!r}: {e.message}") from None
    if not path.exists():
        raise InputError(f"{where}: {entry!r} is neither a local path nor a hub id (org/name); {SUPPORTED}")
    return path


def _lora_path(entry: str, where: str, root: Path, base: Path | None) -> Path:
    from ..io.adapters import is_adapter

    model, lora = entry.split("+", 1)
    if base is None:
        raise InputError(f"{where}: {entry!r}: a base_model with a LoRA (+) is not supported; {SUPPORTED}")
    adapter = _resolve(lora, where, root)
    if not is_adapter(adapter):
        raise InputError(f"{where}: {lora!r} is not a PEFT LoRA adapter folder (adapter_config.json)")
    if _resolve(model, where, root).resolve() != base.resolve():
        raise InputError(f"{where}: {entry!r}: the LoRA's model must be the base_model (Model Stock merges "
                         f"updates of one base); {SUPPORTED}")
    return adapter


def _dtype(value, key: str) -> str | None:
    if value is None:
        return None
    if str(value) not in FLOAT_ALIASES:
        raise InputError(f"{key}: {value!r} is not one of {sorted(FLOAT_ALIASES)}")
    return FLOAT_ALIASES[str(value)]


def load(config_path) -> ModelStockConfig:
    """Parse and check a mergekit config; InputError (one line) for anything this cannot honour."""
    yaml = require("yaml", "reading a mergekit config")

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
    tokenizer_source, pad = _tokenizer(cfg, str(path))
    params = cfg.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"parameters must be a mapping, got {params!r}", str(path))
    if not isinstance(params.get("filter_wise", False), bool):
        raise InputError(f"parameters.filter_wise must be true or false, got {params['filter_wise']!r}", str(path))
    # what published configs carry beside model_stock (normalize, int8_mask, weight): mergekit
    # accepts them and they change nothing for this method
    ignored = [f"parameters.{k} (model_stock does not use it)" for k in params if k != "filter_wise"]
    root = path.parent
    if "base_model" not in cfg:
        raise InputError(f"model_stock needs a base_model; {SUPPORTED}", str(path))
    given = {}
    base = _model_path(cfg["base_model"], "base_model", root, given)
    entries = cfg.get("models") or []
    if not isinstance(entries, list):
        raise InputError(f"models must be a list; {SUPPORTED}", str(path))
    finetuned = []
    for i, entry in enumerate(entries):
        p = _model_path(entry, f"models[{i}]", root, given, base)
        if isinstance(entry, dict) and entry.get("parameters"):
            ignored.append(f"models[{i}].parameters (model_stock does not use per-model parameters)")
        if p.resolve() != base.resolve():  # mergekit counts the base once, wherever it is listed
            finetuned.append(p)
    if len(finetuned) < 2:
        raise InputError(f"model_stock needs at least two models besides the base, got {len(finetuned)}", str(path))
    return ModelStockConfig(base=base, finetuned=finetuned, filter_wise=bool(params.get("filter_wise", False)),
                            dtype=_dtype(cfg.get("dtype"), "dtype"), out_dtype=_dtype(cfg.get("out_dtype"), "out_dtype"),
                            text=text, ignored=ignored, tokenizer_source=tokenizer_source, pad_to_multiple_of=pad,
                            given=given)


def _tokenizer(cfg: dict, source: str) -> tuple[str | None, int | None]:
    """``tokenizer_source: base`` or ``tokenizer: {source: base, pad_to_multiple_of: N}``; the
    base's tokenizer is the one supported (a union or another model's is token surgery)."""
    if "tokenizer_source" in cfg and "tokenizer" in cfg:
        raise InputError("give tokenizer_source or tokenizer, not both", source)
    spec = cfg.get("tokenizer")
    if spec is None:
        spec = {"source": cfg.get("tokenizer_source")}
    if not isinstance(spec, dict) or set(spec) - {"source", "pad_to_multiple_of"}:
        keys = sorted(set(spec) - {"source", "pad_to_multiple_of"}) if isinstance(spec, dict) else spec
        raise InputError(f"tokenizer: {keys!r} is not supported (token surgery); only source: base and "
                         "pad_to_multiple_of", source)
    if spec.get("source") not in (None, "base"):
        raise InputError(f"tokenizer source {spec['source']!r}: only the base's tokenizer is supported", source)
    pad = spec.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise InputError(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}", source)
    if pad is not None and spec.get("source") is None:
        raise InputError("tokenizer.pad_to_multiple_of needs source: base", source)
    return spec.get("source"), pad


def model_card(cfg: ModelStockConfig, out: Path) -> str:
    """The README.md mergekit writes beside a merge, in the same spirit: what, how, the config."""
    models = "\n".join(f"* {cfg.given.get(p, p)}" for p in cfg.finetuned)
    base = cfg.given.get(cfg.base, cfg.base)
    return (f"---\nlibrary_name: transformers\ntags:\n- merge\n- model_stock\n---\n# {out.name}\n\n"
            "This is a merge of pre-trained language models made with modelstock-dynopool's "
            "`modelstock mergekit-yaml`, from a mergekit configuration.\n\n## Merge Details\n### Merge Method\n\n"
            f"This model was merged using the Model Stock method (Jang, Yun, Han, ECCV 2024), with {base} "
            "as the base.\n\n### Models Merged\n\nThe following models were included in the merge:\n"
            f"{models}\n\n### Configuration\n\nThe following YAML configuration was used to produce this "
            f"model:\n\n```yaml\n{cfg.text.strip()}\n```\n")
