"""An output is put in place at the end, under a lock, on what is there at that moment: merges
run beside other processes (a second merge, a user writing into the output folder, a disk that
fills up, a Ctrl-C), and nothing another process wrote is ever removed or replaced.

Each case failed on main at 5a6de17: two merges into one new folder both exited 0 and left one
model's weights with the other's tokenizer; a Ctrl-C removed the whole new folder with a user's
notes in it; "exists, use --force" was checked only at the start; --report/--plot on a full or
read-only place ended in a traceback after the merge, leaving `.report.json.tmp`; a `.pt` output
on a full disk ended in a traceback."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.numpy import load_file, save_file

import modelstock
from modelstock.cli import main
from modelstock.io import atomic

from .test_merge import check_against_spec


def _models(seed, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"embed": (64, 16), "proj.weight": (32, 64), "proj.bias": (32,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    return base, fts


def _save(folder, sd):
    save_file({k: v.numpy() for k, v in sd.items()}, folder)


def model_set(root, name, seed, shapes=None):
    """A model folder (config, tokenizer, weights) as base and two fine-tuned files, each file
    saying which set it belongs to."""
    base, fts = _models(seed, shapes)
    folder = root / f"{name}-base"
    folder.mkdir()
    _save(folder / "model.safetensors", base)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "set": name}))
    (folder / "tokenizer.json").write_text(json.dumps({"set": name}))
    paths = [folder]
    for i, ft in enumerate(fts):
        paths.append(root / f"{name}-ft{i + 1}.safetensors")
        _save(paths[-1], ft)
    return paths, base, fts


def check_merged(path, base, fts):
    """The output at ``path`` against the fp64 formula (safetensors files keep names sorted)."""
    out = {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    assert sorted(out) == sorted(base)
    check_against_spec({k: out[k] for k in base}, base, fts)


def entries(folder):
    return sorted(os.listdir(folder))


# The CLI in a child process whose merge stops after its first layer is queued for writing
# (saying "writing" on stdout) until the file GO exists: a merge another process or a signal can
# meet mid-way.
_PAUSED = textwrap.dedent("""
    import errno, fcntl, os, sys, time
    from modelstock import cli
    if os.environ.get("NO_FLOCK"):  # a file system that refuses flock on a folder (some network ones)
        def refused(fd, op):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        fcntl.flock = refused
    from modelstock.merging import cpu_pipeline
    real, go = cpu_pipeline.stream, sys.argv[1]
    def paused(inputs, layers, entries, write, *args, **kwargs):
        def first_then_wait(*a, **k):
            write(*a, **k)
            if not getattr(first_then_wait, "done", False):
                first_then_wait.done = True
                time.sleep(0.3)
                print("writing", flush=True)
                while not os.path.exists(go):
                    time.sleep(0.01)
        return real(inputs, layers, entries, first_then_wait, *args, **kwargs)
    cpu_pipeline.stream = paused
    sys.exit(cli.main(["merge", *sys.argv[2:], "--quiet"]))
