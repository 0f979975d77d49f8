"""Model Stock on torch.distributed.checkpoint folders, saved by two gloo processes as trainers
save them: FSDP2 models with their optimizer ({"model", "optim"}, and torchtitan's layout with
the model's keys at the top level), and a DDP model's plain state dict. Merged as base and as
fine-tuned, mixed with safetensors, through merge_files and the command line; the result
against the fp64 formula on the gathered full state dicts, and bit for bit against the same
merge of those state dicts saved as safetensors."""
import os
import pickle
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import modelstock
from modelstock import InputError
from modelstock.cli import main
from modelstock.io import open_checkpoint
from modelstock.io.distributed import DistributedCheckpoint
from modelstock.merging import gpu_pipeline

from .test_merge import check_against_spec

STEPS = 3


def net():
    # a real block (attention, LayerNorms, feed-forward) between two Linears; the head's 3 rows
    # do not divide 2 (uneven shards)
    return nn.Sequential(nn.Linear(5, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                         nn.Linear(8, 3))


def train(model, seed, rank):
    """A few AdamW steps on this rank's own data; returns the optimizer."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed * 100 + rank)
    for _ in range(STEPS):
        opt.zero_grad()
        model(torch.randn(4, 6, 5, generator=g)).square().mean().backward()
        opt.step()
    return opt


def full_state(sd):
    """Gathered on every rank (a collective for each sharded tensor)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in sd.items()}


def _save_ranks(rank, world, init_file, folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        base = net()
        twins = {"base": base.state_dict()}
        dcp.save(base.state_dict(), checkpoint_id=f"{folder}/base")  # plain: each rank holds it all

        def sharded():
            m = net()
            m.load_state_dict(twins["base"])
            for layer in m:
                fully_shard(layer, mesh=mesh)
            return fully_shard(m, mesh=mesh)

        # FSDP2 as a training script saves it: {"model": ..., "optim": ...}
        m = sharded()
        optim = get_optimizer_state_dict(m, train(m, 1, rank))
        msd = get_model_state_dict(m)
        dcp.save({"model": msd, "optim": optim}, checkpoint_id=f"{folder}/ft_nested")
        twins["ft_nested"] = full_state(msd)

        # torchtitan's layout: the model's keys at the top level beside the trainer's state
        m = sharded()
        flat = StateDictOptions(flatten_optimizer_state_dict=True)  # as torchtitan saves it
        optim = get_optimizer_state_dict(m, train(m, 2, rank), options=flat)
        msd = get_model_state_dict(m)
        trainer = {"optimizer": optim, "lr_scheduler": {"last_epoch": STEPS, "base_lrs": [1e-2]},
                   "dataloader": {"rank": rank, "epoch": 0},
                   "train_state": {"step": torch.tensor(STEPS), "global_avg_losses": [0.5, 0.4]}}
        dcp.save({**msd, **trainer}, checkpoint_id=f"{folder}/ft_titan")
        twins["ft_titan"] = full_state(msd)
        dcp.save(trainer, checkpoint_id=f"{folder}/no_model")

        # DDP: the same weights on every rank, named `module.*`, a plain state dict
        m = net()
        m.load_state_dict(twins["base"])
        ddp = DistributedDataParallel(m)
        train(ddp, 3, rank)
        dcp.save(ddp.state_dict(), checkpoint_id=f"{folder}/ft_ddp")
        twins["ft_ddp"] = {k: v.detach().clone() for k, v in m.state_dict().items()}

        if rank == 0:
            for name, sd in twins.items():
                save_file({k: v.contiguous() for k, v in sd.items()}, f"{folder}/{name}.safetensors")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The DCP folders and, for each, its gathered state dict as a safetensors file."""
    folder = tmp_path_factory.mktemp("dcp")
    mp.spawn(_save_ranks, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return folder


def twin(saved, name):
    return saved / f"{name}.safetensors"


def full(saved, name):
    """A gathered state dict, in the model's order (a safetensors file keeps its own)."""
    sd = load_file(twin(saved, name))
    return {k: sd[k] for k in net().state_dict()}


def check_merge(out, saved, names):
    """The merged file against the fp64 formula on the gathered state dicts, and bit for bit
    against the same merge of those state dicts as safetensors files."""
    got = load_file(out)
    base = full(saved, names[0])
    assert sorted(got) == sorted(base)
    check_against_spec({k: got[k] for k in base}, base, [full(saved, n) for n in names[1:]])
    same = out.with_name("twins.safetensors")
    modelstock.merge_files(twin(saved, names[0]), [twin(saved, n) for n in names[1:]], same)
    want = load_file(same)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_model_is_read_and_nothing_else(saved):
    order = list(net().state_dict())
    for name in ("ft_nested", "ft_titan", "ft_ddp", "base"):
        with open_checkpoint(saved / name) as ck:
            assert isinstance(ck, DistributedCheckpoint)
            prefix = "module." if name == "ft_ddp" else ""
            # the state dict's order, the names without the namespace, no optimizer entry
            assert list(ck.tensors()) == [prefix + k for k in order], name
            truth = full(saved, name)
            for k in order:
                assert torch.equal(torch.from_numpy(ck.read(prefix + k)), truth[k]), (name, k)
            files = {os.path.basename(f) for f in ck.files()}
            assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}, files


