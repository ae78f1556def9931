"""The value checks of a loaded config: `validate`, one check per section, and
`unused_keys`, the per-resolution values the schedule leaves unused (a warning, not an error).
"""

from __future__ import annotations

from typing import Any

from hpc_dualbatch.config.schema import (
    CHOICES,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_LR,
    MAX_POLL_S,
    MAX_PREFETCH,
    MAX_PX,
    MAX_SHARDS,
    MAX_WIDTH,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    ScheduleConfig,
    ServerConfig,
    WorkersConfig,
    adaptive_on,
)
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.yaml_safe import show


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
    for key, value in (("momentum", o.momentum), ("ps_momentum", o.ps_momentum)):
        if not 0.0 <= value < 1.0:  # >= 1: every step adds more than the last; NaN follows
            raise ConfigError(f"config key 'optim.{key}' must be in [0, 1), got {value}")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)


def _check_server(sv: ServerConfig) -> None:
    """The server section's values (its choice keys are in CHOICES, checked first)."""
    _positive("server.poll_min_s", sv.poll_min_s)
    _positive("server.push_every", sv.push_every, allow_zero=True)
    _positive("server.bn_samples", sv.bn_samples)
    if not 1 <= sv.shards <= MAX_SHARDS:
        raise ConfigError(
            f"config key 'server.shards' is {sv.shards}; valid: 1 to {MAX_SHARDS} server ranks (each owns a "
            f"slice of the weights; docs/scaling.md says how many a cluster needs)"
        )
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
    _positive("server.outer_lr", sv.outer_lr, at_most=MAX_LR)
    if not 0.0 <= sv.outer_momentum < 1.0:
        raise ConfigError(f"config key 'server.outer_momentum' must be in [0, 1), got {sv.outer_momentum}")
    for i, every in enumerate(sv.push_every_by_lr):
        _positive(f"server.push_every_by_lr[{i}]", every, allow_zero=True)


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
    sv, n_lr = cfg.server, len(cfg.schedule.lr)
    if sv.outer != "none" and sv.merge == "paper":
        raise ConfigError(
            f"config key 'server.outer' is '{sv.outer}' with server.merge 'paper': outer momentum acts "
            "on a push's update since its pull; set server.merge: delta or nova, or server.outer: none"
        )
    if sv.stale_lr == "rescale" and sv.merge == "paper":
        raise ConfigError(
            "config key 'server.stale_lr' is 'rescale' with server.merge 'paper': it scales a push's "
            "update since its pull; set server.merge: delta or nova, or server.stale_lr: keep"
        )
    if cfg.schedule.average != "none":
        bn, key = (cfg.sync.bn, "sync.bn") if cfg.mode == "sync" else (sv.bn, "server.bn")
        if bn != "recalibrate":
            raise ConfigError(
                f"config key 'schedule.average' is '{cfg.schedule.average}' with {key} '{bn}': the "
                f"averaged weights need BN statistics of their own; set {key}: recalibrate, or "
                "schedule.average: none"
            )
        if cfg.mode == "ps" and sv.shards != 1:
            raise ConfigError(
                f"config key 'schedule.average' is '{cfg.schedule.average}' with server.shards "
                f"{sv.shards}: the average is held by one server rank; set server.shards: 1, or "
                "schedule.average: none"
            )
    by_mom = cfg.optim.ps_momentum_by_lr
    if by_mom and (len(by_mom) != n_lr or not all(0.0 <= m < 1.0 for m in by_mom)):
        raise ConfigError(
            f"config key 'optim.ps_momentum_by_lr' needs one momentum in [0, 1) per schedule.lr "
            f"stage ({n_lr}), got {show(by_mom)}; or [] for optim.ps_momentum throughout"
        )
    if sv.push_every_by_lr and len(sv.push_every_by_lr) != n_lr:
        raise ConfigError(
            f"config key 'server.push_every_by_lr' needs one value per schedule.lr stage ({n_lr}), "
            f"got {show(sv.push_every_by_lr)}; or [] for server.push_every throughout"
        )
    if sv.order_by_lr and (len(sv.order_by_lr) != n_lr or set(sv.order_by_lr) - {"arrival", "rounds"}):
        raise ConfigError(
            f"config key 'server.order_by_lr' needs one of arrival | rounds per schedule.lr stage "
            f"({n_lr}), got {show(sv.order_by_lr)}; or [] for server.order throughout"
        )
    if sv.order_by_lr and sv.order == "round_robin":
        raise ConfigError(
            "config key 'server.order_by_lr' is set with server.order 'round_robin', which serves the "
            "groups in a fixed order throughout; set server.order: arrival, or server.order_by_lr: []"
        )


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
