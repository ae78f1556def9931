"""What a run config holds: one dataclass per section (`Config` holds them all), the valid
values of each choice key (`CHOICES`) and the bounds of the values that size memory or time
(`MAX_*`), and what a config implies (`planned_resolutions`, `adaptive_on`, `small_groups`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    path: str = "data/fashion-mnist.h5"  # staged HDF5 from `hpc-dualbatch prepare`
    in_memory: str = "auto"  # auto | always | never: load a resolution whole into RAM
    in_memory_max_mb: int = 2048  # "auto" loads a resolution into RAM up to this size
    assignment: str = "partition"  # partition (disjoint per round) | reshuffle (authors' code)
    augment: bool = True  # random crop with padding (+ flip) on training batches
    flip: bool = True  # horizontal flip; off for data where mirroring changes the class
    pad: int = 2  # crop padding in pixels at the largest staged resolution, scaled per resolution
    prefetch: int = 2  # batches loaded ahead in a background thread
    eval_batch: int = 1000  # samples per evaluation batch per rank


@dataclass
class ModelConfig:
    arch: str = "resnet18_cifar"  # resnet18_cifar, or a torchvision classification model name
    width: int = 64  # channels of the first stage (64 = the standard ResNet-18)


@dataclass
class WorkersConfig:
    groups: list[int] = field(default_factory=lambda: [1, 1, 1])  # ranks per worker group
    small: int = 1  # n_S: the last `small` groups train with the small batch B_S
    # For benchmarks and tests of adaptive planning: group -> factor >= 1; that group's ranks
    # sleep (factor - 1) times each training step's time, as on a slower or shared node.
    slowdown: dict[int, float] = field(default_factory=dict)


@dataclass
class PlanConfig:
    k: float = 1.05  # allowed extra time per epoch over all-large training (1 = plain)
    factor: str = "data_ratio"  # contribution factor of a small group: data_ratio | sqrt | none
    timing: str = ""  # timing JSON from `hpc-dualbatch profile`; needed unless small_batch is set
    large_batch: dict[int, int] = field(default_factory=dict)  # B_L per resolution (px -> samples)
    small_batch: dict[int, int] = field(default_factory=dict)  # explicit B_S per resolution
    # The floor of a planned B_S (static and adaptive), samples per step of a small group: below
    # it a group cannot train at the schedule's learning rate (docs/planning.md, "The floor").
    min_small_batch: int = 16
    samples_per_epoch: int = 0  # d; 0 = the size of the training split
    # Re-plan each small group's B_S from the mini-epoch times the run measures, so that small
    # and large groups finish together on the machine the run is on (adapt.py; docs/planning.md).
    # Applies where B_S is planned from plan.timing, not to explicit plan.small_batch.
    adaptive: bool = True


@dataclass
class ScheduleConfig:
    epochs: int = 10
    lr: list[float] = field(default_factory=lambda: [0.2, 0.02, 0.002])  # LR of each stage
    milestones: list[int] = field(default_factory=lambda: [6, 9])  # epochs where a stage starts
    warmup_epochs: int = 0  # linear LR warm-up from lr[0]/10 over this many epochs
    resolution_mode: str = "cyclic"  # cyclic | progressive | fixed
    resolutions: list[int] = field(default_factory=lambda: [20, 24, 28])  # low -> high, px
    dropout: dict[int, float] = field(default_factory=dict)  # per resolution; missing = 0
    # A small group's learning rate: the large groups' (same, the method), or scaled by
    # (B_S/B_L)^(1/2) (sqrt, Hoffer et al. 2017) or B_S/B_L (linear, Goyal et al. 2017). sqrt:
    # +1.0 to +1.9 points over same in every dual-batch and hybrid configuration of the
    # Fashion-MNIST grid (3 seeds, results/README.md).
    small_lr: str = "sqrt"
    # In a parameter-server run, how a warm-up ramps inside a task: one rate per task, the rate
    # at the task's place in the epoch (task), or per step across the task's 1/n of the epoch
    # (step: with one group, exactly the synchronous run's per-step ramp). Sync runs ramp per step.
    # step: one group through the server 90.16 % against 88.17 % (3 seeds); four groups within
    # the seeds' spread of task (results/README.md).
    warmup_ramp: str = "step"
    # What is evaluated and saved: the last iterate (none), or the uniform mean of the weights
    # over the last learning-rate stage (last_stage: tail averaging, method/average.py), sampled
    # after every step (sync) or merge (ps). Needs recomputed BN statistics (sync.bn or
    # server.bn: recalibrate) and one server rank (server.shards: 1).
    average: str = "none"


@dataclass
class OptimConfig:
    momentum: float = 0.9  # SGD momentum of a synchronous run (mode: sync)
    # SGD momentum inside each worker group of a parameter-server run (mode: ps). Asynchronous
    # updates act as momentum of their own (Mitliagkas et al. 2016, arXiv 1605.09774: about
    # 1 - 1/M with M asynchronous workers; Liu et al. 2018, arXiv 1806.01660: asynchronous
    # momentum SGD needs less momentum than synchronous), so the groups take less than a
    # synchronous run would. 0.8: the Fashion-MNIST server part's defaults +0.33 points over 0.9
    # on one code (89.77 +- 0.34 % against 89.43 +- 0.17, 5 seeds; 0.6: 89.01 +- 0.68, 3 seeds;
    # sync 90.00 +- 0.42); on the dual-batch part level (87.91 +- 0.47 % against 87.89 +- 0.77,
    # 5 seeds each); results/README.md.
    ps_momentum: float = 0.8
    # One ps_momentum per learning-rate stage (len(schedule.lr) values), e.g. [0.8, 0.9] with
    # server.order_by_lr [arrival, rounds]: barrier-synchronous rounds add no momentum of their
    # own, so there the groups may take a synchronous run's. Empty: ps_momentum throughout.
    ps_momentum_by_lr: list[float] = field(default_factory=list)
    weight_decay: float = 1e-4


@dataclass
class ServerConfig:
    # arrival | round_robin (bit-for-bit reproducible) | rounds (a control: every push is answered
    # once every group has pushed, i.e. barrier-synchronous local SGD through the server)
    order: str = "arrival"
    # How a push changes the global weights (docs/server.md):
    #   paper: w <- (w + f*w_i)/(1 + f), the method's rule (keeps ~1/(n+1) of a push's progress);
    #   delta: w <- w + a*(w_i - w_pulled), a = f/sum(f) * min(1, n/(staleness + 1)): the group's
    #          own update since its pull, as asynchronous local SGD / FedAsync apply it;
    #   nova:  delta with a = B_i/sum(B) * min(1, n/(staleness + 1)): each update normalised by
    #          its steps and weighted by its samples (FedNova, Wang et al. 2020, arXiv 2007.07481).
    merge: str = "delta"
    # Outer momentum on the steps of delta / nova (docs/server.md): none; nesterov (at every
    # push); delayed (plain steps as pushes arrive, the momentum step once every n pushes: Liu et
    # al. 2024, arXiv 2401.09135). Rate and momentum: DiLoCo's (Douillard et al. 2023, arXiv
    # 2311.08105); the buffer is kept in units of the inner rate (SlowMo, arXiv 1910.00643). Off:
    # DiLoCo's values and SlowMo's (lr 1.0, momentum 0.5) both lost 8-10 points on the
    # Fashion-MNIST grid (3 seeds each; docs/server.md, "server.outer").
    outer: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    # Batch-norm running statistics of the global model (docs/server.md):
    #   average: merged like the weights (the method's authors' code);
    #   recalibrate: also merged, but recomputed from training samples before every evaluation
    #                and for the final model (as stochastic weight averaging does);
    #   local: never merged, each group keeps its own (as local SGD does).
    bn: str = "recalibrate"
    # Which count a task's stage (LR, resolution, dropout) follows (docs/server.md):
    #   task: its index among the tasks handed out (task t belongs to epoch t // n), so every
    #         epoch's n tasks train at that epoch's stage;
    #   commit: the commits merged when it is handed out (the method: "milestones fire at commit
    #           counts"); with n tasks in flight this lags the schedule by up to one epoch.
    stage_by: str = "task"
    bn_samples: int = 2560  # training samples (fixed, seeded, not augmented) a recalibration uses
    # Large-batch steps between pushes; 0 = one push per mini-epoch (the method). Every group
    # pushes the same number of times per mini-epoch, so a small group's push weight f keeps its
    # meaning. The authors' code pushes every ~21 steps on CIFAR; local SGD uses 16. 4: the
    # Fashion-MNIST grid's second round (3 seeds) ended 89.73 % at 4 against 88.32 % at 16 and
    # sync's 90.06 %, at no time cost there; each push costs ~13 ms at ResNet-18 size, so a large
    # model on fast GPUs may want 8-16 (docs/server.md, "What a push period costs").
    push_every: int = 4
    # One push_every per learning-rate stage (len(schedule.lr) values), e.g. [4, 16]: push often
    # while the rate is high, seldom after it decays (post-local SGD, Lin et al. 2020, arXiv
    # 1808.07217). Empty: push_every throughout.
    push_every_by_lr: list[int] = field(default_factory=list)
    # One server.order per learning-rate stage (len(schedule.lr) values, each arrival or rounds),
    # e.g. [arrival, rounds]: asynchronous while the rate is high, barrier-synchronous rounds after
    # it decays, where the Fashion-MNIST grid's asynchronous runs fell behind sync (per-epoch
    # means). There [arrival, rounds] ended 0.10 below sync (6 seeds, standard error 0.20), not
    # resolved from arrival's 0.25 below (docs/server.md, "Controls"). Empty: server.order throughout.
    order_by_lr: list[str] = field(default_factory=list)
    # A group trains on while its push inside a task travels (its leader's thread sends it and
    # takes the reply): the reply is folded in at the next push point as reply + the steps taken
    # since the push, so the group sees the other groups' updates one push period later (one
    # period more staleness), and the exchange leaves the group's critical path. Pushes that end
    # a task stay blocking (their reply is the next task). Overlap Local-SGD (Wang et al. 2020,
    # arXiv 2002.09539) does the same with an anchor model. Off: it cost 0.9 and 3.4 points in
    # the Fashion-MNIST grid (3 seeds; docs/server.md, "server.overlap").
    overlap: bool = False
    # A push from a task of an earlier learning-rate stage, merged after the first task of a
    # later stage was handed out (a slow group still training at the old rate while the others
    # train at the decayed one; under arrival order a whole task of it on the Fashion-MNIST
    # grid):
    #   keep: merged as trained;
    #   rescale: its weight times the newest stage's rate over its own (at most 1), as a server
    #            that is pushed gradients applies its current rate to a stale one (Dean et al.
    #            2012, Downpour SGD). Needs merge: delta or nova (an update to scale).
    # keep: rescale ended 0.49 points below it on the Fashion-MNIST server part (3 seeds, each
    # below; the scaled pushes were progress, docs/server.md, "server.stale_lr").
    stale_lr: str = "keep"
    # Server ranks (world ranks 0 .. shards-1), each owning a contiguous slice of the flat
    # weights: pushes and pulls are split across them, so the server's link and merge scale with
    # S (docs/scaling.md says where a shard more pays). Shard 0 decides everything else.
    shards: int = 1
    poll_min_s: float = 0.0002  # sleeping back-off while waiting: first sleep, seconds
    poll_max_s: float = 0.005  # ... a tenth of the wait so far, up to this (protocol.next_sleep)
    # The server's wait for the next request also wakes when one is expected (each group's last
    # turnaround after its reply, protocol.Arrivals) and tests every poll_min_s from there, so a
    # regular push is noticed within ~poll_min_s instead of up to poll_max_s (docs/server.md,
    # "Waiting"). false: the plain back-off.
    poll_predict: bool = True
    # A group not heard from for this long is stalled (a stopped, hung or crashed rank): the
    # server checkpoints without it and ends the job naming it (docs/reliability.md). The bound
    # used is the larger of this and 4x the longest silence any group has shown in the run, so
    # a long task or evaluation is not taken for a stall. 0: never. Seconds.
    stall_s: float = 600.0
    # How long a preemption's checkpoint (SIGTERM/SIGUSR1), or a stall's, waits for the groups
    # to finish their tasks; a group not parked by then is left out of the checkpoint (its task
    # is handed out again on resume). Under the 300 s of the Slurm templates' --signal. Seconds.
    preempt_wait_s: float = 120.0


@dataclass
class SyncConfig:
    # Batch-norm statistics a synchronous run (mode: sync) evaluates with:
    #   running: each rank's running statistics, as plain Horovod training keeps them (the bar
    #            the parameter server is measured against);
    #   recalibrate: recomputed before every evaluation on server.bn_samples fixed training
    #                images, as server.bn: recalibrate does for the server's model: the same
    #                treatment, so that a comparison of the two is not one of BN statistics.
    #                Training never reads them; the weights, and so the run, stay the same.
    #                On the Fashion-MNIST server part: +0.10 points at the end (8 seeds), 3-10
    #                mid-run (results/README.md, sync-bnrecal). Costs ~3 % of the wall time.
    bn: str = "running"


@dataclass
class CheckpointConfig:
    every_epochs: int = 5  # 0 = only on SIGTERM/SIGUSR1 and at the end
    keep: int = 2  # newest checkpoints kept


@dataclass
class MetricsConfig:
    # TensorBoard event files in <out>/tb/, built from the metrics.jsonl records (runtime/events.py):
    # auto (where the tensorboard package is importable) | always (a start-up error without it) |
    # never (the words of data.in_memory: YAML reads on and off as true and false)
    tensorboard: str = "auto"
    # Their x-axis: step (commit, merge or evaluated commit count) | wall (ms of training)
    tensorboard_x: str = "step"


@dataclass
class Config:
    mode: str = "ps"  # ps (parameter server + groups) | sync (one Horovod group, no server)
    seed: int = 0
    out: str = "runs/demo"
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    threads: int = 0  # torch threads per rank; 0 = cores / ranks on this node
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def n_groups(self) -> int:
        return len(self.workers.groups)

    @property
    def momentum(self) -> tuple[str, float]:
        """The SGD momentum a worker rank trains with, and its config key (by mode)."""
        if self.mode == "ps":
            return "optim.ps_momentum", self.optim.ps_momentum
        return "optim.momentum", self.optim.momentum

    @property
    def n_servers(self) -> int:
        """Server ranks: server.shards in a parameter-server run, none in a synchronous one."""
        return self.server.shards if self.mode == "ps" else 0


MAX_EPOCHS = 100_000  # schedule.epochs: far beyond any recipe; bounds the per-epoch work of `plan`
MAX_POLL_S = 1.0  # server.poll_*_s: a longer sleep would add seconds of latency to every message
MAX_SHARDS = 64  # server.shards: docs/scaling.md's model needs at most 16 at 1,024 GPUs
# Upper bounds of values that size memory or overflow arithmetic: far beyond any recipe, low
# enough that a typo is a message rather than an allocation traceback or NaN at the first step.
MAX_LR = 100.0  # schedule.lr: SGD recipes stay <= ~10 even with linear scaling to huge batches
MAX_PX = 2048  # schedule.resolutions, prepare --resolutions: recipes train at <= 512 px
MAX_WIDTH = 1024  # model.width: ResNet-18 at 1024 has ~2.9 G parameters (11.6 GB in float32)
MAX_BATCH = 65_536  # plan.*_batch, data.eval_batch: samples per group step
MAX_PREFETCH = 64  # data.prefetch: batches held in memory ahead of training

CHOICES = {  # the valid values of each choice key: the one list every module checks against
    "mode": ("ps", "sync"),
    "device": ("auto", "cpu", "cuda"),
    "data.in_memory": ("auto", "always", "never"),
    "data.assignment": ("partition", "reshuffle"),
    "plan.factor": ("data_ratio", "sqrt", "none"),
    "schedule.resolution_mode": ("cyclic", "progressive", "fixed"),
    "schedule.small_lr": ("same", "sqrt", "linear"),
    "schedule.warmup_ramp": ("task", "step"),
    "schedule.average": ("none", "last_stage"),
    "server.order": ("arrival", "round_robin", "rounds"),
    "server.stage_by": ("task", "commit"),
    "server.merge": ("paper", "delta", "nova"),
    "server.outer": ("none", "nesterov", "delayed"),
    "server.stale_lr": ("keep", "rescale"),
    "server.bn": ("average", "recalibrate", "local"),
    "sync.bn": ("running", "recalibrate"),
    "metrics.tensorboard": ("auto", "always", "never"),
    "metrics.tensorboard_x": ("step", "wall"),
}


def planned_resolutions(cfg: Config) -> list[int]:
    """The resolutions whose B_S is planned from the timing file (not given in plan.small_batch)."""
    return [r for r in cfg.schedule.resolutions if r not in cfg.plan.small_batch]


def adaptive_on(cfg: Config) -> bool:
    """Whether the server re-plans B_S during the run: plan.adaptive, a parameter-server run with
    small groups beside large ones, and a B_S planned (not given) at some resolution."""
    w = cfg.workers
    return (
        cfg.plan.adaptive
        and cfg.mode == "ps"
        and 0 < w.small < len(w.groups)
        and bool(planned_resolutions(cfg))
    )


def small_groups(n_groups: int, n_small: int) -> list[bool]:
    """Which groups train with the small batch: the last n_small (workers.small). The planner,
    the profiler and the Slurm het-job components all follow this one layout."""
    return [g >= n_groups - n_small for g in range(n_groups)]
