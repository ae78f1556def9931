"""The parameter server's discrete-event model (ps/simulate.py) on cases worked out by hand."""

from __future__ import annotations

import json

import pytest

from hpc_dualbatch.ps.simulate import Link, SimGroup, SimInput, SimTask, next_wake, simulate


def test_next_wake_follows_the_backoff_schedule():
    # (ms) a wait begun at 0 tests every 0.2 up to 2.0, then sleeps a tenth of the wait so far
    # (tests at 2.0 x 1.1^k) until that reaches 2.0 (at 2.0 x 1.1^25 = 21.67), then every 2.0
    ats = (0.0, 0.1, 1.05, 2.1, 2.5, 3.0, 30.0)
    want = [0.0, 0.2, 1.2, 2.2, 2.0 * 1.1**3, 2.0 * 1.1**5, 2.0 * 1.1**25 + 10.0]
    assert [next_wake(0.0, at, 0.2, 2.0) for at in ats] == pytest.approx(want)
    assert next_wake(0.0, 2.5, 0.2, 2.0, tick=2.0) == pytest.approx(2.6)  # restarted at 2.0
    # expecting the request at `due` (server.poll_predict): one test at due, then every 0.2 from it
    late = 2.0 * 1.1**25  # 21.67: the first sleep of 2.0
    assert next_wake(0.0, 29.9, 0.2, 2.0, due=29.0) == pytest.approx(30.0)
    assert next_wake(0.0, 25.0, 0.2, 2.0, due=26.0) == pytest.approx(late + 4.0)  # before due: as without
    assert next_wake(0.0, 25.9, 0.2, 2.0, due=26.0) == pytest.approx(26.0)  # the test at due
    assert next_wake(10.0, 40.0, 0.2, 2.0, due=5.0) == next_wake(10.0, 40.0, 0.2, 2.0)  # overdue


def test_a_server_that_expects_regular_pushes_notices_them_at_once():
    """Parts of 0.1 s, an instant link, polls of 0.1 .. 10 ms: the plain back-off notices a push
    up to 10 ms late (a tenth of the 0.1 s wait, capped); expecting it one turnaround after its
    reply, the server polls every 0.1 ms from 5 % of a turnaround before it."""
    link = Link(bandwidth=1e15, latency=0.0)
    g = SimGroup(1, [SimTask(seconds=1.0, pushes=10, samples=100)])

    def run(predict: bool):
        return simulate(SimInput([g] * 2, 1, link, tasks=40, poll_min=1e-4, poll_max=0.01, predict=predict))

    plain, predicted = run(False), run(True)
    assert 0.005 < plain.mid_exchange_per_push < 0.01
    assert predicted.mid_exchange_per_push < 0.001
    assert predicted.wall < plain.wall


