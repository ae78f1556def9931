"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A reader (or a crash) never sees a half-written result, plan, timing file or config.
Checkpoints and staged HDF5 files use the same rule with their own writers.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, **dump_kwargs) + "\n")
