"""The parameter server's decisions without MPI (`server.ParameterServer`): what a run's
driver would send for a given sequence of requests, checked exactly. The MPI side
(`server_loop.serve`) is exercised by the trainer's end-to-end tests (tests/test_train.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from hpc_dualbatch.config import config_from_dict
from hpc_dualbatch.method.merge import delta_weight
from hpc_dualbatch.ps import protocol as P
from hpc_dualbatch.ps.roster import Roster
from hpc_dualbatch.ps.server import ParameterServer, ServerState
from hpc_dualbatch.ps.tasks import GroupSpec
from hpc_dualbatch.runtime import checkpoint as C
from hpc_dualbatch.runtime.metrics import MetricsLog, read_metrics
from tests.helpers import tiny_config

N_P, N_B = 4, 2  # parameters and BN buffers of the toy model


def make(tmp_path, **over) -> ParameterServer:
    cfg = config_from_dict(tiny_config("unused.h5", tmp_path / "run", **over))
    groups = [GroupSpec(100, {12: 64, 16: 64}, 1.0, False), GroupSpec(80, {12: 32, 16: 32}, 0.8, True)]
    state = ServerState.fresh(np.zeros(N_P + N_B, np.float32), N_P, 2, outer=cfg.server.outer != "none")
    return ParameterServer(cfg, groups, state, MetricsLog(str(tmp_path / "metrics.jsonl")))


def push(kind: P.Kind, g: int, round_idx: int, samples: int) -> P.Request:
    """A request as the wire delivers it (packed, then unpacked)."""
    return P.Request.unpack(P.Request(kind, g, round_idx, samples, 1.5, 0.7, 0.6).pack())


def test_round_robin_run_with_barriers_evals_and_stop(tmp_path):
    ps = make(tmp_path, server__merge="paper", server__bn="average")  # tiny: 4 epochs, ckpt each epoch
    assert ps.roster.next_group() == 0
    hello = [ps.answer(g) for g in (0, 1)]
    assert [int(o.task.status) for o in hello] == [P.Status.RUN] * 2
    assert [int(o.task.round) for o in hello] == [0, 0]
    assert [int(o.task.batch) for o in hello] == [64, 32]  # each group's own batch
    assert [int(o.task.samples) for o in hello] == [100, 80]
    rounds, stops, evals, checkpoints = [0, 0], set(), [], 0
    while len(stops) < 2:
        for g in (0, 1):
            if g in stops:
                continue
            ps.served(g, P.Kind.PUSH)
            wbuf = np.full(N_P + N_B, g + 1.0, np.float32)
            replies = ps.on_push(push(P.Kind.PUSH, g, rounds[g], 100 - 20 * g), wbuf)
            if ps.barrier_full():
                assert sorted(ps.roster.parked) == [0, 1]
                replies = ps.checkpoint(ps.checkpoint_writer())
                checkpoints += 1
                assert [o.group for o in replies] == [0, 1]  # released in group order
            for o in replies:
                if o.task.eval_epoch >= 0:
                    evals.append((o.group, float(o.task.eval_epoch)))
                if o.task.status == P.Status.STOP:
                    stops.add(o.group)
                else:
                    rounds[o.group] = int(o.task.round)  # the task it trains next
    # 4 epochs x 2 groups: 8 tasks, every one committed; a barrier after each of epochs 1-3
    assert ps.s.commits == 8 and sum(ps.s.rounds) == 8 and checkpoints == 3
    assert C.latest(ps.cfg.out) is not None
    commits = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "commit"]
    assert [r["commit"] for r in commits] == list(range(1, 9))
    assert [r["round"] for r in commits if r["group"] == 0] == list(range(ps.s.rounds[0]))
    # each epoch is evaluated once, by the group whose commit closed it; STOP replies that carry
    # an evaluation keep the server serving until it is in
    closed_by = [(r["group"], r["commit"] / 2) for r in commits if r["commit"] % 2 == 0]
    assert evals == closed_by
    assert (
        sorted(ps.roster.eval_asked) == [0, 1] and ps.roster.serving()
    )  # epoch 3's eval came with group 1's STOP, epoch 4's with 0's
    assert ps.on_eval(1, evaluation(3.0), np.zeros(N_B, np.float32)) == []  # told STOP: no pull
    assert ps.on_eval(0, evaluation(4.0), np.zeros(N_B, np.float32)) == []
    assert not ps.roster.serving() and ps.outcome() == "done"


def test_an_evaluation_is_answered_with_the_weights_merged_meanwhile(tmp_path):
    """The group whose commit closed an epoch evaluates that commit's weights while the others
    push; its evaluation is answered with the weights now (its pull), so its next push counts
    its staleness from there and is not damped."""
    mode = dict(server__merge="delta", server__bn="average", server__order="arrival")
    ps = make(tmp_path, checkpoint__every_epochs=0, **mode)
    ps.answer(0), ps.answer(1)
    ps.on_push(push(P.Kind.PUSH, 1, 0, 80), np.full(N_P + N_B, 1.0, np.float32))
    (closing,) = ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.full(N_P + N_B, 2.0, np.float32))
    assert closing.task.eval_epoch == 1.0 and closing.task.status == P.Status.RUN
    for _ in range(3):  # group 1 pushes while group 0 evaluates
        ps.on_merge(push(P.Kind.MERGE, 1, 1, 80), np.full(N_P + N_B, 1.0, np.float32))
    (pull,) = ps.on_eval(0, evaluation(1.0), np.zeros(N_B, np.float32))
    assert pull.group == 0 and pull.task.status == P.Status.CONTINUE and pull.momentum is None
    np.testing.assert_array_equal(pull.params, ps.s.weights[:N_P])  # the weights after all 5 merges
    ps.on_merge(push(P.Kind.MERGE, 0, 1, 100), np.full(N_P + N_B, 1.0, np.float32))
    merges = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] in ("commit", "merge")]
    assert [(r["group"], r["staleness"]) for r in merges][-1] == (0, 0)  # 3 without the pull: damped


def evaluation(epoch: float) -> P.Evaluation:
    ev = P.Request(P.Kind.EVAL, 0, evaluation=P.Evaluation(epoch, 0.5, 0.8, 400, 1.0, 16, 0.0))
    return P.Request.unpack(ev.pack()).evaluation


@pytest.mark.parametrize("merge", ["paper", "delta"])
def test_merges_on_known_vectors(tmp_path, merge):
    ps = make(tmp_path, server__merge=merge, server__bn="average")
    ps.answer(0), ps.answer(1)  # both pull the zero weights
    ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.full(N_P + N_B, 2.0, np.float32))
    ps.on_merge(push(P.Kind.MERGE, 1, 0, 80), np.full(N_P + N_B, 4.0, np.float32))
    w = ps.s.weights
    if merge == "paper":  # w <- (w + f w_i) / (1 + f): f = 1, then f = 0.8
        first = 2.0 / 2
        expect = (first + 0.8 * 4.0) / 1.8
    else:  # w <- w + a (w_i - pulled), a from f / sum f and staleness (1 merge since group 1 pulled)
        first = delta_weight(1.0, 1.8, 2, 0) * 2.0
        expect = first + delta_weight(0.8, 1.8, 2, 1) * 4.0
    np.testing.assert_allclose(w[:N_P], expect, rtol=1e-6)
    np.testing.assert_allclose(w[N_P:], (1.0 + 0.8 * 4.0) / 1.8, rtol=1e-6)  # BN: averaged (bn: average)
    merges = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] in ("commit", "merge")]
    assert [(r["type"], r["staleness"]) for r in merges] == [("commit", 0), ("merge", 1)]


def test_bn_local_keeps_each_groups_buffers_and_sends_them_back(tmp_path):
    ps = make(tmp_path, server__bn="local")
    ps.answer(0), ps.answer(1)
    out = ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.arange(N_P + N_B, dtype=np.float32))
    assert ps.s.weights[N_P:].tolist() == [0.0, 0.0]  # the global buffers are never merged
    assert out[0].buffers.tolist() == [4.0, 5.0] and ps.s.group_buffers[1].tolist() == [0.0, 0.0]


def test_a_preempt_flag_parks_every_group_then_stops(tmp_path):
    ps = make(tmp_path)
    ps.answer(0), ps.answer(1)
    h = push(P.Kind.PUSH, 0, 0, 100)
    h = dataclasses.replace(h, preempt=True)  # a rank of group 0 got SIGTERM
    assert ps.on_push(h, np.zeros(N_P + N_B, np.float32)) == [] and not ps.barrier_full()
    assert ps.on_push(push(P.Kind.PUSH, 1, 0, 80), np.zeros(N_P + N_B, np.float32)) == []
    assert ps.barrier_full()
    replies = ps.checkpoint(ps.checkpoint_writer())
    assert [int(o.task.status) for o in replies] == [P.Status.STOP] * 2
    assert not ps.roster.serving() and ps.outcome() == "preempted" and C.latest(ps.cfg.out) is not None


def run_to_the_last_commit(ps: ParameterServer) -> tuple[list, list]:
    """Under round robin, groups 0, 1, 0, ... commit the 8 tasks of a 4-epoch run; returns the
    replies to commit 7 (group 0's last) and to commit 8 (group 1's, closing epoch 4)."""
    ps.answer(0), ps.answer(1)
    replies, w = [], np.zeros(N_P + N_B, np.float32)
    for c in range(8):
        g = c % 2
        replies.append(ps.on_push(push(P.Kind.PUSH, g, c // 2, 100 - 20 * g), w))
        if c == 6:  # group 0 has run out of tasks: it waits, stopped, not waited for
            assert replies[-1] == [] and ps.roster.waiting == [0] and 0 not in ps.roster.awaited()
    return replies[6], replies[7]


def test_the_groups_share_the_final_evaluation(tmp_path):
    """Group 0 (1 rank) runs out of tasks first and gets no reply until group 1 (2 ranks) has
    too; then both are told STOP with their slots of 3, their BN statistics are averaged over
    the 3 ranks, and their parts of the test split add up to one evaluation record."""
    ps = make(tmp_path, server__bn="recalibrate", checkpoint__every_epochs=0, workers__groups=[1, 2])
    _, outs = run_to_the_last_commit(ps)
    task = [(o.group, o.task.status, o.task.eval_epoch, o.task.eval_slot, o.task.eval_slots) for o in outs]
    assert task == [(0, P.Status.STOP, 4.0, 0, 3), (1, P.Status.STOP, 4.0, 1, 3)]
    assert all(o.params is not None for o in outs)  # the final weights
    assert ps.on_stats(1, np.array([0.0, 3.0], np.float32)) == [] and 1 not in ps.roster.awaited()
    mean = ps.on_stats(0, np.array([3.0, 6.0], np.float32))  # (1 x [3, 6] + 2 x [0, 3]) / 3
    assert [(o.group, o.task.status, o.params, o.buffers.tolist()) for o in mean] == [
        (0, P.Status.STOP, None, [1.0, 4.0]),
        (1, P.Status.STOP, None, [1.0, 4.0]),
    ]

    def part(loss: float, acc: float, samples: int, seconds: float, bn_seconds: float) -> P.Evaluation:
        ev = P.Evaluation(4.0, loss, acc, samples, seconds, 16, bn_seconds)
        return P.Request.unpack(P.Request(P.Kind.EVAL, 0, evaluation=ev).pack()).evaluation

    bufs = mean[0].buffers
    assert ps.on_eval(0, part(1.0, 0.5, 100, 2.0, 1.0), bufs) == [] and ps.roster.serving()
    assert ps.on_eval(1, part(4.0, 0.8, 200, 3.0, 1.5), bufs) == [] and not ps.roster.serving()
    last = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "eval"][-1]
    keys = ("epoch", "group", "test_loss", "test_acc", "samples", "seconds", "parts")
    assert {k: last[k] for k in keys} == {
        "epoch": 4.0, "group": 1, "test_loss": 3.0, "test_acc": 0.7, "samples": 300, "seconds": 3.0,
        "parts": 2,
    }  # fmt: skip
    assert last["bn_seconds"] == 1.5 and ps.final_buffers.tolist() == [1.0, 4.0] and ps.outcome() == "done"


def test_a_preemption_stops_the_groups_waiting_for_the_final_evaluation(tmp_path):
    ps = make(tmp_path, server__bn="recalibrate", checkpoint__every_epochs=0)
    ps.answer(0), ps.answer(1)
    for c in range(7):  # group 0's last commit: it waits
        g = c % 2
        ps.on_push(push(P.Kind.PUSH, g, c // 2, 100 - 20 * g), np.zeros(N_P + N_B, np.float32))
    ps.on_eval(1, evaluation(3.0), np.zeros(N_B, np.float32))  # (epoch 3's, asked by commit 6)
    ps.preempt = 15
    ps.check_preempt()
    assert ps.on_push(push(P.Kind.PUSH, 1, 3, 80), np.zeros(N_P + N_B, np.float32)) == []  # parked
    assert ps.barrier_full()
    outs = ps.checkpoint(ps.checkpoint_writer())
    assert sorted((o.group, o.task.status, o.task.eval_epoch) for o in outs) == [
        (0, P.Status.STOP, -1.0),
        (1, P.Status.STOP, -1.0),
    ]
    assert not ps.roster.serving() and ps.s.pending_evals == {1: 4.0}  # the resume evaluates it
    assert ps.outcome() == "preempted"  # (was "done": every task committed, the evaluation lost)
    ck = C.load(C.latest(ps.cfg.out))  # the resume: every task is done, the evaluation is asked for
    state = ServerState.from_checkpoint(ck, np.zeros(N_P + N_B, np.float32), N_P, ps.cfg.out)
    again = ParameterServer(ps.cfg, ps.groups, state, MetricsLog(str(tmp_path / "m2.jsonl")))
    hello = [again.answer(g).task for g in (0, 1)]
    assert [(t.status, t.eval_epoch) for t in hello] == [(P.Status.STOP, -1.0), (P.Status.STOP, 4.0)]


def test_a_group_silent_in_the_shared_final_evaluation_is_left_out(tmp_path):
    """Group 1 sends its statistics and waits for the mean, which is not silence; group 0 never
    sends its own: it is left out at the stall bound, the run ends with a checkpoint, and the
    resume is asked for the final evaluation once (not once per group)."""
    from hpc_dualbatch.errors import StalledError

    ps = make(tmp_path, server__bn="recalibrate", checkpoint__every_epochs=0, server__stall_s=5.0)
    ps.group_ranks = [(1,), (2,)]
    run_to_the_last_commit(ps)
    assert ps.on_stats(1, np.zeros(N_B, np.float32)) == [] and ps.roster.awaited() == [0]
    ps.on_silence(ps.watch.deadline(ps.roster.awaited()), set())
    assert ps.watch.stalled == {0} and ps.barrier_full()
    with pytest.raises(StalledError, match=r"group 0 \(rank 1"):
        ps.checkpoint(ps.checkpoint_writer())
    assert list(C.load(C.latest(ps.cfg.out)).extra["pending_evals"].values()) == [4.0]


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_a_non_finite_push_stops_the_run_and_merges_nothing(tmp_path, where):
    """A NaN train loss or non-finite pushed weights (the leader's norm of its push) end the run
    with a message naming the commit, group, learning rate and momentum; the global weights stay
    as they were."""
    from hpc_dualbatch.errors import DivergedError

    ps = make(tmp_path, server__merge="paper", server__bn="average")
    ps.answer(0), ps.answer(1)
    ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.full(N_P + N_B, 2.0, np.float32))
    before = ps.s.weights.copy()
    h = push(P.Kind.PUSH, 1, 0, 80)
    wbuf = np.full(N_P + N_B, 4.0, np.float32)
    if where == "loss":
        h = dataclasses.replace(h, loss=np.nan)
    else:  # as its leader sends it: the body and the norm it measured over the whole push
        wbuf[1] = np.inf
        h = dataclasses.replace(h, norm=float(np.linalg.norm(wbuf[:N_P])))
    with pytest.raises(DivergedError) as e:
        ps.on_push(h, wbuf)
    assert "training diverged at commit 2" in str(e.value) and "group 1's" in str(e.value)
    assert "optim.ps_momentum 0.8" in str(e.value) and "lr " in str(e.value)  # the groups' momentum
    np.testing.assert_array_equal(ps.s.weights, before)
    assert ps.s.commits == 1


# --- stalls (docs/reliability.md): a silent group is left out, the checkpoint says what it lacks ---


def _stalled_run(tmp_path, **over) -> ParameterServer:
    """Both groups hold a task (group 0 its second); group 1 has not been heard from since."""
    ps = make(tmp_path, server__stall_s=5.0, server__preempt_wait_s=7.0, **over)
    ps.group_ranks = [(1,), (2, 3)]
    ps.answer(0), ps.answer(1)
    ps.served(0, P.Kind.PUSH)
    ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.full(N_P + N_B, 1.0, np.float32))
    return ps


def test_a_silent_group_is_left_out_and_the_checkpoint_says_what_it_lacks(tmp_path):
    from hpc_dualbatch.errors import StalledError

    ps = _stalled_run(tmp_path)
    now = ps.watch.heard[1] + 5.0
    assert ps.watch.deadline(ps.roster.awaited()) == pytest.approx(now)  # group 1's bound ends first
    ps.on_silence(now - 0.1, set())
    assert not ps.watch.stalled  # not yet
    ps.on_silence(now, set())
    assert ps.watch.stalled == {1} and ps.barrier and ps.watch.cutoff == now + 7.0
    assert ps.roster.awaited() == [0] and not ps.barrier_full()  # group 0 may still finish its task
    ps.served(0, P.Kind.PUSH)
    assert ps.on_push(push(P.Kind.PUSH, 0, 1, 100), np.full(N_P + N_B, 1.0, np.float32)) == []
    assert ps.barrier_full()
    writer = ps.checkpoint_writer()
    writer.add_momentum(0, np.full(N_P, 3.0, np.float32))  # what the parked group 0 sent (server_loop)
    with pytest.raises(StalledError) as e:
        ps.checkpoint(writer)
    assert e.value.state == "stalled" and e.value.exit_code == 4
    msg = str(e.value)
    for needle in ("group 1 (ranks 2, 3, silent for", "server.stall_s = 5 s", "unfinished task", "--resume"):
        assert needle in msg, msg
    ck = C.load(C.latest(ps.cfg.out))
    assert ck.commits == 2 and ck.rounds == [2, 0]  # group 1's task is handed out again
    assert ck.extra["missing_groups"] == [1]
    assert ck.momentum.saved == [0]  # group 1's never came: it restarts from zero
    assert ck.momentum.get(0).tolist() == [3.0] * N_P and ck.momentum.get(1).tolist() == [0.0] * N_P
    # the resume hands group 1 the same task (round 0: the same data order)
    state = ServerState(ck.weights, N_P, ck.group_buffers, ck.commits, 2, ck.rounds, momenta=ck.momentum)
    again = ParameterServer(ps.cfg, ps.groups, state, MetricsLog(str(tmp_path / "m2.jsonl")))
    assert int(again.answer(1).task.round) == 0


def test_a_group_heard_from_again_in_time_is_taken_back(tmp_path):
    ps = _stalled_run(tmp_path)
    ps.on_silence(ps.watch.heard[1] + 5.0, set())
    assert ps.watch.stalled == {1}
    ps.served(1, P.Kind.PUSH)  # it was only slow: the barrier becomes an ordinary checkpoint
    assert not ps.watch.stalled and ps.watch.cutoff is None
    ps.on_push(push(P.Kind.PUSH, 1, 0, 80), np.zeros(N_P + N_B, np.float32))
    ps.on_push(push(P.Kind.PUSH, 0, 1, 100), np.zeros(N_P + N_B, np.float32))
    assert ps.barrier_full()
    replies = ps.checkpoint(ps.checkpoint_writer())  # no error: both released with their next tasks
    assert [int(o.task.status) for o in replies] == [P.Status.RUN] * 2


def test_a_preemption_leaves_out_who_is_not_parked_by_its_cutoff(tmp_path):
    import signal

    from hpc_dualbatch.errors import StalledError

    ps = _stalled_run(tmp_path)
    ps.preempt = signal.SIGTERM
    ps.check_preempt()
    cutoff = ps.watch.cutoff
    assert ps.barrier and cutoff is not None
    ps.on_push(push(P.Kind.PUSH, 0, 1, 100), np.zeros(N_P + N_B, np.float32))  # parks
    assert not ps.barrier_full() and ps.watch.deadline(ps.roster.awaited()) == pytest.approx(
        min(cutoff, ps.watch.heard[1] + 5.0)
    )
    ps.on_silence(cutoff, set())
    assert ps.watch.stalled == {1} and ps.barrier_full()
    with pytest.raises(StalledError) as e:
        ps.checkpoint(ps.checkpoint_writer())
    assert e.value.state == "preempted" and "server.preempt_wait_s = 7 s and left out group 1" in str(e.value)


def test_the_stall_bound_grows_with_the_longest_silence_and_a_queued_request_is_not_silence(tmp_path):
    ps = _stalled_run(tmp_path)
    ps.watch.heard[0] -= 1.0
    ps.served(0, P.Kind.MERGE)  # a 1 s task part: 4 x 1 s < server.stall_s, the bound stays 5 s
    assert ps.watch.bound() == 5.0
    ps.watch.heard[0] -= 2.0
    ps.served(0, P.Kind.MERGE)
    assert ps.watch.bound() == pytest.approx(8.0, abs=0.01)  # 4 x the longest silence (2 s)
    ps.on_silence(ps.watch.heard[1] + 100.0, {0, 1})  # their requests wait unserved (round robin): not silent
    assert not ps.watch.stalled
    (tmp_path / "off").mkdir()
    off = make(tmp_path / "off", server__stall_s=0.0)
    off.answer(0), off.answer(1)
    assert (
        off.watch.bound() is None and off.watch.deadline(off.roster.awaited()) is None
    )  # no bound: wait as long as it takes


def test_rounds_answer_every_push_once_the_round_is_complete(tmp_path):
    """order: rounds (a control): one round of pushes from one pull, merged, answered together:
    the global weights are the f-weighted mean of the groups' updates, as synchronous local SGD."""
    ps = make(tmp_path, server__order="rounds", plan__adaptive=False, checkpoint__every_epochs=0)
    ps.answer(0), ps.answer(1)
    assert ps.on_merge(push(P.Kind.MERGE, 0, 0, 0), np.full(N_P + N_B, 2.0, np.float32)) == []
    assert ps.roster.awaited() == [1]  # group 0 waits for its reply, it is not silent
    replies = ps.on_merge(push(P.Kind.MERGE, 1, 0, 0), np.full(N_P + N_B, 4.0, np.float32))
    assert [(o.group, int(o.task.status)) for o in replies] == [
        (0, P.Status.CONTINUE),
        (1, P.Status.CONTINUE),
    ]
    mean = (1.0 * 2.0 + 0.8 * 4.0) / 1.8
    np.testing.assert_allclose(replies[0].params, mean, rtol=1e-6)
    assert ps.on_push(push(P.Kind.PUSH, 1, 0, 80), np.full(N_P + N_B, mean, np.float32)) == []
    replies = ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.full(N_P + N_B, mean, np.float32))
    assert [(o.group, int(o.task.status), int(o.task.round)) for o in replies] == [
        (0, P.Status.RUN, 1),
        (1, P.Status.RUN, 1),
    ]