def test_one_group_alone_pays_compute_plus_exchange_per_push():
    """No sleeping (polls of ~0), 1 group, 1 shard: every push costs the transfer both ways on
    each side's link plus the merge, nothing overlaps, so the run takes tasks x pushes x (part +
    exchange); the server is busy receiving and merging (and, with blocking replies, sending)."""
    link = Link(bandwidth=4e6, latency=0.0, merge_s_per_float=1e-6)  # 1 MB: 0.25 s a way; merge 1 s
    g = SimGroup(1, [SimTask(seconds=6.0, pushes=3, samples=300)])
    out = simulate(SimInput([g], floats=1_000_000 // 4, link=link, tasks=4, poll_min=1e-9, poll_max=1e-9))
    exchange = 0.25 + 0.25 + 0.25  # slice in, merge (250,000 floats x 1 us), reply out
    assert out.commits == 4 and out.pushes == 12 and out.mid_pushes == 8
    assert out.wall == pytest.approx(4 * (6.0 + 3 * exchange), rel=1e-6)
    assert out.exchange_per_push == pytest.approx(exchange, rel=1e-6)
    assert out.busy[0] == pytest.approx(12 * (0.25 + 0.25), rel=1e-6)  # the reply travels on its own
    assert out.samples_per_s == pytest.approx(1200 / out.wall)
    blocking = simulate(
        SimInput([g], floats=250_000, link=link, tasks=4, poll_min=1e-9, poll_max=1e-9, blocking_replies=True)
    )
    assert blocking.wall == pytest.approx(out.wall) and blocking.busy[0] == pytest.approx(
        12 * exchange, rel=1e-6
    )


def test_a_saturated_server_caps_commits_at_one_per_service_time_and_shards_divide_it():
    """Many groups with almost no compute: the server serves back to back, so commits/s tends to
    1 / service; S shards serve a slice each and raise the cap S-fold (the leaders' links are fast)."""
    link = Link(bandwidth=1e12, latency=0.0, merge_s_per_float=1e-6)  # merge only: 1 s per push
    groups = [SimGroup(1, [SimTask(seconds=1e-3)])] * 16
    base = dict(floats=1_000_000, link=link, tasks=400, poll_min=1e-9, poll_max=1e-9)
    one = simulate(SimInput(groups, **base))
    assert one.commits_per_s == pytest.approx(1.0, rel=0.02) and one.busy_share == pytest.approx(
        1.0, rel=0.02
    )
    four = simulate(SimInput(groups, shards=4, **base))
    assert four.commits_per_s == pytest.approx(4.0, rel=0.02)


def test_a_sleeping_server_adds_its_wake_up_delay():
    """One group, transfers free: the server, asleep since its last reply, sees each push at its
    next Backoff wake-up; with a compute of 10 ms per push and sleeps capped at 5 ms that is
    between 0 and 5 ms later, and the leader sees the reply at its own next wake-up."""
    link = Link(bandwidth=1e15)
    g = SimGroup(1, [SimTask(seconds=0.010)])
    out = simulate(SimInput([g], floats=1, link=link, tasks=50, poll_min=0.0002, poll_max=0.005))
    assert 0.0 < out.exchange_per_push <= 0.005 + 0.0062  # server wake, then the leader's


def test_a_nonblocking_reply_frees_the_server_before_the_leader_wakes():
    """The server's send of a large reply completes only once the sleeping leader wakes: a
    blocking server is busy for that wait, one that hands the reply to MPI and serves on is not."""
    link = Link(bandwidth=1e15)
    groups = [SimGroup(1, [SimTask(seconds=0.004)])] * 8
    base = dict(floats=1, link=link, tasks=200, poll_min=0.0002, poll_max=0.005)
    blocking = simulate(SimInput(groups, blocking_replies=True, **base))
    overlapped = simulate(SimInput(groups, **base))
    assert overlapped.busy_share < 0.6 * blocking.busy_share
    assert overlapped.training_share > blocking.training_share


def test_overlap_hides_a_push_shorter_than_a_part_and_waits_for_a_longer_one():
    # one group, 2 tasks of 4 parts of 1 s; a push and pull of `transfer` s, no wake-up delays
    def run(transfer: float, overlap: bool):
        link = Link(bandwidth=4.0 / (transfer / 2))  # one float, transfer/2 s each way
        g = SimGroup(1, [SimTask(seconds=4.0, pushes=4)])
        return simulate(SimInput([g], 1, link, tasks=2, poll_min=1e-9, poll_max=1e-9, overlap=overlap))

    blocking, hidden, longer = run(0.1, False), run(0.1, True), run(1.5, True)
    assert blocking.wall == pytest.approx(8 + 8 * 0.1)  # every push waited for
    assert hidden.wall == pytest.approx(8 + 2 * 0.1)  # only each task's last push
    assert hidden.mid_exchange == pytest.approx(0.0)
    # a push longer than a part: each of a task's last 3 parts waits for the reply 0.5 s
    assert longer.mid_exchange == pytest.approx(2 * 3 * (1.5 - 1.0))
    assert longer.wall == pytest.approx(2 * (4 + 3 * 0.5 + 1.5))


def test_the_leaders_arithmetic_is_on_the_groups_time_overlapped_or_not():
    # as above, plus 0.05 s of the leader's own arithmetic per push (update, copy of the reply)
    def run(overlap: bool):
        link = Link(bandwidth=4.0 / 0.05, update_s_per_float=0.05)  # one float: 0.05 s each way
        g = SimGroup(1, [SimTask(seconds=4.0, pushes=4)])
        return simulate(SimInput([g], 1, link, tasks=2, poll_min=1e-9, poll_max=1e-9, overlap=overlap))

    assert run(False).wall == pytest.approx(8 + 8 * (0.05 + 0.1))
    assert run(True).wall == pytest.approx(8 + 8 * 0.05 + 2 * 0.1)  # the transfers of 6 pushes hidden


def test_rounds_answer_every_push_with_the_rounds_last():
    """order: rounds, transfers free: a group whose parts take 0.9 s waits for one whose parts
    take 2 s at every push, where under arrival it takes the tasks the slow group would have."""

    def run(rounds: bool):
        groups = [
            SimGroup(1, [SimTask(seconds=1.8, pushes=2)]),
            SimGroup(1, [SimTask(seconds=4.0, pushes=2)]),
        ]
        return simulate(
            SimInput(groups, 1, Link(bandwidth=1e15), 4, poll_min=1e-9, poll_max=1e-9, rounds=rounds)
        )

    rounds, arrival = run(True), run(False)
    assert rounds.wall == pytest.approx(8.0) and rounds.commits == 4  # 2 tasks each, 2 s a round
    assert rounds.exchange == pytest.approx(4 * 1.1)  # the fast group waits 1.1 s at each of its pushes
    assert rounds.training_share == pytest.approx((2 * 1.8 + 2 * 4.0) / 16.0)
    assert arrival.wall == pytest.approx(3 * 1.8)  # the fast group trains 3 tasks, the slow one 1
    assert arrival.training_share == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rounds"):
        simulate(SimInput([SimGroup(1, [SimTask(1.0)])], 1, Link(1e15), 1, rounds=True, overlap=True))


def test_check_replays_a_run_with_the_wake_ups_it_measured(tmp_path):
    from hpc_dualbatch.commands.simulate import run_wakes

    (tmp_path / "status.json").write_text(json.dumps({"state": "done", "server": {"wake_late_ms": 0.25}}))
    commits = [{"sleeps": 10, "late": 0.02}, {"sleeps": 30, "late": 0.1}]
    assert run_wakes(str(tmp_path), commits, (1.0, 2.0)) == pytest.approx((0.00025, 0.12 / 40))
    # a run from before the counts: the given values
    (tmp_path / "status.json").write_text(json.dumps({"state": "done", "server": {"busy_share": 0.01}}))
    assert run_wakes(str(tmp_path), [{"wait": 0.1}], (1.0, 2.0)) == (1.0, 2.0)


def test_check_splits_each_task_as_unevenly_as_the_run_did():
    from hpc_dualbatch.commands.simulate import part_spread

    def push(kind: str, g: int, task: int, wall: float) -> dict:
        return {"type": kind, "group": g, "round": task, "wall": wall}

    # group 0: parts of 1.0 and 3.0 s (relative s.d. 0.5); group 1: 2.0 and 2.0 (0); the median
    recs = [push("merge", 0, 0, 10.0), push("merge", 0, 0, 11.0), push("commit", 0, 0, 14.0)]
    recs += [push("merge", 1, 0, 10.0), push("merge", 1, 0, 12.0), push("commit", 1, 0, 14.0)]
    recs += [push("merge", 2, 0, 10.0), push("commit", 2, 0, 11.0), push("merge", 2, 1, 30.0)]
    recs += [push("commit", 2, 1, 31.0), {"type": "eval", "epoch": 1}]  # group 2: 1.0, 1.0 (0)
    assert part_spread(recs) == pytest.approx(0.0)  # median of 0.5, 0, 0
    assert part_spread(recs[:6]) == pytest.approx(0.25)  # median of 0.5 and 0
    assert part_spread([push("commit", 0, 0, 1.0)]) == 0.0  # no pushes inside tasks


def test_the_leaders_measured_handling_replaces_the_links_arithmetic():
    """One group as in the test above: a measured handling of 0.1 s a push is on the group's
    time before each push leaves, in place of the link's arithmetic."""
    from hpc_dualbatch.commands.simulate import leader_seconds

    link = Link(bandwidth=4e6, latency=0.0, merge_s_per_float=1e-6, update_s_per_float=1e-6)
    g = SimGroup(1, [SimTask(seconds=6.0, pushes=3)])
    base = dict(floats=250_000, link=link, tasks=4, poll_min=1e-9, poll_max=1e-9)
    assert simulate(SimInput([g], **base)).exchange_per_push == pytest.approx(0.25 + 0.75)
    assert simulate(SimInput([g], leader_s=0.1, **base)).exchange_per_push == pytest.approx(0.1 + 0.75)
    # from a run's commit records: what the server's part leaves of the pushes' time, per push
    commits = [{"wait": 0.5, "waited": 0.3}, {"wait": 0.7, "waited": 0.5}]
    assert leader_seconds(commits, 4) == pytest.approx(0.1)
    assert leader_seconds([{"wait": 0.5}], 4) is None  # a run from before `waited`
    assert leader_seconds(commits, 0) is None


def test_check_refuses_a_run_that_switched_its_order(tmp_path):
    """server.order_by_lr [arrival, rounds]: the model holds one order throughout, so the check
    names the key rather than replaying the run as if it were all arrival."""
    from hpc_dualbatch.commands.simulate import replay
    from hpc_dualbatch.errors import ConfigError
    from tests.helpers import tiny_config, write_config

    raw = tiny_config(
        "unused.h5", tmp_path, server__order="arrival", server__order_by_lr=["arrival", "rounds"]
    )
    write_config(tmp_path / "config.yaml", raw)
    with pytest.raises(ConfigError, match=r"server.order_by_lr \['arrival', 'rounds'\] switched"):
        replay(str(tmp_path), Link(bandwidth=1e9), (0.0, 0.0))
