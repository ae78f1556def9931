"""MPI topology, decided in one place: who is the server, who is in which group.

Parameter-server mode (`mode: ps`), for `workers.groups = [g_0, g_1, ...]` and S =
`server.shards`::

    ranks 0 .. S-1              the parameter server's shards (no Horovod, no model training);
                                shard 0 decides, each shard owns a slice of the weights
    ranks S .. S+g_0-1          worker group 0   (its group rank 0 is the leader)
    next g_1 ranks              worker group 1
    ...

Synchronous mode (`mode: sync`): every rank is in one group, no server.

The groups are communicators from `COMM_WORLD.Split`; Horovod is initialised
on a rank's group communicator, so its collectives stay inside the group while
the leaders still reach the server on COMM_WORLD. This module is the only one
that reads rank or Slurm environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hpc_dualbatch.config import small_groups
from hpc_dualbatch.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    world: Any  # mpi4py COMM_WORLD
    rank: int
    size: int
    role: str  # "server" | "worker"
    group: int  # worker group index; -1 on the server
    group_comm: Any  # mpi4py communicator of the group; None on the server
    group_rank: int
    group_size: int
    leaders: tuple[int, ...]  # world rank of each group's leader
    local_rank: int  # rank among the processes on this node (GPU choice)
    local_size: int  # processes on this node (threads_per_rank)
    servers: tuple[int, ...] = (0,)  # world ranks of the server's shards (0 .. S-1)

    @property
    def shard(self) -> int:
        """This rank's server shard (0 decides), or -1 on a worker."""
        return self.rank if self.role == "server" else -1

    @property
    def is_server(self) -> bool:
        return self.role == "server"

    @property
    def is_leader(self) -> bool:
        return self.role == "worker" and self.group_rank == 0

    @property
    def n_groups(self) -> int:
        return len(self.leaders)


def group_layout(groups: list[int], servers: int) -> list[int]:
    """Group index of each world rank (-1 = a server shard; `servers`: their number, 0 in sync
    mode, where True counts as 1). Pure, for tests and the docs."""
    layout = [-1] * int(servers)
    for g, n in enumerate(groups):
        layout += [g] * n
    return layout


def expected_world_size(groups: list[int], servers: int) -> int:
    return sum(groups) + int(servers)


def check_world_size(actual: int, groups: list[int], servers: int) -> None:
    slurm_ntasks = os.environ.get("SLURM_NTASKS", "")
    # A wrong PMI plugin starts every task of an srun step as a singleton of size 1, without an
    # error. Only that case is a sign of it: under mpirun inside an allocation the ranks inherit
    # SLURM_NTASKS of mpirun's daemon step (one task per node), which says nothing about the world.
    if actual == 1 and slurm_ntasks.isdigit() and int(slurm_ntasks) > 1 and "SLURM_STEP_ID" in os.environ:
        raise ConfigError(
            f"MPI world size is 1 but Slurm started SLURM_NTASKS={slurm_ntasks} tasks: the ranks did "
            f"not join one MPI world; launch with srun --mpi=pmix (or the PMI plugin your MPI was built with)"
        )
    expected = expected_world_size(groups, servers)
    if actual != expected:
        shards = f"{int(servers)} server ranks (server.shards)" if servers > 1 else "1 server"
        who = f"{shards} + {sum(groups)} worker ranks" if servers else f"{sum(groups)} worker ranks"
        raise ConfigError(
            f"world size is {actual} but the config needs {expected} ({who}, workers.groups = {groups}); "
            f"launch with mpirun -np {expected} / srun -n {expected}, or change workers.groups"
        )


def hetjob_components(groups: list[int], small: int, servers: int = 1) -> list[tuple[int, str]]:
    """Tasks per component of a Slurm hetjob for this config: the server, the large, the small groups.

    The small-batch groups are the last `small` groups, so one `srun --het-group=0,1,2` (ranks
    numbered component by component) puts the server on rank 0, the large groups next and the
    small groups last, exactly as `group_layout`. An empty component is left out.
    """
    n_large = small_groups(len(groups), small).count(False)
    parts = [
        (int(servers), "the server" if servers == 1 else f"the server's {servers} shards"),
        (sum(groups[:n_large]), "the large-batch groups"),
        (sum(groups[n_large:]), f"the small-batch groups (the last {small})"),
    ]
    return [(n, what) for n, what in parts if n > 0]


def check_hetjob(groups: list[int], small: int, servers: int, env: Any = None) -> None:
    """Inside a step of a Slurm heterogeneous job, check each component's task count against the config.

    Reads SLURM_HET_SIZE and SLURM_NTASKS_HET_GROUP_<n> (srun sets them in every task of a hetjob
    step); does nothing outside a hetjob step (no SLURM_STEP_ID) or without a server (sync mode).
    """
    env = os.environ if env is None else env
    size = env.get("SLURM_HET_SIZE", "")
    if not servers or not size.isdigit() or "SLURM_STEP_ID" not in env:
        return
    actual = [env.get(f"SLURM_NTASKS_HET_GROUP_{c}", "?") for c in range(int(size))]
    expected = hetjob_components(groups, small, servers)
    if actual != [str(n) for n, _ in expected]:
        want = ", ".join(f"component {c}: {n} for {what}" for c, (n, what) in enumerate(expected))
        raise ConfigError(
            f"the heterogeneous job's components have {'/'.join(actual)} tasks but workers.groups = {groups} "
            f"with workers.small = {small} needs {len(expected)} components ({want}); "
            f"change the components' --ntasks or the config"
        )


def build_topology(groups: list[int], servers: int, world: Any = None) -> Topology:
    """Split COMM_WORLD into the server's shards (`servers` of them; True counts as 1, False as
    none) and the worker groups. Collective over `world`."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD if world is None else world
    rank, size = world.Get_rank(), world.Get_size()
    check_world_size(size, groups, servers)  # every rank checks the same numbers
    layout = group_layout(groups, servers)
    group = layout[rank]
    color = MPI.UNDEFINED if group < 0 else group
    group_comm = world.Split(color, rank)  # MPI: collective on COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, rank)  # MPI: ranks sharing this node
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    leaders = tuple(layout.index(g) for g in range(len(groups)))
    shards = tuple(range(int(servers)))
    if group < 0:
        return Topology(world, rank, size, "server", -1, None, 0, 0, leaders, local_rank, local_size, shards)
    return Topology(
        world,
        rank,
        size,
        "worker",
        group,
        group_comm,
        group_comm.Get_rank(),
        group_comm.Get_size(),
        leaders,
        local_rank,
        local_size,
        shards,
    )


def threads_per_rank(topo: Topology, configured: int) -> int:
    """Torch threads of this rank: config key `threads`, or (0) the cores this process may use
    divided by the ranks on this node, at least 1, so that ranks do not oversubscribe cores.
    Never more than the cores this process may use (threads=1000 on 2 cores made no progress)."""
    return min(configured, cores()) if configured > 0 else max(1, cores() // topo.local_size)


def cores() -> int:
    """The cores this process may use (its CPU affinity, which Slurm and mpirun bindings set)."""
    return len(os.sched_getaffinity(0))


def init_horovod(topo: Topology) -> Any:
    """Initialise Horovod on this rank's group communicator (workers only); returns the module."""
    import horovod.torch as hvd

    hvd.init(comm=topo.group_comm)  # Horovod: collectives stay inside the group
    if hvd.size() != topo.group_size:
        raise RuntimeError(f"Horovod sees {hvd.size()} ranks in group {topo.group}, MPI {topo.group_size}")
    return hvd