def test_rounds_keep_their_step_at_a_checkpoint_barrier(tmp_path):
    """The commit that closes a checkpoint epoch parks the group held before it too: released
    there, it would start the next round's task alone."""
    ps = make(tmp_path, server__order="rounds", plan__adaptive=False)  # tiny: a checkpoint each epoch
    ps.answer(0), ps.answer(1)
    assert ps.on_push(push(P.Kind.PUSH, 0, 0, 100), np.zeros(N_P + N_B, np.float32)) == []
    assert ps.on_push(push(P.Kind.PUSH, 1, 0, 80), np.zeros(N_P + N_B, np.float32)) == []
    assert sorted(ps.roster.parked) == [0, 1] and not ps.roster.held and ps.barrier_full()
    replies = ps.checkpoint(ps.checkpoint_writer())
    assert [(o.group, int(o.task.status), int(o.task.round)) for o in replies] == [
        (0, P.Status.RUN, 1), (1, P.Status.RUN, 1)
    ]  # fmt: skip


def test_rounds_release_the_others_when_a_group_is_left_out(tmp_path):
    ps = make(tmp_path, server__order="rounds", plan__adaptive=False, server__stall_s=5.0)
    ps.answer(0), ps.answer(1)
    assert ps.on_merge(push(P.Kind.MERGE, 0, 0, 0), np.zeros(N_P + N_B, np.float32)) == []
    ps.leave_out([1], ps.watch.heard[1] + 6.0)
    assert [o.group for o in ps.roster.release()] == [0]  # (the driver asks at every turn)


