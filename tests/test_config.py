from __future__ import annotations

import pytest

from hpc_dualbatch.config import Config, load_config, save_config
from hpc_dualbatch.errors import ConfigError


def world(cfg: Config) -> int:
    """Ranks the config needs (one server + the worker ranks, or the workers in sync mode)."""
    from hpc_dualbatch.runtime.topology import expected_world_size

    return expected_world_size(cfg.workers.groups, cfg.mode == "ps")


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None, ["plan.large_batch={20: 64, 24: 64, 28: 64}"])
    path = tmp_path / "c.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert world(cfg) == 4 and cfg.n_groups == 3


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "plan.large_batch={20: 64, 24: 64, 28: 64}",
            "plan.k=1.1",
            "workers.groups=[2, 1]",
            "server.order=round_robin",
            "plan.adaptive=false",
            "data.augment=false",
        ],
    )
    assert (
        cfg.plan.adaptive is False
        and cfg.plan.k == 1.1
        and cfg.workers.groups == [2, 1]
        and cfg.server.order == "round_robin"
    )
    assert cfg.data.augment is False and world(cfg) == 4


@pytest.mark.parametrize(
    "override, needle",
    [
        ("bogus=1", "unknown config key 'bogus'"),
        ("plan.bogus=1", "unknown config key 'plan.bogus'"),
        ("plan.k=fast", "'plan.k' must be a number"),
        ("workers.groups=3", "'workers.groups' must be a list"),
        ("workers.groups=[1, true]", "'workers.groups[1]' must be an integer"),
        ("data.augment=1", "'data.augment' must be true or false"),
        ("server.order=random", "'server.order' is 'random'; valid: arrival, round_robin"),
        ("plan.k=0.9", "'plan.k' is 0.9"),
        ("workers.small=4", "'workers.small' (n_S) is 4; valid: 0..3"),
        ("workers.groups=[1, 0]", "'workers.groups[1]' must be > 0"),
        ("plan.large_batch={20: -1, 24: 64, 28: 64}", "'plan.large_batch[20]' must be in (0, 65536]"),
        ("schedule.milestones=[6]", "'schedule.milestones' needs"),
        ("schedule.resolutions=[28, 20]", "low -> high"),
        ("plan.large_batch={20: 64}", "no B_L for resolution(s) [24, 28]"),
        ("schedule.dropout={20: 1.5}", "'schedule.dropout[20]' must be in [0, 1)"),
        ("noequals", "must look like key.sub=value"),
        ("workers.slowdown={3: 2.0}", "'workers.slowdown' has 3: 2.0; valid: group 0..2"),
        ("workers.slowdown={0: 0.5}", "factor 1..100"),
        ("server.order=round_robin", "'plan.adaptive' is true with server.order 'round_robin'"),
        ("optim.momentum=5", "'optim.momentum' must be in [0, 1), got 5"),
        ("optim.momentum=1.0", "'optim.momentum' must be in [0, 1)"),
        ("optim.ps_momentum=-0.1", "'optim.ps_momentum' must be in [0, 1), got -0.1"),
        ("schedule.warmup_epochs=11", "'schedule.warmup_epochs' is 11, more than the run's schedule.epochs"),
        ("plan.min_small_batch=0", "'plan.min_small_batch' must be > 0"),
        # values without a natural upper bound: bounded, so a typo is a message, not NaN or an
        # allocation traceback (issue 23 item 6)
        ("schedule.lr=[1.0e+300, 1.0e+299]", "'schedule.lr[0]' must be in (0, 100], got 1e+300"),
        ("model.width=100000", "'model.width' must be in (0, 1024], got 100000"),
        ("data.pad=100000", "'data.pad' must be in [0, 20], got 100000"),
        ("schedule.resolutions=[20, 24, 5000]", "'schedule.resolutions' must be in (0, 2048], got 5000"),
        ("data.prefetch=1000", "'data.prefetch' must be in [0, 64]"),
        ("model.width=" + "9" * 300, "got 99999999999999999999"),  # clipped: not 300 digits
        ('out="runs/a\\nb"', "config key 'out' is 'runs/a\\nb': a path with a control character"),
        ("server.outer_momentum=1.0", "'server.outer_momentum' must be in [0, 1)"),
        (
            "server.push_every_by_lr=[4]",
            "'server.push_every_by_lr' needs one value per schedule.lr stage (3)",
        ),
        (
            "server.order_by_lr=[arrival, rounds]",
            "needs one of arrival | rounds per schedule.lr stage (3), got ['arrival', 'rounds']",
        ),
        (
            "server.order_by_lr=[arrival, rounds, round_robin]",
            "'server.order_by_lr' needs one of arrival | rounds per schedule.lr stage (3)",
        ),
        ("schedule.small_lr=cubic", "'schedule.small_lr' is 'cubic'; valid: same, sqrt, linear"),
        ("metrics.tensorboard=maybe", "'metrics.tensorboard' is 'maybe'; valid: auto, always, never"),
        ("metrics.tensorboard_x=epoch", "'metrics.tensorboard_x' is 'epoch'; valid: step, wall"),
        ("sync.bn=average", "'sync.bn' is 'average'; valid: running, recalibrate"),
        ("server.stale_lr=drop", "'server.stale_lr' is 'drop'; valid: keep, rescale"),
        ("schedule.average=swa", "'schedule.average' is 'swa'; valid: none, last_stage"),
        ("optim.ps_momentum_by_lr=[0.8, 0.9]", "'optim.ps_momentum_by_lr' needs one momentum in [0, 1) per"),
        ("optim.ps_momentum_by_lr=[0.8, 0.9, 1.0]", "per schedule.lr stage (3), got [0.8, 0.9, 1.0]"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    base = [] if "large_batch" in override else ["plan.large_batch={20: 64, 24: 64, 28: 64}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, base + [override])
    assert needle in str(e.value)


def test_outer_momentum_needs_an_update_to_act_on():
    base = ["plan.large_batch={20: 64, 24: 64, 28: 64}", "server.outer=delayed"]
    with pytest.raises(ConfigError, match="'server.outer' is 'delayed' with server.merge 'paper'"):
        load_config(None, [*base, "server.merge=paper"])
    assert load_config(None, [*base, "server.merge=nova"]).server.outer == "delayed"


def test_rescaling_stale_rates_needs_an_update_to_scale():
    base = ["plan.large_batch={20: 64, 24: 64, 28: 64}", "server.stale_lr=rescale"]
    with pytest.raises(ConfigError, match="'server.stale_lr' is 'rescale' with server.merge 'paper'"):
        load_config(None, [*base, "server.merge=paper"])
    assert load_config(None, [*base, "server.merge=nova"]).server.stale_lr == "rescale"


def test_tail_averaging_needs_recomputed_statistics_and_one_server_rank():
    base = ["plan.large_batch={20: 64, 24: 64, 28: 64}", "schedule.average=last_stage"]
    with pytest.raises(ConfigError, match="'schedule.average' is 'last_stage' with server.bn 'average'"):
        load_config(None, [*base, "server.bn=average"])
    sync = [*base, "mode=sync", "workers.groups=[2]", "workers.small=0"]
    with pytest.raises(ConfigError, match="with sync.bn 'running': .*set sync.bn: recalibrate"):
        load_config(None, sync)
    assert load_config(None, [*sync, "sync.bn=recalibrate"]).schedule.average == "last_stage"
    with pytest.raises(ConfigError, match="with server.shards 2: the average is held by one server rank"):
        load_config(None, [*base, "server.shards=2"])
    assert load_config(None, base).schedule.average == "last_stage"  # (server.bn: recalibrate)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(bad))


def test_sync_mode_needs_no_small_groups():
    with pytest.raises(ConfigError, match="mode 'sync'"):
        load_config(None, ["plan.large_batch={20: 64, 24: 64, 28: 64}", "mode=sync"])
    cfg = load_config(None, ["plan.large_batch={20: 64, 24: 64, 28: 64}", "mode=sync", "workers.small=0"])
    assert world(cfg) == 3 and isinstance(cfg, Config)


def test_values_for_resolutions_the_schedule_does_not_use_are_named():
    from hpc_dualbatch.config import unused_keys

    cfg = load_config(
        None,
        [
            "schedule.resolutions=[28]",
            "schedule.dropout={20: 0.1, 28: 0.2}",
            "plan.large_batch={24: 64, 28: 64}",
        ],
    )
    assert unused_keys(cfg) == [
        "config key 'schedule.dropout' has values for 20 px, which schedule.resolutions [28] does not "
        "train at: ignored",
        "config key 'plan.large_batch' has values for 24 px, which schedule.resolutions [28] does not "
        "train at: ignored",
    ]
    assert unused_keys(load_config(None, ["plan.large_batch={20: 64, 24: 64, 28: 64}"])) == []
