"""Every ```python and ```bash block of README.md and docs/*.md runs as written: the blocks of a
page in order, in one temporary working directory (a shell block may use the files a Python
block before it wrote), offline, on the CPU; each Python block in a fresh namespace, so it
defines what it uses. Also: the README stays short, and every relative link resolves."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "bash": "bash", "shell": "bash", "sh": "bash"}


def blocks(page: Path):
    """(language, first line number, code) of every runnable fenced block, in page order."""
    found, lang, code, start = [], None, None, 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if code is not None:
            if line.strip() == "```":
                found.append((lang, start, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
        else:
            m = re.match(r"^```(\w+)\s*$", line)
            if m and m[1] in RUNNABLE:
                lang, code, start = RUNNABLE[m[1]], [], number + 1
    assert code is None, f"{page.name}: the block at line {start} is not closed"
    return found


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_readme_and_the_docs_have_blocks_to_run():
    assert blocks(ROOT / "README.md"), "is the parser still right?"
    assert sum(len(blocks(p)) for p in PAGES) >= 10


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{_name(page)} links to {target}, which does not exist"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=_name)
def test_page_blocks_run_as_written(page, tmp_path, monkeypatch):
    from modelstock.io import source

    monkeypatch.setattr(source, "_FORMATS", list(source._FORMATS))  # a page may register a format: not for later tests
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for lang, line, code in blocks(page):
        where = f"{_name(page)}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), {"__name__": "__docs__"})  # noqa: S102 - the page's own code
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
