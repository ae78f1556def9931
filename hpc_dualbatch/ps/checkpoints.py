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


def write(
    ps: Any, writer: C.Writer | None = None, final: bool = False, missing: list[int] | None = None
) -> str:
    """Write a checkpoint of the training state of `ps` (the `server.ParameterServer`; not
    imported, since it imports this module). `writer`: the barrier's, holding the momentum the
    parked groups sent. Without one (the end of a run): the checkpoint this process wrote last if
    nothing was merged since (a preemption ends after its barrier), else a new one holding the
    momentum of a resume nobody has trained from yet, or none (a finished run: training never
    reads it back). `final`: the run is done, so the saved model carries the BN buffers its final
    evaluation used (recalibrated, or the evaluating group's own under bn: local). `missing`:
    groups left out (recorded; the resume says so)."""
    s = ps.s
    if writer is None:
        if not final and ps.written is not None and ps.written[0] == s.merges:
            return ps.written[1]
        writer = ps.checkpoint_writer()
        carry = s.momenta is not None and s.merges == ps.resumed_merges  # still the resumed state
        if ps.parts is not None:  # the other shards write their parts too
            ps.parts.begin(s.commits, [], carry)
        if carry:
            for g in s.momenta.saved:
                writer.add_momentum(g, s.momenta.get(g))
    lacking = ps.parts.end() if ps.parts is not None else []  # every part durable before the manifest
    weights, final_buffers = s.weights, None
    if final and ps.final_buffers is not None:
        if ps.parts is not None:  # the buffers live on other shards: the manifest carries the evaluated ones
            final_buffers = ps.final_buffers
        else:
            weights = s.weights.copy()
            weights[ps.n_params :] = ps.final_buffers
            if ps.average is not None:  # the model evaluated: the tail average (schedule.average)
                weights[: ps.n_params] = ps.average.params(weights[: ps.n_params])
    extra: dict[str, Any] = {
        "pending_evals": {str(g): e for g, e in s.pending_evals.items()},
        "merges": s.merges,
        **({"missing_groups": missing} if missing else {}),
        **({"adapt": ps.adapter.state()} if ps.adapter else {}),
        **({"outer_count": ps.outer.count} if ps.outer else {}),
        **({"average_count": ps.average.count} if ps.average else {}),
    }
    saved = [g for g in writer.groups if g not in lacking]  # a group some shard lacks restarts from zero
    ck = C.Checkpoint(
        weights, C.Momenta(ps.n, ps.n_params, saved), s.commits, list(s.rounds), ps.wall(),
        ps.log.offset(), ps.cfg.to_dict(), extra, group_buffers=s.group_buffers,
        outer=s.outer if ps.outer else None, shards=ps.parts.meta if ps.parts is not None else None,
        final_buffers=final_buffers, average=ps.average.mean if ps.average else None,
    )  # fmt: skip
    path = writer.finish(ck, keep=ps.cfg.checkpoint.keep)
    ps.written = (s.merges, path)
    return path


def end_without(ps: Any, missing: list[int], writer: C.Writer) -> NoReturn:
    """Checkpoint the state without the `missing` groups' work in flight (`writer` has no
    momentum of theirs: they restart from zero on resume), then raise StalledError."""
    s, roster, now = ps.s, ps.roster, time.perf_counter()
    lost = [g for g in missing if g in roster.outstanding]
    for g in lost:
        s.rounds[g] -= 1  # handed out again on resume, with the same data order (its round)
    for g, (epoch, merges) in roster.eval_asked.items():  # evaluations asked for, not received
        if merges == s.merges:  # of the weights saved now: the resume evaluates them (once: a
            if epoch not in s.pending_evals.values():  # shared final evaluation asked every group)
                s.pending_evals[g] = epoch
        else:  # of weights merged over since: nothing can measure them any more
            why = f"evaluation of epoch {epoch:g} lost: group {g} did not send it before the run ended"
            ps.log.write(
                gap_record(after_commit=s.commits, up_to_commit=s.commits, missing_bytes=0, reason=why)
            )
    path = write(ps, writer, missing=missing)
    who = ps.watch.who(missing, ps.group_ranks, now)
    message = left_out_message(who, ps.cfg, bool(ps.preempt), ps.watch.bound(), path, bool(lost))
    raise StalledError(message, "preempted" if ps.preempt else "stalled")
