"""Topology at 2, 3 and 4 ranks: run by `mpirun -np N python -m pytest --with-mpi tests/mpi`.

Every assertion is first reduced over all ranks, so a failure on one rank fails the test on
every rank instead of leaving the others blocked in their next collective.
"""

from __future__ import annotations

import numpy as np
import pytest

mpi4py = pytest.importorskip("mpi4py")

from tests.mpi.common import all_true, groups_for  # noqa: E402


@pytest.fixture(scope="module")
def topo():
    from mpi4py import MPI

    from hpc_dualbatch.runtime.topology import build_topology

    return build_topology(groups_for(MPI.COMM_WORLD.Get_size()), servers=1)


@pytest.mark.mpi(min_size=2)
def test_groups_are_disjoint_and_cover_workers(topo):
    world = topo.world
    groups = groups_for(world.Get_size())
    seen = world.allgather((topo.rank, topo.role, topo.group, topo.group_rank, topo.group_size))  # MPI
    ok = seen[0][1] == "server" and seen[0][2] == -1
    members: dict[int, list[int]] = {}
    for rank, role, g, _grank, gsize in seen[1:]:
        ok &= role == "worker" and gsize == groups[g]
        members.setdefault(g, []).append(rank)
    flat = sorted(r for m in members.values() for r in m)
    ok &= flat == list(range(1, world.Get_size()))  # cover 1..N-1 exactly once
    ok &= [len(members[g]) for g in range(len(groups))] == groups
    ok &= list(topo.leaders) == [min(members[g]) for g in range(len(groups))]
    assert all_true(world, ok), seen


@pytest.mark.mpi(min_size=2)
def test_server_receives_a_buffer_from_every_worker(topo):
    world = topo.world
    buf = np.full(1000, float(topo.rank), dtype=np.float32)
    ok = True
    if topo.is_server:
        got = set()
        for _ in range(world.Get_size() - 1):
            st = mpi4py.MPI.Status()
            world.Recv(buf, source=mpi4py.MPI.ANY_SOURCE, tag=77, status=st)  # MPI
            ok &= bool(np.all(buf == st.Get_source()))
            got.add(st.Get_source())
        ok &= got == set(range(1, world.Get_size()))
    else:
        world.Send(buf, dest=0, tag=77)  # MPI: to the server
    assert all_true(world, ok)


@pytest.mark.mpi(min_size=2)
def test_horovod_allreduce_stays_inside_the_group(topo):
    pytest.importorskip("horovod.torch")
    import torch

    from hpc_dualbatch.runtime.topology import init_horovod

    world = topo.world
    ok = True
    layout = world.allgather(topo.group)  # MPI
    if not topo.is_server:
        hvd = init_horovod(topo)
        got = hvd.allreduce(torch.tensor([float(topo.rank)]), op=hvd.Sum).item()  # Horovod: group only
        expected = float(sum(r for r, g in enumerate(layout) if g == topo.group))
        ok = got == expected and hvd.size() == topo.group_size
        hvd.shutdown()
    assert all_true(world, ok)


@pytest.mark.mpi(min_size=2)
def test_backoff_receive_gets_the_message_without_spinning(topo):
    """The sleeping wait used by the server: the receiver burns little CPU while it waits."""
    import resource
    import time

    from hpc_dualbatch.ps.protocol import Backoff, recv

    world = topo.world
    buf = np.zeros(4, np.float64)
    ok = True
    if topo.rank == 0:
        c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        recv(world, buf, 1, 78, Backoff(0.0002, 0.02))
        c1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        ok = bool(np.all(buf == 5.0)) and cpu < 0.5 * (t1 - t0)
    elif topo.rank == 1:
        time.sleep(1.0)
        world.Send(np.full(4, 5.0), dest=0, tag=78)  # MPI
    assert all_true(world, ok)
