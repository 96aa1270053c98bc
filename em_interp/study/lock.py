"""One study at a time per output folder: an exclusive lock on ``OUT/study.lock`` while a study runs.

Two ``em-interp study`` runs started into one ``--out`` used to race (one's start-up cleanup deleted
the other's temporary files; once a folder ended up holding stage files of two studies). The second
run is now refused at once, naming the holder (process id, host, start time). The lock is an
advisory ``flock`` held for the whole run and dropped by the operating system when the process
ends, however it ends (a killed study leaves no stale lock); the file itself stays, empty when free.
POSIX only (``fcntl``), like the rest of the package's file handling.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from em_interp.errors import EmInterpError

LOCK_FILE = "study.lock"


class StudyFolderInUse(EmInterpError):
    """Another process is running a study into the same output folder."""


@contextlib.contextmanager
def study_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of study folder ``out`` for the block; refuse at once if another process holds it."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise EmInterpError(f"--out {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that has not written its name yet"
            raise StudyFolderInUse(f"{folder} is in use by another study ({holder}); wait for it to finish or "
                                   "use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # free: an empty file (the lock itself goes with the descriptor)
    finally:
        os.close(fd)
