"""The package's own error types.

Every failure caused by user input (a config, a data file, a plan, a checkpoint)
raises a subclass of `HDBError` with a message that names the file, key or value
and what would be valid. The CLI prints these as one line, without a traceback,
and exits non-zero on every rank (see `hpc_dualbatch.launch`).
"""

from __future__ import annotations


class HDBError(Exception):
    """Base class: an error the user can fix from the message alone."""

    exit_code = 2


class ConfigError(HDBError):
    """A config key, type or value is wrong (or the world size does not match it)."""


class DataError(HDBError):
    """A data source or staged HDF5 file is missing, corrupt or inconsistent."""


class PlanError(HDBError):
    """A dual-batch plan or timing file cannot work."""


class CheckpointError(HDBError):
    """A checkpoint is missing, corrupt or belongs to another config."""


class OutputError(HDBError):
    """The output folder (run folder, report folder) cannot be created or written."""


class DivergedError(HDBError):
    """Training's loss or weights became non-finite: the run stops rather than merge them."""

    exit_code = 3

    @classmethod
    def at(cls, commit: int, epoch: float, group: int, what: str, lr: float, momentum: tuple[str, float],
           batch: int, px: int, out: str) -> DivergedError:  # fmt: skip
        """`momentum`: (config key, value), `Config.momentum`."""
        key, mu = momentum
        return cls(
            f"training diverged at commit {commit} (epoch {epoch:.2f}): group {group}'s {what}, training at "
            f"lr {lr:g}, {key} {mu:g}, batch {batch}, {px} px; nothing of it was merged. "
            f"Lower schedule.lr or {key} and start again, or resume from the last checkpoint "
            f"in {out}/checkpoints"
        )


class StalledError(HDBError):
    """A worker group was not heard from in time (a stopped, hung or crashed rank): the server
    wrote a checkpoint without it and the job ends. `state` is what status.json says
    ("stalled", or "preempted" when a preemption's checkpoint could not wait for the group)."""

    exit_code = 4

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state