def test_without_the_record_of_key_paths_the_known_entries_go_by_name(saved, tmp_path):
    # a .metadata without planner_data (another planner wrote it): "model." and torchtitan's
    # trainer entries are told apart by their names
    order = list(net().state_dict())
    for name in ("ft_nested", "ft_titan"):
        folder = _copy(saved, name, tmp_path)
        md = dcp.FileSystemReader(folder).read_metadata()
        md.planner_data = None
        (folder / ".metadata").write_bytes(pickle.dumps(md))
        with open_checkpoint(folder) as ck:
            assert sorted(ck.tensors()) == sorted(order), name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process says so
def test_nested_model_entries_keep_their_path_and_non_tensors_are_skipped(tmp_path):
    sd = {"model": {"encoder": {"w": torch.ones(2)}, "head.b": torch.zeros(1), "extra": {"note": "x"}},
          "optim": {"state": {"w": torch.ones(2)}}, "epoch": 3}
    dcp.save(sd, checkpoint_id=tmp_path / "c", no_dist=True)
    with open_checkpoint(tmp_path / "c") as ck:
        assert ck.tensors() == {"encoder.w": ("float32", (2,)), "head.b": ("float32", (1,))}


def test_merge_files_dcp_finetuned_mixed_with_safetensors(saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = modelstock.merge_files(twin(saved, "base"), [saved / "ft_nested", saved / "ft_titan",
                                                          twin(saved, "ft_ddp")], out)
    assert len(report.layers) == len(full(saved, "base"))
    check_merge(out, saved, ["base", "ft_nested", "ft_titan", "ft_ddp"])


def test_cli_dcp_base_and_finetuned(saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    argv = [str(saved / "base"), str(saved / "ft_ddp"), str(twin(saved, "ft_titan")), str(saved / "ft_nested")]
    assert main(["merge", *argv, "-o", str(out), "--quiet"]) == 0
    check_merge(out, saved, ["base", "ft_ddp", "ft_titan", "ft_nested"])


def test_a_checkpoint_beside_a_config_gives_a_model_folder_without_its_shards(saved, tmp_path):
    # a DCP folder with a config.json is a model folder as a base: the output is a folder with
    # the merged weights and the config, never a copy of the checkpoint's data files
    base = _copy(saved, "base", tmp_path)
    (base / "config.json").write_text("{}")
    modelstock.merge_files(base, [saved / "ft_nested", saved / "ft_titan"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_gpu_pipeline_reads_dcp_in_pieces(saved, tmp_path, monkeypatch):
    # merge_files(device="cuda")'s reader: pieces of each tensor read from a pool of threads
    # (here 40-byte pieces, so every tensor is read in several); on the CPU without a GPU
    if not torch.cuda.is_available():
        monkeypatch.setattr(gpu_pipeline, "check_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(gpu_pipeline, "_READ_PIECE", 40)
    out = tmp_path / "merged.safetensors"
    modelstock.merge_files(saved / "base", [saved / "ft_nested", twin(saved, "ft_titan")], out, device="cuda",
                           backend="torch", chunk_size=600)
    got = load_file(out)
    check_against_spec({k: got[k] for k in net().state_dict()}, full(saved, "base"),
                       [full(saved, n) for n in ("ft_nested", "ft_titan")])


def test_read_into_from_threads_loads_each_tensor_once(saved, monkeypatch):
    loads = []
    real = DistributedCheckpoint._load
    monkeypatch.setattr(DistributedCheckpoint, "_load", lambda self, name: loads.append(name) or real(self, name))
    truth = full(saved, "ft_titan")
    with open_checkpoint(saved / "ft_titan") as ck:
        for name, t in truth.items():
            raw = t.numpy().reshape(-1).view(np.uint8)
            got = np.zeros_like(raw)
            pieces = [(at, got[at: at + 8]) for at in range(0, raw.size, 8)]
            threads = [threading.Thread(target=lambda part=pieces[i::4]: [ck.read_into(name, d, at) for at, d in part])
                       for i in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert np.array_equal(got, raw), name
    assert loads == list(truth)  # one load a tensor, however many pieces


def _copy(saved, name, tmp_path):
    shutil.copytree(saved / name, tmp_path / name)
    return tmp_path / name


def _refused_by_cli(argv, out, capsys, *match):
    assert main(["merge", *map(str, argv), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(m in err for m in match), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))  # no temporaries either


def test_no_model_state_is_a_clear_error(saved, tmp_path, capsys):
    with pytest.raises(InputError, match="holds no model weights") as e:
        open_checkpoint(saved / "no_model")
    assert e.value.source == str(saved / "no_model")
    _refused_by_cli([twin(saved, "base"), saved / "no_model", saved / "ft_titan"], tmp_path / "o.safetensors",
                    capsys, str(saved / "no_model"), "no model weights")


def test_corrupt_or_incomplete_checkpoints_are_refused(saved, tmp_path, capsys):
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    truncated = _copy(saved, "ft_nested", tmp_path)
    meta = truncated / ".metadata"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    _refused_by_cli([twin(saved, "base"), truncated, saved / "ft_titan"], out, capsys, str(truncated), "corrupt")

    missing = _copy(saved, "ft_titan", tmp_path)
    (missing / "__1_0.distcp").unlink()
    _refused_by_cli([twin(saved, "base"), saved / "ft_nested", missing], out, capsys, str(missing),
                    "__1_0.distcp is missing")

    # a data file cut short is found when its tensor is read: still nothing written
    cut = _copy(saved, "ft_ddp", tmp_path)
    data = cut / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    _refused_by_cli([saved / "base", saved / "ft_nested", cut], out, capsys, str(cut), "cannot be read")

    # the output may not go into a checkpoint's folder
    _refused_by_cli([saved / "base", saved / "ft_nested", saved / "ft_titan"], saved / "ft_titan" / "o.safetensors",
                    capsys, "inside the input folder")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_runs_no_code(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    payload = _Payload()
    payload.marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(InputError, match="refused: its .metadata names (posix|os).system") as e:
        open_checkpoint(folder)
    assert e.value.source == str(folder)
    assert not payload.marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process says so
def test_unsupported_dtype_names_folder_and_tensor(tmp_path):
    sd = {"w": torch.zeros(2, 2), "z": torch.zeros(3, dtype=torch.complex64)}
    dcp.save({"model": sd}, checkpoint_id=tmp_path / "c", no_dist=True)
    with pytest.raises(InputError, match="dtype complex64 is not supported") as e:
        open_checkpoint(tmp_path / "c")
    assert e.value.source == str(tmp_path / "c") and e.value.tensor == "z"
