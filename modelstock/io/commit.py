"""Putting an output in place: the moment a merge's work becomes visible.

Everything a merge writes is built where no one else looks (a temporary file beside its target,
or a private folder) and put in place at the end, one rename per file or folder. That moment
runs under a lock on the output's folder, so that the rule "an existing output is replaced only
with force" is applied to what is there *then*, not to what was there when the merge started:
of two merges into one new place, exactly one wins and the other is refused.

- The lock is ``flock`` on the output's parent folder itself (Linux allows it on a folder), so
  nothing is left behind; where the file system refuses it (some network file systems), a lock
  file beside the output is used instead, removed on release (checked to be the same file after
  locking, so a lock file removed meanwhile is never trusted).
- Without force, each rename refuses to replace (``renameat2(RENAME_NOREPLACE)``), so even a
  process that takes no lock cannot have its file replaced; where the kernel or file system
  lacks it, a file is linked into place (``link`` fails on an existing name) and a folder is
  checked under the lock.
- Ctrl-C and SIGTERM are held off while the renames run (a few milliseconds) and delivered
  right after, so an output is never half in place.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock (the renames still refuse to replace)
    fcntl = None

from ..errors import InputError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# errors that say "this kernel or file system cannot", not "this name exists"
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


class OutputTaken(InputError):
    """The output appeared (another process wrote it) while this merge ran."""


def taken(path) -> OutputTaken:
    return OutputTaken("was written by another process during this merge; left as it is, this merge's output "
                       "was not put in place (use --force / force=True to replace it)", str(path))


def _libc_renameat2():
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_renameat2 = _libc_renameat2()


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (see the module)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in _UNSUPPORTED:
            raise OSError(e, os.strerror(e), str(dst))
    if os.path.isdir(src):  # no link for folders: the check holds under the caller's lock
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.EEXIST,):
            raise
        if os.path.lexists(dst):  # a file system without hard links: the check under the lock
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def put_in_place(src: str | os.PathLike, dst: str | os.PathLike, replace: bool) -> None:
    """One rename: replacing whatever ``dst`` is with ``replace``, else OutputTaken if it exists."""
    if replace:
        os.replace(src, dst)
        return
    try:
        rename_noreplace(src, dst)
    except FileExistsError:
        raise taken(dst) from None


@contextlib.contextmanager
def output_lock(out: str | os.PathLike):
    """Held while an output is checked and put in place: ``flock`` on its parent folder, or a
    lock file beside it where that is refused (see the module). Ctrl-C while waiting stops."""
    out = Path(os.path.abspath(out))
    if fcntl is None:
        yield
        return
    fd = os.open(out.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        os.close(fd)
        if e.errno not in _UNSUPPORTED | {errno.EBADF, errno.ENOLCK}:
            raise
        with _lock_file(out):
            yield
        return
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _lock_file(out: Path):
    path = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed it: lock the file now there
    try:
        yield
    finally:
        try:
            os.unlink(path)  # still ours: whoever waits on this inode retries on the new one
        finally:
            os.close(fd)


class _Deferred:
    def __init__(self):
        self.signals: list[int] = []

    def __call__(self, signum, frame):
        self.signals.append(signum)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block is left, then act as they would have; the
    block's effects stay (the output is in place), and an exception the signal raises says so
    (``committed = True``). Only the main thread can hold them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deferred = _Deferred()
    previous = {s: signal.signal(s, deferred) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(deferred.signals):
            handler = previous[s]
            try:
                if callable(handler):
                    handler(s, None)
                elif handler == signal.SIG_DFL:
                    signal.raise_signal(s)
            except BaseException as e:
                e.committed = True
                raise


@contextlib.contextmanager
def committing(out: str | os.PathLike):
    """The moment an output is put in place: its folder locked, Ctrl-C and SIGTERM held."""
    with output_lock(out), signals_held():  # waiting for the lock stays interruptible
        yield
