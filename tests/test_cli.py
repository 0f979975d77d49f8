"""The `modelstock merge` command: results, and every bad input refused with exit code 2, one
line naming the file and tensor, no output file, inputs untouched."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelstock
from modelstock.cli import main

from .test_merge import make_models


@pytest.fixture
def ckpts(tmp_path):
    base, fts = make_models(2)
    paths = []
    for name, sd in [("base", base), ("ft1", fts[0]), ("ft2", fts[1])]:
        save_file(sd, tmp_path / f"{name}.safetensors")
        paths.append(str(tmp_path / f"{name}.safetensors"))
    return tmp_path, paths, base, fts


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_merge_writes_output_report_plot_and_summary(ckpts, capsys):
    tmp, paths, base, fts = ckpts
    rc = main(["merge", *paths, "-o", str(tmp / "out.safetensors"), "--report", str(tmp / "r.json"),
               "--plot", str(tmp / "p.png"), "--granularity", "row", "--exclude", "proj.*"])
    assert rc == 0
    out = load_file(tmp / "out.safetensors")
    want = modelstock.merge(base, fts, granularity="row", exclude=["proj.*"])
    assert all(torch.equal(out[k], want[k]) for k in want)
    report = json.loads((tmp / "r.json").read_text())
    assert report["granularity"] == "row" and len(report["layers"]) == len(base)
    assert (tmp / "p.png").stat().st_size > 1000
    summary = capsys.readouterr().out
    assert "Merged 2 fine-tuned checkpoints" in summary and "GB/s" in summary


def test_dtype_no_clamp_and_quiet(ckpts, capsys):
    tmp, paths, base, fts = ckpts
    assert main(["merge", *paths, "-o", str(tmp / "o.safetensors"), "--dtype", "bf16", "--no-clamp", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    out = load_file(tmp / "o.safetensors")
    want = modelstock.merge(base, fts, clamp=False, out_dtype=torch.bfloat16)
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], want[k]) for k in want)


def _corrupt(tmp, paths, base, fts, case):
    """Make one bad input; return (argv, text the error line must contain)."""
    out = str(tmp / "out.safetensors")
    ft2 = paths[2]
    if case == "missing_tensor":
        save_file({k: v for k, v in fts[1].items() if k != "embed"}, ft2)
        return [paths[0], paths[1], ft2, "-o", out], [ft2, "embed", "missing"]
    if case == "extra_tensor":
        save_file(dict(fts[1], surplus=torch.zeros(3)), ft2)
        return [paths[0], paths[1], ft2, "-o", out], [ft2, "surplus"]
    if case == "shape_mismatch":
        save_file(dict(fts[1], embed=torch.zeros(513, 9)), ft2)
        return [paths[0], paths[1], ft2, "-o", out], [ft2, "embed", "shape"]
    if case in ("nan", "inf"):
        bad = dict(fts[1])
        bad["conv.weight"] = bad["conv.weight"].clone()
        bad["conv.weight"][0, 0, 0, 0] = float(case)
        save_file(bad, ft2)
        return [paths[0], paths[1], ft2, "-o", out], [ft2, "conv.weight", "NaN or inf"]
    if case == "truncated":
        raw = open(ft2, "rb").read()
        open(ft2, "wb").write(raw[: len(raw) // 2])
        return [paths[0], paths[1], ft2, "-o", out], [ft2, "truncated"]
    if case == "corrupt":
        raw = bytearray(open(ft2, "rb").read())
        raw[8:40] = os.urandom(32)
        open(ft2, "wb").write(bytes(raw))
        return [paths[0], paths[1], ft2, "-o", out], [ft2]
    if case == "not_a_checkpoint":
        notes = tmp / "notes.txt"
        notes.write_text("these are my notes\n" * 10)
        return [paths[0], paths[1], str(notes), "-o", out], [str(notes), "not a safetensors"]
    if case == "missing_file":
        return [paths[0], paths[1], str(tmp / "nope.safetensors"), "-o", out], ["nope.safetensors", "no such file"]
    if case == "one_finetuned":
        return [paths[0], paths[1], "-o", out], ["needs at least two fine-tuned checkpoints"]
    if case == "output_is_input":
        return [paths[0], paths[1], ft2, "-o", paths[1], "--force"], [paths[1], "overwrite an input"]
    if case == "output_exists":
        (tmp / "out.safetensors").write_bytes(b"precious")
        return [paths[0], paths[1], ft2, "-o", out], [out, "exists", "--force"]
    raise AssertionError(case)


BAD_INPUTS = ["missing_tensor", "extra_tensor", "shape_mismatch", "nan", "inf", "truncated", "corrupt",
              "not_a_checkpoint", "missing_file", "one_finetuned", "output_is_input", "output_exists"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exit_2_one_line_nothing_written(ckpts, capsys, case):
    tmp, paths, base, fts = ckpts
    argv, must_say = _corrupt(tmp, paths, base, fts, case)
    before = digest(tmp)
    rc = main(["merge", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelstock: error: "), err
    for text in must_say:
        assert text in lines[0], (text, lines[0])
    assert digest(tmp) == before  # inputs untouched, no output, no temporary file


def test_module_entry_point_reports_without_traceback(ckpts):
    tmp, paths, _, _ = ckpts
    bad = [paths[0], paths[1], str(tmp / "nope.safetensors")]
    proc = subprocess.run([sys.executable, "-m", "modelstock", "merge", *bad, "-o", str(tmp / "o.safetensors")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "modelstock", "merge", *paths, "-o", str(tmp / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp / "o.safetensors").exists(), proc.stderr


def test_report_and_plot_are_not_overwritten_without_force(ckpts, capsys):
    tmp, paths, _, _ = ckpts
    (tmp / "r.json").write_text("{}")
    assert main(["merge", *paths, "-o", str(tmp / "o.safetensors"), "--report", str(tmp / "r.json")]) == 2
    assert "r.json" in capsys.readouterr().err and not (tmp / "o.safetensors").exists()


def test_open_clip_vit_b_32_merged_by_cli_loads_strict_and_runs(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    base = model.state_dict()
    g = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = [tmp_path / "base.safetensors", tmp_path / "ft1.pt", tmp_path / "ft2.safetensors"]
    save_file({k: v.contiguous() for k, v in base.items()}, paths[0])
    fts = []
    for i in range(2):
        fts.append({k: v + 1e-3 * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in base.items()})
    # ft1 as open_clip's training script saves it (DDP prefix, epoch, optimizer), ft2 plain.
    torch.save({"epoch": 10, "name": "ft1", "state_dict": {"module." + k: v for k, v in fts[0].items()}}, paths[1])
    save_file({k: v.contiguous() for k, v in fts[1].items()}, paths[2])
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, paths), "-o", str(out), "--quiet"]) == 0

    merged_model = open_clip.create_model("ViT-B-32", pretrained=None)
    merged_model.load_state_dict(load_file(out), strict=True)
    merged_model.eval()
    image = torch.rand(2, 3, 224, 224)
    text = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat", "a photo of a dog"])
    with torch.no_grad():
        img, txt, scale = merged_model(image, text)
    assert img.shape == (2, 512) and txt.shape == (2, 512) and torch.isfinite(img).all() and torch.isfinite(txt).all()
    # The merged weights lie between the base and the fine-tuned average (t in [0, 1]).
    sd = merged_model.state_dict()
    k = "visual.transformer.resblocks.0.attn.in_proj_weight"
    avg = (fts[0][k] + fts[1][k]) / 2
    t = ((sd[k] - base[k]) * (avg - base[k])).sum() / ((avg - base[k]) ** 2).sum()
    assert 0.3 < float(t) < 1.0  # shared direction: cos ~ 0.5, t = 2 cos / (1 + cos) ~ 0.67


def test_device_cuda_runs_the_gpu_pipeline_or_says_why_not(ckpts, capsys, monkeypatch):
    from modelstock.merging import gpu_pipeline as device_files

    from .test_device_files import check_output

    tmp, paths, base, fts = ckpts
    if not torch.cuda.is_available():
        assert main(["merge", *paths, "-o", str(tmp / "o.safetensors"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device" in err[0]
        # the same pipeline on CPU tensors, the kernels under the interpreter
        monkeypatch.setattr(device_files, "check_device", lambda device: torch.device("cpu"))
    rc = main(["merge", *paths, "-o", str(tmp / "o.safetensors"), "--device", "cuda", "--chunk-size", "2KB"])
    assert rc == 0 and "Merged 2 fine-tuned checkpoints" in capsys.readouterr().out
    check_output(load_file(tmp / "o.safetensors"), base, fts)


@pytest.mark.parametrize("user_blas_threads", [None, "3"])
def test_cpu_merge_of_safetensors_never_imports_torch(ckpts, user_blas_threads):
    # The CLI's CPU path runs on numpy: importing torch alone costs ~1.8 s and 0.65 GB here.
    # Importing the package loads no numpy either, so that main() can give OpenBLAS one thread
    # before numpy starts its pool; a value the user set is kept.
    tmp, paths, base, fts = ckpts
    code = ("import os, sys; import modelstock; from modelstock.cli import main; "
            "before = 'numpy' in sys.modules; "
            f"rc = main(['merge', *{paths!r}, '-o', {str(tmp / 'o.safetensors')!r}, '--quiet', '--force']); "
            "print(rc, before, 'torch' in sys.modules, os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if user_blas_threads:
        env["OPENBLAS_NUM_THREADS"] = user_blas_threads
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout.split() == ["0", "False", "False", user_blas_threads or "1"], done.stderr[-2000:]


def _paused_merge(paths, out, pause=60):
    """The CLI in a child process whose merge stops (``pause`` s) after its first layer is
    queued for writing (so a temporary file exists), saying so on stdout: a merge a signal can
    catch mid-way."""
    code = f"""
