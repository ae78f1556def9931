"""The parameter server's driver (rank 0, shard 0 of `server.shards`): every receive and send
of the server side of the protocol (`protocol.py`), the signals and the sleeping wait; the decisions are
`server.ParameterServer`'s, which knows no MPI.

Checkpoints are barriers: from a checkpoint commit on, each pushing group is merged and
parked (no reply) until every active group is parked; then each sends its momentum, the
server writes one checkpoint and releases them. No wait is unbounded where a group can stall:
a request is awaited until `stalls.Watch.deadline`, a request's body and a momentum
within the stall bound; a group that misses them is left out (ps/stalls.py).

Replies are handed to MPI and travel while the server waits for and receives the next request
(`protocol.InFlight`): a large message moves only when its receiver, asleep in its own Backoff,
next tests it, and the server need not wait for that. They are settled (taken, or their group
left out at the stall bound) before the next merge changes the weights they read, and before a
checkpoint barrier.
"""

from __future__ import annotations

import resource
import signal
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from hpc_dualbatch.ps import protocol as P
from hpc_dualbatch.ps.server import Outgoing, ParameterServer
from hpc_dualbatch.ps.shards import Op, Order, Orders, Parts, slices
from hpc_dualbatch.runtime.topology import group_layout

TICK_S = 1.0  # a wait for the next request wakes this often to act on a signal, seconds
WRITE_S = 600.0  # s a server shard may take to write its checkpoint part (its slice: a few GB at most)


