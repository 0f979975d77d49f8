"""The private torch names dynopool needs for torch.compile and export, in one guarded place.

Each is looked up once, when dynopool is imported (Dynamo cannot trace an import, and these are
called inside traced code; dynopool's import has loaded torch._dynamo already, so this adds
~1 ms). A torch that lacks one still imports dynopool; the feature that needs it then fails in
one line naming it and the torch version. Written against torch 2.14; both names are older
than 2.11.
"""
from __future__ import annotations

import torch


def _private(what: str, get):
    try:
        return get()
    except (ImportError, AttributeError):
        def missing(*args, **kwargs):
            raise RuntimeError(f"dynopool: this torch ({torch.__version__}) lacks {what}, which dynopool needs "
                               "here; use torch >= 2.11")

        return missing


def _comptime():
    from torch._dynamo.comptime import comptime

    return comptime


_COMPTIME = _private("torch._dynamo.comptime", _comptime)


def refuse_symbolic_size(h, w, message: str) -> None:
    """Raise ``ValueError(message)`` where an export traces an input whose H or W is symbolic
    (``dynamic_shapes`` / ``Dim``), at export time. Non-strict export (the default, and the ONNX
    exporter's first try) sees the SymInts themselves; strict export runs Dynamo, which shows
    a dynamic size as an int to the traced code, so the question is asked of Dynamo at trace
    time (``comptime``: the one hook into its view of a local)."""
    if not torch.compiler.is_exporting():
        return
    if not torch.compiler.is_dynamo_compiling():
        if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
            raise ValueError(message)
        return
    _COMPTIME(_refuse_symbolic_locals)


def _refuse_symbolic_locals(ctx) -> None:
    """At Dynamo's trace time, in ``refuse_symbolic_size``'s frame (a comptime callback may
    close over nothing)."""
    if not (ctx.get_local("h").is_python_constant() and ctx.get_local("w").is_python_constant()):
        raise ValueError(ctx.get_local("message").as_python_constant())


def mark_dynamic_sizes(t, dims) -> None:
    """torch._dynamo.maybe_mark_dynamic: these dims of ``t`` are traced as symbols from the first
    compile on (not after a recompile), and sizes 0/1 are specialized quietly."""
    _MAYBE_MARK_DYNAMIC(t, dims)


def _maybe_mark_dynamic():
    from torch._dynamo import maybe_mark_dynamic

    return maybe_mark_dynamic


_MAYBE_MARK_DYNAMIC = _private("torch._dynamo.maybe_mark_dynamic", _maybe_mark_dynamic)
