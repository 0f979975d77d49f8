"""``modelstock.merge_files``: a file-to-file merge that streams layer by layer.

The inputs are opened through ``modelstock.io`` (any registered format); the output is a file
(or shards) or, when the base is a Hugging Face model folder, a folder laid out like the base.
The arithmetic runs in one of two pipelines: on numpy (``cpu_pipeline.py``, no torch needed)
or on a GPU (``gpu_pipeline.py``). Where the output may go is ``io/outputs.py``'s to say.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..dtypes import nbytes
from ..io import CheckpointWriter, TensorSource, folders, open_checkpoint, output_paths, remove_stale_temporaries
from ..io.atomic import AtomicFolder, remove_stale
from ..io.leases import InputGuard
from ..errors import InputError
from ..io.outputs import check_not_an_input, check_output_file, names_a_folder
from ..plan import dropped_tensors, plan_layers, warn_unmatched
from ..methods import resolve
from ..ratio import EPS
from ..report import MergeReport
from ..sizes import parse_size
from . import adapters, cpu_pipeline
from .options import MergeOptions


@dataclass(frozen=True)
class _Output:
    """Where and how the merged tensors are written."""
    path: Path
    shard_size: int | None
    force: bool
    durable: bool


@dataclass(frozen=True)
class _Pipeline:
    """Which pipeline runs the arithmetic: ``device`` None is the numpy one."""
    device: object = None
    chunk_bytes: int = 0
    progress: bool = False


def merge_files(
    base: str | os.PathLike | None,
    finetuned: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    granularity: str = "tensor",
    clamp: bool = True,
    exclude: Sequence[str] = (),
    eps: float = EPS,
    backend: str = "auto",
    out_dtype=None,
    compute_dtype="float32",
    shard_size: int | str | None = None,
    force: bool = False,
    durable: bool = False,
    progress: bool = False,
    device: str = "cpu",
    chunk_size: int | str = "256MiB",
    int_tensors: str = "max",
    missing: str = "refuse",
    skip_files: Sequence[str] = (),
    extra_files: Mapping[str, bytes] | None = None,
    config_values: Mapping[str, object] | None = None,
    transform: Callable[[TensorSource], TensorSource] | None = None,
    method="model_stock",
    adapter: bool = False,
) -> MergeReport:
    """Merge checkpoint files into ``out`` (safetensors; ``.pt`` if the name ends so), streaming.

    Inputs may be safetensors files, sharded safetensors (index or folder), torch files or
    ``torch.distributed.checkpoint`` folders (the model's weights, a tensor at a time); the
    options are :func:`modelstock.merge`'s (dtypes as torch dtypes or names, "bfloat16").
    The arithmetic runs on numpy (``modelstock/backends/numpy_ops.py``): torch is imported only
    for torch-format files and distributed checkpoints. ``shard_size`` (bytes, or "2GB") splits a safetensors output into
    shards with an index. The output keeps the base's metadata and records the merge's.
    When the base is a Hugging Face model folder (``config.json`` beside its weights), ``out``
    is a folder laid out like the base's: ``model.safetensors`` (or shards of ``shard_size``,
    default 50GB as transformers' ``save_pretrained``, with ``model.safetensors.index.json``)
    and every other file of the base copied unchanged (but those named in ``skip_files``), so
    ``from_pretrained(out)`` loads it; ``extra_files`` ({name: bytes}) are written there too, and
    ``config_values`` ({key: value}) set in its ``config.json``. ``transform``: each opened
    input passes through it (mergekit's vocabulary resize, ``modelstock/mergekit/vocabulary.py``).
    ``int_tensors``, ``missing`` and ``method``: as :func:`modelstock.merge`'s.

    Fine-tuned inputs may be PEFT LoRA adapter folders (``adapter_config.json``), alone or
    beside full checkpoints; ``base`` may then be None (the base the adapters name). The
    method's statistics come from the adapters' factors (``modelstock/merging/adapters.py``);
    the output is the full model, or with ``adapter=True`` (every fine-tuned input an adapter)
    a LoRA adapter folder of rank sum(r_i) whose update is the merge's.
    Nothing is written unless the whole merge succeeds (files are renamed into place at the
    end); ``durable`` also fsyncs them, so they survive a power cut.

    ``device="cuda"`` (or "cuda:N") runs the arithmetic on that GPU (the Triton kernels, or
    the torch reference with ``backend="torch"`` or ``compute_dtype="float64"``): layers go
    in chunks of about ``chunk_size`` input bytes (or one layer, if larger) through pinned
    host buffers and copy streams, so reading, copying, computing and writing overlap and
    memory stays at two chunks on each side (see ``modelstock/merging/gpu_pipeline.py``).
    """
    start = time.perf_counter()
    if isinstance(finetuned, (str, os.PathLike)):
        raise TypeError("finetuned must be a sequence of paths")
    if base is None and not adapters.any_adapter(finetuned):
        raise TypeError("base may be None only when the fine-tuned inputs are LoRA adapters (they name their base)")
    method = resolve(method, eps=eps, clamp=clamp)
    method.check_count(len(finetuned))
    options = MergeOptions(granularity, clamp, tuple(exclude), eps, backend, out_dtype, compute_dtype, int_tensors,
                           missing, method)
    pipeline = _pipeline(device, backend, chunk_size, progress)
    shard_bytes = parse_size(shard_size, "shard_size")
    if adapter or adapters.any_adapter([base, *finetuned]):  # LoRA inputs: merged from their factors
        if pipeline.device is not None:
            raise InputError("LoRA adapter inputs are merged on the CPU (device='cpu'): their merge reads little "
                             "more than the base")
        if transform is not None:
            raise InputError("resizing the vocabulary (tokenizer_source) is not supported with LoRA adapter inputs")
        return adapters.merge(base, finetuned, out, options, shard_size=shard_bytes, force=force, durable=durable,
                              adapter=adapter, skip_files=skip_files, extra_files=extra_files,
                              config_values=config_values)
    if names_a_folder(out) and not folders.is_model_folder(base):
        raise InputError("ends with a path separator, so it names a folder, but the output is a file (the base is "
                         "no model folder with a config.json): name the file, e.g. "
                         f"{os.path.join(out, 'merged.safetensors')}", str(out))
    # Before any input is opened: the output is none of them, holds none, lies in none.
    check_not_an_input(out, [base, *finetuned])
    inputs = []
    try:
        for path in [base, *finetuned]:
            inputs.append(open_checkpoint(path))
        # ... nor any file they name (an index's shards, symlinks followed).
        check_not_an_input(out, [f for ck in inputs for f in ck.files()])
        if transform is not None:
            inputs[:] = [transform(ck) for ck in inputs]
        if folders.is_model_folder(base):
            size = shard_bytes if shard_bytes is not None else parse_size(folders.DEFAULT_SHARD_SIZE)
            output = _Output(Path(out), size, force, durable)
            return _merge_into_folder(inputs, Path(base), output, options, pipeline, start, skip_files,
                                      extra_files or {}, config_values or {})
        output = _Output(Path(out), shard_bytes, force, durable)
        return _merge_open(inputs, output, options, pipeline, start)
    finally:
        for ck in inputs:
            ck.close()


def _pipeline(device: str, backend: str, chunk_size, progress: bool) -> _Pipeline:
    if device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if backend == "triton" and device == "cpu":
        raise ValueError("backend='triton' merges files on a GPU: pass device='cuda' (the CPU merge runs on numpy)")
    chunk_bytes = parse_size(chunk_size, "chunk_size")
    if not chunk_bytes or chunk_bytes <= 0:
        raise ValueError(f"chunk_size must be a positive size, got {chunk_size!r}")
    if device == "cpu":
        return _Pipeline(None, chunk_bytes, progress)
    from .gpu_pipeline import check_device

    return _Pipeline(check_device(device), chunk_bytes, progress)


def _merge_into_folder(inputs, base: Path, output: _Output, options: MergeOptions, pipeline: _Pipeline, start: float,
                       skip_files, extra_files: Mapping[str, bytes], config_values, run=None) -> MergeReport:
    """The base is a model folder: the output is a folder laid out like it (``io/folders.py``).
    ``run(weights_output)`` writes the weights (default: this module's merge of ``inputs``)."""
    out = output.path
    companions = [p for p in folders.companion_files(base) if p.name not in set(skip_files)]
    config = folders.updated_config(base / "config.json", options.out_dtype, config_values)
    if config is not None:  # the config says the new dtype and values (a model folder has one)
        extra_files = {"config.json": config, **extra_files}
        companions = [p for p in companions if p.name != "config.json"]
    folders.check_folder(out, companions, output.force, extra_names=extra_files)
    remove_stale_temporaries(out)  # private folders of merges into ``out`` that were killed
    remove_stale(out, AtomicFolder.INSIDE)
    # Built out of sight and put in place at the end, under the output's lock (io/atomic.py)
    staging = AtomicFolder(out, output.durable)
    try:
        weights = _Output(staging.path / folders.WEIGHTS_NAME, output.shard_size, output.force, output.durable)
        report = run(weights) if run else _merge_open(inputs, weights, options, pipeline, start)
        folders.copy_companions(companions, staging.path, output.durable)
        folders.write_files(staging.path, extra_files, output.durable)
        placed = staging.commit(output.force, folders.replaced_files)
    except BaseException:
        staging.abort()
        raise
    weights_names = {Path(p).name for p in report.output}
    report.output = [str(p) for p in sorted(placed, key=lambda p: p.name not in weights_names)]
    report.seconds = time.perf_counter() - start
    return report


def _nothing_merged(metas, sources, missing: str) -> str:
    """Why no tensor would be merged, saying what each input holds (a PEFT adapter, typically)."""
    parts = []
    for meta, source in zip(metas, sources):
        first = next(iter(meta), None)
        what = f"{source}: {len(meta)} tensor(s)" + (f", e.g. '{first}'" if first else "")
        folder = Path(source) if os.path.isdir(source) else Path(source).parent
        if (folder / "adapter_config.json").is_file() or any(".lora_" in n for n in meta):
            what += " (a PEFT adapter's tensors: give the adapter's folder, with its adapter_config.json, and " \
                    "it is merged from its factors)"
        parts.append(what)
    cause = "the inputs share no floating-point tensor" + (
        " (--missing base would only copy the base)" if missing == "base" else "")
    return f"nothing to merge: {cause}; " + "; ".join(parts)


def merge_metadata(options: MergeOptions, sources: Sequence[str]) -> str:
    """What an output's metadata records of the merge (the method's own parameters after the
    count and granularity: Model Stock's clamp and eps where they always were)."""
    described = options.method.describe()
    return json.dumps({"method": described["method"], "n": len(sources) - 1, "granularity": options.granularity,
                       **{k: v for k, v in described.items() if k != "method"}, "exclude": list(options.exclude),
                       "base": os.path.basename(sources[0]), "finetuned": [os.path.basename(s) for s in sources[1:]]})


def _merge_open(inputs, output: _Output, options: MergeOptions, pipeline: _Pipeline, start: float) -> MergeReport:
    out = output.path
    sources = [ck.path for ck in inputs]
    metas = [ck.tensors() for ck in inputs]
    layers = plan_layers(metas, sources, granularity=options.granularity, exclude=options.exclude,
                         missing=options.missing, method=options.method)
    if not any(layer.kind in ("merge", "average") for layer in layers):
        raise InputError(_nothing_merged(metas, sources, options.missing))
    warn_unmatched(layers, options.exclude)
    entries = [(layer.name, layer.out_dtype(options.out_dtype), layer.shape) for layer in layers]
    input_files = [f for ck in inputs for f in ck.files()]
    for p in output_paths(out, entries, output.shard_size):
        check_output_file(p, input_files, output.force)
    remove_stale_temporaries(out)

    n = len(inputs) - 1
    report = MergeReport(n=n, granularity=options.granularity, clamp=options.clamp, eps=options.eps, inputs=sources,
                         int_tensors=options.int_tensors, missing=options.missing,
                         dropped=dropped_tensors(metas, sources), method=options.method.name)
    metadata = dict(inputs[0].metadata)
    metadata.setdefault("format", "pt")  # what save_pretrained writes; transformers 4 refuses files without it
    metadata["modelstock"] = merge_metadata(options, sources)

    report.bytes_read = sum(layer.nbytes_in for layer in layers)
    report.bytes_written = sum(nbytes(d, s) for _, d, s in entries)
    bar = None
    if pipeline.progress:
        from tqdm import tqdm

        bar = tqdm(total=report.bytes_read, unit="B", unit_scale=True, desc="merging", leave=False)
    try:
        with InputGuard(input_files) as guard, \
                CheckpointWriter(out, entries, metadata, output.shard_size, output.durable) as writer:
            with cpu_pipeline.Writer(writer) as write:
                if pipeline.device is None:
                    cpu_pipeline.stream(inputs, layers, entries, write, report, bar, options, guard.check)
                else:
                    from . import gpu_pipeline

                    gpu_pipeline.stream(inputs, layers, entries, write, report, bar, options, device=pipeline.device,
                                        chunk_bytes=pipeline.chunk_bytes, check=guard.check)
            guard.check()  # every layer was read before any other process could change an input
            report.output = [str(p) for p in writer.commit(replace=output.force)]
    finally:
        if bar is not None:
            bar.close()
    report.warn_ratio_outside()
    report.seconds = time.perf_counter() - start
    return report