def test_push_period_per_learning_rate_stage_and_small_group_rate(tmp_path):
    """server.push_every_by_lr: [1, 4] pushes after every large step at lr 0.1 (epochs 0-2), every
    4 after the decay; schedule.small_lr: sqrt scales the small group's rate by (32/64)^(1/2)."""
    ps = make(tmp_path, server__push_every_by_lr=[1, 4], schedule__small_lr="sqrt")
    ref = ps.groups[0]
    steps = -(-ref.share // ref.batch[12])  # large steps per task
    early = ps.tasks.next(0, P.Status.RUN, 0, 0, 0, 0.0)
    late = ps.tasks.next(0, P.Status.RUN, 6, 6, 3, 0.0)  # task 6 of 2 groups: epoch 3, lr 0.01
    assert (early.pushes, late.pushes) == (steps, max(1, round(steps / 4)))
    assert (early.lr, late.lr) == (pytest.approx(0.1), pytest.approx(0.01))
    small = ps.tasks.next(1, P.Status.RUN, 0, 0, 0, 0.0)
    assert small.lr == pytest.approx(0.1 * (32 / 64) ** 0.5)


def test_order_per_learning_rate_stage_switches_with_the_stages_first_task(tmp_path):
    """server.order_by_lr: [arrival, rounds]: pushes are answered on arrival until the first task
    of the second stage is handed out (2 groups, lr stage 1 from epoch 3: task 6), then held
    until the round is complete."""
    ps = make(tmp_path, server__order="arrival", server__order_by_lr=["arrival", "rounds"],
              plan__adaptive=False, checkpoint__every_epochs=0)  # fmt: skip
    w = np.zeros(N_P + N_B, np.float32)
    ps.answer(0), ps.answer(1)

    def answered(g: int, kind: P.Kind) -> list[tuple[int, int, float]]:
        outs = (ps.on_merge if kind == P.Kind.MERGE else ps.on_push)(push(kind, g, 0, 100), w)
        return [(o.group, int(o.task.status), o.task.lr_epoch) for o in outs]

    assert answered(0, P.Kind.MERGE) == [(0, P.Status.CONTINUE, 0.0)]
    for t in range(2, 6):  # commits hand out tasks 2..5, the first stage: each answered at once
        assert answered(t % 2, P.Kind.PUSH) == [(t % 2, P.Status.RUN, t / 2)]
    assert not ps.roster.rounds
    assert answered(0, P.Kind.PUSH) == [(0, P.Status.RUN, 3.0)]  # task 6: rounds from here on
    assert ps.roster.rounds
    assert answered(1, P.Kind.MERGE) == []  # waits for group 0's push of the round
    assert answered(0, P.Kind.MERGE) == [(0, P.Status.CONTINUE, 0.0), (1, P.Status.CONTINUE, 0.0)]


@pytest.mark.parametrize("stale_lr", ["keep", "rescale"])
def test_a_push_of_an_earlier_rate_stage_is_merged_at_the_newest_rate(tmp_path, stale_lr):
    """server.stale_lr: rescale: once the first task of the second stage (lr 0.1 -> 0.01 from
    epoch 3: task 6 of 2 groups) is out, group 1's push from its first-stage task gets 0.01/0.1
    of the weight the delta rule gives it; group 0's push from the new task its full weight."""
    ps = make(tmp_path, server__order="arrival", server__stale_lr=stale_lr, plan__adaptive=False,
              checkpoint__every_epochs=0)  # fmt: skip
    w = np.zeros(N_P + N_B, np.float32)
    ps.answer(0), ps.answer(1)
    for t in range(2, 7):  # commits hand out tasks 2..6; group 1 keeps task 5 (epoch 2.5)
        ps.on_push(push(P.Kind.PUSH, t % 2, 0, 100), w)
    assert [ps.tasks.stage[g].lr for g in (0, 1)] == [0.01, pytest.approx(0.1 * math.sqrt(32 / 64))]
    scales = []
    for g in (1, 0):  # each merges a push of ones into zero weights: they move by its weight
        ps.s.weights[:] = 0.0
        ps.on_merge(push(P.Kind.MERGE, g, 0, 0), np.ones(N_P + N_B, np.float32))
        scales.append(float(ps.s.weights[0]))
    f = [1.0 / 1.8, 0.8 / 1.8]  # delta: f / sum(f), staleness within a round
    want_1 = f[1] * (0.01 / 0.1 if stale_lr == "rescale" else 1.0)
    assert scales == [pytest.approx(want_1, rel=1e-6), pytest.approx(f[0], rel=1e-6)]


def test_replies_held_when_rounds_end_go_out_with_the_next():
    """order_by_lr: [rounds, arrival]: a reply held in the last round of the rounds stage is not
    left waiting for a round that never completes."""
    roster = Roster(2, "rounds", False, set())
    assert roster.hold(0, lambda: ["reply 0"], commit=False) == []
    roster.rounds = False  # (the server: the first task of an arrival stage was handed out)
    assert roster.hold(1, lambda: ["reply 1"], commit=False) == ["reply 0", "reply 1"]
    assert roster.held == {}


@pytest.mark.parametrize("outer", ["nesterov", "delayed"])
def test_outer_momentum_resumes_exactly(tmp_path, outer):
    """The outer buffer, the round's sum and the push count are checkpointed: a resumed server
    continues with the same weights, bit for bit, as the one that never stopped."""
    from hpc_dualbatch.ps import checkpoints

    a = make(tmp_path, server__outer=outer, server__outer_momentum=0.9, server__bn="average")
    a.answer(0), a.answer(1)
    rng = np.random.default_rng(0)
    pushes = [rng.standard_normal(N_P + N_B).astype(np.float32) for _ in range(5)]
    a.on_push(push(P.Kind.PUSH, 0, 0, 100), pushes[0].copy())  # one push: mid-round for delayed
    assert a.outer is not None and a.outer.count == 1
    checkpoints.write(a)
    ck = C.load(C.latest(a.cfg.out))
    b = ParameterServer(
        a.cfg, a.groups, ServerState.from_checkpoint(ck, np.zeros(N_P + N_B, np.float32), N_P, "here"),
        MetricsLog(str(tmp_path / "b.jsonl")),
    )  # fmt: skip
    assert b.outer is not None and b.outer.count == 1
    for ps in (a, b):  # on resume every group is handed a task: so in the run that never stopped
        ps.answer(0), ps.answer(1)
        for k, wi in enumerate(pushes[1:]):
            ps.on_merge(push(P.Kind.MERGE, k % 2, 1, 0), wi.copy())
    assert a.s.weights.tobytes() == b.s.weights.tobytes()
    assert a.s.outer is not None and b.s.outer is not None and a.s.outer.tobytes() == b.s.outer.tobytes()
    assert not np.array_equal(a.s.weights, np.zeros(N_P + N_B, np.float32))


def _peak_bytes(tmp_path, n_groups: int, n_params: int) -> int:
    """Peak numpy memory (tracemalloc) of a server over hellos, one push per group, a checkpoint
    barrier (each group's momentum streamed to the file), and a resume that sends it back."""
    import tracemalloc

    n_w = n_params + N_B
    cfg = config_from_dict(
        tiny_config(
            "unused.h5", tmp_path / f"run{n_groups}", workers__groups=[1] * n_groups, workers__small=0
        )
    )
    groups = [GroupSpec(100, {12: 64, 16: 64}, 1.0, False)] * n_groups
    pushed, momentum = np.full(n_w, 0.5, np.float32), np.full(n_params, 0.25, np.float32)
    tracemalloc.start()
    ps = ParameterServer(
        cfg, groups, ServerState.fresh(np.zeros(n_w, np.float32), n_params, n_groups),
        MetricsLog(str(tmp_path / f"m{n_groups}.jsonl")),
    )  # fmt: skip
    for g in range(n_groups):
        ps.answer(g)
    for g in range(n_groups):
        ps.barrier = True  # (a checkpoint at this commit)
        ps.on_push(push(P.Kind.PUSH, g, 0, 100), pushed)
    assert ps.barrier_full()
    writer = ps.checkpoint_writer()
    for g in range(n_groups):
        writer.add_momentum(g, momentum)  # as server_loop does, one group's buffer at a time
    ps.checkpoint(writer)
    del ps
    state = ServerState.from_checkpoint(
        C.load(C.latest(cfg.out)), np.zeros(n_w, np.float32), n_params, "here"
    )
    again = ParameterServer(cfg, groups, state, MetricsLog(str(tmp_path / f"r{n_groups}.jsonl")))
    for g in range(n_groups):  # each reply's momentum is sent, then dropped, by the driver
        m = again.answer(g).momentum
        assert m is not None and np.array_equal(m, momentum)
    del m
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_server_memory_does_not_grow_with_the_groups(tmp_path):
    """The server holds O(n_params) whatever the number of groups: no per-group copy of the
    parameters or of the momentum (the scale issue's target: 2 -> 6 groups adds < 10 % of one
    parameter copy; it was 8 copies: 4 pulled copies and 4 momentum rows)."""
    n_params = 250_000  # 1 MB a copy
    grown = _peak_bytes(tmp_path, 6, n_params) - _peak_bytes(tmp_path, 2, n_params)
    assert grown < 0.10 * 4 * n_params, f"{grown / (4 * n_params):.2f} parameter copies"


def test_a_wait_wakes_when_a_request_is_due():
    """A sleeping wait never sleeps past the expected arrival and counts from it once it has
    passed (poll 0.2 .. 5 ms, a tenth of the wait so far)."""
    lo, hi = 0.0002, 0.005
    assert P.sleep_until_due(10.03, 10.0, None, lo, hi) == pytest.approx(0.003)  # the plain back-off
    assert P.sleep_until_due(10.06, 10.0, 10.2, lo, hi) == pytest.approx(0.005)  # long before it
    assert P.sleep_until_due(10.099, 10.0, 10.1, lo, hi) == pytest.approx(0.001)  # not past it
    assert P.sleep_until_due(10.1005, 10.0, 10.1, lo, hi) == pytest.approx(0.0002)  # just after it
    assert P.sleep_until_due(10.13, 10.0, 10.1, lo, hi) == pytest.approx(0.003)  # 30 ms late
    assert P.sleep_until_due(10.03, 10.0, 9.0, lo, hi) == pytest.approx(0.003)  # overdue at the start


def test_arrivals_expect_each_group_one_turnaround_after_its_reply():
    arr = P.Arrivals()
    assert arr.due() is None
    arr.reply(0, 1.0)
    assert arr.due() is None  # no turnaround seen yet
    arr.request(0, 1.2)  # 0.2 s from its reply to its request
    arr.reply(0, 2.0)
    arr.reply(1, 2.0)  # group 1: no turnaround yet, no expectation
    assert arr.due() == pytest.approx(2.0 + (1 - P.EARLY_SHARE) * 0.2)
    arr.request(1, 2.02)
    arr.reply(1, 2.03)
    assert arr.due() == pytest.approx(2.03 + (1 - P.EARLY_SHARE) * 0.02)  # the earlier of the two
    arr.request(1, 2.25)
    arr.request(0, 2.3)  # both have spoken: nothing is expected until they are answered
    assert arr.due() is None
    arr.reply(0, 3.0)
    arr.reply(0, 3.5)  # answered again before it spoke: the later reply counts
    assert arr.due() == pytest.approx(3.5 + (1 - P.EARLY_SHARE) * 0.3)


class _Pending:
    """An mpi4py request that completes at its (n+1)-th test."""

    def __init__(self, n: int) -> None:
        self.n = n

    def Test(self, status) -> bool:  # noqa: N802 (mpi4py's name)
        self.n -= 1
        return self.n < 0


def test_a_wait_counts_its_sleeps_and_how_late_each_ended():
    back = P.Backoff(0.001, 0.001)
    assert back.late_ms() == 0.0  # no sleep yet
    assert back.wait(_Pending(3)) is not None
    assert back.sleeps == 3  # one sleep after each failed test
    assert 0.0 <= back.late < 3 * 0.05  # a sleep ends after its time, never before
    back.wait(_Pending(2))
    assert back.sleeps == 5 and back.late_ms() == pytest.approx(1e3 * back.late / 5)


def test_a_commit_records_the_leaders_sleeps_and_their_lateness(tmp_path):
    ps = make(tmp_path)
    ps.answer(0), ps.answer(1)
    req = P.Request(P.Kind.PUSH, 0, 0, 100, 1.5, 0.7, 0.6, wait=0.2, sleeps=12, late=0.0345, waited=0.15)
    ps.on_push(P.Request.unpack(req.pack()), np.full(N_P + N_B, 2.0, np.float32))
    (rec,) = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "commit"]
    assert (rec["wait"], rec["waited"], rec["sleeps"], rec["late"]) == (0.2, 0.15, 12, 0.0345)