import sys, time
from modelstock import cli
from modelstock.merging import cpu_pipeline as files
real = files.stream
def paused(inputs, layers, entries, write, *args, **kwargs):
    def first_then_wait(*a, **k):
        write(*a, **k)
        if not getattr(first_then_wait, "done", False):
            first_then_wait.done = True
            time.sleep(0.5)  # the writer thread has the layer in the file by then
            print("writing", flush=True)
            time.sleep({pause})
    return real(inputs, layers, entries, first_then_wait, *args, **kwargs)
files.stream = paused
sys.exit(cli.main({["merge", *map(str, paths), "-o", str(out), "--quiet"]!r}))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    return proc


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_sigterm_ends_the_merge_like_ctrl_c_leaving_nothing(ckpts):
    tmp, paths, _, _ = ckpts
    before = digest(tmp)
    proc = _paused_merge(paths, tmp / "o.safetensors")
    assert len(temporaries(tmp)) == 1  # the hidden temporary, as large as the output so far
    proc.terminate()  # SIGTERM, as a job scheduler sends at a time limit
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "SIGTERM" in err and "nothing was written" in err
    assert digest(tmp) == before  # no output, no temporary, inputs untouched


def test_sigkill_leaves_a_temporary_that_the_next_merge_removes(ckpts):
    tmp, paths, base, fts = ckpts
    proc = _paused_merge(paths, tmp / "o.safetensors")
    (left,) = temporaries(tmp)
    assert left.startswith(f".o.safetensors.{proc.pid}-")
    proc.kill()  # SIGKILL cannot be caught
    proc.wait(timeout=60)
    # another merge to another output, and one live process's temporary of this output, stay
    (tmp / f".o.safetensors.{os.getpid()}-0123abcd.tmp").write_bytes(b"live")
    (tmp / f".other.safetensors.{proc.pid}-0123abcd.tmp").write_bytes(b"another output's")
    assert main(["merge", *paths, "-o", str(tmp / "o.safetensors"), "--quiet"]) == 0
    assert temporaries(tmp) == sorted([f".o.safetensors.{os.getpid()}-0123abcd.tmp",
                                       f".other.safetensors.{proc.pid}-0123abcd.tmp"])
    out = load_file(tmp / "o.safetensors")
    want = modelstock.merge(base, fts)
    assert all(torch.equal(out[k], want[k]) for k in want)


