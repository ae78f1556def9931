"""Shared by the in-process MPI tests: a layout for any world size, and agreeing before asserting."""

from __future__ import annotations

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
