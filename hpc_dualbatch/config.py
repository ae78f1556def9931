"""The one typed, strict run configuration.

Declared once as dataclasses; loaded from YAML, then dotted command-line
overrides (`--set plan.k=1.1`) are applied. An unknown key, a wrong type or an
out-of-range value is a `ConfigError` naming the key and what would be valid.
The resolved config is written next to every run (`Config.to_dict`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from hpc_dualbatch.atomic import check_regular
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.yaml_safe import clip, show
from hpc_dualbatch.yaml_safe import load as _load_yaml


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


@dataclass
class OptimConfig:
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass
class ServerConfig:
    order: str = "arrival"  # arrival | round_robin (bit-for-bit reproducible)
    # How a push changes the global weights (docs/server.md):
    #   paper: w <- (w + f*w_i)/(1 + f), the method's rule (keeps ~1/(n+1) of a push's progress);
    #   delta: w <- w + a*(w_i - w_pulled), a = f/sum(f) * min(1, n/(staleness + 1)): the group's
    #          own update since its pull, as asynchronous local SGD / FedAsync apply it.
    merge: str = "delta"
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
    # meaning. The authors' code pushes every ~21 steps on CIFAR; local SGD uses 16.
    push_every: int = 16
    poll_min_s: float = 0.0002  # sleeping back-off while waiting: first sleep, seconds
    poll_max_s: float = 0.005  # ... doubling up to this; bounds the added latency per message
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
class CheckpointConfig:
    every_epochs: int = 5  # 0 = only on SIGTERM/SIGUSR1 and at the end
    keep: int = 2  # newest checkpoints kept


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def n_groups(self) -> int:
        return len(self.workers.groups)


MAX_EPOCHS = 100_000  # schedule.epochs: far beyond any recipe; bounds the per-epoch work of `plan`
MAX_POLL_S = 1.0  # server.poll_*_s: a longer sleep would add seconds of latency to every message
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
    "server.order": ("arrival", "round_robin"),
    "server.stage_by": ("task", "commit"),
    "server.merge": ("paper", "delta"),
    "server.bn": ("average", "recalibrate", "local"),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of its fields, got {show(value)}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list of {item.__name__}, got {show(value)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}' must be a mapping {kt.__name__} -> {vt.__name__}, got {show(value)}"
            )
        return {_convert(k, kt, f"{key} key"): _convert(v, vt, f"{key}[{k}]") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 1e308:
            raise ConfigError(f"config key '{key}' must be a number, got {show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # key=str: YAML keys may mix ints and strings
    if unknown:
        raise ConfigError(
            f"unknown config key '{clip(prefix + str(unknown[0]))}'; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, value parsed as YAML: 1.1 -> float, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override '{clip(text)}' must look like key.sub=value")
    key, _, val = text.partition("=")
    try:
        return key.strip(), _load_yaml(val, f"override '{clip(text)}'") if val.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{clip(text)}': value is not valid YAML ({e})") from None


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path:
        check_regular(
            path,
            "config file",
            ConfigError,
            "give a YAML config, e.g. hpc_dualbatch/configs/fashion_mnist.yaml",
        )
        try:
            with open(path, encoding="utf-8") as f:
                raw = _load_yaml(f, f"config file '{path}'") or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    for ov in overrides:
        _set_dotted(raw, *parse_override(ov))
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    for ov in overrides:
        _set_dotted(raw, *parse_override(ov))
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def _positive(key: str, value: float, allow_zero: bool = False, at_most: float | None = None) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (at_most is not None and value > at_most):
        if at_most is None:
            valid = ">= 0" if allow_zero else "> 0"
        else:
            valid = f"in {'[' if allow_zero else '('}0, {at_most:g}]"
        raise ConfigError(f"config key '{key}' must be {valid}, got {show(value)}")


def validate(cfg: Config) -> None:
    """Value checks that need no data file or timing file (those come in the planner).

    One check per section, run in this order: where several values are wrong, the error names
    the first found (the top-level keys are checked in their places between the sections)."""
    if not cfg.out.strip():
        raise ConfigError("config key 'out' is empty; give the run folder, e.g. out: runs/demo")
    _check_choices(cfg)
    _check_workers(cfg.workers)
    _check_plan(cfg.plan)
    if not 0 <= cfg.seed < 2**63:  # numpy's SeedSequence needs >= 0, torch.manual_seed < 2**64
        raise ConfigError(f"config key 'seed' is {cfg.seed}; valid: 0 .. 2**63 - 1")
    _check_schedule(cfg.schedule)
    _check_large_batch_covers(cfg.plan, cfg.schedule)
    _check_model(cfg.model)
    _check_data(cfg.data, cfg.schedule)
    _check_paths(cfg)
    _positive("threads", cfg.threads, allow_zero=True)
    _check_optim(cfg.optim)
    _check_server(cfg.server)
    _check_checkpoint(cfg.checkpoint)
    _check_combinations(cfg)


def _check_choices(cfg: Config) -> None:
    """Every choice key of every section against its CHOICES."""
    d = cfg.to_dict()
    for key, choices in CHOICES.items():
        v: Any = d
        for p in key.split("."):
            v = v[p]
        if v not in choices:
            raise ConfigError(f"config key '{key}' is {show(v)}; valid: {', '.join(choices)}")


def _check_workers(w: WorkersConfig) -> None:
    if not w.groups:
        raise ConfigError("config key 'workers.groups' must list at least one group size")
    for i, g in enumerate(w.groups):
        _positive(f"workers.groups[{i}]", g)
    if not 0 <= w.small <= len(w.groups):
        raise ConfigError(
            f"config key 'workers.small' (n_S) is {w.small}; valid: 0..{len(w.groups)} "
            f"(the number of groups in workers.groups)"
        )
    for g, f in w.slowdown.items():
        if not 0 <= g < len(w.groups) or not 1.0 <= f <= 100.0:
            raise ConfigError(
                f"config key 'workers.slowdown' has {g}: {f}; valid: group 0..{len(w.groups) - 1}: "
                f"factor 1..100"
            )


def _check_plan(p: PlanConfig) -> None:
    """The plan section by itself (that B_L is given at every resolution: after the schedule)."""
    if p.k < 1.0:
        raise ConfigError(f"config key 'plan.k' is {p.k}; the extra-time ratio must be >= 1 (1 = plain)")
    for res, b in p.large_batch.items():
        _positive(f"plan.large_batch[{res}]", b, at_most=MAX_BATCH)
    for res, b in p.small_batch.items():
        _positive(f"plan.small_batch[{res}]", b, at_most=MAX_BATCH)
    _positive("plan.samples_per_epoch", p.samples_per_epoch, allow_zero=True)
    _positive("plan.min_small_batch", p.min_small_batch)


def _check_schedule(s: ScheduleConfig) -> None:
    _positive("schedule.epochs", s.epochs)
    if s.epochs > MAX_EPOCHS:
        raise ConfigError(f"config key 'schedule.epochs' is {s.epochs}; valid: 1..{MAX_EPOCHS}")
    if not s.lr:
        raise ConfigError("config key 'schedule.lr' must list at least one learning rate")
    for i, lr in enumerate(s.lr):
        _positive(f"schedule.lr[{i}]", lr, at_most=MAX_LR)
    if len(s.milestones) != len(s.lr) - 1:
        raise ConfigError(
            f"config key 'schedule.milestones' needs len(schedule.lr) - 1 = {len(s.lr) - 1} epochs, "
            f"got {show(s.milestones)}"
        )
    prev = 0
    for m in s.milestones:
        if not prev < m < s.epochs:
            raise ConfigError(
                f"config key 'schedule.milestones' must rise strictly inside (0, {s.epochs}), "
                f"got {show(s.milestones)}"
            )
        prev = m
    if not s.resolutions or sorted(set(s.resolutions)) != list(s.resolutions):
        raise ConfigError(
            f"config key 'schedule.resolutions' must list distinct resolutions low -> high, "
            f"got {show(s.resolutions)}"
        )
    for r in s.resolutions:
        _positive("schedule.resolutions", r, at_most=MAX_PX)
    for res, pdrop in s.dropout.items():
        if not 0.0 <= pdrop < 1.0:
            raise ConfigError(f"config key 'schedule.dropout[{res}]' must be in [0, 1), got {pdrop}")
    _positive("schedule.warmup_epochs", s.warmup_epochs, allow_zero=True)
    if s.warmup_epochs > s.epochs:
        raise ConfigError(
            f"config key 'schedule.warmup_epochs' is {s.warmup_epochs}, more than the run's "
            f"schedule.epochs = {s.epochs}: the rate would stay near lr/10 all run; valid: 0 .. {s.epochs}"
        )


def _check_large_batch_covers(p: PlanConfig, s: ScheduleConfig) -> None:
    missing = [r for r in s.resolutions if r not in p.large_batch]
    if missing:
        raise ConfigError(
            f"config key 'plan.large_batch' has no B_L for resolution(s) {missing}; "
            f"give one for each of schedule.resolutions {s.resolutions}"
        )


def _check_model(m: ModelConfig) -> None:
    _positive("model.width", m.width, at_most=MAX_WIDTH)


def _check_data(d: DataConfig, s: ScheduleConfig) -> None:
    """The data section (after the schedule: the crop padding is bounded by its resolutions)."""
    _positive("data.eval_batch", d.eval_batch, at_most=MAX_BATCH)
    _positive("data.prefetch", d.prefetch, allow_zero=True, at_most=MAX_PREFETCH)
    # a crop from an image padded by more than its own size is mostly padding
    _positive("data.pad", d.pad, allow_zero=True, at_most=min(s.resolutions))


def _check_paths(cfg: Config) -> None:
    """The path keys of every section: a newline is folded by YAML, a NUL cut by the OS."""
    for key, value in (("out", cfg.out), ("data.path", cfg.data.path), ("plan.timing", cfg.plan.timing)):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(
                f"config key '{key}' is {show(value)}: a path with a control character; rename it"
            )


def _check_optim(o: OptimConfig) -> None:
    if not 0.0 <= o.momentum < 1.0:  # >= 1: every step adds more than the last; NaN follows
        raise ConfigError(f"config key 'optim.momentum' must be in [0, 1), got {o.momentum}")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)


def _check_server(sv: ServerConfig) -> None:
    """The server section's values (its choice keys are in CHOICES, checked first)."""
    _positive("server.poll_min_s", sv.poll_min_s)
    _positive("server.push_every", sv.push_every, allow_zero=True)
    _positive("server.bn_samples", sv.bn_samples)
    for key in ("poll_min_s", "poll_max_s"):
        if getattr(sv, key) > MAX_POLL_S:
            raise ConfigError(
                f"config key 'server.{key}' is {getattr(sv, key)} s; valid: up to {MAX_POLL_S} s "
                f"(it is a sleep between polls of a waiting rank, normally milliseconds)"
            )
    _positive("server.stall_s", sv.stall_s, allow_zero=True)
    _positive("server.preempt_wait_s", sv.preempt_wait_s)
    if sv.poll_max_s < sv.poll_min_s:
        raise ConfigError("config key 'server.poll_max_s' must be >= server.poll_min_s")


