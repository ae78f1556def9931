"""The parameter server's driver (rank 0): every receive and send of the server side of
the protocol (`protocol.py`), the signals and the sleeping wait; the decisions are
`server.ParameterServer`'s, which knows no MPI.

Checkpoints are barriers: from a checkpoint commit on, each pushing group is merged and
parked (no reply) until every active group is parked; then each sends its momentum, the
server writes one checkpoint and releases them.
"""

from __future__ import annotations

import resource
import signal
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from . import protocol as P
from .server import Outgoing, ParameterServer


def send(world: Any, leaders: tuple[int, ...], out: Outgoing) -> None:
    dest = leaders[out.group]
    world.Send(out.header, dest=dest, tag=P.TAG_REP)  # PS: reply header
    world.Send(out.params, dest=dest, tag=P.TAG_W)  # PS: global parameters
    world.Send(out.buffers, dest=dest, tag=P.TAG_BN)  # PS: BN buffers
    if out.momentum is not None:
        world.Send(out.momentum, dest=dest, tag=P.TAG_OPT)  # PS: the group's momentum (resume)


def serve(ps: ParameterServer, topo: Any) -> str:
    """Serve the groups' leaders until every group has been told STOP and its last evaluation
    is in. Returns "done" or "preempted"; sets ps.cpu_seconds and ps.serve_seconds."""

    def on_signal(signum: int, frame: Any) -> None:
        ps.preempt = signum  # SIGTERM / SIGUSR1 (Slurm before a time limit): checkpoint and stop

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    world, leaders = topo.world, topo.leaders
    back = P.Backoff(ps.cfg.server.poll_min_s, ps.cfg.server.poll_max_s)
    hdr = np.zeros(P.HDR_LEN, np.float64)
    wbuf = np.empty_like(ps.s.weights)
    n_p = ps.n_params
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    while ps.serving():
        ps.check_preempt()
        g_next = ps.next_group()
        src = MPI.ANY_SOURCE if g_next is None else leaders[g_next]
        status = P.recv(world, hdr, src, P.TAG_REQ, back)  # PS: next request header
        src = status.Get_source()
        g, kind = int(hdr[P.Req.GROUP]), int(hdr[P.Req.KIND])
        ps.served(g, kind)
        if kind == P.Kind.EVAL:
            bufs = np.empty(wbuf.size - n_p, np.float32)
            P.recv(world, bufs, src, P.TAG_BN, back)  # PS: the BN buffers it evaluated with
            ps.on_eval(g, hdr, bufs)
        elif kind == P.Kind.HELLO:
            send(world, leaders, ps.answer(g))
        elif kind == P.Kind.MERGE:
            P.recv(world, wbuf, src, P.TAG_W, back)  # PS: the group's weights
            send(world, leaders, ps.on_merge(g, hdr, wbuf))
        elif kind == P.Kind.PUSH:
            P.recv(world, wbuf, src, P.TAG_W, back)  # PS: the group's weights
            replies = ps.on_push(g, hdr, wbuf)
            if ps.barrier_full():
                for h in ps.parked:  # every parked leader sends its group's momentum
                    world.Send(P.reply(P.Status.SEND_STATE), dest=leaders[h], tag=P.TAG_REP)  # PS
                    P.recv(world, ps.s.momentum[h], leaders[h], P.TAG_OPT, back)  # PS: momentum
                replies = ps.checkpoint()
            for out in replies:
                send(world, leaders, out)
        else:
            raise RuntimeError(f"protocol error: request kind {kind} from rank {src}")
    # The server's own CPU use while serving: it must sleep, not spin, while it waits.
    ps.cpu_seconds, ps.serve_seconds = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    ps.progress.line(
        f"server: {ps.s.commits} commits in {ps.wall():.1f}s; server CPU "
        f"{ps.cpu_seconds / max(ps.serve_seconds, 1e-9):.3f} s per wall second"
    )
    return ps.outcome()


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
