"""Files written under a temporary name beside their target and renamed into place, so that a
failed or interrupted write leaves nothing at the target; folders built under a private name
and put in place the same way; and the clean-up of temporaries that a killed process (SIGKILL,
a power cut) left behind. The renames follow ``commit.py``'s rules (a lock, no replacing
without ``replace``)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .commit import committing, put_in_place, rename_noreplace, taken


def _private_suffix() -> str:
    """What makes a temporary's name its writer's own: the process id and a random part."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


class AtomicFile:
    """A file written under a temporary name beside its target and renamed on commit. The
    name carries the writing process's id (``.<target>.<pid>-<random>.tmp``), so that what a
    killed process left behind can be told from what a live one is writing."""

    def __init__(self, target: Path, durable: bool = False):
        self.target, self.durable = target, durable
        self.tmp = target.with_name(f".{target.name}.{_private_suffix()}")
        self.f = open(self.tmp, "xb")

    def write(self, data) -> None:
        self.f.write(data)

    def finish(self) -> None:
        self.f.flush()
        if self.durable:  # survive a power cut too, not only a failing process (costs ~0.3 s/GB)
            os.fsync(self.f.fileno())
        self.f.close()

    def commit(self, replace: bool = True) -> None:
        """The rename (the caller holds ``commit.committing``); without ``replace``, an
        existing target is an ``OutputTaken`` error."""
        put_in_place(self.tmp, self.target, replace)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, data, durable: bool = False, replace: bool = True) -> Path:
    """One file written as every output is (``AtomicFile``): under a temporary name beside
    ``target``, then renamed into place (without ``replace``: only if nothing is there by
    then). ``data``: bytes, or a binary file object to copy."""
    f = AtomicFile(Path(target), durable)
    try:
        if isinstance(data, (bytes, bytearray)):
            f.write(data)
        else:
            shutil.copyfileobj(data, f.f)
        f.finish()
        with committing(f.target):
            f.commit(replace)
    except BaseException:
        f.abort()
        raise
    return f.target


class AtomicFolder:
    """A folder output built in a private folder and put in place at the end. When the target
    does not exist, the private folder lies beside it (``.<target>.<pid>-<random>.tmp``) and
    becomes it in one rename; when it does (a merge into an existing folder), the private
    folder lies inside it (``.modelstock.<pid>-<random>.tmp``, the same file system) and its
    files are renamed in one by one. Either way ``commit`` decides under the output's lock, on
    what is there at that moment; ``abort`` removes the private folder and nothing else."""

    INSIDE = "modelstock"

    def __init__(self, target: Path, durable: bool = False):
        self.target, self.durable = Path(target), durable
        if self.target.is_dir():
            self.path = self.target / f".{self.INSIDE}.{_private_suffix()}"
        else:
            self.path = self.target.with_name(f".{self.target.name}.{_private_suffix()}")
        self.path.mkdir()
        self._placed = False

    def commit(self, replace: bool, replaced: Callable[[Path, list[str]], list[str]]) -> list[Path]:
        """Put the folder's files in place; returns their final paths. ``replaced(folder,
        names)``: the files of an existing ``folder`` this output would replace or make stale
        (they need ``replace``, and are removed with it once the new files are in)."""
        names = sorted(os.listdir(self.path))
        with committing(self.target):
            if not os.path.lexists(self.target) and self.path.parent != self.target:
                try:
                    rename_noreplace(self.path, self.target)
                    self._placed = True
                except FileExistsError:
                    pass  # created meanwhile by a process that takes no lock: as an existing folder
            if not self._placed:
                self._commit_into(names, replace, replaced)
            if self.durable:
                _fsync_folder(self.target.parent)
        return [self.target / name for name in names]

    def _commit_into(self, names, replace, replaced) -> None:
        from ..errors import InputError

        if not self.target.is_dir():
            raise InputError("was made a file by another process during this merge; left as it is, this "
                             "merge's output was not put in place", str(self.target))
        stale = replaced(self.target, names)
        if stale and not replace:
            raise taken(self.target / stale[0])
        moved = []
        try:
            for name in names:
                put_in_place(self.path / name, self.target / name, replace)
                moved.append(name)
        except BaseException:
            if not replace:  # only ours were moved (nothing replaced): back out of sight
                for name in moved:
                    os.rename(self.target / name, self.path / name)
            raise
        self._placed = True  # every file is in; what is left is the (now empty) private folder
        with contextlib.suppress(OSError):  # not empty: another process wrote into it; the sweep's
            self.path.rmdir()
        for name in stale:
            if name not in names:
                (self.target / name).unlink(missing_ok=True)
        if self.durable:
            _fsync_folder(self.target)

    def abort(self) -> None:
        """Remove the private folder (this merge's own), unless it was put in place."""
        if not self._placed:
            shutil.rmtree(self.path, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sink:
    """The atomic files a format writes one output into: ``finish`` flushes them all and hands
    them to the writer to commit; ``abort`` removes every temporary."""

    def __init__(self):
        self._files: list[AtomicFile] = []

    def finish(self) -> list[AtomicFile]:
        for f in self._files:
            f.finish()
        return self._files

    def abort(self) -> None:
        for f in self._files:
            f.abort()
        self._files = []


def remove_stale(folder: Path, names: str) -> list[Path]:
    """Remove the temporaries in ``folder`` of the targets whose names match the regex
    ``names`` and whose writing process is gone (files, and ``AtomicFolder``'s private
    folders). Returns what was removed."""
    pattern = re.compile(rf"\.{names}\.(\d+)-[0-9a-f]{{8}}\.tmp")
    removed = []
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = pattern.fullmatch(entry.name)
            if m and not _process_alive(int(m.group(1))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
