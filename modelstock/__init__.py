"""Model Stock (Jang, Yun, Han, ECCV 2024): merge a pre-trained checkpoint with N >= 2
checkpoints fine-tuned from it, layer by layer, with a ratio from the angle between the
fine-tuned updates.

    import modelstock
    merged = modelstock.merge(base_sd, [ft1_sd, ft2_sd])           # state dicts or modules
    report = modelstock.merge_files("base.safetensors", ["ft1.safetensors", "ft2.safetensors"],
                                    "merged.safetensors")         # streamed, file to file

Importing this package imports torch and nothing heavier (open_clip, matplotlib and triton are
imported only by the functions that need them).
"""
from .checkpoint import CheckpointWriter, open_checkpoint
from .files import merge_files
from .merge import merge  # the function shadows its module's name on the package, on purpose
from .plan import InputError
from .report import LayerStats, MergeReport

__version__ = "0.1.0"
__all__ = ["merge", "merge_files", "MergeReport", "LayerStats", "InputError", "open_checkpoint",
           "CheckpointWriter"]