def test_sizes_dtype_names_and_excludes_that_match_nothing(ckpts, capsys):
    tmp, paths, base, fts = ckpts
    out = str(tmp / "o.safetensors")
    with pytest.raises(SystemExit) as e:  # argparse: exit 2, naming the option
        main(["merge", *paths, "-o", out, "--shard-size", "12XB"])
    assert e.value.code == 2 and "--shard-size" in capsys.readouterr().err and not os.path.exists(out)
    with pytest.raises(SystemExit):
        main(["merge", *paths, "-o", out, "--chunk-size", "0"])
    assert "--chunk-size" in capsys.readouterr().err
    # mergekit's dtype names, and a warning for an --exclude that names no tensor
    assert main(["merge", *paths, "-o", out, "--dtype", "bfloat16", "--exclude", "proj.*", "--exclude", "nope*",
                 "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["modelstock: warning: exclude pattern 'nope*' matches no tensor"], err
    assert all(v.dtype == torch.bfloat16 for v in load_file(out).values() if v.is_floating_point())
    with pytest.warns(modelstock.errors.MergeWarning, match="'nope'"):
        modelstock.merge(base, fts, exclude=["nope"])
    with pytest.raises(ValueError, match="shard_size: '12XB'"):
        modelstock.merge_files(paths[0], paths[1:], tmp / "p.safetensors", shard_size="12XB")


def test_plot_names_the_blocks_of_layers_on_its_x_axis():
    from modelstock.report import layer_groups

    names = ["token_embedding.weight", "positional_embedding"] + \
        [f"transformer.resblocks.{i}.{p}" for i in range(12) for p in ("attn.in_proj_weight", "ln_1.weight")] + \
        ["ln_final.weight", "visual.conv1.weight"]
    ticks, labels = layer_groups(names)
    assert labels[:4] == ["token_embedding", "positional_embedding", "transformer.resblocks.0",
                          "transformer.resblocks.1"] and labels[-2:] == ["ln_final", "visual"]
    assert [names[t] for t in ticks[2:4]] == ["transformer.resblocks.0.attn.in_proj_weight",
                                             "transformer.resblocks.1.attn.in_proj_weight"]
    ticks, labels = layer_groups(names, most=5)  # thinned evenly to at most 5 labels
    assert len(labels) <= 5 and labels[0] == "token_embedding"


def test_an_input_truncated_mid_merge_stops_it_with_one_line_not_sigbus(ckpts):
    """Another process truncating an input mid-merge waits on the merge's read lease
    (io/leases.py); the merge stops at its next layer with one line naming the file."""
    import threading

    tmp, paths, _, _ = ckpts
    out = tmp / "o.safetensors"
    proc = _paused_merge(paths, out, pause=3)  # the other process truncates an input meanwhile
    truncated = threading.Event()
    worker = threading.Thread(target=lambda: (os.truncate(paths[2], 100), truncated.set()))
    worker.start()
    time.sleep(0.5)
    assert not truncated.is_set()  # held back while the merge still reads the file
    _, err = proc.communicate(timeout=60)
    worker.join(timeout=60)
    assert truncated.is_set() and os.path.getsize(paths[2]) == 100
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and paths[2] in lines[0] and "truncated by another process" in lines[0], err
    assert not out.exists() and temporaries(tmp) == []