def test_tail_average_is_evaluated_and_saved(tmp_path):
    """schedule.average: last_stage: the parameters after every merge of a push trained at the
    last stage's rate (tasks 6 and 7 of 2 groups, lr 0.01 from epoch 3) are averaged; a reply
    that asks for an evaluation carries that mean (the global weights before any), its record
    says how many merges it holds, and the final checkpoint holds it as the model."""
    from hpc_dualbatch.ps import checkpoints

    ps = make(tmp_path, schedule__average="last_stage", plan__adaptive=False, checkpoint__every_epochs=0)
    rng = np.random.default_rng(0)

    def pushed(kind: P.Kind, g: int) -> list:
        wbuf = rng.standard_normal(N_P + N_B).astype(np.float32)
        outs = (ps.on_merge if kind == P.Kind.MERGE else ps.on_push)(push(kind, g, 0, 100), wbuf)
        return outs

    ps.answer(0), ps.answer(1)
    for t in range(2, 6):  # commits 1-4 hand out tasks 2..5 (lr 0.1); commit 4 closes epoch 2
        outs = pushed(P.Kind.PUSH, t % 2)
    assert outs[0].task.eval_epoch == 2.0 and ps.average.count == 0
    assert outs[0].params is not None and np.array_equal(outs[0].params, ps.s.weights[:N_P])
    ps.on_eval(1, evaluation(2.0), np.zeros(N_B, np.float32))
    pushed(P.Kind.PUSH, 0)  # commit 5 hands out task 6, the first at lr 0.01
    iterates = []
    for _ in range(2):
        pushed(P.Kind.MERGE, 0)
        iterates.append(ps.s.weights[:N_P].copy())
    pushed(P.Kind.MERGE, 1)  # group 1's task 5 is at lr 0.1: not averaged
    assert ps.average.count == 2
    outs = pushed(P.Kind.PUSH, 1)  # commit 6 closes epoch 3 (its push: task 5, lr 0.1)
    (ask,) = [o for o in outs if o.task.eval_epoch == 3.0]
    np.testing.assert_allclose(ask.params, np.mean(iterates, axis=0), rtol=1e-6)
    assert not np.array_equal(ask.params, ps.s.weights[:N_P])
    ps.on_eval(1, evaluation(3.0), np.zeros(N_B, np.float32))
    for g in (0, 1):  # commits 7 and 8: the last tasks, at lr 0.01
        outs = pushed(P.Kind.PUSH, g)
        iterates.append(ps.s.weights[:N_P].copy())
    mean = np.mean(iterates, axis=0)
    assert ps.average.count == 4 and [o.group for o in outs] == [0, 1]  # the shared final evaluation
    for o in outs:
        np.testing.assert_allclose(o.params, mean, rtol=1e-6)
    recs = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["type"] == "eval"]
    assert [(r["epoch"], r["averaged"]) for r in recs] == [(2.0, 0), (3.0, 2)]
    ps.final_buffers = np.full(N_B, 7.0, np.float32)
    ck = C.load(checkpoints.write(ps, final=True))
    np.testing.assert_allclose(ck.weights[:N_P], mean, rtol=1e-6)
    assert np.array_equal(ck.weights[N_P:], ps.final_buffers) and ck.extra["average_count"] == 4
