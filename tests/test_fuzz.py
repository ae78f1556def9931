"""Fuzz the config loader and the planner: a valid result or the package's own error, nothing else.

Any exception other than an `HDBError` subclass would reach the user as a traceback (see
`launch.agree`), so these properties say that every input the loader or planner can be handed
ends in a value or a message. Accepted values are checked too (finite numbers, a config that
reloads from its own YAML, 1 <= B_S <= B_L).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hpc_dualbatch.config import Config, config_from_dict, load_config
from hpc_dualbatch.errors import HDBError
from hpc_dualbatch.method.plan import plan_dual_batch, plan_from_config
from hpc_dualbatch.method.timing import TimeFit

# HDB_FUZZ_EXAMPLES=5000 searches deeper (minutes); the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("HDB_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def known_keys(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted config key and its annotation, from the dataclasses."""
    out: dict[str, typing.Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(known_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


KEYS = known_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})

# Any value YAML can give: scalars of every type (huge ints, NaN, inf), lists, mappings with mixed keys.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**400]),
    st.floats(),
    st.text(max_size=8),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.integers(-2, 40), st.text(max_size=4), st.floats()), inner, max_size=4),
    ),
    max_leaves=8,
)


def typed(tp: typing.Any) -> st.SearchStrategy:
    """Values of the key's own type (so the checks past the type check are reached too)."""
    origin = typing.get_origin(tp)
    if origin is list:
        return st.lists(typed(typing.get_args(tp)[0]), max_size=4)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return st.dictionaries(typed(kt), typed(vt), max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(1, 40), st.integers(-2, 40), st.integers(-(2**64), 2**64))
    if tp is float:
        return st.one_of(st.floats(-0.5, 2.0), st.floats())
    return st.one_of(st.sampled_from(["ps", "sync", "cpu", "round_robin", "cyclic", "fixed", ""]), st.text())


def value_for(key: str) -> st.SearchStrategy:
    tp = KEYS.get(key)
    return anything if tp is None else st.one_of(typed(tp), anything)


keys = st.one_of(
    st.sampled_from(sorted(KEYS)),
    st.sampled_from(SECTIONS),
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(SECTIONS), st.text("abcxyz_.", max_size=5)),
    st.text(max_size=10),
)


def as_override(key: str, value: typing.Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True)}"


known_typed = st.sampled_from(sorted(KEYS)).flatmap(lambda k: typed(KEYS[k]).map(lambda v: as_override(k, v)))
overrides = st.lists(
    st.one_of(
        known_typed,  # a known key with a value of its type: reaches the value checks
        keys.flatmap(lambda k: value_for(k).map(lambda v: as_override(k, v))),
        st.text(max_size=20),  # any text at all: no '=', broken YAML, ...
    ),
    max_size=4,
)


BASE = ["plan.large_batch={20: 64, 24: 64, 28: 64}"]


def check_accepted(cfg: Config) -> None:
    for key, tp in KEYS.items():
        value: typing.Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if tp is float:
            assert math.isfinite(value), (key, value)
    # What a run saves as config.yaml (and --resume reads back) gives the same config.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@FUZZ
@given(ovs=overrides)
def test_load_config_with_random_overrides(ovs):
    try:
        cfg = load_config(None, BASE + ovs)
    except HDBError as e:
        assert str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    check_accepted(cfg)


VALID = {
    "workers": {"groups": [1, 1], "small": 1},
    "plan": {"k": 1.05, "large_batch": {12: 64, 16: 64}, "small_batch": {12: 32, 16: 32}},
    "schedule": {"epochs": 4, "lr": [0.1, 0.01], "milestones": [3], "resolutions": [12, 16]},
}


@st.composite
def mutated(draw: st.DrawFn) -> dict:
    """A valid config dict with a few keys (known or not) set to random values, or sections broken."""
    raw = json.loads(json.dumps(VALID))
    raw["plan"]["large_batch"] = {12: 64, 16: 64}  # int keys, as YAML gives them
    raw["plan"]["small_batch"] = {12: 32, 16: 32}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(keys)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = draw(value_for(key))
    if draw(st.booleans()):
        raw[draw(st.one_of(st.integers(), st.text(max_size=3)))] = draw(anything)
    return raw


@FUZZ
@given(raw=mutated())
def test_config_from_random_dicts(raw):
    try:
        cfg = config_from_dict(raw)
    except HDBError as e:
        assert str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    check_accepted(cfg)


# --- the planner ----------------------------------------------------------------------------------