def _check_checkpoint(c: CheckpointConfig) -> None:
    _positive("checkpoint.every_epochs", c.every_epochs, allow_zero=True)
    _positive("checkpoint.keep", c.keep)


def _check_combinations(cfg: Config) -> None:
    """Values of different sections, each valid alone, that do not go together."""
    if cfg.server.order == "round_robin" and adaptive_on(cfg):
        raise ConfigError(
            "config key 'plan.adaptive' is true with server.order 'round_robin': round_robin promises "
            "bit-for-bit reproducible runs, adaptive planning chooses B_S from measured wall times; set "
            "plan.adaptive: false (the static plan) or server.order: arrival"
        )
    if cfg.mode == "sync" and cfg.workers.small:
        raise ConfigError("mode 'sync' trains one group at B_L: set workers.small to 0")


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


def unused_keys(cfg: Config) -> list[str]:
    """Per-resolution values for resolutions the schedule does not train at: ignored, and said
    (a config written for 20, 24, 28 px run with `schedule.resolutions=[28]` keeps them)."""
    used = cfg.schedule.resolutions
    found = []
    for key, values in (
        ("schedule.dropout", cfg.schedule.dropout),
        ("plan.large_batch", cfg.plan.large_batch),
        ("plan.small_batch", cfg.plan.small_batch),
    ):
        extra = sorted(r for r in values if r not in used)
        if extra:
            found.append(
                f"config key '{key}' has values for {', '.join(f'{r} px' for r in extra)}, which "
                f"schedule.resolutions {used} does not train at: ignored"
            )
    return found


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically."""
    from hpc_dualbatch.atomic import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
