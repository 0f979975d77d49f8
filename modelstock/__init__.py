"""Model Stock (Jang, Yun, Han, ECCV 2024): merge a pre-trained checkpoint with N >= 2
checkpoints fine-tuned from it, layer by layer, with a ratio from the angle between the
fine-tuned updates.

    import modelstock
    merged = modelstock.merge(base_sd, [ft1_sd, ft2_sd])           # state dicts or modules
    soup = modelstock.merge(base_sd, [ft1_sd, ft2_sd], method="uniform")  # or "wise_ft"
    report = modelstock.merge_files("base.safetensors", ["ft1.safetensors", "ft2.safetensors"],
                                    "merged.safetensors")         # streamed, file to file

Importing this package imports nothing heavy; each name brings its module on first use:
numpy with ``merge_files`` and the others, torch with ``merge`` (in-memory) and with
torch-format files; open_clip, matplotlib and triton only with the functions that need them.
(The command line relies on this: it sets up numpy's BLAS before numpy loads, see cli.main.)
"""
from msdp_kernels._version import __version__  # noqa: E402 - one version for the distribution
__all__ = ["merge", "merge_", "InPlaceMerge", "PeriodicMerge", "merge_files", "MergeReport", "LayerStats",
           "InputError", "methods"]


_HOMES = {"merge": "merging.in_memory", "merge_": "merging.in_memory", "InPlaceMerge": "merging.in_memory",
          "PeriodicMerge": "merging.periodic", "merge_files": "merging.files", "MergeReport": "report",
          "LayerStats": "report", "InputError": "errors"}


def __getattr__(name):
    if name == "methods":  # the merge methods (modelstock.methods.WiseFT(alpha=0.3), ...)
        import importlib

        return importlib.import_module(".methods", __name__)
    if name in _HOMES:
        import importlib

        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelstock' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_HOMES})