any_float = st.one_of(st.floats(), st.floats(-1e-3, 1e-1), st.floats(1e-7, 1e-2), st.just(0.0))
fits = st.builds(TimeFit, a=any_float, b=any_float, r2=st.floats())
batch = st.one_of(st.integers(-2, 600), st.integers(1, 2**62), st.just(True), st.just(1.5))
RESOLUTIONS = [8, 12, 16, 24, 32]


@st.composite
def wild_plan(draw: st.DrawFn) -> tuple:
    """Anything of the right shape: NaN/inf/negative fits, k and d, batches of any sign and type."""
    res = draw(st.lists(st.sampled_from(RESOLUTIONS), max_size=3, unique=True))
    fit_map = {r: draw(fits) for r in res if draw(st.booleans())}
    large = {r: draw(batch) for r in res}
    small = {r: draw(batch) for r in res if draw(st.booleans())} or None
    n, n_small = draw(st.integers(-1, 20)), draw(st.integers(-1, 21))
    k = draw(st.one_of(st.floats(), st.floats(0.9, 2.5), st.just(1.0)))
    d = draw(st.one_of(st.integers(-1, 2_000_000), st.integers(0, 2**62)))
    return fit_map, large, n, n_small, k, d, small


@st.composite
def plausible_plan(draw: st.DrawFn) -> tuple:
    """Mostly valid: measured-looking fits for every resolution, k in [1, 1.5], n_S in 0..n."""
    res = draw(st.lists(st.sampled_from(RESOLUTIONS), min_size=1, max_size=3, unique=True))
    fit_map = {r: TimeFit(draw(st.floats(1e-6, 1e-2)), draw(st.floats(1e-4, 1.0)), 1.0) for r in res}
    large = {r: draw(st.integers(1, 4096)) for r in res}
    small = {r: draw(st.integers(1, 4096)) for r in res if draw(st.integers(0, 3)) == 0} or None
    n = draw(st.integers(1, 16))
    k = draw(st.one_of(st.just(1.0), st.floats(1.0, 1.5)))
    return fit_map, large, n, draw(st.integers(0, n)), k, draw(st.integers(n, 10**7)), small


@FUZZ
@given(args=st.one_of(wild_plan(), plausible_plan()))
def test_plan_dual_batch_with_random_inputs(args):
    fit_map, large, n, n_small, k, d, small = args
    try:
        plan = plan_dual_batch(fit_map, large, n, n_small, k, d, small)
    except HDBError as e:
        assert str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    assert plan.d_L >= 1 and sorted(plan.resolutions) == sorted(large)
    for rp in plan.resolutions.values():
        assert rp.B_L >= 1
        if n_small > 0:
            assert 1 <= rp.B_S <= rp.B_L, rp
    if n_small > 0:
        assert plan.d_S >= 1


@pytest.fixture(scope="module")
def timing_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz") / "timing.json")


timing_entry = st.one_of(
    st.fixed_dictionaries(
        {"a": any_float, "b": any_float},
        optional={"r2": st.one_of(st.none(), st.floats()), "points": anything},
    ),
    anything,
)
measured = st.fixed_dictionaries({"a": st.floats(1e-6, 1e-2), "b": st.floats(1e-4, 1.0)})
timing_doc = st.one_of(
    st.fixed_dictionaries(  # a good file
        {
            "format": st.just("hpc_dualbatch.timing"),
            "version": st.just(1),
            "resolutions": st.fixed_dictionaries({"12": measured, "16": measured}),
        }
    ),
    st.fixed_dictionaries(
        {
            "format": st.sampled_from(["hpc_dualbatch.timing", "other"]),
            "version": st.sampled_from([1, 2, "1"]),
            "resolutions": st.dictionaries(st.sampled_from(["12", "16", "x"]), timing_entry, max_size=3),
        }
    ),
    anything,
)


@FUZZ
@given(raw=mutated(), doc=timing_doc, d=st.one_of(st.integers(2, 100_000), st.integers(-1, 2**62)))
def test_plan_from_config_with_random_configs_and_timing_files(timing_path, raw, doc, d):
    with open(timing_path, "w") as f:
        f.write(json.dumps(doc))  # NaN and Infinity are written as bare words, as a hand edit could
    raw.setdefault("plan", {})
    if isinstance(raw["plan"], dict):
        raw["plan"]["timing"] = timing_path
        if raw["plan"].get("small_batch") == VALID["plan"]["small_batch"]:
            raw["plan"]["small_batch"] = {12: 32}  # 16 px is planned from the timing file
    try:
        plan = plan_from_config(config_from_dict(raw), d)
    except HDBError as e:
        assert str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    for rp in plan.resolutions.values():
        assert rp.B_L >= 1 and (rp.B_S is None or 1 <= rp.B_S <= rp.B_L)
