"""Every ```python block of README.md runs as written: each on its own (a fresh namespace, so a
block defines what it uses), in a temporary working directory, offline, on the CPU."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

def blocks():
    """(level-2 heading, first line number, code) of every ```python block."""
    found, heading, code, start = [], None, None, 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if code is not None:
            if line.strip() == "```":
                found.append((heading, start, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
        elif line.startswith("## "):
            heading = line[3:].strip()
        elif re.match(r"^```python\s*$", line):
            code, start = [], number + 1
    assert code is None, f"README.md: the ```python block at line {start} is not closed"
    return found


BLOCKS = blocks()


def test_the_readme_has_python_blocks_under_both_papers():
    assert {"Model Stock", "DynOPool"} <= {b[0] for b in BLOCKS}, "is the parser still right?"


@pytest.mark.parametrize("heading,line,code", [pytest.param(h, n, c, id=f"{h}-line{n}") for h, n, c in BLOCKS])
def test_readme_block_runs_as_written(heading, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
