"""Inputs a file merge meets in the wild: checkpoints of many small tensors under the default
descriptor limit, inputs that share nothing to merge (a PEFT adapter given as a model), and a
distributed checkpoint that lost its ``.metadata``.

Each case failed on main at 5a6de17: 500 tensors of 256 bytes failed under `ulimit -n 1024`
("cannot be mapped ([Errno 24] Too many open files); truncated while open?"); a merge of a base
with two adapters under `--missing base` exited 0 with the base copied; a folder of `.distcp`
files without `.metadata` was called a folder without weights."""
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from modelstock.cli import main

from .test_merge import check_against_spec


def _limit_descriptors():
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_20000_small_tensors_merge_under_ulimit_n_256(tmp_path):
    rng = np.random.default_rng(0)
    count = 20_000
    base = {f"blocks.{i}.w": rng.standard_normal(4, dtype=np.float32) for i in range(count)}
    fts = [{k: v + 0.1 * rng.standard_normal(4, dtype=np.float32) for k, v in base.items()} for _ in range(2)]
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "ft1", "ft2")]
    for p, sd in zip(paths, [base, *fts]):
        save_file(sd, p)
    out = tmp_path / "o.safetensors"
    done = subprocess.run([sys.executable, "-m", "modelstock", "merge", *map(str, paths), "-o", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600, preexec_fn=_limit_descriptors)
    assert done.returncode == 0, done.stderr[-2000:]
    got = load_file(out)
    assert len(got) == count
    sample = [f"blocks.{i}.w" for i in range(0, count, 97)]  # against the fp64 formula
    t = {k: torch.from_numpy(v) for k, v in base.items() if k in sample}
    check_against_spec({k: torch.from_numpy(got[k]) for k in t}, t,
                       [{k: torch.from_numpy(ft[k]) for k in t} for ft in fts])


def test_out_of_descriptors_is_not_called_a_truncation(tmp_path):
    """A mapping refused for want of descriptors names the real cause; a file truncated
    while open is still called truncated (tests/test_cli.py, tests/test_checkpoint.py)."""
    from modelstock.io.safetensors import SafetensorsFile

    save_file({"a": np.ones(4096, np.float32), "b": np.ones(4096, np.float32)}, tmp_path / "x.safetensors")
    code = f"""
import resource
from modelstock.io.safetensors import SafetensorsFile
f = SafetensorsFile({str(tmp_path / "x.safetensors")!r})
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
held = []
try:
    while True:
        held.append(open("/dev/null"))
except OSError:
    pass
try:
    f.view("a")
except Exception as e:
    print(type(e).__name__, e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_descriptors)
    assert "Too many open files" in done.stdout and "truncated" not in done.stdout, done.stdout + done.stderr
    f = SafetensorsFile(tmp_path / "x.safetensors")
    os.truncate(tmp_path / "x.safetensors", 200)
    with pytest.raises(ValueError, match="truncated"):
        f.view("b")
    f.close()


def _adapter(folder, rng, rank=2):
    """What peft's save_pretrained writes for a LoRA adapter on a 16x16 q_proj."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    prefix = "base_model.model.layers.0.q_proj"
    save_file({f"{prefix}.lora_A.weight": rng.standard_normal((rank, 16), dtype=np.float32),
               f"{prefix}.lora_B.weight": rng.standard_normal((16, rank), dtype=np.float32)},
              folder / "adapter_model.safetensors")


def test_a_merge_in_which_nothing_is_merged_is_an_error_saying_what_the_inputs_are(tmp_path, capsys):
    rng = np.random.default_rng(0)
    save_file({"layers.0.q_proj.weight": rng.standard_normal((16, 16), dtype=np.float32)}, tmp_path / "base.safetensors")
    _adapter(tmp_path / "ft1", rng)
    _adapter(tmp_path / "ft2", rng)
    for ft in ("ft1", "ft2"):  # an adapter's tensors without their config: not recognisable as an adapter
        (tmp_path / ft / "adapter_config.json").unlink()
    out = tmp_path / "o.safetensors"
    rc = main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ft1"), str(tmp_path / "ft2"),
               "-o", str(out), "--missing", "base", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nothing to merge" in err, err
    assert "PEFT adapter" in err and str(tmp_path / "ft1") in err and "lora_A" in err, err
    assert not out.exists()


def test_distcp_files_without_metadata_are_called_a_checkpoint_missing_its_metadata(tmp_path, capsys):
    torch_dcp = pytest.importorskip("torch.distributed.checkpoint")
    rng = np.random.default_rng(0)
    sds = [{"w": torch.from_numpy(rng.standard_normal((4, 4), dtype=np.float32))} for _ in range(3)]
    folders = []
    for name, sd in zip(("base", "ft1", "ft2"), sds):
        torch_dcp.save(sd, checkpoint_id=str(tmp_path / name))
        folders.append(tmp_path / name)
    (folders[2] / ".metadata").unlink()  # a save interrupted before rank 0 wrote it, or a partial copy
    assert any(folders[2].glob("*.distcp"))
    rc = main(["merge", *map(str, folders), "-o", str(tmp_path / "o.safetensors"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(folders[2]) in err and "distributed checkpoint" in err and "missing its metadata" in err, err
