"""How every command ends: one clear message and a non-zero exit on every rank.

Two kinds of failure, two ways out (never a hang):

* During start-up every rank runs the same checks (config, world size, data file,
  plan) inside `agree()`: the ranks exchange their outcome with one allgather and,
  if any failed, all raise the first failure. Rank 0 prints it once; every rank
  exits with the error's code. No rank is left waiting because all reach the
  allgather.
* After start-up, an error on one rank cannot be agreed on (its peers may be
  waiting in a receive or an allreduce): that rank prints its message and calls
  `MPI_Abort`, which ends every rank of the job with a non-zero code.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from hpc_dualbatch.errors import HDBError

T = TypeVar("T")


class AgreedError(HDBError):
    """A start-up failure that every rank knows about (raised on all ranks by `agree`)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _mpi_world() -> Any:
    """COMM_WORLD when this process is an MPI job of more than one rank, else None."""
    if "mpi4py.MPI" not in sys.modules:
        return None
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized() or MPI.COMM_WORLD.Get_size() == 1:
        return None
    return MPI.COMM_WORLD


def agree(comm: Any, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank of `comm`; if it fails anywhere, raise on every rank.

    `comm` may be None (a single process).
    """
    outcome: tuple[str, int] | None = None
    result: Any = None
    try:
        result = fn()
    except HDBError as e:
        outcome = (str(e), e.exit_code)
    except Exception as e:  # a bug or an environment failure: keep its type in the message
        outcome = (f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 1)
    if comm is None:
        if outcome:
            raise AgreedError(*outcome)
        return result
    outcomes = comm.allgather(outcome)  # MPI: every rank reaches this line, failed or not
    for rank, out in enumerate(outcomes):
        if out is not None:
            msg, code = out
            where = f" (rank {rank})" if comm.Get_size() > 1 and any(o != out for o in outcomes) else ""
            raise AgreedError(msg + where, code)
    return result


def _rank() -> int:
    world = _mpi_world()
    return world.Get_rank() if world is not None else 0


def fail(message: str, code: int) -> None:
    """Print `message` for this rank and end the whole job (all ranks) with `code`."""
    world = _mpi_world()
    prefix = f"hpc-dualbatch: error (rank {world.Get_rank()}): " if world else "hpc-dualbatch: error: "
    sys.stderr.write(prefix + message.rstrip() + "\n")
    sys.stderr.flush()
    if world is not None:
        world.Abort(code)  # MPI: ends every rank; peers blocked in receives cannot hang
    os._exit(code)


def run_main(func: Callable[[Any], int | None], args: Any) -> int:
    try:
        return int(func(args) or 0)
    except AgreedError as e:
        if _rank() == 0:
            sys.stderr.write(f"hpc-dualbatch: error: {e}\n")
            sys.stderr.flush()
        return e.exit_code
    except HDBError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BaseException as e:  # noqa: BLE001 - any other exception must end every rank
        if isinstance(e, SystemExit) and not e.code:
            return 0
        fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 1)
    return 1  # not reached: fail() does not return