""")


def paused_merge(go, *argv, env=None):
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, str(go), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    if line != "writing":
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    return proc


@pytest.mark.parametrize("lock", ["flock", "lock file"])
def test_two_merges_into_one_new_folder_exactly_one_wins(tmp_path, lock):
    a, a_base, a_fts = model_set(tmp_path, "a", seed=1)
    b, b_base, b_fts = model_set(tmp_path, "b", seed=2)
    out, go = tmp_path / "merged", tmp_path / "go"
    env = dict(os.environ, NO_FLOCK="1") if lock == "lock file" else None
    procs = [paused_merge(go, *paths, "-o", out, env=env) for paths in (a, b)]  # both past their start checks
    go.touch()  # both resume at once and race to put their output in place
    done = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = sorted(d[2] for d in done)
    assert codes == [0, 2], done
    winner = [d[2] for d in done].index(0)
    (loser_err,) = [d[1] for d in done if d[2] == 2]
    assert len(loser_err.strip().splitlines()) == 1 and "another process" in loser_err, loser_err
    # the winner's weights with the winner's own config and tokenizer, nothing of the other's
    paths, base, fts = [(a, a_base, a_fts), (b, b_base, b_fts)][winner]
    assert entries(out) == ["config.json", "model.safetensors", "tokenizer.json"]
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (paths[0] / name).read_bytes(), name
    check_merged(out / "model.safetensors", base, fts)
    # no private folder, no lock file left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_keeps_what_another_process_wrote_into_the_new_output_folder(tmp_path):
    paths, _, _ = model_set(tmp_path, "a", seed=1)
    out, go = tmp_path / "merged", tmp_path / "go"
    proc = paused_merge(go, *paths, "-o", out)
    out.mkdir(exist_ok=True)  # the user makes the folder and puts notes in it meanwhile
    (out / "notes.txt").write_text("mine")
    proc.send_signal(signal.SIGINT)
    try:  # the interrupt acts first; only then does the paused write go on, as real I/O would
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # the merge's clean-up waits for its writer: release it
        go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    assert entries(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_merge_into_a_folder_another_process_filled_meanwhile_adds_nothing(tmp_path):
    """The folder appeared with a model's weights after the start-time check: the merge is
    refused when it would put its own in place (exit 2), the folder left as it was."""
    paths, _, _ = model_set(tmp_path, "a", seed=1)
    out, go = tmp_path / "merged", tmp_path / "go"
    proc = paused_merge(go, *paths, "-o", out)
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"another merge's weights")
    (out / "notes.txt").write_text("mine")
    go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "model.safetensors" in err and "another process" in err, err
    assert entries(out) == ["model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").read_bytes() == b"another merge's weights"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_folder_made_meanwhile_without_clashing_files_receives_the_output(tmp_path):
    paths, base, fts = model_set(tmp_path, "a", seed=1)
    out, go = tmp_path / "merged", tmp_path / "go"
    proc = paused_merge(go, *paths, "-o", out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert entries(out) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]
    check_merged(out / "model.safetensors", base, fts)


@pytest.mark.parametrize("name, extra", [("o.safetensors", []), ("o.pt", []),
                                         ("o.safetensors", ["--shard-size", "4KB"])])
def test_an_output_file_written_by_another_process_meanwhile_is_kept(tmp_path, name, extra):
    paths, _, _ = model_set(tmp_path, "a", seed=1)
    paths[0] = paths[0] / "model.safetensors"  # a single-file base: a single-file output
    out, go = tmp_path / name, tmp_path / "go"
    proc = paused_merge(go, *paths, "-o", out, *extra)
    # another process writes the output (the index, for shards) after the start-time check
    taken = out.with_name(out.name + ".index.json") if extra else out
    taken.write_bytes(b"another process's")
    go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "another process" in err and str(taken) in err, err
    assert taken.read_bytes() == b"another process's"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("o", ".o"))) == [taken.name]


# --- --report / --plot ---------------------------------------------------------------------

def _mount_tmpfs(where, options) -> bool:
    """A tmpfs at ``where`` (root only, and where the container allows); False if not."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def _umount(where):
    subprocess.run(["umount", "-l", str(where)], check=True)


