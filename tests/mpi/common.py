"""Shared by the in-process MPI tests: a layout for any world size, and agreeing before asserting."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any


def groups_for(size: int) -> list[int]:
    """1 server + the rest in groups of at most 2 ranks: 2 -> [1], 3 -> [2], 4 -> [2, 1]."""
    rest, groups = size - 1, []
    while rest:
        groups.append(min(2, rest))
        rest -= groups[-1]
    return groups


def all_true(comm: Any, ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank: a failure on one rank fails the test on
    all of them instead of leaving the others blocked in their next collective."""
    from mpi4py import MPI

    return bool(comm.allreduce(bool(ok), op=MPI.LAND))  # MPI: agree before asserting


def agreed(comm: Any, check: Callable[[], tuple[bool, str]]) -> None:
    """Run `check() -> (ok, why)` on this rank (an exception is a failed check) and assert on
    every rank that it passed on every rank; the message names each failed rank and why."""
    try:
        ok, why = check()
    except Exception:
        ok, why = False, traceback.format_exc()
    seen = comm.allgather((bool(ok), why))  # MPI: every rank learns every verdict
    failed = [f"rank {r}: {w}" for r, (o, w) in enumerate(seen) if not o]
    assert not failed, "\n".join(failed)
