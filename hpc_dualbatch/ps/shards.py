"""A server of S shards (`server.shards`): each owns a contiguous slice of the flat weights.

Shard 0 (world rank 0) is the parameter server of `server.py` on its own slice: it takes every
request header, decides everything (the push's weight a, commits, the schedule, STOP, the
checkpoint barrier) and tells shards 1..S-1 what to do, in its decision order, by `Order`s.
A leader sends its request header to shard 0 and each shard its slice of the push; it takes the
reply header from shard 0 and each shard's slice of the weights (`worker.py`). Because every
shard applies the same pushes in the same order with the same weight, and the merge rules are
elementwise, the shards' slices together are the weights one server would hold: a
`round_robin` run ends with the weights of S = 1, bit for bit. What is not elementwise, the
push's size, its leader measures over the whole push (`Request.norm`): shard 0 checks it for
finiteness before any shard folds its slice (a non-finite push ends the run "diverged" and
merges nothing anywhere); under `merge: paper` the logged distance to the global weights is shard
0's slice's. Every order carries how long its leaders may take by shard 0's stall watch, so a
shard gives up on a silent group when shard 0 does (an untaken reply is abandoned; a momentum
slice that does not come is reported, and that group's momentum restarts from zero on resume).

Orders, shard 0 -> shard s (TAG_ORDER, float64[ORDER_LEN]):

    APPLY g a lr commit     receive group g's slice of its push, fold it with weight a
    REPLY g has_state       send group g the slice of the weights (and of its momentum on resume)
    CKPT commits n carry    write this shard's part of the checkpoint: the momentum of the n
                            groups that follow (int64[n], TAG_ORDER) as each leader sends it
                            (carry: the resumed momentum, where nobody has trained since), then
                            `Done` back to shard 0 (TAG_DONE), which writes the manifest last
    STOP                    send the shard's account (busy, memory) to shard 0 and end
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from hpc_dualbatch.errors import StalledError
from hpc_dualbatch.ps import protocol as P

TAG_ORDER = 16  # shard 0 -> shard s
TAG_DONE = 17  # shard s -> shard 0: its part of a checkpoint is written (or its account, at STOP)
ORDER_LEN = 8


def slices(n_weights: int, shards: int) -> list[tuple[int, int]]:
    """Shard s owns the flat weights [lo, hi): contiguous, sizes differing by at most one."""
    if shards < 1 or n_weights < shards:
        raise ValueError(f"need 1 <= shards <= n_weights; got {shards} shards of {n_weights} weights")
    bounds = [n_weights * s // shards for s in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def split(lo: int, hi: int, n_params: int) -> tuple[slice, slice]:
    """Within a shard's slice [lo, hi) of the flat weights: its parameters and its BN buffers,
    as slices of the whole flat vector (either may be empty)."""
    mid = min(max(lo, n_params), hi)
    return slice(lo, mid), slice(mid, hi)


class Op(IntEnum):
    APPLY = 1
    REPLY = 2
    CKPT = 3
    STOP = 4


@dataclass(frozen=True)
class Order:
    op: Op
    group: int = -1
    a: float = 0.0  # APPLY: the push's weight (shard 0's rule, staleness included)
    lr: float = 0.0  # APPLY: the inner rate its task trained at (outer momentum's unit)
    commits: int = 0  # APPLY: the commit it belongs to (messages); CKPT: the checkpoint's
    has_state: bool = False  # REPLY: the group's momentum follows (resume); CKPT: carry the resumed
    n: int = 0  # CKPT: groups whose momentum follows
    # s a shard may wait for the leaders this order involves: shard 0's own bound at the time
    # (`stalls.Watch.exchange_deadline`: the stall bound, shortened by a preemption's cutoff), so
    # every shard gives up on a group when shard 0 does; inf: never (server.stall_s 0)
    allow: float = math.inf

    def pack(self) -> np.ndarray:
        fields = [self.op, self.group, self.a, self.lr, self.commits, self.has_state, self.n, self.allow]
        return np.array(fields, np.float64)

    @classmethod
    def unpack(cls, h: np.ndarray) -> Order:
        return cls(
            Op(int(h[0])), int(h[1]), float(h[2]), float(h[3]), int(h[4]), bool(h[5]), int(h[6]), float(h[7])
        )


class Orders:
    """Shard 0's side: what it tells the other shards (nothing with one shard), each order with
    the time its leaders get (`allow`, from shard 0's stall watch). A shard's answer
    (`Done`, float64[3 + n_groups]): [op, busy share, peak MiB, one flag per group whose momentum
    slice did not come] after a checkpoint part or at STOP."""

    def __init__(self, world: Any, shards: int, n_groups: int, allow: Any) -> None:
        self.world, self.others, self.n, self.allow = world, range(1, shards), n_groups, allow

    def __bool__(self) -> bool:
        return len(self.others) > 0

    def send(self, order: Order, groups: list[int] | None = None) -> None:
        order = dataclasses.replace(order, allow=self.allow())
        for s in self.others:
            self.world.Send(order.pack(), dest=s, tag=TAG_ORDER)  # PS shards: the next order (eager)
            if groups is not None:
                self.world.Send(np.array(groups, np.int64), dest=s, tag=TAG_ORDER)  # PS shards: who follows

    def collect(self, back: P.Backoff, until: P.Until) -> list[np.ndarray]:
        """Each other shard's Done; StalledError when one does not come by `until` (a shard that
        stopped: the run cannot go on consistently, the last complete checkpoint stays)."""
        out = []
        for s in self.others:
            buf = np.empty(3 + self.n, np.float64)
            if P.recv(self.world, buf, s, TAG_DONE, back, until) is None:  # PS shards: shard s's Done
                raise StalledError(f"server shard {s} did not answer in time: the job ends", "stalled")
            out.append(buf)
        return out


@dataclass
class ShardState:
    """What shard s >= 1 holds: its slice of the weights (parameters, then buffers), its slice of
    the outer momentum and of each group's own BN buffers."""

    weights: np.ndarray
    n_params: int  # parameters in the slice (the rest are BN buffers)
    group_buffers: np.ndarray  # (n_groups, buffers in the slice)
    outer: np.ndarray | None  # (2, n_params) under server.outer
    momenta: Any = None  # resume: the checkpoint's momentum slices (checkpoint.Momenta)


