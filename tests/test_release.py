"""What a user installing the package gets: one version everywhere, the license in the metadata,
an import name of our own that installs beside Hugging Face's `kernels`, and a missing optional
dependency named with the `pip install` that fixes it."""
import email
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import dynopool
import modelstock
import msdp_kernels

ROOT = Path(__file__).resolve().parent.parent
VENV_WHEELS = Path(sys.prefix) / "wheels"  # the Makefile's set-up puts Hugging Face's kernels wheel here


def test_one_version_everywhere():
    text = (ROOT / "msdp_kernels" / "_version.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', text, re.M)[1]
    assert modelstock.__version__ == dynopool.__version__ == msdp_kernels.__version__ == version
    done = subprocess.run([sys.executable, "-m", "modelstock", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"modelstock {version}", done


def test_missing_extra_is_one_line_with_the_pip_install(tmp_path, monkeypatch):
    from modelstock.extras import MissingExtra, require

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingExtra, match=r"^the plot needs matplotlib: pip install matplotlib "
                                           r"\(or modelstock-dynopool's extra \[plot\]\)$"):
        require("matplotlib", "the plot")
    report = modelstock.MergeReport()
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        report.plot(tmp_path / "x.png")


@pytest.mark.subprocess
def test_cli_plot_without_matplotlib_says_which_extra(tmp_path):
    """Checked before any input is read: one line, exit 2, nothing written."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from modelstock.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["merge", "b.safetensors", "f1.safetensors", "f2.safetensors", "-o", "out.safetensors",
            "--plot", "layers.png"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        "modelstock: error: --plot needs matplotlib: pip install matplotlib (or modelstock-dynopool's extra [plot])"]
    assert list(tmp_path.iterdir()) == []


def _build_wheel(out: Path) -> Path:
    """Our wheel, built from a copy of the files git would commit (the checkout stays untouched)."""
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (out / "dist").glob("modelstock_dynopool-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    """A new venv whose own site-packages come first; the heavy dependencies (torch, numpy, ...)
    are found after them in this test's environment, whose .pth files (our editable install) are
    not processed there."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    # this environment's pip, acting on the fresh venv; installs from the given files only
    offline = ["--no-index", "--no-deps"] if args[0] == "install" else []
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "-q", *offline],
                   check=True, capture_output=True)


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd)


OURS = ("import modelstock, dynopool, msdp_kernels, msdp_kernels.merge, msdp_kernels.dispatch\n"
        "assert '/site-packages/' in modelstock.__file__, modelstock.__file__\n"
        "print(modelstock.__version__)\n")
THEIRS = "from kernels import get_kernel\nimport kernels\nprint(kernels.__file__)\n"


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_wheel_installs_beside_hugging_face_kernels(tmp_path):
    hf = sorted(VENV_WHEELS.glob("kernels-*.whl"))
    assert hf, f"no Hugging Face kernels wheel in {VENV_WHEELS}: the Makefile's set-up downloads it (make test)"
    wheel = _build_wheel(tmp_path)

    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
        licensed = [n for n in z.namelist() if n.endswith("LICENSE")]
    assert "kernels" not in tops and {"msdp_kernels", "modelstock", "dynopool"} <= tops, tops
    assert meta["Version"] == modelstock.__version__
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or ""), dict(meta)
    assert licensed, "the wheel carries no LICENSE"

    python = _fresh_venv(tmp_path / "venv")
    work = tmp_path / "work"  # not the checkout: imports must come from the installed wheel
    work.mkdir()
    _pip(python, "install", str(wheel))
    _pip(python, "install", str(hf[-1]))  # theirs after ours
    for code in (OURS, THEIRS):
        done = _run(python, code, work)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([tmp_path / "venv" / "bin" / "modelstock", "--version"], capture_output=True, text=True)
    assert done.stdout.strip() == f"modelstock {modelstock.__version__}", done

    _pip(python, "uninstall", "-y", "kernels")  # removing theirs leaves ours whole
    assert _run(python, OURS, work).returncode == 0
    _pip(python, "install", str(hf[-1]))
    _pip(python, "uninstall", "-y", "modelstock-dynopool")  # and the other way round
    done = _run(python, THEIRS, work)
    assert done.returncode == 0, done.stderr
