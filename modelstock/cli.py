"""``modelstock`` command line: argument parsing, progress and errors around merge_files."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

# --dtype: the short names and mergekit's (modelstock/dtypes.py resolves both)
DTYPE_CHOICES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
EXIT_BAD_INPUT = 2


def _size(text: str) -> int:
    """A positive size for argparse, which names the option in its error."""
    from .sizes import parse_size

    try:
        size = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MiB or 1000000") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return size


def _parser() -> argparse.ArgumentParser:
    from msdp_kernels._version import __version__

    p = argparse.ArgumentParser(prog="modelstock", description="Model Stock checkpoint merging (ECCV 2024).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "merge", help="merge a pre-trained checkpoint with fine-tuned ones",
        description="Merge BASE (pre-trained) with two or more checkpoints fine-tuned from it. "
                    "Checkpoints: .safetensors, a sharded *.safetensors.index.json (or its folder), "
                    ".pt/.pth/.bin (loaded with weights_only=True), a torch.distributed.checkpoint "
                    "folder (.metadata and *.distcp; the model's weights are read).")
    m.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="BASE FT1 FT2 [FT...]: paths, or Hugging Face hub ids (org/name, org/name@revision: from "
                   "the cache, downloaded when online; a local path wins); a fine-tuned model may be a PEFT LoRA "
                   "adapter folder (adapter_config.json), and BASE may then be left out (the one the adapters name)")
    m.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file: .safetensors (streamed) or .pt; a folder when BASE is a Hugging Face "
                   "model folder (config.json beside its weights): the merged weights and the base's other "
                   "files, loadable with from_pretrained")
    m.add_argument("--method", choices=("model_stock", "uniform", "wise_ft"), default="model_stock",
                   help="model_stock (default): the paper's ratio per layer; uniform: the fine-tuned models' "
                   "average; wise_ft: BASE and one fine-tuned model interpolated with --alpha")
    m.add_argument("--alpha", type=float, metavar="A",
                   help="with --method wise_ft: BASE + A (FT - BASE) (default 0.5)")
    m.add_argument("--adapter", action="store_true",
                   help="with LoRA adapters as every fine-tuned input: write the merge as one LoRA adapter "
                   "folder (rank the sum of theirs) instead of the full model")
    m.add_argument("--granularity", choices=("tensor", "row"), default="tensor",
                   help="one ratio per tensor (paper) or per output row (dim 0)")
    m.add_argument("--no-clamp", action="store_true",
                   help="the authors' exact formula: cos clamped to [-1, 1], so t may leave [0, 1]")
    m.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="tensors matching GLOB get the plain average of the fine-tuned models (repeatable)")
    m.add_argument("--int-tensors", choices=("max", "base", "refuse"), default="max",
                   help="non-float tensors that differ between the models (BatchNorm's num_batches_tracked "
                   "after any fine-tune in train mode): the largest value (default), the base's, or an error")
    m.add_argument("--missing", choices=("refuse", "base"), default="refuse",
                   help="a tensor some fine-tuned models lack: an error (default), or the base's, as mergekit "
                   "does (one the base lacks is then left out)")
    m.add_argument("--dtype", choices=DTYPE_CHOICES, metavar="{fp32,fp16,bf16}",
                   help="output dtype, also as float32, float16, bfloat16 (default: the base's, per tensor)")
    m.add_argument("--device", default="cpu", metavar="{cpu,cuda,cuda:N}",
                   help="where the arithmetic runs: cpu (numpy, no torch needed) or a GPU (Triton kernels, "
                   "chunks streamed through pinned buffers)")
    m.add_argument("--chunk-size", default="256MiB", metavar="SIZE", type=_size,
                   help="with --device cuda: input bytes per chunk; two chunks are in flight on each side")
    m.add_argument("--shard-size", metavar="SIZE", type=_size, help="split the safetensors output into shards of at most "
                   "SIZE (e.g. 2GB, 500MiB) with a Hugging Face index (folder outputs: default 50GB, as "
                   "transformers' save_pretrained)")
    m.add_argument("--report", metavar="FILE.json", help="write the per-layer figures as JSON")
    m.add_argument("--plot", metavar="FILE.png", help="draw the per-layer angle and ratio")
    m.add_argument("--force", action="store_true", help="replace existing output files")
    m.add_argument("--fsync", action="store_true", help="fsync the output before renaming it into place "
                   "(survives a power cut, not only a failing process)")
    m.add_argument("--quiet", action="store_true", help="no progress bar, no summary")

    k = sub.add_parser(
        "mergekit-yaml", help="run a mergekit config (merge_method: model_stock) as mergekit-yaml would",
        description="Read mergekit's YAML for merge_method: model_stock (base_model, models, parameters: "
                    "filter_wise, dtype, out_dtype; local paths or hub ids org/name[@revision]) and write "
                    "what mergekit-yaml writes: a folder with the merged weights, the base's config and "
                    "tokenizer, a README.md and the config.")
    k.add_argument("config", metavar="CONFIG")
    k.add_argument("out_path", metavar="OUT_PATH")
    k.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False,
                   help="run the arithmetic on the GPU (the Triton kernels)")
    k.add_argument("--device", help="where the arithmetic runs: cpu, cuda or cuda:N (overrides --cuda)")
    k.add_argument("--gpu-rich", action="store_true", help="mergekit's alias for --cuda and GPU residency: --cuda")
    k.add_argument("-j", "--num-threads", type=int, metavar="N", help="threads for the CPU arithmetic")
    k.add_argument("--out-shard-size", default="5B", metavar="SIZE",
                   help="bytes per output shard, mergekit's notation (5B = 5 billion, 500M, 200K)")
    k.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base's tokenizer files (default: yes)")
    k.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md describing the merge (default: yes)")
    k.add_argument("--force", action="store_true", help="replace existing output files")
    k.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False)
    for switch in MERGEKIT_IGNORED_SWITCHES:
        k.add_argument(f"--{switch}", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    for option in MERGEKIT_IGNORED_OPTIONS:
        k.add_argument(option, help=argparse.SUPPRESS)
    k.add_argument("-v", action="count", help=argparse.SUPPRESS)
    k.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    return p


# mergekit-yaml 0.1.x's flags (its --help) that change nothing here: accepted, each said to be
# ignored (switches in both forms, --x and --no-x)
MERGEKIT_IGNORED_SWITCHES = ("allow-crimes", "unsafe-truncate-embeddings", "trust-remote-code", "low-cpu-memory",
                             "lazy-unpickle", "read-to-gpu", "multi-gpu", "async-write", "clone-tensors",
                             "safe-serialization")
MERGEKIT_IGNORED_OPTIONS = ("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--random-seed",
                            "--write-threads")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's time limit or preemption), raised where Ctrl-C would be, so
    that it unwinds the same way: every temporary file removed, nothing written."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"modelstock: error: {message}", file=sys.stderr)
    return code


def _single_threaded_blas() -> None:
    """The merge runs its own threads (backends/numpy_ops.py); OpenBLAS's pool, started when numpy loads,
    only spins beside them: ~0.1 s of CPU in a 0.7 s ViT-B-32 merge on 2 cores (measured).
    Effective only before numpy is first imported (so not when main() runs inside a process
    that has it); a value the user set wins."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


