"""What the parameter server's checkpoints hold, and the one written when groups are left out.

A checkpoint barrier (server.py) makes the saved state exactly the state the run continues from.
When the stall watch has left groups out (`stalls.py`), the checkpoint is written without their
work in flight: an unfinished task is handed out again on resume (same data order: its round),
their momentum restarts from zero, an evaluation asked of weights merged over since is a `gap`
record (one of the weights saved now is asked again on resume), and the run ends.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

from hpc_dualbatch.errors import StalledError
from hpc_dualbatch.ps.stalls import left_out_message
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.metrics import gap_record


def write(ps: Any, final: bool = False, missing: list[int] | None = None) -> str:
    """Write a checkpoint of the training state of `ps` (the `server.ParameterServer`; not
    imported, since it imports this module). `final`: the run is done, so the saved model carries
    the BN buffers its final evaluation used (recalibrated, or the evaluating group's own under
    bn: local); training never reads them back. `missing`: groups left out (recorded; the resume
    says so)."""
    s = ps.s
    weights = s.weights
    if final and ps.final_buffers is not None:
        weights = s.weights.copy()
        weights[ps.n_params :] = ps.final_buffers
    extra: dict[str, Any] = {
        "pending_evals": {str(g): e for g, e in s.pending_evals.items()},
        "merges": s.merges,
        **({"missing_groups": missing} if missing else {}),
        **({"adapt": ps.adapter.state()} if ps.adapter else {}),
        **({"outer_count": ps.outer.count} if ps.outer else {}),
    }
    ck = C.Checkpoint(
        weights, s.momentum, s.commits, list(s.rounds), ps.wall(), ps.log.offset(), ps.cfg.to_dict(),
        extra, group_buffers=s.group_buffers, outer=s.outer if ps.outer else None,
    )  # fmt: skip
    return C.save(ps.cfg.out, ck, keep=ps.cfg.checkpoint.keep)


def end_without(ps: Any, missing: list[int]) -> NoReturn:
    """Checkpoint the state without the `missing` groups' work in flight, then raise StalledError."""
    s, roster, now = ps.s, ps.roster, time.perf_counter()
    lost = [g for g in missing if g in roster.outstanding]
    for g in lost:
        s.rounds[g] -= 1  # handed out again on resume, with the same data order (its round)
    for g, (epoch, merges) in roster.eval_asked.items():  # evaluations asked for, not received
        if merges == s.merges:  # of the weights saved now: the resume evaluates them
            s.pending_evals.setdefault(g, epoch)
        else:  # of weights merged over since: nothing can measure them any more
            why = f"evaluation of epoch {epoch:g} lost: group {g} did not send it before the run ended"
            ps.log.write(
                gap_record(after_commit=s.commits, up_to_commit=s.commits, missing_bytes=0, reason=why)
            )
    s.momentum[missing] = 0.0  # never received (or stale): restarts from zero on resume
    path = write(ps, missing=missing)
    who = ps.watch.who(missing, ps.group_ranks, now)
    message = left_out_message(who, ps.cfg, bool(ps.preempt), ps.watch.bound(), path, bool(lost))
    raise StalledError(message, "preempted" if ps.preempt else "stalled")
