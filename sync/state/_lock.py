"""Whether a run of a job holds its lock, told without taking it (``pushsync runs`` and ``show``: a run recorded
``running`` that no process runs any more died). Its own module: the commands that read past runs need not
import the state's data plane (polars)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["job_lock_held"]


def job_lock_held(workdir: Path) -> bool | None:
    """Whether a process holds the lock of a job whose workdir is ``workdir`` (the ``.lock`` of any state directory
    under it, :meth:`sync.state._store.FileBackend.lock`): a run holds it from before it records its start to after it records its
    end. Read from the kernel's table of locks (``/proc/locks``), without taking the lock — a run starting meanwhile
    must not find it taken. None when that cannot be told (no ``/proc/locks``: not Linux). Only this machine's
    processes (and, in a container, its own PID namespace's) are seen."""
    files = sorted(workdir.glob("state/*/.lock"))
    if not files:
        return False  # no run of a job in this workdir ever took its lock
    try:
        table = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    held: set[tuple[int, int, int]] = set()
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2261804 0 EOF"; a process waiting for a lock has "->" before its
        # kind: a waiter holds nothing.
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        device, _, inode = fields[5].rpartition(":")
        major, _, minor = device.partition(":")
        try:
            held.add((int(major, 16), int(minor, 16), int(inode)))
        except ValueError:
            continue
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held:
            return True
    return False
