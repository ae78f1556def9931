"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A reader (or a crash) never sees a half-written result, plan, timing file or config.
Checkpoints and staged HDF5 files use the same rule with their own writers. The temporary
file is created exclusively (an existing file or link of that name is an error, never
written through), and the rename replaces a link at the final name instead of following it.
Files a run appends to in place (the lock, metrics.jsonl, command.txt) are opened with
`open_regular`, which neither follows a link nor opens anything but a regular file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import IO, Any

from .errors import OutputError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip


def open_regular(path: str) -> IO[bytes]:
    """`path` opened for appending (created if missing), binary, only where it is a regular file:
    a symbolic link is refused rather than followed (in a shared, group-writable run folder a
    link would let another user's file be truncated or appended to), and so is a FIFO (opening
    one for writing waits for a reader: a hang), a directory or a device. OutputError names the
    file and what it is."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    hint = "remove it; the run writes its own files there"
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"'{path}' is a symbolic link, not followed for writing; {hint}") from None
        if e.errno == errno.ENXIO:
            raise OutputError(f"'{path}' is a FIFO, not a regular file; {hint}") from None
        if e.errno == errno.EISDIR:
            raise OutputError(f"'{path}' is a directory, not a regular file; {hint}") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise OutputError(f"'{path}' is {kind}, not a regular file; {hint}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # exclusive: never through a planted link
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, **dump_kwargs) + "\n")
