"""Model Stock (Jang, Yun, Han, ECCV 2024): merge a pre-trained checkpoint with N >= 2
checkpoints fine-tuned from it, layer by layer, with a ratio from the angle between the
fine-tuned updates.

    import modelstock
    merged = modelstock.merge(base_sd, [ft1_sd, ft2_sd])           # state dicts or modules
    report = modelstock.merge_files("base.safetensors", ["ft1.safetensors", "ft2.safetensors"],
                                    "merged.safetensors")         # streamed, file to file

Importing this package imports torch and nothing heavier (no open_clip, matplotlib or triton).
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "merge": ".merge",
    "merge_files": ".files",
    "MergeReport": ".report",
    "LayerStats": ".report",
    "InputError": ".plan",
    "open_checkpoint": ".checkpoint",
    "CheckpointWriter": ".checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelstock' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
