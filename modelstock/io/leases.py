"""Inputs guarded while a merge reads them.

The merge maps its inputs; a process that truncates one mid-merge makes the next touch of the
map a SIGBUS, which no Python code can catch. Where Linux allows (a read lease: a local file
the user owns), each input file gets a read lease for the merge's duration: another process
that opens it for writing or truncates it then waits (up to ``/proc/sys/fs/lease-break-time``,
45 s by default) and this process gets SIGIO. The handler only records it; the merge checks at
each layer (``check``) and stops with one line naming the file, and the waiting process
proceeds once the merge has let go. Where no lease can be had (another owner, a network file
system, a thread other than the main one), nothing changes: a truncated input still ends the
process with SIGBUS.
"""
from __future__ import annotations

import os
import signal
import threading

from ..errors import InputError

try:
    import fcntl

    _LEASES = hasattr(fcntl, "F_SETLEASE") and hasattr(signal, "SIGIO")
except ImportError:  # not a POSIX system
    _LEASES = False


class InputChanged(InputError):
    """An input was opened for writing or truncated by another process during the merge."""


class InputGuard:
    """``with InputGuard(paths) as guard: ... guard.check() ...`` (see the module)."""

    def __init__(self, paths):
        self.paths = list(dict.fromkeys(str(p) for p in paths))
        self._held: list[tuple[int, str]] = []
        self._broken = False
        self._previous = None

    def __enter__(self):
        if not _LEASES or threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGIO)
        if previous not in (signal.SIG_DFL, signal.SIG_IGN):
            return self  # the program uses SIGIO itself: leave it alone
        self._previous = previous
        signal.signal(signal.SIGIO, self._on_break)
        for path in self.paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError:  # not the owner, a file open for writing elsewhere, a network file system
                os.close(fd)
                continue
            self._held.append((fd, path))
        return self

    def _on_break(self, signum, frame) -> None:
        self._broken = True  # acted on at the next check: never raised inside arbitrary code

    def check(self) -> None:
        """InputChanged naming the input if another process is waiting to change one."""
        if not self._broken:
            return
        for fd, path in self._held:
            if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:  # this lease is being broken
                raise InputChanged("was opened for writing or truncated by another process during the merge; "
                                   "stopped before it changed, nothing was written", path)
        raise InputChanged("an input was opened for writing or truncated by another process during the merge; "
                           "stopped before it changed, nothing was written")

    def __exit__(self, *exc):
        for fd, _ in self._held:  # released first, so no lease outlives the handler
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            finally:
                os.close(fd)
        self._held = []
        if self._previous is not None:
            signal.signal(signal.SIGIO, self._previous)
            self._previous = None
