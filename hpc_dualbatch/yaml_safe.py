"""YAML for configs and overrides, with bounded cost: no alias bomb, no runaway message.

`yaml.safe_load` builds no objects, but an alias (`*a`) is a shared reference, so a few
hundred bytes of nested aliases stand for 10**9 values or more: anything that walks the
result (the strict config conversion, an error message formatting it with `!r`) then takes
minutes and gigabytes. `load` refuses, in time linear in the text, a document that holds
more than `MAX_NODES` values once its aliases are expanded, nests deeper than `MAX_DEPTH`,
or refers to itself; `show` formats any value for an error message in at most `SHOW_CHARS`
characters.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from hpc_dualbatch.errors import ConfigError

MAX_NODES = 100_000  # values in the expanded document; a config has a few hundred
MAX_DEPTH = 64  # nesting levels; a config has at most 3
SHOW_CHARS = 120  # longest value shown in an error message

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple = 3, 8, 6, 8
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 60


def show(value: Any) -> str:
    """`repr(value)`, shortened: never longer than SHOW_CHARS, whatever the value's size."""
    text = _repr.repr(value)
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def clip(text: str) -> str:
    """Text for a message (an override, a key), cut to SHOW_CHARS characters."""
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def _expanded_size(root: Any, what: str) -> int:
    """Values in `root` once aliases are expanded; shared parts are counted once per use, in
    time linear in the number of distinct containers (memoised by identity)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{what} refers to itself (a recursive YAML alias); write the values out")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{what} nests deeper than {MAX_DEPTH} levels; a config needs at most 3")
        active.add(key)
        items = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for item in items:
            total += size(item, depth + 1)
            if total > MAX_NODES:
                break  # already too large: stop counting (the sum of a bomb overflows any budget)
        active.discard(key)
        sizes[key] = total
        return total

    return size(root, 0)


def load(text: Any, what: str) -> Any:
    """Parse one YAML document (a string or an open file) safely and with bounded size.

    `what` names the source in messages ("config file 'x.yaml'", "override 'k=v'").
    """
    loader = yaml.SafeLoader(text)  # the constructor of yaml.safe_load: plain data only
    try:
        data = loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply to parse; a config needs at most 3 levels") from None
    finally:
        loader.dispose()
    n = _expanded_size(data, what)
    if n > MAX_NODES:
        raise ConfigError(
            f"{what} expands to more than {MAX_NODES} values (YAML aliases repeating aliases?); "
            f"a config holds a few hundred: write the values out"
        )
    return data
