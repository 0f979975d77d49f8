"""Compile the Triton kernels for an H100/H200 (sm_90) without a GPU: Triton's front end, LLVM
and ptxas run here, so errors only a GPU compile meets (the interpreter runs Python) show up in
CI. Integer arguments equal to 1 are compiled as the constexprs Triton makes of them. For the
merge kernels it also checks the premise of their 2-byte setting: the chunk loop's loads become
asynchronous copies (msdp_kernels/merge.py's docstring).
Run as a script (tests/test_compile_for_gpu.py does, without TRITON_INTERPRET)."""
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from msdp_kernels import dynopool as kd  # noqa: E402
from msdp_kernels import merge as km  # noqa: E402

I32 = "i32"


def strides(*prefixes):
    return {f"{p}_{a}": I32 for p in prefixes for a in "nchw"}


SIZES = {"C": I32, "H": I32, "W": I32, "H_out": I32, "W_out": I32}


def kernels(dt, cl):
    return [
        (kd._coordinates_kernel, {"alpha_ptr": "*fp32", "delta_ptr": "*fp32", "tab": "*fp32", "rng": "*i32",
                                  "H": I32, "W": I32, "H_out": I32, "W_out": I32},
         {"BLOCK": 128, "BLOCK_S": 64, "BLOCK_Q": 64}),
        (kd._forward_kernel, {"x": f"*{dt}", "out": f"*{dt}", "win": "*i8", "tab": "*fp32", **SIZES,
                              **strides("sx", "so")}, {"BLOCK_J": 16, "BLOCK_C": 64, "CL": cl}),
        (kd._coordinate_grads_kernel, {"x": f"*{dt}", "grad": f"*{dt}", "win": "*i8", "tab": "*fp32",
                                       "partials": "*fp32", **SIZES, **strides("sx", "sg", "so")},
         {"ROWS": 8, "BLOCK_J": 16, "BLOCK_C": 64, "CL": cl}),
        (kd._input_grad_kernel, {"grad": f"*{dt}", "win": "*i8", "tab": "*fp32", "rng": "*i32", "gx": f"*{dt}",
                                 **SIZES, **strides("sg", "so", "sx")}, {"BLOCK_W": 16, "BLOCK_C": 64, "CL": cl}),
    ]


def compile_for_sm90(fn, signature, constexprs, ones):
    sig = dict(signature)
    values = dict(constexprs, **{k: 1 for k in ones if k in sig})
    sig.update({k: "constexpr" for k in values})
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(names) if sig[k].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in values.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def merge_kernels(dt):
    chunks, stages = km.pipeline(2 if dt in ("bf16", "fp16") else 4)
    const = {"NPAD": 2, "ALIGNED": True, "BLOCK": km.block_size(2), "CHUNKS": chunks, "STAGES": stages}
    return [
        (km._gram_tiles_kernel, {"base": f"*{dt}", "offs_tab": "*i64", "tiles": "*i64", "partials": "*fp32",
                                 "n": I32, "stride": I32}, const),
        (km._merge_tiles_kernel, {"base": f"*{dt}", "offs_tab": "*i64", "out": f"*{dt}", "out_offs": "*i64",
                                  "tiles": "*i64", "tile_seg": "*i64", "t": "*fp32", "u_tab": "*fp32",
                                  "ok": "*i32", "n": I32, "stride": I32}, const),
        (km._reduce_segments_kernel, {"partials": "*fp32", "seg_tiles": "*i64", "gram": "*fp64"},
         {"NN": 4, "CHUNK": 64}),
    ]


if __name__ == "__main__":
    for dt in ("fp32", "bf16"):
        for fn, signature, constexprs in merge_kernels(dt):
            k = compile_for_sm90(fn, signature, constexprs, ())
            copies = k.asm["ttgir"].count("async_copy_global_to_local")
            if "CHUNKS" in constexprs:
                assert (copies > 0) == (constexprs["CHUNKS"] > 1 and constexprs["STAGES"] > 1), (fn.__name__, dt, copies)
            print("compiled", fn.__name__, dt, f"async copies {copies}")
    # sizes and strides of 1: one output cell, one channel, unit column strides (NCHW) or unit
    # channel strides (channels_last); both tile orientations
    for dt, cl, ones in [("fp32", True, ()), ("bf16", False, ("H_out", "W_out", "C", "sx_w", "so_w", "sg_w")),
                         ("fp16", True, ("sx_c", "so_c"))]:
        for fn, signature, constexprs in kernels(dt, cl):
            compile_for_sm90(fn, signature, constexprs, ones)
            print("compiled", fn.__name__, dt, ones)