class _FillingFile:
    """A file on a disk that fills up after ``room`` bytes (os-level writes raise ENOSPC)."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a nearly full disk (``room`` bytes left): a small tmpfs where one can be
    mounted (root), else the writes of output files under it made to fail as a full disk's do."""
    where, size, room = tmp_path / "full", 64 << 10, 16 << 10
    if os.geteuid() == 0 and _mount_tmpfs(where, f"size={size},mode=0777"):
        try:
            (where / "filler").write_bytes(b"\0" * (size - room))
            yield where
        finally:
            _umount(where)
        return
    where.mkdir(exist_ok=True)
    left = [room]
    real_open = open

    def opening(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _FillingFile(f, left) if str(path).startswith(str(where)) and "b" in mode else f
    monkeypatch.setattr(atomic, "open", opening, raising=False)
    (where / "filler").write_bytes(b"")
    yield where


def _big_set(root):
    """Inputs (outside the full disk) whose merge takes more room than it has."""
    return model_set(root, "big", seed=3, shapes={"embed": (256, 64), "proj.weight": (64, 64), "proj.bias": (64,)})


@pytest.mark.parametrize("kind", ["safetensors", "sharded", "pt", "folder"])
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(tmp_path, full_disk, capsys, kind):
    paths, _, _ = _big_set(tmp_path)
    if kind != "folder":
        paths[0] = paths[0] / "model.safetensors"
    out = full_disk / {"folder": "merged", "pt": "o.pt"}.get(kind, "o.safetensors")
    extra = ["--shard-size", "16KB"] if kind == "sharded" else []
    rc = main(["merge", *map(str, paths), "-o", str(out), *extra, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert entries(full_disk) == ["filler"]


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_a_report_on_a_full_disk_says_the_merge_is_in_place_and_leaves_no_temporary(tmp_path, full_disk, capsys,
                                                                                     option):
    # many layers: a report and a plot larger than the room left
    paths, base, fts = model_set(tmp_path, "many", seed=5, shapes={f"layers.{i}.w": (4,) for i in range(300)})
    paths[0] = paths[0] / "model.safetensors"
    out, extra = tmp_path / "o.safetensors", full_disk / ("r.json" if option == "--report" else "p.png")
    rc = main(["merge", *map(str, paths), "-o", str(out), option, str(extra), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "the merge is in place" in err and str(extra) in err and "No space left on device" in err, err
    check_merged(out, base, fts)
    assert entries(full_disk) == ["filler"]


def test_a_report_in_a_read_only_place_is_refused_before_the_merge(tmp_path, capsys):
    paths, _, _ = _big_set(tmp_path)
    paths[0] = paths[0] / "model.safetensors"
    out = tmp_path / "o.safetensors"
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir(mode=0o555)
    elif not _mount_tmpfs(ro, "ro,size=64k"):  # root writes anywhere a file system allows
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        for option, name in (("--report", "r.json"), ("--plot", "p.png")):
            rc = main(["merge", *map(str, paths), "-o", str(out), option, str(ro / name), "--quiet"])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and len(err.splitlines()) == 1 and str(ro / name) in err, err
            assert not out.exists() and entries(ro) == []
    finally:
        if os.geteuid() == 0:
            _umount(ro)


def test_a_report_written_by_another_process_meanwhile_is_kept(tmp_path):
    paths, base, fts = model_set(tmp_path, "a", seed=1)
    paths[0] = paths[0] / "model.safetensors"
    out, report, go = tmp_path / "o.safetensors", tmp_path / "r.json", tmp_path / "go"
    proc = paused_merge(go, *paths, "-o", out, "--report", report)
    report.write_text("theirs")
    go.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "the merge is in place" in err and "another process" in err, err
    assert report.read_text() == "theirs"
    check_merged(out, base, fts)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_output_ending_in_a_separator_names_a_folder_never_a_file(tmp_path, capsys):
    paths, _, _ = model_set(tmp_path, "a", seed=1)
    files = [paths[0] / "model.safetensors", *paths[1:]]
    rc = main(["merge", *map(str, files), "-o", str(tmp_path / "dir") + os.sep, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "names a folder" in err, err
    assert not (tmp_path / "dir").exists()
    for option in ("--report", "--plot"):  # the same for the report and the plot
        rc = main(["merge", *map(str, files), "-o", str(tmp_path / "o.safetensors"), option,
                   str(tmp_path / "r") + os.sep, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "names a folder" in err and not (tmp_path / "r").exists(), err
    # a model-folder base makes a folder output: the separator is fine there
    assert main(["merge", *map(str, paths), "-o", str(tmp_path / "dir") + os.sep, "--quiet"]) == 0
    assert entries(tmp_path / "dir") == ["config.json", "model.safetensors", "tokenizer.json"]