_show_warning = warnings.showwarning


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .errors import MergeWarning

    if issubclass(category, MergeWarning):
        print(f"modelstock: warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    from .errors import MergeWarning
    from .extras import MissingExtra

    args = _parser().parse_args(argv)
    _single_threaded_blas()
    with warnings.catch_warnings():  # the merge's warnings as one line each, no source lines
        warnings.simplefilter("always", MergeWarning)
        warnings.showwarning = _print_warning
        try:
            return _mergekit_yaml(args) if args.command == "mergekit-yaml" else _merge(args)
        except MissingExtra as e:  # an optional dependency: one line with the pip install
            return _fail(str(e))


def _merge(args) -> int:
    if args.alpha is not None and args.method != "wise_ft":
        return _fail("--alpha is WiSE-FT's: use it with --method wise_ft")
    if args.plot and args.method != "model_stock":
        return _fail("--plot draws Model Stock's angles and ratios: use it with --method model_stock")
    from .io import hub
    from .io.adapters import is_adapter
    from .methods import resolve

    try:  # hub ids become their snapshot folders; a path stays as typed (errors quote it)
        args.checkpoints = [c if hub.parse(c) is None or os.path.exists(c) else str(hub.resolve(c))
                            for c in args.checkpoints]
    except ValueError as e:
        return _fail(str(e))
    base, finetuned = args.checkpoints[0], args.checkpoints[1:]
    if is_adapter(base):  # adapters only: the base is the one they name
        base, finetuned = None, args.checkpoints
    if args.method == "model_stock" and len(finetuned) < 2:
        return _fail(f"needs at least two fine-tuned checkpoints (got {len(finetuned)}): "
                     "modelstock merge BASE FT1 FT2 [FT...] -o OUT")
    try:  # every output path is checked before any input is read
        method = resolve(args.method, clamp=not args.no_clamp, alpha=args.alpha)
        method.check_count(len(finetuned))
        extras = _reserve_extra_outputs(args, args.checkpoints)
    except ValueError as e:
        return _fail(str(e))
    # the handler can only be installed from the main thread (main() may run elsewhere)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return _merge_and_report(args, extras, base, finetuned, method)
    finally:
        for _, f in extras:  # nothing once put in place; else the report's temporary
            f.abort()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _merge_and_report(args, extras, base, finetuned, method) -> int:
    from .io.commit import committing
    from .merging.files import merge_files  # numpy only: torch is imported just for torch-format files

    try:
        report = merge_files(
            base, finetuned, args.output, adapter=args.adapter,
            granularity=args.granularity, clamp=not args.no_clamp, exclude=args.exclude,
            out_dtype=args.dtype, int_tensors=args.int_tensors, missing=args.missing,
            shard_size=args.shard_size, force=args.force, durable=args.fsync, device=args.device,
            chunk_size=args.chunk_size, progress=not args.quiet and sys.stderr.isatty(), method=method)
    except ValueError as e:  # a bad input (InputError) or option value (shard size, granularity)
        return _fail(str(e))
    except OSError as e:  # disk full, permissions: nothing was left behind
        return _fail(_os_error(e, args.output))
    except Terminated as e:
        return _fail(_stopped("terminated (SIGTERM)", e, args.output), 128 + signal.SIGTERM)
    except KeyboardInterrupt as e:
        return _fail(_stopped("interrupted", e, args.output), 130)

    for option, f in extras:
        try:
            (report.write_json if option == "--report" else report.plot)(f.f)
            f.finish()
            with committing(f.target):
                f.commit(args.force)
        except (Exception, KeyboardInterrupt) as e:
            f.abort()
            if isinstance(e, Terminated):
                code, why = 128 + signal.SIGTERM, "terminated (SIGTERM)"
            elif isinstance(e, KeyboardInterrupt):
                code, why = 130, "interrupted"
            else:
                code, why = EXIT_BAD_INPUT, _os_error(e, f.target) if isinstance(e, OSError) else str(e)
            return _fail(f"the merge is in place ({args.output}), but {option} {f.target} was not written: {why}", code)
    if not args.quiet:
        print(report.summary())
    return 0


def _os_error(e: OSError, where) -> str:
    return f"{e.filename or where}: {e.strerror or e}"


def _stopped(what: str, e: BaseException, output) -> str:
    if getattr(e, "committed", False):  # the signal came while the output was put in place
        return f"{what} once the output was in place ({output}); no report or plot written"
    return f"{what}; nothing was written"


def _reserve_extra_outputs(args, inputs) -> list:
    """--report and --plot: clear of the inputs and the output, (for the plot) matplotlib
    importable, and writable where they point, proved by creating each one's temporary now
    (written and renamed once the merge is in place), all before the merge runs. Returns
    [(option, AtomicFile)]."""
    from .errors import InputError
    from .extras import require
    from .io.atomic import AtomicFile
    from .io.outputs import check_output_file

    extras = [(o, e) for o, e in (("--report", args.report), ("--plot", args.plot)) if e]
    for _, extra in extras:
        check_output_file(extra, inputs, args.force)
    outputs = [os.path.realpath(args.output)] + [os.path.realpath(e) for _, e in extras]
    if len(set(outputs)) < len(outputs):
        raise InputError("--output, --report and --plot must name different files", extras[0][1])
    if args.plot:
        require("matplotlib", "--plot")
    reserved = []
    try:
        for option, extra in extras:
            try:
                reserved.append((option, AtomicFile(Path(extra))))
            except OSError as e:
                raise InputError(f"cannot be written there ({e.strerror or e})", extra) from None
    except BaseException:
        for _, f in reserved:
            f.abort()
        raise
    return reserved


def _mergekit_yaml(args) -> int:
    from . import mergekit

    for switch in MERGEKIT_IGNORED_SWITCHES:
        value = getattr(args, switch.replace("-", "_"))
        if value is not None:
            why = "the output is safetensors anyway" if switch == "safe-serialization" and not value else \
                "means nothing here"
            print(f"modelstock: --{'' if value else 'no-'}{switch} {why}; ignored", file=sys.stderr)
    for flag in (*MERGEKIT_IGNORED_OPTIONS, "-v", "--verbose"):
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) not in (None, False):
            print(f"modelstock: {flag} means nothing here; ignored", file=sys.stderr)
    if args.num_threads is not None:  # the CPU arithmetic's thread pool (backends/numpy_ops.py)
        if args.num_threads < 1:
            return _fail(f"--num-threads must be positive, got {args.num_threads}")
        os.environ["MODELSTOCK_THREADS"] = str(args.num_threads)
    device = args.device or ("cuda" if args.cuda or args.gpu_rich else "cpu")
    out = Path(args.out_path)
    try:
        report = mergekit.run_config(
            args.config, out, device=device, out_shard_size=args.out_shard_size, copy_tokenizer=args.copy_tokenizer,
            write_model_card=args.write_model_card, force=args.force, progress=not args.quiet and sys.stderr.isatty(),
            notice=lambda note: print(f"modelstock: {note}", file=sys.stderr))
    except ValueError as e:  # InputError included
        return _fail(str(e))
    except OSError as e:
        return _fail(_os_error(e, out))
    if not args.quiet:
        print(report.summary())
    return 0