def serve_shard(cfg: Any, topo: Any, state: ShardState, rule: Any, writer_for: Any) -> dict:
    """Shard s >= 1: carry out shard 0's orders until STOP. `rule`: the merge rule on this slice
    (`merge.make_rule`); `writer_for(commits)`: a `checkpoint.Writer` for this shard's part.
    Returns this shard's account (busy share, peak memory)."""
    import resource

    for sig in (signal.SIGTERM, signal.SIGUSR1):  # shard 0 acts on these; this shard must not die of them
        signal.signal(sig, lambda signum, frame: None)
    world, leaders, n_p = topo.world, topo.leaders, state.n_params
    back = P.Backoff(cfg.server.poll_min_s, cfg.server.poll_max_s)
    hdr = np.zeros(ORDER_LEN, np.float64)
    done = np.zeros(3 + len(leaders), np.float64)  # [op, busy share, peak MiB, missing flags]
    body = np.empty_like(state.weights)
    mbuf = np.empty(n_p, np.float32)
    flight = P.InFlight()
    arrivals = P.Arrivals() if cfg.server.poll_predict else None  # when shard 0's next order is due
    t0, idle = time.perf_counter(), 0.0

    def settle() -> None:
        """The replies in flight taken; one not taken in its allowance is abandoned: its group
        went silent, and shard 0, on the same clock, leaves it out."""
        flight.settle(back)

    while True:
        t_wait = time.perf_counter()
        due = arrivals.due() if arrivals is not None else None  # (orders follow the groups' pushes)
        P.recv(world, hdr, 0, TAG_ORDER, back, None, due)  # PS shards: shard 0's next order
        t_heard = time.perf_counter()
        idle += t_heard - t_wait
        order = Order.unpack(hdr)
        g, by = order.group, t_heard + order.allow
        if arrivals is not None and order.op == Op.APPLY:  # (an order follows its group's push)
            arrivals.request(g, t_heard)
        elif arrivals is not None and order.op == Op.REPLY:
            arrivals.reply(g, t_heard)
        if order.op == Op.APPLY:
            settle()  # the replies in flight read what this push changes
            if P.recv(world, body, leaders[g], P.TAG_W, back, by) is None:  # PS: g's slice of its push
                raise StalledError(
                    f"server shard {topo.rank}: group {g}'s push did not come in time", "stalled"
                )
            # (finite: shard 0 checked the leader's norm of the whole push before ordering this)
            rule.apply(state.weights[:n_p], body[:n_p], order.a, order.lr)
            rule.fold_buffers(g, state.weights[n_p:], body[n_p:])
        elif order.op == Op.REPLY:
            dest = leaders[g]
            flight.post(world, state.weights[:n_p], dest, P.TAG_W, g, by)  # PS: this slice's parameters
            flight.post(world, rule.buffers_for(g, state.weights[n_p:]), dest, P.TAG_BN, g, by)  # PS: BN
            if order.has_state:
                m = state.momenta.get(g) if state.momenta is not None else np.zeros(n_p, np.float32)
                flight.post(world, m, dest, P.TAG_OPT, g, by)  # PS: g's momentum slice (resume)
        elif order.op == Op.CKPT:
            settle()
            groups = np.empty(order.n, np.int64)
            P.recv(world, groups, 0, TAG_ORDER, back)  # PS shards: whose momentum follows
            writer = writer_for(order.commits)
            done[:] = 0.0
            done[0] = Op.CKPT
            for h in groups.tolist():
                got = P.recv(world, mbuf, leaders[h], P.TAG_OPT, back, by)  # PS: h's momentum slice
                if got is None:
                    done[3 + h] = 1.0  # its momentum restarts from zero on resume
                    mbuf = np.empty_like(mbuf)  # an abandoned receive may still write into the old one
                else:
                    writer.add_momentum(h, mbuf)
            if order.has_state and state.momenta is not None:  # (carry: nobody trained since the resume)
                for h in state.momenta.saved:
                    writer.add_momentum(h, state.momenta.get(h))
            writer.finish_part(state.weights, state.group_buffers, state.outer, {"commits": order.commits})
            world.Send(done, dest=0, tag=TAG_DONE)  # PS shards: this part is durable
        elif order.op == Op.STOP:
            settle()
            serve_s = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            done[:] = 0.0
            done[:3] = Op.STOP, (serve_s - idle) / max(serve_s, 1e-9), peak
            world.Send(done, dest=0, tag=TAG_DONE)  # PS shards: this shard's account
            return {"busy_share": round(float(done[1]), 4), "peak_rss_mb": round(peak, 1)}


