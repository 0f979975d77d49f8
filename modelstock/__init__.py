"""Model Stock (Jang, Yun, Han, ECCV 2024): merge a pre-trained checkpoint with N >= 2
checkpoints fine-tuned from it, layer by layer, with a ratio from the angle between the
fine-tuned updates.

    import modelstock
    merged = modelstock.merge(base_sd, [ft1_sd, ft2_sd])           # state dicts or modules
    report = modelstock.merge_files("base.safetensors", ["ft1.safetensors", "ft2.safetensors"],
                                    "merged.safetensors")         # streamed, file to file

Importing this package imports numpy only: torch comes with ``merge`` (in-memory) and with
torch-format files; open_clip, matplotlib and triton only with the functions that need them.
"""
from .files import merge_files
from .plan import InputError
from .report import LayerStats, MergeReport

__version__ = "0.1.0"
__all__ = ["merge", "merge_", "InPlaceMerge", "PeriodicMerge", "merge_files", "MergeReport", "LayerStats",
           "InputError"]


def __getattr__(name):
    if name in ("merge", "merge_", "InPlaceMerge", "PeriodicMerge"):  # torch: only when asked for
        from . import in_memory, periodic

        value = getattr(periodic if name == "PeriodicMerge" else in_memory, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelstock' has no attribute {name!r}")