def serve(ps: ParameterServer, topo: Any, n_weights: int, n_buffers: int) -> str:
    """Serve the groups' leaders until every group has been told STOP and its last evaluation
    is in. Returns "done" or "preempted"; sets ps.cpu_seconds and ps.serve_seconds. Raises
    StalledError (after a checkpoint) when a group is left out (`ParameterServer.leave_out`).
    `n_weights`, `n_buffers`: the whole model's (this shard holds a slice; an evaluation sends
    every BN buffer to it). With several shards (`server.shards`) this is shard 0: it tells the
    others what to apply and whom to answer (`shards.Orders`), in the order it decides."""

    def on_signal(signum: int, frame: Any) -> None:
        ps.preempt = signum  # SIGTERM / SIGUSR1 (Slurm before a time limit): checkpoint and stop
        ps.watch.start_cutoff(time.perf_counter())  # (also ends a wait on a group that never answers)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    world, leaders = topo.world, topo.leaders
    layout = group_layout(ps.cfg.workers.groups, len(topo.servers))
    ps.group_ranks = [tuple(r for r, x in enumerate(layout) if x == g) for g in range(ps.n)]
    back = P.Backoff(ps.cfg.server.poll_min_s, ps.cfg.server.poll_max_s)
    hdr = np.zeros(P.HDR_LEN, np.float64)
    wbuf = np.empty_like(ps.s.weights)
    mbuf = np.empty(ps.n_params, np.float32)
    send_state = P.Task(P.Status.SEND_STATE).pack()  # at a barrier: "send your momentum"

    def allow() -> float:
        """Seconds the leaders of an order may take now, by this shard's stall watch."""
        now = time.perf_counter()
        return ps.watch.exchange_deadline(now) - now

    orders = Orders(world, len(topo.servers), ps.n, allow)
    if orders:  # the other shards' checkpoint parts, and their accounts at the end
        ps.parts = Parts(orders, back, WRITE_S, slices(n_weights, len(topo.servers)))

    def bound_from_now() -> P.Until:
        """How long an exchange with a group that has begun may take (`Watch.exchange_deadline`;
        asked again during the wait, since a signal may set a cutoff)."""
        started = time.perf_counter()
        return lambda: ps.watch.exchange_deadline(started)

    flight = P.InFlight()
    arrivals = P.Arrivals() if ps.cfg.server.poll_predict else None  # when the next request is due

    def send(out: Outgoing) -> None:
        """A reply, in the order of `Outgoing`, handed to MPI: the server serves on while it
        travels (`settle` before anything it reads changes)."""
        dest, by = leaders[out.group], bound_from_now()
        if arrivals is not None:
            arrivals.reply(out.group, time.perf_counter())
        parts = [(out.task.pack(), P.TAG_REP), (out.params, P.TAG_W), (out.buffers, P.TAG_BN)]
        if out.momentum is not None:
            parts.append((out.momentum, P.TAG_OPT))  # the group's momentum (resume)
        for buf, tag in parts:
            if buf is not None:  # (no parameters: the mean BN statistics of a shared evaluation)
                flight.post(world, buf, dest, tag, out.group, by)  # PS: header, parameters, BN, momentum
        if orders and out.params is not None:  # the other shards send their slices
            orders.send(Order(Op.REPLY, out.group, has_state=out.momentum is not None))

    def settle() -> None:
        """Every reply in flight taken; a group that does not take its reply within the stall
        bound (a stopped rank stops receiving mid-message) is left out for good."""
        for g in flight.settle(back):
            ps.leave_out([g], time.perf_counter(), for_good=True)

    def body(buf: np.ndarray, g: int, tag: int) -> bool:
        """Receive what follows a request of group g; False (g left out) if it does not come
        within the stall bound."""
        if P.recv(world, buf, leaders[g], tag, back, bound_from_now()) is None:  # PS: a request's body
            ps.leave_out([g], time.perf_counter(), for_good=True)
            return False
        return True

    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    idle = 0.0  # seconds spent waiting for the next request: the rest of serving is busy
    while ps.roster.serving():
        ps.check_preempt()
        for out in ps.roster.release():  # order: rounds, after a group was left out
            send(out)
        if ps.barrier_full():
            settle()
            writer = ps.checkpoint_writer()  # each group's momentum goes to disk as it comes
            parked = [h for h in ps.roster.parked if h not in ps.watch.stalled]
            if ps.parts is not None:  # every shard takes its slice of each parked group's momentum
                ps.parts.begin(ps.s.commits, parked)
            try:
                for h in parked:  # each sends its momentum
                    if not P.send(world, send_state, leaders[h], P.TAG_REP, back, bound_from_now()):  # PS
                        ps.leave_out([h], time.perf_counter(), for_good=True)
                    elif body(mbuf, h, P.TAG_OPT):  # PS: the group's momentum
                        writer.add_momentum(h, mbuf)
                    else:
                        mbuf = np.empty_like(mbuf)  # an abandoned receive may still write into the old one
                replies = ps.checkpoint(writer)  # (with groups left out: raises StalledError)
            except BaseException:
                writer.abort()  # (a finished writer has nothing left to drop)
                raise
            for out in replies:
                send(out)
            continue
        g_next = ps.roster.next_group()
        src = MPI.ANY_SOURCE if g_next is None else leaders[g_next]
        tick = time.perf_counter() + TICK_S
        wake = min(tick, ps.watch.deadline(ps.roster.awaited()) or tick)
        t_wait = time.perf_counter()
        due = arrivals.due() if arrivals is not None else None
        status = P.recv(world, hdr, src, P.TAG_REQ, back, wake, due)  # PS: next request header
        t_heard = time.perf_counter()
        idle += t_heard - t_wait
        if status is None:  # nobody spoke in time: a request queued behind g_next is not silence
            queued = {g for g in ps.roster.awaited() if world.Iprobe(source=leaders[g], tag=P.TAG_REQ)}  # PS
            ps.on_silence(time.perf_counter(), queued)
            continue
        try:
            req = P.Request.unpack(hdr)
        except ValueError:  # not a Kind
            who = status.Get_source()
            raise RuntimeError(f"protocol error: request kind {hdr[P.Req.KIND]} from rank {who}") from None
        g = req.group
        if g in ps.watch.gone:  # its last body never came; what it sends now would be misread
            continue
        ps.served(g, req.kind)
        if arrivals is not None:
            arrivals.request(g, t_heard)
        if req.kind in (P.Kind.EVAL, P.Kind.STATS):
            bufs = np.empty(n_buffers, np.float32)
            if body(bufs, g, P.TAG_BN):  # PS: the BN buffers it evaluated with, or its statistics
                if req.kind == P.Kind.STATS:  # the mean to every group once all groups' are in
                    outs = ps.on_stats(g, bufs)
                else:  # its pull, unless it was told STOP
                    assert req.evaluation is not None  # (Request.unpack fills it for EVAL)
                    outs = ps.on_eval(g, req.evaluation, bufs)
                for out in outs:
                    send(out)
        elif req.kind == P.Kind.HELLO:
            send(ps.answer(g))
        elif not body(wbuf, g, P.TAG_W):  # PS: the group's weights (MERGE, PUSH)
            wbuf = np.empty_like(wbuf)
        else:  # MERGE or PUSH: none while g is parked at a barrier or held for its round
            settle()  # the replies in flight read the weights this push changes
            outs = ps.on_merge(req, wbuf) if req.kind == P.Kind.MERGE else ps.on_push(req, wbuf)
            if orders:  # the other shards fold their slices with this push's weight
                h, a, lr = ps.last_push
                orders.send(Order(Op.APPLY, h, a, lr, ps.s.commits))
            for out in outs:
                send(out)
    settle()
    # The server's own CPU use while serving: it must sleep, not spin, while it waits.
    ps.cpu_seconds, ps.serve_seconds = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    ps.busy_seconds = ps.serve_seconds - idle
    ps.late_ms = back.late_ms()
    ps.progress.line(
        f"server: {ps.s.commits} commits in {ps.wall():.1f}s; server CPU "
        f"{ps.cpu_seconds / max(ps.serve_seconds, 1e-9):.3f} s per wall second"
    )
    return ps.outcome()


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