class Parts:
    """Shard 0's side of a sharded checkpoint and of the end (`ParameterServer.parts`): the other
    shards write their parts when told (`begin`), shard 0 writes the manifest once every part is
    durable (`end`), and at the end each sends its account (`stop`)."""

    def __init__(
        self, orders: Orders, back: P.Backoff, bound_s: float, slices_: list[tuple[int, int]]
    ) -> None:
        self.orders, self.back, self.bound_s = orders, back, bound_s
        self.meta = {"count": len(slices_), "slices": [list(s) for s in slices_]}

    def begin(self, commits: int, groups: list[int], carry: bool = False) -> None:
        """Every other shard starts its part: the momentum of `groups` follows from their leaders
        (carry: and the resumed momentum, where nobody has trained since)."""
        self.orders.send(Order(Op.CKPT, commits=commits, n=len(groups), has_state=carry), groups)

    def end(self) -> list[int]:
        """Wait until every part is durable; the groups some shard lacks a momentum slice of."""
        done = self.orders.collect(self.back, time.perf_counter() + self.bound_s + self.orders.allow())
        return sorted({h for d in done for h in range(self.orders.n) if d[3 + h]})

    def stop(self) -> list[dict]:
        """Every other shard's account (busy share, peak memory), and they end; an empty list
        when one does not answer (the run's results are written; the job then ends with it)."""
        self.orders.send(Order(Op.STOP))
        try:
            done = self.orders.collect(self.back, time.perf_counter() + self.bound_s)
        except StalledError:
            return []
        return [{"busy_share": round(float(d[1]), 4), "peak_rss_mb": round(float(d[2]), 1)} for d in done]
