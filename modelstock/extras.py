"""Optional dependencies: imported where a feature needs them, and when one is missing, one line
that names the `pip install` fixing it (the extras are setup.py's)."""
from __future__ import annotations

import importlib

DISTRIBUTION = "modelstock-dynopool"
# import name -> (what pip installs, the extra that brings it)
_EXTRAS = {
    "yaml": ("pyyaml", "mergekit"),
    "transformers": ("transformers", "mergekit"),
    "huggingface_hub": ("huggingface_hub", "mergekit"),
    "matplotlib": ("matplotlib", "plot"),
    "open_clip": ("open_clip_torch", "clip"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency a feature needs is not installed."""


def require(module: str, purpose: str):
    """``import module``, or a :class:`MissingExtra` saying `purpose` needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = _EXTRAS[module.split(".")[0]]
        raise MissingExtra(f"{purpose} needs {package}: pip install {package} "
                           f"(or {DISTRIBUTION}'s extra [{extra}])", name=module) from None
