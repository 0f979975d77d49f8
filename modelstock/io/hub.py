"""Hugging Face hub ids as inputs: ``org/name``, or ``org/name@revision`` (mergekit's
notation), resolved as transformers resolves them, through ``huggingface_hub``.

A path that exists locally wins; anything else shaped like ``org/name`` is an id. Offline
(``HF_HUB_OFFLINE=1``, or no network: ``huggingface_hub`` then falls back to its cache) the
snapshot comes from the cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, as the client reads them,
here at call time); online, what the cache lacks is downloaded. Only the files a model needs are
fetched or read: its config, its weights (safetensors, else ``pytorch_model*.bin``, as
transformers picks them), its tokenizer and generation config; a snapshot's other files (model
card, training arguments, ONNX exports) are not copied into a merge (``is_snapshot``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError
from ..extras import require

# what mergekit's own tokenizer handling copies from the base (--copy-tokenizer, its default)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja")
# besides the weights: what from_pretrained reads of a model and its tokenizer
COMPANIONS = ("config.json", "generation_config.json", *TOKENIZER_FILES)
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
TORCH = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
# org/name, each part as the hub allows ([\w.-], not starting with . or -), then @revision
_ID = re.compile(r"(?P<repo>[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
_TRUE = {"1", "on", "yes", "true"}


def parse(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for ``org/name[@revision]``; None for anything else,
    including names of checkpoint files (``runs/ft1.safetensors``) and configs."""
    m = _ID.fullmatch(ref)
    if m is None or re.search(r"\.(safetensors|bin|pt|pth|ckpt|json|ya?ml)$", m["repo"]):
        return None
    return m["repo"], m["revision"]


def resolve(ref: str | os.PathLike) -> Path:
    """``ref`` as a local path if it exists there (or is no hub id); else the folder of the
    hub id's snapshot (``org/name[@revision]``), from the cache or downloaded. InputError
    (one line) where the id cannot be had."""
    path = Path(ref).expanduser()
    parsed = parse(ref) if isinstance(ref, str) else None
    if parsed is None or path.exists():
        return path
    repo, revision = parsed
    require("huggingface_hub", f"{ref}: not a local path; reading it as a hub id")
    offline = offline_mode()
    folder = _snapshot(ref, repo, revision, SAFETENSORS, offline)
    if not offline and not any(folder.glob("*.safetensors")):  # a model saved without safetensors
        folder = _snapshot(ref, repo, revision, TORCH, offline)
    return folder


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) as set now: the client
    reads it once, at import."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(os.environ.get(k, "").lower() in _TRUE
                                           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The hub cache as the client finds it (``HF_HUB_CACHE``, ``HF_HOME/hub``, its default),
    read now: the client reads these once, at import."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_snapshot(folder: Path) -> bool:
    """Whether ``folder`` is a snapshot in a hub cache (``models--org--name/snapshots/<commit>``):
    of its files, only the model's own are read (``COMPANIONS``)."""
    parent = Path(folder).absolute().parent
    return parent.name == "snapshots" and parent.parent.name.startswith("models--")


def _snapshot(ref: str, repo: str, revision: str | None, weights, offline: bool) -> Path:
    from huggingface_hub import errors, snapshot_download

    cache = cache_dir()
    at = f" at revision {revision!r}" if revision else ""
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 2
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline,
                                      allow_patterns=[*COMPANIONS, *weights]))
    except incomplete as e:  # an interrupted download, offline
        missing = re.search(r"\d+ file\(s\) are missing \(.*?\)", " ".join(str(e).split()))
        raise InputError(f"not a local path, and the cached snapshot of hub id {repo}{at} is incomplete"
                         f"{': ' + missing.group(0) if missing else ''}", ref) from None
    except errors.LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE)" if offline else "and the hub cannot be reached"
        raise InputError(f"not a local path, and hub id {repo}{at} is not in the Hugging Face cache ({cache}), "
                         f"{why}", ref) from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:  # unknown repo or revision, gated, network, disk
        message = " ".join(str(e).split())
        raise InputError(f"not a local path, and hub id {repo}{at} cannot be had: {message[:300]}", ref) from None
