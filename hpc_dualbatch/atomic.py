"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A reader (or a crash of this process) never sees a half-written result, plan, timing file or
config. These are not fsynced: after a power loss the new name may hold an empty or older file.
Checkpoints and staged HDF5 files use the same rule with their own writers and are fsynced
before the rename, so they survive a power loss too. The temporary
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

from hpc_dualbatch.errors import OutputError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip


def file_kind(path: str) -> str | None:
    """What `path` is where it is not a regular file (links followed): None for a regular file,
    else "missing", "a directory", "a FIFO", "a symbolic link loop", ... Every file the package
    reads is asked this first, because opening a FIFO blocks until a writer comes (a hang) and
    a directory or loop would otherwise be reported as missing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link (its target does not exist)" if os.path.islink(path) else "missing"
    except OSError as e:
        reasons = {
            errno.ELOOP: "a symbolic link loop",
            errno.ENOTDIR: "missing (a part of its path is a file, not a folder)",
            errno.EACCES: "not accessible (permission denied on it or a folder above it)",
            errno.ENAMETOOLONG: "a name too long for the file system",
        }
        return reasons.get(e.errno, f"not accessible ({e.strerror})")
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str, what: str, error: type[Exception], hint: str) -> None:
    """Raise `error` naming `what` at `path` and what is there unless it is a regular file;
    `hint` says how to get a valid one."""
    kind = file_kind(path)
    if kind == "missing":
        raise error(f"{what} '{path}' does not exist; {hint}")
    if kind is not None:
        raise error(f"{what} '{path}' is {kind}, not a regular file; {hint}")


MAX_JSON_BYTES = 4 << 20  # timing and plan files hold a few kB; a larger one is not ours


def read_json(path: str, what: str, error: type[Exception], hint: str) -> Any:
    """The JSON document at `path`, a regular file of at most MAX_JSON_BYTES; anything else
    (unreadable, not JSON, nested too deeply to parse, too large) is `error` naming `what`."""
    check_regular(path, what, error, hint)
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise error(f"{what} '{path}' is {size / 1e6:.1f} MB, more than any such file holds; {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise error(f"{what} '{path}' nests too deeply to be one; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} '{path}' is not readable JSON ({e}); {hint}") from None


def check_writable_target(path: str, what: str, error: type[Exception]) -> None:
    """Raise unless `path` is missing or a regular file: a file written there replaces it
    (temporary name, rename), which a directory refuses, and reading a FIFO there hangs."""
    kind = file_kind(path)
    if kind not in (None, "missing") and not kind.startswith("a broken symbolic link"):
        raise error(f"{what} '{path}' is {kind}; give the path of a file to write (it is replaced)")


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
