"""merge_files(device="cuda"): the chunked pipeline (pinned buffers, copy streams, kernels) against
the fp64 formula and the CPU file merge. Without a GPU the same pipeline runs on CPU tensors with
the Triton kernels under the interpreter (check_device is pointed at the CPU); on a GPU machine
these tests run it on CUDA."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import modelstock
from modelstock import InputError
from modelstock.merging import gpu_pipeline as device_files
from modelstock.plan import plan_layers

from .helpers import assert_within, merge_tolerance, spec_merge_fp64
from .test_files import save_models
from .test_merge import make_models

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _device(monkeypatch):
    if not CUDA:
        monkeypatch.setattr(device_files, "check_device", lambda device: torch.device("cpu"))


def merge_on_device(paths, out, **options):
    return modelstock.merge_files(paths[0], paths[1:], out, device="cuda", backend="triton", **options)


def check_output(got, base, fts, *, granularity="tensor", out_dtype=None, exclude=()):
    for k, w0 in base.items():
        if not w0.is_floating_point():
            assert torch.equal(got[k], w0), k
            continue
        dtype = out_dtype or w0.dtype
        assert got[k].dtype == dtype and got[k].shape == w0.shape, k
        if k in exclude:
            ref, t = sum(f[k].double() for f in fts) / len(fts), None
        else:
            ref, t = spec_merge_fp64(w0, [f[k] for f in fts], granularity=granularity)
        assert_within(got[k], ref, merge_tolerance(ref, w0, [f[k] for f in fts], dtype, t=t), k)


@pytest.mark.parametrize("chunk_size", [600, "1MiB"], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("dtype,granularity,n", [(torch.float32, "tensor", 2), (torch.bfloat16, "row", 3),
                                                 (torch.float16, "tensor", 3)])
def test_device_merge_matches_formula_and_cpu_merge(tmp_path, dtype, granularity, n, chunk_size):
    # chunk_size=600 bytes: most layers alone in a chunk, the embedding larger than a chunk, the
    # small ones grouped; both buffers of each side are reused many times.
    base, fts = make_models(n, dtype)
    base["bn.num_batches_tracked"] = torch.tensor(5)
    for f in fts:
        f["bn.num_batches_tracked"] = torch.tensor(5)
    paths = save_models(tmp_path, base, fts)
    report = merge_on_device(paths, tmp_path / "gpu.safetensors", granularity=granularity, chunk_size=chunk_size,
                             exclude=["ln.*"])
    cpu = modelstock.merge_files(paths[0], paths[1:], tmp_path / "cpu.safetensors", granularity=granularity,
                                 exclude=["ln.*"])
    got = load_file(tmp_path / "gpu.safetensors")
    check_output(got, base, fts, granularity=granularity, exclude=["ln.weight"])
    assert [s.name for s in report.layers] == [s.name for s in cpu.layers]
    for a, b in zip(report.layers, cpu.layers):
        assert a.kind == b.kind, a.name
        if a.t_min is not None:
            assert abs(a.t_min - b.t_min) < 1e-5 and abs(a.t_max - b.t_max) < 1e-5, a.name
    assert report.bytes_read == cpu.bytes_read and report.bytes_written == cpu.bytes_written


@pytest.mark.parametrize("piece", [7, 100])
def test_reads_in_small_pieces_from_many_threads_give_the_same_bytes(tmp_path, monkeypatch, piece):
    # Pieces that split every tensor (at odd byte offsets too) and land out of order: the
    # result must be bitwise the one read whole, for safetensors, sharded and torch inputs.
    base, fts = make_models(2)
    paths = save_models(tmp_path, base, fts)
    torch.save(fts[1], tmp_path / "ft1.pt")
    paths = [paths[0], paths[1], tmp_path / "ft1.pt"]
    whole = load_file(merge_on_device(paths, tmp_path / "whole.safetensors").output[0])
    monkeypatch.setattr(device_files, "_READ_PIECE", piece)
    monkeypatch.setattr(device_files, "_READ_THREADS", 4)
    pieces = load_file(merge_on_device(paths, tmp_path / "pieces.safetensors", chunk_size=900).output[0])
    assert whole.keys() == pieces.keys() and all(torch.equal(whole[k], pieces[k]) for k in whole)
    check_output(pieces, base, fts)


def test_out_dtype_torch_inputs_and_sharded_output(tmp_path):
    base, fts = make_models(2)
    save_file(base, tmp_path / "base.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in fts[0].items()}}, tmp_path / "ft0.pt")
    torch.save(fts[1], tmp_path / "ft1.bin")
    paths = [tmp_path / "base.safetensors", tmp_path / "ft0.pt", tmp_path / "ft1.bin"]
    report = merge_on_device(paths, tmp_path / "m.safetensors", out_dtype=torch.bfloat16, shard_size="3KB",
                             chunk_size=2000)
    assert len(report.output) > 2
    got = {}
    for p in report.output[:-1]:
        got.update(load_file(p))
    check_output(got, base, fts, out_dtype=torch.bfloat16)


def test_nan_input_is_named_and_nothing_is_written(tmp_path):
    base, fts = make_models(2)
    fts[1]["embed"][3, 1] = float("nan")
    paths = save_models(tmp_path, base, fts)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError) as e:
        merge_on_device(paths, tmp_path / "out.safetensors", chunk_size=600)
    assert e.value.source == str(paths[2]) and e.value.tensor == "embed"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_chunks_cover_the_layers_in_order_within_the_size():
    base, fts = make_models(2)
    sds = [{k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sd.items()} for sd in [base, *fts]]
    layers = plan_layers(sds, ["b", "f1", "f2"])
    chunks = device_files.plan_chunks(layers, [layer.dtypes[0] for layer in layers], 600)
    assert [i for c in chunks for i in c.layers] == list(range(len(layers)))
    for c in chunks:
        assert c.in_bytes <= 600 or len(c.layers) == 1
        for spans in c.inputs:
            assert all(offset % 64 == 0 and offset + size <= c.in_bytes for offset, size in spans)
        assert all(offset % 64 == 0 for offset, _ in c.outputs)


def test_bad_device_options(tmp_path, monkeypatch):
    base, fts = make_models(2)
    paths = save_models(tmp_path, base, fts)
    with pytest.raises(ValueError, match="device must be"):
        modelstock.merge_files(paths[0], paths[1:], tmp_path / "o.safetensors", device="tpu")
    with pytest.raises(ValueError, match="device='cuda'"):
        modelstock.merge_files(paths[0], paths[1:], tmp_path / "o.safetensors", backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        merge_on_device(paths, tmp_path / "o.safetensors", chunk_size=0)
    monkeypatch.undo()  # the real check_device
    if not CUDA:
        with pytest.raises(InputError, match="no CUDA device"):
            merge_on_device(paths, tmp_path / "o.safetensors")


def test_gpu_files_benchmark_script_writes_its_record(tmp_path):
    # the script a lent GPU runs (benchmarks/gpu_check.sh), on a tiny model here
    from benchmarks import gpu_files

    shapes = {"w": (64, 32), "b": (64,)}
    record = gpu_files.run({"tiny": shapes}, tmp_path / "results", tmp_path / "work", chunk_size="8KiB")
    assert record["suite"] == "merge_files" and [c["cache"] for c in record["cases"]] == ["cold", "warm"]
    for case in record["cases"]:
        assert set(case["seconds"]) == {"plain_read", "cpu", "cuda"} and case["bytes_read"] > 3 * 64 * 32 * 4
    assert len(list((tmp_path / "results").glob("gpu-merge_files-*.json"))) == 1
    assert not (tmp_path / "work" / "tiny").exists()
